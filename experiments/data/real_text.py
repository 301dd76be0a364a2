"""Real English for training: the standard library's own documentation, read aloud.

The corpus's training sentences come from a grammar of templates. A frozen pretrained LLM
behind a projector trained on them only learns to hear what the templates say: the
smollm2 base transcribes the held-out real-English split (`test_prose`, Newton's
*Opticks*) at about the WER of a base that hears nothing of it. These sentences add real
English of another author, period and subject to the train split: sentences of the
docstrings of CPython 3.11's standard library and of its language reference
(`pydoc_data.topics`), picked by the prose split's own filter (`prose.plain_sentence`:
8-18 common words, no digits, symbols or labels) and read by the training voices, with the
corpus's augmentation. No sentence of the test, dev or prose splits occurs among them
(refused when the split is built).

On by `data.real_text=true`, which a model config can set for its base with
`real_text: true`; no base does (the smollm2 base measured worse with it: docs/smollm2.md).
The sentences sit in `real_text_stdlib.txt`, made by `select_stdlib_sentences` on Python
3.11.7. Built once per corpus into the cache.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import sysconfig
from pathlib import Path

REAL_TEXT_FILE = Path(__file__).with_name("real_text_stdlib.txt")
VERSION = 1  # bump when the selection, voices or rendering change: new cache key
SKIPPED_PACKAGES = ("site-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo")


def real_text_sentences() -> list[str]:
    """The training sentences, one per line of REAL_TEXT_FILE (comment lines skipped)."""
    lines = REAL_TEXT_FILE.read_text().splitlines()
    return [x for x in lines if x.strip() and not x.startswith("#")]


def stdlib_documentation() -> list[str]:
    """The docstrings of the standard library's modules, classes and functions (its tests,
    IDLE and the GUI kits left out) and the language reference's topics, in a fixed order."""
    from pydoc_data.topics import topics

    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(lib.rglob("*.py")):
        parts = path.relative_to(lib).parts
        if parts[0] in SKIPPED_PACKAGES or "tests" in parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                if doc := ast.get_docstring(node):
                    texts.append(doc)
    return texts + [topics[k] for k in sorted(topics)]


def select_stdlib_sentences() -> list[str]:
    """The selection that made REAL_TEXT_FILE: every distinct sentence of
    `stdlib_documentation()` that `plain_sentence` keeps, from paragraphs without code
    (doctests, literal blocks, indented examples), ending in a full stop."""
    from experiments.data.prose import plain_sentence

    picked: dict[str, None] = {}
    for text in stdlib_documentation():
        for paragraph in re.split(r"\n\s*\n", text):
            if re.search(r">>>|::|^\s{4,}", paragraph, re.M):
                continue
            for sentence in re.split(r"(?<=[.?!])\s+", re.sub(r"\s+", " ", paragraph).strip()):
                if sentence.endswith(".") and (plain := plain_sentence(sentence)):
                    picked.setdefault(plain)
    return list(picked)


def real_text_key(corpus_key: str) -> str:
    parts = [VERSION, real_text_sentences(), corpus_key]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def plan_real_text(seed: int, engines: tuple[str, ...], sentences: list[str]) -> list[dict]:
    """One training row per sentence: engines in turn, a training voice, a speed and a pitch drawn."""
    from experiments.data import voiced_rows
    from experiments.data.voices import TRAIN_VOICES

    return voiced_rows("train", "train_real", sentences, TRAIN_VOICES, engines, random.Random(f"real-text-{seed}"))


def build_real_text(out_dir: Path, spec, corpus: dict[str, Path], workers: int | None = None,
                    sentences: list[str] | None = None) -> Path:
    """Render `sentences` (default: real_text_sentences()) into `out_dir` (once) with the
    corpus `spec`'s seed, engines and augmentation; the manifest of the corpus's train split
    plus them (clean and augmented). A sentence of the corpus's dev or test splits or of the
    prose split is refused."""
    from experiments.data import (
        _augmented,
        publish_splits,
        read_manifest,
        render_fresh,
        write_manifest,
    )
    from experiments.data.prose import prose_sentences

    held_out = {r["text"] for s in ("dev", "test") for r in read_manifest(corpus[s])} | set(prose_sentences())
    sentences = real_text_sentences() if sentences is None else sentences
    if overlap := sorted(set(sentences) & held_out):
        raise ValueError(f"{len(overlap)} real-text training sentences are held-out ones, e.g. {overlap[0]!r}; "
                         "drop them from experiments/data/real_text_stdlib.txt")
    if not (out_dir / ".complete").exists():
        workers = workers or os.cpu_count() or 2
        tmp, rows, dropped = render_fresh(out_dir, plan_real_text(spec.seed, spec.engines, sentences), spec.engines, workers)
        rows += _augmented(tmp, rows, "train", spec, workers)
        publish_splits(tmp, out_dir, {"real_text": rows}, dropped)
    train = out_dir / "train.jsonl"
    if not train.exists():  # the corpus's rows keep their own audio paths
        part = train.with_suffix(".part")
        write_manifest(part, read_manifest(corpus["train"]) + read_manifest(out_dir / "real_text.jsonl"))
        part.rename(train)
    return train
