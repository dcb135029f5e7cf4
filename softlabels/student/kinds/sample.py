"""``sample`` and ``views`` positions as a classifier's batches: one target per input.

A unit's rows are its samples. A ``views`` store gives each sample the view of the epoch
(:func:`~softlabels.store.positions.views.choose_views`), picked from the unit as it is read,
so a unit in memory holds one position per sample whatever V is: the chosen view's layout
arrays plus ``view`` (its index) and ``view_params``. With ``views_per_sample`` k > 1 a row
holds the epoch's k chosen views of its sample: each of those arrays gains an axis of k after
the row axis (the input is still read once; :func:`spread_views` makes them B·k rows on the
device). A batch's keys: docs/LIBRARY.md, "Streaming whole stores".
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from softlabels.errors import DataError, FingerprintMismatch
from softlabels.inputs.fingerprints import fingerprint
from softlabels.store import format as fmt
from softlabels.store.positions.views import VIEW_PARAMS, choose_views
from softlabels.student.losses import target_arrays

__all__ = ["SampleRows", "VIEW", "join_rows", "same_data", "short", "spread_views"]

VIEW = "view"


def short(fp: Any) -> str:
    """A fingerprint cut to what a one-line message needs."""
    return str(fp)[:19] + "..." if fp and len(str(fp)) > 19 else str(fp)


def same_data(store: Any, fingerprint_of: Callable[[], str], what: str, flag: str) -> None:
    """Refuse data whose fingerprint is not the one ``store`` recorded (a store without one cannot be checked)."""
    source = store.meta.source
    expected = source.get("fingerprint")
    if expected and (got := fingerprint_of()) != expected:
        spec = source.get("spec") or source.get("data")
        raise FingerprintMismatch(
            f"{store.path}: the {what} given (fingerprint {short(got)}) is not the data the store was generated "
            f"from ({short(expected)}); pass the {flag} the store was generated from" + (f" ({spec})" if spec else ""))


class SampleRows:
    """Rows and batches of ``sample`` and ``views`` stores (see the module doc)."""

    share = "rows"  # each rank streams its own share of the rows (softlabels.student.order)
    window = 8  # units shuffled together, by default

    def __init__(self, meta: Any, views_per_sample: int = 1) -> None:
        self.layout = meta.layout_obj()
        self.num_views = int(meta.views["count"]) if meta.positions == "views" else 0
        self.params = len(meta.views["param_names"]) if self.num_views else 0
        self.k = int(views_per_sample)
        many = (self.k,) if self.num_views and self.k > 1 else ()
        specs = {name: (many + s.shape, s.dtype) for name, s in self.layout.arrays().items()}
        if self.num_views:
            specs[VIEW_PARAMS] = (many + (self.params,), np.dtype("float32"))
            specs[VIEW] = (many, np.dtype("int64"))
        self.specs = {**specs, fmt.LABELS: ((), np.dtype("int64")), fmt.SAMPLE_IDS: ((), np.dtype("int64"))}
        self.names = tuple(self.layout.arrays())  # the target's arrays (asked once: a batch loop is hot)

    @staticmethod
    def check_data(store: Any, data: Any, check_fingerprint: bool) -> None:
        """Refuse inputs that are not the ones the store's teacher saw (ids are checked batch by batch)."""
        if data is not None and check_fingerprint:
            same_data(store, lambda: fingerprint(data), "data", "--data")

    # -- a unit in memory -------------------------------------------------------------------------
    def unit_rows(self, block: dict[str, np.ndarray], *, seed: int, epoch: int) -> dict[str, np.ndarray]:
        """A unit's rows: the block itself, or each sample's view(s) of the epoch; values checked."""
        if not self.num_views:
            rows = block
        else:
            ids = block[fmt.SAMPLE_IDS]
            many = self.k > 1
            view = choose_views(seed, ids, epoch, self.num_views, self.k if many else None)
            pick = (np.arange(len(ids))[:, None] if many else np.arange(len(ids)), view)
            rows = {k: block[k][pick] for k in self.names}
            rows.update({VIEW_PARAMS: block[VIEW_PARAMS][pick].astype(np.float32), VIEW: view,
                         fmt.LABELS: block[fmt.LABELS], fmt.SAMPLE_IDS: ids})
        # ids < C and the like, on the rows that will be trained on ([n, k, ...] is checked as n·k rows)
        lead = 2 if self.num_views and self.k > 1 else 1
        self.layout.check({k: rows[k].reshape(-1, *rows[k].shape[lead:]) for k in self.names})
        return rows

    def holder(self, load: Callable[[int], dict[str, np.ndarray]], *, keep: int, sizes: np.ndarray) -> Slots:
        """Where one iterator keeps the units it streams (see :class:`Slots`)."""
        return Slots(load, keep, sizes, self.specs, direct=not self.num_views)

    # -- a batch ------------------------------------------------------------------------------------
    def batches(self, held: Slots, batches: Iterator[tuple[np.ndarray, np.ndarray]],
                source: np.ndarray, stores: list, data: list) -> Iterator[dict[str, torch.Tensor]]:
        """For each ``(unit, local)`` of ``batches``, the batch of rows ``local`` of global units
        ``unit`` (in that order) joined with its inputs (``source``: each global unit's source)."""
        for unit, local in batches:
            src = source[unit]
            arrays = {k: np.empty((len(unit), *shape), dtype)
                      for k, (shape, dtype) in self.specs.items()}
            held.gather(unit, local, arrays)
            out = {k: torch.from_numpy(v) for k, v in arrays.items() if k not in self.names}
            out["source"] = torch.from_numpy(src)
            out.update(target_arrays(self.layout.decode({k: arrays[k] for k in self.names})))
            if data[0] is not None:
                out["x"] = _inputs(arrays[fmt.SAMPLE_IDS], src, stores, data)
            yield out


