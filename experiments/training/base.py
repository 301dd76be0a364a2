"""The base checkpoints: the tiny random model, its hub-shaped twin, the tiny base pretrained
on the corpus (or a released directory adopted as the base), and the default config's base.

    python -m experiments.prepare                # data and the tiny random checkpoint
    python -m experiments.prepare hub_tiny=true  # + a tiny model in the hub layout of Qwen2-Audio-7B-Instruct

Cached under $Q2AP_CACHE like the data (experiments.data.prepare); built under a lock, so
parallel processes build each entry once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.data import tokenizer_corpus
from experiments.data.prepare import ensure_data, short_hash
from qwen2_audio_vllm.checkpoint import cache_lock, cache_root
from qwen2_audio_vllm.tiny import TinySpec, build_hub_tiny, build_tiny_checkpoint

if TYPE_CHECKING:
    from omegaconf import DictConfig


def random_tiny_dir(spec: TinySpec = TinySpec()) -> Path:
    return cache_root() / "models" / f"tiny-random-{spec.key()}"


def ensure_random_tiny(spec: TinySpec = TinySpec()) -> Path:
    """The untrained tiny checkpoint (random weights), built once."""
    out = random_tiny_dir(spec)
    with cache_lock(out):
        if not (out / "config.json").exists():
            build_tiny_checkpoint(out, tokenizer_corpus(), spec)
    return out


def ensure_hub_tiny(spec: TinySpec = TinySpec()) -> Path:
    """A random tiny Qwen2-Audio in exactly the hub layout of Qwen/Qwen2-Audio-7B-Instruct
    (built once): point QWEN2_AUDIO_7B_DIR at it to run the 7B path on CPU."""
    out = cache_root() / "models" / f"hub-tiny-{spec.key()}" / "Qwen2-Audio-7B-Instruct"
    with cache_lock(out):
        if not (out / "config.json").exists():
            build_hub_tiny(out, tokenizer_corpus(), spec)
    return out


def default_config(overrides: list[str] | None = None):
    """conf/config.yaml as `make run` composes it (with `overrides`, e.g. ["model=small"]);
    callable from inside another Hydra app (experiments.results, long_form), whose state is
    put back after."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    outer = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(Path(__file__).resolve().parents[2] / "conf"), version_base=None):
            return compose("config", overrides=overrides or [])
    finally:
        restore_gh_from_backup(outer)


def default_manifests(cfg: DictConfig | None = None) -> dict[str, Path]:
    """The corpus's data manifests (train, dev, test, ...) as `make run` builds them, built if
    missing; no base checkpoint is built. `cfg` is a composed main config (default: the default one)."""
    from omegaconf import OmegaConf

    cfg = cfg if cfg is not None else default_config()
    return ensure_data(OmegaConf.to_container(cfg.data, resolve=True), Path(cfg.artifacts_dir))


def default_base(model: str | None = None) -> tuple[Path, dict[str, Path]]:
    """The default config's base checkpoint (or that of `model=<model>`) and data manifests,
    built if missing: what `make run` trains and evaluates on."""
    from omegaconf import OmegaConf

    cfg = default_config([f"model={model}"] if model else None)
    manifests = default_manifests(cfg)
    return ensure_base(OmegaConf.to_container(cfg.model, resolve=True), manifests, Path(cfg.artifacts_dir)), manifests


def ensure_base(model: dict, manifests: dict[str, Path], artifacts: Path, trainer=None) -> Path:
    """The base checkpoint: `model.path` adopted as is (a local Qwen2-Audio directory gets a
    projector block), or, when null, the tiny model pretrained on the train split (where
    `trainer`, a TrainerSettings, says)."""
    from experiments.training.train import TrainerSettings
    from qwen2_audio_vllm.adoption import adopt_checkpoint

    if model.get("path"):
        return adopt_checkpoint(Path(model["path"]), artifacts / "base", model.get("path_env"))
    if not model.get("pretrain"):
        raise ValueError(
            f"model={model['name']} has neither a path nor a pretrain recipe, so it has no checkpoint: "
            "it only serves stages=[train_bench] (random weights at its dims)"
        )
    spec = TinySpec(**model.get("dims", {}))
    p = model["pretrain"]
    key = short_hash(json.dumps([spec.key(), p, str(manifests["train"]), str(manifests["dev"])], sort_keys=True))
    if spec.llm_weights is not None:
        return ensure_llm_base(spec, p, manifests, cache_root() / "models" / f"{model['name']}-base-{key}", trainer)
    out = cache_root() / "models" / f"tiny-base-{key}"
    with cache_lock(out):
        if (out / "pretrain.json").exists():
            return out
        from experiments.data import read_manifest
        from experiments.report import write_json_atomic
        from experiments.training.train import TrainSettings, pretrain

        settings = TrainSettings(steps=p["steps"], batch_size=p["batch_size"], lr=p["lr"], warmup=p["warmup"], eval_every=p["eval_every"])
        result = pretrain(ensure_random_tiny(spec), read_manifest(manifests["train"]), read_manifest(manifests["dev"]), out,
                          settings, trainer or TrainerSettings(), ctc_weight=p.get("ctc_weight", 0.0),
                          ctc_units=p.get("ctc_units", "tokens"), freeze_encoder=p.get("freeze_encoder", False))
        write_json_atomic(out / "pretrain.json", result)
    return out


def ensure_llm_base(spec: TinySpec, p: dict, manifests: dict[str, Path], out: Path, trainer=None) -> Path:
    """A base whose LLM is pretrained (`spec.llm_weights`): the tower and the LLM stay
    frozen and only `p["projector"]` is aligned on the train split's cached encoder frames,
    as every align run is (experiments.training.train.align); built once and cached."""
    with cache_lock(out):
        if (out / "pretrain.json").exists():
            return out
        import torch

        from experiments.data import read_manifest
        from experiments.report import plot_alignment, write_json_atomic
        from experiments.training.cache import cache_dir_for, load_or_build
        from experiments.training.train import AlignRecipe, TrainerSettings, TrainSettings, align
        from qwen2_audio_vllm.checkpoint import load_model, load_processor

        trainer = trainer or TrainerSettings()
        start = ensure_random_tiny(spec)
        tower = load_model(start)
        processor = load_processor(start)
        splits = {}
        for split in ("train", "dev"):
            rows = read_manifest(manifests[split])
            frames, _ = load_or_build(tower, processor, rows, cache_dir_for(tower, rows), trainer.encoder_batch_size,
                                      trainer.cache_store_dtype)
            splits[split] = (frames, [r["text"] for r in rows])
        del tower
        torch.manual_seed(spec.seed)
        settings = TrainSettings(steps=p["steps"], batch_size=p["batch_size"], lr=p["lr"], warmup=p["warmup"],
                                 eval_every=p["eval_every"], seed=spec.seed)
        result = align(start, dict(p["projector"]), splits["train"], splits["dev"], out, settings,
                       AlignRecipe(init="random", prealign_steps=p.get("prealign_steps", 0)), trainer)
        result |= {"llm_weights": spec.llm_weights, "frozen": ["audio_tower", "language_model"]}
        plot_alignment(result, out / "alignment.png")
        write_json_atomic(out / "pretrain.json", result)
    return out
