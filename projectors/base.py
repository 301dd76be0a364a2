"""The projector contract shared by every family, and the frame-stacking helper.

A projector maps pooled audio-encoder frames to LLM input embeddings:

    forward(x, mask):       x (B, T, in_dim) float, mask (B, T) bool, True = real frame
                            -> (B, T', out_dim) where T' = output_lengths(T)
    output_lengths(lengths): (N,) long frames in -> (N,) long tokens out

`output_lengths` is the single source of truth for the number of audio tokens: the vLLM
processor (placeholder count), the vLLM model (embedding split), the HF twin and the tests
all call it. Rows of the output past `output_lengths(mask.sum(-1))` are padding and are
never read.

Every projector records its constructor arguments in `hparams`, so the checkpoint's
config.json `"projector"` block (`{"name": ..., **hparams}`) rebuilds it exactly.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    name: ClassVar[str]
    in_dim: int
    out_dim: int

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"projector dims must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        self.in_dim = in_dim
        self.out_dim = out_dim

    @property
    def hparams(self) -> dict[str, Any]:
        """Constructor arguments, read back from the attributes of the same name."""
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self"}

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def frames_per_group(self) -> int:
        """Input frames behind one group of output tokens (a stack's k). An item whose frame
        count is a multiple of it ends on a whole group; otherwise its last token sees fewer frames."""
        return getattr(self, "stack", 1)

    def output_mask(self, mask: torch.Tensor, num_rows: int) -> torch.Tensor:
        """(B, T) frame mask -> (B, num_rows) mask of the output rows that are real tokens."""
        out_len = self.output_lengths(mask.sum(-1))
        return torch.arange(num_rows, device=mask.device)[None, :] < out_len[:, None]


def stacked_lengths(lengths: torch.Tensor, stack: int) -> torch.Tensor:
    """Frames after concatenating `stack` consecutive frames: ceil(T / stack)."""
    return (lengths + stack - 1) // stack


def stack_frames(x: torch.Tensor, mask: torch.Tensor, stack: int) -> torch.Tensor:
    """(B, T, D) -> (B, ceil(T/stack), stack*D); padded frames are zeroed first so the last,
    partial group of a clip never depends on what the padding held."""
    x = x * mask[..., None].to(x.dtype)
    if stack == 1:
        return x
    B, T, D = x.shape
    pad = (-T) % stack
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(B, (T + pad) // stack, stack * D)


def check_stack(stack: int) -> int:
    if not isinstance(stack, int) or stack < 1:
        raise ValueError(f"stack must be an integer >= 1 (frames concatenated per token), got {stack!r}")
    return stack


def project_sequences(projector: Projector, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Ragged inputs, one (n_i, in_dim) tensor each -> one (output_lengths(n_i), out_dim)
    tensor each, computed as one padded, masked batch."""
    device = seqs[0].device
    lengths = torch.tensor([s.shape[0] for s in seqs], device=device)
    dtype = next(projector.parameters()).dtype
    x = nn.utils.rnn.pad_sequence([s.to(dtype) for s in seqs], batch_first=True)
    mask = torch.arange(x.shape[1], device=device)[None, :] < lengths[:, None]
    out = projector(x, mask)
    tokens = projector.output_lengths(lengths)
    # one compact tensor and views into it, not views into the padded batch (which would
    # keep the padding alive in vLLM's encoder cache)
    real = torch.arange(out.shape[1], device=device)[None, :] < tokens[:, None]
    return list(torch.split(out[real], tokens.tolist()))
