"""Pieces of the student trainer: device, threads and process group, hard-label batches, LR schedule.

The device resolver and the thread setting serve every command (generate and eval too).

Kept apart from :mod:`softlabels.train` so that module reads as the training loop.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from softlabels import _distributed
from softlabels.errors import ConfigError

__all__ = ["DistEnv", "IndexBatches", "lr_factor", "resolve_device", "set_threads", "weights_digest"]


def resolve_device(name: str) -> torch.device:
    """The device for ``--device`` (auto, cpu, cuda or cuda:N), for every command.

    ``auto`` is a GPU when torch sees one, else the CPU; plain ``cuda`` is this
    process's GPU under torchrun (``LOCAL_RANK``), else GPU 0.
    """
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
    """Apply ``--threads`` to torch's intra-op pool (0 leaves torch's default: one per core).

    One thread is the default: on a 2-core machine shared with other jobs, a small
    student trained 10x faster with 1 thread than with 2 (docs/BENCHMARKS.md), and
    CPU results do not depend on the machine's core count.
    """
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

    def stop(self) -> None:
        self.group.close()


class IndexBatches(Dataset):
    """Batches of rows of one or more InputDatasets, shuffled per epoch, this rank's share.

    Item ``i`` is batch ``i`` of the epoch: whole index blocks through ``get_batch``
    (one vectorised read each), so it also runs in DataLoader workers. ``sample_ids``
    are the rows' indices over all the datasets (what ``--augment`` draws views from).
    """

    def __init__(self, datasets: list, *, labeled_only: bool, batch_size: int, seed: int, rank: int,
                 world: int) -> None:
        self.datasets, self.batch_size, self.seed = datasets, batch_size, seed
        self.rank, self.world = rank, world
        self.offsets = np.cumsum([0] + [len(d) for d in datasets])
        ids = np.arange(self.offsets[-1], dtype=np.int64)
        if labeled_only:
            ids = ids[np.concatenate([_all_labels(d) for d in datasets]) >= 0]
        self.ids = ids
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        order = self.ids[np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))]
        self.share = order[self.rank::self.world]  # ranks differ by at most one row

    def __len__(self) -> int:
        return -(-len(self.share) // self.batch_size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.share[i * self.batch_size:(i + 1) * self.batch_size]
        if len(self.datasets) == 1:
            x, y = self.datasets[0].get_batch(ids)
            return {"x": x, "labels": y, "sample_ids": torch.from_numpy(ids.copy())}
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        parts = [(m, self.datasets[j].get_batch(ids[m] - self.offsets[j]))
                 for j in range(len(self.datasets)) if (m := which == j).any()]
        x = torch.empty((len(ids), *parts[0][1][0].shape[1:]), dtype=parts[0][1][0].dtype)
        y = torch.empty(len(ids), dtype=torch.int64)
        for m, (xj, yj) in parts:
            x[torch.from_numpy(m)], y[torch.from_numpy(m)] = xj, yj
        return {"x": x, "labels": y, "sample_ids": torch.from_numpy(ids.copy())}


def _all_labels(ds) -> np.ndarray:
    labels = getattr(ds, "labels", None)
    if labels is not None:
        return np.asarray(labels)
    return np.concatenate([ds.get_batch(np.arange(i, min(i + 4096, len(ds))))[1].numpy()
                           for i in range(0, len(ds), 4096)] or [np.empty(0, np.int64)])


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def weights_digest(model: nn.Module) -> str:
    """sha256 over the state_dict's names and tensor bytes (equal iff the weights are bit-identical)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