class Slots:
    """Up to ``keep`` units' rows in one buffer per array, so most batches are one ``np.take`` per array.

    A unit is read (``load(g, out=...)``, straight into its slot where its rows are the stored
    arrays) when a batch first needs it, into a free slot or the one read longest ago (the windows
    are streamed in order, so that unit's rows are all behind); a batch needing more units than
    fit (one straddling two windows, or the first after a resume) is gathered in rounds.
    """

    def __init__(self, load: Callable[..., dict[str, np.ndarray]], keep: int, sizes: np.ndarray,
                 specs: dict[str, tuple[tuple[int, ...], np.dtype]], *, direct: bool = False) -> None:
        keep = min(keep, len(sizes))  # never more slots than units
        self.load, self.keep, self.rows, self.sizes = load, keep, int(sizes.max(initial=1)), sizes
        self.specs, self.buf, self.reads, self.direct = specs, None, 0, direct
        self.start = np.full(len(sizes), -1, np.int64)  # global unit -> its first row in the buffer, or -1
        self.unit_in = np.full(keep, -1, np.int64)  # slot -> its global unit, or -1
        self.read_at = np.full(keep, -1, np.int64)  # slot -> when its unit was read

    def gather(self, unit: np.ndarray, local: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """``out[k][i] = (rows of unit[i])[k][local[i]]`` for every array ``k`` of ``out``."""
        at = self.start[unit]
        if at.min(initial=0) >= 0:  # every unit at hand: one take per array
            at += local
            for k, v in out.items():  # mode="clip": no bounds pass, and no buffered copy of `out`
                np.take(self.buf[k], at, axis=0, out=v, mode="clip")
            return
        done = np.zeros(len(unit), bool)
        while True:
            ready = (at >= 0) & ~done
            if ready.any():
                for k, v in out.items():
                    v[ready] = self.buf[k][at[ready] + local[ready]]
                done |= ready
            if done.all():
                return
            self._read(unit[~done])
            at = self.start[unit]

    def _read(self, wanted: np.ndarray) -> None:
        """Read the units ``wanted`` (none at hand), as many as fit, in the order they first appear.

        The rows still to gather are all theirs, so any slot may take a new unit."""
        if self.buf is None:
            self.buf = {k: np.empty((self.keep * self.rows, *shape), dtype) for k, (shape, dtype) in self.specs.items()}
        order = wanted[np.sort(np.unique(wanted, return_index=True)[1])]
        free = np.ones(self.keep, bool)  # slots not filled by this call
        for g in order.tolist()[:self.keep]:
            s = int(np.flatnonzero(free)[np.argmin(self.read_at[free])])  # the one read longest ago
            if self.unit_in[s] >= 0:
                self.start[self.unit_in[s]] = -1
            n = int(self.sizes[g])
            slot = {k: v[s * self.rows:s * self.rows + n] for k, v in self.buf.items()}
            rows = self.load(g, out=slot if self.direct else None)  # a unit's rows as stored: read in place
            for k, v in slot.items():
                if rows[k] is not v:
                    v[...] = rows[k]
            self.start[g], self.unit_in[s], self.read_at[s], free[s] = s * self.rows, g, self.reads, False
            self.reads += 1


def _inputs(ids: np.ndarray, source: np.ndarray, stores: list, data: list) -> torch.Tensor:
    """The batch's inputs, joined by sample id (one vectorised read per source)."""
    if len(data) == 1:  # one source, the common case: no split by source (np.unique was a third of the join)
        _check_ids(ids, stores[0], len(data[0]))
        return data[0].get_batch(ids)[0]
    for s in np.unique(source):
        _check_ids(ids[source == s], stores[s], len(data[s]))
    parts = [(m, data[s].get_batch(ids[m])[:1]) for s in np.unique(source) for m in (source == s,)]
    return join_rows(len(ids), parts)[0]


def join_rows(n: int, parts: list[tuple[np.ndarray, tuple[torch.Tensor, ...]]]
              ) -> tuple[torch.Tensor, ...]:
    """Tensors of ``n`` rows from ``(mask, tensors)`` parts: a part's rows go where its mask is."""
    out = tuple(torch.empty((n, *t.shape[1:]), dtype=t.dtype) for t in parts[0][1])
    for m, tensors in parts:
        for o, t in zip(out, tensors):
            o[torch.from_numpy(m)] = t
    return out


def _check_ids(ids: np.ndarray, store: Any, n: int) -> None:
    """Refuse sample ids the data does not have (a store generated from other data)."""
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise DataError(f"{store.path} refers to sample id {int(ids.max())} but the data has {n} items; "
                        "pass the --data the store was generated from")


def spread_views(batch: dict[str, Any], k: int, layout: Any) -> dict[str, Any]:
    """A batch of B samples with k views each (``[B, k, ...]`` teacher arrays, ``view``, ``view_params``) as
    B·k rows, sample by sample: the per-view arrays flattened, everything per sample (``x``, labels, ids)
    repeated k times. Done on the device, so the input crosses from the loader once per sample."""
    # the target's arrays (a top-k store without a tail grid decodes its logsumexp to tail_logsumexp)
    per_view = {*layout.arrays(), "tail_logsumexp", VIEW_PARAMS, VIEW}
    out = {}
    for key, v in batch.items():
        if not isinstance(v, torch.Tensor):
            out[key] = v
        elif key in per_view:
            out[key] = v.reshape(v.shape[0] * k, *v.shape[2:])
        else:
            out[key] = v.repeat_interleave(k, 0)
    return out
