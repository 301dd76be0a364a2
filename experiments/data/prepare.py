"""The `prepare` stage: the tiny default base checkpoint and the synthetic data exist.

    python -m experiments.data.prepare             # build what is missing (idempotent)
    python -m experiments.data.prepare hub_tiny=true  # + a tiny model in the hub layout of Qwen2-Audio-7B-Instruct

Both are cached under $Q2AP_CACHE (default ~/.cache/qwen2-audio-projectors), keyed by a
hash of their spec, so a second call, another clone or CI reuses them.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.data import SyntheticSpec, build_synthetic, tokenizer_corpus
from qwen2_audio_vllm.checkpoint import cache_lock, cache_root
from qwen2_audio_vllm.tiny import TinySpec, build_hub_tiny, build_tiny_checkpoint


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


def ensure_synthetic(spec: SyntheticSpec = SyntheticSpec()) -> dict[str, Path]:
    out = cache_root() / "data" / f"synthetic-{spec.key()}"
    with cache_lock(out):
        return build_synthetic(out, spec)


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


def default_base(model: str | None = None) -> tuple[Path, dict[str, Path]]:
    """The default config's base checkpoint (or that of `model=<model>`) and data manifests,
    built if missing: what `make run` trains and evaluates on."""
    from omegaconf import OmegaConf

    cfg = default_config([f"model={model}"] if model else None)
    artifacts = Path(cfg.artifacts_dir)
    manifests = ensure_data(OmegaConf.to_container(cfg.data, resolve=True), artifacts)
    return ensure_base(OmegaConf.to_container(cfg.model, resolve=True), manifests, artifacts), manifests


def ensure_data(data: dict, artifacts: Path) -> dict[str, Path]:
    """{split: manifest} for the `data` config group (synthetic | librispeech | manifest)."""
    from experiments.data import librispeech_manifest

    if data["name"] == "synthetic":
        fields = ("seed", "train", "dev", "test", "augment", "noisy_snr_db")
        spec = SyntheticSpec(**{k: data[k] for k in fields if k in data},
                             **({"engines": tuple(data["engines"])} if "engines" in data else {}))
        return ensure_synthetic(spec)
    if data["name"] == "librispeech":
        out = {}
        for split in ("train", "dev", "test"):
            path = artifacts / "manifests" / f"librispeech-{split}-{_short_hash(data[split])}.jsonl"
            out[split] = path if path.exists() else librispeech_manifest(data[split], _mkparent(path))
        return out
    if data["name"] == "manifest":
        out = {split: Path(data[split]) for split in ("train", "dev", "test")}
        missing = [str(p) for p in out.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"manifest files not found: {missing}; set data.train/dev/test")
        return out
    raise ValueError(f"unknown data.name {data['name']!r}; expected synthetic, librispeech or manifest")


def ensure_base(model: dict, manifests: dict[str, Path], artifacts: Path, trainer=None) -> Path:
    """The base checkpoint: `model.path` adopted as is (a local Qwen2-Audio directory gets a
    projector block), or, when null, the tiny model pretrained on the train split (where
    `trainer`, a TrainerSettings, says)."""
    import json

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
    key = _short_hash(json.dumps([spec.key(), p, str(manifests["train"]), str(manifests["dev"])], sort_keys=True))
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


def _short_hash(s: str) -> str:
    import hashlib

    return hashlib.sha256(str(s).encode()).hexdigest()[:12]


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@hydra.main(config_path="../../conf/apps", config_name="prepare", version_base=None)
def main(cfg: DictConfig) -> None:
    print(f"[prepare] tiny random checkpoint: {ensure_random_tiny()}")
    if cfg.hub_tiny:
        print(f"[prepare] hub-shaped tiny Qwen2-Audio: {ensure_hub_tiny()}")


if __name__ == "__main__":
    main()
