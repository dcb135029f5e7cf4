"""``tokens`` positions as a language model's batches: one target per token, next-token CE beside it.

A unit's rows are its sequences (ragged: ``offsets`` and ``lengths`` place each sequence's
positions). A batch of ``B`` sequences is padded to the longest, ``L``: ``ids``, ``targets`` and
``loss_mask`` [B, L], ``lengths`` and ``sample_ids`` [B], ``index`` (``b * L + t`` of each real
position) and the teacher's target over those positions (docs/TOKENS.md, "The batches"). Ranks
share an epoch by global batches (``share = "batches"`` in :mod:`softlabels.student.order`);
:func:`data_batch` gives the same batches of token data alone, for hard next-token CE.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from softlabels.errors import ConfigError, DataError
from softlabels.inputs.tokens import TokenDataset, offsets_of, token_fingerprint
from softlabels.store.layouts.targets import TopKTarget
from softlabels.store.positions.tokens import LENGTHS, OFFSETS
from softlabels.student.kinds.sample import same_data
from softlabels.student.lm_metrics import next_token_targets
from softlabels.student.losses import as_target, target_arrays

__all__ = ["Blocks", "TokenRows", "data_batch", "lm_loss"]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + n) for s, n)`` without a Python loop."""
    total = int(lengths.sum())
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets_of(lengths)[:-1], lengths)


