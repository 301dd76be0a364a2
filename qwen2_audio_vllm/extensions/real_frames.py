"""The processor computes and ships only each window's real mel frames (plus the few the
encoder's convolutions reach past them), not the 30 s window: for a 1 s clip the log-mel
costs a thirtieth and the features sent to the worker are 108 frames instead of 3000. The
values are the first frames of upstream's window-padded features (encoder.mel_features says
why), so with the trimmed tower (tower.py's `AudioTower`, which never reads further) the
output is upstream's up to float rounding. `"trim_audio_padding": false` in config.json
turns both off. Each item keeps its own width (what the processor cache stores is the item's
alone); the model pads the features back to the window for upstream's schema
(`input_features` is declared with 3000 frames); the padding is never read."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from transformers import BatchFeature

from qwen2_audio_vllm.encoder import mel_features, trim_audio_padding


class RealFramesProcessor:
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        audios = hf_data.get("audio")
        if not audios or not trim_audio_padding(self.info.get_hf_config()):
            return super()._call_hf_processor(hf_data, hf_kwargs)
        fe = self.info.get_feature_extractor()
        audios = list(audios) if isinstance(audios, (list, tuple)) else [audios]
        # vLLM keeps only the fields of _get_mm_fields_config; the HF processor's token ids
        # of the placeholder text are not used (prompt updates come from vLLM)
        # each item at its own width (its real frames + margin), so an item's output, which
        # vLLM's processor cache stores under the item's hash, never depends on the other
        # clips of the request; vLLM pads the items of a batch together in the worker. The
        # mask keeps upstream's window width, so every item's mask has the same shape.
        mels = [mel_features(fe, a) for a in audios]
        mask = (torch.arange(fe.nb_max_frames)[None, :] < torch.tensor([n for _, n in mels])[:, None]).int()
        return BatchFeature({"input_features": [m for m, _ in mels], "feature_attention_mask": mask})


class RealFramesModel:
    def _parse_and_validate_audio_input(self, **kwargs: object):
        window = 2 * self.config.audio_config.max_source_positions  # mel frames of the window

        def to_window(x: torch.Tensor | list[torch.Tensor] | None, rows_ndim: int):
            if isinstance(x, list):  # one tensor per request if vLLM did not pad them together
                return torch.cat([to_window(t if t.ndim == rows_ndim else t[None], rows_ndim) for t in x])
            return x if x is None or x.shape[-1] >= window else F.pad(x, (0, window - x.shape[-1]))

        kwargs["input_features"] = to_window(kwargs.get("input_features"), 3)
        kwargs["feature_attention_mask"] = to_window(kwargs.get("feature_attention_mask"), 2)
        return super()._parse_and_validate_audio_input(**kwargs)
