"""Qwen2-Audio's own connector: one Linear(d_audio -> d_text, bias=True).

With stack=1 its parameters are `linear.weight` / `linear.bias`, the keys of the original
checkpoint's `multi_modal_projector.linear.*`, so the released weights load unchanged.
With stack=k it sees k concatenated frames: Linear(k * d_audio -> d_text), T' = ceil(T/k).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from projectors.base import Projector, check_stack, stack_frames, stacked_lengths


class LinearProjector(Projector):
    name = "linear"

    def __init__(self, in_dim: int, out_dim: int, stack: int = 1) -> None:
        super().__init__(in_dim, out_dim)
        self.stack = check_stack(stack)
        self.linear = nn.Linear(in_dim * stack, out_dim, bias=True)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return stacked_lengths(lengths, self.stack)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(stack_frames(x, mask, self.stack))  # (B, T', out_dim)
