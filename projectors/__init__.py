"""Swappable audio projectors (pure torch, no vLLM import).

    build_projector({"name": "mlp", "stack": 2}, in_dim=1280, out_dim=4096)
    projector_block(module) -> {"name": "mlp", "in_dim": 1280, ..., "stack": 2}

The block is what a checkpoint's config.json stores under "projector"; Hydra configs in
conf/projector/ name the same classes through `_target_` (see `from_hydra`).
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
    "from_hydra",
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


def from_hydra(cfg: Mapping[str, Any], in_dim: int, out_dim: int) -> Projector:
    """Instantiate a conf/projector/*.yaml node (`_target_` + hyper-parameters)."""
    params = dict(cfg)
    target = params.pop("_target_", None)
    by_target = {f"{c.__module__}.{c.__name__}": n for n, c in PROJECTORS.items()}
    by_target.update({f"projectors.{c.__name__}": n for n, c in PROJECTORS.items()})
    if target not in by_target:
        raise ValueError(f"unknown projector _target_ {target!r}; expected one of {sorted(by_target)}")
    return build_projector({"name": by_target[target], **params}, in_dim, out_dim)
