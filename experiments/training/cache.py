"""Encoder-output cache: the frozen audio tower's pooled frames, computed once per
(model, feature extractor, manifest) and stored as safetensors shards + index.json.

    frames, lengths = load_or_build(model, processor, rows, cache_dir)  # list of (T_i, d_audio)

Built on the model's device (GPU in bf16 for 7B) in batches of clips of similar length,
each batch encoded over its own trimmed length (not the 30 s window), and stored in half
precision (`store_dtype`, float16 by default: half the bytes, relative rounding 5e-4);
`cache_info` reports its size. The index records a hash of the audio-tower weights (so a
tower in another precision gets its own cache), of the feature-extractor settings, of the
manifest rows, the storage dtype, and the sha256 of every shard. A cache whose key differs
or whose shard fails its checksum is rebuilt, never silently used.
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

from experiments.data.audio import load_audio
from experiments.report import write_json_atomic
from qwen2_audio_vllm.checkpoint import cache_lock
from qwen2_audio_vllm.encoder import mel_features, pad_mels
from qwen2_audio_vllm.hf import Qwen2AudioSwap

SHARD = 512  # clips per shard


@torch.no_grad()
def encoder_frames(model: Qwen2AudioSwap, fe, audios: list[np.ndarray]) -> list[torch.Tensor]:
    """Pooled encoder frames of each clip, (T_i, d_audio) on the CPU in the tower's dtype:
    what the cache stores and what a request may carry as `audio_frames`. Runs on the
    model's device."""
    device = model.audio_tower.conv1.weight.device
    feats, mask = pad_mels([mel_features(fe, a) for a in audios])
    frames, lengths = model.encode_audio(feats.to(device), mask.to(device), trim=True)
    return [f[:n].to("cpu", copy=True) for f, n in zip(frames, lengths.tolist(), strict=True)]


def tower_hash(model: Qwen2AudioSwap) -> str:
    return weights_hash(model.audio_tower)


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 (16 hex) over a module's weights by name, in float32."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_dir_for(model: Qwen2AudioSwap, rows: list[dict], chunk_samples: int | None = None) -> Path:
    """Where the frames of `model`'s tower over `rows` are cached: named by the tower's
    weights and the rows, so pretraining and every align over the same tower share one cache."""
    from qwen2_audio_vllm.checkpoint import cache_root

    manifest = hashlib.sha256(json.dumps([(r["audio_filepath"], r["text"]) for r in rows]).encode()).hexdigest()[:12]
    return cache_root() / "encoder" / (f"tower-{tower_hash(model)}-{manifest}" + (f"-chunk{chunk_samples}" if chunk_samples else ""))


