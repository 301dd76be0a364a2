"""Streaming (experiments/serving/streaming.py): chunking, bad input, and through a real vLLM
engine the prefix-cache reuse, the HF twin's decoding of the same chunked layout, and
isolation between streams."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.data.audio import SAMPLE_RATE, AudioError
from experiments.serving.streaming import (
    AudioStream,
    StreamSettings,
    answer_prefix,
    in_chunks,
    joined,
)
from qwen2_audio_vllm import windows


def test_chunks_are_the_windows_of_split_without_overlap():
    audio = np.arange(10_500, dtype=np.float32)
    pieces = windows.chunks(audio, 4000)
    assert [len(p) for p in pieces] == [4000, 4000, 2500]
    np.testing.assert_array_equal(np.concatenate(pieces), audio)
    assert [len(p) for p in windows.chunks(audio[:4000], 4000)] == [4000]


def test_stream_emits_fixed_pieces_whatever_the_push_sizes():
    s = AudioStream(StreamSettings(chunk_s=0.5))
    audio = np.random.default_rng(0).standard_normal(int(1.7 * SAMPLE_RATE)).astype(np.float32) * 0.1
    added = [s.push(audio[a:b]) for a, b in ((0, 3000), (3000, 11000), (11000, 20000), (20000, len(audio)))]
    assert added == [0, 1, 1, 1] and s.seconds == pytest.approx(1.7)
    s.end()
    assert [len(p) for p in s.pieces] == [8000, 8000, 8000, 3200]
    np.testing.assert_array_equal(np.concatenate(s.pieces), audio)


def test_stream_resamples_a_constant_rate_and_pads_a_tiny_tail():
    s = AudioStream(StreamSettings(chunk_s=1.0))
    assert s.push(np.zeros((48000, 2), dtype=np.float32), 48000) == 1  # stereo 48 kHz: downmixed, resampled
    s.push(np.zeros(100, dtype=np.float32), 48000)
    s.end()
    assert len(s.pieces[0]) == SAMPLE_RATE and len(s.pieces[1]) == int(0.05 * SAMPLE_RATE)  # padded to the minimum


@pytest.mark.parametrize("bad, message", [
    (lambda s: s.push(np.zeros(0, dtype=np.float32)), "empty chunk"),
    (lambda s: s.push(np.zeros(800, dtype=np.float32), 8000), "started at 16000 Hz"),
    (lambda s: s.push(np.full(800, np.nan, dtype=np.float32)), "finite"),
    (lambda s: s.push(np.zeros(10 * SAMPLE_RATE, dtype=np.float32)), "exceed 3 chunks"),
])
def test_bad_chunks_are_refused_and_the_stream_is_unchanged(bad, message):
    s = AudioStream(StreamSettings(chunk_s=1.0, max_chunks=3))
    s.push(np.zeros(SAMPLE_RATE + 10, dtype=np.float32))
    with pytest.raises(AudioError, match=message):
        bad(s)
    assert len(s.pieces) == 1 and s.seconds == pytest.approx((SAMPLE_RATE + 10) / SAMPLE_RATE)
    s.end()
    with pytest.raises(AudioError, match="has ended"):
        s.push(np.zeros(100, dtype=np.float32))


def test_a_stream_without_audio_cannot_end():
    with pytest.raises(AudioError, match="without any audio"):
        AudioStream(StreamSettings()).end()


def test_answer_prefix_keeps_all_but_the_unstable_words():
    assert answer_prefix("open the red door", 2) == "open the"
    assert answer_prefix("open the", 2) == "" and answer_prefix("", 2) == ""
    assert joined("open the", " red  door") == "open the red door" and joined("", "open") == "open"


# One setting for the engine tests below, and one engine with its arguments for both (an
# engine start costs tens of seconds). The first test runs first (file order) and so starts
# its first stream on a fresh engine.
STREAM = StreamSettings(chunk_s=0.5, max_chunks=12, partial_tokens=6, final_tokens_per_s=4)


@pytest.fixture(scope="module")
def stream_llm(tiny_base):
    from experiments.serving.engine import close_llm, make_llm
    from experiments.serving.streaming import streaming_engine_args

    llm = make_llm(tiny_base, **streaming_engine_args(STREAM))
    yield llm
    close_llm(llm)


@pytest.mark.engine
def test_streaming_reuses_the_prefix_cache_and_decodes_as_the_twin(speech_clips, tiny_base, stream_llm):
    """Through vLLM: (1) from the 2nd update on, the prefix cache covers all but the new
    chunk, the instruction and the answer prefix (whole blocks of the previous prompt), as
    vLLM's own counters say, and the encoder runs on the new chunk only; (2) the final transcript equals the HF twin's greedy decoding
    of the same chunked layout; (3) a stream whose source breaks keeps its partials, marked
    not final, and leaves nothing behind: the next stream's updates equal those of the
    engine's first stream, when it was fresh."""
    from experiments.serving.engine import EncoderProbe, chat_prompt
    from experiments.serving.streaming import BLOCK_SIZE, StreamingTranscriber
    from qwen2_audio_vllm.checkpoint import load_model, load_processor
    from qwen2_audio_vllm.hf import greedy_transcribe

    settings, llm = STREAM, stream_llm
    audio = np.concatenate([a for _, a, _ in speech_clips[:3]])[: int(3.2 * SAMPLE_RATE)]
    chunks = in_chunks(audio, settings.chunk_s)

    def broken():
        yield from chunks[:3]
        raise ConnectionError("caller hung up")

    st = StreamingTranscriber(llm, settings)
    tok = st.tokenizer
    llm.apply_model(EncoderProbe())  # installs the probe
    updates = st.run(chunks)  # the fresh engine's first stream
    (encoder_calls,) = llm.apply_model(EncoderProbe())
    counters = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:prefix_cache")}
    cut = st.run(broken())
    again = st.run(chunks)

    assert [u.chunks for u in updates] == [1, 2, 3, 4, 5, 6, 7] and [u.final for u in updates] == [False] * 6 + [True]
    def after_audio(prefix: str) -> int:  # prompt tokens after the last <|audio_eos|>
        ids = tok(chat_prompt(tok, answer_prefix=prefix), add_special_tokens=False)["input_ids"]
        return len(ids) - ids.index(tok.convert_tokens_to_ids("<|audio_eos|>")) - 1

    for j in range(1, len(updates)):
        before = updates[j - 1]
        shared = before.prompt_tokens - after_audio(answer_prefix(updates[j - 2].text, 2) if j >= 2 else "")
        # the hit: the previous prompt up to its last chunk, in whole blocks, so what is
        # prefilled is the new chunk, the instruction and the answer prefix (+ < 1 block)
        assert updates[j].cached_tokens % BLOCK_SIZE == 0
        assert shared - BLOCK_SIZE < updates[j].cached_tokens <= before.prompt_tokens
    assert counters["vllm:prefix_cache_hits"] >= sum(u.cached_tokens for u in updates) > 0
    # the encoder ran once per chunk, one chunk a call: earlier chunks were never encoded again
    # (inside the cached prefix, or in vLLM's encoder cache when the hit ends within them)
    assert [items for items, _ in encoder_calls] == [1] * len(chunks)
    assert max(positions for _, positions in encoder_calls) <= settings.chunk // 320 + 1

    model, processor = load_model(tiny_base), load_processor(tiny_base)
    pieces = [c for c, _ in chunks]
    tokens, _ = greedy_transcribe(model, processor, [pieces], lambda n: chat_prompt(processor.tokenizer, n_audios=n),
                                  max_new_tokens=updates[-1].new_tokens)
    readable = lambda s: " ".join(s.replace("\ufffd", "").split())  # noqa: E731  (see test_long_form)
    assert readable(updates[-1].text) == readable(processor.tokenizer.decode(tokens[0], skip_special_tokens=True))

    assert [u.final for u in cut] == [False] * 3 and "caller hung up" in cut[-1].error and "not final" in cut[-1].error
    assert [(u.text, u.prompt_tokens) for u in again] == [(u.text, u.prompt_tokens) for u in updates]


