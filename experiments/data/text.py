"""Open-vocabulary sentences for the synthetic corpus.

Words come from `wordfreq` (English frequency list, shipped in the wheel) classed by part of
speech with `lemminflect` (its lexicon is shipped too), so nothing is downloaded. A small
grammar of templates puts them into sentences that read as English ("the quiet mountains
collected two lamps near the station"); names and numbers (spoken as words, digit strings
too) are categories of their own. Words are drawn as often as they
occur in text (wordfreq's frequencies), so common words recur and the corpus still spans
about 3,000 distinct words, 4 % of the test words unseen in training.

`sentences_for_splits` never lets a dev or test sentence occur in training.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

DIGITS = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
NAMES = """anna peter maria john lucy david sarah tom emma james olivia daniel sophie michael laura
robert alice thomas grace william hannah george chloe henry julia oliver ruth samuel clara
jack helen lucas nora simon irene victor paula martin rosa oscar diana felix elena hugo
marta adam ella kevin nina brian amy frank lily steven kate ivan mia leo zoe carlos""".split()
PLACES = ["the station", "the market", "the office", "the park", "the river", "the school", "the hospital",
          "the library", "the airport", "the village", "the garden", "the harbour", "the bridge", "the museum"]
PREPOSITIONS = "near behind under above beside inside from into across without".split()
TIMES = ["today", "yesterday", "tomorrow", "last night", "this morning", "every week", "on monday",
         "on friday", "in june", "in october", "at noon", "after dinner"]
PRONOUNS = ["she", "he", "they", "we", "i"]
MODALS = "can will should must might could would".split()
# Function words and modals that lemminflect also lists as verbs or nouns.
STOP = set(MODALS) | set("""shall may does did done doing have has had having make made get got going been being
was were are was be is said says well like over back right down last best long better own just even still
more most much many very such only also then than that this these those there here what which who whom
why how when where while about after before above below under off out one two three first second
none else ever never other another same each every both either neither rather quite
i me my mine you your yours he him his she her hers it its we us our they them their everything
something anything nothing everyone someone anyone nobody""".split())
# Kept out of generated text.
BLOCKED = set("""porn sex sexy fuck fucking shit damn hell bitch ass dick cock pussy nude naked gay kill
killed killing murder rape drug drugs gun guns nazi slave""".split())

Pos = str  # NOUN | VERB | ADJ | ADV
WEIGHT_EXPONENT = 1.0  # word weights: frequency ** this (1: as often as in text)


@functools.cache
def lexicon(size: int = 12000) -> dict[Pos, tuple[list[str], list[float]]]:
    """{part of speech: (words, sampling weights)} from the `size` most frequent English words.

    A word joins a class only when that is its one open-class reading (a noun that is not
    also a verb, adjective or adverb, and so on), so templates read as sentences."""
    import lemminflect
    import wordfreq

    classes: dict[Pos, tuple[list[str], list[float]]] = {p: ([], []) for p in ("NOUN", "VERB", "ADJ", "ADV")}
    for word in wordfreq.top_n_list("en", size):
        if len(word) < 3 or not (word.isascii() and word.isalpha()) or word in STOP or word in BLOCKED:
            continue
        readings = {pos for pos, lemmas in lemminflect.getAllLemmas(word).items() if word in lemmas}
        readings &= set(classes)
        if len(readings) == 1:
            pos = readings.pop()
            if not _regular(word, pos):
                continue
            words, weights = classes[pos]
            words.append(word)
            weights.append(wordfreq.word_frequency(word, "en") ** WEIGHT_EXPONENT)
    return classes


def _regular(word: str, pos: Pos) -> bool:
    """Drops words a template would garble: nouns without a distinct plural (mass nouns,
    plurals listed as lemmas), verbs without a past form, adverbs not in -ly."""
    import lemminflect

    if pos == "NOUN":
        plural = lemminflect.getInflection(word, tag="NNS")
        return bool(plural) and plural[0] != word and not word.endswith("s")
    if pos == "VERB":
        return bool(lemminflect.getInflection(word, tag="VBD"))
    return pos != "ADV" or word.endswith("ly")


def inflect(word: str, tag: str) -> str:
    """lemminflect's inflection (NNS plural, VBD past, VBZ third person), the word if none."""
    import lemminflect

    forms = lemminflect.getInflection(word, tag=tag)
    return forms[0] if forms else word


