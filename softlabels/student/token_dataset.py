"""Stream a format-v2 ``tokens`` store, joined with its token ids, as padded LM batches.

:class:`TokenStoreDataset` reads whole write units (chunk-aligned) through any object
with the store-source API (:class:`~softlabels.store.reader.UnitStore`, or an
ensemble of stores with the same API), joins every stored sequence with its token ids
from the data the store was generated from, and yields padded batches (see the class).

Order: the units form the "chunks" of :mod:`softlabels.student.order`; one *global* stream of
sequences per epoch (units permuted, sequences shuffled within windows of units) is cut
into global batches of ``batch_size * world_size`` sequences. Rank ``r`` takes the
``r``-th balanced slice of every global batch, and DataLoader worker ``w`` of ``W``
serves global batches ``w, w + W, ...`` (the loader's round-robin delivers them in
order). The stream does not depend on the world size or the number of workers, so a
run on P processes with batch B sees the same global batches as one process with batch
``P * B``, every sequence is yielded exactly once per epoch, and resuming after ``k``
batches is arithmetic. The price: each rank reads the units its slices touch, so a
window's units are read once per rank and worker (units are cached while in use).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from softlabels.errors import ConfigError, DataError, FingerprintMismatch
from softlabels.inputs.tokens import TokenDataset, offsets_of, token_fingerprint
from softlabels.store.layouts.targets import DenseTarget, SampledTarget, TopKTarget
from softlabels.store.positions.tokens import LENGTHS, OFFSETS
from softlabels.student import order as _order
from softlabels.student.lm_metrics import next_token_targets

__all__ = ["TokenDataBatches", "TokenStoreDataset", "batch_target", "select_rows", "TARGET_PREFIX"]

TARGET_PREFIX = "target."
_TARGETS = {"dense": DenseTarget, "topk": TopKTarget, "sampled": SampledTarget}


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + n) for s, n)`` without a Python loop."""
    total = int(lengths.sum())
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets_of(lengths)[:-1], lengths)


def batch_target(batch: dict[str, Any], layout: str) -> DenseTarget | TopKTarget | SampledTarget:
    """The typed teacher target of a batch (its ``target.*`` tensors), rows = the batch's real positions."""
    cls = _TARGETS[layout]
    return cls(**{f.name: batch[TARGET_PREFIX + f.name] for f in dataclasses.fields(cls)})


def select_rows(target: Any, rows: torch.Tensor) -> Any:
    """The same target restricted to ``rows`` (an index or bool mask over its rows)."""
    return dataclasses.replace(target, **{f.name: getattr(target, f.name)[rows] for f in dataclasses.fields(target)})


def _short(fp: Any) -> str:
    return str(fp)[:19] + "..." if fp and len(str(fp)) > 19 else str(fp)