@pytest.mark.engine
def test_realtime_client_against_vllm_serve(speech_clips, tiny_base, stream_llm, tmp_path):
    """mode=realtime against `vllm serve` with streaming.serve_flags: every clip gives a
    partial per chunk and a final; from the 2nd update on the server reports prefix-cache
    hits; the prompts are token for token those of the offline StreamingTranscriber; an
    unreadable file is one failed stream, not a failed run."""
    import asyncio
    import json

    from experiments.serving.client import realtime, served_model
    from experiments.serving.server import Server
    from experiments.serving.streaming import BLOCK_SIZE, StreamingTranscriber, serve_flags

    settings = STREAM
    (tmp_path / "broken.wav").write_bytes(b"RIFF not audio")
    rows = [{"audio_filepath": str(p), "text": t} for p, _, t in speech_clips[:2]]
    rows.append({"audio_filepath": str(tmp_path / "broken.wav"), "text": "x"})
    with Server(tiny_base, {"max_num_seqs": 8, **serve_flags(settings)}, log_dir=tmp_path) as server:
        async def go():
            return await realtime(server.base_url, await served_model(server.base_url), rows, settings, concurrency=2)

        result = asyncio.run(go())
    summary, streams = result["summary"], result["streams"]
    json.dumps(result)  # the report is plain JSON
    offline = [StreamingTranscriber(stream_llm, settings).run(in_chunks(a, settings.chunk_s)) for _, a, _ in speech_clips[:2]]

    for got, want, (_, audio, _) in zip(streams, offline, speech_clips, strict=False):
        assert len(got) == len(audio) // settings.chunk + 1 and got[-1]["final"]
        # hits come in whole blocks of the previous prompt's audio part (test above)
        assert got[-1]["cached_tokens"] >= BLOCK_SIZE and not any(u["error"] for u in got)
        assert [u["prompt_tokens"] for u in got] == [u.prompt_tokens for u in want]
    assert "broken.wav" in streams[2][0]["error"] and summary["failed_updates"] >= 1
    assert summary["prefill_tokens_per_update"]["mean"] < summary["prompt_tokens_per_update"]["mean"]
    assert 0 <= summary["final_wer"]["wer"] and summary["partial_latency_p95_s"] > 0
    assert summary["final_minus_whole"]["n_utts"] == 2  # the broken file is left out of the paired difference


