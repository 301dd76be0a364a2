"""MLP connector (LLaVA-1.5 / SLAM-LLM style): optional pre-norm, `depth` linear layers with
GELU or SwiGLU between them, optional frame stacking (k frames -> 1 token, T' = ceil(T/k))."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from projectors.base import Projector, check_stack, stack_frames, stacked_lengths

ACTIVATIONS = ("gelu", "swiglu")


class SwiGLU(nn.Module):
    """Linear(d_in -> 2h) split into gate and value: silu(gate) * value -> (.., h)."""

    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.proj(x).chunk(2, dim=-1)
        return F.silu(gate) * value


class MLPProjector(Projector):
    name = "mlp"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 0,
        depth: int = 2,
        activation: str = "gelu",
        pre_norm: bool = False,
        stack: int = 1,
    ) -> None:
        super().__init__(in_dim, out_dim)
        if depth < 1:
            raise ValueError(f"mlp depth must be >= 1 linear layers, got {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"mlp activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.hidden_dim = hidden_dim or out_dim  # 0 means "the LLM width"
        self.depth, self.activation, self.pre_norm = depth, activation, pre_norm
        self.stack = check_stack(stack)

        d_in = in_dim * stack
        self.norm = nn.LayerNorm(d_in) if pre_norm else nn.Identity()
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            if activation == "swiglu":
                layers.append(SwiGLU(d_in, self.hidden_dim))
            else:
                layers += [nn.Linear(d_in, self.hidden_dim), nn.GELU()]
            d_in = self.hidden_dim
        layers.append(nn.Linear(d_in, out_dim))
        self.layers = nn.Sequential(*layers)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return stacked_lengths(lengths, self.stack)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = stack_frames(x, mask, self.stack)  # (B, T', stack * in_dim)
        return self.layers(self.norm(x))  # (B, T', out_dim)
