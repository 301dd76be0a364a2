"""Extra input modalities: embeddings from other encoders, each through its own
projector, merged into the prompt at its own placeholder token.

config.json declares them beside the audio "projector" block:

    "modalities": {
      "m1": {"in_dim": 768, "token": "<|M1|>", "token_id": 1006, "max_len": 512,
             "projector": {"name": "mlp", "stack": 1}},
      "m2": {"in_dim": 512, "token": "<|M2|>", "token_id": 1007, "max_len": 512,
             "projector": {"name": "linear", "stack": 1}}
    }

A request carries `multi_modal_data={"m1": tensor (n, 768) or a list of them, "m2": ...}`
and its prompt holds one `<|M1|>` per m1 item; vLLM (the fork) and the HF twin replace that
token by the item's `projector.output_lengths(n)` projected rows. The projectors are the
`projectors/` families, weights under `modality_projectors.<name>.*`.
`derive.add_modalities` turns any checkpoint into one with extra modalities (new
placeholder tokens, freshly initialised projectors). Pure torch: no vLLM import, and no
import of checkpoint code (derive.py and checkpoint.py import this module).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from projectors import build_projector

# vLLM's own modality names: a request's multi_modal_data keys must map to one parser.
RESERVED = frozenset({"audio", "image", "video", "vision_chunk"})
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}$")
# Rows per item. Kept so that a modality's tokens per item stay below one audio window's
# (750 for the linear connector): vLLM profiles memory with the modality that has the most
# tokens per item, and that should stay the audio encoder, the expensive one.
DEFAULT_MAX_LEN = 512


@dataclass(frozen=True)
class Modality:
    name: str
    in_dim: int
    token: str
    token_id: int
    max_len: int
    projector: Mapping[str, Any]

    @property
    def key(self) -> str:
        """The model keyword (and processed-input field) carrying this modality's rows."""
        return f"{self.name}_embeds"

    @property
    def prefix(self) -> str:
        """Its projector's weight names in the checkpoint."""
        return f"modality_projectors.{self.name}."


def modality_specs(config: Any) -> dict[str, Modality]:
    """config.json's "modalities" block, validated; {} when there is none."""
    block = getattr(config, "modalities", None) or {}
    if not isinstance(block, Mapping):
        raise ValueError(f"config.json 'modalities' must be a mapping of name -> spec, got {type(block).__name__}")
    out = {}
    for name, spec in block.items():
        where = f"config.json modalities.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name) or name in RESERVED:
            raise ValueError(
                f"{where}: modality names are lowercase identifiers other than {sorted(RESERVED)}"
            )
        missing = {"in_dim", "token", "token_id", "projector"} - set(spec)
        if missing:
            raise ValueError(f"{where} lacks {sorted(missing)}; add_modalities() writes a complete block")
        in_dim, max_len = spec["in_dim"], spec.get("max_len", DEFAULT_MAX_LEN)
        if not (isinstance(in_dim, int) and in_dim > 0 and isinstance(max_len, int) and max_len > 0):
            raise ValueError(f"{where}: in_dim and max_len must be positive integers, got {in_dim!r}, {max_len!r}")
        declared = dict(spec["projector"]).get("in_dim", in_dim)
        if declared != in_dim:
            raise ValueError(
                f"{where}: in_dim={in_dim} but its projector block declares in_dim={declared}; "
                "they must agree (the projector's input is this modality's embedding width)"
            )
        token_id = int(spec["token_id"])
        vocab = config.text_config.vocab_size if hasattr(config, "text_config") else None
        if token_id == getattr(config, "audio_token_id", None) or (vocab is not None and not 0 <= token_id < vocab):
            raise ValueError(
                f"{where}: token_id={token_id} must be a new token inside the LLM vocabulary "
                f"(0..{vocab}) and not <|AUDIO|>'s; add_modalities() assigns one"
            )
        out[name] = Modality(name, in_dim, spec["token"], token_id, max_len, dict(spec["projector"]))
    ids = [m.token_id for m in out.values()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"config.json modalities share a placeholder token id: {ids}")
    return out


def build_modality_projectors(config: Any) -> nn.ModuleDict:
    """One projector per declared modality: in_dim -> the LLM width."""
    width = config.text_config.hidden_size
    projectors = {}
    for name, m in modality_specs(config).items():
        try:
            projectors[name] = build_projector(m.projector, m.in_dim, width)
        except ValueError as err:
            raise ValueError(f"config.json modalities.{name}.projector: {err}") from err
    return nn.ModuleDict(projectors)


def check_embeddings(modality: Modality, data: Any) -> list[torch.Tensor]:
    """A request's data for `modality` -> a list of (n, in_dim) tensors, or ValueError.
    Accepts one (n, in_dim) tensor, a (b, n, in_dim) batch, or a list of (n, in_dim)."""
    if isinstance(data, torch.Tensor):
        items = [data] if data.ndim == 2 else list(data) if data.ndim == 3 else [data]
    elif isinstance(data, (list, tuple)):
        items = list(data)
    else:
        items = [data]
    expected = f"expected (n, {modality.in_dim}) floating-point tensors with 1 <= n <= {modality.max_len}"
    for i, x in enumerate(items):
        what = f"{modality.name} item {i}"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{what} is a {type(x).__name__}; {expected}")
        if x.ndim != 2 or x.shape[-1] != modality.in_dim:
            raise ValueError(
                f"{what} has shape {tuple(x.shape)}; {expected} "
                f"(config.json modalities.{modality.name}.in_dim = the {modality.name} encoder's width)"
            )
        if not x.is_floating_point() or not torch.isfinite(x).all():
            raise ValueError(f"{what} must hold finite floating-point values ({x.dtype}); {expected}")
        if not 1 <= x.shape[0] <= modality.max_len:
            raise ValueError(
                f"{what} has {x.shape[0]} rows; {expected} (raise modalities.{modality.name}.max_len "
                "in config.json for longer inputs)"
            )
    return items
