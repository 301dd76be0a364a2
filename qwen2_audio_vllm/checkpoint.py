"""Checkpoint format and I/O: export, load and validate Qwen2-Audio directories with a swappable projector.

A checkpoint is a standard Qwen2-Audio directory (config.json, tokenizer, processor,
model.safetensors in the hub key layout) whose config.json says
`"architectures": ["Qwen2AudioSwapForConditionalGeneration"]` and carries a
`"projector": {"name": ..., ...}` block (see projectors.projector_block). With the package
installed, `vllm serve <dir>` and `vllm.LLM(<dir>)` load it through the plugin.

Beside it: tiny.py builds the tiny model, adoption.py adopts a released directory,
derive.py makes new checkpoints from existing ones.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GenerationConfig,
    Qwen2AudioConfig,
    Qwen2AudioProcessor,
)

from qwen2_audio_vllm.hf import STOP_TOKENS, Qwen2AudioSwap
from qwen2_audio_vllm.modalities import modality_specs
from qwen2_audio_vllm.plugin import ARCHITECTURE  # noqa: E402  (one name, one place)
from qwen2_audio_vllm.validation import (
    check_projector_weights,
    declared_projector_shapes,
    projector_blocks,
)

UPSTREAM_ARCHITECTURE = "Qwen2AudioForConditionalGeneration"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Shard size of exported checkpoints: one file up to this size, else shards + index.json
# (a 7B export is ~16 GB in bfloat16).
MAX_SHARD_BYTES = 5 * 2**30
# What the hub directory of Qwen/Qwen2-Audio-7B-Instruct holds besides its weight shards.
HUB_FILES = (
    "config.json", "generation_config.json", WEIGHTS_INDEX, "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]


def cache_root() -> Path:
    """Where built models, data and encoder caches live (outside clones, shared by CI)."""
    return Path(os.environ.get("Q2AP_CACHE", Path.home() / ".cache" / "qwen2-audio-projectors"))


@contextlib.contextmanager
def cache_lock(entry: Path) -> Iterator[None]:
    """Hold the build of the cache entry `entry` (a directory) exclusively, through a lock
    file beside it: processes that need the same entry at once (a joblib sweep, parallel
    test workers) build it once, the others wait here and then find it built. Check for the
    entry inside the block."""
    import fcntl

    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def save_checkpoint(
    model: Qwen2AudioSwap,
    processor: Qwen2AudioProcessor,
    out_dir: str | Path,
    hub_layout: bool = False,
    shards: int | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Export `model` as a vLLM-loadable directory: hub key layout, projector block,
    architecture of the fork. Written into a temp dir and renamed, so a reader never sees
    a half-written checkpoint (a run killed mid-export leaves only `<out_dir>.tmp-*`,
    removed by the next export).

    hub_layout: write what the released hub directory looks like instead: upstream
    architecture, no projector block, bfloat16 weights in `shards` files (default 2) with
    model.safetensors.index.json, preprocessor_config.json, vocab.json and merges.txt.
    weights: the tensors to write, when not `model.state_dict()` (align writes the base's
    own frozen tensors, not their bf16 training copies)."""
    from projectors import projector_block

    out_dir = Path(out_dir)
    tmp = fresh_tmp_dir(out_dir)
    config = copy.deepcopy(model.config)
    if hub_layout:
        config.architectures = [UPSTREAM_ARCHITECTURE]
        config.__dict__.pop("projector", None)
        config.dtype = "bfloat16"
    else:
        config.projector = projector_block(model.multi_modal_projector)
        for name, projector in getattr(model, "modality_projectors", {}).items():
            config.modalities[name] = dict(config.modalities[name], projector=projector_block(projector))
        config.architectures = [ARCHITECTURE]
    config.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tok = processor.tokenizer
    GenerationConfig(
        eos_token_id=tok.convert_tokens_to_ids(STOP_TOKENS),
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    ).save_pretrained(tmp)
    state = {k: v.detach().contiguous().cpu() for k, v in (weights or model.state_dict()).items()
             if k not in tied_keys(config)}
    if hub_layout:
        processor.feature_extractor.save_pretrained(tmp)  # preprocessor_config.json
        (tmp / "processor_config.json").unlink(missing_ok=True)  # the hub has none
        tok.backend_tokenizer.model.save(str(tmp))  # vocab.json + merges.txt
        state = {k: v.to(torch.bfloat16) for k, v in state.items()}
        write_weights(state, tmp, shards=shards or 2)
    else:
        write_weights(state, tmp, shards=shards)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def tied_keys(config: Qwen2AudioConfig) -> set[str]:
    """Weights a checkpoint does not store because they are another's (a tied LM head is the
    token embedding), as the hub's and vLLM's loaders expect."""
    return {"language_model.lm_head.weight"} if config.text_config.tie_word_embeddings else set()


