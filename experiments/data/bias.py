"""Bias lists for hotword biasing, after the contextual-biasing protocol (Le et al. 2021,
"Contextualized streaming end-to-end speech recognition with trie-based deep biasing"): an
utterance's list is its own biasing words (names and rare words) plus N distractors drawn
from the same kind of words, shuffled.

Rare means rare for the model: seen fewer than RARE_COUNT times in the training
transcripts (or never). Names are the corpus's name class (experiments/data/text.py NAMES).
"""

from __future__ import annotations

import random
from collections import Counter

from experiments.data.text import NAMES

RARE_COUNT = 5  # training occurrences below which a word counts as rare
_NAMES = set(NAMES)


def word_counts(train_texts: list[str]) -> Counter:
    return Counter(w for t in train_texts for w in t.lower().split())


def bias_words(text: str, counts: Counter, rare_count: int = RARE_COUNT) -> list[str]:
    """The utterance's names and rare words, in order, once each."""
    out: list[str] = []
    for w in text.lower().split():
        if (w in _NAMES or counts[w] < rare_count) and w not in out:
            out.append(w)
    return out


def distractor_pool(counts: Counter, more: list[str] = (), rare_count: int = RARE_COUNT) -> list[str]:
    """Names, the training transcripts' rare words and `more` (e.g. the test set's biasing
    words), sorted: what distractors are drawn from."""
    return sorted(_NAMES | {w for w, n in counts.items() if n < rare_count} | set(more))


def bias_list(own: list[str], n_distractors: int, pool: list[str], rng: random.Random) -> list[str]:
    """`own` plus `n_distractors` words of `pool` not in it, shuffled."""
    taken = set(own)
    candidates = [w for w in pool if w not in taken]
    words = own + rng.sample(candidates, min(n_distractors, len(candidates)))
    rng.shuffle(words)
    return words


def bias_lists(texts: list[str], counts: Counter, n_distractors: int, pool: list[str], seed: int = 0) -> list[list[str]]:
    """Every utterance's list with `n_distractors` distractors (deterministic in `seed`); an
    utterance without biasing words gets distractors only (an empty list when N = 0)."""
    return [bias_list(bias_words(t, counts), n_distractors, pool, random.Random(f"{seed}-{i}"))
            for i, t in enumerate(texts)]
