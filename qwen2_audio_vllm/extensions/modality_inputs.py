"""Extra embedding modalities in vLLM (qwen2_audio_vllm/modalities.py): config.json
"modalities" declares inputs from other encoders, each with its own projector and
placeholder token. A request carries `multi_modal_data={"m1": tensor (n, in_dim)}`; the
model runs m1's projector and its `output_lengths(n)` rows replace the placeholder. Not
vLLM's embedding inputs: these rows go through a projector, so --enable-mm-embeds is not
needed. A checkpoint without the block is served exactly as before."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property, lru_cache, partial
from typing import Any

import torch
from transformers import BatchFeature, Qwen2AudioConfig
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ModalityDataItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from projectors import Projector
from projectors.base import project_sequences
from qwen2_audio_vllm.modalities import (
    Modality,
    build_modality_projectors,
    check_embeddings,
    modality_specs,
)


@lru_cache(maxsize=16)
def _meta_projector(config_json: str, name: str) -> Projector:
    with torch.device("meta"):  # weightless: the processor only needs output_lengths
        return build_modality_projectors(Qwen2AudioConfig.from_dict(json.loads(config_json)))[name]


def modality_tokens(config: Qwen2AudioConfig, name: str, rows: int) -> int:
    """Placeholder tokens for one item of `rows` rows: its projector's output length."""
    projector = _meta_projector(config.to_json_string(use_diff=False), name)
    return int(projector.output_lengths(torch.tensor([rows])))


class ModalityEmbeddingItems(ModalityDataItems[list[torch.Tensor], torch.Tensor]):
    """A modality's validated (n, in_dim) tensors, passed to the model as `<name>_embeds`."""

    def __init__(self, data: object, modality: Modality) -> None:
        super().__init__(check_embeddings(modality, data), modality.name)
        self.key = modality.key

    def get_count(self) -> int:
        return len(self.data)

    def get(self, index: int) -> torch.Tensor:
        return self.data[index]

    def get_processor_data(self) -> Mapping[str, object]:
        return {}

    def get_passthrough_data(self) -> Mapping[str, object]:
        return {self.key: self.data}


class ModalityParser:
    modalities: Mapping[str, Modality] = {}  # set by the processing info

    def _get_subparsers(self):
        parsers = {name: partial(ModalityEmbeddingItems, modality=m) for name, m in self.modalities.items()}
        return {**super()._get_subparsers(), **parsers}


class ModalityInfo:
    @cached_property
    def modalities(self) -> dict[str, Modality]:
        """config.json's modalities, their placeholder ids checked against the tokenizer."""
        specs = modality_specs(self.get_hf_config())
        tokenizer = self.get_tokenizer()
        for m in specs.values():
            if tokenizer.convert_tokens_to_ids(m.token) != m.token_id:
                raise ValueError(
                    f"config.json modality {m.name!r} expects placeholder {m.token} = id "
                    f"{m.token_id}, but the tokenizer maps it to "
                    f"{tokenizer.convert_tokens_to_ids(m.token)}; re-create the checkpoint "
                    "with qwen2_audio_vllm.derive.add_modalities"
                )
        return specs

    def get_data_parser(self):
        parser = super().get_data_parser()
        parser.modalities = self.modalities
        return parser

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {**super().get_supported_mm_limits(), **dict.fromkeys(self.modalities)}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int] | None = None) -> Mapping[str, int]:
        mm_counts = mm_counts or {}
        config = self.get_hf_config()
        return {
            **super().get_mm_max_tokens_per_item(seq_len, mm_counts),
            **{
                name: modality_tokens(config, name, m.max_len)
                for name, m in self.modalities.items()
                if mm_counts.get(name, 0) > 0
            },
        }


class ModalityDummyInputs:
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        extra = "".join(m.token * mm_counts.get(name, 0) for name, m in self.info.modalities.items())
        return super().get_dummy_text(mm_counts) + extra

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any):
        data = super().get_dummy_mm_data(seq_len, mm_counts, mm_options)
        for name, m in self.info.modalities.items():  # each modality's longest input
            if mm_counts.get(name, 0) > 0:
                data[name] = [torch.randn(m.max_len, m.in_dim)] * mm_counts[name]
        return data


class ModalityProcessor:
    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            **{m.key: MultiModalFieldConfig.batched(name) for name, m in self.info.modalities.items()},
        }

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()

        def replacement(m: Modality, item_idx: int) -> list[int]:
            rows = out_mm_kwargs[m.name][item_idx].get_data()[m.key]
            return [m.token_id] * modality_tokens(config, m.name, rows.shape[0])

        return [
            *super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs),
            *(
                PromptReplacement(modality=name, target=[m.token_id], replacement=partial(replacement, m))
                for name, m in self.info.modalities.items()
            ),
        ]


class ModalityModel:
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.modalities = modality_specs(self.config)
        if self.modalities:  # absent otherwise, so a plain checkpoint's modules are upstream's
            with self._mark_tower_model(vllm_config, set(self.modalities)):
                self.modality_projectors = build_modality_projectors(self.config)

    def embed_multimodal(self, **kwargs: object):
        # vLLM calls this once per modality, with that modality's fields
        for name, m in self.modalities.items():
            if (rows := kwargs.get(m.key)) is not None:
                return tuple(project_sequences(self.modality_projectors[name], list(rows)))
        return super().embed_multimodal(**kwargs)
