"""Hotwords: the list's refusals, its tokens placed by the processor before each audio item's
tokens in vLLM exactly as the training twin places them (greedy parity), a bad list refused
without disturbing the engine, and the chat request's field through `vllm serve`; the
contextual-biasing metrics (B-WER / U-WER) and bias lists."""

from __future__ import annotations

import asyncio

import pytest

from qwen2_audio_vllm.hotwords import HOTWORDS_MAX_TOKENS, check_hotwords, hotword_ids, hotword_text


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from qwen2_audio_vllm.checkpoint import load_processor

    return load_processor(tiny_base).tokenizer


def test_bad_lists_are_refused_with_the_limit_named(tokenizer):
    assert check_hotwords(["zoe", "  new   york "]) == ["zoe", "new york"]
    assert hotword_ids(tokenizer, ["zoe"]) == tokenizer(hotword_text(["zoe"]), add_special_tokens=False)["input_ids"]
    for bad, message in (([], "empty list"), ("zoe", "must be a list"), (["--"], "no letter or digit"),
                         (["a, b"], "holds a comma"), ([3], "must be strings"),
                         (["<|AUDIO|>"], "special token"), (["ok"] * 1001, "at most 1000")):
        with pytest.raises(ValueError, match=message):
            hotword_ids(tokenizer, bad)
    with pytest.raises(ValueError, match=f"the limit is {HOTWORDS_MAX_TOKENS} tokens"):
        hotword_ids(tokenizer, ["pneumonoultramicroscopicsilicovolcanoconiosis"] * 400)


@pytest.mark.engine
def test_hotwords_reach_the_prompt_as_the_twin_places_them(tiny_base, tiny_llm, speech_clips):
    from vllm import SamplingParams

    from experiments.serving.engine import audio_request, chat_prompt
    from qwen2_audio_vllm.checkpoint import load_model, load_processor
    from qwen2_audio_vllm.hf import greedy_transcribe

    model, processor = load_model(tiny_base), load_processor(tiny_base)
    prompt = chat_prompt(processor.tokenizer)
    audios = [a for _, a, _ in speech_clips[:4]]
    words = ["david", "quinoa", "harbour"]
    params = SamplingParams(max_tokens=10, temperature=0)
    llm = tiny_llm
    plain = llm.generate([audio_request(prompt, a) for a in audios], params, use_tqdm=False)
    biased = llm.generate([audio_request(prompt, a, words) for a in audios], params, use_tqdm=False)
    with pytest.raises(ValueError, match="empty list"):
        llm.generate([audio_request(prompt, audios[0], [])], params, use_tqdm=False)
    again = llm.generate([audio_request(prompt, audios[0], words)], params, use_tqdm=False)
    prefix = hotword_ids(processor.tokenizer, words)
    bos = processor.tokenizer.convert_tokens_to_ids("<|audio_bos|>")
    hf_tokens, _ = greedy_transcribe(model, processor, audios, prompt, max_new_tokens=10, hotwords=words)
    for p, b, toks in zip(plain, biased, hf_tokens, strict=True):
        ids = list(b.prompt_token_ids)
        at = ids.index(bos) + 1
        assert ids[at : at + len(prefix)] == prefix and ids[at + len(prefix)] == model.audio_token_id
        assert len(ids) == len(p.prompt_token_ids) + len(prefix)
        assert ids.count(model.audio_token_id) == list(p.prompt_token_ids).count(model.audio_token_id)
        assert list(b.outputs[0].token_ids) == toks  # the served model sees what the twin trains on
    assert list(again[0].outputs[0].token_ids) == list(biased[0].outputs[0].token_ids)


