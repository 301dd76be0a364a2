"""Async OpenAI-compatible load client for `vllm serve`, for any variant.

    python -m experiments.serving.client base_url=http://127.0.0.1:8000/v1 audio=asset:open_the_red_door
    python -m experiments.serving.client audio=path/to/clip.wav 'prompt="Transcribe the audio."'
    python -m experiments.serving.client audio=clip.wav timestamps=true [checkpoint=DIR]   # + word times
    python -m experiments.serving.client audio=clip.wav 'hotwords=[zoe,harbour]'           # words to favour
      (the server started with --trust-request-mm-kwargs: vLLM's guard for per-request processor options)
    python -m experiments.serving.client mode=simulation manifest=test.jsonl requests=200 concurrency=8 [rate=4]
    python -m experiments.serving.client mode=realtime manifest=test.jsonl requests=20 [stream.chunk_s=1.0]

Audio sources: a local file (sent as a base64 data URL), an http(s) or file:// URL (passed
through; the server fetches or refuses it),
or `asset:<name>` for the clips bundled in experiments/assets/. Responses are streamed so
each request's time to first token (TTFT) is measured. Each request has a timeout and is
retried with exponential backoff on connection errors and 5xx/429; 4xx is final. A failed
request is recorded and never stops the simulation.

`timestamps=true` (mode=single) prints the transcript's word times after it: the served
checkpoint's alignment head aligns the returned text to the clip on the client's machine
(`served_word_times`; vLLM's response carries text only). The checkpoint is the served
model's name when it was served as `vllm serve DIR`, else `checkpoint=DIR`.

`mode=realtime` plays each clip as a live caller would (experiments/serving/streaming.py):
its chunks become available at real-time pace, and after each one the client sends the
growing prompt (one audio part per chunk, the previous partial's stable words as the start
of the answer) and waits for the partial text; the final request follows the last chunk.
It needs a server started with prefix caching and enough audio items per prompt
(`streaming.serve_flags`), and reports time from chunk arrival to partial text (p50/p95),
prefilled (not prefix-cached) prompt tokens per update from the server's usage, and the
final transcripts' WER next to one whole-utterance request per clip.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from experiments.data.audio import SAMPLE_RATE
from experiments.metrics import RequestRecord, format_table, summarize
from experiments.serving.engine import TRANSCRIBE_PROMPT

ASSETS = Path(__file__).parents[1] / "assets"
# sources sent as they are: the server fetches (or refuses) them
URL_PREFIXES = ("http://", "https://", "data:", "file://")


def asset_names() -> list[str]:
    return sorted(p.stem for p in ASSETS.glob("*.wav"))


def audio_url(source: str) -> str:
    """A local path, an http(s) URL or asset:<name> -> the URL sent in the request."""
    if source.startswith(URL_PREFIXES):
        return source
    if source.startswith("asset:"):
        path = ASSETS / f"{source[6:]}.wav"
        if not path.exists():
            raise ValueError(f"unknown asset {source[6:]!r}; bundled assets: {asset_names()}")
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"audio file {path} not found")
    mime = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg"}.get(path.suffix.lower(), "audio/wav")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def audio_seconds(source: str) -> float:
    """Duration of a local file or asset; 0 for URLs (not fetched by the client) and for
    files soundfile cannot read (the server decides whether they are audio)."""
    import soundfile as sf

    if source.startswith(URL_PREFIXES):
        return 0.0
    path = ASSETS / f"{source[6:]}.wav" if source.startswith("asset:") else Path(source)
    try:
        return sf.info(str(path)).duration
    except Exception:  # unreadable or missing: reported by audio_url / the server
        return 0.0


def served_word_times(ckpt: str | Path, source: str, text: str) -> dict:
    """Word times of a served transcript: the served checkpoint's alignment head (its
    `alignment/` block, or the one cached for its tower) aligns `text` to the audio, here
    beside the client. `vllm serve` returns text only: the times are not part of the response."""
    from experiments.data.audio import load_audio
    from experiments.timestamps import Aligner, ensure_head

    if source.startswith(URL_PREFIXES):
        raise ValueError(f"timestamps need the audio on this machine; {source[:40]!r} is a URL: give a file or asset:<name>")
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").is_file():
        raise ValueError(f"timestamps need the served checkpoint's directory on this machine; {ckpt} is not one: "
                         "pass checkpoint=DIR (the directory given to `vllm serve`)")
    path = ASSETS / f"{source[6:]}.wav" if source.startswith("asset:") else Path(source)
    return Aligner(ckpt, ensure_head(ckpt)).words(load_audio(path), text)


def messages(url: str, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": url}},
        {"type": "text", "text": prompt},
    ]}]


def retryable(err: Exception) -> bool:
    import openai

    if isinstance(err, (openai.APIConnectionError, openai.APITimeoutError)):
        return True
    return isinstance(err, openai.APIStatusError) and (err.status_code >= 500 or err.status_code == 429)


async def request(client, model: str, source: str, prompt: str = TRANSCRIBE_PROMPT, max_tokens: int = 32,
                  retries: int = 2, backoff_s: float = 0.5, hotwords: list[str] | None = None) -> tuple[RequestRecord, str]:
    """One streamed chat completion; returns its record and the generated text. `hotwords`
    travel in the request body as `mm_processor_kwargs` (qwen2_audio_vllm/hotwords.py)."""
    extra = {"extra_body": {"mm_processor_kwargs": {"hotwords": list(hotwords)}}} if hotwords is not None else {}
    seconds = audio_seconds(source)
    t0 = time.perf_counter()
    try:
        url = audio_url(source)
    except (OSError, ValueError) as err:
        return RequestRecord(False, time.perf_counter() - t0, 0, 0, seconds, 0, None, str(err)), ""
    for attempt in range(retries + 1):
        t0, ttft, text, usage = time.perf_counter(), None, [], None
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages(url, prompt), max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, **extra,
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(chunk.choices[0].delta.content)
            latency = time.perf_counter() - t0
            out_tokens = usage.completion_tokens if usage else len(text)
            prompt_tokens = usage.prompt_tokens if usage else 0
            return RequestRecord(True, latency, out_tokens, prompt_tokens, seconds, 0, ttft, None), "".join(text)
        except Exception as err:  # recorded per request; the simulation goes on
            if attempt < retries and retryable(err):
                await asyncio.sleep(backoff_s * 2**attempt)
                continue
            status = getattr(err, "status_code", None)
            msg = f"{type(err).__name__}{f' {status}' if status else ''}: {getattr(err, 'message', err)}"
            return RequestRecord(False, time.perf_counter() - t0, 0, 0, seconds, 0, None, msg), ""
    raise AssertionError("unreachable")


async def simulate(base_url: str, model: str, sources: list[str], n: int, concurrency: int,
                   rate: float | None = None, max_tokens: int = 32, timeout_s: float = 120,
                   seed: int = 0) -> tuple[list[RequestRecord], float]:
    """n requests (sources cycled) with at most `concurrency` in flight; with `rate`,
    arrivals are a Poisson process of `rate` requests/s. Returns records and wall time."""
    from openai import AsyncOpenAI

    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    async with AsyncOpenAI(base_url=base_url, api_key="EMPTY", timeout=timeout_s, max_retries=0) as client:
        async def one(i: int, delay: float) -> RequestRecord:
            await asyncio.sleep(delay)
            async with sem:
                record, _ = await request(client, model, sources[i % len(sources)], max_tokens=max_tokens)
                return record

        delays, t = [], 0.0
        for _ in range(n):
            delays.append(t)
            if rate:
                t += rng.expovariate(rate)
        t0 = time.perf_counter()
        records = await asyncio.gather(*(one(i, d) for i, d in enumerate(delays)))
        return list(records), time.perf_counter() - t0


def online_summary(records: list[RequestRecord], duration_s: float, concurrency: int) -> dict:
    """The seed-000 metrics table; audio tokens are not visible to a client, so that key is
    dropped rather than reported as zero."""
    summary = summarize(records, duration_s, max_concurrency=concurrency)
    summary.pop("avg_audio_tokens_per_request", None)
    summary["errors"] = sorted({r.error for r in records if r.error})[:10]
    return summary


async def stream_clip(client, model: str, audio, settings, prompt: str = TRANSCRIBE_PROMPT,
                      retries: int = 2, backoff_s: float = 0.5) -> list:
    """One clip streamed in real time, as StreamingTranscriber.run does offline: a partial
    after each complete chunk (available `k * chunk_s` after the start), the final at the end
    of the audio. A request goes out when its audio is there and the previous update has
    returned. A failed update is recorded (its `error`) and the stream goes on from the last
    good text. Returns [streaming.Update]."""
    from experiments.serving.streaming import (
        AudioStream,
        Update,
        in_chunks,
        joined,
        next_request,
        wav_bytes,
    )

    stream, updates, urls = AudioStream(settings), [], []
    start = time.perf_counter()

    async def send(arrived: float) -> None:
        text = updates[-1].text if updates else ""
        urls.extend(f"data:audio/wav;base64,{base64.b64encode(wav_bytes(p)).decode()}" for p in stream.pieces[len(urls):])
        await asyncio.sleep(max(0.0, arrived - time.perf_counter()))
        prefix, budget = next_request(stream, text)
        msgs = [{"role": "user", "content": [*({"type": "audio_url", "audio_url": {"url": u}} for u in urls),
                                            {"type": "text", "text": prompt}]}]
        extra = {}
        if prefix:  # the stable words start the answer (offline: chat_prompt's answer_prefix)
            msgs.append({"role": "assistant", "content": prefix})
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        for attempt in range(retries + 1):
            try:
                r = await client.chat.completions.create(model=model, messages=msgs, max_tokens=budget, temperature=0, extra_body=extra)
                details = getattr(r.usage, "prompt_tokens_details", None)
                updates.append(Update(len(urls), stream.seconds, joined(prefix, r.choices[0].message.content or ""),
                                      stream.ended, r.usage.prompt_tokens, int(getattr(details, "cached_tokens", 0) or 0),
                                      r.usage.completion_tokens, time.perf_counter() - arrived))
                return
            except Exception as err:  # recorded per update; the stream goes on
                if attempt < retries and retryable(err):
                    await asyncio.sleep(backoff_s * 2**attempt)
                    continue
                updates.append(Update(len(urls), stream.seconds, text, stream.ended, 0, 0, 0,
                                      time.perf_counter() - arrived, f"{type(err).__name__}: {getattr(err, 'message', err)}"))

    for k, (samples, sr) in enumerate(in_chunks(audio, settings.chunk_s), 1):
        if stream.push(samples, sr):
            await send(start + k * settings.chunk / SAMPLE_RATE)  # the chunk's end, in real time
    stream.end()
    await send(start + len(audio) / SAMPLE_RATE)
    return updates


async def realtime(base_url: str, model: str, rows: list[dict], settings, concurrency: int = 4,
                   timeout_s: float = 120) -> dict:
    """`rows` (manifest rows: audio_filepath, text) streamed in real time, `concurrency`
    streams at once, then each clip once as a whole-utterance request. Returns the summary
    and every update."""
    from openai import AsyncOpenAI

    from experiments.data.audio import AudioError, load_audio
    from experiments.metrics import percentiles, wer_cer, wer_difference

    sem = asyncio.Semaphore(concurrency)
    async with AsyncOpenAI(base_url=base_url, api_key="EMPTY", timeout=timeout_s, max_retries=0) as client:
        async def one(row: dict) -> list:
            async with sem:
                try:
                    audio = load_audio(row["audio_filepath"])
                except AudioError as err:
                    from experiments.serving.streaming import Update

                    return [Update(0, 0.0, "", False, 0, 0, 0, 0.0, str(err))]
                return await stream_clip(client, model, audio, settings)

        streams = await asyncio.gather(*(one(r) for r in rows))
        whole = [await request(client, model, r["audio_filepath"]) for r in rows]
    partial = [u for s in streams for u in s if not u.final and not u.error and u.chunks]
    later = [u for s in streams for u in s if not u.error and u.chunks > 1]  # the prefix cache can help
    finals = [s[-1] if s and s[-1].final and not s[-1].error else None for s in streams]
    refs = [r.get("text", "") for r in rows]
    summary = {
        "streams": len(rows), "chunk_s": settings.chunk_s, "updates": sum(map(len, streams)),
        "failed_updates": sum(bool(u.error) for s in streams for u in s),
        "partial_latency_s": percentiles([u.latency_s for u in partial]),
        "partial_latency_p95_s": float(np.percentile([u.latency_s for u in partial], 95)) if partial else None,
        "final_latency_s": percentiles([f.latency_s for f in finals if f]),
        "prefill_tokens_per_update": percentiles([u.prefill_tokens for u in later]),
        "prompt_tokens_per_update": percentiles([u.prompt_tokens for u in later]),
        "errors": sorted({u.error for s in streams for u in s if u.error} | {w.error for w, _ in whole if w.error})[:10],
    }
    if all(refs):
        summary["final_wer"] = wer_cer(refs, [f.text if f else None for f in finals])
        summary["whole_wer"] = wer_cer(refs, [t.strip() if w.ok else None for w, t in whole])
        both = [i for i, (f, (w, _)) in enumerate(zip(finals, whole, strict=True)) if f and w.ok]
        if both:  # paired, on the clips both requests transcribed
            summary["final_minus_whole"] = wer_difference([refs[i] for i in both], [finals[i].text for i in both],
                                                          [whole[i][1].strip() for i in both])
    return {"summary": summary, "streams": [[asdict(u) for u in s] for s in streams]}


async def served_model(base_url: str) -> str:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base_url, api_key="EMPTY") as client:
        return (await client.models.list()).data[0].id


@hydra.main(config_path="../../conf/apps", config_name="client", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    if cfg.mode not in ("single", "simulation", "realtime"):
        raise SystemExit(f"mode={cfg.mode}: expected single (one request), simulation (a load run) "
                         "or realtime (clips streamed chunk by chunk)")
    if cfg.mode == "realtime" and not cfg.manifest:
        raise SystemExit("mode=realtime needs manifest=FILE (JSONL rows with audio_filepath and text)")

    async def go() -> None:
        model = await served_model(cfg.base_url)
        if cfg.mode == "single":
            from openai import AsyncOpenAI

            async with AsyncOpenAI(base_url=cfg.base_url, api_key="EMPTY") as client:
                record, text = await request(client, model, cfg.audio, cfg.prompt or TRANSCRIBE_PROMPT, cfg.max_tokens,
                                             hotwords=list(cfg.hotwords) if cfg.hotwords is not None else None)
            print(text if record.ok else f"request failed: {record.error}")
            if cfg.timestamps and record.ok:
                # `vllm serve DIR` names the model by its directory: the default checkpoint
                print(json.dumps(served_word_times(cfg.checkpoint or model, cfg.audio, text)))
            return
        if cfg.mode == "realtime":
            from experiments.serving.streaming import StreamSettings

            rows = [json.loads(line) for line in open(cfg.manifest) if line.strip()][: cfg.requests]
            result = await realtime(cfg.base_url, model, rows, StreamSettings(**cfg.stream), cfg.concurrency)
            print(json.dumps(result["summary"], indent=1))
            out = Path(HydraConfig.get().runtime.output_dir) / "realtime.json"
            out.write_text(json.dumps(result, indent=1))
            print(f"-> {out}")
            return
        if cfg.manifest:
            sources = [json.loads(line)["audio_filepath"] for line in open(cfg.manifest) if line.strip()]
        else:
            sources = [f"asset:{a}" for a in asset_names()]
        records, duration = await simulate(cfg.base_url, model, sources, cfg.requests, cfg.concurrency, cfg.rate, cfg.max_tokens)
        summary = online_summary(records, duration, cfg.concurrency)
        print(format_table({"run": summary}))
        out = Path(HydraConfig.get().runtime.output_dir) / "simulation.json"
        out.write_text(json.dumps(summary, indent=1))
        print(f"-> {out}")

    asyncio.run(go())


if __name__ == "__main__":
    main()
