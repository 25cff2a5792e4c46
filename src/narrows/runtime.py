"""Where and how a command runs: device, threads, seeds and the torch.distributed context."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from narrows.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; asking for a missing device is an error."""
    base = name.split(":")[0]
    if base not in DEVICES:
        raise UserError(f"unknown device '{name}'", "use auto, cpu, cuda, cuda:N or mps")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available",
                            "use --device cpu (or auto)")
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if base == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but MPS is not available", "use --device cpu (or auto)")
    return torch.device(name)


def set_threads(threads: int, local_world_size: int = 1) -> int:
    """Set torch's intra-op threads (0 = the cores available to this process's share).

    Inter-op threads are set to 1: nested pools oversubscribe small machines.
    """
    if threads <= 0:
        threads = max(1, available_cores() // max(1, local_world_size))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    return threads


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, epoch, rank...), stable across runs."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value ^= (int(part) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2)) & 0xFFFFFFFFFFFFFFFF
    return value & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Distributed:
    """The torch.distributed context: ``world_size == 1`` when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def format_duration(seconds: float) -> str:
    """A rough human duration for cost estimates: "45 s", "12.5 min", "3.2 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def rebatch(pieces: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``batch_size`` rows cut from a stream of tensors (concatenated
    along dim 0, in order); the last batch may be smaller."""
    pending: list[torch.Tensor] = []
    size = 0
    for piece in pieces:
        while len(piece):
            take = min(batch_size - size, len(piece))
            pending.append(piece[:take])
            size += take
            piece = piece[take:]
            if size == batch_size:
                yield torch.cat(pending)
                pending, size = [], 0
    if size:
        yield torch.cat(pending)
