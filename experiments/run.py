"""The main job: projector choice -> quality, throughput, results table and W&B.

    python -m experiments.run projector=attention
    python -m experiments.run -m projector=linear,mlp,attention projector.stack=1,4
    python -m experiments.run projector=mlp stages=[evaluate,bench]

Stages, each a plain function of the composed config and the outputs of earlier stages:
prepare (data + base checkpoint) -> align (train the projector, encoder and LLM frozen) ->
export (validate the vLLM checkpoint) -> evaluate (WER/CER through vLLM) -> bench (offline
throughput, variant vs linear baseline) -> [serve_bench: `vllm serve` + async load
simulation, optional] -> [long_form: WER on long clips of known utterances, `segments` vs
`whole`, optional] -> report (results.json, results table, Pareto plot, W&B). Stage outputs live under `artifacts_dir`, keyed by a hash of the config they
depend on, so an existing one is reused unless `force` names it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import projectors
from qwen2_audio_vllm.checkpoint import weights_stamp

STAGES = ("prepare", "align", "export", "evaluate", "bench", "serve_bench", "long_form", "train_bench", "report")
# What every process of a data-parallel run (torchrun) does; the rest is process 0's.
DATA_PARALLEL_STAGES = ("prepare", "align")


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def forced(cfg: DictConfig, stage: str) -> bool:
    f = cfg.force
    return bool(f) if isinstance(f, bool) else stage in f


def trainer_settings(cfg: DictConfig):
    from experiments.training.train import TrainerSettings

    return TrainerSettings(**OmegaConf.to_container(cfg.trainer, resolve=True))


def projector_block(cfg: DictConfig, base_dir: Path) -> dict:
    """The config.json block of the configured projector for this base model."""
    from qwen2_audio_vllm.checkpoint import load_config

    base = load_config(base_dir)
    node = OmegaConf.to_container(cfg.projector, resolve=True)
    module = projectors.build_projector(node, base.audio_config.d_model, base.text_config.hidden_size)
    return projectors.projector_block(module)


# --- stages -------------------------------------------------------------------------------


def prepare(cfg: DictConfig, state: dict) -> dict:
    """Data manifests and the base checkpoint exist (built once, cached)."""
    from experiments.data import prepare as prep
    from experiments.training.base import ensure_base
    from experiments.training.devices import main_first

    with main_first():  # under torchrun, process 0 builds; the others find it built
        manifests = prep.ensure_data(OmegaConf.to_container(cfg.data, resolve=True), Path(cfg.artifacts_dir))
        model = OmegaConf.to_container(cfg.model, resolve=True)
        base_dir = ensure_base(model, manifests, Path(cfg.artifacts_dir), trainer_settings(cfg))
    return {"manifests": {k: str(v) for k, v in manifests.items()}, "base_dir": str(base_dir)}


def align_output(cfg: DictConfig, state: dict) -> tuple[dict, Any, Any, Path]:
    """(projector block, train settings, AlignRecipe, output dir) of the align stage.
    train.init auto: the base's own weights when the block is the base's, else random.
    train.prealign_steps auto: the model's pretrain.prealign_steps when the projector starts
    from random weights (every projector on model=smollm2), else 0 (model=tiny has none)."""
    from experiments.training.train import AlignRecipe, TrainSettings
    from qwen2_audio_vllm.checkpoint import load_config

    block = projector_block(cfg, Path(state["base_dir"]))
    train = OmegaConf.to_container(cfg.train, resolve=True)
    init, kd, lora = train.pop("init", "auto"), train.pop("kd", None), train.pop("lora", None)
    chunk_s, hotwords = train.pop("chunk_s", None), train.pop("hotwords", None)
    prealign_steps = train.pop("prealign_steps", "auto")
    if init == "auto":
        init = "base" if block == load_config(state["base_dir"]).projector else "random"
    if prealign_steps == "auto":  # a projector starting from scratch gets the base's own pre-alignment
        prealign_steps = OmegaConf.select(cfg, "model.pretrain.prealign_steps", default=0) if init == "random" else 0
    recipe = AlignRecipe.from_config(init, kd, lora, chunk_s, hotwords, prealign_steps)
    settings = TrainSettings(**train, seed=cfg.seed)
    m = state["manifests"]
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer.pop("encoder_batch_size")  # how the cache is computed, not what it holds
    beyond = [recipe.beyond_init()] if recipe.beyond_init() else []  # plain runs keep their keys
    # dev_wer_clips only adds a measurement: runs without it keep the keys they had
    keyed = {k: v for k, v in settings.__dict__.items() if k != "dev_wer_clips" or v}
    key = key_of(state["base_dir"], block, keyed, init, m["train"], m["dev"], trainer, *beyond)
    return block, settings, recipe, Path(cfg.artifacts_dir) / "align" / f"{block['name']}-{key}"


def align(cfg: DictConfig, state: dict) -> dict:
    from experiments.data import read_manifest
    from experiments.training.cache import load_or_build
    from experiments.training.train import align as train_align
    from experiments.training.train import check_recipe
    from qwen2_audio_vllm.checkpoint import load_model, load_processor

    base_dir, manifests = Path(state["base_dir"]), state["manifests"]
    block, settings, recipe, out = align_output(cfg, state)
    done = out / "align.json"
    if done.exists() and not forced(cfg, "align"):
        return json.loads(done.read_text()) | {"reused": True}
    if "align" not in cfg.stages:
        raise RuntimeError(
            f"the stages {list(cfg.stages)} need an aligned checkpoint, and none exists for this "
            f"config ({out}); add align to stages"
        )
    check_recipe(base_dir, block, recipe)  # before minutes of encoder cache

    import torch

    from experiments.training.cache import cache_dir_for, cache_info
    from experiments.training.devices import is_main, main_first

    trainer = trainer_settings(cfg)
    place = trainer.placement()
    model = load_model(base_dir, device=place.device, dtype=place.dtype)
    processor = load_processor(base_dir)
    splits, caches = {}, {}
    for split in ("train", "dev"):
        rows = read_manifest(manifests[split])
        chunk = int(round(recipe.chunk_s * processor.feature_extractor.sampling_rate)) if recipe.chunk_s else None
        cache_dir = cache_dir_for(model, rows, chunk)
        with main_first():
            frames, _ = load_or_build(model, processor, rows, cache_dir, trainer.encoder_batch_size,
                                      trainer.cache_store_dtype, chunk)
        splits[split] = (frames, [r["text"] for r in rows])
        caches[split] = cache_info(cache_dir)
        print(f"[align] encoder cache {split}: {caches[split]['clips']} clips, "
              f"{caches[split]['bytes'] / 2**20:.1f} MiB ({caches[split]['dtype']})")
        if split == "train" and recipe.kd_teacher == "whole":  # the teacher hears each clip whole
            whole_dir = cache_dir_for(model, rows)
            with main_first():
                teacher_frames, _ = load_or_build(model, processor, rows, whole_dir, trainer.encoder_batch_size,
                                                  trainer.cache_store_dtype)
    del model  # align loads its own copy (frozen parts in the trainer's precision)
    if place.device.type == "cuda":
        torch.cuda.empty_cache()
    result = train_align(base_dir, block, splits["train"], splits["dev"], out / "checkpoint", settings, recipe, trainer,
                         teacher_frames if recipe.kd_teacher == "whole" else None)
    if place.device.type == "cuda":
        torch.cuda.empty_cache()  # the twin is gone: give its memory back before vLLM starts
    result |= {"checkpoint": str(out / "checkpoint"), "projector": block, "init": recipe.init, "encoder_cache": caches}
    from experiments.report import plot_alignment, write_json_atomic

    if is_main():
        result["alignment_png"] = str(plot_alignment(result, out / "alignment.png"))
        write_json_atomic(done, result)
    return result


def export(cfg: DictConfig, state: dict) -> dict:
    """The aligned checkpoint is a valid vLLM directory; record what it holds."""
    import torch

    from qwen2_audio_vllm.checkpoint import validate_checkpoint

    ckpt = Path(state["checkpoint"])
    config = validate_checkpoint(ckpt)
    from projectors import build_projector

    proj = build_projector(config.projector, config.audio_config.d_model, config.text_config.hidden_size)
    return {
        "checkpoint": str(ckpt),
        "projector_params": sum(p.numel() for p in proj.parameters()),
        "audio_tokens_per_30s": int(proj.output_lengths(torch.tensor([750]))),
        "audio_tokens_per_s": float(proj.output_lengths(torch.tensor([750]))) / 30,
        "serve_command": f"vllm serve {ckpt}",
    }


def _engine_overrides(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.model.engine, resolve=True)


def evaluate(cfg: DictConfig, state: dict) -> dict:
    from experiments.data import read_manifest
    from experiments.evaluate import evaluate_checkpoint

    ckpt = Path(state["checkpoint"])
    manifests = state["manifests"]
    limit = cfg.data.eval_limit or None
    rows = read_manifest(manifests["test"])[:limit]
    # the noisy and real-English held-out splits where the data has them (synthetic): scored
    # on the same engine
    more = {split: read_manifest(manifests[split])[:limit]
            for split in ("test_noisy", "test_prose", "test_prose_noisy") if split in manifests}
    key = key_of(str(ckpt), weights_stamp(ckpt), manifests["test"], len(rows), sorted(more))
    out = Path(cfg.artifacts_dir) / "evaluate" / key
    done = out / "metrics.json"
    if done.exists() and not forced(cfg, "evaluate"):
        return json.loads(done.read_text()) | {"reused": True}
    return evaluate_checkpoint(ckpt, rows, out, _engine_overrides(cfg), more=more)


def bench(cfg: DictConfig, state: dict) -> dict:
    from experiments.benchmarks.offline import bench_pair
    from experiments.data import read_manifest

    ckpt, base = Path(state["checkpoint"]), Path(state["base_dir"])
    b = OmegaConf.to_container(cfg.bench, resolve=True)
    key = key_of(str(ckpt), weights_stamp(ckpt), str(base), b)
    out = Path(cfg.artifacts_dir) / "bench" / key
    done = out / "bench.json"
    if done.exists() and not forced(cfg, "bench"):
        return json.loads(done.read_text()) | {"reused": True}
    overrides = _engine_overrides(cfg) | {"max_num_seqs": b["max_num_seqs"]}
    result = bench_pair(ckpt, base, read_manifest(state["manifests"]["test"]), b["lengths_s"], b["requests"],
                        b["max_tokens"], overrides, rounds=b["rounds"])
    from experiments.report import write_json_atomic

    write_json_atomic(done, result)
    return result


def serve_bench(cfg: DictConfig, state: dict) -> dict:
    """Optional (stages=[...,serve_bench,...]): `vllm serve` the checkpoint with the `serve`
    config and run the async load simulation over test clips."""
    from experiments.benchmarks.serving import run_config
    from experiments.data import read_manifest

    s = OmegaConf.to_container(cfg.serve, resolve=True)
    b = cfg.bench
    sources = [r["audio_filepath"] for r in read_manifest(state["manifests"]["test"])[:64]]
    engine = _engine_overrides(cfg) | {k: v for k, v in s.items() if k not in ("name", "startup_timeout_s")}
    summary = run_config(Path(state["checkpoint"]), engine, sources, b.online_requests, b.online_concurrency, None, b.max_tokens)
    return {s["name"]: summary}


def long_form(cfg: DictConfig, state: dict) -> dict:
    """Optional (stages=[...,long_form,...]): WER on `long_form.clips` clips of
    `long_form.seconds` joined from test utterances, cut at pauses (`segments`) vs windows
    inside the model (`whole`), beside the utterances' own files (experiments/serving/long_form.py)."""
    from experiments.data import read_manifest
    from experiments.serving.long_form import long_form_eval

    ckpt = Path(state["checkpoint"])
    lf = OmegaConf.to_container(cfg.long_form, resolve=True)
    key = key_of(str(ckpt), weights_stamp(ckpt), state["manifests"]["test"], lf)
    out = Path(cfg.artifacts_dir) / "long_form" / key
    done = out / "long_form.json"
    if done.exists() and not forced(cfg, "long_form"):
        return json.loads(done.read_text()) | {"reused": True}
    return long_form_eval(ckpt, read_manifest(state["manifests"]["test"]), lf["seconds"], lf["clips"], out)


