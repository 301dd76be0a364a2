"""Audio longer than the encoder window: split into windows, encode each, concatenate.

config.json may carry `"long_audio": {"window_s": 30, "overlap_s": 0.0, "max_windows": 4}`
(defaults: the feature extractor's chunk_length, no overlap, 1 window = no long audio).
A clip of n samples becomes windows starting every `window - overlap` seconds; each window
is padded to the encoder's input length as usual. With overlap, the encoder of a window
sees `overlap_s` of left context, and its first `overlap_s * 25` pooled frames are dropped
before the projector so no stretch of audio is represented twice. The vLLM fork and the HF
twin both use these functions, so their token counts agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SAMPLES_PER_POOLED_FRAME = 640  # hop 160 samples x conv stride 2 x pool 2


@dataclass(frozen=True)
class Windowing:
    window: int  # samples
    hop: int  # samples between window starts
    max_windows: int
    drop: int  # pooled frames dropped at the start of every window after the first

    @property
    def max_samples(self) -> int:
        return self.window + (self.max_windows - 1) * self.hop


def windowing(config: Any, feature_extractor: Any) -> Windowing:
    block = getattr(config, "long_audio", None) or {}
    sr = feature_extractor.sampling_rate
    window_s = float(block.get("window_s", feature_extractor.chunk_length))
    overlap_s = float(block.get("overlap_s", 0.0))
    max_windows = int(block.get("max_windows", 1))
    if not 0 < window_s <= feature_extractor.chunk_length:
        raise ValueError(
            f"long_audio.window_s={window_s} must be in (0, {feature_extractor.chunk_length}] "
            "(the feature extractor's chunk_length)"
        )
    overlap = int(round(overlap_s * sr))
    if overlap % SAMPLES_PER_POOLED_FRAME or not 0 <= overlap_s < window_s:
        raise ValueError(
            f"long_audio.overlap_s={overlap_s} must be a multiple of 0.04 s (one pooled frame) "
            f"and below window_s={window_s}"
        )
    if max_windows < 1:
        raise ValueError(f"long_audio.max_windows must be >= 1, got {max_windows}")
    window = int(round(window_s * sr))
    return Windowing(window, window - overlap, max_windows, overlap // SAMPLES_PER_POOLED_FRAME)


def split(audio: np.ndarray, w: Windowing) -> list[np.ndarray]:
    """(T,) samples -> windows of at most `w.window` samples, starts every `w.hop`."""
    if len(audio) <= w.window:
        return [audio]
    n = 1 + -(-(len(audio) - w.window) // w.hop)  # ceil
    return [audio[i * w.hop : i * w.hop + w.window] for i in range(n)]


def kept_frames(pooled_lengths: torch.Tensor, num_windows: list[int], w: Windowing) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window (flattened over clips): (first kept pooled frame, kept frame count)."""
    first = torch.zeros_like(pooled_lengths)
    start = 0
    for n in num_windows:
        first[start + 1 : start + n] = w.drop
        start += n
    return first, (pooled_lengths - first).clamp(min=0)
