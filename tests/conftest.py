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
# Every engine the tests start (in this process, in `vllm serve`, in the apps they run) gets a
# 1 GiB KV cache instead of 30 % of the RAM: the tiny models need a few MiB of it, an engine
# starts faster (no multi-GiB allocation, and vLLM skips the warm-up pass it runs only to size
# the cache), and the few engines the suite shares stay up side by side.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Under xdist each worker's engines get their own core (worker i: core i mod the cores), so two
# workers' engines never spin-wait against each other's OpenMP threads on the same cores.
if "PYTEST_XDIST_WORKER" in os.environ and (os.cpu_count() or 1) > 1:
    worker = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw"))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(worker % os.cpu_count()))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


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
    config.addinivalue_line("markers", "slow: trains, synthesises a corpus, builds checkpoints or runs whole "
                                       "pipelines in subprocesses (deselect with -m 'not slow')")


# Fixtures that synthesise a corpus, train a model or build checkpoints from scratch: a test
# using one is `slow` whatever its own marks say, so the fast loop never pays for them.
SLOW_FIXTURES = {"small_synthetic", "rows", "data", "word_times", "head", "ckpt", "hub_tiny", "smollm2_random", "gguf_llm"}


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    """Under `-m "not engine"` (make test-fast) a module marked engine as a whole is not even
    imported: its top-level vLLM import alone costs 5-10 s of the fast loop."""
    if collection_path.suffix == ".py" and "not engine" in (config.getoption("markexpr") or ""):
        if "\npytestmark = pytest.mark.engine\n" in collection_path.read_text():
            return True
    return None


def pytest_itemcollected(item) -> None:
    """Marks each test as it is collected, before -m reads the marks."""
    if SLOW_FIXTURES & set(item.fixturenames):
        item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def hub_tiny() -> Path:
    """A tiny random Qwen2-Audio laid out exactly like the hub's Qwen2-Audio-7B-Instruct."""
    from experiments.training.base import ensure_hub_tiny

    return ensure_hub_tiny()


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The tiny random-weight base checkpoint (built once, cached)."""
    from experiments.training.base import ensure_random_tiny

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


@pytest.fixture(scope="module")
def tiny_llm(tiny_base):
    """One engine of the fork on the tiny base with the default engine arguments, shared by
    a module's tests that only send it requests (each engine start costs tens of seconds).
    Module scope, not session: an engine holds about 2 GiB, and session engines of both
    xdist workers stayed up beside the heavy modules (torchrun's two ranks, the tower's two
    ranks) until the machine ran out of its 23 GiB."""
    from experiments.serving.engine import close_llm, make_llm

    llm = make_llm(tiny_base)
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def upstream_llm(tiny_base):
    """The tiny base through upstream vLLM's own Qwen2-Audio class (the reference the fork
    must equal), shared within a module like `tiny_llm`."""
    from vllm import LLM

    from experiments.serving.engine import close_llm, engine_kwargs
    from qwen2_audio_vllm.checkpoint import UPSTREAM_ARCHITECTURE

    llm = LLM(**engine_kwargs(tiny_base, hf_overrides={"architectures": [UPSTREAM_ARCHITECTURE]}))
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def tiny_server(tiny_base, tmp_path_factory):
    """One `vllm serve` of the tiny base, shared by a module's serving, reliability or hotword
    tests (module scope, as `tiny_llm`).
    trust_request_mm_kwargs: vLLM's guard for per-request processor options (hotwords)."""
    from experiments.serving.server import Server

    engine = {"max_num_seqs": 32, "trust_request_mm_kwargs": True}
    with Server(tiny_base, engine, log_dir=tmp_path_factory.mktemp("serve")) as server:
        yield server
