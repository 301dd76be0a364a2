"""Checks of a checkpoint's projector weights against its config.json, shared by the
training side (checkpoint.load_model, validate_checkpoint) and the vLLM fork's weight
loader. Torch and projectors only: vLLM workers import this, never the training twin."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from transformers import Qwen2AudioConfig

from projectors import build_projector
from qwen2_audio_vllm.modalities import build_modality_projectors, modality_specs


def check_projector_weights(
    block: Mapping[str, Any],
    expected: Mapping[str, torch.Size],
    found: Mapping[str, torch.Size],
    partial: bool = False,
    prefix: str = "multi_modal_projector.",
) -> None:
    """Raise if the checkpoint's projector tensors (names under `prefix`) do not fit the
    declared projector. `partial`: `found` is only what was read so far, so absent keys are
    not yet missing."""
    exp = {k: tuple(v) for k, v in expected.items() if k.startswith(prefix)}
    got = {k: tuple(v) for k, v in found.items() if k.startswith(prefix)}
    if partial:
        exp = {k: v for k, v in exp.items() if k in got}
    if exp != got:
        missing = {k: exp[k] for k in exp.keys() - got.keys()}
        unexpected = {k: got[k] for k in got.keys() - exp.keys()}
        shapes = {k: (exp[k], got[k]) for k in exp.keys() & got.keys() if exp[k] != got[k]}
        raise ValueError(
            f"checkpoint weights {prefix}* do not match the declared projector {dict(block)}: "
            f"missing {missing or 'none'}; unexpected {unexpected or 'none'}; "
            f"shape (expected, found) {shapes or 'none'}. The projector block in config.json "
            "must describe the projector the weights were trained with."
        )


def declared_projector_shapes(config: Qwen2AudioConfig) -> dict[str, torch.Size]:
    """Weight name -> shape for every projector config.json declares (the audio projector
    and each extra modality's), built on the meta device: what a checkpoint must hold."""
    with torch.device("meta"):
        modules = {
            "multi_modal_projector": build_projector(config.projector, config.audio_config.d_model, config.text_config.hidden_size),
            "modality_projectors": build_modality_projectors(config),
        }
    return {f"{name}.{k}": v.shape for name, module in modules.items() for k, v in module.state_dict().items()}


def projector_blocks(config: Qwen2AudioConfig) -> list[tuple[Mapping[str, Any], str]]:
    """(config.json block, weight-name prefix) for the audio projector and each extra modality's."""
    blocks = [(config.projector, "multi_modal_projector.")]
    return blocks + [(m.projector, m.prefix) for m in modality_specs(config).values()]


def checked_projector_weights(
    config: Qwen2AudioConfig, weights: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass `weights` through, raising as soon as a projector tensor (audio or an extra
    modality's) does not fit config.json, and at the end if one is missing: the vLLM loader
    would otherwise fail with an assertion that names neither shape. The expected shapes come
    from config.json on the meta device, so a projector vLLM skipped (its modality's limit
    being 0) is still checked."""
    blocks = projector_blocks(config)
    expected = declared_projector_shapes(config)
    found: dict[str, torch.Size] = {}
    for name, tensor in weights:
        for block, prefix in blocks:
            if name.startswith(prefix):
                found[name] = tensor.shape
                check_projector_weights(block, expected, found, partial=True, prefix=prefix)
        yield name, tensor
    for block, prefix in blocks:
        check_projector_weights(block, expected, found, prefix=prefix)
