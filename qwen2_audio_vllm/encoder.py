"""The Whisper-style audio encoder over each clip's real frames instead of the 30 s window.

    frames, pooled_lengths = encode(tower, input_features, feature_attention_mask, trim=True)

Upstream (vLLM and transformers) pads every clip's mel features to the window (3000 frames)
and runs the whole encoder over it, then drops the padded outputs: for a 2 s clip that is
15x the work the audio holds. With trim=True, clips are sorted by length and encoded in
buckets of similar length (the longest at most `BUCKET_RATIO` times the shortest), each
bucket cut to its longest clip plus the few frames the convolutions reach past it; the
encoder's attention is restricted to each clip's real frames in both paths.

Why this is exact for Qwen2-Audio's (Whisper) encoder, up to float rounding:
- positional embeddings are absolute and added per position, so a prefix of the window
  gets the same ones as the full window;
- the two convolutions (kernel 3) reach at most 2 mel frames past a clip's last valid frame;
  the cut keeps `MEL_MARGIN` frames of the window's own padding, so those edge outputs see
  the same inputs as in the full window;
- padded positions are masked out of attention as keys (-inf), so valid positions never
  read them; layer norm, the MLP and the stride-2 average pool act per position (pairs);
- so valid output frames are the full-window ones; only the matmul shapes (and therefore
  float summation order) differ. The real 7B encoder has the same structure (32 layers,
  d=1280, 1500 positions), so the same holds there; its bf16 rounding is the only change.

Used by the vLLM fork (`Qwen2AudioSwapForConditionalGeneration`, switch `trim_audio_padding`
in config.json, default on) and by the HF twin alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MEL_MARGIN = 8  # mel frames kept past a bucket's longest clip (the convolutions reach 2)
BUCKET_RATIO = 1.25  # a bucket's longest clip is at most this times its shortest


def output_lengths(mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mel frames (100/s) -> (frames after the stride-2 conv, 50/s; after the avg-pool, 25/s)."""
    conv = (mel_lengths - 1) // 2 + 1
    return conv, (conv - 2) // 2 + 1


def buckets(lengths: list[int], ratio: float = BUCKET_RATIO) -> list[list[int]]:
    """Indices grouped by similar length: sorted, a new group whenever a clip is longer
    than `ratio` times its group's shortest."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and lengths[i] <= ratio * max(1, lengths[groups[-1][0]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def encode(
    tower, input_features: torch.Tensor, feature_attention_mask: torch.Tensor, trim: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mel features (B, n_mels, L) + mask (B, L) -> pooled frames (B, T, d_audio) and their
    valid lengths (B,). trim=False runs every clip over the full width L (upstream's
    computation, with the same masking); T is then L/4, else the longest clip's pooled
    length. `tower` is transformers' Qwen2AudioEncoder (the hub module names)."""
    mel_lengths = feature_attention_mask.sum(-1)
    conv_len, pooled_len = output_lengths(mel_lengths)
    width = input_features.shape[-1]
    if not trim:
        return _encode(tower, input_features, conv_len), pooled_len
    t_max = max(1, int(pooled_len.max()))
    out = None
    for group in buckets(mel_lengths.tolist()):
        idx = torch.tensor(group, device=input_features.device)
        keep = min(width, int(mel_lengths[idx].max()) + MEL_MARGIN)
        keep += keep % 2  # whole stride-2 steps
        frames = _encode(tower, input_features[idx, :, :keep], conv_len[idx])[:, :t_max]  # (b, <= T, d)
        if out is None:
            out = frames.new_zeros(input_features.shape[0], t_max, frames.shape[2])
        out[idx, : frames.shape[1]] = frames
    return out, pooled_len


def _encode(tower, input_features: torch.Tensor, conv_len: torch.Tensor) -> torch.Tensor:
    """The encoder's forward (conv stem, positions, layers, pool, norm) over the width given,
    attention restricted to the first conv_len[i] positions of clip i."""
    x = input_features.to(tower.conv1.weight.dtype)
    x = F.gelu(tower.conv2(F.gelu(tower.conv1(x)))).permute(0, 2, 1)  # (B, T_conv, d)
    B, T, _ = x.shape
    x = x + tower.embed_positions.weight[:T]
    padding = torch.arange(T, device=x.device)[None, :] >= conv_len.to(x.device)[:, None]  # (B, T)
    attn = torch.zeros((B, 1, T, T), dtype=x.dtype, device=x.device)
    attn.masked_fill_(padding[:, None, None, :], float("-inf"))
    for layer in tower.layers:
        x = layer(x, attn)
    x = tower.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)  # (B, T_conv // 2, d)
    return tower.layer_norm(x)
