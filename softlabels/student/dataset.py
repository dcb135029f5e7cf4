"""Stream stores of any position kind, joined with their inputs, into a training loop.

:class:`SoftLabelDataset` reads whole write units only (random single-row reads are 400-800x
slower, docs/BENCHMARKS.md) and batches itself, in the order of :mod:`softlabels.student.order`;
what a row and a batch are belongs to the position kind (:mod:`softlabels.student.kinds`).
Iterate it directly, or with workers through :func:`batch_loader` (the batches of
``DataLoader(ds, batch_size=None, num_workers=W)``, in the same order, 3-4x faster). Stores are
read through the unit API only (``.meta``, ``.read_unit``, ``len``, ``.path``, ``.close``): a
format-2 store, a format-1 store presented as ``sample`` positions, or an ensemble of stores.
:class:`DataBatches` gives batches of data alone (hard labels).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from softlabels.errors import ConfigError, IncompleteStore, StoreMismatch
from softlabels.inputs.loader import batch_loader
from softlabels.store.readahead import ReadAhead
from softlabels.student import order as _order
from softlabels.student.kinds.sample import SampleRows
from softlabels.student.kinds.tokens import TokenRows

__all__ = ["DataBatches", "SoftLabelDataset", "SoftLabelMapDataset", "batch_loader", "open_source"]

Source = tuple[Any, Any]

ROWS = {"sample": SampleRows, "views": SampleRows, "tokens": TokenRows}


def open_source(store: Any) -> Any:
    """A complete store with the unit API: ``store`` itself, or the store at a path (either format)."""
    meta = getattr(store, "meta", None)
    if meta is not None and not meta.complete:
        raise IncompleteStore(f"{store.path} is incomplete (status {meta.status!r}); finish it by rerunning "
                              "'softlabels generate' with the same arguments")
    if not hasattr(store, "read_unit"):
        if not isinstance(store, (str, Path)):
            raise ConfigError(f"{store!r} is no store: pass a path, or a store opened with "
                              "softlabels.store.reader.open_store")
        from softlabels.store.reader import open_store

        return open_store(store)  # refuses an incomplete store
    return store


def _signature(meta: Any) -> dict[str, Any]:
    """What must agree between the stores of one dataset."""
    views = meta.views or {}
    return {"positions": meta.positions, "layout": meta.layout, "num_classes": meta.num_classes,
            "logits_dtype": meta.logits_dtype, "layout_params": meta.layout_params,
            "views": views.get("count", 0), "view_params": len(views.get("param_names", ()))}


class SoftLabelDataset(IterableDataset):
    """Batches of teacher outputs (and joined inputs) from complete stores (docs/LIBRARY.md).

    ``sources``: ``(store, data)`` pairs, ``store`` a path or a store with the unit API, ``data``
    what it was generated from, joined by sample id (an ``InputDataset``, or None, for ``sample``
    and ``views`` stores; the ``TokenDataset`` for a ``tokens`` store). The stores must agree in
    positions, layout, class count, logits dtype and layout parameters. A batch is the position
    kind's (:mod:`softlabels.student.kinds`); ``as_target(batch)`` gives its typed target. Each
    epoch yields every row once across ranks and workers (:mod:`softlabels.student.order`): call
    :meth:`set_epoch` before each; :meth:`state_dict` and :meth:`load_state_dict` resume mid-epoch.
    ``views_per_sample`` k > 1: each sample's input comes with k of its views (``[B, k, ...]``
    arrays; :func:`~softlabels.student.kinds.sample.spread_views` makes them B·k rows).
    """

    def __init__(self, sources: Sequence[Source], *, batch_size: int, shuffle: bool = True, seed: int = 0,
                 window_chunks: int | None = None, rank: int | None = None, world_size: int | None = None,
                 verify: bool = True, check_fingerprint: bool = True, views_per_sample: int = 1) -> None:
        super().__init__()
        rank, world_size = _resolve_rank(rank, world_size)
        problems = []
        for name, value in (("batch_size", batch_size), ("views_per_sample", views_per_sample),
                            ("window_chunks", 1 if window_chunks is None else window_chunks)):
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            problems.append(f"rank must lie in 0..world_size-1, got rank={rank}, world_size={world_size}")
        pairs = list(sources) if isinstance(sources, (list, tuple)) else []
        if not pairs or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in pairs):
            problems.append("sources must be a non-empty list of (store, data) pairs; data may be None")
        if problems:
            raise ConfigError(problems)
        if len({d is None for _, d in pairs}) > 1:
            raise ConfigError("give input data for every source or for none (batches mix sources)")
        self.batch_size, self.shuffle, self.seed = batch_size, bool(shuffle), int(seed)
        self.rank, self.world_size, self.verify = rank, world_size, bool(verify)
        self.stores = [open_source(s) for s, _ in pairs]
        self.data = [d for _, d in pairs]
        self._check_stores()
        meta = self.stores[0].meta
        self.kind = ROWS[meta.positions](meta, views_per_sample)
        self.window_chunks = window_chunks or self.kind.window
        self.views_per_sample = views_per_sample
        if views_per_sample > 1:
            self._check_views_per_sample(views_per_sample)
        for store, data in zip(self.stores, self.data):
            self.kind.check_data(store, data, check_fingerprint)
        # the global unit list: source 0's units in order, then source 1's, ...
        self._sizes = np.concatenate([_unit_sizes(s) for s in self.stores])
        self._source = np.concatenate([np.full(s.meta.num_units, i, np.int64) for i, s in enumerate(self.stores)])
        self._unit = np.concatenate([np.arange(s.meta.num_units, dtype=np.int64) for s in self.stores])
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.int64)
        # stores that read a unit into given arrays (an ensemble combines into new ones)
        self._reads_into = ["out" in inspect.signature(s.read_unit).parameters for s in self.stores]
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches_done)
        for s in self.stores:
            s.close()  # no open handle crosses a fork; each process reopens lazily

    def _check_stores(self) -> None:
        first = _signature(self.stores[0].meta)
        problems = [f"{s.path} has {key} {value!r} but {self.stores[0].path} has {first[key]!r}"
                    for s in self.stores[1:] for key, value in _signature(s.meta).items()
                    if value != first[key]]
        if problems:
            raise StoreMismatch("stores cannot be mixed in one dataset: " + "; ".join(problems)
                                + "; use stores generated with the same settings")

    def _check_views_per_sample(self, k: int) -> None:
        s, views = self.stores[0], self.num_views
        if not views:
            raise ConfigError(f"--views-per-sample {k} needs a views store, but {s.path} holds {self.positions} "
                              "positions; drop --views-per-sample")
        if k > views:
            raise ConfigError(f"--views-per-sample {k} exceeds the {views} views per sample of {s.path}; pass at "
                              f"most {views}")

    # -- metadata ------------------------------------------------------------------------
    meta = property(lambda self: self.stores[0].meta)
    num_classes = property(lambda self: int(self.meta.num_classes))
    layout = property(lambda self: self.meta.layout)
    layout_obj = property(lambda self: self.kind.layout)
    positions = property(lambda self: self.meta.positions)
    num_views = property(lambda self: int((self.meta.views or {}).get("count", 0)))
    num_samples = property(lambda self: int(self._sizes.sum()))

    @property
    def augment(self) -> str | None:
        """The augmentation spec a views store recorded (its ``view_params`` replay it); else None."""
        return str(self.meta.views.get("augment", "")) if self.num_views else None

    def __len__(self) -> int:
        """Batches this rank yields per epoch (whatever the number of DataLoader workers)."""
        return _order.batches_per_epoch(self.num_samples, self.batch_size, self.rank, self.world_size,
                                        self.kind.share)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self._resume is not None and self._resume[0] != self.epoch:
            self._resume = None

    def state_dict(self, batches_done: int = 0) -> dict[str, int]:
        """Resume state after the loop consumed ``batches_done`` batches of the current epoch."""
        if not 0 <= batches_done <= len(self):
            raise ConfigError(f"batches_done must lie in 0..{len(self)} (batches per epoch), got "
                              f"{batches_done}")
        return {"epoch": self.epoch, "seed": self.seed, "batches_done": int(batches_done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue ``state["epoch"]`` after its first ``state["batches_done"]`` batches."""
        missing = [k for k in ("epoch", "seed", "batches_done") if k not in state]
        if missing:
            raise ConfigError(f"dataset state lacks {', '.join(missing)}; pass a dict from "
                              "state_dict()")
        k = int(state["batches_done"])
        if not 0 <= k <= len(self):
            raise ConfigError(f"dataset state has batches_done={k} but this rank yields "
                              f"{len(self)} batches per epoch; resume with the same stores, batch "
                              "size and world size")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._resume = (self.epoch, k)

    # -- iteration -------------------------------------------------------------------------
    def worker_state(self) -> tuple[int, ...]:
        """The epoch, seed and resume point as ints, for :func:`batch_loader`'s long-lived workers."""
        resume = self._resume if self._resume is not None else (-1, -1)
        return (self.epoch, self.seed, *resume)

    def set_worker_state(self, state: tuple[int, ...]) -> None:
        """Adopt another copy's :meth:`worker_state`."""
        self.epoch, self.seed = state[0], state[1]
        self._resume = None if state[2] < 0 else (state[2], state[3])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self._iter_worker(worker, workers)

    def _iter_worker(self, loader_worker: int, workers: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches that DataLoader worker ``loader_worker`` of ``workers`` delivers for this rank."""
        done = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        batches = _order.loader_batches(
            self._sizes, share=self.kind.share, batch_size=self.batch_size, window_chunks=self.window_chunks,
            seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, rank=self.rank, world=self.world_size,
            worker=loader_worker, workers=workers, done=done)
        ahead = ReadAhead.for_stores(self.stores, self._load)  # stores at URLs: units read on a few threads
        if ahead is not None:
            batches = ahead.batches(batches)
        held = self.kind.holder(self._load if ahead is None else ahead.load, keep=self.window_chunks + 1,
                                sizes=self._sizes)  # a window, plus one
        yield from self.kind.batches(held, batches, self._source, self.stores, self.data)

    def _load(self, g: int, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The rows of global unit ``g``, read whole (checksum-verified with ``verify``; into ``out`` if given)."""
        s = int(self._source[g])
        kw = {"out": out} if out is not None and self._reads_into[s] else {}
        block = self.stores[s].read_unit(int(self._unit[g]), verify=self.verify, **kw)
        return self.kind.unit_rows(block, seed=self.seed, epoch=self.epoch)


def _unit_sizes(store: Any) -> np.ndarray:
    g = store.meta.geometry
    return np.array([b - a for a, b in map(g.unit_samples_range, range(g.num_units))], dtype=np.int64)


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if rank is not None or world_size is not None:
        raise ConfigError("pass both rank and world_size, or neither (then torch.distributed decides)")
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SoftLabelMapDataset(Dataset):
    """Map-style access to one store: ``ds[i]`` is row ``i`` (store order) as a dict of tensors
    (a sparse layout's temperatures stay as the store's tuple or float).

    Rows come from an LRU cache of ``cache_chunks`` whole units, so a random sampler costs a unit
    read per row: prefer :class:`SoftLabelDataset` there. Items are the rows of its batches (views
    stores: the view of epoch 0).
    """

    def __init__(self, store: Any, data: Any = None, cache_chunks: int = 4, *, verify: bool = True,
                 check_fingerprint: bool = True) -> None:
        if not isinstance(cache_chunks, int) or cache_chunks < 1:
            raise ConfigError(f"cache_chunks must be an integer >= 1, got {cache_chunks!r}")
        self.ds = SoftLabelDataset([(store, data)], batch_size=1, shuffle=False, rank=0, world_size=1,
                                   verify=verify, check_fingerprint=check_fingerprint)
        self.held = self.ds.kind.holder(self.ds._load, keep=cache_chunks, sizes=self.ds._sizes)

    num_classes = property(lambda self: self.ds.num_classes)
    layout = property(lambda self: self.ds.layout)

    def __len__(self) -> int:
        return self.ds.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self)
        i = int(index) + (n if int(index) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"row {index} out of range for a store of {n} rows")
        ds = self.ds
        unit = np.searchsorted(ds._starts, [i], side="right") - 1
        rows = iter([(unit, i - ds._starts[unit])])
        batch = next(ds.kind.batches(self.held, rows, ds._source, ds.stores, ds.data))
        return {k: v[0] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}  # temperatures: kept


