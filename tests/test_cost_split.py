"""The encoder/LLM cost split: FLOPs from the dims, and the twin's measured split."""

from __future__ import annotations

import pytest

from experiments.benchmarks.cost_split import (
    flops,
    flops_split,
    llm_flops,
    measured_split,
    model_dims,
)


def test_flops_of_the_7b_dims():
    """Whisper-large's 32 layers over 1,500 positions and Qwen-7B over the request's tokens,
    worked by hand: the encoder is 2 x 0.64 B x 1,500 = 1.9 TFLOPs of matmuls a 30 s window plus ~0.4 of
    attention; the LLM ~13 GFLOPs a token."""
    d = model_dims("qwen2-audio-7b-random")
    padded, trimmed = flops(d, 4.0, 4.0, padded=True), flops(d, 4.0, 4.0, padded=False)
    assert padded["llm"] == trimmed["llm"]
    assert 1.6e12 < padded["encoder"] < 2.4e12  # ~2 x 0.63 B x 1500 + attention
    # 1,500 vs 200 positions: 7.5x the matmuls, and attention grows with the square
    assert 7.5 < padded["encoder"] / trimmed["encoder"] < 9.5
    tokens = 24 + 100 + 17
    assert 12e9 * tokens < trimmed["llm"] < 16e9 * tokens


def test_small_is_sized_like_7b_and_tiny_is_not():
    lengths = [1, 2, 4, 8]
    big = flops_split(model_dims("qwen2-audio-7b-random"), lengths, 4.0)
    small = flops_split(model_dims("small"), lengths, 4.0)
    tiny = flops_split(model_dims("tiny"), lengths, 4.0)
    for k in big:
        assert small[k]["llm_share_trimmed"] == pytest.approx(big[k]["llm_share_trimmed"], abs=0.03)
        assert tiny[k]["llm_share_trimmed"] < big[k]["llm_share_trimmed"] - 0.3


def test_measured_split_on_the_twin():
    r = measured_split(model_dims("tiny"), [1, 4], 4.0, rounds=5)
    for m in r.values():
        assert 0 < m["llm_share_min"] <= m["llm_share"] <= m["llm_share_max"] < 1
        assert m["encoder_ms"] > 0 and m["llm_ms"] > 0


def test_the_twins_encoder_works_on_real_frames_only():
    """A 4 s clip is about 4x the encoder work of a 1 s clip, not the same 30 s window. Counted
    by torch's FLOP counter on the encoder the split times (its timings belong to the
    benchmark: a loaded machine can erase a 4x difference in a single timing)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from experiments.benchmarks.cost_split import FRAMES_PER_S
    from qwen2_audio_vllm.hf import Qwen2AudioSwap
    from qwen2_audio_vllm.tiny import make_config

    d = model_dims("tiny")
    model = Qwen2AudioSwap(make_config(d)).eval()
    counted = {}
    for seconds in (1, 4):
        frames = seconds * FRAMES_PER_S
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model.audio_embeddings(torch.randn(1, d.n_mels, frames), torch.ones(1, frames, dtype=torch.long))
        counted[seconds] = counter.get_total_flops()
    assert 3.5 < counted[4] / counted[1] < 5  # linear layers 4x, attention a little more


def test_a_cached_prefix_is_the_work_it_saves():
    """A request whose first c tokens hit the prefix cache costs the full request's LLM FLOPs
    minus those of prefilling the c tokens alone: the split conserves work."""
    d = model_dims("tiny")
    whole = llm_flops(d, prefill=400, generated=30)
    assert llm_flops(d, prefill=80, generated=30, cached=320) + llm_flops(d, prefill=320, generated=0) == pytest.approx(whole)
    assert llm_flops(d, prefill=80, generated=30, cached=320) < whole / 3
