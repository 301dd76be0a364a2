"""What fewer audio tokens buy in serving, on a model whose LLM takes 7B's share of a request.

    python -m experiments.benchmarks.compression_speed                        # model=small, stack 4 / 8, Q-Former 1/4
    python -m experiments.benchmarks.compression_speed 'variants=[{name: linear, stack: 4}]' rounds=7

Speed does not depend on what the weights learned, so both sides are random-weight
checkpoints of the model's dims (`conf/model/<model>.yaml`, built once and cached): the
base's linear stack-1 connector against each variant projector, through vLLM (CPU here) in
alternating rounds (baseline, variant, ...; `offline.bench_pair`: the same fresh clips of
real test speech for both, greedy decoding of a fixed `max_tokens` with EOS ignored, so
both sides generate alike). Reported per variant: request throughput and mean time to first
token as variant / baseline ratios, median [min, max] over the rounds.

Beside it, the arithmetic for Qwen2-Audio-7B (`cost_split.flops`, forward FLOPs from the
dims): prefill (encoder + LLM prefill) of one `clip_s` clip as upstream vLLM computes it (the
encoder over the 30 s window, 25 audio tokens a second) against the fork (the encoder over
the clip's real frames) at stack 1 and at each variant's token rate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.benchmarks.cost_split import TOKENS_PER_S, flops, model_dims
from experiments.benchmarks.offline import check_rounds
from qwen2_audio_vllm.tiny import TinySpec


def random_checkpoints(model: str, variants: list[dict]) -> tuple[Path, dict[str, Path]]:
    """(baseline, {label: variant}) random-weight checkpoints at `model`'s dims, the
    baseline with the linear stack-1 connector, built once under the model cache."""
    from experiments.training.base import ensure_random_tiny
    from qwen2_audio_vllm.checkpoint import cache_lock, load_model, load_processor, save_checkpoint

    base = ensure_random_tiny(model_dims(model))
    out = {}
    for block in variants:
        key = hashlib.sha256(json.dumps(block, sort_keys=True).encode()).hexdigest()[:10]
        path = base.with_name(f"{base.name}-{block['name']}-{key}")
        with cache_lock(path):
            if not (path / "config.json").is_file():
                torch.manual_seed(0)
                save_checkpoint(load_model(base, projector=block, load_projector=False), load_processor(base), path)
        out[label(block)] = path
    return base, out


def label(block: dict) -> str:
    extras = [f"{k}={v}" for k, v in block.items() if k != "name"]
    return " ".join([block["name"], *extras])


def frames_per_token(block: dict, d: TinySpec) -> float:
    """Encoder frames per audio token of a projector block (30 s window's frames / tokens)."""
    from projectors import build_projector

    with torch.device("meta"):
        proj = build_projector(block, d.encoder_dim, d.text_dim)
    frames = d.chunk_length * TOKENS_PER_S
    return frames / int(proj.output_lengths(torch.tensor([frames])))


def projection_7b(variants: list[dict], clip_s: float, text_tokens_per_s: float) -> list[dict]:
    """Prefill GFLOPs of one clip on Qwen2-Audio-7B's dims: upstream, the fork at stack 1,
    the fork with each variant's (whole-number) frames per token."""
    d = model_dims("qwen2-audio-7b-random")
    cases = [("upstream vLLM (30 s window, stack 1)", True, 1), ("fork (real frames, stack 1)", False, 1)]
    cases += [(f"fork (real frames, {label(b)})", False, round(frames_per_token(b, d))) for b in variants]
    rows = []
    for name, padded, k in cases:
        f = flops(d, clip_s, text_tokens_per_s, padded, k)
        rows.append({"case": name, "encoder_gflops": f["encoder"] / 1e9, "llm_prefill_gflops": f["llm_prefill"] / 1e9,
                     "prefill_gflops": (f["encoder"] + f["llm_prefill"]) / 1e9})
    upstream = rows[0]["prefill_gflops"]
    for r in rows:
        r["vs_upstream"] = upstream / r["prefill_gflops"]
    return rows


def format_tables(result: dict) -> str:
    lines = [f"Measured on model={result['model']} (random weights), {result['rounds']} alternating rounds, "
             f"{result['requests']} requests of {result['lengths_s']} s clips per round:", "",
             "| projector | audio tokens/s | req/s vs stack 1, median [min, max] | mean TTFT vs stack 1 | req/s (variant / stack 1) |",
             "|---|---|---|---|---|"]
    for name, r in result["measured"].items():
        ratio, low, high = (r[f"ratio_vs_linear{s}"] for s in ("", "_min", "_max"))
        lines.append(f"| {name} | {r['audio_tokens_per_s']:.2f} | {ratio['request_throughput']:.2f} "
                     f"[{low['request_throughput']:.2f}, {high['request_throughput']:.2f}] | "
                     f"{ratio.get('ttft_mean_s', float('nan')):.2f} [{low.get('ttft_mean_s', float('nan')):.2f}, "
                     f"{high.get('ttft_mean_s', float('nan')):.2f}] | {r['variant']['request_throughput']:.2f} / "
                     f"{r['baseline']['request_throughput']:.2f} |")
    lines += ["", f"Qwen2-Audio-7B, prefill FLOPs of one {result['clip_s']:g} s clip (arithmetic from the dims):", "",
              "| case | encoder GFLOPs | LLM prefill GFLOPs | prefill GFLOPs | upstream / this |", "|---|---|---|---|---|"]
    for r in result["projection_7b"]:
        lines.append(f"| {r['case']} | {r['encoder_gflops']:.0f} | {r['llm_prefill_gflops']:.0f} | "
                     f"{r['prefill_gflops']:.0f} | {r['vs_upstream']:.2f}x |")
    return "\n".join(lines)


@hydra.main(config_path="../../conf/apps", config_name="compression_speed", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.benchmarks.offline import bench_pair
    from experiments.data import read_manifest
    from experiments.data.prepare import ensure_synthetic
    from experiments.report import write_json_atomic
    from experiments.serving.engine import quiet_vllm

    check_rounds(cfg.rounds)
    quiet_vllm(cfg.verbose)
    variants = OmegaConf.to_container(cfg.variants, resolve=True)
    d = model_dims(cfg.model)
    for block in variants:  # a bad block is refused before any engine starts
        frames_per_token(block, d)
    engine = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "model" / f"{cfg.model}.yaml"),
                                    resolve=True).get("engine", {}) | {"max_num_seqs": cfg.max_num_seqs}
    rows = read_manifest(ensure_synthetic()["test"])
    base, checkpoints = random_checkpoints(cfg.model, variants)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    result = {"model": cfg.model, "rounds": cfg.rounds, "requests": cfg.requests, "lengths_s": list(cfg.lengths_s),
              "max_tokens": cfg.max_tokens, "clip_s": cfg.clip_s, "measured": {},
              "projection_7b": projection_7b(variants, cfg.clip_s, cfg.text_tokens_per_s)}
    for block in variants:
        name = label(block)
        r = bench_pair(checkpoints[name], base, rows, list(cfg.lengths_s), cfg.requests, cfg.max_tokens, engine,
                       rounds=cfg.rounds)
        result["measured"][name] = r | {"audio_tokens_per_s": TOKENS_PER_S / frames_per_token(block, d)}
        write_json_atomic(out_dir / "compression_speed.json", result)  # each finished pair is kept
    print(format_tables(result))
    print(f"-> {out_dir / 'compression_speed.json'}")


if __name__ == "__main__":
    main()
