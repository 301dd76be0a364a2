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

    @torch.no_grad()
    def init_as_mean_pool(self, weight: torch.Tensor, bias: torch.Tensor) -> LinearProjector:
        """Start from a stack-1 projection (weight (out_dim, in_dim), bias (out_dim,)) so that
        this stack-k projector equals mean pooling of k frames followed by that projection:

            Linear_k([x_1; ...; x_k]) = sum_i (W / k) x_i + b = W (1/k sum_i x_i) + b

        i.e. the weight is W / k repeated k times along the input. Exact for every full group
        of k frames; a clip's last, partial group of r < k frames gives W (1/k sum_{i<=r} x_i) + b
        (its padding frames are zeros), the mean scaled by r/k."""
        if weight.shape != (self.out_dim, self.in_dim) or bias.shape != (self.out_dim,):
            raise ValueError(
                f"mean-pool init needs a stack-1 projection of weight ({self.out_dim}, {self.in_dim}) and bias "
                f"({self.out_dim},), got {tuple(weight.shape)} and {tuple(bias.shape)}: the base checkpoint's "
                "projector must be {'name': 'linear', 'stack': 1} at this model's dims"
            )
        self.linear.weight.copy_(weight.to(self.linear.weight).repeat(1, self.stack) / self.stack)
        self.linear.bias.copy_(bias.to(self.linear.bias))
        return self
