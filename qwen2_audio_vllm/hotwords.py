"""Hotwords: words a request asks the model to favour (names, rare words), placed in the
prompt by the processor's prompt update, right after <|audio_bos|> and before the clip's
audio tokens:

    <|audio_bos|>Hotwords: zoe, harbour, quinoa
    <|AUDIO|> x N<|audio_eos|>

A request carries them as `mm_processor_kwargs={"hotwords": [...]}` (offline: a key of the
prompt dict; `vllm serve`: a field of the chat request body, `extra_body` in the OpenAI
client), and the list applies to every audio item of the request. The training twin
(hf.py) builds the same tokens with `hotword_ids`, so what the align stage teaches
(experiments/training: `train.hotwords`) is what vLLM serves.

Refused with the limit named: an empty list, a list past HOTWORDS_MAX_TOKENS tokens, a word
with nothing but punctuation, a word with a comma or a line break (they delimit the list),
a word holding a special token (<|AUDIO|> would add an audio placeholder), and a word the
tokenizer cannot encode and decode back.
"""

from __future__ import annotations

from collections.abc import Sequence

HOTWORDS_KEY = "hotwords"
HOTWORDS_MAX_TOKENS = 3000  # 500 distractors of the synthetic corpus take ~2,600 tokens on the tiny tokenizer
HOTWORDS_MAX_WORDS = 1000
PREFIX = "Hotwords: "
SEPARATOR = ", "
SUFFIX = "\n"


def hotword_text(words: Sequence[str]) -> str:
    return PREFIX + SEPARATOR.join(words) + SUFFIX


def check_hotwords(words: object) -> list[str]:
    """The list as strings, or a ValueError saying what a list must be."""
    if isinstance(words, str) or not isinstance(words, Sequence):
        raise ValueError(f"hotwords must be a list of strings, e.g. [\"zoe\", \"harbour\"]; got {type(words).__name__}")
    if len(words) == 0:
        raise ValueError("hotwords is an empty list: leave it out, or give 1 to "
                         f"{HOTWORDS_MAX_WORDS} words ({HOTWORDS_MAX_TOKENS} tokens at most)")
    if len(words) > HOTWORDS_MAX_WORDS:
        raise ValueError(f"hotwords has {len(words)} words; at most {HOTWORDS_MAX_WORDS} "
                         f"({HOTWORDS_MAX_TOKENS} tokens) fit")
    out = []
    for w in words:
        if not isinstance(w, str):
            raise ValueError(f"hotwords must be strings; got {w!r}")
        w = " ".join(w.split())
        if not any(c.isalnum() for c in w):
            raise ValueError(f"hotword {w!r} has no letter or digit; give words, not punctuation")
        if "," in w or "\n" in w:
            raise ValueError(f"hotword {w!r} holds a comma, which separates the words of the list; give it as two words")
        out.append(w)
    return out


def hotword_ids(tokenizer, words: object) -> list[int]:
    """The tokens the prompt gets for `words` (validated: see the module docstring)."""
    words = check_hotwords(words)
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if special & set(ids):
            raise ValueError(f"hotword {w!r} holds a special token of the model ({tokenizer.decode(sorted(special & set(ids)))}); "
                             "give plain words")
        if not ids or (unk is not None and unk in ids) or tokenizer.decode(ids).strip() != w:
            raise ValueError(f"hotword {w!r} cannot be encoded by this model's tokenizer (it decodes as "
                             f"{tokenizer.decode(ids)!r}); give it in characters the tokenizer knows")
    ids = tokenizer(hotword_text(words), add_special_tokens=False)["input_ids"]
    if len(ids) > HOTWORDS_MAX_TOKENS:
        raise ValueError(f"hotwords take {len(ids)} tokens; the limit is {HOTWORDS_MAX_TOKENS} tokens: "
                         "give fewer or shorter words")
    return ids
