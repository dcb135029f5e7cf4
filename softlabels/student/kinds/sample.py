"""``sample`` and ``views`` positions as a classifier's batches: one target per input.

A unit's rows are its samples. A ``views`` store gives each sample the view of the epoch
(:func:`~softlabels.store.positions.views.choose_views`), picked from the unit as it is read,
so a unit in memory holds one position per sample whatever V is: the chosen view's layout
arrays plus ``view`` (its index) and ``view_params``. With ``views_per_sample`` k > 1 a row
holds the epoch's k chosen views of its sample: each of those arrays gains an axis of k after
the row axis (the input is still read once; :func:`spread_views` makes them B·k rows on the
device).

A batch is a dict of tensors: ``labels``, ``sample_ids``, ``source`` (int64 [B]), ``x`` (the
inputs joined by sample id from each source's :class:`~softlabels.inputs.arrays.InputDataset`)
and the teacher's target under the stored arrays' names (:func:`~softlabels.student.losses.as_target`
rebuilds it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from softlabels.errors import DataError, FingerprintMismatch
from softlabels.inputs.arrays import fingerprint
from softlabels.store import format as fmt
from softlabels.store.positions.views import VIEW_PARAMS, choose_views
from softlabels.student.losses import target_arrays

__all__ = ["SampleRows", "VIEW", "spread_views", "short"]

VIEW = "view"


def short(fp: Any) -> str:
    """A fingerprint cut to what a one-line message needs."""
    return str(fp)[:19] + "..." if fp and len(str(fp)) > 19 else str(fp)


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

    @staticmethod
    def check_data(store: Any, data: Any, check_fingerprint: bool) -> None:
        """Refuse inputs that are not the ones the store's teacher saw (ids are checked batch by batch)."""
        source = store.meta.source
        expected = source.get("fingerprint")
        if data is not None and check_fingerprint and expected:  # stores made without a fingerprint cannot be checked
            got = fingerprint(data)
            if got != expected:
                spec = source.get("spec") or source.get("data")
                hint = f" ({spec})" if spec else ""
                raise FingerprintMismatch(
                    f"{store.path}: the data given (fingerprint {short(got)}) is not the data the store was "
                    f"generated from ({short(expected)}); pass the --data the store was generated from{hint}")

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
            rows = {k: block[k][pick] for k in self.layout.arrays()}
            rows.update({VIEW_PARAMS: block[VIEW_PARAMS][pick].astype(np.float32), VIEW: view,
                         fmt.LABELS: block[fmt.LABELS], fmt.SAMPLE_IDS: ids})
        # ids < C and the like, on the rows that will be trained on ([n, k, ...] is checked as n·k rows)
        lead = 2 if self.num_views and self.k > 1 else 1
        self.layout.check({k: rows[k].reshape(-1, *rows[k].shape[lead:]) for k in self.layout.arrays()})
        return rows

    # -- a batch ------------------------------------------------------------------------------------
    def batch(self, units: dict[int, dict[str, np.ndarray]], unit: np.ndarray, local: np.ndarray,
              source: np.ndarray, stores: list, data: list) -> dict[str, torch.Tensor]:
        """The batch of rows ``local`` of units ``unit`` (in that order), joined with its inputs."""
        n = len(unit)
        arrays = {k: np.empty((n, *shape), dtype) for k, (shape, dtype) in self.specs.items()}
        gather(units, unit, local, arrays)
        names = self.layout.arrays()
        out = {k: torch.from_numpy(v) for k, v in arrays.items() if k not in names}
        out["source"] = torch.from_numpy(source)
        out.update(target_arrays(self.layout.decode({k: arrays[k] for k in names})))
        if data[0] is not None:
            out["x"] = _inputs(arrays[fmt.SAMPLE_IDS], source, stores, data)
        return out


def gather(units: dict[int, dict[str, np.ndarray]], unit: np.ndarray, local: np.ndarray,
           out: dict[str, np.ndarray]) -> None:
    """``out[k][i] = units[unit[i]][k][local[i]]`` for every array ``k`` of ``out``, one unit at a time."""
    if len(units) == 1:
        block = next(iter(units.values()))
        for k, v in out.items():  # mode="clip": no bounds pass, and no buffered copy of `out`
            np.take(block[k], local, axis=0, out=v, mode="clip")
        return
    for u, block in units.items():
        sel = np.flatnonzero(unit == u)
        rows = local[sel]
        for k, v in out.items():
            v[sel] = block[k][rows]


def _inputs(ids: np.ndarray, source: np.ndarray, stores: list, data: list) -> torch.Tensor:
    """The batch's inputs, joined by sample id (one vectorised read per source)."""
    for s in np.unique(source):
        ids_s, n = ids[source == s], len(data[s])
        if len(ids_s) and (int(ids_s.min()) < 0 or int(ids_s.max()) >= n):
            raise DataError(f"{stores[s].path} refers to sample id {int(ids_s.max())} but the data has {n} items; "
                            "pass the --data the store was generated from")
    if len(data) == 1:
        return data[0].get_batch(ids)[0]
    parts = [(m, data[s].get_batch(ids[m])[0]) for s in np.unique(source) for m in (source == s,)]
    x = torch.empty((len(ids),) + tuple(parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
    for m, xs in parts:
        x[torch.from_numpy(m)] = xs
    return x


def spread_views(batch: dict[str, Any], k: int, layout: Any) -> dict[str, Any]:
    """A batch of B samples with k views each (``[B, k, ...]`` teacher arrays, ``view``, ``view_params``) as
    B·k rows, sample by sample: the per-view arrays flattened, everything per sample (``x``, labels, ids)
    repeated k times. Done on the device, so the input crosses from the loader once per sample."""
    per_view = {*layout.arrays(), VIEW_PARAMS, VIEW}
    out = {}
    for key, v in batch.items():
        if not isinstance(v, torch.Tensor):
            out[key] = v
        elif key in per_view:
            out[key] = v.reshape(v.shape[0] * k, *v.shape[2:])
        else:
            out[key] = v.repeat_interleave(k, 0)
    return out
