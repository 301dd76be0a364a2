"""Requests the model cannot represent faithfully become ValueErrors, which `vllm serve`
answers with HTTP 400 and this message, where upstream silently truncates audio longer than
the encoder window, lets NaN/inf samples through (the output then collapses), or fails later
with an AssertionError that names nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from vllm.multimodal.parse import AudioProcessorItems, MultiModalDataItems

from qwen2_audio_vllm import windows


def check_audio_items(audios: AudioProcessorItems, config: Any, feature_extractor: Any) -> None:
    """Each clip must fit the model's windows (windows.py) and hold finite samples."""
    w = windows.windowing(config, feature_extractor)
    sr = feature_extractor.sampling_rate
    for i in range(len(audios)):
        audio = audios.get(i)
        if len(audio) > w.max_samples:
            raise ValueError(
                f"audio {i} is {len(audio) / sr:.1f} s long; this model takes at most "
                f"{w.max_samples / sr:.1f} s ({w.max_windows} encoder window(s)) and longer audio "
                "would be cut off. Split the audio, or raise long_audio.max_windows in config.json."
            )
        if not np.isfinite(audio).all():
            raise ValueError(f"audio {i} contains NaN or infinite samples; send finite PCM samples")


class InputChecksProcessor:
    def _get_hf_mm_inputs(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]):
        if isinstance(audios := mm_items.get("audio"), AudioProcessorItems):
            check_audio_items(audios, self.info.get_hf_config(), self.info.get_feature_extractor())
        return super()._get_hf_mm_inputs(mm_items, hf_kwargs)

    def _maybe_apply_prompt_updates(self, mm_items: MultiModalDataItems, mm_res: Any):
        """Each item needs its placeholder in the prompt."""
        processor = self.info.get_hf_processor()
        tokens = {"audio": (processor.audio_token, processor.audio_token_id)}
        tokens |= {n: (m.token, m.token_id) for n, m in getattr(self.info, "modalities", {}).items()}
        for modality, count in mm_items.get_all_counts().items():
            token, token_id = tokens[modality]
            found = mm_res.prompt_ids.count(token_id)
            if found != count:
                raise ValueError(
                    f"the request has {count} {modality} item(s) but its prompt has {found} "
                    f"{token} placeholder(s); put one {token} in the prompt per item"
                )
        return super()._maybe_apply_prompt_updates(mm_items, mm_res)
