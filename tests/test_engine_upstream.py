"""The tiny checkpoint through upstream vLLM's own Qwen2-Audio class (the smoke path), the
fork against it, and a mismatched checkpoint rejected."""

from __future__ import annotations

import json
import shutil

import pytest
from vllm import SamplingParams

from experiments.serving.engine import (
    audio_request,
    chat_prompt,
    engine_kwargs,
    make_llm,
)
from qwen2_audio_vllm.checkpoint import (
    load_model,
    load_processor,
    validate_checkpoint,
)
from qwen2_audio_vllm.derive import derive_checkpoint

pytestmark = pytest.mark.engine
GREEDY = SamplingParams(max_tokens=16, temperature=0)


def generate(llm, clips):
    prompt = chat_prompt(llm.get_tokenizer())
    return llm.generate([audio_request(prompt, a) for a in clips], GREEDY)


@pytest.fixture(scope="module")
def upstream_outputs(upstream_llm, speech_clips):
    return generate(upstream_llm, [a for _, a, _ in speech_clips])


def test_smoke_upstream_class_transcribes_real_speech(upstream_outputs, tiny_base, speech_clips):
    processor = load_processor(tiny_base)
    audio_id = load_model(tiny_base).audio_token_id
    for out, (_, audio, _) in list(zip(upstream_outputs, speech_clips, strict=True))[:4]:
        text = out.outputs[0].text
        assert isinstance(text, str) and len(out.outputs[0].token_ids) > 0 and text.strip()
        fe = processor.feature_extractor
        mel = fe(audio, sampling_rate=16000, return_attention_mask=True, padding="max_length")
        mel_frames = int(mel["attention_mask"].sum())  # 100 per second
        assert abs(mel_frames - len(audio) / 160) <= 1
        # PLATFORM.md: L mel frames -> (L-1)//2+1 after the conv -> (x-2)//2+1 after the pool
        pooled = ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1
        assert out.prompt_token_ids.count(audio_id) == pooled


def test_fork_linear_equals_upstream(upstream_outputs, tiny_llm, speech_clips):
    fork = generate(tiny_llm, [a for _, a, _ in speech_clips])
    assert len(fork) == len(upstream_outputs) == 8
    for f, u in zip(fork, upstream_outputs, strict=True):
        assert f.prompt_token_ids == u.prompt_token_ids
        assert f.outputs[0].token_ids == u.outputs[0].token_ids


@pytest.fixture(scope="module")
def mismatched(tiny_base, tmp_path_factory):
    """config.json says mlp, the weights are the linear projector's."""
    d = tmp_path_factory.mktemp("mismatch") / "ckpt"
    shutil.copytree(tiny_base, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["projector"] = {"name": "mlp", "stack": 1}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_mismatch_rejected_before_engine_starts(mismatched):
    with pytest.raises(ValueError, match=r"do not match the declared projector.*multi_modal_projector\.layers\.0\.weight"):
        validate_checkpoint(mismatched)
    with pytest.raises(ValueError, match="do not match the declared projector"):
        make_llm(mismatched)


def test_mismatch_rejected_by_engine_itself(mismatched, capfd):
    """Plain vllm.LLM / vllm serve (no pre-check) fails at weight loading with the same message."""
    from vllm import LLM

    with pytest.raises(RuntimeError, match="initialization failed"):
        LLM(**engine_kwargs(mismatched))
    err = capfd.readouterr()
    assert "do not match the declared projector" in err.out + err.err
    assert "multi_modal_projector.linear." in err.out + err.err  # the tensor it found


def test_derived_checkpoint_is_valid(tiny_base, tmp_path):
    d = derive_checkpoint(tiny_base, {"name": "attention", "width": 128, "heads": 2, "stack": 2}, tmp_path / "c")
    cfg = validate_checkpoint(d)
    assert cfg.projector["name"] == "attention" and cfg.projector["stack"] == 2
