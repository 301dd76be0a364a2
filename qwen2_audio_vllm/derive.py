"""New checkpoints from existing ones: a fresh projector in place of the base's
(`derive_checkpoint`), or extra embedding modalities with their placeholder tokens and
projectors (`add_modalities`; as a command: `python -m experiments.derive`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from qwen2_audio_vllm.checkpoint import load_model, load_processor, save_checkpoint
from qwen2_audio_vllm.modalities import DEFAULT_MAX_LEN, build_modality_projectors, modality_specs


def derive_checkpoint(
    base_dir: str | Path, projector: Mapping[str, Any], out_dir: str | Path, seed: int = 0
) -> Path:
    """A copy of `base_dir` with a freshly initialised (seeded) `projector` in place of its own."""
    torch.manual_seed(seed)
    model = load_model(base_dir, projector=projector, load_projector=False)
    return save_checkpoint(model, load_processor(base_dir), out_dir)


def add_modalities(
    src_dir: str | Path, out_dir: str | Path, specs: Mapping[str, Mapping[str, Any]], seed: int = 0
) -> Path:
    """A copy of checkpoint `src_dir` with extra modalities, e.g.
    `{"m2": {"in_dim": 512, "projector": {"name": "linear"}}}` (optional: "token",
    default `<|M2|>`; "max_len"). Each gets a new special placeholder token and a freshly
    initialised (seeded) projector. `src_dir` is a checkpoint this repo reads (one
    model.safetensors with a "projector" block; for a released 7B directory use
    adopt_checkpoint first, and expect a float32 copy). When a token id lands past the LLM vocabulary, the
    embedding and output rows grow by copies of `<|AUDIO|>`'s rows: a placeholder's
    embedding is always replaced, and like `<|AUDIO|>` it was never a training target, so a
    trained model does not emit it."""
    for name, spec in specs.items():  # before loading anything
        if missing := {"in_dim", "projector"} - set(spec):
            raise ValueError(f"modality {name!r} needs {sorted(missing)}, e.g. {{'in_dim': 768, 'projector': {{'name': 'linear'}}}}")
    processor = load_processor(src_dir)
    tokenizer = processor.tokenizer
    model = load_model(src_dir)
    config = model.config
    block = dict(getattr(config, "modalities", None) or {})
    tokens = {name: spec.get("token", f"<|{name.upper()}|>") for name, spec in specs.items()}
    known = set(tokenizer.get_vocab())
    if clash := sorted(set(block) & set(specs)) or sorted(t for t in tokens.values() if t in known):
        raise ValueError(f"{src_dir} already has {clash}; pick new modality names and tokens")
    tokenizer.add_tokens(list(tokens.values()), special_tokens=True)
    for name, spec in specs.items():
        block[name] = {
            "in_dim": spec["in_dim"],
            "token": tokens[name],
            "token_id": tokenizer.convert_tokens_to_ids(tokens[name]),
            "max_len": spec.get("max_len", DEFAULT_MAX_LEN),
            "projector": dict(spec["projector"]),
        }
    _grow_vocab(model, len(tokenizer))
    config.modalities = block
    modality_specs(config)  # validate before building
    torch.manual_seed(seed)
    fresh = build_modality_projectors(config)
    if hasattr(model, "modality_projectors"):
        for name, projector in model.modality_projectors.items():
            fresh[name] = projector  # existing modalities keep their weights
    model.modality_projectors = fresh
    return save_checkpoint(model, processor, out_dir)


def _grow_vocab(model: nn.Module, size: int) -> None:
    lm = model.language_model
    old = lm.get_input_embeddings().weight.shape[0]
    if size <= old:
        return  # the released 7B model's vocabulary has spare rows
    audio = model.config.audio_token_id
    lm.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for weight in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight):
            weight[old:] = weight[audio]
