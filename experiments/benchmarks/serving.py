"""Online serving benchmark: `vllm serve` a checkpoint, run the load simulation, and
compare engine settings side by side (the serving metrics table: baseline vs FP8 KV cache).

    python -m experiments.benchmarks.serving checkpoint=DIR [manifest=FILE] [requests=200] [concurrency=8] [compare=[fp8_kv]]

Each configuration gets its own server (started, measured, stopped) in this one run. A
configuration the backend rejects (e.g. a KV-cache dtype the CPU backend lacks) is
reported as unavailable with vLLM's reason, and the other columns stand.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.metrics import format_table
from experiments.serving.client import online_summary, served_model, simulate
from experiments.serving.server import Server, ServerError

CONFIGS = {
    "baseline": {"kv_cache_dtype": "auto"},
    "fp8_kv": {"kv_cache_dtype": "fp8"},
}


def run_config(model_dir: Path, engine: dict, sources: list[str], n: int, concurrency: int,
               rate: float | None, max_tokens: int) -> dict:
    try:
        with Server(model_dir, engine) as server:
            async def go():
                model = await served_model(server.base_url)
                return await simulate(server.base_url, model, sources, n, concurrency, rate, max_tokens)

            records, duration = asyncio.run(go())
    except ServerError as err:
        return {"unavailable": err.cause}
    return online_summary(records, duration, concurrency)


def compare(model_dir: Path, names: list[str], sources: list[str], n: int, concurrency: int,
            rate: float | None = None, max_tokens: int = 32, engine: dict | None = None) -> dict[str, dict]:
    return {name: run_config(model_dir, (engine or {}) | CONFIGS[name], sources, n, concurrency, rate, max_tokens) for name in names}


@hydra.main(config_path="../../conf/apps", config_name="bench_serving", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.serving.client import asset_names

    if unknown := [c for c in cfg.compare if c not in CONFIGS]:
        raise SystemExit(f"compare={list(cfg.compare)}: unknown serve configs {unknown}; expected some of {list(CONFIGS)}")
    sources = ([json.loads(line)["audio_filepath"] for line in open(cfg.manifest) if line.strip()]
               if cfg.manifest else [f"asset:{a}" for a in asset_names()])
    results = compare(Path(cfg.checkpoint), ["baseline", *cfg.compare], sources, cfg.requests, cfg.concurrency,
                      cfg.rate, cfg.max_tokens)
    print(format_table(results))
    for name, r in results.items():
        if "unavailable" in r:
            print(f"{name}: unavailable on this backend: {r['unavailable']}")
    out = Path(HydraConfig.get().runtime.output_dir) / "serving.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