class TokenRows:
    """Rows and batches of ``tokens`` stores (see the module doc)."""

    share = "batches"
    window = 4
    group = 8  # batches built together by :meth:`batches`

    def __init__(self, meta: Any, views_per_sample: int = 1) -> None:
        self.layout = meta.layout_obj()

    @staticmethod
    def check_data(store: Any, data: Any, check_fingerprint: bool) -> None:
        if not isinstance(data, TokenDataset):
            raise ConfigError(f"{store.path} holds token positions: join it with the token data it was generated "
                              "from (a TokenDataset)")
        if check_fingerprint:
            same_data(store, lambda: token_fingerprint(data), "token data", "data")

    @staticmethod
    def unit_rows(block: dict[str, np.ndarray], *, seed: int, epoch: int) -> dict[str, np.ndarray]:
        # the unit as read (checksum-verified): validating every position's ids here halved the stream's
        # tokens/s; an id >= V fails the loss's gather
        return block

    @staticmethod
    def holder(load: Callable[[int], dict[str, np.ndarray]], *, keep: int, sizes: np.ndarray) -> Blocks:
        return Blocks(load, keep)

    def batches(self, held: Blocks, batches: Iterator[tuple[np.ndarray, np.ndarray]], source: np.ndarray,
                stores: list, data: list) -> Iterator[dict[str, Any]]:
        """The padded batch of sequences ``local`` of global units ``unit`` (in that order) for each
        ``(unit, local)`` of ``batches``, built :attr:`group` batches at a time (docs/BENCHMARKS.md).

        A group (which stops before it needs more units than ``held`` keeps) is gathered, decoded
        and padded once, and its batches cut out of it: contiguous, disjoint row slices of its
        arrays (freed with its last batch), with padded ``[B, L]`` tensors of their own.
        """
        group: list[tuple[np.ndarray, np.ndarray]] = []
        units: set[int] = set()
        for unit, local in batches:
            more = units.union(unit.tolist())
            if group and (len(group) == self.group or len(more) > held.keep):
                yield from self._group(held, group, stores, data)
                group, more = [], set(unit.tolist())
            group.append((unit, local))
            units = more
        if group:
            yield from self._group(held, group, stores, data)

    def _group(self, held: Blocks, group: list[tuple[np.ndarray, np.ndarray]], stores: list,
               data: list) -> list[dict[str, Any]]:
        """The batches of ``group`` (``(unit, local)`` each), gathered and padded together."""
        unit, local = np.concatenate([u for u, _ in group]), np.concatenate([r for _, r in group])
        n = len(unit)
        lengths, sample_ids, starts = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
        picks = [(block, np.flatnonzero(unit == u)) for u, block in held.get(unit).items()]
        for block, sel in picks:
            rows = local[sel]
            lengths[sel], sample_ids[sel], starts[sel] = block[LENGTHS][rows], block["sample_ids"][rows], \
                block[OFFSETS][rows]
        out_off = offsets_of(lengths)
        arrays = _gather(picks, starts, lengths, self.layout.arrays())
        data, path = data[0], stores[0].path
        if n and (sample_ids.min() < 0 or sample_ids.max() >= len(data)):
            raise DataError(f"{path} refers to sample ids {int(sample_ids.min())}..{int(sample_ids.max())} but the "
                            f"token data has {len(data)} sequences; pass the data the store was generated from")
        tokens = data.get_batch(sample_ids)
        if not np.array_equal(tokens.lengths.numpy(), lengths):
            bad = int(np.flatnonzero(tokens.lengths.numpy() != lengths)[0])
            raise DataError(f"sequence {int(sample_ids[bad])} has {int(tokens.lengths[bad])} tokens in the data but "
                            f"{int(lengths[bad])} positions in {path}; pass the data the store was generated from "
                            "(same tokenizer and --seq-len)")
        # a row's targets and loss mask do not depend on the padding width, nor a position's teacher target on
        # its batch: decode and compute them once for the group, then cut each batch out of them
        targets, loss_mask = next_token_targets(tokens.ids, tokens.mask, tokens.lengths)
        teacher = target_arrays(self.layout.decode(arrays))
        ends = np.cumsum([len(u) for u, _ in group])
        firsts = ends - [len(u) for u, _ in group]
        widths = np.array([int(lengths[i:j].max(initial=0)) for i, j in zip(firsts, ends)], np.int64)
        sizes = ends - firsts
        # ``index`` of every position: b * width + t, b the row within its batch
        row_base = (np.arange(n, dtype=np.int64) - np.repeat(firsts, sizes)) * np.repeat(widths, sizes)
        index, ids = torch.from_numpy(_ranges(row_base, lengths)), torch.from_numpy(sample_ids)
        out = []
        for a, b, width in zip(firsts.tolist(), ends.tolist(), widths.tolist()):
            p0, p1 = int(out_off[a]), int(out_off[b])
            batch = {"ids": _owned(tokens.ids[a:b, :width]), "targets": _owned(targets[a:b, :width]),
                     "loss_mask": _owned(loss_mask[a:b, :width]), "lengths": tokens.lengths[a:b],
                     "sample_ids": ids[a:b], "index": index[p0:p1]}
            # tensors per position; the temperatures of the target are numbers, alike for every batch
            batch.update({k: v[p0:p1] if isinstance(v, torch.Tensor) else v for k, v in teacher.items()})
            out.append(batch)
        return out


