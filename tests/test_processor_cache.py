"""vLLM's processor cache stores each audio item's processed output under the item's hash,
so that output must be a function of the item alone. Checked as vLLM's own
tests/models/multimodal/processing/test_common.py does: the same random requests (1-3
clips of mixed lengths and sample rates, repeated items, random text) through a processor
without a cache and one with the processor-only cache must give identical prompts and
identical item tensors."""

from __future__ import annotations

import json
import random

import librosa
import numpy as np
import pytest
import torch

from qwen2_audio_vllm.derive import derive_checkpoint

RATES = (8000, 16000, 22050, 44100)
SECONDS = (0.4, 1.3, 2.9, 7.0, 12.5)


def _processor(ckpt, cache: bool):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.cache.base import MultiModalProcessorOnlyCache

    config = ModelConfig(model=str(ckpt), dtype="float32", max_model_len=4096, limit_mm_per_prompt={"audio": 3})
    return MULTIMODAL_REGISTRY.create_processor(config), (MultiModalProcessorOnlyCache(config) if cache else None)


def _apply(processor, cache, prompt_ids: list[int], audios) -> dict:
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    items = processor.info.parse_mm_data({"audio": audios})
    return processor.apply(ProcessorInputs(prompt=prompt_ids, mm_data_items=items, cache=cache), TimingContext())


def _item_tensors(result) -> list[dict[str, torch.Tensor]]:
    return [item.get_data() for item in result["mm_kwargs"]["audio"]]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def clips(speech_clips) -> list[tuple[np.ndarray, int]]:
    """Real speech at mixed lengths, resampled to mixed rates (what users upload)."""
    speech = np.concatenate([a for _, a, _ in speech_clips])
    out = []
    for i, (seconds, rate) in enumerate(zip(SECONDS * 2, RATES * 3, strict=False)):
        audio = np.resize(np.roll(speech, 3000 * i), round(seconds * 16000)).astype(np.float32)
        out.append((librosa.resample(audio, orig_sr=16000, target_sr=rate) if rate != 16000 else audio, rate))
    return out


@pytest.mark.parametrize("long_audio", [None, {"max_windows": 2}], ids=["one-window", "long-audio"])
def test_cached_and_uncached_processing_agree(long_audio, tiny_base, clips, tmp_path):
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    ckpt = derive_checkpoint(tiny_base, {"name": "linear", "stack": 2}, tmp_path / "ckpt", seed=0)
    if long_audio:
        cfg = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**cfg, "long_audio": long_audio}))
    plain, _ = _processor(ckpt, cache=False)
    cached, cache = _processor(ckpt, cache=True)
    tokenizer = plain.info.get_tokenizer()
    rng = random.Random(0)
    words = "transcribe the audio please and say what was heard in it".split()
    hits = 0
    seen: set[int] = set()
    for _ in range(24):
        picked = rng.sample(range(len(clips)), rng.randint(1, 3))
        hits += sum(i in seen for i in picked)
        seen.update(picked)
        parts = "".join(f"Audio {k + 1}: <|audio_bos|><|AUDIO|><|audio_eos|>\n" for k in range(len(picked)))
        text = parts + " ".join(rng.sample(words, rng.randint(1, len(words))))
        prompt_ids = tokenizer.encode(text)
        audios = [clips[i] for i in picked]
        baseline = _apply(plain, None, prompt_ids, audios)
        result = _apply(cached, cache, prompt_ids, audios)
        assert result["prompt_token_ids"] == baseline["prompt_token_ids"]
        for k, (want, got) in enumerate(zip(_item_tensors(baseline), _item_tensors(result), strict=True)):
            assert want.keys() == got.keys()
            for key in want:
                assert _same(want[key], got[key]), f"request {picked}, item {k}: {key} differs with the cache"
    assert hits >= 10  # the cache was really exercised


def test_an_items_features_do_not_depend_on_its_neighbours(tiny_base, clips):
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    plain, _ = _processor(tiny_base, cache=False)
    tokenizer = plain.info.get_tokenizer()
    short, long = clips[0], clips[3]  # 0.4 s at 8 kHz, 7.0 s at 44.1 kHz
    one = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    alone = _item_tensors(_apply(plain, None, tokenizer.encode(one), [short]))[0]
    beside = _item_tensors(_apply(plain, None, tokenizer.encode(one * 2), [long, short]))[1]
    assert _same(alone["input_features"], beside["input_features"])
    assert _same(alone["feature_attention_mask"], beside["feature_attention_mask"])
    # its own real frames and the margin, not the longer neighbour's width
    (alone_window,) = alone["input_features"]  # one window per clip here
    (long_window,) = _item_tensors(_apply(plain, None, tokenizer.encode(one), [long]))[0]["input_features"]
    assert alone_window.shape[-1] < long_window.shape[-1]
