"""Shared fixtures: real espeak-ng speech on disk, tiny checkpoints built locally."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from experiments.data.audio import SAMPLE_RATE, load_audio

PHRASES = [
    "open the red door",
    "three seven one",
    "anna went to the park",
    "turn the light on now",
    "forty two boxes",
    "the green window",
    "david has a blue car",
    "stop the music please",
]
# Allows LLM.apply_model to ship a test function to the engine's worker process.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def speak(text: str, path: Path, voice: str = "en+m3") -> np.ndarray:
    """espeak-ng speech written to `path` as 16 kHz mono WAV; returns the samples."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(raw), text], check=True, capture_output=True)
    audio = load_audio(raw)
    raw.unlink()
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return load_audio(path)


@pytest.fixture(scope="session")
def speech_clips(tmp_path_factory) -> list[tuple[Path, np.ndarray, str]]:
    """(path, samples, text) for eight spoken phrases."""
    d = tmp_path_factory.mktemp("speech")
    return [(d / f"clip{i}.wav", speak(t, d / f"clip{i}.wav"), t) for i, t in enumerate(PHRASES)]


@pytest.fixture(scope="session")
def length_sweep(speech_clips, tmp_path_factory) -> dict[str, np.ndarray]:
    """Real speech cut or tiled to lengths from 0.1 s up to the 30 s window, written to disk
    and read back (as a user's files would be)."""
    d = tmp_path_factory.mktemp("lengths")
    speech = np.concatenate([a for _, a, _ in speech_clips])
    out = {}
    for seconds in (0.1, 0.25, 0.5, 1.0, 2.3, 5.0, 10.0, 17.7, 29.5, 30.0):
        n = int(seconds * SAMPLE_RATE)
        audio = np.resize(speech, n)  # tiles the speech when longer than it
        sf.write(d / f"{seconds}s.wav", audio, SAMPLE_RATE, subtype="FLOAT")
        out[f"{seconds}s"] = load_audio(d / f"{seconds}s.wav")
    return out


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: runs whole pipelines in subprocesses (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def hub_tiny() -> Path:
    """A tiny random Qwen2-Audio laid out exactly like the hub's Qwen2-Audio-7B-Instruct."""
    from experiments.data.prepare import ensure_hub_tiny

    return ensure_hub_tiny()


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The tiny random-weight base checkpoint (built once, cached)."""
    from experiments.data.prepare import ensure_random_tiny

    return ensure_random_tiny()


def cached_splits(base: Path, out_dir: Path, seed: int, train: int) -> dict[str, tuple[list, list[str]]]:
    """{train, dev: (cached encoder frames of `base`, texts)} of a small synthetic corpus
    (`train` + 8 dev clips), what the align tests train on."""
    from experiments.data import SyntheticSpec, build_synthetic, read_manifest
    from experiments.training.cache import load_or_build
    from qwen2_audio_vllm.checkpoint import load_model, load_processor

    m = build_synthetic(out_dir / "syn", SyntheticSpec(seed=seed, train=train, dev=8, test=2), workers=2)
    model, processor = load_model(base), load_processor(base)
    out = {}
    for split in ("train", "dev"):
        rows = read_manifest(m[split])
        frames, _ = load_or_build(model, processor, rows, out_dir / f"cache-{split}")
        out[split] = (frames, [r["text"] for r in rows])
    return out
