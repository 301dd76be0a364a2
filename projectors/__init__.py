"""Swappable audio projectors (pure torch, no vLLM import).

    build_projector({"name": "mlp", "stack": 2}, in_dim=1280, out_dim=4096)
    projector_block(module) -> {"name": "mlp", "in_dim": 1280, ..., "stack": 2}

The block is what a checkpoint's config.json stores under "projector"; a Hydra node of
conf/projector/ is such a block (`name:` + hyper-parameters), built by the same function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from projectors.attention import AttentionProjector
from projectors.base import Projector
from projectors.linear import LinearProjector
from projectors.mlp import MLPProjector

PROJECTORS: dict[str, type[Projector]] = {
    cls.name: cls for cls in (LinearProjector, MLPProjector, AttentionProjector)
}

__all__ = [
    "PROJECTORS",
    "AttentionProjector",
    "LinearProjector",
    "MLPProjector",
    "Projector",
    "build_projector",
    "projector_block",
]


def build_projector(block: Mapping[str, Any], in_dim: int, out_dim: int) -> Projector:
    """Instantiate from a config.json "projector" block for a model whose encoder is
    `in_dim` wide and whose LLM is `out_dim` wide. Dims written in the block must agree."""
    params = dict(block)
    name = params.pop("name", None)
    if name not in PROJECTORS:
        raise ValueError(
            f"unknown projector name {name!r}; expected one of {sorted(PROJECTORS)}. "
            "Fix the 'projector' block in config.json (or the projector= Hydra override)."
        )
    for key, expected in (("in_dim", in_dim), ("out_dim", out_dim)):
        found = params.pop(key, expected)
        if found != expected:
            raise ValueError(
                f"projector {name!r} declares {key}={found}, but the base model needs {expected} "
                f"(in_dim = audio_config.d_model, out_dim = text_config.hidden_size). "
                "Rebuild the projector for this base model or fix config.json."
            )
    cls = PROJECTORS[name]
    try:
        return cls(in_dim=in_dim, out_dim=out_dim, **params)
    except TypeError as err:
        raise ValueError(f"bad arguments for projector {name!r}: {err}") from err


def projector_block(projector: Projector) -> dict[str, Any]:
    """The config.json "projector" block that rebuilds `projector`."""
    return {"name": projector.name, **projector.hparams}
