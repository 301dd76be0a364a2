"""Streaming transcription: audio arrives in chunks, a partial transcript follows each one.

    python -m experiments.serving.streaming files=[a.wav] [model=DIR] [chunk_s=1.0]
    python -m experiments.serving.streaming demo=true     # WER, cost per update vs re-sending, plot
    python -m experiments.serving.streaming compare=[outputs/streaming/base,DIR2,...]   # demos side by side

Layout. A stream cut into k chunks (`windows.chunks`, the pieces long-form windows are cut
by) is one chat prompt with k audio items, as `vllm serve` renders k audio parts:
"Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\\nAudio 2: ...\\n<instruction>". Each chunk is
its own item, so it is encoded alone (the embeddings of earlier chunks never change when more
audio comes) and hashed alone by vLLM. With automatic prefix caching an update's prompt shares
everything up to the previous chunks with the last update's, so vLLM prefills only the new
chunk, the instruction and the answer prefix below, in whole KV blocks (the cache is vLLM's;
nothing here stores KV or encoder outputs).

Partial text. Update k starts the assistant's answer with update k-1's text minus its last
`unstable_words` words (a word cut by the chunk boundary may still change) and decodes only
the rest, so an update's decode does not grow with the audio before it. The final update,
after the last chunk, decodes the whole transcript afresh: the transcript that counts is
never locked to a guess made on partial audio.

Cost. The demo sets every partial update against re-sending the whole audio so far as one
item with the prefix cache emptied, second by second: latency, prefilled tokens (vLLM's
`num_cached_tokens`) and forward FLOPs counted from those tokens and the audio encoded
(experiments/benchmarks/cost_split.py's arithmetic; an update encodes only its new chunk,
which `engine.EncoderProbe` confirms in the tests).

Bad input: every chunk of a stream must come at the stream's first sample rate (resampled
to 16 kHz like any audio; a change mid-stream is refused), an empty chunk is refused and
leaves the stream as it was, and a stream whose source stops without its final chunk keeps
its partial transcripts, marked not final, with the reason. A stream's state is its
`AudioStream`; the engine shares only content-addressed caches between streams.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from experiments.data.audio import MIN_SECONDS, SAMPLE_RATE, AudioError, load_audio, to_model_audio
from qwen2_audio_vllm import windows

# On CPU the KV block size must be a multiple of 32 (PLATFORM.md); prefix hits come in blocks.
BLOCK_SIZE = 32


@dataclass(frozen=True)
class StreamSettings:
    chunk_s: float = 1.0  # seconds of audio per chunk (one audio item each)
    max_chunks: int = 30  # audio items one prompt may carry (the engine's limit_mm_per_prompt)
    unstable_words: int = 2  # words of the previous partial that an update may still change
    partial_tokens: int = 16  # new tokens an update may decode
    final_tokens_per_s: int = 16  # the final transcript's budget per second of audio (min 32)

    def __post_init__(self) -> None:
        if self.chunk_s < 0.1 or self.max_chunks < 1 or self.unstable_words < 0 or self.partial_tokens < 1:
            raise ValueError(
                f"stream.chunk_s={self.chunk_s}, max_chunks={self.max_chunks}, unstable_words={self.unstable_words}, "
                f"partial_tokens={self.partial_tokens}: expected chunk_s >= 0.1 s, max_chunks >= 1, "
                "unstable_words >= 0, partial_tokens >= 1"
            )

    @property
    def chunk(self) -> int:
        return int(round(self.chunk_s * SAMPLE_RATE))

    def final_budget(self, seconds: float) -> int:
        """New tokens a whole transcript of `seconds` of audio may decode."""
        return max(32, int(self.final_tokens_per_s * seconds + 0.5))


class AudioStream:
    """One live stream: chunks of any size pushed in, fixed `chunk_s` pieces out.

    `push` buffers samples and returns how many complete pieces it added; `end` turns what is
    left into the last piece (padded with silence to the model's minimum length)."""

    def __init__(self, settings: StreamSettings) -> None:
        self.settings = settings
        self.pieces: list[np.ndarray] = []
        self.sample_rate: int | None = None
        self.ended = False
        self._buffer = np.zeros(0, dtype=np.float32)

    @property
    def seconds(self) -> float:
        return (sum(map(len, self.pieces)) + len(self._buffer)) / SAMPLE_RATE

    def push(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> int:
        if self.ended:
            raise AudioError("this stream has ended; start a new AudioStream for more audio")
        if np.asarray(samples).size == 0:
            raise AudioError("an empty chunk (0 samples); send audio, or end the stream to get the final transcript")
        if self.sample_rate is not None and sample_rate != self.sample_rate:
            raise AudioError(
                f"a chunk at {sample_rate} Hz in a stream that started at {self.sample_rate} Hz; "
                "send every chunk of a stream at one sample rate (or start a new stream)"
            )
        x = to_model_audio(samples, sample_rate, "chunk", min_seconds=0.0)
        self.sample_rate = sample_rate
        buffer = np.concatenate([self._buffer, x])
        pieces = windows.chunks(buffer, self.settings.chunk)
        complete = [p for p in pieces if len(p) == self.settings.chunk]
        if len(self.pieces) + len(complete) + (len(complete) < len(pieces)) > self.settings.max_chunks:
            raise AudioError(
                f"the stream would exceed {self.settings.max_chunks} chunks of {self.settings.chunk_s} s; "
                "end it, or raise stream.max_chunks (the engine's audio items per prompt)"
            )
        self.pieces += complete
        self._buffer = buffer[len(complete) * self.settings.chunk :]
        return len(complete)

    def end(self) -> None:
        if self.ended:
            return
        if len(self._buffer):
            shortest = int(MIN_SECONDS * SAMPLE_RATE)
            self.pieces.append(np.pad(self._buffer, (0, max(0, shortest - len(self._buffer)))))
            self._buffer = self._buffer[:0]
        if not self.pieces:
            raise AudioError("the stream ended without any audio; send at least one chunk")
        self.ended = True


@dataclass
class Update:
    """One partial (or the final) transcript of a stream, with what it cost."""

    chunks: int
    audio_s: float
    text: str
    final: bool
    prompt_tokens: int
    cached_tokens: int  # vLLM's prefix-cache hit for this request
    new_tokens: int
    latency_s: float  # from the chunk's arrival to the text
    error: str | None = None

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def answer_prefix(previous: str, unstable_words: int) -> str:
    """The words of the previous partial an update keeps: all but the last `unstable_words`."""
    words = previous.split()
    return " ".join(words[: max(0, len(words) - unstable_words)])


def next_request(stream: AudioStream, previous: str) -> tuple[str, int]:
    """(answer prefix, max new tokens) of the update of `stream` after the partial
    `previous`: the stable words and `partial_tokens` for a partial; nothing and the final
    budget once the stream has ended. The offline transcriber and the realtime client both
    ask this, so their prompts stay the same."""
    s = stream.settings
    if stream.ended:
        return "", s.final_budget(stream.seconds)
    return answer_prefix(previous, s.unstable_words), s.partial_tokens


def joined(prefix: str, continuation: str) -> str:
    return " ".join(f"{prefix}{continuation}".split())


def streaming_engine_args(settings: StreamSettings) -> dict:
    """The engine options a stream needs: prefix caching in blocks of BLOCK_SIZE, up to
    `max_chunks` audio items per prompt (profiled at one chunk's length), stats on (the
    prefix-cache counters)."""
    return dict(
        enable_prefix_caching=True,
        block_size=BLOCK_SIZE,
        limit_mm_per_prompt={"audio": {"count": settings.max_chunks, "length": settings.chunk}},
        disable_log_stats=False,
    )


def serve_flags(settings: StreamSettings) -> dict:
    """`vllm serve` options (serving/server.py `Server(engine=...)`) for the realtime client:
    the engine's streaming options and per-response cached-token counts in `usage`."""
    args = streaming_engine_args(settings)
    args.pop("disable_log_stats")  # the server logs its stats anyway
    return args | {"enable_prompt_tokens_details": True}


class StreamingTranscriber:
    """Partial and final transcripts of streams through one `vllm.LLM` started with
    `streaming_engine_args` (any number of streams, one after another or interleaved)."""

    def __init__(self, llm, settings: StreamSettings) -> None:
        self.llm, self.settings = llm, settings
        self.tokenizer = llm.get_tokenizer()

    def update(self, stream: AudioStream, previous: str = "", arrived: float | None = None) -> Update:
        """The transcript of `stream`'s pieces so far: final once the stream has ended."""
        from vllm import SamplingParams

        from experiments.serving.engine import audio_request, chat_prompt

        arrived = time.perf_counter() if arrived is None else arrived
        final = stream.ended
        prefix, budget = next_request(stream, previous)
        prompt = chat_prompt(self.tokenizer, n_audios=len(stream.pieces), answer_prefix=prefix)
        (out,) = self.llm.generate([audio_request(prompt, list(stream.pieces))],
                                   SamplingParams(max_tokens=budget, temperature=0), use_tqdm=False)
        return Update(len(stream.pieces), sum(map(len, stream.pieces)) / SAMPLE_RATE, joined(prefix, out.outputs[0].text),
                      final, len(out.prompt_token_ids), int(out.num_cached_tokens or 0), len(out.outputs[0].token_ids),
                      time.perf_counter() - arrived)

    def run(self, chunks: Iterable[tuple[np.ndarray, int]]) -> list[Update]:
        """Push each (samples, sample_rate) chunk as it comes; a partial after each complete
        piece, the final transcript when `chunks` is exhausted. If the source fails first,
        the partials so far are returned and the last one carries the reason."""
        stream, updates = AudioStream(self.settings), []
        source: Iterator = iter(chunks)
        while True:
            try:
                samples, sr = next(source)
            except StopIteration:
                break
            except Exception as err:  # the source broke: keep what was transcribed, say why
                reason = f"stream stopped without its final chunk ({type(err).__name__}: {err}); partial transcripts kept, not final"
                if updates:
                    updates[-1].error = reason
                else:
                    updates.append(Update(0, 0.0, "", False, 0, 0, 0, 0.0, reason))
                return updates
            arrived = time.perf_counter()
            for _ in range(stream.push(samples, sr)):
                updates.append(self.update(stream, updates[-1].text if updates else "", arrived))
        stream.end()
        updates.append(self.update(stream))
        return updates


def in_chunks(audio: np.ndarray, chunk_s: float, sample_rate: int = SAMPLE_RATE) -> list[tuple[np.ndarray, int]]:
    """A clip as a live source would send it: consecutive `chunk_s` pieces."""
    return [(p, sample_rate) for p in windows.chunks(audio, int(round(chunk_s * sample_rate)))]


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A chunk as a float WAV file (lossless: the server decodes the samples sent)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@dataclass
class StreamingReport:
    settings: dict
    clean_wer: dict = field(default_factory=dict)  # final streamed vs whole-utterance, held-out voices
    updates: list[dict] = field(default_factory=list)  # long clips: every update's cost
    whole_resend: list[dict] = field(default_factory=list)  # long clips: the audio so far re-sent whole, each second
    per_second: dict = field(default_factory=dict)  # both of those side by side, slopes, compute ratio
    per_update_vs_whole: dict = field(default_factory=dict)  # alternating rounds at the last second


def cost_dims(ckpt: Path) -> dict:
    """{"flops": the dims of the checkpoint at `ckpt`, "flops_7b_dims": Qwen2-Audio-7B's}
    (cost_split's TinySpec): every request is costed at both, the second pricing the same
    token counts at the real model's sizes (where the LLM, not the encoder, is most of the
    work)."""
    from transformers import AutoConfig

    from experiments.benchmarks.cost_split import model_dims
    from experiments.benchmarks.training import dims_of

    return {"flops": dims_of(AutoConfig.from_pretrained(ckpt)), "flops_7b_dims": model_dims("qwen2-audio-7b-random")}


def request_flops(dims: dict, encoded_s: float, prompt_tokens: int, cached_tokens: int, new_tokens: int) -> dict:
    """Forward FLOPs of one request at each of `dims` (`cost_dims`): the encoder over the
    `encoded_s` seconds of audio it encodes (one piece), the LLM over the prompt tokens vLLM did not find cached, then its
    decoding (experiments/benchmarks/cost_split.py's arithmetic). For an update, `encoded_s`
    is the new chunk only: earlier chunks are either inside the cached prefix or in vLLM's
    encoder cache, which keeps outputs by item hash across requests until it needs the room."""
    from experiments.benchmarks.cost_split import POSITIONS_PER_S, encoder_flops, llm_flops

    positions = round(encoded_s * POSITIONS_PER_S)
    return {key: (encoder_flops(d, positions) if positions else 0.0) + llm_flops(d, prompt_tokens - cached_tokens, new_tokens, cached_tokens)
            for key, d in dims.items()}


def streaming_eval(ckpt: Path, rows: list[dict], settings: StreamSettings, long_clips: int, long_s: float,
                   rounds: int, out_dir: Path) -> dict:
    """(1) WER of the final streamed transcript vs one whole-utterance request, on `rows`, and
    their paired difference; (2) every update of `long_clips` clips of `long_s` seconds (test
    utterances joined by pauses), and the same audio so far re-sent whole each second with
    the prefix cache emptied: latency, prefill tokens and FLOPs per second of audio; (3) at
    the last partial update of one long clip, the streamed update (prefix cache warm from the
    update before) vs the whole re-send, in `rounds` alternating rounds. Writes
    streaming.json and streaming.png."""
    from vllm import SamplingParams

    from experiments.metrics import wer_cer, wer_difference
    from experiments.report import write_json_atomic
    from experiments.serving.engine import audio_request, chat_prompt, close_llm, make_llm
    from experiments.serving.long_form import demo_clips, engine_len

    report = StreamingReport(asdict(settings))
    dims = cost_dims(ckpt)
    llm = make_llm(ckpt, max_model_len=engine_len(ckpt), **streaming_engine_args(settings))
    try:
        st = StreamingTranscriber(llm, settings)
        audios = [load_audio(r["audio_filepath"]) for r in rows]
        refs = [r["text"] for r in rows]
        streamed = [st.run(in_chunks(a, settings.chunk_s))[-1].text for a in audios]
        prompt = chat_prompt(st.tokenizer)
        whole = [o.outputs[0].text.strip() for o in llm.generate([audio_request(prompt, a) for a in audios],
                                                                   SamplingParams(max_tokens=32, temperature=0), use_tqdm=False)]
        report.clean_wer = {"n_utts": len(rows), "streamed": wer_cer(refs, streamed), "whole": wer_cer(refs, whole),
                            "streamed_minus_whole": wer_difference(refs, streamed, whole),
                            "utterances": [{"id": row.get("id", row["audio_filepath"]), "ref": r, "streamed": s, "whole": w}
                                           for row, r, s, w in zip(rows, refs, streamed, whole, strict=True)]}
        clips = [a for a, _ in demo_clips(rows, long_s, long_clips, seed=1)]
        for i, clip in enumerate(clips):
            seen = 0.0
            for u in st.run(in_chunks(clip, settings.chunk_s)):
                new_s, seen = u.audio_s - seen, u.audio_s  # the audio this update encodes
                report.updates.append(dict(asdict(u), clip=i, prefill_tokens=u.prefill_tokens, encoded_s=new_s,
                                           **request_flops(dims, new_s, u.prompt_tokens, u.cached_tokens, u.new_tokens)))
            report.whole_resend += [dict(r, clip=i) for r in whole_resend(st, clip, dims)]
        report.per_second = per_second(report.updates, report.whole_resend, long_s)
        report.per_update_vs_whole = last_update_vs_whole(st, clips[0], rounds, dims)
    finally:
        close_llm(llm)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = asdict(report)
    write_json_atomic(out_dir / "streaming.json", result)
    plot_updates(report.per_second, out_dir / "streaming.png")
    return result


def resend_whole(st: StreamingTranscriber, audio: np.ndarray, dims) -> dict:
    """`audio` as one item with the prefix cache emptied, decoded to the end of the transcript
    (the final's budget): what a caller without streaming pays for a transcript of the audio
    so far."""
    from vllm import SamplingParams

    from experiments.serving.engine import audio_request, chat_prompt

    seconds = len(audio) / SAMPLE_RATE
    budget = st.settings.final_budget(seconds)
    st.llm.reset_prefix_cache()
    t0 = time.perf_counter()
    (out,) = st.llm.generate([audio_request(chat_prompt(st.tokenizer), audio)],
                             SamplingParams(max_tokens=budget, temperature=0), use_tqdm=False)
    latency = time.perf_counter() - t0
    prompt, cached, new = len(out.prompt_token_ids), int(out.num_cached_tokens or 0), len(out.outputs[0].token_ids)
    return {"audio_s": seconds, "latency_s": latency, "prompt_tokens": prompt, "cached_tokens": cached,
            "prefill_tokens": prompt - cached, "new_tokens": new, "text": out.outputs[0].text.strip(),
            "encoded_s": seconds, **request_flops(dims, seconds, prompt, cached, new)}


def whole_resend(st: StreamingTranscriber, clip: np.ndarray, dims) -> list[dict]:
    """The clip's first 1, 2, ... chunks re-sent whole, one request each (`resend_whole`)."""
    pieces = [p for p, _ in in_chunks(clip, st.settings.chunk_s)]
    return [resend_whole(st, np.concatenate(pieces[:k]), dims) for k in range(1, len(pieces) + 1)]


def _median_range(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def latency_slope(points: list[tuple[int, float, float]], n_boot: int = 1000, seed: int = 0) -> dict:
    """Least-squares slope of latency (ms) on seconds of audio, from (clip, seconds, latency_s)
    points, with a 95% interval from resampling whole clips."""
    clips = sorted({c for c, _, _ in points})
    by_clip = {c: [(x, y * 1000) for cc, x, y in points if cc == c] for c in clips}

    def slope(sample: list) -> float:
        xs, ys = zip(*[p for c in sample for p in by_clip[c]], strict=True)
        return float(np.polyfit(xs, ys, 1)[0]) if len(set(xs)) > 1 else 0.0

    rng = np.random.default_rng(seed)
    boots = [slope(list(rng.choice(clips, size=len(clips)))) for _ in range(n_boot)]
    low, high = np.percentile(boots, [2.5, 97.5])
    return {"ms_per_s": slope(clips), "ci_low": float(low), "ci_high": float(high), "clips": len(clips)}


def per_second(updates: list[dict], resent: list[dict], long_s: float) -> dict:
    """Streamed partial updates and whole re-sends side by side per second of audio (median
    and min-max over clips), the latency slopes from the 2nd second on, and at the last
    partial second the whole re-send's FLOPs and prefill over the update's, per clip."""
    streamed, whole = by_second(updates), by_second(resent)
    rows = {}
    for sec in sorted(set(streamed) & set(whole)):
        rows[sec] = {f"{name}_{key}": _median_range([u[key] * (1000 if key == "latency_s" else 1) for u in g[sec]])
                     for name, g in (("streamed", streamed), ("whole", whole))
                     for key in ("latency_s", "prefill_tokens", "new_tokens", "flops")}
    last = max(rows)
    pairs = [(u, w) for u in streamed[last] for w in whole[last] if u["clip"] == w["clip"]]
    return {
        "seconds": rows,
        "latency_slope_streamed": latency_slope([(u["clip"], u["audio_s"], u["latency_s"]) for u in updates
                                                 if not u["final"] and 2 <= round(u["audio_s"]) <= long_s]),
        "latency_slope_whole": latency_slope([(w["clip"], w["audio_s"], w["latency_s"]) for w in resent
                                              if 2 <= round(w["audio_s"]) <= long_s]),
        "at_s": last,
        "flops_ratio": _median_range([w["flops"] / u["flops"] for u, w in pairs]),
        "flops_7b_dims_ratio": _median_range([w["flops_7b_dims"] / u["flops_7b_dims"] for u, w in pairs]),
        "prefill_ratio": _median_range([w["prefill_tokens"] / max(u["prefill_tokens"], 1) for u, w in pairs]),
    }


def last_update_vs_whole(st: StreamingTranscriber, clip: np.ndarray, rounds: int, dims) -> dict:
    """The last partial update of `clip` (the prefix cache holding the update before it)
    against the same audio re-sent as one whole item with the prefix cache emptied and
    decoded to its end (`resend_whole`): latency, prefill tokens and FLOPs, A B A B ...
    `rounds` each; median and min-max of the per-round latency ratio."""
    pieces = [p for p, _ in in_chunks(clip, st.settings.chunk_s)]
    if len(pieces) < 2:
        raise ValueError("the clip must span at least two chunks")
    previous = AudioStream(st.settings)
    for p in pieces[:-1]:
        previous.push(p)
    last = AudioStream(st.settings)
    for p in pieces:
        last.push(p)
    streamed, whole = [], []
    for _ in range(rounds):
        st.llm.reset_prefix_cache()
        before = st.update(previous)  # untimed: fills the prefix cache as the stream would have
        streamed.append(st.update(last, before.text))
        whole.append(resend_whole(st, np.concatenate(pieces), dims))
    ratios = sorted(w["latency_s"] / s.latency_s for s, w in zip(streamed, whole, strict=True))
    s, w = streamed[0], whole[0]
    s_flops = request_flops(dims, s.audio_s - previous.seconds, s.prompt_tokens, s.cached_tokens, s.new_tokens)
    flops = {f"{key}_ratio": w[key] / s_flops[key] for key in dims}
    return {
        "audio_s": s.audio_s, "rounds": rounds,
        "streamed_latency_s": float(np.median([u.latency_s for u in streamed])),
        "whole_latency_s": float(np.median([u["latency_s"] for u in whole])),
        "latency_ratio": float(np.median(ratios)), "latency_ratio_min": ratios[0], "latency_ratio_max": ratios[-1],
        "streamed_prefill_tokens": s.prefill_tokens, "whole_prefill_tokens": w["prefill_tokens"],
        "streamed_new_tokens": s.new_tokens, "whole_new_tokens": w["new_tokens"],
        "prefill_ratio": w["prefill_tokens"] / max(s.prefill_tokens, 1),
        **flops,
    }


def by_second(updates: list[dict]) -> dict[int, list[dict]]:
    """Partial updates (or whole re-sends) grouped by the whole seconds of audio they cover."""
    out: dict[int, list[dict]] = {}
    for u in updates:
        if not u.get("final") and u.get("chunks", 1):
            out.setdefault(int(round(u["audio_s"])), []).append(u)
    return dict(sorted(out.items()))


def plot_updates(per_sec: dict, path: Path) -> None:
    """Per second of audio: latency, prefilled tokens and FLOPs of a streamed update against
    re-sending the whole audio so far (median and min-max over clips)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = per_sec["seconds"]
    secs = [int(s) for s in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = (("latency_s", "chunk arrival -> text (ms)", "latency per update", 1.0),
              ("prefill_tokens", "tokens prefilled (cache miss)", "prefill per update", 1.0),
              ("flops", "GFLOPs (encoder + LLM)", "compute per update", 1e-9))
    for ax, (key, ylabel, title, scale) in zip(axes, panels, strict=True):
        for name, label, marker in (("streamed", "streamed update", "o"), ("whole", "whole audio re-sent, no cache", "s")):
            m = [r[f"{name}_{key}"] for r in rows.values()]
            med = [x["median"] * scale for x in m]
            ax.errorbar(secs, med, yerr=[[a - x["min"] * scale for a, x in zip(med, m, strict=True)],
                                         [x["max"] * scale - a for a, x in zip(med, m, strict=True)]],
                        marker=marker, capsize=3, label=label)
        ax.set(xlabel="audio so far (s)", ylabel=ylabel, title=title, ylim=(0, None))
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_report(r: dict) -> str:
    """The demo's result as text: WERs and their paired difference, per second of audio the
    streamed update against the whole re-send, the slopes and ratios."""
    w, ps = r["clean_wer"], r["per_second"]
    d = w["streamed_minus_whole"]

    def ci(m: dict, key: str) -> str:
        return f"{m[key]:.1%} [{m[key + '_ci_low']:.1%}, {m[key + '_ci_high']:.1%}]"

    def mr(x: dict, fmt: str = ".0f") -> str:
        return f"{x['median']:{fmt}} [{x['min']:{fmt}}, {x['max']:{fmt}}]"

    lines = [f"final WER, {w['n_utts']} held-out utterances: streamed {ci(w['streamed'], 'wer')}  whole {ci(w['whole'], 'wer')}  "
             f"streamed - whole {d['wer_delta'] * 100:+.1f} points [{d['wer_delta_ci_low'] * 100:+.1f}, {d['wer_delta_ci_high'] * 100:+.1f}]",
             "audio s | latency ms: streamed, whole re-sent | prefill tokens: streamed, whole | GFLOPs: streamed, whole"]
    for sec, row in ps["seconds"].items():
        lines.append(f"{int(sec):>7} | {mr(row['streamed_latency_s'])}, {mr(row['whole_latency_s'])} | "
                     f"{row['streamed_prefill_tokens']['median']:.0f}, {row['whole_prefill_tokens']['median']:.0f} | "
                     f"{row['streamed_flops']['median'] * 1e-9:.3g}, {row['whole_flops']['median'] * 1e-9:.3g}")
    for name in ("streamed", "whole"):
        sl = ps[f"latency_slope_{name}"]
        lines.append(f"latency slope from 2 s, {name}: {sl['ms_per_s']:+.2f} ms per s of audio [{sl['ci_low']:+.2f}, {sl['ci_high']:+.2f}]")
    lines.append(f"at {ps['at_s']} s, whole re-sent / streamed update: FLOPs {mr(ps['flops_ratio'], '.1f')}x "
                 f"(the same tokens at 7B dims {mr(ps['flops_7b_dims_ratio'], '.1f')}x), "
                 f"prefill tokens {mr(ps['prefill_ratio'], '.1f')}x (per clip)")
    lines.append("last update vs whole audio re-sent, alternating rounds: " + json.dumps(r["per_update_vs_whole"]))
    return "\n".join(lines)


def comparison(dirs: list[Path]) -> str:
    """Markdown tables of demo results (each dir's streaming.json), one row per dir named by
    it: WER (streamed, whole, their paired difference, and the streamed transcripts paired
    with the first dir's whole-utterance ones, the base's), then the cost per update at the
    last partial second against the whole re-send."""
    from experiments.metrics import wer_difference

    results = [(Path(d).name, json.loads((Path(d) / "streaming.json").read_text())) for d in dirs]
    base = results[0][1]["clean_wer"]["utterances"]

    def ci(m: dict, key: str) -> str:
        return f"{m[key] * 100:.1f} % [{m[key + '_ci_low'] * 100:.1f}, {m[key + '_ci_high'] * 100:.1f}]"

    def delta(d: dict) -> str:
        return f"{d['wer_delta'] * 100:+.1f} [{d['wer_delta_ci_low'] * 100:+.1f}, {d['wer_delta_ci_high'] * 100:+.1f}]"

    def ratio(x: dict, fmt: str = ".1f") -> str:
        return f"{x['median']:{fmt}}x [{x['min']:{fmt}}, {x['max']:{fmt}}]"

    def slope(x: dict) -> str:
        return f"{x['ms_per_s']:+.1f} [{x['ci_low']:+.1f}, {x['ci_high']:+.1f}]"

    quality = ["| demo | chunks | streamed final WER [95 % CI] | same checkpoint, whole utterance | streamed - whole, paired [95 % CI] "
               f"| streamed - {results[0][0]}'s whole, paired |", "|---|---|---|---|---|---|"]
    cost = ["| demo | chunks | last partial | FLOPs: whole re-sent / update, the model's dims | same tokens at 7B dims | prefill tokens ratio "
            "| latency slope, update (ms per s of audio) | latency slope, whole re-sent | last update vs whole, alternating rounds: latency ratio |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results:
        w, ps, lu = r["clean_wer"], r["per_second"], r["per_update_vs_whole"]
        utts = w["utterances"]
        if [u["ref"] for u in utts] != [u["ref"] for u in base]:
            raise ValueError(f"{name}: its utterances are not {results[0][0]}'s; run every demo on the same test rows")
        paired = wer_difference([u["ref"] for u in utts], [u["streamed"] for u in utts], [u["whole"] for u in base])
        chunks = f"{r['settings']['chunk_s']:g} s"
        quality.append(f"| {name} | {chunks} | {ci(w['streamed'], 'wer')} | {ci(w['whole'], 'wer')} | {delta(w['streamed_minus_whole'])} | {delta(paired)} |")
        cost.append(f"| {name} | {chunks} | {ps['at_s']} s | {ratio(ps['flops_ratio'])} | {ratio(ps['flops_7b_dims_ratio'])} | "
                    f"{ratio(ps['prefill_ratio'])} | {slope(ps['latency_slope_streamed'])} | {slope(ps['latency_slope_whole'])} | "
                    f"{lu['latency_ratio']:.2f}x [{lu['latency_ratio_min']:.2f}, {lu['latency_ratio_max']:.2f}] |")
    return "\n".join(quality) + "\n\n" + "\n".join(cost)


@hydra.main(config_path="../../conf/apps", config_name="streaming", version_base=None)
def main(cfg: DictConfig) -> None:
    from experiments.data import read_manifest
    from experiments.serving.engine import close_llm, make_llm
    from experiments.serving.long_form import engine_len
    from experiments.training.base import default_base, default_manifests

    if cfg.compare:
        missing = [d for d in cfg.compare if not (Path(d) / "streaming.json").is_file()]
        if missing:
            raise SystemExit(f"compare: no streaming.json in {missing}; give out_dir folders of demo=true runs")
        print(comparison([Path(d) for d in cfg.compare]))
        return
    settings = StreamSettings(**cfg.stream)
    if not cfg.demo and not cfg.files:
        raise SystemExit("give audio files (files=[a.wav]), or demo=true, or compare=[demo out_dirs]")
    model = Path(cfg.model) if cfg.model else default_base()[0]
    if cfg.demo:
        rows = read_manifest(default_manifests()["test"])[: cfg.utterances]
        r = streaming_eval(model, rows, settings, cfg.long_clips, cfg.long_s, cfg.rounds, Path(cfg.out_dir))
        print(format_report(r))
        print(f"-> {cfg.out_dir}/streaming.json, streaming.png")
        return
    llm = make_llm(model, max_model_len=engine_len(model), **streaming_engine_args(settings))
    try:
        st = StreamingTranscriber(llm, settings)
        for f in cfg.files:
            for u in st.run(in_chunks(load_audio(f), settings.chunk_s)):
                tag = "final" if u.final else f"{u.audio_s:5.1f} s"
                print(f"{f}\t{tag}\t{u.latency_s * 1000:.0f} ms\t{u.prefill_tokens}/{u.prompt_tokens} prefilled\t{u.text}")
    finally:
        close_llm(llm)


if __name__ == "__main__":
    main()
