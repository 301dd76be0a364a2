"""Small-transformer connector over the encoder frames, with optional downsampling.

    x (B, T, in_dim) --stack=k: concat k frames--> (B, ceil(T/k), k*in_dim)
      --Linear--> (B, T1, width) --N pre-norm transformer layers (padded frames masked)-->
      --downsample="queries": q learned queries cross-attend to each window of w frames
        (window-level Q-Former)--> (B, ceil(T1/w)*q, width)
      --LayerNorm, Linear--> (B, T', out_dim)
      [mean_shortcut (queries only): + Linear(mean of the window's real input frames),
       the same for each of the window's q tokens]

Token counts: ceil(T/k) frames after stacking (k=1: T); downsample="queries" then gives
ceil(that/w) * q tokens, downsample="none" keeps it.

A Q-Former is refused when its queries do not divide its window (q > w would add tokens; a
w/q that is not whole would give no clean compression factor). `mean_shortcut` adds a
linear path from each window's mean frame; `init_as_window_mean` starts it as the base's
projection with the Q-Former's output at zero, so at step 0 the projector is window mean
pooling followed by the base's connector (train.init=window_mean).
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
        mean_shortcut: bool = False,
    ) -> None:
        super().__init__(in_dim, out_dim)
        if downsample not in DOWNSAMPLE:
            raise ValueError(f"attention downsample must be one of {DOWNSAMPLE}, got {downsample!r}")
        if width % heads:
            raise ValueError(f"attention width ({width}) must be divisible by heads ({heads})")
        if window < 1 or queries < 1:
            raise ValueError(f"window and queries must be >= 1, got window={window}, queries={queries}")
        if downsample == "queries" and (queries > window or window % queries):
            raise ValueError(
                f"attention queries={queries} do not divide window={window}: each query must summarise a whole "
                "number of frames (queries <= window, window % queries == 0); e.g. window=8 queries=2 for 1/4 rate"
            )
        if mean_shortcut and downsample != "queries":
            raise ValueError(f"attention mean_shortcut=true needs downsample=queries (a window to average), got {downsample!r}")
        self.width, self.layers, self.heads = width, layers, heads
        self.downsample, self.stack = downsample, check_stack(stack)
        self.window, self.queries, self.mean_shortcut = window, queries, mean_shortcut

        self.input = nn.Linear(in_dim * self.stack, width)
        self.blocks = nn.ModuleList(SelfAttentionBlock(width, heads) for _ in range(layers))
        self.pool = WindowQueries(width, heads, window, queries) if downsample == "queries" else None
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, out_dim)
        self.mean_projection = nn.Linear(in_dim, out_dim) if mean_shortcut else None

    @property
    def frames_per_group(self) -> int:
        """Input frames behind one group of output tokens: stack, or stack x window."""
        return self.stack * (self.window if self.downsample == "queries" else 1)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        lengths = stacked_lengths(lengths, self.stack)
        if self.downsample == "queries":
            lengths = stacked_lengths(lengths, self.window) * self.queries
        return lengths

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        frames, frame_mask = x, mask
        x = self.input(stack_frames(x, mask, self.stack))  # (B, T1, width)
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < stacked_lengths(
            mask.sum(-1), self.stack
        )[:, None]
        for block in self.blocks:
            x = block(x, mask)
        if self.pool is not None:
            x = self.pool(x, mask)  # (B, ceil(T1/w)*q, width)
        y = self.output(self.norm(x))  # (B, T', out_dim)
        if self.mean_projection is not None:
            y = y + self.mean_projection(window_means(frames, frame_mask, self.frames_per_group)).repeat_interleave(
                self.queries, dim=1)
        return y

    @torch.no_grad()
    def init_as_window_mean(self, weight: torch.Tensor, bias: torch.Tensor) -> AttentionProjector:
        """Start as window mean pooling followed by a stack-1 projection (weight (out_dim,
        in_dim), bias (out_dim,), the base's connector): the shortcut takes the projection and
        the Q-Former's output layer starts at zero, so every query of a window begins as
        W mean(window's real frames) + b and the Q-Former learns what to add to it."""
        if self.mean_projection is None:
            raise ValueError("window-mean init needs the shortcut: projector.mean_shortcut=true (with downsample=queries)")
        if weight.shape != (self.out_dim, self.in_dim) or bias.shape != (self.out_dim,):
            raise ValueError(
                f"window-mean init needs a stack-1 projection of weight ({self.out_dim}, {self.in_dim}) and bias "
                f"({self.out_dim},), got {tuple(weight.shape)} and {tuple(bias.shape)}: the base checkpoint's "
                "projector must be {'name': 'linear', 'stack': 1} at this model's dims"
            )
        self.mean_projection.weight.copy_(weight.to(self.mean_projection.weight))
        self.mean_projection.bias.copy_(bias.to(self.mean_projection.bias))
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        return self


def window_means(x: torch.Tensor, mask: torch.Tensor, size: int) -> torch.Tensor:
    """(B, T, D) frames, (B, T) mask -> (B, ceil(T/size), D): the mean of each window's real
    frames (a window without one gives zeros; its tokens are padding)."""
    pad = (-x.shape[1]) % size
    x, mask = F.pad(x * mask[..., None].to(x.dtype), (0, 0, 0, pad)), F.pad(mask, (0, pad))
    B, T, D = x.shape
    sums = x.reshape(B, T // size, size, D).sum(2)
    counts = mask.reshape(B, T // size, size).sum(-1, keepdim=True).clamp(min=1)
    return sums / counts.to(x.dtype)