def number_words(n: int) -> str:
    """0 <= n < 1000 as English words ("three hundred and twelve")."""
    if n < 10:
        return DIGITS[n]
    if n < 20:
        return TEENS[n - 10]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens - 2] + ("" if ones == 0 else " " + DIGITS[ones])
    hundreds, rest = divmod(n, 100)
    return f"{DIGITS[hundreds]} hundred" + ("" if rest == 0 else f" and {number_words(rest)}")


class Grammar:
    """Sentences of 4-11 words from templates over the lexicon."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.lex = lexicon()
        self._templates = self.templates()

    def word(self, pos: Pos) -> str:
        words, weights = self.lex[pos]
        return self.rng.choices(words, weights)[0]

    def noun(self) -> str:
        return self.word("NOUN")

    def nouns(self) -> str:
        return inflect(self.noun(), "NNS")

    def verb(self) -> str:
        return self.word("VERB")

    def past(self) -> str:
        return inflect(self.verb(), "VBD")

    def adj(self) -> str:
        return self.word("ADJ")

    def a(self, phrase: str) -> str:
        return ("an " if phrase[0] in "aeiou" else "a ") + phrase

    def count(self) -> str:
        return number_words(self.rng.choice([self.rng.randrange(2, 20), self.rng.randrange(20, 1000)]))

    def name(self) -> str:
        return self.rng.choice(NAMES)

    def pick(self, options: list[str]) -> str:
        return self.rng.choice(options)

    def templates(self) -> list[Callable[[], str]]:
        r = self
        return [
            lambda: f"the {r.adj()} {r.noun()} {r.past()} the {r.noun()}",
            lambda: f"{r.name()} {r.past()} {r.count()} {r.nouns()} {r.pick(PREPOSITIONS)} the {r.noun()}",
            lambda: f"we {r.pick(MODALS)} {r.verb()} the {r.noun()} {r.word('ADV')}",
            lambda: f"{r.name()} said the {r.noun()} was {r.adj()}",
            lambda: f"there are {r.count()} {r.adj()} {r.nouns()} in {r.pick(PLACES)}",
            lambda: f"{r.pick(['she', 'he'])} {inflect(r.verb(), 'VBZ')} {r.a(r.noun())} for {r.name()}",
            lambda: f"my number is {' '.join(r.pick(DIGITS) for _ in range(r.rng.randint(3, 6)))}",
            lambda: f"did you {r.verb()} the {r.adj()} {r.noun()} {r.pick(TIMES)}",
            lambda: f"the {r.nouns()} {r.past()} {r.word('ADV')} {r.pick(TIMES)}",
            lambda: f"{r.name()} and {r.name()} {r.past()} {r.count()} {r.nouns()}",
            lambda: f"{r.pick(PRONOUNS)} found {r.a(r.adj() + ' ' + r.noun())} {r.pick(PREPOSITIONS)} {r.pick(PLACES)}",
            lambda: f"meet {r.name()} at {r.pick(PLACES)} at {number_words(r.rng.randrange(1, 13))} {r.pick(['am', 'pm', 'o clock'])}",
        ]

    def sentence(self) -> str:
        return self.rng.choice(self._templates)()


def sentences_for_splits(seed: int, counts: dict[str, int]) -> dict[str, list[str]]:
    """{split: sentences} with no sentence shared between splits (nor repeated within one)."""
    grammar = Grammar(random.Random(seed))
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for split, n in counts.items():
        out[split] = []
        while len(out[split]) < n:
            s = grammar.sentence()
            if s not in seen:
                seen.add(s)
                out[split].append(s)
    return out


def vocabulary(sentences: list[str]) -> set[str]:
    return {w for s in sentences for w in s.split()}
