"""Stream soft-label stores (joined with their inputs) into a training loop.

:class:`SoftLabelDataset` reads whole chunks only: random single-row reads are
400-800x slower than its chunk-wise streaming (docs/BENCHMARKS.md), so it shuffles
chunks, splits the row stream across ranks and DataLoader workers, shuffles rows
within windows of a few chunks, and batches itself. Iterate it directly, or with
workers through :func:`batch_loader` (``batch_loader(ds, num_workers=W)``: the
batches of ``DataLoader(ds, batch_size=None, num_workers=W)``, in the same order,
3-4x faster, and worker errors as one line). The ordering math lives in
:mod:`softlabels.student.order`.

:class:`SoftLabelMapDataset` serves single rows from an LRU cache of whole chunks,
for code that needs a ``Sampler``; a random sampler over it is slow (see there).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from softlabels.errors import (
    ConfigError,
    DataError,
    FingerprintMismatch,
    IncompleteStore,
    StoreMismatch,
)
from softlabels.inputs.arrays import InputDataset, fingerprint
from softlabels.inputs.loader import batch_loader
from softlabels.store import format as fmt
from softlabels.store.layouts import Layout
from softlabels.student import order as _order
from softlabels.student.sources import UnitSource, is_v2

__all__ = ["SoftLabelDataset", "SoftLabelMapDataset", "batch_loader"]

Source = tuple[Any, InputDataset | None]


def _open(store: Any, views_per_sample: int = 1) -> UnitSource:
    """A store source (``UnitStore``, ``V1Store``, an ensemble), or a path to a store, as a :class:`UnitSource`."""
    if not is_v2(store):
        from softlabels.store.reader import open_store

        store = open_store(store)  # either format version; refuses incomplete stores
    if not store.meta.complete:
        raise IncompleteStore(f"{store.path} is incomplete (status {store.meta.status!r}); finish it by "
                              "rerunning 'softlabels generate' with the same arguments")
    return UnitSource(store, views_per_sample)


def _short(fp: Any) -> str:
    return str(fp)[:19] + "..." if fp and len(str(fp)) > 19 else str(fp)


def _check_data(store: UnitSource, data: InputDataset, check_fingerprint: bool) -> None:
    """Refuse inputs that are not the ones the store's teacher saw."""
    expected = store.source.get("fingerprint")
    if check_fingerprint and expected:  # stores made without a fingerprint cannot be checked
        got = fingerprint(data)
        if got != expected:
            spec = store.source.get("spec") or store.source.get("data")
            hint = f" ({spec})" if spec else ""
            raise FingerprintMismatch(
                f"{store.path}: the data given (fingerprint {_short(got)}) is not the data the store was generated "
                f"from ({_short(expected)}); pass the --data the store was generated from{hint}")
    # ids are checked batch by batch (reading them all costs a pass)


def _layout(store: UnitSource) -> Layout:
    return store.layout_obj