@pytest.mark.slow
def test_chunked_cache_and_align_use_the_stream_layout(speech_clips, tiny_base, tmp_path):
    """train.chunk_s: the encoder cache holds each chunk encoded alone (what a stream's items
    are), the batcher's prompt is the stream's multi-audio prompt, and align trains on it."""
    import torch

    from experiments.serving.engine import chat_prompt
    from experiments.training.cache import encoder_frames, load_or_build
    from experiments.training.train import AlignRecipe, TextBatcher, TrainSettings, align
    from qwen2_audio_vllm.checkpoint import load_model, load_processor
    from qwen2_audio_vllm.hf import expand_audio_placeholders

    model, processor = load_model(tiny_base), load_processor(tiny_base)
    rows = [{"audio_filepath": str(p), "text": t, "duration": len(a) / SAMPLE_RATE} for p, a, t in speech_clips]
    chunk = SAMPLE_RATE // 2
    frames, lengths = load_or_build(model, processor, rows, tmp_path / "cache", chunk_samples=chunk)
    again, _ = load_or_build(model, processor, rows, tmp_path / "cache", chunk_samples=chunk)  # reused, equal
    _, a, _ = speech_clips[0]
    alone = encoder_frames(model, processor.feature_extractor, windows.chunks(a, chunk))
    assert [len(r) for r in frames] == [len(windows.chunks(x, chunk)) for _, x, _ in speech_clips]
    for got, want in zip(frames[0], alone, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)  # stored in float16
    assert all(torch.equal(x, y) for r, s in zip(frames, again, strict=True) for x, y in zip(r, s, strict=True))
    assert int(lengths[0]) == sum(f.shape[0] for f in frames[0])

    batcher = TextBatcher(processor.tokenizer, model.audio_token_id)
    batch = batcher(["open the red door"], [[3, 2, 4]])
    prompt = processor.tokenizer(chat_prompt(processor.tokenizer, n_audios=3), add_special_tokens=False)["input_ids"]
    expanded = expand_audio_placeholders(prompt, [3, 2, 4], model.audio_token_id)
    assert batch["input_ids"][0, : len(expanded)].tolist() == expanded
    assert batcher.lengths(["open the red door"], [[3, 2, 4]]) == [int(batch["attention_mask"].sum())]

    texts, recipe = [r["text"] for r in rows], AlignRecipe(init="base", chunk_s=0.5)

    def aligned(lr: float, out: str) -> dict:
        settings = TrainSettings(steps=40, batch_size=4, lr=lr, warmup=2, eval_every=40)
        return align(tiny_base, {"name": "linear", "stack": 1}, (frames, texts), (frames, texts), tmp_path / out, settings, recipe)

    untrained, trained = aligned(0.0, "lr0"), aligned(5e-3, "out")  # lr 0: the dev loss of the base's projector
    assert trained["recipe"]["chunk_s"] == 0.5 and trained["best_dev_loss"] < untrained["best_dev_loss"] - 0.05
    assert (tmp_path / "out" / "model.safetensors").exists()

    # the whole-utterance teacher: the base hears each clip whole, the student its chunks
    whole_frames, _ = load_or_build(model, processor, rows, tmp_path / "whole")
    recipe = AlignRecipe(init="base", chunk_s=0.5, kd_teacher="whole")
    with pytest.raises(ValueError, match="teacher=whole needs every training clip's frames encoded whole"):
        aligned(5e-3, "no-teacher-frames")
    settings = TrainSettings(steps=40, batch_size=4, lr=5e-3, warmup=2, eval_every=40)
    taught = align(tiny_base, {"name": "linear", "stack": 1}, (frames, texts), (frames, texts), tmp_path / "kd", settings,
                   recipe, teacher_frames=whole_frames)
    assert taught["recipe"]["kd_teacher"] == "whole" and taught["best_dev_loss"] < untrained["best_dev_loss"] - 0.05


