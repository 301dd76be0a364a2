"""The `prepare` stage: the tiny default base checkpoint and the synthetic data exist.

    python -m experiments.prepare          # build what is missing (idempotent)

Both are cached under $Q2AP_CACHE (default ~/.cache/qwen2-audio-projectors), keyed by a
hash of their spec, so a second call, another clone or CI reuses them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.data import SyntheticSpec, build_synthetic, tokenizer_corpus
from qwen2_audio_vllm.checkpoint import TinySpec, build_tiny_checkpoint, cache_root


def random_tiny_dir(spec: TinySpec = TinySpec()) -> Path:
    return cache_root() / "models" / f"tiny-random-{spec.key()}"


def ensure_random_tiny(spec: TinySpec = TinySpec()) -> Path:
    """The untrained tiny checkpoint (random weights), built once."""
    out = random_tiny_dir(spec)
    if not (out / "config.json").exists():
        build_tiny_checkpoint(out, tokenizer_corpus(), spec)
    return out


def ensure_synthetic(spec: SyntheticSpec = SyntheticSpec()) -> dict[str, Path]:
    return build_synthetic(cache_root() / "data" / f"synthetic-{spec.key()}", spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    print(f"[prepare] tiny random checkpoint: {ensure_random_tiny()}")


if __name__ == "__main__":
    main()
