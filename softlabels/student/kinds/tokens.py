"""``tokens`` positions as a language model's batches: one target per token, next-token CE beside it.

A unit's rows are its sequences (ragged: ``offsets`` and ``lengths`` place each sequence's
positions). A batch of ``B`` sequences, ``L`` the longest of them, is a dict of tensors:

* ``ids`` int64 [B, L]: input token ids, right-padded with 0;
* ``targets`` int64 [B, L]: the next token ``ids[b, t + 1]``, or -100 where the position does
  not count (``loss_mask`` False);
* ``loss_mask`` bool [B, L]: position ``t`` counts (``t + 1`` is inside the sequence and a target
  of the data's mask): where the hard CE and the divergence are taken;
* ``lengths``, ``sample_ids`` int64 [B];
* ``index`` int64 [P]: flat index ``b * L + t`` of each of the batch's ``P`` real positions
  (row-major), the rows of the teacher target;
* the teacher's target over those ``P`` positions under the stored arrays' names
  (:func:`~softlabels.student.losses.as_target` rebuilds it).

Ranks share an epoch by global batches (``share = "batches"`` in :mod:`softlabels.student.order`):
rank ``r`` takes the ``r``-th slice of every global batch of ``batch_size * world`` sequences and
scales its position sum by ``world / global positions`` (:func:`lm_loss`), so DDP's gradient mean
equals the one-process gradient of the same global batch. :class:`TokenDataBatches` gives the
same batches of token data alone, for hard next-token CE without a store.
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
from torch.utils.data import IterableDataset, get_worker_info

from softlabels.errors import ConfigError, DataError, FingerprintMismatch
from softlabels.inputs.tokens import TokenDataset, offsets_of, token_fingerprint
from softlabels.store.layouts.targets import TopKTarget
from softlabels.store.positions.tokens import LENGTHS, OFFSETS
from softlabels.student import order as _order
from softlabels.student.kinds.sample import short
from softlabels.student.lm_metrics import next_token_targets
from softlabels.student.losses import as_target, target_arrays

__all__ = ["Blocks", "TokenRows", "TokenDataBatches", "lm_loss", "select_rows"]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + n) for s, n)`` without a Python loop."""
    total = int(lengths.sum())
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets_of(lengths)[:-1], lengths)


def select_rows(target: Any, rows: torch.Tensor) -> Any:
    """The same target restricted to ``rows`` (an index or bool mask over its rows)."""
    return target.select(rows)


