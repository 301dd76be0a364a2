"""The one metrics module: WER/CER with bootstrap CIs, and the load-run summary table.

Offline evaluation, the offline benchmark and the online load simulation all call this file,
so a WER or a throughput means the same thing wherever it is printed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import jiwer
import numpy as np

_BOOT_CHUNK = 4_000_000  # resampled utterance indices held in memory at once


@cache
def _normalizer() -> Any:
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    # Empty spelling mapping: the British->American list lives on the hub, which we cannot reach.
    return EnglishTextNormalizer({})


def normalize_text(s: str) -> str:
    """Whisper's English normaliser (lower case, no punctuation, numbers and contractions
    spelled out), without British->American spelling mapping."""
    return _normalizer()(s)


def _edit_counts(out: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-utterance (errors, reference length) from a jiwer WordOutput/CharacterOutput."""
    errors = np.zeros(len(out.references), dtype=np.int64)
    for i, chunks in enumerate(out.alignments):
        for c in chunks:
            if c.type in ("substitute", "delete"):
                errors[i] += c.ref_end_idx - c.ref_start_idx
            elif c.type == "insert":
                errors[i] += c.hyp_end_idx - c.hyp_start_idx
    ref_len = np.array([len(r) for r in out.references], dtype=np.int64)
    return errors, ref_len


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else math.nan


