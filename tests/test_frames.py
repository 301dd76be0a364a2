"""Requests carrying precomputed pooled encoder frames instead of audio (projector only)."""

from __future__ import annotations

import pytest
import torch

from experiments.serving.engine import audio_request, chat_prompt, close_llm, make_llm
from qwen2_audio_vllm.checkpoint import load_model, load_processor
from qwen2_audio_vllm.derive import derive_checkpoint

pytestmark = pytest.mark.engine


def frames_request(prompt: str, frames: torch.Tensor) -> dict:
    return {"prompt": prompt, "multi_modal_data": {"audio": {"audio_frames": [frames]}}}


def test_frames_give_the_same_output_as_audio(tiny_base, speech_clips, tmp_path):
    from vllm import SamplingParams

    ckpt = derive_checkpoint(tiny_base, {"name": "mlp", "stack": 2}, tmp_path / "c", seed=3)
    model, processor = load_model(ckpt), load_processor(ckpt)
    from experiments.training.cache import encoder_frames

    audios = [a for _, a, _ in speech_clips]
    cached = encoder_frames(model, processor.feature_extractor, audios)
    llm = make_llm(ckpt, enable_mm_embeds=True)  # vLLM's switch for non-audio inputs
    try:
        prompt = chat_prompt(processor.tokenizer)
        greedy = SamplingParams(max_tokens=10, temperature=0)
        from_audio = llm.generate([audio_request(prompt, a) for a in audios], greedy)
        from_frames = llm.generate([frames_request(prompt, f) for f in cached], greedy)
        d = model.config.audio_config.d_model
        bad = torch.zeros(20, d + 1)
        with pytest.raises(ValueError, match=rf"expected \(frames, {d}\)"):
            llm.generate([frames_request(prompt, bad)], greedy)
        ok = llm.generate([frames_request(prompt, cached[0])], greedy)  # the engine survives
    finally:
        close_llm(llm)
    for a, f, c in zip(from_audio, from_frames, cached, strict=True):
        n = int(model.multi_modal_projector.output_lengths(torch.tensor([c.shape[0]])))
        assert f.prompt_token_ids.count(model.audio_token_id) == n == a.prompt_token_ids.count(model.audio_token_id)
        assert f.outputs[0].token_ids == a.outputs[0].token_ids
    assert ok[0].outputs[0].token_ids == from_frames[0].outputs[0].token_ids
