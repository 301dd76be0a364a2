"""The real-English test splits: `test_prose` and `test_prose_noisy`.

The corpus's own sentences come from a grammar of templates, so a base whose LLM learnt
them can score well on `test` and still fail on English it never saw. These splits read
real sentences instead: 100 sentences of Isaac Newton's *Opticks* (4th edition, 1730;
public domain, the Project Gutenberg text), read by the test voices (never heard in
training), clean and with noise at the corpus's `noisy_snr_db` (white and babble in turn).

The sentences sit in `prose_opticks.txt`, made by `select_sentences` from the book's text:
sentences of 8-18 words with no digits, symbols, figure letters or capitalised labels,
normalised as the corpus is (lower case, no punctuation), the period's "-'d" endings
spelled "-ed", and every word a common modern English one (wordfreq Zipf >= 2.5); then
100 drawn with seed 0. No sentence of them occurs in the training or dev transcripts
(checked when the splits are built). Built once per corpus into the cache, beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

PROSE_FILE = Path(__file__).with_name("prose_opticks.txt")
PROSE_SPLITS = ("test_prose", "test_prose_noisy")
VERSION = 1  # bump when the selection, voices or rendering change: new cache key
SHORT_WORDS = set("a i an as at be by do go he if in is it me my no of on or so to up us we".split())
ABBREVIATIONS = ("prop", "fig", "exper", "obs")


def prose_sentences() -> list[str]:
    """The split's sentences, one per line of PROSE_FILE (comment lines skipped)."""
    lines = PROSE_FILE.read_text().splitlines()
    return [x for x in lines if x.strip() and not x.startswith("#")]


def select_sentences(book: str, n: int = 100, seed: int = 0) -> list[str]:
    """The selection that made PROSE_FILE from the book's plain text (module docstring)."""
    body = book[book.find("Tracts publish"):]  # from the Advertisements on: the front matter is titles
    body = re.sub(r"\s+", " ", re.sub(r"\[[^\]]*\]", " ", body).replace("_", ""))  # footnotes, italics
    picked: list[str] = []
    for sentence in re.split(r"(?<=[.?!])\s+", body):
        text = plain_sentence(sentence)
        if text and text not in picked:
            picked.append(text)
    return random.Random(seed).sample(picked, n)


def plain_sentence(sentence: str) -> str | None:
    """`sentence` normalised as the corpus is (lower case, no punctuation, "-'d" spelled
    "-ed"), or None unless it is 8-18 words of plain common English: no digits or symbols,
    no figure letters or capitalised labels, every word wordfreq Zipf >= 2.5."""
    import wordfreq

    if re.search(r"[0-9&*|/\\()\[\]{}=+<>@#$%^~\"]", sentence):
        return None
    if not re.fullmatch(r"[A-Za-z\s]+", re.sub(r"[,;:.?!'-]", " ", sentence)):
        return None
    words = re.findall(r"[A-Za-z']+", sentence)
    if not 8 <= len(words) <= 18:
        return None
    if any(len(w) == 1 and w.lower() not in ("a", "i") for w in words) or any(w.isupper() and len(w) > 1 for w in words):
        return None  # figure letters ("the Line AB") and labels
    text = re.sub(r"(\w)'d\b", r"\1ed", " ".join(w.lower() for w in re.findall(r"[A-Za-z]+(?:'[a-z]+)?", sentence)))
    tokens = text.split()
    if any(len(w) <= 2 and w not in SHORT_WORDS for w in tokens) or tokens[-1] in ABBREVIATIONS:
        return None
    if "'" in text or any(wordfreq.zipf_frequency(w, "en") < 2.5 for w in tokens):
        return None
    return text


def prose_key(seed: int, engines: tuple[str, ...], noisy_snr_db: float) -> str:
    parts = [VERSION, prose_sentences(), seed, list(engines), noisy_snr_db]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def plan_prose(seed: int, engines: tuple[str, ...]) -> list[dict]:
    """One clean row per sentence: engines in turn, a test voice, a speed and a pitch drawn."""
    from experiments.data import voiced_rows
    from experiments.data.voices import TEST_VOICES

    return voiced_rows("test_prose", "test_prose", prose_sentences(), TEST_VOICES, engines, random.Random(f"prose-{seed}"))


def build_prose(out_dir: Path, spec, train_manifests: list[Path], workers: int | None = None) -> dict[str, Path]:
    """Render the prose splits into `out_dir` (once) with the corpus `spec`'s seed, engines
    and noise; {split: manifest}. A sentence found in `train_manifests` is refused."""
    from experiments.data import _augmented, publish_splits, read_manifest, render_fresh

    seen = {r["text"] for m in train_manifests for r in read_manifest(m)}  # every corpus that uses the split
    if overlap := sorted(set(prose_sentences()) & seen):
        raise ValueError(f"{len(overlap)} prose sentences occur in training, e.g. {overlap[0]!r}; the prose split "
                         "must be unseen: drop them from experiments/data/prose_opticks.txt")
    manifests = {s: out_dir / f"{s}.jsonl" for s in PROSE_SPLITS}
    if (out_dir / ".complete").exists():
        return manifests
    workers = workers or os.cpu_count() or 2
    tmp, rows, dropped = render_fresh(out_dir, plan_prose(spec.seed, spec.engines), spec.engines, workers)
    by_split = {"test_prose": rows, "test_prose_noisy": _augmented(tmp, rows, "test_prose_noisy", spec, workers)}
    publish_splits(tmp, out_dir, by_split, dropped)
    return manifests
