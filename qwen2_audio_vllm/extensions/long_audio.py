"""Long audio in vLLM: each clip is split into encoder windows (config.json "long_audio",
windows.py), every window is one row of the processor's features, and the model joins an
audio's windows after the projector. Without a "long_audio" block a clip is one window and
nothing changes from upstream."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import accumulate
from typing import Annotated, Any, Literal

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from qwen2_audio_vllm import encoder, windows
from qwen2_audio_vllm.model import projector_for


class Qwen2AudioWindowedInputs(TensorSchema):
    """Dimensions:
    - na: Number of audios
    - nw: Number of windows over all audios (rows of the features)
    - nmb: Number of mel bins
    """

    type: Literal["audio_features"]
    input_features: Annotated[torch.Tensor | list[torch.Tensor], TensorShape("nw", "nmb", 3000)]
    feature_attention_mask: Annotated[torch.Tensor, TensorShape("nw", 3000)]
    audio_num_windows: Annotated[torch.Tensor, TensorShape("na")]
    # the first pooled frame each window keeps (the overlap with its predecessor is dropped)
    audio_window_start: Annotated[torch.Tensor, TensorShape("nw")]


class LongAudioInfo:
    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int] | None = None) -> Mapping[str, int]:
        """The tokens of the longest clip accepted: max_windows full windows, each after the
        first without the pooled frames its overlap drops (exactly what the dummy audio of
        LongAudioDummyInputs processes to)."""
        out = dict(super().get_mm_max_tokens_per_item(seq_len, mm_counts))
        fe = self.get_feature_extractor()
        w = windows.windowing(self.get_hf_config(), fe)
        if "audio" in out and w.max_windows > 1:
            pooled = encoder.output_lengths(torch.full((w.max_windows,), w.window // fe.hop_length))[1]
            kept = windows.kept_counts(pooled, windows.first_kept([w.max_windows], w))
            out["audio"] = int(projector_for(self.get_hf_config()).output_lengths(kept).sum())
        return out


class LongAudioDummyInputs:
    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any):
        """Profiling audio as long as the longest clip accepted (max_windows windows), so the
        memory profile sizes the encoder for what get_mm_max_tokens_per_item reports, not
        for one window."""
        data = super().get_dummy_mm_data(seq_len, mm_counts, mm_options)
        w = windows.windowing(self.info.get_hf_config(), self.info.get_feature_extractor())
        if data.get("audio") and w.max_windows > 1:
            data["audio"] = self._get_dummy_audios(length=w.max_samples, num_audios=len(data["audio"]),
                                                   overrides=mm_options.get("audio") if mm_options else None)
        return data


class LongAudioProcessor:
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """The HF processor sees one clip per window; `audio_num_windows` regroups them."""
        audios = hf_data.get("audio")
        if not audios:
            return super()._call_hf_processor(hf_data, hf_kwargs)
        audios = list(audios) if isinstance(audios, (list, tuple)) else [audios]
        w = windows.windowing(self.info.get_hf_config(), self.info.get_feature_extractor())
        split = [windows.split(audio, w) for audio in audios]
        flat = [window for clip in split for window in clip]
        text = self.dummy_inputs.get_dummy_text({"audio": len(flat)})
        out = super()._call_hf_processor(dict(hf_data, text=text, audio=flat), hf_kwargs)
        out["audio_num_windows"] = torch.tensor([len(clip) for clip in split])
        out["audio_window_start"] = windows.first_kept(out["audio_num_windows"].tolist(), w)
        return out

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        num_windows = hf_inputs.get("audio_num_windows", torch.zeros(0, dtype=torch.long))
        bounds = [0, *accumulate(num_windows.tolist())]
        # plain slices (not flat_from_sizes' tuples), which also cut the list of per-window
        # features of different widths that real_frames.py ships
        per_window = MultiModalFieldConfig.flat("audio", [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)])
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            "input_features": per_window,
            "feature_attention_mask": per_window,
            # on the CPU: the model reads it to skip the shift when no window overlaps
            "audio_window_start": MultiModalFieldConfig.flat_from_sizes("audio", num_windows, keep_on_cpu=True),
            "audio_num_windows": MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
        }

    def _audio_token_counts(self, pooled: torch.Tensor, out_mm_data: Mapping[str, Any]) -> list[int]:
        kept = windows.kept_counts(pooled, out_mm_data["audio_window_start"])
        per_window = torch.tensor(super()._audio_token_counts(kept, out_mm_data))
        return [int(n.sum()) for n in per_window.split(out_mm_data["audio_num_windows"].tolist())]


class LongAudioModel:
    def _parse_and_validate_audio_input(self, **kwargs: object):
        num_windows = kwargs.pop("audio_num_windows", None)
        window_start = kwargs.pop("audio_window_start", None)
        audio_input = super()._parse_and_validate_audio_input(**kwargs)
        if audio_input is None or audio_input["type"] != "audio_features":
            return audio_input
        return Qwen2AudioWindowedInputs(
            type="audio_features",
            input_features=audio_input["input_features"],
            feature_attention_mask=audio_input["feature_attention_mask"],
            audio_num_windows=num_windows,
            audio_window_start=window_start,
        )

    def _project(self, frames: torch.Tensor, lengths: torch.Tensor, audio_input) -> tuple[torch.Tensor, torch.Tensor]:
        frames, kept = windows.drop_overlap(frames, lengths, audio_input["audio_window_start"])
        return super()._project(frames, kept, audio_input)

    def _process_audio_input(self, audio_input) -> tuple[torch.Tensor, ...]:
        per_window = super()._process_audio_input(audio_input)
        if audio_input["type"] != "audio_features":
            return per_window
        return tuple(windows.join(per_window, audio_input["audio_num_windows"].tolist()))