@pytest.mark.engine
def test_demo_sets_each_update_against_the_whole_audio_resent(speech_clips, tiny_base, tmp_path):
    """streaming_eval through vLLM: per second of audio, the whole re-send finds nothing
    cached and sends the very prompt a one-chunk stream sends at 1 s; the update prefills
    and computes less than the re-send from the 2nd second on; the WER difference is the
    difference of the WERs; the JSON and the plot are written."""
    import json

    from experiments.serving.streaming import comparison, format_report, streaming_eval

    rows = [{"audio_filepath": str(p), "text": t} for p, _, t in speech_clips]
    settings = StreamSettings(chunk_s=1.0, max_chunks=8, partial_tokens=6, final_tokens_per_s=8)
    r = streaming_eval(tiny_base, rows, settings, long_clips=2, long_s=5.0, rounds=2, out_dir=tmp_path)

    assert json.loads((tmp_path / "streaming.json").read_text())["per_second"]["at_s"] == 5
    assert (tmp_path / "streaming.png").stat().st_size > 0
    assert sorted({w["clip"] for w in r["whole_resend"]}) == [0, 1]
    assert all(w["cached_tokens"] == 0 and w["prefill_tokens"] == w["prompt_tokens"] for w in r["whole_resend"])
    for clip in (0, 1):
        ups = [u for u in r["updates"] if u["clip"] == clip and not u["final"]]
        resent = [w for w in r["whole_resend"] if w["clip"] == clip]
        assert [round(u["audio_s"]) for u in ups] == [round(w["audio_s"]) for w in resent] == [1, 2, 3, 4, 5]
        assert ups[0]["prompt_tokens"] == resent[0]["prompt_tokens"]  # one chunk: the same prompt
        assert [u["encoded_s"] for u in ups] == [1.0] * 5  # costed: the new chunk's encoding only
        for u, w in list(zip(ups, resent, strict=True))[1:]:
            assert u["prefill_tokens"] < w["prefill_tokens"] and u["flops"] < w["flops"]
    ps = r["per_second"]
    assert ps["flops_ratio"]["min"] > 1 and ps["prefill_ratio"]["min"] > 1 and ps["flops_7b_dims_ratio"]["min"] > 1
    for name in ("streamed", "whole"):
        slope = ps[f"latency_slope_{name}"]
        assert slope["ci_low"] <= slope["ms_per_s"] <= slope["ci_high"] and slope["clips"] == 2
    w = r["clean_wer"]
    assert w["streamed_minus_whole"]["wer_delta"] == pytest.approx(w["streamed"]["wer"] - w["whole"]["wer"])
    assert r["per_update_vs_whole"]["audio_s"] == 5.0 and r["per_update_vs_whole"]["flops_ratio"] > 1
    assert "streamed - whole" in format_report(json.loads(json.dumps(r)))
    quality, cost = comparison([tmp_path, tmp_path]).split("\n\n")
    cells = quality.splitlines()[2].split(" | ")
    assert cells[-2] == cells[-1].rstrip(" |")  # paired with itself as the base: the same difference
    assert len(quality.splitlines()) == len(cost.splitlines()) == 4 and f"| {tmp_path.name} | 1 s | 5 s |" in cost
