"""Pieces of the student trainer: the task base, hard-label batches, the LR schedule, a weights digest."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from softlabels.inputs.arrays import all_labels


class IndexBatches(Dataset):
    """Batches of rows of one or more InputDatasets, shuffled per epoch, this rank's share: item ``i`` is batch
    ``i``, one ``get_batch`` per dataset; ``sample_ids`` index the rows over all the datasets (for ``--augment``)."""

    def __init__(self, datasets: list, *, labeled_only: bool, batch_size: int, seed: int, rank: int,
                 world: int) -> None:
        self.datasets, self.batch_size, self.seed = datasets, batch_size, seed
        self.rank, self.world = rank, world
        self.offsets = np.cumsum([0] + [len(d) for d in datasets])
        ids = np.arange(self.offsets[-1], dtype=np.int64)
        if labeled_only:
            ids = ids[np.concatenate([all_labels(d) for d in datasets]) >= 0]
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
        else:
            which = np.searchsorted(self.offsets, ids, side="right") - 1
            x, y = join_rows(len(ids), [(m, self.datasets[j].get_batch(ids[m] - self.offsets[j]))
                                        for j in range(len(self.datasets)) if (m := which == j).any()])
        return {"x": x, "labels": y, "sample_ids": torch.from_numpy(ids.copy())}


def join_rows(n: int, parts: list[tuple[np.ndarray, tuple[torch.Tensor, ...]]]) -> tuple[torch.Tensor, ...]:
    """Tensors of ``n`` rows from ``(mask, tensors)`` parts: each part's rows go where its bool mask is True."""
    out = tuple(torch.empty((n, *t.shape[1:]), dtype=t.dtype) for t in parts[0][1])
    for m, tensors in parts:
        for o, t in zip(out, tensors):
            o[torch.from_numpy(m)] = t
    return out


class Task:
    """What :mod:`softlabels.student.trainer` asks of a task besides its data, student and loss; the defaults."""

    env: Any
    stores: list

    @staticmethod
    def problems(config: Any, *, online: bool = False) -> list[str]:
        """Every invalid option of ``config`` for this task (empty when all are valid)."""
        return config.problems(online=online)

    @staticmethod
    def empty(batch: dict[str, Any]) -> bool:
        """Whether this rank's batch holds no rows (a zero-weight step then keeps the ranks in lockstep)."""
        return False

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's tensors on the run's device."""
        return {k: v.to(self.env.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def validate(self, record: dict[str, Any]) -> None:
        """Add validation metrics to an epoch's record (rank 0)."""

    def export(self, out: str) -> None:
        """Write the student's other forms beside ``model.pt``."""

    def summary(self) -> dict[str, Any]:
        """What the task adds to ``summary.json``."""
        return {}

    def close(self) -> None:
        """Close the task's stores."""
        for s in self.stores:
            s.close()


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


def distillation_settings(temperature: float | None, alpha: float | None, stores: list,
                          log: Callable[[str], None] | None) -> tuple[float, float]:
    """T and alpha for distilling from ``stores`` (empty: an online teacher's dense logits): given values, else
    the store kind's defaults (logged); a T that a store does not answer exactly is refused in one line."""
    from softlabels.store.defaults import choose
    from softlabels.store.temperatures import intersect

    meta = stores[0].meta if stores else None
    supported = None
    for s in stores:
        supported = intersect(supported, s.meta.temperatures())
    t, a, note = choose(temperature, alpha, layout=meta.layout if meta else None,
                        positions=meta.positions if meta else None, supported=supported)
    for s in stores:
        s.meta.require_temperature(t, str(s.path))
    if note and log is not None:
        log(note)
    return t, a
