"""Benchmark: the fork (encoder over real frames, linear projector) vs upstream vLLM's own
Qwen2-Audio class (30 s window) on the same checkpoint and the same requests, per clip length.

    .venv/bin/python -m experiments.benchmarks.fork [checkpoint=DIR] [lengths=[1,2,4,8,15,30]] [rounds=5]

Both engines stay up; every round measures each length on upstream then the fork (A B A B
...), so the drift of a noisy machine hits both alike. Each measurement is one offline
batch (`requests` clips of real test speech tiled to the length, all submitted at once,
greedy, `max_tokens` output tokens each), new clips every round, prefix caching and the
multimodal processor cache off (a repeated clip would skip the encoder). Prints, per length, requests/s and RTFx (audio
seconds per wall second) of each engine as the median over rounds, and the fork/upstream
ratio as the median [min, max] of the per-round ratios. `trim=false` measures the fork with
"trim_audio_padding": false instead (the full window, as upstream).
"""

from __future__ import annotations

import json
import statistics
from functools import partial
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.benchmarks.offline import (
    check_rounds,
    interleaved_rounds,
    measure,
    request_audio,
    speedup,
)
from qwen2_audio_vllm.checkpoint import UPSTREAM_ARCHITECTURE


@hydra.main(config_path="../../conf/apps", config_name="bench_fork", version_base=None)
def main(cfg: DictConfig) -> None:
    check_rounds(cfg.rounds)
    lengths, n = list(cfg.lengths), cfg.requests
    from vllm import LLM

    from experiments.data import read_manifest
    from experiments.data.prepare import ensure_synthetic
    from experiments.serving.engine import close_llm, engine_kwargs, make_llm
    from experiments.training.base import ensure_random_tiny

    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else ensure_random_tiny()
    rows = read_manifest(ensure_synthetic()["test"])
    # fresh clips in every round (and no prefix or processor cache): a repeated clip would be
    # served from vLLM's caches without running the encoder at all
    clip_sets = {s: request_audio(rows, [s], n * (cfg.rounds + 1)) for s in lengths}
    audios = {s: [clips[(r + 1) * n : (r + 2) * n] for r in range(cfg.rounds)] for s, clips in clip_sets.items()}
    common = {"max_num_seqs": n, "enable_prefix_caching": False, "mm_processor_cache_gb": 0}
    engines = {
        "upstream": LLM(**engine_kwargs(ckpt, hf_overrides={"architectures": [UPSTREAM_ARCHITECTURE]}, **common)),
        "fork": make_llm(ckpt, hf_overrides={"trim_audio_padding": cfg.trim}, **common),
    }
    try:
        for llm in engines.values():  # warm-up: every length once, on clips not measured
            for clips in clip_sets.values():
                measure(llm, clips[:2], cfg.max_tokens)
        def batch(llm, s: float, r: int) -> None:  # round r's clips of length s
            measure(llm, audios[s][r], cfg.max_tokens)

        runs = {(s, name): partial(batch, llm, s) for s in lengths for name, llm in engines.items()}
        seconds = interleaved_rounds(runs, cfg.rounds)
    finally:
        for llm in engines.values():
            close_llm(llm)
    table = summarize(seconds, n, lengths)
    print(f"{'length':>7} {'upstream req/s':>15} {'fork req/s':>11} {'upstream RTFx':>14} {'fork RTFx':>10}  fork/upstream median [min, max]")
    for s, row in table.items():
        print(f"{s:>6g}s {row['upstream_req_s']:>15.2f} {row['fork_req_s']:>11.2f} {row['upstream_rtfx']:>14.1f} "
              f"{row['fork_rtfx']:>10.1f}  {row['ratio_median']:.2f} [{row['ratio_min']:.2f}, {row['ratio_max']:.2f}]")
    result = {"per_length": table, "requests": n, "max_tokens": cfg.max_tokens, "rounds": cfg.rounds,
              "trim": cfg.trim, "checkpoint": str(ckpt)}
    out = Path(HydraConfig.get().runtime.output_dir) / "fork.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"-> {out}")

def summarize(seconds: dict[tuple[float, str], list[float]], requests: int, lengths: list[float]) -> dict:
    """Per length: median req/s and RTFx per engine, and the per-round fork/upstream
    throughput ratios as median, min and max. `seconds`: {(length, engine): [s per round]}."""
    out = {}
    for s in lengths:
        up, fork = seconds[(s, "upstream")], seconds[(s, "fork")]
        r = speedup(up, fork)  # same requests: time ratio = throughput ratio
        out[s] = {
            "upstream_req_s": requests / statistics.median(up), "fork_req_s": requests / statistics.median(fork),
            "upstream_rtfx": requests * s / statistics.median(up), "fork_rtfx": requests * s / statistics.median(fork),
            "ratio_median": r["median"], "ratio_min": r["min"], "ratio_max": r["max"],
        }
    return out

if __name__ == "__main__":
    main()