class TokenStoreDataset(_order.EpochState, IterableDataset):
    """Padded next-token batches with per-token teacher targets from one complete ``tokens`` store.

    Each item is a dict of tensors for ``B`` sequences (a rank's slice of one global batch,
    ``B`` may be 0 on a rank at the epoch's end), ``L`` the longest of them:

    * ``ids`` int64 [B, L]: input token ids, right-padded with 0;
    * ``targets`` int64 [B, L]: the next token ``ids[b, t + 1]``, or -100 where the position
      does not count (``loss_mask`` False);
    * ``loss_mask`` bool [B, L]: position ``t`` counts (``t + 1`` is inside the sequence and a
      target of the data's mask): where the hard CE and the divergence are taken;
    * ``lengths``, ``sample_ids`` int64 [B];
    * ``index`` int64 [P]: flat index ``b * L + t`` of each of the batch's ``P`` real
      positions (row-major), the rows of the teacher target;
    * ``target.<field>``: the layout's typed target over those ``P`` positions
      (:func:`batch_target` rebuilds it: DenseTarget / TopKTarget / SampledTarget).

    ``store``: an object with the store-source API (``meta``, ``read_unit``, ...);
    ``data``: the :class:`TokenDataset` it was generated from. Call :meth:`set_epoch`
    before each epoch; ``state_dict``/``load_state_dict`` resume mid-epoch (same world size).
    """

    def __init__(self, store: Any, data: TokenDataset, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                 window_units: int = 4, rank: int | None = None, world_size: int | None = None,
                 verify: bool = True, check_fingerprint: bool = True) -> None:
        super().__init__()
        if rank is None or world_size is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        problems = []
        if not isinstance(batch_size, int) or batch_size < 1:
            problems.append(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(window_units, int) or window_units < 1:
            problems.append(f"window_units must be an integer >= 1, got {window_units!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            problems.append(f"rank must lie in 0..world_size-1, got rank={rank}, world_size={world_size}")
        if problems:
            raise ConfigError(problems)
        meta = store.meta
        if meta.positions != "tokens":
            raise ConfigError(f"{store.path} holds {meta.positions!r} positions, not tokens; train a language "
                              "model from a store generated on token data")
        self.store, self.data, self.meta = store, data, meta
        self.layout_obj = meta.layout_obj()
        self.batch_size, self.shuffle, self.seed = batch_size, bool(shuffle), int(seed)
        self.window_units, self.rank, self.world_size, self.verify = window_units, int(rank), int(world_size), verify
        g = meta.geometry
        self.unit_samples = g.unit_samples
        self._sizes = np.array([b - a for a, b in map(g.unit_samples_range, range(g.num_units))], dtype=np.int64)
        expected = meta.source.get("fingerprint")
        if check_fingerprint and expected:  # stores made without a fingerprint cannot be checked
            got = token_fingerprint(data)
            if got != expected:
                spec = meta.source.get("spec")
                raise FingerprintMismatch(
                    f"{store.path}: the token data given (fingerprint {_short(got)}) is not the data the store was "
                    f"generated from ({_short(expected)}); pass the data the store was generated from"
                    + (f" ({spec})" if spec else ""))
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        store.close()  # no open handle crosses a fork; each process reopens lazily

    # -- metadata ------------------------------------------------------------------------
    num_classes = property(lambda self: int(self.meta.num_classes))
    layout = property(lambda self: self.meta.layout)
    num_samples = property(lambda self: int(self.meta.num_samples))

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank (a rank's slice of the last one may be empty)."""
        return -(-self.num_samples // self.global_batch)

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """Store rows (sample-axis indices) of every global batch of ``epoch``: pure index math."""
        return _order.stream_batches(self._sizes, batch_size=self.global_batch, window_chunks=self.window_units,
                                     seed=self.seed, epoch=epoch, shuffle=self.shuffle, rank=0, world=1,
                                     worker=0, workers=1)

    def rank_rows(self, global_rows: np.ndarray) -> np.ndarray:
        a, b = _order.split(len(global_rows), self.world_size, self.rank)
        return global_rows[a:b]

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        batches = self.global_batches(self.epoch)
        cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        for j in range(skip + worker, len(batches), workers):
            yield self.read_batch(self.rank_rows(batches[j]), cache)

    def _unit(self, unit: int, cache: OrderedDict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if unit in cache:
            cache.move_to_end(unit)
            return cache[unit]
        block = self.store.read_unit(unit, verify=self.verify)
        cache[unit] = block
        while len(cache) > self.window_units + 1:  # a window, plus the one a batch may straddle into
            cache.popitem(last=False)
        return block

    def read_batch(self, rows: np.ndarray, cache: OrderedDict | None = None) -> dict[str, Any]:
        """The batch of store rows ``rows`` (in that order)."""
        cache = OrderedDict() if cache is None else cache
        rows = np.asarray(rows, dtype=np.int64)
        units = rows // self.unit_samples
        b = len(rows)
        lengths = np.empty(b, np.int64)
        sample_ids = np.empty(b, np.int64)
        blocks = {int(u): self._unit(int(u), cache) for u in np.unique(units)}
        for u, block in blocks.items():
            sel = np.flatnonzero(units == u)
            local = rows[sel] - u * self.unit_samples
            lengths[sel], sample_ids[sel] = block[LENGTHS][local], block["sample_ids"][local]
        out_off = offsets_of(lengths)
        specs = self.layout_obj.arrays()
        arrays = {k: np.empty((int(out_off[-1]), *s.shape), s.dtype) for k, s in specs.items()}
        for u, block in blocks.items():  # gather each unit's sequences into their batch slots
            sel = np.flatnonzero(units == u)
            local = rows[sel] - u * self.unit_samples
            src = _ranges(block[OFFSETS][local], lengths[sel])
            dst = _ranges(out_off[:-1][sel], lengths[sel])
            for k in specs:
                arrays[k][dst] = block[k][src]
        if b and (sample_ids.min() < 0 or sample_ids.max() >= len(self.data)):
            raise DataError(f"{self.store.path} refers to sample ids {int(sample_ids.min())}..{int(sample_ids.max())} "
                            f"but the token data has {len(self.data)} sequences; pass the data the store was "
                            "generated from")
        tokens = self.data.get_batch(sample_ids)
        if not np.array_equal(tokens.lengths.numpy(), lengths):
            bad = int(np.flatnonzero(tokens.lengths.numpy() != lengths)[0])
            raise DataError(f"sequence {int(sample_ids[bad])} has {int(tokens.lengths[bad])} tokens in the data but "
                            f"{int(lengths[bad])} positions in {self.store.path}; pass the data the store was "
                            "generated from (same tokenizer and --seq-len)")
        lens = torch.from_numpy(lengths)
        targets, loss_mask = next_token_targets(tokens.ids, tokens.mask, lens)
        width = tokens.ids.shape[1]
        real = torch.arange(width) < lens[:, None]
        target = self.layout_obj.decode(arrays)
        batch = {"ids": tokens.ids, "targets": targets, "loss_mask": loss_mask, "lengths": lens,
                 "sample_ids": torch.from_numpy(sample_ids), "index": real.reshape(-1).nonzero().reshape(-1)}
        batch.update({TARGET_PREFIX + f.name: getattr(target, f.name) for f in dataclasses.fields(target)})
        return batch


class TokenDataBatches(IterableDataset):
    """Padded next-token batches of token data alone (no store): the hard-CE-only language model.

    The same items as :class:`TokenStoreDataset` without the ``target.*`` tensors. Each epoch
    permutes the sequences with an RNG seeded from ``(seed, epoch)`` and cuts them into
    global batches of ``batch_size * world_size``; rank ``r`` takes the ``r``-th balanced
    slice of each, so the stream does not depend on the world size (as for the store).
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
            yield self.read_batch(rows[a:b])

    def read_batch(self, rows: np.ndarray) -> dict[str, Any]:
        tokens = self.data.get_batch(rows)
        lens = tokens.lengths
        targets, loss_mask = next_token_targets(tokens.ids, tokens.mask, lens)
        real = torch.arange(tokens.ids.shape[1]) < lens[:, None]
        return {"ids": tokens.ids, "targets": targets, "loss_mask": loss_mask, "lengths": lens,
                "sample_ids": torch.from_numpy(np.asarray(rows, dtype=np.int64)),
                "index": real.reshape(-1).nonzero().reshape(-1)}
