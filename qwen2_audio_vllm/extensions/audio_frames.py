"""Precomputed encoder frames in vLLM: a request's audio may be
`{"audio_frames": [tensor (frames, d_audio)]}`, the pooled encoder outputs that
experiments/training/cache.py stores. The model then runs only the projector, and each item gets
`projector.output_lengths(frames)` placeholder tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import DictEmbeddingItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from projectors.base import project_sequences
from qwen2_audio_vllm import windows
from qwen2_audio_vllm.model import projector_for


class Qwen2AudioFrameInputs(TensorSchema):
    """Dimensions:
    - na: Number of audios
    - nf: Number of pooled encoder frames (25 per second)
    - hs: Encoder width (audio_config.d_model)
    """

    type: Literal["audio_frames"] = "audio_frames"
    audio_frames: Annotated[list[torch.Tensor], TensorShape("na", "nf", "hs", dynamic_dims={"nf"})]


def _frame_fields(hf_inputs: Mapping[str, torch.Tensor]) -> dict[str, MultiModalFieldConfig]:
    return {"audio_frames": MultiModalFieldConfig.batched("audio")}


class AudioFramesParser:
    def _parse_audio_data(self, data):
        if isinstance(data, dict) and "audio_frames" in data:
            return DictEmbeddingItems(data, modality="audio", required_fields={"audio_frames"}, fields_factory=_frame_fields)
        return super()._parse_audio_data(data)


def check_audio_frames(items: DictEmbeddingItems, config: Any, feature_extractor: Any) -> None:
    """Frames must be what this model's encoder would have produced: (frames, d_model),
    finite floats, at most as many as the longest audio the model takes."""
    d_model = config.audio_config.d_model
    max_frames = windows.windowing(config, feature_extractor).max_samples // windows.SAMPLES_PER_POOLED_FRAME
    for i in range(items.get_count()):
        frames = items.get(i).get("audio_frames")
        if not isinstance(frames, torch.Tensor) or frames.ndim != 2 or frames.shape[-1] != d_model:
            shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ValueError(
                f"audio_frames[{i}] has shape {shape}; expected (frames, {d_model}): the "
                "pooled outputs of this model's audio encoder (25 frames per second)"
            )
        if not frames.is_floating_point() or not torch.isfinite(frames).all():
            raise ValueError(f"audio_frames[{i}] must be finite floating-point values, got {frames.dtype}")
        if not 0 < frames.shape[0] <= max_frames:
            raise ValueError(f"audio_frames[{i}] has {frames.shape[0]} frames; expected 1 to {max_frames}")


class AudioFramesProcessor:
    def _get_hf_mm_inputs(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]):
        audios = mm_items.get("audio")
        if isinstance(audios, DictEmbeddingItems) and "audio_frames" in audios.get(0):
            check_audio_frames(audios, self.info.get_hf_config(), self.info.get_feature_extractor())
        return super()._get_hf_mm_inputs(mm_items, hf_kwargs)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs), **_frame_fields(hf_inputs)}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        frames = out_mm_kwargs.get_data().get("audio_frames")
        if frames is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        lengths = torch.tensor([f.shape[0] for f in frames])
        counts = projector_for(self.info.get_hf_config()).output_lengths(lengths).tolist()
        audio_token_id = self.info.get_hf_processor(**hf_processor_mm_kwargs).audio_token_id
        return [
            PromptReplacement(
                modality="audio",
                target=[audio_token_id],
                replacement=lambda i: [audio_token_id] * counts[i],
            )
        ]


class AudioFramesModel:
    def _parse_and_validate_audio_input(self, **kwargs: object):
        frames = kwargs.pop("audio_frames", None)
        if frames is not None:
            return Qwen2AudioFrameInputs(type="audio_frames", audio_frames=frames)
        return super()._parse_and_validate_audio_input(**kwargs)

    def _process_audio_input(self, audio_input) -> tuple[torch.Tensor, ...]:
        if audio_input["type"] == "audio_frames":
            return tuple(project_sequences(self.multi_modal_projector, list(audio_input["audio_frames"])))
        return super()._process_audio_input(audio_input)
