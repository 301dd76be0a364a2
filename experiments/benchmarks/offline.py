"""The `bench` stage (offline): the variant's engine and the linear baseline's engine, both
up, measured in alternating rounds on the same fresh request sets, so every variant gets
ratios vs linear as a median with its min-max over rounds.

Requests are real test-split speech tiled to fixed lengths (`lengths_s`), greedy with a
fixed `max_tokens`, all submitted at t=0 (offline batch); each request's completion time
and first-token time are read off the engine's step loop.
"""

from __future__ import annotations

import statistics
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from experiments.data.audio import SAMPLE_RATE, load_audio
from experiments.metrics import RequestRecord, summarize

RATIO_KEYS = ("request_throughput", "output_token_throughput", "rtfx", "latency_mean_s", "latency_p50_s", "latency_p99_s", "ttft_mean_s")


def request_audio(rows: list[dict], lengths_s: list[float], n: int) -> list[np.ndarray]:
    """n clips cycling through `lengths_s`, cut from the concatenated test speech."""
    speech = np.concatenate([load_audio(r["audio_filepath"]) for r in rows[:64]])
    out = []
    for i in range(n):
        length = int(lengths_s[i % len(lengths_s)] * SAMPLE_RATE)
        start = (i * 7919 * SAMPLE_RATE // 10) % max(1, len(speech) - length)
        out.append(np.resize(speech[start:], length).astype(np.float32))
    return out


def request_set(checkpoint: str | None, lengths_s: list[float], n: int) -> tuple[Path, list[np.ndarray]]:
    """(checkpoint, request audio) of the side-by-side benchmark apps: the tiny random base
    unless a checkpoint is given, and `n` clips of synthetic test speech cut to `lengths_s`."""
    from experiments.data import read_manifest
    from experiments.data.prepare import ensure_synthetic
    from experiments.training.base import ensure_random_tiny

    ckpt = Path(checkpoint) if checkpoint else ensure_random_tiny()
    return ckpt, request_audio(read_manifest(ensure_synthetic()["test"]), lengths_s, n)


def interleaved_rounds(variants: dict, rounds: int) -> dict:
    """Seconds per variant and round, {name: run(round)} -> {name: [s, ...]}: every variant
    runs once per round in turn (A B A B ...), so drift of a noisy machine hits all alike."""
    seconds: dict = {name: [] for name in variants}
    for k in range(rounds):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run(k)
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def speedup(numerators: list[float], denominators: list[float]) -> dict[str, float]:
    """Per-round ratios numerator/denominator as {"median", "min", "max"}: what every
    benchmark here reports. Of times (baseline's over the faster one's, same work in both)
    it is the speed-up; bench_pair also passes per-round metrics, variant over baseline."""
    ratios = [n / d for n, d in zip(numerators, denominators, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def check_rounds(rounds: int) -> None:
    if rounds < 5:
        raise SystemExit(f"rounds={rounds}: at least 5 alternating rounds, single pairs drift by ~30 % on these machines")


class PeakMemory:
    """Peak resident memory (GiB) of each child process of this one (the engines), sampled,
    so `peak_of(pids)` gives the peak of one engine's processes."""

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.per_pid: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = {p.pid: p.memory_info().rss / 2**30 for p in self.proc.children(recursive=True)}
                for pid, gib in rss.items():
                    self.per_pid[pid] = max(self.per_pid.get(pid, 0.0), gib)
            except Exception:  # a child exited between listing and reading
                pass
            self._stop.wait(self.interval)

    def peak_of(self, pids: set[int]) -> float:
        """Sum of the peak RSS of these processes (each sampled separately: an upper bound)."""
        return sum(self.per_pid.get(pid, 0.0) for pid in pids)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(llm, audios: list[np.ndarray], max_tokens: int) -> tuple[list[RequestRecord], float]:
    """Submit every request at once and step the engine to completion."""
    from vllm import SamplingParams

    from experiments.serving.engine import audio_request, chat_prompt

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    prompt = chat_prompt(llm.get_tokenizer())
    audio_id = llm.llm_engine.model_config.hf_config.audio_token_index
    first: dict[str, float] = {}
    records: dict[str, RequestRecord] = {}
    t0 = time.perf_counter()
    for i, audio in enumerate(audios):
        engine.add_request(str(i), audio_request(prompt, audio), params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter() - t0
            if out.outputs and out.outputs[0].token_ids:
                first.setdefault(out.request_id, now)
            if out.finished:
                records[out.request_id] = RequestRecord(
                    ok=True, latency_s=now, output_tokens=len(out.outputs[0].token_ids),
                    prompt_tokens=len(out.prompt_token_ids),
                    audio_seconds=len(audios[int(out.request_id)]) / SAMPLE_RATE,
                    audio_tokens=out.prompt_token_ids.count(audio_id), ttft_s=first.get(out.request_id),
                )
    duration = time.perf_counter() - t0
    return [records[str(i)] for i in range(len(audios))], duration


def engine_pids(before: set[int]) -> set[int]:
    """The child processes started since `before` was taken (an engine's core and workers)."""
    import psutil

    return {c.pid for c in psutil.Process().children(recursive=True)} - before


def bench_pair(variant_dir: Path, baseline_dir: Path, rows: list[dict], lengths_s: list[float], n: int,
               max_tokens: int, engine_overrides: dict, rounds: int = 5, variant_overrides: dict | None = None,
               probe: Any = None) -> dict:
    """The variant's and the linear baseline's engines, both up, measured in alternating
    rounds (baseline, variant, baseline, ...; interleaved_rounds), each round one offline
    batch of `n` fresh clips (no prefix or processor cache: a repeated clip skips the
    encoder). Returns {"baseline"/"variant": the summary of the engine's median round (by
    request throughput), with its processes' peak RSS; "ratio_vs_linear": {key: median of the
    per-round variant/baseline ratios}, with "_min" / "_max" twins; "per_round": request
    throughput per engine and round}.

    variant_overrides: engine arguments of the variant only (e.g. the same checkpoint with
    other hf_overrides). probe: a callable for `llm.apply_model` run on each engine after its
    round's requests, returning seconds (e.g. the audio tower alone); its per-round values
    land in "probe_per_round"."""
    from experiments.serving.engine import close_llm, make_llm

    check_rounds(rounds)
    clips = request_audio(rows, lengths_s, n * (rounds + 1))
    batches = [clips[(k + 1) * n : (k + 2) * n] for k in range(rounds)]
    overrides = {"enable_prefix_caching": False, "mm_processor_cache_gb": 0, **engine_overrides}
    engines, pids = {}, {}
    summaries: dict[str, list[dict]] = {"baseline": [], "variant": []}
    probes: dict[str, list[float]] = {"baseline": [], "variant": []}
    try:
        for name, d in tqdm([("baseline", baseline_dir), ("variant", variant_dir)], desc="bench engines", unit="engine"):
            before = engine_pids(set())
            engines[name] = make_llm(d, **(overrides | ((variant_overrides or {}) if name == "variant" else {})))
            pids[name] = engine_pids(before)
            measure(engines[name], [c[::-1].copy() for c in clips[:n]], max_tokens)  # warm-up, unmeasured clips
        with PeakMemory() as mem:
            def run_round(name: str, k: int) -> None:
                records, duration = measure(engines[name], batches[k], max_tokens)
                summaries[name].append(summarize(records, duration, max_concurrency=overrides.get("max_num_seqs", n)))
                if probe is not None:
                    probes[name].append(float(engines[name].apply_model(probe)[0]))

            interleaved_rounds({name: partial(run_round, name) for name in summaries}, rounds)
    finally:
        for llm in engines.values():
            close_llm(llm)
    out: dict = {"rounds": rounds}
    for name, per_round in summaries.items():
        order = sorted(range(rounds), key=lambda k: per_round[k]["request_throughput"])
        out[name] = per_round[order[(rounds - 1) // 2]] | {"peak_rss_gib": mem.peak_of(pids[name])}
    out["per_round"] = {name: [r["request_throughput"] for r in per_round] for name, per_round in summaries.items()}
    if probe is not None:
        out["probe_per_round"] = probes
    spread = {
        key: speedup([v[key] for v in summaries["variant"]], [b[key] for b in summaries["baseline"]])
        for key in RATIO_KEYS
        if all(b.get(key) and v.get(key) is not None for v, b in zip(summaries["variant"], summaries["baseline"], strict=True))
    }
    out |= {f"ratio_vs_linear{suffix}": {key: s[stat] for key, s in spread.items()}
            for suffix, stat in (("", "median"), ("_min", "min"), ("_max", "max"))}
    return out
