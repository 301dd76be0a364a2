"""The checkpoint format: a tiny Qwen2-Audio directory built offline, reloaded by the HF twin,
and the token-count rule on a real spoken clip. One tiny build per module (~5 s)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Qwen2AudioProcessor, Qwen2TokenizerFast

from experiments.data import tokenizer_corpus
from experiments.data.audio import load_audio
from projectors import LinearProjector, MLPProjector
from qwen2_audio_vllm.checkpoint import SPECIAL_TOKENS, WEIGHTS, load_config, load_model
from qwen2_audio_vllm.tiny import TinySpec, build_tiny_checkpoint

SPEC = TinySpec()
HUB_PREFIXES = ("audio_tower.", "multi_modal_projector.", "language_model.model.")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny") / "model", tokenizer_corpus(), SPEC
    )


@pytest.fixture(scope="module")
def saved(ckpt):
    return load_file(ckpt / WEIGHTS)


def test_build_is_deterministic(ckpt, tmp_path):
    again = build_tiny_checkpoint(tmp_path / "again", tokenizer_corpus(), SPEC)
    assert (again / WEIGHTS).read_bytes() == (ckpt / WEIGHTS).read_bytes()
    assert json.loads((again / "config.json").read_text()) == json.loads(
        (ckpt / "config.json").read_text()
    )


def test_config_names_the_fork_and_the_projector(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["Qwen2AudioSwapForConditionalGeneration"]
    assert config["projector"] == {
        "name": "linear",
        "stack": 1,
        "in_dim": SPEC.encoder_dim,
        "out_dim": SPEC.text_dim,
    }
    assert not ckpt.with_name(ckpt.name + ".tmp").exists()  # written atomically


def test_tokenizer_specials_are_single_tokens(ckpt):
    tokenizer = Qwen2TokenizerFast.from_pretrained(ckpt)
    ids = {}
    for token in SPECIAL_TOKENS:
        ids[token] = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids[token]) == 1, (token, ids[token])
    assert len({i[0] for i in ids.values()}) == len(SPECIAL_TOKENS)

    config = load_config(ckpt)
    assert config.audio_token_index == ids["<|AUDIO|>"][0]
    assert config.text_config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>"


def test_llm_head_dim_fits_vllm_cpu(ckpt):
    text = load_config(ckpt).text_config
    assert text.hidden_size % text.num_attention_heads == 0
    assert text.hidden_size // text.num_attention_heads >= 64


def test_weights_use_hub_key_layout(ckpt):
    with safe_open(ckpt / WEIGHTS, framework="pt") as f:
        keys = set(f.keys())
    assert all(k.startswith(HUB_PREFIXES) or k == "language_model.lm_head.weight" for k in keys)
    assert "language_model.lm_head.weight" in keys
    assert {k for k in keys if k.startswith("multi_modal_projector.")} == {
        "multi_modal_projector.linear.weight",
        "multi_modal_projector.linear.bias",
    }
    for prefix in HUB_PREFIXES:
        assert any(k.startswith(prefix) for k in keys), prefix


def test_load_model_round_trip(ckpt, saved):
    model = load_model(ckpt)
    assert isinstance(model.multi_modal_projector, LinearProjector)
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key


def test_mismatched_projector_names_keys(ckpt):
    with pytest.raises(ValueError, match="multi_modal_projector") as err:
        load_model(ckpt, projector={"name": "mlp", "stack": 1})
    msg = str(err.value)
    assert "multi_modal_projector.layers.0.weight" in msg  # expected by the mlp, missing
    assert "multi_modal_projector.linear.weight" in msg  # found in the file, unexpected
    assert f"({SPEC.text_dim}, {SPEC.encoder_dim})" in msg  # the linear weight found: (text width, audio width)


def test_mismatched_projector_names_shapes(ckpt):
    with pytest.raises(ValueError, match="multi_modal_projector.linear.weight") as err:
        load_model(ckpt, projector={"name": "linear", "stack": 2})
    d, t = SPEC.encoder_dim, SPEC.text_dim
    assert f"(({t}, {2 * d}), ({t}, {d}))" in str(err.value)  # (expected, found)


def test_fresh_projector_keeps_the_rest(ckpt, saved):
    model = load_model(ckpt, projector={"name": "mlp"}, load_projector=False)
    assert isinstance(model.multi_modal_projector, MLPProjector)
    state = model.state_dict()
    for key, tensor in saved.items():
        if not key.startswith("multi_modal_projector."):
            assert torch.equal(state[key], tensor), key


def test_config_without_projector_block(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    del config["projector"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no 'projector' block") as err:
        load_config(tmp_path)
    assert '"name": "linear", "stack": 1' in str(err.value)


@pytest.fixture(scope="module")
def spoken_clip(tmp_path_factory):
    """A real espeak-ng utterance (22.05 kHz on disk) read as a user's file would be."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    wav = tmp_path_factory.mktemp("speech") / "door.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "open the red door"], check=True)
    return load_audio(wav)  # (T,) float32, 16 kHz


@pytest.mark.parametrize("stack", [1, 2])
def test_audio_token_count_on_spoken_clip(ckpt, spoken_clip, stack):
    audio = spoken_clip
    processor = Qwen2AudioProcessor.from_pretrained(ckpt)
    feats = processor.feature_extractor(
        audio,
        sampling_rate=16000,
        return_attention_mask=True,
        padding="max_length",
        return_tensors="pt",
    )
    features, mask = feats["input_features"], feats["attention_mask"]
    assert features.shape == (1, SPEC.n_mels, 100 * SPEC.chunk_length)
    L = int(mask.sum())  # mel frames, 100 per second
    assert abs(L - len(audio) / 160) <= 1

    model = load_model(
        ckpt, projector={"name": "linear", "stack": stack}, load_projector=stack == 1
    )
    with torch.no_grad():
        (embeds,) = model.audio_embeddings(features, mask)
    pooled = ((L - 1) // 2 + 1 - 2) // 2 + 1  # 25 per second
    tokens = int(model.multi_modal_projector.output_lengths(torch.tensor([pooled])))
    assert tokens == -(-pooled // stack)
    assert embeds.shape == (tokens, SPEC.text_dim)
    assert torch.isfinite(embeds).all()


@pytest.mark.slow
def test_vllm_workers_never_import_the_training_twin():
    """What vLLM loads (the fork and what it needs) stays clear of the transformers twin
    and of checkpoint building: imports flow one way (DESIGN.md)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, qwen2_audio_vllm.served; "
            "print(sorted(m for m in sys.modules if m.startswith('qwen2_audio_vllm')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    loaded = out.strip().splitlines()[-1]
    assert "qwen2_audio_vllm.model" in loaded and "qwen2_audio_vllm.extensions.long_audio" in loaded
    assert "qwen2_audio_vllm.hf" not in loaded and "qwen2_audio_vllm.checkpoint" not in loaded
