"""Word timestamps: the forced alignment (CTC segmentation) on posteriors with known answers,
festival's word times, the alignment head on the real Whisper tower, its refusals, and word
times through vLLM (evaluate timestamps=true) and subtitles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.timestamps import (
    ALPHABET,
    MIN_SCORE,
    align_words,
    boundary_summary,
    matched_boundaries,
    spelled,
    subtitles,
)

ROOT = Path(__file__).resolve().parents[1]
BLANK = len(ALPHABET)


def spikes(T: int, at: dict[int, str], floor: float = -12.0) -> np.ndarray:
    """(T, C) log posteriors: blank everywhere except one character at each frame of `at`."""
    lp = np.full((T, BLANK + 1), floor, np.float32)
    lp[:, BLANK] = -1e-3
    for t, ch in at.items():
        lp[t, BLANK] = floor
        lp[t, ALPHABET.index(ch)] = -1e-3
    return lp


def test_words_start_at_their_first_character_and_end_before_the_next_word():
    lp = spikes(60, {10: "a", 12: "b", 30: "c", 33: "d"})
    got = align_words(lp, "ab cd", frame_s=0.02)
    assert got["reason"] is None
    (w1, w2) = got["words"]
    assert (w1["word"], w1["start"]) == ("ab", 0.20) and (w2["word"], w2["start"]) == ("cd", 0.60)
    assert 0.24 <= w1["end"] <= 0.60 and 0.66 <= w2["end"] <= 1.2
    shifted = align_words(lp, "ab cd", frame_s=0.02, start_offset=-0.05, end_offset=0.03)["words"]
    assert shifted[0]["start"] == pytest.approx(0.15) and shifted[0]["end"] == pytest.approx(w1["end"] + 0.03)


def test_words_keep_the_transcripts_spelling_and_numbers_are_aligned_spelled_out():
    assert spelled("Twelve,") == "twelve" and spelled("12") == "twelve" and spelled("Zoe's") == "zoe's"
    assert spelled("--") == "" and spelled("%") == ""
    lp = spikes(80, {5: "t", 7: "w", 9: "e", 11: "l", 13: "v", 15: "e", 40: "o", 42: "k"})
    got = align_words(lp, "12 -- OK!", frame_s=0.02)
    assert [w["word"] for w in got["words"]] == ["12", "OK!"] and got["skipped"] == ["--"]
    assert got["words"][0]["start"] == pytest.approx(0.10) and got["words"][1]["start"] == pytest.approx(0.80)


def test_alignment_that_cannot_work_returns_no_times_and_says_why():
    lp = spikes(40, {10: "a", 12: "b"})
    assert align_words(lp, "") == {"words": [], "reason": "empty transcript", "skipped": []}
    none = align_words(lp, "-- ?!")
    assert none["words"] == [] and "no alignable words" in none["reason"]
    short = align_words(lp[:5], "a much longer transcript than five frames")
    assert short["words"] == [] and "audio too short" in short["reason"]
    wrong = align_words(lp, "zz qq")  # posteriors say "ab"
    assert wrong["words"] == [] and "does not match" in wrong["reason"] and wrong["score"] < MIN_SCORE


def test_boundary_errors_pair_words_by_text():
    ref = [{"word": "the", "start": 0.2, "end": 0.3}, {"word": "pigs", "start": 0.3, "end": 0.6},
           {"word": "fly", "start": 0.7, "end": 1.0}]
    hyp = [{"word": "The", "start": 0.22, "end": 0.31}, {"word": "figs", "start": 0.3, "end": 0.6},
           {"word": "fly.", "start": 0.65, "end": 1.1}]
    m = matched_boundaries(ref, hyp)
    assert m["matched"] == 2 and m["reference_words"] == 3
    assert m["start"] == pytest.approx([0.02, -0.05]) and m["end"] == pytest.approx([0.01, 0.1])
    s = boundary_summary(m["start"] + m["end"])
    assert s["boundaries"] == 4 and s["median_ms"] == pytest.approx(35) and s["within_50ms"] == 0.75
    assert boundary_summary([])["median_ms"] is None


def test_subtitles():
    words = [{"word": w, "start": 0.5 * i, "end": 0.5 * i + 0.4} for i, w in enumerate("one two three".split())]
    words.append({"word": "four", "start": 5.0, "end": 3661.25})  # after a pause: a new cue
    srt = subtitles(words, "srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,400\none two three\n\n2\n00:00:05,000 --> 01:01:01,250\nfour")
    vtt = subtitles(words, "vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.400\none two three")
    with pytest.raises(ValueError, match="expected srt or vtt"):
        subtitles(words, "ass")


@pytest.fixture(scope="session")
def word_times(tmp_path_factory) -> dict[str, Path]:
    """A small festival word-times set (4 calibration, 4 test clips and their noisy copies)."""
    from experiments.data.word_times import WordTimesSpec, build_word_times

    return build_word_times(tmp_path_factory.mktemp("wt") / "set", WordTimesSpec(calibration=4, test=4))


def test_festival_reports_each_words_time_in_the_audio_it_wrote(word_times):
    import soundfile as sf

    from experiments.data import read_manifest

    rows = {s: read_manifest(p) for s, p in word_times.items()}
    assert {s: len(r) for s, r in rows.items()} == {"calibration": 4, "test": 4, "test_noisy": 4}
    assert {r["voice"] for r in rows["calibration"]} == {"kal_diphone"}
    assert {r["voice"] for r in rows["test"]} == {"cmu_us_slt_arctic_hts"}
    for r in rows["test"] + rows["calibration"]:
        words = r["words"]
        assert len(words) >= len(r["text"].split()) and words[0]["word"] == r["text"].split()[0].lower()
        assert all(0 < w["start"] < w["end"] <= r["duration"] + 0.05 for w in words)
        assert all(a["end"] <= b["start"] + 1e-6 for a, b in zip(words, words[1:], strict=False))
        assert sf.info(r["audio_filepath"]).samplerate == 16000
    noisy = rows["test_noisy"][0]
    assert noisy["words"] == rows["test"][0]["words"] and noisy["augment"].endswith("@10dB")


@pytest.fixture(scope="session")
def head(tiny_base, word_times, tmp_path_factory) -> Path:
    """An alignment head on the default tower (Whisper tiny.en), trained briefly on a small
    synthetic corpus: enough to exercise every path, not to be accurate (the benchmark
    measures the real one)."""
    from experiments.data import SyntheticSpec, build_synthetic, read_manifest
    from experiments.timestamps import build_head

    d = tmp_path_factory.mktemp("head")
    m = build_synthetic(d / "syn", SyntheticSpec(seed=5, train=96, dev=2, test=2, augment=0.0), workers=2)
    return build_head(tiny_base, read_manifest(m["train"]), read_manifest(word_times["calibration"]), d / "head", epochs=2)


def test_head_block_fits_only_its_tower(tiny_base, head, tmp_path):
    from experiments.data import read_manifest
    from experiments.data.audio import load_audio
    from experiments.timestamps import Aligner, load_head

    _, meta = load_head(head)
    assert meta.upsample == 2 and meta.frame_s == pytest.approx(0.02) and meta.calibration["clips"] == 4
    aligner = Aligner(tiny_base, head)
    lp = aligner.log_probs(np.zeros(16000 * 2, np.float32) + 0.01)
    assert lp.shape == (2 * 50, len(ALPHABET) + 1)  # 2 s: 25 tower frames/s, 2 head steps per frame
    silent = aligner.words(np.zeros(16000, np.float32), "hello there")
    assert silent["words"] == [] and "silent" in silent["reason"]
    failed = aligner.words(np.zeros(16000, np.float32), None)
    assert failed["words"] == [] and "request failed" in failed["reason"]
    # a clip of 40 s is encoded window by window
    assert aligner.log_probs(np.random.default_rng(0).normal(0, 0.1, 16000 * 40).astype(np.float32)).shape[0] == 2000
    other = tmp_path / "other"
    shutil.copytree(head, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["tower"] = "0123456789abcdef"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trained on tower 0123456789abcdef, but .* tower is"):
        Aligner(tiny_base, other)
    with pytest.raises(FileNotFoundError, match="no alignment head.*install=true"):
        Aligner(tiny_base, tmp_path / "nothing")
    audio = load_audio(read_manifest(head.parent / "syn" / "test.jsonl")[0]["audio_filepath"])
    got = aligner.words(audio, "some words", offset_s=10.0)
    assert got["reason"] or all(10.0 <= w["start"] < w["end"] <= 10.0 + len(audio) / 16000 + 0.05 for w in got["words"])


@pytest.mark.engine
def test_evaluate_with_timestamps_through_vllm_and_the_block_does_not_disturb_the_engine(tiny_base, head, word_times, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in Path(tiny_base).iterdir():
        (ckpt / f.name).symlink_to(f)
    shutil.copytree(head, ckpt / "alignment")
    run = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", f"checkpoint={ckpt}", f"data.manifest={word_times['test']}",
         "timestamps=true", "max_tokens=12", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=os.environ | {"WANDB_MODE": "offline"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "word times for" in run.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    utts = [json.loads(line) for line in (tmp_path / "run" / "utterances.jsonl").read_text().splitlines()]
    assert metrics["timestamps"]["clips"] == 4 and len(utts) == 4
    for u in utts:
        assert isinstance(u["words"], list)
        if u["words"]:
            assert u["words_reason"] is None
            assert all(0 <= w["start"] < w["end"] <= u["duration"] + 0.05 for w in u["words"])
        else:
            assert u["words_reason"]


def test_long_form_pieces_are_aligned_on_the_clips_time_line(tiny_base, head):
    from experiments.data import read_manifest
    from experiments.data.audio import load_audio
    from experiments.serving.long_form import piece_words
    from experiments.timestamps import Aligner

    row = read_manifest(head.parent / "syn" / "test.jsonl")[0]
    audio = load_audio(row["audio_filepath"])
    gap = np.zeros(16000, np.float32)
    long = np.concatenate([audio, gap, audio])
    aligner = Aligner(tiny_base, head)
    alone = aligner.words(audio, row["text"])
    n, second = len(audio), len(audio) + len(gap)
    got = piece_words(aligner, long, [(0, n, row["text"]), (n, second, ""), (second, len(long), row["text"])])
    if alone["words"]:  # the briefly trained head may fail to align; then both pieces say so
        assert len(got["words"]) == 2 * len(alone["words"])
        shift = second / 16000
        for a, b in zip(alone["words"], got["words"][len(alone["words"]):], strict=True):
            assert b["start"] == pytest.approx(a["start"] + shift, abs=1e-3) and b["word"] == a["word"]
    else:
        assert got["words"] == [] and got["reason"] and len(got["pieces_not_aligned"]) == 2
