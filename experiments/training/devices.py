"""Where the torch stages compute: device, precision and data-parallel processes.

    place = placement("auto", "auto")   # cuda + bf16 where torch sees a GPU, else cpu + fp32
    with place.autocast(): loss = ...

The `trainer` config group (conf/trainer/) sets these for every torch stage: pretraining,
the encoder cache, align and its dev evaluation. In bf16 the frozen encoder and LLM are
stored in bfloat16 and the trainable weights stay float32 ("master weights") under
autocast; bf16 on CPU runs the same code path, which is how the tests check it.

Data parallel: launched by `torchrun --nproc_per_node N -m experiments.run ...`, each
process trains on its share of every global batch and DistributedDataParallel averages the
gradients (NCCL on GPUs, gloo on CPU). Process 0 alone builds shared files and writes
results; the others wait for it at `main_first()`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # of the frozen weights and of autocast

    @property
    def precision(self) -> str:
        return next(k for k, v in PRECISIONS.items() if v == self.dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16: matmuls in bfloat16 with float32 weights kept where they are trainable."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> dict[str, str]:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": str(self.device), "device_name": name, "precision": self.precision}


def placement(device: str = "auto", precision: str = "auto") -> Placement:
    """Resolve `trainer.device` (auto|cpu|cuda) and `trainer.precision` (auto|fp32|bf16).
    auto: CUDA + bf16 where torch sees a GPU, CPU + fp32 otherwise. A request the machine
    cannot honour is an error saying what to set, never a silent fallback."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"trainer.device={device!r}; expected auto, cpu or cuda")
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"trainer.precision={precision!r}; expected auto, fp32 or bf16")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"trainer.device=cuda, but torch {torch.__version__} sees no CUDA device on this machine; "
            "set trainer.device=auto (or cpu)"
        )
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if precision == "auto":
        precision = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise RuntimeError(
            f"trainer.precision=bf16, but {torch.cuda.get_device_name(dev)} has no bfloat16 support "
            "(it needs compute capability 8.0 or newer); set trainer.precision=fp32"
        )
    return Placement(dev, PRECISIONS[precision])


# --- data parallel ------------------------------------------------------------------------


def init_distributed(device_type: str) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Process 0 runs the block first (building shared files: data, caches, adopted
    checkpoints); the others run it after, and then find what it built."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over processes (x itself when there is one)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def data_parallel(module: torch.nn.Module, place: Placement) -> torch.nn.Module:
    """`module` wrapped in DistributedDataParallel when there are several processes."""
    if world_size() == 1:
        return module
    ids = [place.device.index] if place.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def local_share(indices: list[int]) -> list[int]:
    """This process's part of a global batch (round robin, so shares differ by at most one)."""
    n = world_size()
    if len(indices) < n:
        raise ValueError(f"a global batch of {len(indices)} cannot be split over {n} processes; raise the batch size")
    return indices[rank() :: n]


# What torchrun puts in the environment; gone once the data-parallel stages are over, so
# vLLM (started later by process 0) sees a plain single process.
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


def finish_distributed() -> None:
    """End data parallelism: every process meets here once its data-parallel stages are
    done (the others then exit, process 0 carries on alone)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        for key in TORCHRUN_ENV:
            os.environ.pop(key, None)
