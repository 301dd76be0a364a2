"""Synthetic speech manifests, LibriSpeech layout, manifest schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from experiments.data import (
    SyntheticSpec,
    build_synthetic,
    librispeech_manifest,
    plan_synthetic,
    read_manifest,
)

SMALL = SyntheticSpec(seed=3, train=24, dev=4, test=8)


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("syn") / "data", SMALL, workers=2)


def test_manifest_schema_and_audio(small_synthetic):
    for split, n in (("train", 24), ("dev", 4), ("test", 8)):
        rows = read_manifest(small_synthetic[split])
        assert len(rows) == n
        for row in rows:
            audio, sr = sf.read(row["audio_filepath"])
            assert sr == 16000 and audio.ndim == 1
            assert row["duration"] == pytest.approx(len(audio) / sr, abs=1e-3)
            assert 0.3 < row["duration"] < 6 and 2 <= len(row["text"].split()) <= 6
            assert np.abs(audio).max() > 0.01  # speech, not silence


def test_test_voices_never_heard_in_training(small_synthetic):
    voices = {s: {r["voice"] for r in read_manifest(small_synthetic[s])} for s in ("train", "dev", "test")}
    assert voices["test"] and not voices["test"] & (voices["train"] | voices["dev"])


def test_deterministic_and_cached(small_synthetic, tmp_path):
    assert list(plan_synthetic(SMALL)) == list(plan_synthetic(SMALL))
    assert list(plan_synthetic(SMALL)) != list(plan_synthetic(SyntheticSpec(seed=4, train=24, dev=4, test=8)))
    before = small_synthetic["train"].stat().st_mtime_ns
    again = build_synthetic(small_synthetic["train"].parent, SMALL)
    assert again == small_synthetic and again["train"].stat().st_mtime_ns == before


def test_librispeech_layout(tmp_path, speech_clips):
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "121" / "4567"
    chapter.mkdir(parents=True)
    lines = []
    for i, (_, audio, text) in enumerate(speech_clips[:3]):
        sf.write(chapter / f"121-4567-{i:04d}.flac", audio, 16000)
        lines.append(f"121-4567-{i:04d} {text.upper()}")
    (chapter / "121-4567.trans.txt").write_text("\n".join(lines) + "\n")
    out = librispeech_manifest(tmp_path / "LibriSpeech" / "test-clean", tmp_path / "ls.jsonl")
    rows = read_manifest(out)
    assert [r["text"] for r in rows] == [t for _, _, t in speech_clips[:3]]
    assert rows[0]["duration"] == pytest.approx(len(speech_clips[0][1]) / 16000, abs=1e-3)
    with pytest.raises(FileNotFoundError, match="LibriSpeech layout"):
        librispeech_manifest(tmp_path / "empty", tmp_path / "x.jsonl")


def test_manifest_missing_keys_rejected(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"audio_filepath": "a.wav", "text": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"lacks \['duration'\]"):
        read_manifest(p)
