"""What an 8-bit audio tower costs in WER and buys in speed, on the aligned Whisper base.

    python -m experiments.benchmarks.tower_quant                 # the compression baseline, int8 vs full
    python -m experiments.benchmarks.tower_quant checkpoint=DIR rounds=7 limit=100

The same checkpoint served twice through vLLM: the tower at full precision
(`"audio_tower_quantization": "none"`) and as the fork's int8 W8A8 (`"int8"`), set per
engine through `hf_overrides`; the language model is the same in both.

- Quality: WER on the held-out test split, clean and noisy (voices never trained on),
  with the paired difference int8 - full and its 95 % bootstrap interval
  (`metrics.wer_difference`).
- Speed, both engines up, alternating rounds (full, int8, ...; `offline.bench_pair`), each
  round a fresh batch of `requests` clips of `lengths_s` (1-8 s of real test speech):
  request throughput of the batch, then the tower alone inside the engine's worker
  (`TowerTime`: the served `audio_tower` over each of `encoder_clips` clips, one call per
  clip), reported as int8 / full, median [min, max] over the rounds.
- Memory: peak resident memory of each engine's processes over the rounds, and the tower's
  linear weights in bytes at each precision.
- For a GPU, an fp8 estimate from the cost split (no GPU measured here): the share of the
  7B tower's FLOPs in its linears, and Amdahl's law with fp8 GEMMs at twice bf16's rate.

Checkpoint: `checkpoint=DIR`, or (default) the compression experiment's linear baseline,
aligned first when its align key has none. Writes tower_quant.json and tower_quant.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

PRECISIONS = {"full": "none", "int8": "int8"}


class TowerTime:
    """`llm.apply_model(TowerTime(features, conv_lengths))` -> seconds the served audio tower
    takes over the clips, one call each (mel features at each clip's own width). Needs
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 before the engine starts, like engine.EmbedAudio."""

    def __init__(self, features: list[torch.Tensor], conv_lengths: list[int]) -> None:
        self.features, self.conv_lengths = features, conv_lengths

    def __call__(self, model) -> float:
        tower = model.audio_tower
        device = next(tower.parameters()).device
        with torch.no_grad():
            t0 = time.perf_counter()
            for f, n in zip(self.features, self.conv_lengths, strict=True):
                tower.encode(f[None].to(device), [n])
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0


def tower_probe(ckpt: Path, clips: list[np.ndarray]) -> TowerTime:
    from qwen2_audio_vllm.checkpoint import load_processor
    from qwen2_audio_vllm.encoder import mel_features, output_lengths

    fe = load_processor(ckpt).feature_extractor
    mels = [mel_features(fe, c) for c in clips]
    conv = output_lengths(torch.tensor([n for _, n in mels]))[0].tolist()
    return TowerTime([m for m, _ in mels], conv)


def linear_weight_bytes(config) -> dict[str, int]:
    """The tower's linear weights (q, k, v, out, fc1, fc2 per layer) at each precision: fp32
    4 bytes a weight; int8 1 byte a weight plus one fp32 scale per output channel."""
    a = config.audio_config
    d, ffn = a.d_model, a.encoder_ffn_dim
    weights = a.encoder_layers * (4 * d * d + 2 * d * ffn)
    channels = a.encoder_layers * (4 * d + ffn + d)
    return {"full": 4 * weights, "int8": weights + 4 * channels}


def fp8_estimate(clip_s: float) -> dict[str, float]:
    """Qwen2-Audio-7B's tower (32 layers, d 1280, ffn 5120) over one clip's real frames: the
    share of multiply-adds in the linears (the rest: attention scores and the conv stem),
    and the encoder speed-up if those ran at twice the rate (fp8 against bf16 GEMMs, dense
    peak on H100/H200) and nothing else changed. An estimate, not a measurement."""
    d, ffn, layers, mels = 1280, 5120, 32, 128
    frames = int(clip_s * 50)
    linear = layers * frames * (4 * d * d + 2 * d * ffn)
    attention = layers * 2 * frames * frames * d
    stem = frames * 2 * 3 * d * mels + frames * 3 * d * d  # conv1 at 100/s, conv2 at 50/s
    share = linear / (linear + attention + stem)
    return {"clip_s": clip_s, "linear_share": share, "encoder_speedup_bound": 1 / ((1 - share) + share / 2)}


def table(result: dict) -> str:
    q = result["quality"]
    s = result["speed"]
    lines = ["| split | WER, full | WER, int8 | int8 - full [95 % CI] |", "|---|---|---|---|"]
    for split in q["splits"]:
        r = q[split]
        lines.append(f"| {split} | {r['full']:.1%} | {r['int8']:.1%} | {100 * r['diff']['difference']:+.2f} "
                     f"[{100 * r['diff']['ci_low']:+.2f}, {100 * r['diff']['ci_high']:+.2f}] |")
    enc, req = s["encoder_speedup"], s["request_speedup"]
    lines += ["", "| measure | int8 / full, median [min, max] |", "|---|---|",
              f"| tower throughput (clips/s) | {enc['median']:.2f}x [{enc['min']:.2f}, {enc['max']:.2f}] |",
              f"| request throughput (req/s) | {req['median']:.2f}x [{req['min']:.2f}, {req['max']:.2f}] |",
              "", "| precision | tower ms per clip (median round) | req/s (median round) | engine peak RSS | tower linear weights |",
              "|---|---|---|---|---|"]
    for name in PRECISIONS:
        lines.append(f"| {name} | {s['tower_ms_per_clip'][name]:.1f} | {s['req_per_s'][name]:.2f} | "
                     f"{s['peak_rss_gib'][name]:.2f} GiB | {result['weight_bytes'][name] / 2**20:.1f} MiB |")
    e = result["fp8_estimate"]
    lines += ["", f"fp8 on a GPU (estimate, not measured): {e['linear_share']:.1%} of Qwen2-Audio-7B's tower "
              f"multiply-adds over a {e['clip_s']:g} s clip are in its linears; at twice bf16's GEMM rate the "
              f"tower would run at most {e['encoder_speedup_bound']:.2f}x faster."]
    return "\n".join(lines)


@hydra.main(config_path="../../conf/apps", config_name="tower_quant", version_base=None)
def main(cfg: DictConfig) -> None:
    import os
    import statistics

    from hydra.core.hydra_config import HydraConfig

    from experiments.benchmarks.hotwords import aligned_checkpoint
    from experiments.benchmarks.offline import bench_pair, check_rounds, request_audio, speedup
    from experiments.data import read_manifest
    from experiments.evaluate import evaluate_checkpoint
    from experiments.metrics import wer_difference
    from experiments.report import write_json_atomic
    from experiments.serving.engine import quiet_vllm
    from experiments.training.base import default_manifests
    from qwen2_audio_vllm.checkpoint import load_config

    check_rounds(cfg.rounds)
    quiet_vllm(cfg.verbose)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # TowerTime goes to the workers
    out = Path(HydraConfig.get().runtime.output_dir)
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else aligned_checkpoint(["train.hotwords.p=0"])
    manifests = default_manifests()
    splits = {name: read_manifest(manifests[name])[: cfg.limit or None] for name in cfg.splits}
    engine = OmegaConf.to_container(cfg.engine, resolve=True)
    first, *more = cfg.splits
    hyps: dict = {}
    wers: dict = {}
    for name, value in PRECISIONS.items():
        overrides = engine | {"hf_overrides": {"audio_tower_quantization": value}}
        m = evaluate_checkpoint(ckpt, splits[first], out / name, overrides, cfg.max_tokens, {s: splits[s] for s in more})
        for s in cfg.splits:
            metrics = m if s == first else m[s]
            wers[(name, s)] = metrics["wer"]
            lines = Path(metrics["utterances"]).read_text().splitlines()
            hyps[(name, s)] = [json.loads(line)["hyp"] or "" for line in lines]
    quality: dict = {"splits": list(cfg.splits)}
    for s in cfg.splits:
        refs = [r["text"] for r in splits[s]]
        diff = wer_difference(refs, hyps[("int8", s)], hyps[("full", s)])
        quality[s] = {"clips": len(refs), "full": wers[("full", s)], "int8": wers[("int8", s)],
                      "diff": {"difference": diff["wer_delta"], "ci_low": diff["wer_delta_ci_low"],
                               "ci_high": diff["wer_delta_ci_high"]}}

    rows = read_manifest(manifests["test"])
    probe = tower_probe(ckpt, request_audio(rows, list(cfg.lengths_s), cfg.encoder_clips))
    r = bench_pair(ckpt, ckpt, rows, list(cfg.lengths_s), cfg.requests, cfg.max_tokens,
                   engine | {"hf_overrides": {"audio_tower_quantization": "none"}}, rounds=cfg.rounds,
                   variant_overrides={"hf_overrides": {"audio_tower_quantization": "int8"}}, probe=probe)
    side = {"full": "baseline", "int8": "variant"}
    tower_s = {name: r["probe_per_round"][side[name]] for name in PRECISIONS}
    speed = {
        "rounds": cfg.rounds, "requests": cfg.requests, "lengths_s": list(cfg.lengths_s), "encoder_clips": cfg.encoder_clips,
        "encoder_speedup": speedup(tower_s["full"], tower_s["int8"]),  # same work: full's time over int8's
        "request_speedup": speedup(r["per_round"]["variant"], r["per_round"]["baseline"]),
        "tower_ms_per_clip": {n: 1000 * statistics.median(t) / cfg.encoder_clips for n, t in tower_s.items()},
        "tower_s_per_round": tower_s,
        "req_per_s": {n: r[side[n]]["request_throughput"] for n in PRECISIONS},
        "req_per_s_per_round": {n: r["per_round"][side[n]] for n in PRECISIONS},
        "peak_rss_gib": {n: r[side[n]]["peak_rss_gib"] for n in PRECISIONS},
    }
    result = {"checkpoint": str(ckpt), "quality": quality, "speed": speed,
              "weight_bytes": linear_weight_bytes(load_config(ckpt)), "fp8_estimate": fp8_estimate(cfg.clip_s)}
    write_json_atomic(out / "tower_quant.json", result)
    (out / "tower_quant.md").write_text(table(result) + "\n")
    print(table(result))
    print(f"-> {out / 'tower_quant.json'}")


if __name__ == "__main__":
    main()
