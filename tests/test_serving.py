"""A real `vllm serve` (loopback) on the tiny checkpoint, driven by the async client."""

from __future__ import annotations

import asyncio

import pytest

from experiments.serving.client import asset_names, online_summary, request, served_model, simulate

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


def single(server, source: str):
    from openai import AsyncOpenAI

    async def go():
        model = await served_model(server.base_url)
        async with AsyncOpenAI(base_url=server.base_url, api_key="EMPTY") as client:
            return await request(client, model, source, max_tokens=8)

    return asyncio.run(go())


def test_single_with_local_file_and_asset(server, speech_clips):
    for source in (str(speech_clips[0][0]), f"asset:{asset_names()[0]}"):
        record, text = single(server, source)
        assert record.ok, record.error
        assert text and record.output_tokens == 8 and record.prompt_tokens > 20
        assert record.ttft_s is not None and 0 < record.ttft_s <= record.latency_s
        assert record.audio_seconds > 0.5


def test_bad_sources_fail_alone(server, tmp_path):
    bad = tmp_path / "not_audio.wav"
    bad.write_bytes(b"this is not a wav file at all" * 10)
    record, _ = single(server, str(bad))
    assert not record.ok and record.error.startswith("BadRequestError 400")  # the client's fault, not retried
    record, _ = single(server, "asset:nope")
    assert not record.ok and "unknown asset" in record.error
    record, _ = single(server, f"asset:{asset_names()[0]}")
    assert record.ok, "the server must keep serving after bad requests"


def test_unusable_audio_is_a_4xx_saying_what_to_send(server, speech_clips, tmp_path):
    """NaN samples, a file:// URL the server may not read, an unreachable http:// URL: each
    is the client's fault (HTTP 400, not retried) with a message saying what to send."""
    import numpy as np
    import soundfile as sf

    nan = speech_clips[0][1].copy()
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    record, _ = single(server, str(tmp_path / "nan.wav"))
    assert record.error.startswith("BadRequestError 400") and "NaN or infinite samples; send finite PCM" in record.error
    record, _ = single(server, f"file://{speech_clips[0][0]}")
    assert record.error.startswith("BadRequestError 400") and "does not read local files" in record.error
    assert "base64 data URL" in record.error
    record, _ = single(server, "http://127.0.0.1:9/clip.wav")  # nothing listens on port 9
    assert record.error.startswith("BadRequestError 400") and "could not be fetched" in record.error
    assert "base64 data URL" in record.error
    assert single(server, str(speech_clips[0][0]))[0].ok


def test_simulation_50_requests_concurrency_8(server, speech_clips):
    sources = [str(p) for p, _, _ in speech_clips] + [f"asset:{a}" for a in asset_names()]

    async def go():
        model = await served_model(server.base_url)
        return await simulate(server.base_url, model, sources, n=50, concurrency=8, max_tokens=16)

    records, duration = asyncio.run(go())
    s = online_summary(records, duration, 8)
    assert s["total_requests"] == 50 and s["failed_requests"] == 0, s["errors"]
    assert s["successful_requests"] + s["failed_requests"] == s["total_requests"]
    assert s["request_throughput"] == pytest.approx(s["successful_requests"] / s["duration_s"])
    assert s["latency_p50_s"] <= s["latency_p90_s"] <= s["latency_p99_s"]
    assert s["tokens_per_s_per_request_min"] <= s["tokens_per_s_per_request_p50"] <= s["tokens_per_s_per_request_max"]
    assert s["ttft_p50_s"] <= s["ttft_p99_s"] and s["ttft_mean_s"] > 0
    assert s["avg_output_tokens_per_request"] == 16
    assert s["rtfx"] > 0


def test_a_server_that_fails_to_start_names_the_workers_own_error():
    """vLLM wraps a worker's exception in generic "initialization failed" errors; the root
    cause is the first `...Error: message` line, and that is what a failed config reports."""
    from experiments.serving.server import root_cause

    log = "\n".join([
        "(EngineCore pid=1) INFO 12-07 03:43:50 [core.py:100] starting",
        "(Worker pid=2) ERROR 12-07 03:43:57 [multiproc_executor.py:1063]     raise NotImplementedError(",
        "(Worker pid=2) ERROR 12-07 03:43:57 [multiproc_executor.py:1063] NotImplementedError: FP8 KV cache on CPU "
        "requires x86 with AVX-512 or AMX.",
        "(EngineCore pid=1) ERROR 12-07 03:43:57 [core.py:1510] RuntimeError: Worker failed with error 'FP8 KV ...'",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ])
    assert root_cause(log) == "NotImplementedError: FP8 KV cache on CPU requires x86 with AVX-512 or AMX."
    assert root_cause("INFO all good\n") is None
