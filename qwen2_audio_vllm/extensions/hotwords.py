"""Hotword biasing through the prompt update: a request's `mm_processor_kwargs={"hotwords":
[...]}` becomes text tokens placed before each audio item's tokens (qwen2_audio_vllm/hotwords.py
says where and why there), the path the seed walkthrough names for context and entity bias.

The list is a processor option, not an input of the HF processor: it is taken out of the
kwargs every other method sees, and vLLM hashes it into each item's cache key (an item's
processed output and prompt update are cached per list)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate, PromptUpdateDetails

from qwen2_audio_vllm.hotwords import HOTWORDS_KEY, hotword_ids


def _without(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in kwargs.items() if k != HOTWORDS_KEY}


class HotwordsInfo:
    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**_without(kwargs))


class HotwordsProcessor:
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        if HOTWORDS_KEY in hf_kwargs:  # refused here, before any audio is processed
            hotword_ids(self.info.get_tokenizer(), hf_kwargs[HOTWORDS_KEY])
        return super()._call_hf_processor(hf_data, _without(hf_kwargs))

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return super()._get_mm_fields_config(hf_inputs, _without(hf_processor_mm_kwargs))

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, _without(hf_processor_mm_kwargs), out_mm_kwargs)
        if HOTWORDS_KEY not in hf_processor_mm_kwargs:
            return updates
        prefix = hotword_ids(self.info.get_tokenizer(), hf_processor_mm_kwargs[HOTWORDS_KEY])
        audio_token_id = self.info.get_hf_processor().audio_token_id

        def with_prefix(replacement):
            def tokens(i: int) -> PromptUpdateDetails:
                r = replacement(i) if callable(replacement) else replacement
                ids = r.full if isinstance(r, PromptUpdateDetails) else list(r)
                return PromptUpdateDetails.select_token_id(prefix + ids, embed_token_id=audio_token_id)

            return tokens

        return [PromptReplacement(modality=u.modality, target=u.target, replacement=with_prefix(u.replacement))
                if u.modality == "audio" else u for u in updates]
