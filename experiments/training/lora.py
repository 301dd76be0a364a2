"""LoRA adapters on the frozen LLM during alignment, merged into the exported weights.

    adapters = add_lora(model.language_model, rank=8, alpha=16, targets=("q_proj", "v_proj"))
    ...train the projector and `adapters`...
    merged = merged_weights(model.language_model, "language_model.")   # {name: W + s B A}

The adapter of a Linear W (out x in) is W x + s * B (A x), A (r x in) random, B (out x r)
zero, s = alpha / r: at step 0 the LLM is unchanged. The export writes W + s * B A in W's
place (same name, shape and dtype as the base's tensor), so the checkpoint is a plain
Qwen2-Audio directory and `vllm serve` needs no LoRA support.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "v_proj")


class LoraAdapter(nn.Module):
    """The trainable low-rank pair of one Linear."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.scale = alpha / rank
        self.active = True  # False: the layer is the frozen Linear alone (a teacher's forward)
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """s * B A, (out, in), float32."""
        return self.scale * (self.B.float() @ self.A.float())


class LoraLinear(nn.Module):
    """A frozen Linear plus its adapter's low-rank update."""

    def __init__(self, base: nn.Linear, adapter: LoraAdapter) -> None:
        super().__init__()
        self.base, self.adapter = base, adapter

    @property
    def weight(self) -> torch.Tensor:  # what callers that inspect the layer expect
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        if not a.active:
            return self.base(x)
        update = (x.to(a.A.dtype) @ a.A.t()) @ a.B.t() * a.scale
        return self.base(x) + update.to(x.dtype)


def add_lora(llm: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS) -> nn.ModuleDict:
    """Wrap every Linear of `llm` whose name ends in one of `targets`; returns the adapters
    (float32, trainable), keyed by the wrapped module's name with '.' as '/'."""
    if rank < 1:
        raise ValueError(f"train.lora.rank={rank}; expected >= 1 (0 turns LoRA off)")
    found = [(name, m) for name, m in llm.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] in targets]
    if not found:
        kinds = sorted({n.split(".")[-1] for n, m in llm.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"train.lora.targets={list(targets)} match no Linear of the LLM; it has {kinds}")
    adapters = nn.ModuleDict()
    for name, linear in found:
        adapter = LoraAdapter(linear.in_features, linear.out_features, rank, alpha).to(linear.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent_name), child, LoraLinear(linear, adapter))
        adapters[name.replace(".", "/")] = adapter
    return adapters


@contextmanager
def adapters_off(adapters: nn.ModuleDict | None) -> Iterator[None]:
    """The LLM without its adapters inside the block (the frozen teacher of distillation)."""
    for a in (adapters or {}).values():
        a.active = False
    try:
        yield
    finally:
        for a in (adapters or {}).values():
            a.active = True


def merged_weights(llm: nn.Module, prefix: str, like: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{prefix + name + '.weight': W + s B A} for every adapted Linear of `llm`, on the CPU,
    in the dtype of `like[key]` where given (the base checkpoint's own tensor: merged in
    float32 from it, so a bf16 training copy never rounds the result twice), else W's."""
    out = {}
    for name, m in llm.named_modules():
        if isinstance(m, LoraLinear):
            key = f"{prefix}{name}.weight"
            base = like[key] if like is not None and key in like else m.base.weight
            merged = base.detach().float().cpu() + m.adapter.delta().detach().cpu()
            out[key] = merged.to(base.dtype)
    return out
