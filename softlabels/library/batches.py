"""Batches of ``(user item, target)`` pairs: the user's batch as ``default_collate`` makes it, the targets typed.

:func:`collate` is a ``DataLoader`` ``collate_fn``. Per-sample targets stack into one typed target
of the layout ([B, ...]). Token targets (one row per token, a different count per sequence) become
:class:`TokenTargets`: the rows of every sequence in order and each sequence's length, which
:func:`softlabels.kd_loss` lays over the student's ``[B, L, C]`` logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from softlabels.errors import ConfigError

__all__ = ["PairedItems", "TokenTargets", "collate"]


@dataclass(frozen=True)
class TokenTargets:
    """A batch of token targets: ``target`` holds the rows of sequence 0's tokens, then sequence 1's, ...; row
    ``t`` of sequence ``b`` is the teacher's output at token ``t``; ``lengths`` int64 [B] counts each one's."""

    target: Any
    lengths: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenTargets:
        """The same targets with every tensor on ``device``."""
        return TokenTargets(self.target.to(device, non_blocking=non_blocking),
                            self.lengths.to(device, non_blocking=non_blocking))

    def probs(self, temperature: float = 1.0) -> Tensor:
        """The target's ``probs`` over all rows (where exact; see its layout's target)."""
        return self.target.probs(temperature)

    def index(self, seq_len: int) -> Tensor:
        """Flat index ``b * seq_len + t`` of every row, for logits reshaped to [B * seq_len, C]."""
        n, device = self.lengths, self.lengths.device
        b = torch.repeat_interleave(torch.arange(len(n), device=device), n)
        t = torch.arange(int(n.sum()), device=device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        return b * seq_len + t

    def __len__(self) -> int:
        return len(self.lengths)


class PairedItems(Sequence):
    """A fetched batch of ``(item, target)`` pairs, the targets gathered at once (what
    :meth:`~softlabels.library.pairing.TargetDataset.__getitems__` gives a ``DataLoader``): :func:`collate`
    takes ``items`` and ``targets`` as they are, any other ``collate_fn`` sees the pairs."""

    def __init__(self, items: list[Any], targets: Any) -> None:
        self.items, self.targets = items, targets

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, Any]:  # type: ignore[override]
        return self.items[i], self.targets.select(i)


def join_targets(targets: Sequence[Any], op: Callable[[list[torch.Tensor]], torch.Tensor]) -> Any:
    """One target of ``targets``' tensors joined by ``op``; what is not a tensor (a target's temperatures,
    an absent array) is the first target's, as it is every target's of one store."""
    first = targets[0]
    return replace(first, **{f.name: op([getattr(t, f.name) for t in targets]) for f in fields(first)
                             if isinstance(getattr(first, f.name), torch.Tensor)})


def collate(batch: Sequence[tuple[Any, Any]], collate_items: Callable[[list[Any]], Any] = default_collate
            ) -> tuple[Any, Any]:
    """``[(item, target), ...]`` -> ``(collate_items(items), typed targets)`` (a ``DataLoader`` ``collate_fn``);
    ``collate_items``, e.g. a tokenizer's padding collator, is given with ``functools.partial``."""
    if isinstance(batch, PairedItems):
        return collate_items(batch.items), batch.targets
    if not batch or not all(isinstance(b, tuple) and len(b) == 2 for b in batch):
        raise ConfigError("collate= takes the items of softlabels.with_targets (pairs of item and target); "
                          "pass collate_fn=softlabels.collate to a DataLoader over with_targets(...)")
    items, targets = [b[0] for b in batch], [b[1] for b in batch]
    first_field = fields(targets[0])[0].name
    if len({getattr(t, first_field).ndim for t in targets}) > 1:
        raise ConfigError("collate got targets of several position kinds in one batch; pair each store separately")
    if _is_token_row(targets[0]):
        lengths = torch.tensor([len(getattr(t, first_field)) for t in targets], dtype=torch.int64)
        return collate_items(items), TokenTargets(join_targets(targets, torch.cat), lengths)
    if len({type(t) for t in targets}) > 1:
        raise ConfigError("collate got targets of several layouts in one batch; pair each store "
                          "separately")
    return collate_items(items), join_targets(targets, torch.stack)


def _is_token_row(target: Any) -> bool:
    """A token sequence's rows carry a leading position axis the per-sample rows lack (``logsumexp`` [n])."""
    if hasattr(target, "logsumexp"):
        return target.logsumexp.ndim == 1
    return target.logits.ndim == 2
