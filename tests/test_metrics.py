import math

import pytest

from experiments.metrics import (
    RequestRecord,
    format_table,
    normalize_text,
    percentiles,
    summarize,
    wer_cer,
    wer_difference,
)


def test_normalize_text_whisper_english():
    assert normalize_text("Hello, World!") == normalize_text("hello world") == "hello world"
    assert normalize_text("I won't go") == "i will not go"


def test_wer_cer_known_pairs():
    m = wer_cer(["the cat sat down"], ["the dog sat down"])
    assert m["wer"] == 0.25
    # "cat" -> "dog": 3 of 16 characters (spaces included) substituted.
    assert m["cer"] == pytest.approx(3 / 16)
    assert m["n_utts"] == 1 and m["n_failed"] == 0


def test_wer_is_corpus_level_and_skips_failed():
    # 1 error / 4 words and 2 errors / 2 words -> 3/6, not the mean of utterance rates.
    m = wer_cer(["a b c d", "e f", "never scored"], ["a b x d", "", None])
    assert m["wer"] == 0.5
    assert m["n_utts"] == 2 and m["n_failed"] == 1


def test_empty_reference_counts_insertions():
    m = wer_cer(["good day", "Um, uh!"], ["good day", "bad night"])
    assert m["wer"] == 1.0  # "Um, uh!" normalises to "": 2 insertions over 2 words
    assert math.isnan(wer_cer([""], [""])["wer"])


def test_bootstrap_ci_contains_estimate_and_shrinks():
    refs = ["the cat sat on the mat", "a quick brown fox", "hello there world", "red green blue"]
    hyps = ["the cat sat on a mat", "a quick brown fox", "hello world", "red green blue sky"]
    small = wer_cer(refs, hyps, n_boot=500)
    big = wer_cer(refs * 25, hyps * 25, n_boot=500)
    assert small["wer"] == big["wer"] == pytest.approx(3 / 16)
    for m in (small, big):
        assert m["wer_ci_low"] <= m["wer"] <= m["wer_ci_high"]
        assert m["cer_ci_low"] <= m["cer"] <= m["cer_ci_high"]
    assert big["wer_ci_high"] - big["wer_ci_low"] < small["wer_ci_high"] - small["wer_ci_low"]
    assert wer_cer(refs, hyps, seed=3) == wer_cer(refs, hyps, seed=3)


def test_wer_cer_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one hypothesis per reference"):
        wer_cer(["a", "b"], ["a"])


def test_percentiles():
    p = percentiles(list(range(101)))
    assert (p["mean"], p["min"], p["max"], p["p50"], p["p90"], p["p99"]) == (50, 0, 100, 50, 90, 99)
    assert set(percentiles([]).values()) == {None}


def _records() -> list[RequestRecord]:
    return [
        RequestRecord(ok=True, latency_s=2.0, output_tokens=11, prompt_tokens=50, audio_seconds=10.0, audio_tokens=250, ttft_s=1.0),
        RequestRecord(ok=True, latency_s=1.0, output_tokens=5, prompt_tokens=40, audio_seconds=5.0, audio_tokens=125, ttft_s=0.2),
        RequestRecord(ok=True, latency_s=0.5, output_tokens=1, prompt_tokens=30, audio_seconds=2.0, audio_tokens=50, ttft_s=0.5),
        RequestRecord(ok=True, latency_s=4.0, output_tokens=20, prompt_tokens=30, audio_seconds=3.0, audio_tokens=75),
        RequestRecord(ok=False, latency_s=9.0, output_tokens=0, prompt_tokens=30, audio_seconds=30.0, audio_tokens=750, error="timeout"),
    ]


def test_summarize_invariants_and_arithmetic():
    s = summarize(_records(), duration_s=8.0, max_concurrency=4)
    assert s["total_requests"] == 5
    assert s["successful_requests"] + s["failed_requests"] == s["total_requests"]
    assert s["success_rate"] == 0.8
    assert s["request_throughput"] == 4 / 8.0
    assert s["output_token_throughput"] == 37 / 8.0
    assert s["rtfx"] == 20.0 / 8.0  # the failed request's 30 s of audio do not count
    assert s["avg_audio_tokens_per_request"] == 125.0
    assert s["avg_output_tokens_per_request"] == 37 / 4
    assert s["avg_request_time_s"] == s["latency_mean_s"] == 7.5 / 4
    assert s["latency_p50_s"] <= s["latency_p90_s"] <= s["latency_p99_s"]
    assert s["tokens_per_s_per_request_max"] == 5.5
    assert s["tokens_per_s_per_request_min"] == 2.0
    # TPOT only for records with a TTFT and >1 token: (2-1)/10 and (1-0.2)/4.
    assert s["tpot_mean_s"] == pytest.approx((0.1 + 0.2) / 2)
    assert s["ttft_mean_s"] == pytest.approx((1.0 + 0.2 + 0.5) / 3)


def test_summarize_all_failed():
    s = summarize(_records()[-1:], duration_s=1.0, max_concurrency=1)
    assert s["successful_requests"] == 0 and s["request_throughput"] == 0.0
    assert s["latency_p50_s"] is None and s["tpot_mean_s"] is None


def test_format_table_one_column_per_run():
    a = summarize(_records(), duration_s=8.0, max_concurrency=4)
    b = summarize(_records()[:2], duration_s=2.0, max_concurrency=1)
    table = format_table({"baseline": a, "fp8_kv": b}, keys=["max_concurrency", "request_throughput", "latency_p50_s", "error"])
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()]
    assert cells[0] == ["metric", "baseline", "fp8_kv"]
    assert cells[2] == ["max_concurrency", "4", "1"]
    assert cells[3] == ["request_throughput", "0.5", "1.000"]
    assert cells[4] == ["latency_p50_s", "1.500", "1.500"]
    assert cells[5] == ["error", "-", "-"]  # missing key
    assert len(format_table({"x": a}).splitlines()) == 2 + len(a)


def test_wer_difference_is_paired():
    """Two systems wrong on mostly the same utterances: the paired interval of their
    difference is much narrower than either WER's own interval. A system against itself
    differs by exactly zero."""
    refs = [f"the {w} sat on the mat today" for w in ("cat", "dog", "hen", "cow", "fox", "owl")] * 10
    a = [r.replace("mat", "hat").replace("sat", "set") if i % 3 else r for i, r in enumerate(refs)]
    b = [h.replace("today", "") if i % 4 == 1 else h for i, h in enumerate(a)]  # a's errors and a few more
    d = wer_difference(refs, b, a)
    assert d["wer_delta"] == pytest.approx(wer_cer(refs, b)["wer"] - wer_cer(refs, a)["wer"]) and d["wer_delta"] > 0
    assert d["wer_delta_ci_low"] < d["wer_delta"] < d["wer_delta_ci_high"]
    assert d["wer_delta_ci_high"] - d["wer_delta_ci_low"] < 0.5 * (wer_cer(refs, b)["wer_ci_high"] - wer_cer(refs, b)["wer_ci_low"])
    same = wer_difference(refs, a, a)
    assert same["wer_delta"] == same["wer_delta_ci_low"] == same["wer_delta_ci_high"] == 0.0
    with pytest.raises(ValueError, match="one hypothesis of each system"):
        wer_difference(refs, a, b[:-1])
