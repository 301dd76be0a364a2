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

Used by the HF twin and the encoder cache, over transformers' module. The vLLM fork's tower
(tower.py, built from vLLM's layers) does the same cut, with the clips packed into one
sequence; `trim_audio_padding` in config.json (default on) switches both. The pieces both
share are here, one implementation each: the lengths (`output_lengths`), the width a clip
keeps (`kept_width`), the conv stem with positions (`conv_stem`) and the pool before the
final norm (`pool_and_norm`); they read the modules' common names (conv1, conv2,
embed_positions, layer_norm).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MEL_MARGIN = 8  # mel frames kept past a bucket's longest clip (the convolutions reach 2)
BUCKET_RATIO = 1.25  # a bucket's longest clip is at most this times its shortest


def trim_audio_padding(config) -> bool:
    """config.json's "trim_audio_padding" (default true): encode, and compute the mel of,
    each clip's real frames rather than the window."""
    return getattr(config, "trim_audio_padding", True)


def mel_features(fe, audio: np.ndarray) -> tuple[torch.Tensor, int]:
    """(n_mels, L + MEL_MARGIN) log-mel of one clip and its L real frames, equal to the first
    frames of the window-padded features transformers' processor computes, at a fraction of
    the cost. The waveform is zero-padded just far enough that every kept frame's STFT sees
    what it sees in the padded window (zeros after the clip, never the reflection at the
    signal's end), and the normalisation's max comes from the real frames either way. A clip
    within that margin of the window is computed over the whole window, as transformers does."""
    n = min(len(audio) + (MEL_MARGIN + 2) * fe.hop_length, fe.n_samples)
    feats = fe(audio, sampling_rate=fe.sampling_rate, padding="max_length", max_length=n,
               return_attention_mask=True, return_tensors="pt")
    length = int(feats["attention_mask"].sum())
    return feats["input_features"][0, :, : min(length + MEL_MARGIN, fe.nb_max_frames)], length


def pad_mels(mels: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(n_mels, L_i + margin), L_i] -> features (B, n_mels, width) padded with each clip's
    last (silence) column, and the mel attention mask (B, width)."""
    width = max(m.shape[1] for m, _ in mels)
    feats = torch.stack([torch.cat([m, m[:, -1:].expand(-1, width - m.shape[1])], 1) for m, _ in mels])
    mask = torch.arange(width)[None, :] < torch.tensor([n for _, n in mels])[:, None]
    return feats, mask.long()


def output_lengths(mel_lengths: torch.Tensor | int) -> tuple[torch.Tensor | int, torch.Tensor | int]:
    """Mel frames (100/s) -> (frames after the stride-2 conv, 50/s; after the avg-pool, 25/s)."""
    conv = (mel_lengths - 1) // 2 + 1
    return conv, (conv - 2) // 2 + 1


def kept_width(width: int, conv_len: int) -> int:
    """Mel frames kept of a (batch of) clip(s) whose longest has `conv_len` frames after the
    conv stem: its real frames (2 * conv_len >= its mel length) plus MEL_MARGIN, at most the
    window's `width`, in whole stride-2 steps."""
    keep = min(width, 2 * conv_len + MEL_MARGIN)
    return keep + keep % 2


def conv_stem(module, features: torch.Tensor) -> torch.Tensor:
    """Mel features (B, n_mels, L) -> (B, (L - 1) // 2 + 1, d): the two convolutions (GELU,
    the second with stride 2) plus the absolute positions."""
    x = F.gelu(module.conv2(F.gelu(module.conv1(features.to(module.conv1.weight.dtype))))).transpose(1, 2)
    return x + module.embed_positions.weight[: x.shape[1]]


def pool_and_norm(module, x: torch.Tensor) -> torch.Tensor:
    """(..., T, d) encoder frames -> (..., T // 2, d): Qwen2-Audio's stride-2 average pool (a
    trailing odd frame dropped), then the final layer norm."""
    pairs = x.shape[-2] // 2
    return module.layer_norm(x[..., : 2 * pairs, :].unflatten(-2, (pairs, 2)).mean(-2))


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
    conv_len, pooled_len = output_lengths(feature_attention_mask.sum(-1))
    return encode_frames(tower, input_features, conv_len, trim), pooled_len


def encode_frames(tower, input_features: torch.Tensor, conv_len: torch.Tensor, trim: bool = True) -> torch.Tensor:
    """`encode` given each clip's length after the conv stem (50/s) instead of its mel mask."""
    if not trim:
        return _encode(tower, input_features, conv_len)
    width = input_features.shape[-1]
    t_max = max(1, (int(conv_len.max()) - 2) // 2 + 1)  # pooled frames of the longest clip
    groups = buckets(conv_len.tolist())
    if len(groups) == 1:  # one bucket: cut the batch in place, no gather and scatter copies
        keep = kept_width(width, int(conv_len.max()))
        return _encode(tower, input_features[..., :keep], conv_len)[:, :t_max]
    out = None
    for group in groups:
        idx = torch.tensor(group, device=input_features.device)
        keep = kept_width(width, int(conv_len[idx].max()))
        frames = _encode(tower, input_features[idx, :, :keep], conv_len[idx])[:, :t_max]  # (b, <= T, d)
        if out is None:
            out = frames.new_zeros(input_features.shape[0], t_max, frames.shape[2])
        out[idx, : frames.shape[1]] = frames
    return out


def _encode(tower, input_features: torch.Tensor, conv_len: torch.Tensor, pool: bool = True) -> torch.Tensor:
    """The encoder's forward (conv stem, positions, layers, pool, norm) over the width given,
    attention restricted to the first conv_len[i] positions of clip i. pool=False skips the
    average pool: Whisper's own encoder output (50/s), which Qwen2-Audio pools before its
    final layer norm."""
    x = conv_stem(tower, input_features)  # (B, T_conv, d)
    B, T, _ = x.shape
    padding = torch.arange(T, device=x.device)[None, :] >= conv_len.to(x.device)[:, None]  # (B, T)
    # (B, 1, 1, T), broadcast over heads and queries: upstream materialises (B, 1, T, T)
    attn = torch.zeros((B, 1, 1, T), dtype=x.dtype, device=x.device)
    attn.masked_fill_(padding[:, None, None, :], float("-inf"))
    for layer in tower.layers:
        x = layer(x, attn)
    return pool_and_norm(tower, x) if pool else tower.layer_norm(x)
