"""The encoder over real frames (qwen2_audio_vllm/encoder.py) against the 30 s window:
the projected audio embeddings agree within TRIM_ATOL, and the fork (trimming, the
default) gives upstream vLLM's greedy tokens on the project's clips and on fresh clips of
voices never used anywhere else in the repo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.data.audio import SAMPLE_RATE
from qwen2_audio_vllm.checkpoint import load_model, load_processor
from qwen2_audio_vllm.encoder import buckets
from tests.conftest import speak

# float32 on the tiny model: only the summation order of differently shaped matmuls differs
TRIM_ATOL = 1e-4
UNSEEN_VOICES = ("en+f4", "en-us+m2", "en+m7")  # not in experiments.data's train or test voices
LENGTHS_S = (1.0, 2.0, 4.0, 8.0)


def test_buckets_group_similar_lengths():
    lengths = [100, 800, 110, 3000, 120, 2900, 130]
    got = buckets(lengths, ratio=1.25)
    assert got == [[0, 2, 4], [6], [1], [5, 3]]  # 130 > 1.25 * 100 starts a new bucket
    assert sorted(i for g in got for i in g) == list(range(len(lengths)))


def test_processor_mel_is_the_window_features_prefix(tiny_base, length_sweep):
    """What the fork's processor ships (extensions/real_frames.py: encoder.mel_features) is
    the first frames of transformers' 30 s window features, bit for bit, from 0.1 s up to the
    whole window, with the same real-frame count, and the padding keeps the silence column."""
    from qwen2_audio_vllm.encoder import MEL_MARGIN, mel_features, pad_mels

    fe = load_processor(tiny_base).feature_extractor
    mels = []
    for name, audio in length_sweep.items():
        full = fe(audio, sampling_rate=SAMPLE_RATE, padding="max_length", return_attention_mask=True, return_tensors="pt")
        mel, real = mel_features(fe, audio)
        assert real == int(full["attention_mask"].sum()), name
        assert mel.shape[1] == min(real + MEL_MARGIN, fe.nb_max_frames), name
        assert torch.equal(mel, full["input_features"][0, :, : mel.shape[1]]), name
        mels.append((mel, real))
    feats, mask = pad_mels(mels)
    assert feats.shape[-1] == fe.nb_max_frames and mask.sum(-1).tolist() == [r for _, r in mels]
    short = mels[0][0]
    assert torch.equal(feats[0, :, short.shape[1]:], short[:, -1:].expand(-1, feats.shape[-1] - short.shape[1]))


def features(processor, clips):
    fe = processor.feature_extractor
    return fe(clips, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")


@pytest.mark.slow
def test_twin_trimmed_equals_full_window(tiny_base, length_sweep):
    """A batch mixing 0.25 s to 30 s clips, trimmed into buckets vs the whole window."""
    model, processor = load_model(tiny_base), load_processor(tiny_base)
    clips = [length_sweep[k] for k in ("0.25s", "1.0s", "2.3s", "5.0s", "10.0s", "17.7s", "30.0s", "1.0s")]
    feats = features(processor, clips)
    with torch.no_grad():
        trimmed = model.project(*model.encode_audio(feats["input_features"], feats["attention_mask"], trim=True))
        full = model.project(*model.encode_audio(feats["input_features"], feats["attention_mask"], trim=False))
    worst = max(float((a - b).abs().max()) for a, b in zip(trimmed, full, strict=True))
    print(f"max |trimmed - full window| of projected embeddings: {worst:.2e}")
    assert [t.shape for t in trimmed] == [f.shape for f in full]
    assert worst <= TRIM_ATOL


@pytest.fixture(scope="module")
def unseen_clips(tmp_path_factory) -> list[np.ndarray]:
    """Fresh espeak-ng speech in voices never used for training or testing, tiled to 1-8 s."""
    d = tmp_path_factory.mktemp("unseen")
    texts = ["seven green windows", "please bring the yellow cup", "nineteen boxes at the station"]
    out = []
    for i, (voice, text) in enumerate(zip(UNSEEN_VOICES, texts, strict=True)):
        speech = speak(text, d / f"{i}.wav", voice=voice)
        out += [np.resize(speech, int(s * SAMPLE_RATE)).astype(np.float32) for s in LENGTHS_S]
    return out


@pytest.mark.engine
def test_fork_trimmed_equals_upstream_full_window(tiny_base, tiny_llm, upstream_llm, speech_clips, unseen_clips):
    from vllm import SamplingParams

    from experiments.serving.engine import EmbedAudio, audio_request, chat_prompt

    clips = [a for _, a, _ in speech_clips] + unseen_clips
    greedy = SamplingParams(max_tokens=16, temperature=0)
    results = {}
    for name, llm in (("upstream", upstream_llm), ("fork", tiny_llm)):
        prompt = chat_prompt(llm.get_tokenizer())
        results[name] = llm.generate([audio_request(prompt, a) for a in clips], greedy)
    # the served embeddings, trimmed (default) vs the window
    feats = features(load_processor(tiny_base), clips)
    trimmed, full = (tiny_llm.apply_model(EmbedAudio(feats["input_features"], feats["attention_mask"], trim=t))[0]
                     for t in (True, False))
    for u, f in zip(results["upstream"], results["fork"], strict=True):
        assert u.prompt_token_ids == f.prompt_token_ids
        assert u.outputs[0].token_ids == f.outputs[0].token_ids
    worst = max(float((a - b).abs().max()) for a, b in zip(trimmed, full, strict=True))
    print(f"engine: max |trimmed - full window| of projected embeddings: {worst:.2e}")
    assert len(trimmed) == len(clips) and worst <= TRIM_ATOL
