"""The device, torch's CPU threads and this process's place in a (possibly one-process) job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from softlabels._runtime import distributed as _distributed
from softlabels.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """The device for ``--device``: ``auto`` is a GPU when torch sees one, else the CPU; plain
    ``cuda`` is this process's GPU under torchrun (``LOCAL_RANK``), else GPU 0; or cpu, cuda:N."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 and name == "cuda":
            raise ConfigError(f"--device {name} asked for CUDA but torch sees no GPU; pass --device cpu")
        if dev.index is None or dev.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA device(s); use --device cpu")
    return dev


def set_threads(threads: int) -> None:
    """Apply ``--threads`` to torch's intra-op pool (0 leaves torch's default: one per core; why one is
    the default: :data:`softlabels._runtime.options.THREADS_HELP`, docs/BENCHMARKS.md)."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@dataclass
class DistEnv:
    """This process's place in a (possibly one-process) job, and its device."""

    group: _distributed.Dist
    device: torch.device

    @classmethod
    def start(cls, device: str) -> DistEnv:
        dev = resolve_device(device)
        return cls(_distributed.init(dev.type), dev)

    rank = property(lambda self: self.group.rank)
    world = property(lambda self: self.group.world)

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.device)  # nccl reduces CUDA tensors only
            dist.all_reduce(t, op=op)
        return t.cpu()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