def fresh_tmp_dir(out_dir: Path) -> Path:
    """A new temp dir beside `out_dir`, unique per process; stale ones of killed runs go."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f"{out_dir.name}.tmp-*"):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def write_weights(state: Mapping[str, torch.Tensor], out_dir: Path, shards: int | None = None) -> list[Path]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + model.safetensors.index.json
    (the hub's layout) when `shards` > 1 is asked for or the weights exceed MAX_SHARD_BYTES."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    n = shards or max(1, -(-total // MAX_SHARD_BYTES))
    if n == 1:
        save_file(dict(state), out_dir / WEIGHTS, metadata={"format": "pt"})
        return [out_dir / WEIGHTS]
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    budget, filled, i = total / n, 0, 0
    for key, tensor in state.items():  # contiguous key ranges, about total/n bytes each
        if filled >= budget * (i + 1) and i < n - 1:
            i += 1
        groups[i][key] = tensor
        filled += tensor.numel() * tensor.element_size()
    names = [f"model-{j + 1:05d}-of-{n:05d}.safetensors" for j in range(n)]
    for name, group in zip(names, groups, strict=True):
        save_file(group, out_dir / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[j] for j, g in enumerate(groups) for k in g}}
    (out_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))
    return [out_dir / name for name in names]


def weight_files(ckpt_dir: str | Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights (the index's shards, if any)."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / WEIGHTS_INDEX).is_file():
        names = sorted(set(json.loads((ckpt_dir / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        return [ckpt_dir / n for n in names]
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir} holds no *.safetensors weights")
    return files


def read_weights(
    ckpt_dir: str | Path, skip_prefix: str | None = None, only_prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (CPU, as stored), optionally without those under
    `skip_prefix` or only those under `only_prefix`; the others are never read."""
    from safetensors import safe_open

    out = {}
    for f in weight_files(ckpt_dir):
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                if not (skip_prefix and key.startswith(skip_prefix)) and (not only_prefix or key.startswith(only_prefix)):
                    out[key] = handle.get_tensor(key)
    return out


def stored_shapes(ckpt_dir: str | Path, prefixes: tuple[str, ...] = ()) -> dict[str, torch.Size]:
    """Name -> shape of every stored tensor (or those under `prefixes`), from the headers."""
    from safetensors import safe_open

    shapes = {}
    for f in weight_files(ckpt_dir):
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                if not prefixes or key.startswith(prefixes):
                    shapes[key] = torch.Size(handle.get_slice(key).get_shape())
    return shapes


def weights_stamp(ckpt_dir: str | Path) -> list[float]:
    """Modification times of a checkpoint's weight files: part of a stage key, so a
    re-exported checkpoint is evaluated anew."""
    return [f.stat().st_mtime for f in weight_files(ckpt_dir)]


def load_config(ckpt_dir: str | Path, projector: Mapping[str, Any] | None = None) -> Qwen2AudioConfig:
    """config.json of a checkpoint, optionally with a different projector block."""
    config = Qwen2AudioConfig.from_pretrained(ckpt_dir)
    if projector is not None:
        config.projector = dict(projector)
    if not isinstance(getattr(config, "projector", None), Mapping):
        raise ValueError(
            f"{ckpt_dir}/config.json has no 'projector' block; expected e.g. "
            '"projector": {"name": "linear", "stack": 1}. Add one (a released Qwen2-Audio '
            'checkpoint uses {"name": "linear", "stack": 1}).'
        )
    return config


def load_model(
    ckpt_dir: str | Path,
    projector: Mapping[str, Any] | None = None,
    load_projector: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Qwen2AudioSwap:
    """The HF twin with the checkpoint's weights, built directly on `device` in `dtype`
    (weights are read shard by shard, never a second full copy). With `projector` given,
    that projector is built instead of the checkpoint's, freshly initialised
    (load_projector=False) or loaded."""
    config = load_config(ckpt_dir, projector)
    with torch.device(device), default_dtype(dtype):
        model = Qwen2AudioSwap(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied_keys(config)}
    found = stored_shapes(ckpt_dir)  # headers only: mismatches are named before any loading
    if load_projector:
        for block, prefix in projector_blocks(config):
            check_projector_weights(block, expected, found, prefix=prefix)
    else:
        found = {k: v for k, v in found.items() if not k.startswith("multi_modal_projector.")}
    for f in weight_files(ckpt_dir):
        state = {k: v for k, v in load_file(f, device=str(device)).items() if k in found}
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{f} holds weights this model does not have: {unexpected[:5]} (of {len(unexpected)})")
    missing = sorted(set(expected) - set(found))
    if not load_projector:
        missing = [k for k in missing if not k.startswith("multi_modal_projector.")]
    if missing:
        raise ValueError(f"{ckpt_dir} lacks weights {missing[:5]} (of {len(missing)}); is it a complete Qwen2-Audio checkpoint?")
    return model.eval()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules in `dtype` (a 7B model never exists in float32)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def load_processor(ckpt_dir: str | Path) -> Qwen2AudioProcessor:
    return Qwen2AudioProcessor.from_pretrained(ckpt_dir)


def validate_checkpoint(ckpt_dir: str | Path) -> Qwen2AudioConfig:
    """Cheap checks before an engine starts (reads config and safetensors headers only):
    the projector block builds for the base dims, the weights fit it, the tokenizer has
    every special token. Raises ValueError naming expected vs found."""

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").is_file():
        raise ValueError(f"{ckpt_dir} is not a checkpoint directory (no config.json)")
    config = load_config(ckpt_dir)
    expected = declared_projector_shapes(config)
    found = stored_shapes(ckpt_dir, ("multi_modal_projector.", "modality_projectors."))
    for block, prefix in projector_blocks(config):
        check_projector_weights(block, expected, found, prefix=prefix)
    vocab = json.loads((ckpt_dir / "tokenizer.json").read_text())["added_tokens"] if (ckpt_dir / "tokenizer.json").exists() else []
    have = {t["content"]: t["id"] for t in vocab}
    if vocab and (missing := [t for t in SPECIAL_TOKENS if t not in have]):
        raise ValueError(
            f"{ckpt_dir}/tokenizer.json lacks special tokens {missing}; expected all of {SPECIAL_TOKENS}"
        )
    for m in modality_specs(config).values():
        if vocab and have.get(m.token) != m.token_id:
            raise ValueError(
                f"config.json modality {m.name!r} uses placeholder {m.token} = id {m.token_id}, but "
                f"tokenizer.json has {m.token} = {have.get(m.token)}; re-create it with add_modalities()"
            )
    return config


