"""Audio longer than the encoder window: split into windows, encode each, concatenate.

config.json may carry `"long_audio": {"window_s": 30, "overlap_s": 0.0, "max_windows": 4}`
(defaults: the feature extractor's chunk_length, no overlap, 1 window = no long audio).
A clip of n samples becomes windows starting every `window - overlap` seconds; each window
is padded to the encoder's input length as usual. With overlap, the encoder of a window
sees `overlap_s` of left context, and its first `overlap_s * 25` pooled frames are dropped
before the projector so no stretch of audio is represented twice. The vLLM fork
(extensions/long_audio.py) and the HF twin (hf.clip_embeddings) both use these functions,
so their token counts and embeddings agree.

Streaming (experiments/serving/streaming.py) uses the same pieces: a stream is cut by
`chunks` (= `split` with hop = window) into pieces that are each their own audio item, so
each is encoded alone and earlier pieces' embeddings never change. `hf.clip_embeddings`
encodes items window by window for both.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def chunks(audio: np.ndarray, samples: int) -> list[np.ndarray]:
    """(T,) samples -> consecutive pieces of `samples` (the last one may be shorter): the
    windows of `split` with no overlap, as a stream cuts its audio into chunks."""
    return split(audio, Windowing(samples, samples, max_windows=-(-len(audio) // samples), drop=0))


def first_kept(num_windows: Sequence[int], w: Windowing) -> torch.Tensor:
    """Per window, flattened over clips: the first pooled frame it keeps (0 in a clip's
    first window, `w.drop` in the later ones, whose start overlaps the previous window)."""
    return torch.tensor([0 if j == 0 else w.drop for n in num_windows for j in range(n)], dtype=torch.long)


def kept_counts(pooled: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Pooled frames each window keeps: its real ones from `start` on."""
    return (pooled - start.to(pooled.device)).clamp(min=0)


def drop_overlap(
    frames: torch.Tensor, pooled: torch.Tensor, start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(windows, T, d) pooled encoder frames with `pooled` real ones each -> the same frames
    shifted left by each window's `start` (on the CPU), and the count each keeps. Frames
    shifted in at the end lie past the kept count, where the projector's mask ignores them."""
    kept = kept_counts(pooled, start)
    if not bool(start.any()):
        return frames, kept
    start = start.to(frames.device)
    index = (torch.arange(frames.shape[1], device=frames.device)[None, :] + start[:, None]) % frames.shape[1]
    return frames.gather(1, index[:, :, None].expand(-1, -1, frames.shape[2])), kept


def join(per_window: Sequence[torch.Tensor], num_windows: Sequence[int]) -> list[torch.Tensor]:
    """Each clip's tokens: its consecutive windows' tokens, concatenated."""
    ends = np.cumsum([0, *num_windows])
    return [torch.cat(list(per_window[a:b])) for a, b in zip(ends[:-1], ends[1:], strict=True)]
