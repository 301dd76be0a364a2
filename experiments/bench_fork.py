"""Benchmark: the fork (linear projector) vs upstream vLLM's own Qwen2-Audio class on the
same weights and the same requests, in one run, alternating engines to spread drift.

    .venv/bin/python -m experiments.bench_fork [checkpoint dir] --requests 64 --rounds 2

Prints requests/s per engine and round and the ratio fork / upstream (goal >= 0.98).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.bench import add_request_args, bench_engine, request_set
from qwen2_audio_vllm.checkpoint import UPSTREAM_ARCHITECTURE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_request_args(parser, max_tokens=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ckpt, audios = request_set(args)
    engines = {"upstream": {"hf_overrides": {"architectures": [UPSTREAM_ARCHITECTURE]}}, "fork": {}}
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name, overrides in engines.items():
            s = bench_engine(ckpt, audios, args.max_tokens, overrides | {"max_num_seqs": args.requests})
            runs[name].append(s["request_throughput"])
            print(f"round {r + 1} {name:8s} {s['request_throughput']:.3f} req/s  {s['output_token_throughput']:.1f} tok/s")
    fork, upstream = sum(runs["fork"]) / args.rounds, sum(runs["upstream"]) / args.rounds
    result = {"requests_per_s": runs, "ratio_fork_vs_upstream": fork / upstream, "requests": args.requests,
              "max_tokens": args.max_tokens, "lengths_s": args.lengths, "checkpoint": str(ckpt)}
    print(f"fork / upstream throughput ratio: {fork / upstream:.3f} (mean of {args.rounds} rounds each)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
