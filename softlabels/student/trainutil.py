"""What the student trainer's two tasks share: the task base and the distillation settings."""

from __future__ import annotations

from functools import reduce
from typing import Any, Callable

import torch


class Task:
    """What :mod:`softlabels.student.trainer` asks of a task besides its data, student and loss; the defaults."""

    env: Any
    stores: list

    @staticmethod
    def problems(config: Any, *, online: bool = False) -> list[str]:
        """Every invalid option of ``config`` for this task (empty when all are valid)."""
        return config.problems(online=online)

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


def distillation_settings(temperature: float | None, alpha: float | None, stores: list,
                          log: Callable[[str], None] | None) -> tuple[float, float]:
    """T and alpha for distilling from ``stores`` (empty: an online teacher's dense logits): given values, else
    the store kind's defaults (logged); a T that a store does not answer exactly is refused in one line."""
    from softlabels.store.defaults import choose
    from softlabels.store.temperatures import intersect

    meta = stores[0].meta if stores else None
    supported = reduce(intersect, (s.meta.temperatures() for s in stores), None)
    t, a, note = choose(temperature, alpha, layout=meta.layout if meta else None,
                        positions=meta.positions if meta else None, supported=supported)
    for s in stores:
        s.meta.require_temperature(t, str(s.path))
    if note and log is not None:
        log(note)
    return t, a