def _gather(picks: list[tuple[dict[str, np.ndarray], np.ndarray]], starts: np.ndarray, lengths: np.ndarray,
            specs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The positions of every row, in row order: row ``i`` (of unit block ``picks[u][0]`` when ``i`` is in
    ``picks[u][1]``) holds ``lengths[i]`` positions from ``starts[i]``.

    ``np.take`` of whole rows only (a scatter costs 3-4x a gather): with several units, each unit's rows
    go to one contiguous run of a buffer, and a second gather puts them in row order.
    """
    if not picks:  # a rank's empty slice of the last global batch
        return {k: np.empty((0, *s.shape), s.dtype) for k, s in specs.items()}
    if len(picks) == 1:
        src = _ranges(starts, lengths)
        return {k: np.take(picks[0][0][k], src, axis=0) for k in specs}
    sel = np.concatenate([rows for _, rows in picks])  # rows grouped by unit
    runs = offsets_of(lengths[sel])
    stage = {k: np.empty((int(runs[-1]), *s.shape), s.dtype) for k, s in specs.items()}
    a = 0
    for block, rows in picks:
        src, b = _ranges(starts[rows], lengths[rows]), a + len(rows)
        for k in specs:
            np.take(block[k], src, axis=0, out=stage[k][runs[a]:runs[b]], mode="clip")  # clip: unbuffered
        a = b
    at = np.empty(len(sel), np.int64)
    at[sel] = runs[:-1]  # where each row's run starts in the buffer
    order = _ranges(at, lengths)
    return {k: np.take(v, order, axis=0) for k, v in stage.items()}


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a batch's columns of the group's padded arrays."""
    return t.clone(memory_format=torch.contiguous_format)


class Blocks:
    """The last ``keep`` units read (``load(g)``), as they came: ragged rows are gathered unit by unit."""

    def __init__(self, load: Callable[[int], dict[str, np.ndarray]], keep: int) -> None:
        self.load, self.keep = load, keep
        self.cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def get(self, unit: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
        """The units of a batch's rows, in the order the rows first need them (an earlier window's first, so
        the cache drops those first); hits before misses, so reading a miss never drops a unit the batch needs."""
        needed = unit[np.sort(np.unique(unit, return_index=True)[1])].tolist()
        got = {g: self.cache[g] for g in needed if g in self.cache}
        for g in got:
            self.cache.move_to_end(g)
        for g in needed:
            if g not in got:
                got[g] = self.cache[g] = self.load(g)
                while len(self.cache) > self.keep:
                    self.cache.popitem(last=False)
        return got


def data_batch(data: TokenDataset, rows: np.ndarray) -> dict[str, Any]:
    """The padded batch of sequences ``rows`` of token data alone (hard next-token CE): the items of
    a token store's batches without the target."""
    tokens = data.get_batch(rows)
    lens = tokens.lengths
    targets, loss_mask = next_token_targets(tokens.ids, tokens.mask, lens)
    real = torch.arange(tokens.ids.shape[1]) < lens[:, None]
    return {"ids": tokens.ids, "targets": targets, "loss_mask": loss_mask, "lengths": lens,
            "sample_ids": torch.from_numpy(np.asarray(rows, dtype=np.int64)),
            "index": real.reshape(-1).nonzero().reshape(-1)}


def lm_loss(logits: torch.Tensor, batch: dict[str, Any], soft: nn.Module | None, alpha: float,
            renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over the batch's counted positions: ``(weighted total, hard CE, soft loss incl. T^2)``.

    ``soft=None`` or ``alpha == 1``: hard CE only. ``renormalize``: a top-k target's mass is
    renormalised over its K ids (no tail bucket), as most top-k KD implementations do.
    """
    index = batch["index"]
    keep = batch["loss_mask"].reshape(-1)[index]
    rows = index[keep]
    s = logits.reshape(-1, logits.shape[-1])[rows]
    labels = batch["targets"].reshape(-1)[rows]
    zero = s.new_zeros((), dtype=torch.float32)
    if soft is None or alpha == 1:
        ce = F.cross_entropy(s.float(), labels, reduction="sum")
        return alpha * ce if soft is not None else ce, ce.detach(), zero
    target = as_target(batch).select(keep)
    if renormalize and isinstance(target, TopKTarget):  # no tail bucket: every T of the grid sees an empty tail
        target = dataclasses.replace(target, tails=torch.full_like(target.tails.float(), -math.inf))
    fused = getattr(soft, "rows_with_ce", None) if alpha > 0 else None
    if fused is not None:  # one pass over the student's logits for both terms
        soft_rows, ce_rows = fused(s, target, labels)
    else:
        soft_rows = soft(s, target)
        ce_rows = F.cross_entropy(s.float(), labels, reduction="none") if alpha > 0 else soft_rows.new_zeros(0)
    ce, sl = ce_rows.sum(), soft_rows.sum()
    return alpha * ce + (1 - alpha) * sl, ce.detach(), sl.detach()
