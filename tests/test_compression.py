"""What fewer audio tokens buy (experiments.benchmarks.compression_speed): the 7B prefill
arithmetic, and the benchmark itself through vLLM on random-weight checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.benchmarks.compression_speed import frames_per_token, projection_7b
from experiments.benchmarks.cost_split import encoder_flops, llm_flops, model_dims
from experiments.benchmarks.training import PROMPT_TOKENS

ROOT = Path(__file__).resolve().parents[1]
STACK4 = {"name": "linear", "stack": 4}
QFORMER = {"name": "attention", "downsample": "queries", "window": 8, "queries": 2, "mean_shortcut": True}


def test_7b_projection_is_encoder_plus_llm_prefill_of_each_case():
    """5 s on Qwen2-Audio-7B: upstream runs the encoder over the 1500 window positions and
    prefills 125 audio tokens; the fork runs it over 250 positions; stack 4 prefills 32."""
    d = model_dims("qwen2-audio-7b-random")
    rows = {r["case"]: r for r in projection_7b([STACK4, QFORMER], 5.0, 4.0)}
    upstream, fork = rows["upstream vLLM (30 s window, stack 1)"], rows["fork (real frames, stack 1)"]
    stack4 = rows["fork (real frames, linear stack=4)"]
    assert upstream["encoder_gflops"] == pytest.approx(encoder_flops(d, 1500) / 1e9)
    assert fork["encoder_gflops"] == stack4["encoder_gflops"] == pytest.approx(encoder_flops(d, 250) / 1e9)
    assert fork["llm_prefill_gflops"] == pytest.approx(llm_flops(d, PROMPT_TOKENS + 125, 0) / 1e9)
    assert stack4["llm_prefill_gflops"] == pytest.approx(llm_flops(d, PROMPT_TOKENS + math.ceil(125 / 4), 0) / 1e9)
    assert upstream["vs_upstream"] == 1.0 < fork["vs_upstream"] < stack4["vs_upstream"]
    assert round(frames_per_token(QFORMER, d)) == 4  # 2 queries per 8 frames: the same rate as stack 4


@pytest.mark.slow
def test_a_variant_that_does_not_divide_is_refused_before_any_engine(tmp_path):
    run = subprocess.run([sys.executable, "-m", "experiments.benchmarks.compression_speed",
                          "variants=[{name:attention,downsample:queries,window:8,queries:3}]", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode != 0 and "queries=3 do not divide window=8" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "compression_speed.json").exists()


@pytest.mark.engine
def test_compression_speed_serves_a_quarter_of_the_tokens_in_alternating_rounds(tmp_path):
    """The benchmark on model=tiny (random weights), one variant: five rounds for each side,
    the variant's requests carry a quarter of the baseline's audio tokens (ceil per clip),
    and the table gives the req/s and TTFT ratios with their range."""
    run = subprocess.run([sys.executable, "-m", "experiments.benchmarks.compression_speed", "model=tiny",
                          "variants=[{name:linear,stack:4}]", "requests=4", "lengths_s=[2.0]", "max_tokens=4",
                          "max_num_seqs=4", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "compression_speed.json").read_text())
    r = result["measured"]["linear stack=4"]
    assert len(r["per_round"]["baseline"]) == len(r["per_round"]["variant"]) == 5
    assert r["baseline"]["avg_audio_tokens_per_request"] == 50  # 2 s at 25 tokens/s
    assert r["variant"]["avg_audio_tokens_per_request"] == math.ceil(50 / 4)
    assert r["ratio_vs_linear_min"]["request_throughput"] <= r["ratio_vs_linear"]["request_throughput"] \
        <= r["ratio_vs_linear_max"]["request_throughput"]
    assert "ttft_mean_s" in r["ratio_vs_linear"]
    assert "| linear stack=4 | 6.27 |" in run.stdout and "Qwen2-Audio-7B, prefill FLOPs" in run.stdout