def train_bench(cfg: DictConfig, state: dict) -> dict:
    """Optional (stages=[train_bench]): cost of an align step per projector at this model's
    dims on this machine, and the on-paper estimate (experiments/benchmarks/training.py)."""
    import torch

    from experiments.benchmarks import training as tb
    from experiments.report import write_json_atomic
    from experiments.training.devices import placement
    from qwen2_audio_vllm.checkpoint import load_config

    b = OmegaConf.to_container(cfg.train_bench, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    dims = tb.TinySpec(**model["dims"]) if model.get("dims") else tb.dims_of(load_config(state["base_dir"]))
    trainer = trainer_settings(cfg)
    blocks = b["projectors"]
    with torch.device("meta"):
        first = projectors.build_projector(blocks[0], dims.encoder_dim, dims.text_dim)
    result = {"dims": dims.__dict__ | {"projector": None}, "estimate": tb.estimate(
        dims, sum(p.numel() for p in first.parameters()), b["batch_size"], b["clip_s"], b["text_tokens"],
        peak_tflops=b["gpu_peak_tflops"], mfu=b["assumed_mfu"])}
    if not b["estimate_only"]:
        place = trainer.placement()
        places = [placement(trainer.device, p) for p in b.get("precisions") or [place.precision]]
        if place.device.type == "cpu" and tb.llm_params(dims) > 2e9:
            raise ValueError(
                f"model={cfg.model.name} has {tb.llm_params(dims) / 1e9:.1f} B LLM parameters: too large to time on "
                "the CPU; run it on a GPU, or set train_bench.estimate_only=true for the on-paper figures"
            )
        result["measured"] = tb.measure(dims, blocks, places, b["batch_size"], b["clip_s"], b["text_tokens"],
                                        b["steps"], b["rounds"], trainer.gradient_checkpointing)
    tb.print_tables(result)
    write_json_atomic(Path(cfg.run_dir) / "train_bench.json", result)
    return result


def report(cfg: DictConfig, state: dict) -> dict:
    from experiments.report import (
        append_results_row,
        log_wandb,
        plot_pareto,
        run_metadata,
        write_comparison,
        write_json_atomic,
    )

    run_dir = Path(cfg.run_dir)
    results = {
        "name": run_name(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "metadata": run_metadata(),
        "stages": state["stage_results"],
        "timings_s": state["timings"],
    }
    write_json_atomic(run_dir / "results.json", results)
    row = results_row(cfg, state) | {"git_sha": results["metadata"].get("git_sha")}
    results_dir = Path(cfg.results_dir)
    rows = append_results_row(results_dir / "results.csv", row)
    plot = plot_pareto(rows, results_dir / "pareto.png")
    # per sweep: the runs whose directories share this run's parent (a multirun's sweep dir)
    group = Path(cfg.run_dir).resolve().parent
    plot_pareto([r for r in rows if Path(r.get("run_dir", "")).resolve().parent == group], group / "pareto.png")
    if cfg.get("comparison"):
        write_comparison(rows, Path(cfg.comparison))
    wandb_dir = None
    if cfg.logger.enabled:
        wandb_dir = log_wandb(cfg.logger.project, row["name"], results["config"], row, rows, plot,
                              mode=cfg.logger.mode, dir=run_dir, init_timeout_s=cfg.logger.init_timeout_s)
    return {"results_json": str(run_dir / "results.json"), "results_csv": str(results_dir / "results.csv"), "pareto_png": str(plot), "wandb": wandb_dir}


def run_name(cfg: DictConfig) -> str:
    p = OmegaConf.to_container(cfg.projector, resolve=True)
    name = p["name"]
    extras = [f"{k}{v}" for k, v in p.items() if k in ("stack",) and v != 1]
    if p.get("downsample") == "queries":
        extras.append(f"q{p['queries']}w{p['window']}")
    return "-".join([name, *extras])


def results_row(cfg: DictConfig, state: dict) -> dict:
    r = state["stage_results"]
    ev, be, ex, al = r.get("evaluate", {}), r.get("bench", {}), r.get("export", {}), r.get("align", {})
    lf = r.get("long_form", {})
    variant, ratio = be.get("variant", {}), be.get("ratio_vs_linear", {})
    low, high = be.get("ratio_vs_linear_min", {}), be.get("ratio_vs_linear_max", {})
    return {
        "name": run_name(cfg),
        "model": cfg.model.name,
        "data": cfg.data.name,
        "wer": ev.get("wer"), "wer_ci_low": ev.get("wer_ci_low"), "wer_ci_high": ev.get("wer_ci_high"),
        "cer": ev.get("cer"), "n_utts": ev.get("n_utts"), "n_failed": ev.get("n_failed"),
        **_split_columns(ev.get("test_noisy", {}), "noisy"),
        **_split_columns(ev.get("test_prose", {}), "prose"),
        **_split_columns(ev.get("test_prose_noisy", {}), "prose_noisy"),
        **{f"wer_{engine}": m["wer"] for engine, m in ev.get("by_engine", {}).items()},
        "request_throughput": variant.get("request_throughput"),
        "output_token_throughput": variant.get("output_token_throughput"),
        "rtfx": variant.get("rtfx"),
        "latency_p50_s": variant.get("latency_p50_s"),
        "audio_tokens_per_request": variant.get("avg_audio_tokens_per_request"),
        "throughput_ratio_vs_linear": ratio.get("request_throughput"),
        "throughput_ratio_min": low.get("request_throughput"), "throughput_ratio_max": high.get("request_throughput"),
        "latency_p50_ratio_vs_linear": ratio.get("latency_p50_s"),
        "long_form_wer_segments": lf.get("segments", {}).get("wer"),
        "long_form_wer_whole": lf.get("whole", {}).get("wer"),
        "audio_tokens_per_s": ex.get("audio_tokens_per_s"),
        "recipe": recipe_label(al.get("recipe") or {}, cfg),
        "projector_params": ex.get("projector_params"),
        "best_dev_loss": al.get("best_dev_loss"),
        "align_seconds_per_step": al.get("seconds_per_step"),
        "checkpoint": ex.get("checkpoint") or al.get("checkpoint"),
        "run_dir": str(Path(cfg.run_dir).resolve()),
    }


def recipe_label(recipe: dict, cfg: DictConfig) -> str | None:
    """The align recipe in a table cell, e.g. "init=mean_pool kd=base lr=0.002 steps=600"."""
    if not recipe:
        return None
    parts = [f"init={recipe['init']}"]
    if recipe.get("kd_teacher", "none") != "none":
        teacher = Path(recipe["kd_checkpoint"]).name if recipe.get("kd_checkpoint") else recipe["kd_teacher"]
        parts.append(f"kd={teacher}(w{recipe['kd_weight']:g},T{recipe['kd_temperature']:g})")
    if recipe.get("lora_rank"):
        parts.append(f"lora=r{recipe['lora_rank']}")
    if recipe.get("chunk_s"):
        parts.append(f"chunks={recipe['chunk_s']:g}s")
    if recipe.get("hotwords_p"):
        parts.append(f"hotwords=p{recipe['hotwords_p']:g}/n{recipe['hotwords_max_distractors']}")
    return " ".join([*parts, f"lr={cfg.train.lr:g}", f"steps={cfg.train.steps}"])


def _split_columns(metrics: dict, suffix: str) -> dict:
    """A further held-out split's WER and CI as results columns (empty when it was not run)."""
    return {f"{k}_{suffix}": metrics[k] for k in ("wer", "wer_ci_low", "wer_ci_high") if k in metrics}


STAGE_FUNCS = {
    "prepare": prepare, "align": align, "export": export, "evaluate": evaluate,
    "bench": bench, "serve_bench": serve_bench, "long_form": long_form, "train_bench": train_bench, "report": report,
}


def run(cfg: DictConfig) -> dict:
    """Run the configured stages in order; returns the state with per-stage results. prepare
    and align are also run when a later stage needs their outputs, but align then only
    reads its cached result (it never trains unless asked).

    Under `torchrun --nproc_per_node N` every process runs prepare and align (data-parallel
    training); process 0 alone runs the other stages."""
    from experiments.serving.engine import quiet_vllm
    from experiments.training import devices

    quiet_vllm(cfg.verbose)
    unknown = set(cfg.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected a subset of {list(STAGES)}")
    needed = set(cfg.stages)
    if needed & {"export", "evaluate", "bench", "serve_bench", "long_form"}:
        needed |= {"prepare", "align"}  # resolved from their cached outputs when not asked for
    elif "align" in needed or ("train_bench" in needed and not cfg.model.get("dims")):
        needed.add("prepare")  # train_bench reads dims from the base checkpoint when not configured
    devices.init_distributed(trainer_settings(cfg).placement().device.type)
    main_process = devices.is_main()
    if not main_process:
        needed &= set(DATA_PARALLEL_STAGES)
    state: dict = {"stage_results": {}, "timings": {}}
    try:
        for stage in (s for s in STAGES if s in needed):
            t0 = time.perf_counter()
            print(f"[run] stage {stage}")
            result = STAGE_FUNCS[stage](cfg, state)
            state["timings"][stage] = round(time.perf_counter() - t0, 2)
            state["stage_results"][stage] = result
            if stage in ("prepare", "align"):
                state.update({k: v for k, v in result.items() if k in ("manifests", "base_dir", "checkpoint")})
            if stage == max((s for s in needed if s in DATA_PARALLEL_STAGES), key=STAGES.index, default=None):
                devices.finish_distributed()  # the other processes exit; process 0 goes on alone
    finally:
        devices.finish_distributed()
    if main_process:
        print_summary(state)
    return state


def print_summary(state: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    r = state["stage_results"]
    table = Table(title="experiments.run")
    table.add_column("metric")
    table.add_column("value")
    ev, be = r.get("evaluate", {}), r.get("bench", {})
    if ev:
        table.add_row("WER clean (95% CI)", f"{ev['wer']:.3f} [{ev['wer_ci_low']:.3f}, {ev['wer_ci_high']:.3f}]")
        for split, label in (("test_noisy", "noisy"), ("test_prose", "real English"), ("test_prose_noisy", "real English, noisy")):
            if m := ev.get(split):
                table.add_row(f"WER {label} (95% CI)", f"{m['wer']:.3f} [{m['wer_ci_low']:.3f}, {m['wer_ci_high']:.3f}]")
        for engine, m in ev.get("by_engine", {}).items():
            table.add_row(f"WER clean, {engine}", f"{m['wer']:.3f} [{m['wer_ci_low']:.3f}, {m['wer_ci_high']:.3f}]")
        table.add_row("CER", f"{ev['cer']:.3f}")
        table.add_row("utterances (failed)", f"{ev['n_utts']} ({ev['n_failed']})")
    if be:
        table.add_row("requests/s (variant)", f"{be['variant']['request_throughput']:.2f}")
        table.add_row("requests/s (linear baseline)", f"{be['baseline']['request_throughput']:.2f}")
        table.add_row("throughput ratio vs linear", f"{be['ratio_vs_linear'].get('request_throughput', float('nan')):.3f}")
    if lf := r.get("long_form"):
        for strategy in ("own_files", "segments", "whole"):
            table.add_row(f"long-form WER, {strategy}", f"{lf[strategy]['wer']:.3f}")
    for stage, seconds in state["timings"].items():
        table.add_row(f"time {stage}", f"{seconds:.1f} s")
    Console().print(table)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
