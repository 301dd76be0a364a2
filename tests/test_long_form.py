"""Long-form transcription by segments (experiments/serving/long_form.py): cutting at pauses, and
the joined transcript through vLLM against the HF twin."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from experiments.data.audio import SAMPLE_RATE
from experiments.serving.long_form import engine_len, pause_segments, transcribe_long, with_windows


@pytest.fixture(scope="module")
def long_clip(speech_clips):
    """75 s: the eight phrases, three times over, with 0.4-1.0 s pauses; (audio, spans)."""
    rng = np.random.default_rng(0)
    parts, spans, n = [], [], 0
    for _ in range(3):
        for _, audio, _ in speech_clips:
            gap = np.zeros(int(rng.uniform(0.4, 1.0) * SAMPLE_RATE), dtype=np.float32)
            parts += [gap, audio]
            spans.append((n + len(gap), n + len(gap) + len(audio)))
            n += len(gap) + len(audio)
    assert n < 75 * SAMPLE_RATE
    parts.append(np.zeros(75 * SAMPLE_RATE - n, dtype=np.float32))
    return np.concatenate(parts), spans


def test_each_utterance_is_one_segment_in_order(long_clip):
    audio, spans = long_clip
    segments = pause_segments(audio)
    assert len(segments) == len(spans) == 24
    for (start, end), (a, b) in zip(segments, spans, strict=True):
        loud = a + np.flatnonzero(np.abs(audio[a:b]) > 0.01)  # the utterance's audible samples
        assert start <= loud[0] + 0.02 * SAMPLE_RATE and end >= loud[-1]  # nothing of it cut off
        assert end - start <= (b - a) + 0.3 * SAMPLE_RATE  # and little else
    assert all(e1 <= s2 for (_, e1), (s2, _) in itertools.pairwise(segments))


def test_long_speech_without_pauses_is_cut_to_the_window():
    t = np.arange(70 * SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    segments = pause_segments(tone, max_s=30.0)
    assert len(segments) == 3 and segments[0][0] == 0 and segments[-1][1] == len(tone)
    assert all(e - s <= 30 * SAMPLE_RATE for s, e in segments)
    assert all(e1 == s2 for (_, e1), (s2, _) in itertools.pairwise(segments))  # contiguous


def test_silence_and_empty_audio_have_no_segments():
    assert pause_segments(np.zeros(5 * SAMPLE_RATE, dtype=np.float32)) == []
    assert pause_segments(np.zeros(0, dtype=np.float32)) == []


def test_clicks_are_dropped_and_bad_samples_rejected(speech_clips):
    speech = speech_clips[0][1]
    audio = np.concatenate([speech, np.zeros(SAMPLE_RATE, np.float32), [0.5] * 40, np.zeros(800, np.float32)]).astype(np.float32)
    segments = pause_segments(audio)
    assert len(segments) == 1 and segments[0][1] <= len(speech) + 0.5 * SAMPLE_RATE  # the 2.5 ms click is gone
    with pytest.raises(ValueError, match="NaN or infinite"):
        pause_segments(np.array([0.1, np.nan] * 800, dtype=np.float32))
    with pytest.raises(ValueError, match="expected mono"):
        pause_segments(np.zeros((2, 16000), dtype=np.float32))


def test_whole_strategy_checkpoint_takes_enough_windows(tiny_base, tmp_path):
    import json

    assert with_windows(tiny_base, 30 * SAMPLE_RATE, tmp_path) == tiny_base  # one window is enough
    two = with_windows(tiny_base, 31 * SAMPLE_RATE, tmp_path)
    three = with_windows(tiny_base, 75 * SAMPLE_RATE, tmp_path)
    assert json.loads((two / "config.json").read_text())["long_audio"]["max_windows"] == 2
    assert json.loads((three / "config.json").read_text())["long_audio"]["max_windows"] == 3
    assert (three / "model.safetensors").resolve() == (tiny_base / "model.safetensors").resolve()
    assert engine_len(three) == 4096  # the tiny LLM's positions, not the 8192 asked for


@pytest.mark.engine
def test_segments_transcript_is_the_twins_segment_transcripts_in_order(long_clip, tiny_base, tiny_llm):
    from experiments.serving.engine import chat_prompt
    from qwen2_audio_vllm.checkpoint import load_model, load_processor
    from qwen2_audio_vllm.hf import greedy_transcribe

    audio, _ = long_clip
    model, processor = load_model(tiny_base), load_processor(tiny_base)
    pieces = [audio[s:e] for s, e in pause_segments(audio)]
    tokens, _ = greedy_transcribe(model, processor, pieces, chat_prompt(processor.tokenizer), max_new_tokens=12)
    texts = [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    expected = " ".join(t for t in texts if t)
    (got,) = transcribe_long(tiny_llm, [audio], "segments", max_tokens=12)
    (silent,) = transcribe_long(tiny_llm, [np.zeros(SAMPLE_RATE, dtype=np.float32)], "segments")
    # the random model emits partial UTF-8 byte tokens; vLLM's incremental detokenizer and
    # tokenizer.decode render those differently ("\ufffd" or nothing), so compare without them
    readable = lambda s: " ".join(s.replace("\ufffd", "").split())  # noqa: E731
    assert len(pieces) == 24 and expected and readable(got) == readable(expected)
    assert silent == ""


@pytest.mark.engine
def test_cli_transcribes_a_long_file_whole(long_clip, tiny_base, tmp_path):
    """`python -m experiments.serving.long_form files=[FILE] strategy=whole` on a 75 s file: an engine with
    three windows starts and one line per file comes back."""
    import os
    import subprocess
    import sys

    import soundfile as sf

    path = tmp_path / "long.wav"
    sf.write(path, long_clip[0], SAMPLE_RATE, subtype="FLOAT")
    run = subprocess.run(
        [sys.executable, "-m", "experiments.serving.long_form", f"files=[{path}]", f"model={tiny_base}", "strategy=whole", "max_tokens=8"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=os.environ | {"PYTHONPATH": os.getcwd()},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith(str(path))]
    assert len(lines) == 1 and len(lines[0].split("\t")) == 2
    assert json_windows(tmp_path / "outputs" / "long_form") == [3]
    # the printed text is the whole file's transcript: the twin's greedy decoding over the
    # same three windows of the checkpoint the command derived
    from experiments.serving.engine import chat_prompt
    from qwen2_audio_vllm.checkpoint import load_model, load_processor
    from qwen2_audio_vllm.hf import greedy_transcribe

    (windowed,) = sorted((tmp_path / "outputs" / "long_form").iterdir())
    model, processor = load_model(windowed), load_processor(windowed)
    tokens, counts = greedy_transcribe(model, processor, [long_clip[0]], chat_prompt(processor.tokenizer), max_new_tokens=8)
    expected = processor.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
    assert counts[0] > 1500 and expected  # three windows' worth of audio tokens, some text
    assert lines[0].split("\t")[1] == expected


def json_windows(root):
    import json

    return [json.loads((d / "config.json").read_text())["long_audio"]["max_windows"] for d in sorted(root.iterdir())]
