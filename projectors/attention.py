"""Small-transformer connector over the encoder frames, with optional downsampling.

    x (B, T, in_dim) --stack=k: concat k frames--> (B, ceil(T/k), k*in_dim)
      --Linear--> (B, T1, width) --N pre-norm transformer layers (padded frames masked)-->
      --downsample="queries": q learned queries cross-attend to each window of w frames
        (window-level Q-Former)--> (B, ceil(T1/w)*q, width)
      --LayerNorm, Linear--> (B, T', out_dim)

Token counts: ceil(T/k) frames after stacking (k=1: T); downsample="queries" then gives
ceil(that/w) * q tokens, downsample="none" keeps it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from projectors.base import Projector, check_stack, stack_frames, stacked_lengths

DOWNSAMPLE = ("none", "queries")


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer layer; keys of padded frames are masked out."""

    def __init__(self, width: int, heads: int, ffn_mult: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        # (B, nh, T, hs); a clip with no real frame attends to everything rather than to
        # nothing (all -inf -> NaN); its rows are padding anyway.
        keys = mask | ~mask.any(-1, keepdim=True)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
        x = x + self.out(y.transpose(1, 2).reshape(B, T, C))
        return x + self.ffn(self.norm2(x))


class WindowQueries(nn.Module):
    """q learned queries per window of w frames, cross-attending to that window only."""

    def __init__(self, width: int, heads: int, window: int, queries: int) -> None:
        super().__init__()
        self.window, self.queries = window, queries
        self.query = nn.Parameter(torch.randn(queries, width) * width**-0.5)
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        w, nq = self.window, self.queries
        pad = (-T) % w
        x, mask = F.pad(x, (0, 0, 0, pad)), F.pad(mask, (0, pad))
        nw = (T + pad) // w
        kv = self.norm(x).reshape(B * nw, w, C)  # (B*nW, w, C)
        ignore = ~mask.reshape(B * nw, w)
        ignore &= ~ignore.all(-1, keepdim=True)  # empty windows are padding; avoid NaN
        q = self.query.expand(B * nw, nq, C)
        y, _ = self.attn(q, kv, kv, key_padding_mask=ignore, need_weights=False)
        return y.reshape(B, nw * nq, C)  # (B, nW*q, C)


class AttentionProjector(Projector):
    name = "attention"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        width: int = 256,
        layers: int = 2,
        heads: int = 4,
        downsample: str = "none",
        stack: int = 1,
        window: int = 4,
        queries: int = 1,
    ) -> None:
        super().__init__(in_dim, out_dim)
        if downsample not in DOWNSAMPLE:
            raise ValueError(f"attention downsample must be one of {DOWNSAMPLE}, got {downsample!r}")
        if width % heads:
            raise ValueError(f"attention width ({width}) must be divisible by heads ({heads})")
        if window < 1 or queries < 1:
            raise ValueError(f"window and queries must be >= 1, got window={window}, queries={queries}")
        self.width, self.layers, self.heads = width, layers, heads
        self.downsample, self.stack = downsample, check_stack(stack)
        self.window, self.queries = window, queries

        self.input = nn.Linear(in_dim * self.stack, width)
        self.blocks = nn.ModuleList(SelfAttentionBlock(width, heads) for _ in range(layers))
        self.pool = WindowQueries(width, heads, window, queries) if downsample == "queries" else None
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, out_dim)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        lengths = stacked_lengths(lengths, self.stack)
        if self.downsample == "queries":
            lengths = stacked_lengths(lengths, self.window) * self.queries
        return lengths

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.input(stack_frames(x, mask, self.stack))  # (B, T1, width)
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < stacked_lengths(
            mask.sum(-1), self.stack
        )[:, None]
        for block in self.blocks:
            x = block(x, mask)
        if self.pool is not None:
            x = self.pool(x, mask)  # (B, ceil(T1/w)*q, width)
        return self.output(self.norm(x))  # (B, T', out_dim)
