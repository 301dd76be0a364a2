"""The `bench` stage (offline): one fixed request set through the variant's engine and the
linear baseline's engine in the same run, so every variant gets ratios vs linear.

Requests are real test-split speech tiled to fixed lengths (`lengths_s`), greedy with a
fixed `max_tokens`, all submitted at t=0 (offline batch); each request's completion time
and first-token time are read off the engine's step loop.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from experiments.audio import SAMPLE_RATE, load_audio
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


def add_request_args(parser, max_tokens: int) -> None:
    """Command-line options of the side-by-side benchmark scripts: a checkpoint and the
    request set (`request_set`), with the number of interleaved rounds."""
    parser.add_argument("checkpoint", nargs="?", type=Path, help="default: the tiny random base")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lengths", type=float, nargs="+", default=[1.0, 3.0, 8.0])


def request_set(args) -> tuple[Path, list[np.ndarray]]:
    """(checkpoint, request audio) for options from `add_request_args`: the tiny random base
    unless one is given, and synthetic test speech cut to `--lengths`."""
    from experiments.data import read_manifest
    from experiments.prepare import ensure_random_tiny, ensure_synthetic

    ckpt = args.checkpoint or ensure_random_tiny()
    return ckpt, request_audio(read_manifest(ensure_synthetic()["test"]), args.lengths, args.requests)


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


def interleaved_seconds(variants: dict, rounds: int) -> dict[str, float]:
    """Total seconds per variant over `rounds` interleaved rounds (interleaved_rounds)."""
    return {name: sum(s) for name, s in interleaved_rounds(variants, rounds).items()}


class PeakMemory:
    """Peak resident memory (GiB) of this process and its children (the engine), sampled."""

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self.proc, self.peak, self.interval = psutil.Process(), 0.0, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs) / 2**30)
            except Exception:  # a child exited between listing and reading
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(llm, audios: list[np.ndarray], max_tokens: int) -> tuple[list[RequestRecord], float]:
    """Submit every request at once and step the engine to completion."""
    from vllm import SamplingParams

    from experiments.engine import audio_request, chat_prompt

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


def bench_engine(model_dir: Path, audios: list[np.ndarray], max_tokens: int, engine_overrides: dict) -> dict:
    from experiments.engine import close_llm, make_llm

    with PeakMemory() as mem:
        llm = make_llm(model_dir, **engine_overrides)
        try:
            # warm-up on clips outside the measured set: a repeated clip would be served from
            # vLLM's prefix and processor caches
            measure(llm, [a[::-1].copy() for a in audios[:4]], max_tokens)
            records, duration = measure(llm, audios, max_tokens)
        finally:
            close_llm(llm)
    summary = summarize(records, duration, max_concurrency=engine_overrides.get("max_num_seqs", len(audios)))
    summary["peak_rss_gib"] = mem.peak
    return summary


def bench_pair(variant_dir: Path, baseline_dir: Path, rows: list[dict], lengths_s: list[float], n: int,
               max_tokens: int, engine_overrides: dict) -> dict:
    """{"variant": summary, "baseline": summary, "ratio_vs_linear": {key: variant/baseline}}."""
    audios = request_audio(rows, lengths_s, n)
    out = {}
    for name, d in tqdm([("baseline", baseline_dir), ("variant", variant_dir)], desc="bench", unit="engine"):
        out[name] = bench_engine(d, audios, max_tokens, engine_overrides)
    out["ratio_vs_linear"] = {
        k: out["variant"][k] / out["baseline"][k] for k in RATIO_KEYS if out["baseline"].get(k)
    }
    return out