class DataBatches(Dataset):
    """Batches of data alone (no store; hard labels): item ``i`` is this rank's batch ``i``.

    Each epoch permutes ``ids`` with an RNG seeded from ``(seed, epoch)``. ``share="rows"``: rank
    ``r`` takes every ``world``-th row of it (ranks differ by at most one row), in batches of
    ``batch_size``; ``share="batches"``: it is cut into global batches of ``batch_size * world``
    rows and rank ``r`` takes the ``r``-th balanced slice of each (which may be empty).
    ``make(rows)`` builds the batch of the data's rows ``rows``.
    """

    def __init__(self, ids: np.ndarray, make: Callable[[np.ndarray], dict[str, Any]], *, share: str,
                 batch_size: int, seed: int, rank: int, world: int) -> None:
        self.ids, self.make, self.share = ids, make, share
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.order = self.ids[np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))]
        if self.share == "rows":
            self.order = self.order[self.rank::self.world]
        self.step = self.batch_size * (self.world if self.share == "batches" else 1)

    def __len__(self) -> int:
        return -(-len(self.order) // self.step)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        rows = self.order[i * self.step:(i + 1) * self.step]
        if self.share == "batches":
            a, b = _order.split(len(rows), self.world, self.rank)
            rows = rows[a:b]
        return self.make(rows)