def _row_specs(store: UnitSource) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-row arrays of a source: name -> (shape after the row axis, dtype)."""
    return store.row_arrays()


def _signature(store: UnitSource) -> dict[str, Any]:
    return store.signature()


# the arrays' names under which a target's tensors appear in a batch dict
_TARGET_KEYS = {"DenseTarget": {"logits": fmt.LOGITS},
                "TopKTarget": {"values": fmt.TOPK_VALUES, "ids": fmt.TOPK_INDICES, "logsumexp": fmt.LOGSUMEXP},
                "SampledTarget": {"ids": "sampled_ids", "counts": "sampled_counts", "logits": "sampled_logits",
                                  "logsumexp": fmt.LOGSUMEXP}}


def _tensors(block: dict[str, np.ndarray], layout: Layout) -> dict[str, torch.Tensor]:
    """A batch's numpy arrays -> tensors, the teacher's decoded by the layout (no copies).

    The batch holds the target's tensors under the stored arrays' names, not the target
    object: plain tensors are what DataLoader transports, pins and moves to a device;
    :func:`softlabels.student.losses.as_target` rebuilds the typed target from them.
    """
    target = layout.decode(block)
    out = {k: torch.from_numpy(v) for k, v in block.items() if k not in layout.arrays()}
    out.update({name: getattr(target, f) for f, name in _TARGET_KEYS[type(target).__name__].items()})
    return out


class SoftLabelDataset(_order.EpochState, IterableDataset):
    """Batches of teacher outputs (and joined inputs) from one or more complete stores.

    ``sources`` is a list of ``(store, data)``: ``store`` a path (either format
    version) or a store source (``UnitStore``, ``V1Store``, an ensemble), ``data`` the :class:`InputDataset` the store was generated from (joined
    by sample id into ``"x"``) or ``None`` for logits only. All sources need the same
    format, positions, layout, class count, logits dtype and layout parameters.
    Token stores are refused (they belong to the language-model trainer).

    Each epoch, every row of every source is yielded exactly once across all ranks
    and workers (order: see :mod:`softlabels.student.order`); the order depends only on
    ``(seed, epoch, rank, world_size, num_workers)``. Batches are dicts of tensors:
    ``labels``, ``sample_ids``, ``source`` (int64 [B]), ``x`` (float32, with data),
    and the teacher's target as the layout decodes it (stored dtypes, ids int64),
    under the stored arrays' names: ``logits``; ``topk_values``, ``topk_indices``,
    ``logsumexp``; or ``sampled_ids``, ``sampled_counts``, ``sampled_logits``,
    ``logsumexp``. ``softlabels.student.losses.as_target(batch)`` (or :meth:`target`) gives
    the typed target (``DenseTarget``, ``TopKTarget``, ``SampledTarget``). A views store's batches add ``view`` (int64 [B], the view
    :func:`~softlabels.store.positions.views.choose_views` picks for the sample in this
    epoch) and ``view_params`` (float32 [B, P]): the inputs ``x`` are the
    un-augmented ones, and ``augment.apply(x, view_params)`` (on any device) builds
    the view the target belongs to. A rank's last batch may be short.

    ``views_per_sample`` k > 1 (views stores only, ``k <= V``): each sample's input is
    read once and comes with k of its views, the epoch's entries of its view sequence
    (``choose_views(..., per_epoch=k)``): ``view`` is [B, k], ``view_params`` [B, k, P] and
    the teacher's arrays [B, k, ...]; :func:`softlabels.student.replay.spread_views` makes them
    B·k rows. The epoch still covers every sample once; k = 1 is the default's batches.

    Memory: each worker holds one window, ``window_chunks * chunk_rows`` rows of
    teacher outputs and inputs. Call :meth:`set_epoch` before each epoch; do not use
    ``persistent_workers`` (workers copy the dataset when an epoch's iterator starts).

    Resuming mid-epoch: save ``ds.state_dict(batches_done=k)`` where ``k`` counts the
    batches this rank's loop has consumed since the start of the epoch (including
    any skipped by an earlier resume); after restarting, call
    ``ds.load_state_dict(state)`` and iterate with the same world size and
    ``num_workers``: the epoch continues with batch ``k + 1`` of the uninterrupted
    order (the new DataLoader's workers take over the streams in the round-robin
    order where it stopped), and chunks wholly consumed are not read again. The
    state's seed and epoch replace the dataset's; the resume point holds until
    :meth:`set_epoch` moves to another epoch. ``len(ds)`` stays the full epoch's count.
    """

    def __init__(self, sources: Sequence[Source], *, batch_size: int, shuffle: bool = True, seed: int = 0,
                 window_chunks: int = 8, rank: int | None = None, world_size: int | None = None,
                 verify: bool = True, check_fingerprint: bool = True, views_per_sample: int = 1) -> None:
        super().__init__()
        rank, world_size = self._resolve_rank(rank, world_size)
        problems = []
        if not isinstance(batch_size, int) or batch_size < 1:
            problems.append(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(views_per_sample, int) or views_per_sample < 1:
            problems.append(f"views_per_sample must be an integer >= 1, got {views_per_sample!r}")
        if not isinstance(window_chunks, int) or window_chunks < 1:
            problems.append(f"window_chunks must be an integer >= 1, got {window_chunks!r}")
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
        self.window_chunks, self.rank, self.world_size = window_chunks, rank, world_size
        self.verify = bool(verify)
        self.stores = [_open(s, views_per_sample) for s, _ in pairs]
        self.data = [d for _, d in pairs]
        self._check_stores()
        self.views_per_sample = views_per_sample
        if views_per_sample > 1:
            self._check_views_per_sample(views_per_sample)
        for store, data in zip(self.stores, self.data):
            if data is not None:
                _check_data(store, data, check_fingerprint)
        # global chunk list: (source, chunk, rows), source by source
        self._g_source = np.concatenate([np.full(s.num_chunks, i, np.int64) for i, s in enumerate(self.stores)])
        self._g_chunk = np.concatenate([np.arange(s.num_chunks, dtype=np.int64) for s in self.stores])
        self._g_rows = np.array([b - a for s in self.stores for a, b in map(s.chunk_bounds, range(s.num_chunks))],
                                dtype=np.int64)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches_done)
        for s in self.stores:
            s.close()  # no open handle crosses a fork; each process reopens lazily

    @staticmethod
    def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
        if rank is not None and world_size is not None:
            return int(rank), int(world_size)
        if rank is not None or world_size is not None:
            raise ConfigError("pass both rank and world_size, or neither (then torch.distributed decides)")
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _check_stores(self) -> None:
        first = _signature(self.stores[0])
        problems = []
        for s in self.stores[1:]:
            sig = _signature(s)
            for key in first.keys() | sig.keys():
                if sig.get(key) != first.get(key):
                    problems.append(f"{s.path} has {key} {sig.get(key)!r} but {self.stores[0].path} has "
                                    f"{first.get(key)!r}")
        if problems:
            raise StoreMismatch("stores cannot be mixed in one dataset: " + "; ".join(problems)
                                + "; use stores generated with the same settings")

    def _check_views_per_sample(self, k: int) -> None:
        s = self.stores[0]
        views = s.num_views
        if not views:
            kind = s.positions
            raise ConfigError(f"--views-per-sample {k} needs a views store, but {s.path} holds {kind} positions; "
                              "drop --views-per-sample")
        if k > views:
            raise ConfigError(f"--views-per-sample {k} exceeds the {views} views per sample of {s.path}; pass at "
                              f"most {views}")

    # -- metadata ------------------------------------------------------------------------
    num_classes = property(lambda self: self.stores[0].num_classes)
    layout = property(lambda self: self.stores[0].layout)
    layout_obj = property(lambda self: _layout(self.stores[0]))
    positions = property(lambda self: getattr(self.stores[0], "positions", "sample"))
    num_views = property(lambda self: getattr(self.stores[0], "num_views", 0))

    @staticmethod
    def target(batch: dict[str, torch.Tensor]):
        """The typed teacher target of one of this dataset's batches (no copies)."""
        from softlabels.student.losses import as_target

        return as_target(batch)

    @property
    def augment(self) -> str | None:
        """The augmentation spec a views store recorded (its ``view_params`` replay it); else None."""
        s = self.stores[0]
        return str(s.meta.views.get("augment", "")) if s.num_views else None
    num_samples = property(lambda self: int(sum(s.num_samples for s in self.stores)))

    def __len__(self) -> int:
        """Batches this rank yields per epoch (whatever the number of DataLoader workers)."""
        a, b = _order.split(self.num_samples, self.world_size, self.rank)
        return -(-(b - a) // self.batch_size)

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self._iter_worker(worker, workers)

    def _iter_worker(self, loader_worker: int, workers: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches that DataLoader worker ``loader_worker`` of ``workers`` delivers for this rank."""
        worker, skip = loader_worker, 0
        if self._resume is not None and self._resume[0] == self.epoch:
            counts = _order.worker_batch_counts(self.num_samples, self.batch_size, self.rank, self.world_size,
                                                workers)
            taken, due = _order.resume_point(counts, self._resume[1])
            worker = (due + loader_worker) % workers  # continue the round-robin where it stopped
            skip = int(taken[worker]) * self.batch_size
        order = _order.chunk_order(len(self._g_rows), seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        lo, hi = _order.worker_range(self.num_samples, self.batch_size, self.rank, self.world_size, worker, workers)
        windows, offset = _order.plan_windows(self._g_rows, order, lo, hi, self.window_chunks, skip)
        # One buffer per array, reused by every window: chunks are read straight into it,
        # and each batch is gathered from it once (no per-window permute or concatenate).
        specs = _row_specs(self.stores[0])
        layout = _layout(self.stores[0])
        cap = min(self.window_chunks * max(s.chunk_rows for s in self.stores), self.num_samples)
        for k, (shape, dtype) in specs.items():  # sized from the stores' attributes: refuse an implausible size first
            fmt.check_read_size(self.stores[0].path, k, (cap,) + shape, dtype)
        buf = {k: np.empty((cap,) + shape, dtype) for k, (shape, dtype) in specs.items()}
        current, rows, source = -1, np.empty(0, np.int64), np.empty(0, np.int64)
        for pieces in _order.batch_pieces([w.rows for w in windows], self.batch_size, offset):
            n = sum(b - a for _, a, b in pieces)
            batch = {k: np.empty((n,) + v.shape[1:], v.dtype) for k, v in buf.items()}
            batch["source"] = np.empty(n, np.int64)
            pos = 0
            for w, a, b in pieces:
                if w != current:
                    current = w
                    rows, source = self._load_window(windows[w], buf)
                    perm = _order.window_perm(windows[w].rows, shuffle=self.shuffle, seed=self.seed,
                                              epoch=self.epoch, rank=self.rank, worker=worker,
                                              window=windows[w].index)
                    if perm is not None:
                        rows, source = rows[perm], source[perm]
                for k, v in buf.items():  # mode="clip": no bounds pass, and no buffered copy of `out`
                    np.take(v, rows[a:b], axis=0, out=batch[k][pos:pos + b - a], mode="clip")
                batch["source"][pos:pos + b - a] = source[a:b]
                pos += b - a
            tensors = _tensors(batch, layout)
            if self.data[0] is not None:
                tensors["x"] = self._inputs(batch[fmt.SAMPLE_IDS], batch["source"])
            yield tensors

    def _load_window(self, win: _order.Window, buf: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Read a window's chunks whole into ``buf``; return the buffer row and source of each window row."""
        rows, sources, at = [], [], 0
        for g, a, b in zip(win.chunks, win.lo, win.hi):
            s, c = int(self._g_source[g]), int(self._g_chunk[g])
            store = self.stores[s]
            c0, c1 = store.chunk_bounds(c)
            out = {k: v[at:at + c1 - c0] for k, v in buf.items()}
            store.read_into(c, out, verify=self.verify, seed=self.seed, epoch=self.epoch)
            rows.append(np.arange(at + a, at + b))
            sources.append(np.full(b - a, s, dtype=np.int64))
            at += c1 - c0
        return np.concatenate(rows), np.concatenate(sources)

    def _inputs(self, ids: np.ndarray, source: np.ndarray) -> torch.Tensor:
        """The batch's inputs, joined by sample id (one vectorised read per source)."""
        for s in np.unique(source):
            ids_s, n = ids[source == s], len(self.data[s])
            if len(ids_s) and (int(ids_s.min()) < 0 or int(ids_s.max()) >= n):
                raise DataError(f"{self.stores[s].path} refers to sample id {int(ids_s.max())} but the data has "
                                f"{n} items; pass the --data the store was generated from")
        if len(self.data) == 1:
            return self.data[0].get_batch(ids)[0]
        parts = [(m, self.data[s].get_batch(ids[m])[0]) for s in np.unique(source) for m in (source == s,)]
        x = torch.empty((len(ids),) + tuple(parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
        for m, xs in parts:
            x[torch.from_numpy(m)] = xs
        return x


class SoftLabelMapDataset(Dataset):
    """Map-style access to one store: ``ds[i]`` is row ``i`` as a dict of tensors.

    Rows come from an LRU cache of ``cache_chunks`` whole chunks (inputs joined per
    chunk with ``data.get_batch``). Sequential or chunk-grouped access is fast; a
    **random sampler is slow**: each index most likely falls in a chunk not in the
    cache, so every row costs a whole chunk read (``chunk_rows`` times the data),
    and single-row reads are 500-1000x slower than streaming. Prefer
    :class:`SoftLabelDataset`, which shuffles chunks and rows within windows.
    Item keys match the batches of :class:`SoftLabelDataset` (``source`` is 0).
    """

    def __init__(self, store: Any, data: InputDataset | None = None, cache_chunks: int = 4,
                 *, verify: bool = True, check_fingerprint: bool = True) -> None:
        if not isinstance(cache_chunks, int) or cache_chunks < 1:
            raise ConfigError(f"cache_chunks must be an integer >= 1, got {cache_chunks!r}")
        self.store = _open(store)
        if self.store.positions != "sample":
            raise ConfigError(f"{self.store.path} holds {self.store.positions} positions; SoftLabelMapDataset reads "
                              "sample stores: stream it with SoftLabelDataset")
        self.data, self.cache_chunks, self.verify = data, cache_chunks, bool(verify)
        if data is not None:
            _check_data(self.store, data, check_fingerprint)
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.store.close()

    num_classes = property(lambda self: self.store.num_classes)
    layout = property(lambda self: self.store.layout)

    def __len__(self) -> int:
        return self.store.num_samples

    def _chunk(self, c: int) -> dict[str, torch.Tensor]:
        block = self._cache.get(c)
        if block is not None:
            self._cache.move_to_end(c)
            return block
        arrays = self.store.store.read_unit(c, verify=self.verify)
        block = _tensors(arrays, _layout(self.store))
        if self.data is not None:
            block["x"] = self.data.get_batch(arrays[fmt.SAMPLE_IDS])[0]
        self._cache[c] = block
        while len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return block

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self)
        i = int(index) + (n if int(index) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"row {index} out of range for a store of {n} rows")
        c = i // self.store.chunk_rows
        block = self._chunk(c)
        r = i - c * self.store.chunk_rows
        # clone: a view would keep (and, in a worker, share) the whole chunk
        item = {k: v[r].clone() for k, v in block.items()}
        item["source"] = torch.tensor(0, dtype=torch.int64)
        return item