def _resamples(n: int, n_boot: int, seed: int) -> list[np.ndarray]:
    """`n_boot` resamples of n utterance indices, in blocks of at most _BOOT_CHUNK indices."""
    if not n:
        return []
    rng = np.random.default_rng(seed)
    block = max(1, _BOOT_CHUNK // n)
    return [rng.integers(0, n, size=(min(block, n_boot - s), n)) for s in range(0, n_boot, block)]


def _bootstrap_ci(
    errors: np.ndarray, ref_len: np.ndarray, idx_blocks: list[np.ndarray]
) -> tuple[float, float]:
    """95% percentile interval of sum(errors)/sum(ref_len) over utterance resamples."""
    rates = []
    for idx in idx_blocks:
        den = ref_len[idx].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rates.append(np.where(den > 0, errors[idx].sum(axis=1) / den, np.nan))
    rates = np.concatenate(rates)
    if len(rates) == 0 or np.isnan(rates).all():
        return math.nan, math.nan
    low, high = np.nanpercentile(rates, [2.5, 97.5])
    return float(low), float(high)


def wer_cer(
    refs: list[str], hyps: list[str | None], n_boot: int = 1000, seed: int = 0
) -> dict[str, float | int]:
    """Corpus WER and CER (fractions, not percent) on normalised text, with 95% bootstrap CIs.

    Utterances with `hyp is None` (failed requests) are left out and counted in "n_failed";
    "n_utts" counts the scored ones. A reference that normalises to "" is kept: it adds its
    hypothesis' words as insertions and nothing to the denominator, as a corpus-level WER
    must (dropping it would hide hallucinations on silence). Rates are NaN when no scored
    reference has any words.
    """
    if len(refs) != len(hyps):
        raise ValueError(
            f"wer_cer: {len(refs)} references but {len(hyps)} hypotheses; pass one hypothesis per reference (None for a failed request)."
        )
    pairs = [
        (normalize_text(r), normalize_text(h))
        for r, h in zip(refs, hyps, strict=True)
        if h is not None
    ]
    n = len(pairs)
    result: dict[str, float | int] = {"n_utts": n, "n_failed": len(refs) - n}
    idx_blocks = _resamples(n, n_boot, seed)
    for name, process in (("wer", jiwer.process_words), ("cer", jiwer.process_characters)):
        if n:
            errors, ref_len = _edit_counts(process([r for r, _ in pairs], [h for _, h in pairs]))
        else:
            errors, ref_len = np.zeros(0, np.int64), np.zeros(0, np.int64)
        result[name] = _ratio(errors.sum(), ref_len.sum())
        result[f"{name}_ci_low"], result[f"{name}_ci_high"] = _bootstrap_ci(
            errors, ref_len, idx_blocks
        )
    return result


def wer_difference(
    refs: list[str], hyps_a: list[str], hyps_b: list[str], n_boot: int = 1000, seed: int = 0
) -> dict[str, float | int]:
    """Corpus WER of `hyps_a` minus that of `hyps_b` on the same references (a fraction), with
    a 95% paired bootstrap interval: each resample draws utterances once for both, so the
    interval is that of the difference, much narrower than the two WERs' own intervals."""
    if not len(refs) == len(hyps_a) == len(hyps_b) or not refs:
        raise ValueError(
            f"wer_difference: {len(refs)} references, {len(hyps_a)} and {len(hyps_b)} hypotheses; "
            "pass one hypothesis of each system per reference (at least one)"
        )
    refs_n = [normalize_text(r) for r in refs]
    (err_a, ref_len), (err_b, _) = (
        _edit_counts(jiwer.process_words(refs_n, [normalize_text(h) for h in hyps])) for hyps in (hyps_a, hyps_b)
    )
    diffs = []
    for idx in _resamples(len(refs), n_boot, seed):
        den = ref_len[idx].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            diffs.append(np.where(den > 0, (err_a[idx].sum(axis=1) - err_b[idx].sum(axis=1)) / den, np.nan))
    low, high = np.nanpercentile(np.concatenate(diffs), [2.5, 97.5])
    return {"n_utts": len(refs), "wer_delta": _ratio(err_a.sum() - err_b.sum(), ref_len.sum()),
            "wer_delta_ci_low": float(low), "wer_delta_ci_high": float(high)}


def percentiles(values: list[float] | np.ndarray) -> dict[str, float | None]:
    """mean/min/max/p50/p90/p99 of `values` (same unit as the input). An empty input gives
    None for every key, so the result stays valid JSON and prints as "-"."""
    keys = ("mean", "min", "max", "p50", "p90", "p99")
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return dict.fromkeys(keys)
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    stats = (v.mean(), v.min(), v.max(), p50, p90, p99)
    return {k: float(s) for k, s in zip(keys, stats, strict=True)}


@dataclass
class RequestRecord:
    """One request of a load run. Times in seconds, counts in tokens; `audio_seconds` is the
    duration of the request's audio; `ttft_s` is None when the client could not stream."""

    ok: bool
    latency_s: float
    output_tokens: int
    prompt_tokens: int
    audio_seconds: float
    audio_tokens: int
    ttft_s: float | None = None
    error: str | None = None


def _flat(
    prefix: str, stats: dict[str, float | None], keys: tuple[str, ...], unit: str
) -> dict[str, float | None]:
    return {f"{prefix}_{k}{unit}": stats[k] for k in keys}


def summarize(
    records: list[RequestRecord], duration_s: float, max_concurrency: int
) -> dict[str, Any]:
    """The metrics table of one load run, flat keys with units in the name.

    `duration_s` is the wall time of the whole run (first send to last reply). Throughputs
    divide by it; per-request statistics cover successful requests only. TPOT (time per output
    token after the first) uses requests with a TTFT and more than one output token.
    Ratios with a zero denominator are NaN; statistics over no requests are None.
    """
    ok = [r for r in records if r.ok]
    n_ok = len(ok)
    latency = np.array([r.latency_s for r in ok], dtype=np.float64)
    out_tokens = np.array([r.output_tokens for r in ok], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tok_per_s = out_tokens[latency > 0] / latency[latency > 0]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [
        (r.latency_s - r.ttft_s) / (r.output_tokens - 1)
        for r in ok
        if r.ttft_s is not None and r.output_tokens > 1
    ]
    lat_stats = percentiles(latency)
    summary: dict[str, Any] = {
        "max_concurrency": max_concurrency,
        "total_requests": len(records),
        "successful_requests": n_ok,
        "failed_requests": len(records) - n_ok,
        "success_rate": _ratio(n_ok, len(records)),
        "duration_s": duration_s,
        "request_throughput": _ratio(n_ok, duration_s),
        "output_token_throughput": _ratio(out_tokens.sum(), duration_s),
        "avg_output_tokens_per_request": float(out_tokens.mean()) if n_ok else None,
        "avg_request_time_s": lat_stats["mean"],
        **_flat(
            "tokens_per_s_per_request",
            percentiles(tok_per_s),
            ("mean", "min", "max", "p50", "p90", "p99"),
            "",
        ),
        **_flat("latency", lat_stats, ("mean", "p50", "p90", "p99"), "_s"),
        **_flat("ttft", percentiles(ttft), ("mean", "p50", "p99"), "_s"),
        **_flat("tpot", percentiles(tpot), ("mean", "p50", "p99"), "_s"),
        "rtfx": _ratio(sum(r.audio_seconds for r in ok), duration_s),
        "avg_audio_tokens_per_request": float(np.mean([r.audio_tokens for r in ok]))
        if n_ok
        else None,
    }
    return summary


def format_value(v: Any) -> str:
    """A table cell: "-" for None/NaN, integers plain, floats to about 4 significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float | np.number):
        return str(v)
    if isinstance(v, int | np.integer) or float(v).is_integer() and abs(v) >= 1000:
        return f"{int(v)}"
    a = abs(float(v))
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.3f}"
    return f"{v:.4g}"


def format_table(columns: dict[str, dict[str, Any]], keys: list[str] | None = None) -> str:
    """Markdown table: one row per metric, one column per run name. `keys` picks and orders the
    rows (default: every key of any run, in first-seen order); a missing value prints "-"."""
    if keys is None:
        keys = list(dict.fromkeys(k for summary in columns.values() for k in summary))
    header = ["metric", *columns]
    rows = [[k, *(format_value(summary.get(k)) for summary in columns.values())] for k in keys]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    sep = (
        "|"
        + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def biased_wer(refs: list[str], hyps: list[str | None], lists: list[list[str]]) -> dict[str, float | int]:
    """Contextual-biasing WERs: overall WER, B-WER over reference words in the utterance's
    bias list (substitutions and deletions of them, plus insertions of list words) and U-WER
    over the other words (Le et al. 2021). Texts and list words are normalised as WER is; a
    failed utterance (hyp None) counts as all deleted."""
    import jiwer

    b_err = u_err = b_n = u_n = 0
    for ref, hyp, words in zip(refs, hyps, lists, strict=True):
        bias = {normalize_text(w) for w in words}
        r = normalize_text(ref).split()
        h = normalize_text(hyp).split() if hyp is not None else []
        b_n += sum(w in bias for w in r)
        u_n += sum(w not in bias for w in r)
        if not r:
            u_err += len(h)
            continue
        if not h:
            b_err += sum(w in bias for w in r)
            u_err += sum(w not in bias for w in r)
            continue
        for chunk in jiwer.process_words(" ".join(r), " ".join(h)).alignments[0]:
            if chunk.type == "equal":
                continue
            if chunk.type == "insert":
                for w in h[chunk.hyp_start_idx : chunk.hyp_end_idx]:
                    b_err, u_err = (b_err + 1, u_err) if w in bias else (b_err, u_err + 1)
                continue
            for w in r[chunk.ref_start_idx : chunk.ref_end_idx]:  # substitute or delete
                b_err, u_err = (b_err + 1, u_err) if w in bias else (b_err, u_err + 1)
    return {"wer": _ratio(b_err + u_err, b_n + u_n), "b_wer": _ratio(b_err, b_n), "u_wer": _ratio(u_err, u_n),
            "bias_words": b_n, "other_words": u_n, "b_errors": b_err, "u_errors": u_err}
