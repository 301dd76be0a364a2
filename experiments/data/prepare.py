"""The data of the `prepare` stage: the synthetic corpus, or the manifests of a LibriSpeech or
manifest data config, built once. The base checkpoint is built by `experiments.training.base`.

Cached under $Q2AP_CACHE (default ~/.cache/qwen2-audio-projectors), keyed by a hash of the
spec, so a second call, another clone or CI reuses them.
"""

from __future__ import annotations

from pathlib import Path

from experiments.data import SyntheticSpec, build_synthetic
from qwen2_audio_vllm.checkpoint import cache_lock, cache_root


def ensure_synthetic(spec: SyntheticSpec = SyntheticSpec(), real_text: bool = False) -> dict[str, Path]:
    """{split: manifest} of the corpus and of its real-English test splits (test_prose,
    test_prose_noisy: experiments.data.prose), each built once. With `real_text`, the train
    split also reads the standard library's documentation (experiments.data.real_text)."""
    from experiments.data.prose import build_prose, prose_key
    from experiments.data.real_text import build_real_text, real_text_key

    out = cache_root() / "data" / f"synthetic-{spec.key()}"
    with cache_lock(out):
        manifests = build_synthetic(out, spec)
    if real_text:
        extra = cache_root() / "data" / f"realtext-{real_text_key(spec.key())}"
        with cache_lock(extra):
            manifests["train"] = build_real_text(extra, spec, manifests)
    prose = cache_root() / "data" / f"prose-{prose_key(spec.seed, spec.engines, spec.noisy_snr_db)}"
    with cache_lock(prose):
        return manifests | build_prose(prose, spec, [manifests["train"], manifests["dev"]])


def ensure_data(data: dict, artifacts: Path) -> dict[str, Path]:
    """{split: manifest} for the `data` config group (synthetic | librispeech | manifest)."""
    from experiments.data import librispeech_manifest

    if data["name"] == "synthetic":
        fields = ("seed", "train", "dev", "test", "augment", "noisy_snr_db")
        spec = SyntheticSpec(**{k: data[k] for k in fields if k in data},
                             **({"engines": tuple(data["engines"])} if "engines" in data else {}))
        return ensure_synthetic(spec, real_text=bool(data.get("real_text", False)))
    if data["name"] == "librispeech":
        out = {}
        for split in ("train", "dev", "test"):
            path = artifacts / "manifests" / f"librispeech-{split}-{short_hash(data[split])}.jsonl"
            out[split] = path if path.exists() else librispeech_manifest(data[split], _mkparent(path))
        return out
    if data["name"] == "manifest":
        out = {split: Path(data[split]) for split in ("train", "dev", "test")}
        missing = [str(p) for p in out.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"manifest files not found: {missing}; set data.train/dev/test")
        return out
    raise ValueError(f"unknown data.name {data['name']!r}; expected synthetic, librispeech or manifest")


def short_hash(s: str) -> str:
    import hashlib

    return hashlib.sha256(str(s).encode()).hexdigest()[:12]


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