def cache_key(model: Qwen2AudioSwap, processor, rows: list[dict], store_dtype: torch.dtype = torch.float16,
              chunk_samples: int | None = None) -> dict[str, str]:
    fe = processor.feature_extractor
    fe_json = json.dumps(fe.to_dict(), sort_keys=True, default=str)
    manifest = json.dumps([(r["audio_filepath"], r["text"]) for r in rows])
    key = {
        "audio_tower": tower_hash(model),
        "feature_extractor": hashlib.sha256(fe_json.encode()).hexdigest()[:16],
        "manifest": hashlib.sha256(manifest.encode()).hexdigest()[:16],
        "store_dtype": str(store_dtype),
    }
    return key | ({"chunk_samples": str(chunk_samples)} if chunk_samples else {})


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
def build(
    model: Qwen2AudioSwap, processor, rows: list[dict], cache_dir: Path, key: dict[str, str],
    batch_size: int = 16, store_dtype: torch.dtype = torch.float16, chunk_samples: int | None = None,
) -> None:
    """Encode every row (batches of similar duration, so trimming pays) and write the shards
    into a temp dir renamed into place: a killed build leaves no cache that looks valid.
    With `chunk_samples`, each row is cut into chunks (windows.chunks) encoded one by one,
    stored as frames_<row>_<chunk>."""
    from qwen2_audio_vllm.checkpoint import fresh_tmp_dir
    from qwen2_audio_vllm.windows import chunks

    tmp = fresh_tmp_dir(cache_dir)
    fe = processor.feature_extractor
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: rows[i].get("duration", 0.0))
    frames: dict[str, torch.Tensor] = {}
    pieces: dict[int, int] = {}
    for start in tqdm(range(0, len(rows), batch_size), desc="encoder cache", unit="batch"):
        batch = order[start : start + batch_size]
        audios = {i: load_audio(rows[i]["audio_filepath"]) for i in batch}
        items = {i: chunks(a, chunk_samples) if chunk_samples else [a] for i, a in audios.items()}
        names = [f"frames_{i}_{j}" if chunk_samples else f"frames_{i}" for i in batch for j in range(len(items[i]))]
        for name, f in zip(names, encoder_frames(model, fe, [x for i in batch for x in items[i]]), strict=True):
            frames[name] = f.to(store_dtype)
        pieces |= {i: len(items[i]) for i in batch}
    shards = []
    for n_shard, first in enumerate(range(0, len(rows), SHARD)):
        name = f"shard_{n_shard:05d}.safetensors"
        mine = range(first, min(len(rows), first + SHARD))
        save_file({k: frames[k] for k in frames if int(k.split("_")[1]) in mine}, tmp / name)
        shards.append({"file": name, "sha256": _sha256(tmp / name), "n": len(mine)})
    nbytes = sum((tmp / s["file"]).stat().st_size for s in shards)
    index = {"key": key, "n": len(rows), "bytes": nbytes, "dtype": str(store_dtype), "shards": shards}
    if chunk_samples:
        index["pieces"] = [pieces[i] for i in range(len(rows))]
    write_json_atomic(tmp / "index.json", index)
    shutil.rmtree(cache_dir, ignore_errors=True)
    try:
        tmp.rename(cache_dir)
    except OSError:  # a parallel job renamed its identical cache first
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_build(
    model: Qwen2AudioSwap, processor, rows: list[dict], cache_dir: Path,
    batch_size: int = 16, store_dtype: torch.dtype = torch.float16, chunk_samples: int | None = None,
) -> tuple[list, torch.Tensor]:
    """Pooled encoder frames per manifest row, (T_i, d_audio) in `store_dtype`, and their
    lengths (N,). With `chunk_samples`: per row the list of its chunks' frames, and the
    rows' total lengths."""
    key = cache_key(model, processor, rows, store_dtype, chunk_samples)
    with cache_lock(cache_dir):
        if not is_valid(cache_dir, key):
            if (cache_dir / "index.json").exists():
                print(f"[cache] {cache_dir} is stale or corrupt; rebuilding")
            build(model, processor, rows, cache_dir, key, batch_size, store_dtype, chunk_samples)
        index = json.loads((cache_dir / "index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in index["shards"]:
        tensors.update(load_file(cache_dir / shard["file"]))
    # clone: load_file maps the shard, and a later rebuild replaces that file
    if "pieces" in index:
        frames = [[tensors[f"frames_{i}_{j}"].clone() for j in range(n)] for i, n in enumerate(index["pieces"])]
        return frames, torch.tensor([sum(f.shape[0] for f in row) for row in frames])
    frames = [tensors[f"frames_{i}"].clone() for i in range(len(rows))]
    return frames, torch.tensor([f.shape[0] for f in frames])


def cache_info(cache_dir: Path) -> dict:
    """What a built cache holds: clips, bytes on disk, storage dtype, audio frames."""
    index = json.loads((cache_dir / "index.json").read_text())
    return {"dir": str(cache_dir), "clips": index["n"], "bytes": index["bytes"], "dtype": index["dtype"]}


def pad_frames(frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(T_i, d)] -> (B, T_max, d) zero-padded, lengths (B,)."""
    lengths = torch.tensor([f.shape[0] for f in frames])
    return torch.nn.utils.rnn.pad_sequence(frames, batch_first=True), lengths