@pytest.mark.engine
def test_hotwords_through_vllm_serve(tiny_server, speech_clips):
    """tiny_server runs with trust_request_mm_kwargs: vLLM serves per-request processor
    options only behind this flag (its guard for them)."""
    from openai import AsyncOpenAI

    from experiments.serving.client import request, served_model

    server = tiny_server
    assert server.engine["trust_request_mm_kwargs"] is True

    async def go(hotwords):
        model = await served_model(server.base_url)
        async with AsyncOpenAI(base_url=server.base_url, api_key="EMPTY") as client:
            return await request(client, model, str(speech_clips[0][0]), max_tokens=6, hotwords=hotwords)

    plain, _ = asyncio.run(go(None))
    biased, _ = asyncio.run(go(["david", "quinoa"]))
    empty, _ = asyncio.run(go([]))
    after, _ = asyncio.run(go(["david"]))
    assert plain.ok and biased.ok and after.ok, (plain.error, biased.error, after.error)
    assert biased.prompt_tokens > plain.prompt_tokens
    assert not empty.ok and empty.error.startswith("BadRequestError 400") and "empty list" in empty.error


def test_bias_lists_follow_the_protocol():
    import random

    from experiments.data.bias import (
        bias_list,
        bias_lists,
        bias_words,
        distractor_pool,
        word_counts,
    )

    counts = word_counts(["the cat sat on the mat"] * 5 + ["a quinoa salad"])
    # "a" and "quinoa" were seen once in training: rare; "the" and "cat" five times: not
    assert bias_words("Zoe saw the quinoa cat near a yak", counts) == ["zoe", "saw", "quinoa", "near", "a", "yak"]
    pool = distractor_pool(counts, ["yak"])
    assert "quinoa" in pool and "yak" in pool and "cat" not in pool and "zoe" in pool
    lists = bias_lists(["zoe saw the cat", "the cat sat"], counts, 3, pool, seed=1)
    assert sorted(set(lists[0]) & {"zoe", "saw"}) == ["saw", "zoe"] and len(lists[0]) == 5
    assert len(lists[1]) == 3 and not set(lists[1]) & {"the", "cat", "sat"}
    assert lists == bias_lists(["zoe saw the cat", "the cat sat"], counts, 3, pool, seed=1)
    assert bias_list([], 0, pool, random.Random(0)) == []


def test_biased_wer_splits_errors_between_listed_and_other_words():
    from experiments.metrics import biased_wer

    m = biased_wer(["zoe met the quinoa farmer", "hello there"], ["joe met the quinoa farmer zoe", None],
                   [["zoe", "quinoa", "yak"], ["yak"]])
    # listed words in the references: zoe, quinoa (2); zoe -> joe is a B error, the inserted "zoe" is too
    assert (m["bias_words"], m["b_errors"]) == (2, 2) and m["b_wer"] == 1.0
    # the others: met the farmer hello there (5); the failed utterance deletes hello, there
    assert (m["other_words"], m["u_errors"]) == (5, 2) and m["u_wer"] == pytest.approx(0.4)
    assert m["wer"] == pytest.approx(4 / 7)


def test_training_rows_carry_the_list_where_the_processor_puts_it(tokenizer):
    from experiments.training.train import AlignRecipe, TextBatcher, hotword_lists
    from qwen2_audio_vllm.hf import IGNORE

    audio_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    batcher = TextBatcher(tokenizer, audio_id)
    batch = batcher(["zoe went home", "zoe went home"], [5, 5], [["zoe", "yak"], None])
    prefix = hotword_ids(tokenizer, ["zoe", "yak"])
    with_list, without = batch["input_ids"][0].tolist(), batch["input_ids"][1].tolist()
    at = with_list.index(audio_id)
    assert with_list[at - len(prefix) : at] == prefix and with_list.count(audio_id) == without.count(audio_id) == 5
    assert all(v == IGNORE for v in batch["labels"][0].tolist()[: at + 5])
    assert batcher.lengths(["zoe went home"] * 2, [5, 5], [["zoe", "yak"], None]) == batch["attention_mask"].sum(1).tolist()
    texts = ["zoe saw a yak", "the cat sat", "a quinoa salad"] * 20
    lists = hotword_lists(texts, AlignRecipe(init="base", hotwords_p=0.5, hotwords_max_distractors=4), seed=0)
    assert 10 < sum(x is not None for x in lists) < 50 and all(len(x) <= 6 for x in lists if x)
    assert lists == hotword_lists(texts, AlignRecipe(init="base", hotwords_p=0.5, hotwords_max_distractors=4), seed=0)
