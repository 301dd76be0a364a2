"""Encoder-output cache: the frozen audio tower's pooled frames, computed once per
(model, feature extractor, manifest) and stored as safetensors shards + index.json.

    frames, lengths = load_or_build(model, processor, rows, cache_dir)  # list of (T_i, d_audio)

The index records a hash of the audio-tower weights, of the feature-extractor settings, of
the manifest rows, and the sha256 of every shard. A cache whose key differs or whose shard
fails its checksum is rebuilt, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from experiments.audio import load_audio
from experiments.report import write_json_atomic
from qwen2_audio_vllm.hf import Qwen2AudioSwap

SHARD = 512  # clips per shard
MEL_MARGIN = 8  # mel frames kept past a clip: the encoder convolutions reach 2 frames


def mel_features(fe, audio: np.ndarray) -> torch.Tensor:
    """(n_mels, L + margin) log-mel of one clip, equal to the first frames of the 30 s padded
    features vLLM computes (the waveform is zero-padded just far enough for the STFT), at a
    fraction of the cost."""
    n = len(audio) + (MEL_MARGIN + 2) * fe.hop_length
    feats = fe(audio, sampling_rate=fe.sampling_rate, padding="max_length", max_length=n,
               return_attention_mask=True, return_tensors="pt")
    length = int(feats["attention_mask"].sum())
    return feats["input_features"][0, :, : length + MEL_MARGIN], length


def pad_mels(mels: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(n_mels, L_i), valid L_i] -> features (B, n_mels, L_max) padded with each clip's last
    (silence) column, and the mel attention mask (B, L_max)."""
    width = max(m.shape[1] for m, _ in mels)
    feats = torch.stack([torch.cat([m, m[:, -1:].expand(-1, width - m.shape[1])], 1) for m, _ in mels])
    mask = torch.arange(width)[None, :] < torch.tensor([n for _, n in mels])[:, None]
    return feats, mask.long()


@torch.no_grad()
def encoder_frames(model: Qwen2AudioSwap, fe, audios: list[np.ndarray]) -> list[torch.Tensor]:
    """Pooled encoder frames of each clip, (T_i, d_audio): what the cache stores and what a
    request may carry as `audio_frames`."""
    frames, lengths = model.encode_audio(*pad_mels([mel_features(fe, a) for a in audios]), trim=True)
    return [f[:n].contiguous().clone() for f, n in zip(frames, lengths.tolist(), strict=True)]


def tower_hash(model: Qwen2AudioSwap) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.audio_tower.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(model: Qwen2AudioSwap, processor, rows: list[dict]) -> dict[str, str]:
    fe = processor.feature_extractor
    fe_json = json.dumps(fe.to_dict(), sort_keys=True, default=str)
    manifest = json.dumps([(r["audio_filepath"], r["text"]) for r in rows])
    return {
        "audio_tower": tower_hash(model),
        "feature_extractor": hashlib.sha256(fe_json.encode()).hexdigest()[:16],
        "manifest": hashlib.sha256(manifest.encode()).hexdigest()[:16],
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_valid(cache_dir: Path, key: dict[str, str]) -> bool:
    index = cache_dir / "index.json"
    if not index.exists():
        return False
    meta = json.loads(index.read_text())
    if meta.get("key") != key:
        return False
    return all(
        (cache_dir / s["file"]).exists() and _sha256(cache_dir / s["file"]) == s["sha256"] for s in meta["shards"]
    )


@torch.no_grad()
def build(model: Qwen2AudioSwap, processor, rows: list[dict], cache_dir: Path, key: dict[str, str], batch_size: int = 16) -> None:
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fe = processor.feature_extractor
    model.eval()
    shards, current, n_shard = [], {}, 0
    for start in tqdm(range(0, len(rows), batch_size), desc="encoder cache", unit="batch"):
        chunk = rows[start : start + batch_size]
        for i, f in enumerate(encoder_frames(model, fe, [load_audio(r["audio_filepath"]) for r in chunk])):
            current[f"frames_{start + i}"] = f
        if len(current) >= SHARD or start + batch_size >= len(rows):
            name = f"shard_{n_shard:05d}.safetensors"
            save_file(current, tmp / name)
            shards.append({"file": name, "sha256": _sha256(tmp / name), "n": len(current)})
            current, n_shard = {}, n_shard + 1
    write_json_atomic(tmp / "index.json", {"key": key, "n": len(rows), "shards": shards})
    shutil.rmtree(cache_dir, ignore_errors=True)
    tmp.rename(cache_dir)


def load_or_build(model: Qwen2AudioSwap, processor, rows: list[dict], cache_dir: Path) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pooled encoder frames per manifest row, (T_i, d_audio), and their lengths (N,)."""
    key = cache_key(model, processor, rows)
    if not is_valid(cache_dir, key):
        if (cache_dir / "index.json").exists():
            print(f"[cache] {cache_dir} is stale or corrupt; rebuilding")
        build(model, processor, rows, cache_dir, key)
    tensors: dict[str, torch.Tensor] = {}
    for shard in json.loads((cache_dir / "index.json").read_text())["shards"]:
        tensors.update(load_file(cache_dir / shard["file"]))
    # clone: load_file maps the shard, and a later rebuild replaces that file
    frames = [tensors[f"frames_{i}"].clone() for i in range(len(rows))]
    return frames, torch.tensor([f.shape[0] for f in frames])


def pad_frames(frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(T_i, d)] -> (B, T_max, d) zero-padded, lengths (B,)."""
    lengths = torch.tensor([f.shape[0] for f in frames])
    return torch.nn.utils.rnn.pad_sequence(frames, batch_first=True), lengths