class TokenRows:
    """Rows and batches of ``tokens`` stores (see the module doc)."""

    share = "batches"
    window = 4

    def __init__(self, meta: Any, views_per_sample: int = 1) -> None:
        self.layout = meta.layout_obj()

    @staticmethod
    def check_data(store: Any, data: Any, check_fingerprint: bool) -> None:
        if not isinstance(data, TokenDataset):
            raise ConfigError(f"{store.path} holds token positions: join it with the token data it was generated "
                              "from (a TokenDataset)")
        expected = store.meta.source.get("fingerprint")
        if check_fingerprint and expected:  # stores made without a fingerprint cannot be checked
            got = token_fingerprint(data)
            if got != expected:
                spec = store.meta.source.get("spec")
                raise FingerprintMismatch(
                    f"{store.path}: the token data given (fingerprint {short(got)}) is not the data the store was "
                    f"generated from ({short(expected)}); pass the data the store was generated from"
                    + (f" ({spec})" if spec else ""))

    @staticmethod
    def unit_rows(block: dict[str, np.ndarray], *, seed: int, epoch: int) -> dict[str, np.ndarray]:
        # the unit as read (checksum-verified): validating every position's ids here halved the stream's
        # tokens/s; an id >= V fails the loss's gather
        return block

    @staticmethod
    def holder(load: Callable[[int], dict[str, np.ndarray]], *, keep: int, sizes: np.ndarray) -> Blocks:
        return Blocks(load, keep)

    def batch(self, held: Blocks, unit: np.ndarray, local: np.ndarray, source: np.ndarray, stores: list,
              data: list) -> dict[str, Any]:
        """The padded batch of sequences ``local`` of global units ``unit`` (in that order)."""
        units, b = held.get(unit), len(unit)
        lengths, sample_ids = np.empty(b, np.int64), np.empty(b, np.int64)
        picks = [(block, sel, local[sel]) for u, block in units.items() for sel in (np.flatnonzero(unit == u),)]
        for block, sel, rows in picks:
            lengths[sel], sample_ids[sel] = block[LENGTHS][rows], block["sample_ids"][rows]
        out_off = offsets_of(lengths)
        specs = self.layout.arrays()
        arrays = {k: np.empty((int(out_off[-1]), *s.shape), s.dtype) for k, s in specs.items()}
        for block, sel, rows in picks:  # gather each unit's sequences into their batch slots
            src, dst = _ranges(block[OFFSETS][rows], lengths[sel]), _ranges(out_off[:-1][sel], lengths[sel])
            for k in specs:
                arrays[k][dst] = block[k][src]
        data, path = data[0], stores[0].path
        if b and (sample_ids.min() < 0 or sample_ids.max() >= len(data)):
            raise DataError(f"{path} refers to sample ids {int(sample_ids.min())}..{int(sample_ids.max())} but the "
                            f"token data has {len(data)} sequences; pass the data the store was generated from")
        tokens = data.get_batch(sample_ids)
        if not np.array_equal(tokens.lengths.numpy(), lengths):
            bad = int(np.flatnonzero(tokens.lengths.numpy() != lengths)[0])
            raise DataError(f"sequence {int(sample_ids[bad])} has {int(tokens.lengths[bad])} tokens in the data but "
                            f"{int(lengths[bad])} positions in {path}; pass the data the store was generated from "
                            "(same tokenizer and --seq-len)")
        batch = _padded(tokens, sample_ids)
        batch.update(target_arrays(self.layout.decode(arrays)))
        return batch


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


def _padded(tokens: Any, sample_ids: np.ndarray) -> dict[str, Any]:
    """The token part of a batch: ids, next-token targets, the loss mask, lengths, ids, real positions."""
    lens = tokens.lengths
    targets, loss_mask = next_token_targets(tokens.ids, tokens.mask, lens)
    real = torch.arange(tokens.ids.shape[1]) < lens[:, None]
    return {"ids": tokens.ids, "targets": targets, "loss_mask": loss_mask, "lengths": lens,
            "sample_ids": torch.from_numpy(np.asarray(sample_ids, dtype=np.int64)),
            "index": real.reshape(-1).nonzero().reshape(-1)}


class TokenDataBatches(IterableDataset):
    """Padded next-token batches of token data alone (no store): the hard-CE-only language model.

    The items of a token store's batches without the target. Each epoch permutes the
    sequences with an RNG seeded from ``(seed, epoch)`` and cuts them into global batches of
    ``batch_size * world_size``; rank ``r`` takes the ``r``-th balanced slice of each.
    """

    layout = None

    def __init__(self, data: TokenDataset, *, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        if data.vocab_size is None:
            raise ConfigError(f"the vocabulary size of {data.source} is unknown; pass --tokenizer tokenizer.json "
                              "(the tokenizer the ids come from)")
        self.data, self.batch_size, self.seed = data, batch_size, int(seed)
        self.rank, self.world_size, self.epoch = int(rank), int(world_size), 0
        self.num_samples, self.num_classes = len(data), int(data.vocab_size)

    def __len__(self) -> int:
        return -(-self.num_samples // (self.batch_size * self.world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.batch_size * self.world_size
        for j in range(worker, len(self), workers):
            rows = order[j * step:(j + 1) * step]
            a, b = _order.split(len(rows), self.world_size, self.rank)
            yield _padded(self.data.get_batch(rows[a:b]), rows[a:b])


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
    target = select_rows(as_target(batch), keep)
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
