"""A format-v2 store source seen as the streaming dataset's chunks: one write unit, one view per sample.

:class:`~softlabels.student.dataset.SoftLabelDataset` streams whole chunks of rows. A v2 source
(anything with the store-source API of ``UnitStore``: ``.path``, ``.meta``, ``len()``,
``.read_unit``, ``.close``; an ensemble presents the same) is read one write unit at a
time, so a unit plays the part of a chunk. ``sample`` stores give one row per sample as
they are. ``views`` stores give each sample's view of the epoch
(:func:`softlabels.store.positions.views.choose_views`), picked from the unit as it is read,
so the window buffer holds one position per sample whatever V is: the row of a views
store is the chosen view's layout arrays plus ``view`` (its index) and ``view_params``.
With ``views_per_sample`` k > 1 a row holds the epoch's k chosen views of its sample: each
of those arrays gains an axis of k after the row axis (the input is still read once).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from softlabels.errors import UnsupportedFormat
from softlabels.store import format as fmt
from softlabels.store.positions.views import VIEW_PARAMS, choose_views

__all__ = ["UnitSource", "VIEW", "is_v2"]

VIEW = "view"


def is_v2(store: Any) -> bool:
    """A store-source (format 2 or an ensemble of such), as opposed to a v1 ``SoftLabelStore``."""
    return getattr(getattr(store, "meta", None), "format_version", 1) == 2 and hasattr(store, "read_unit")


class UnitSource:
    """Chunk-style access (``num_chunks``, ``chunk_bounds``, ``read_into``) to a v2 store source."""

    def __init__(self, store: Any, views_per_sample: int = 1) -> None:
        meta = store.meta
        if meta.positions == "tokens":
            raise UnsupportedFormat(f"{store.path} holds token positions (a language-model store); the classifier "
                                    "dataset reads sample and views stores; train it with the language-model trainer")
        self.store, self.meta = store, meta
        self.layout_obj = meta.layout_obj()
        self.num_views = int(meta.views["count"]) if meta.positions == "views" else 0
        self.views_per_sample = int(views_per_sample)
        self._geometry = meta.geometry

    # -- what the dataset asks of every source ---------------------------------------------
    path = property(lambda self: self.store.path)
    layout = property(lambda self: self.meta.layout)
    positions = property(lambda self: self.meta.positions)
    num_classes = property(lambda self: self.meta.num_classes)
    logits_dtype = property(lambda self: self.meta.logits_dtype)
    num_samples = property(lambda self: self.meta.num_samples)
    num_chunks = property(lambda self: self.meta.num_units)
    chunk_rows = property(lambda self: self._geometry.unit_samples)
    source = property(lambda self: self.meta.source)

    def signature(self) -> dict[str, Any]:
        """What must agree between sources mixed in one dataset."""
        return {"format": 2, "positions": self.positions, "layout": self.layout, "num_classes": self.num_classes,
                "logits_dtype": self.logits_dtype, "layout_params": self.meta.layout_params,
                "views": self.num_views, "view_params": self.param_count}

    @property
    def param_count(self) -> int:
        return len(self.meta.views["param_names"]) if self.num_views else 0

    def chunk_bounds(self, unit: int) -> tuple[int, int]:
        return self._geometry.unit_samples_range(unit)

    def row_arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row arrays of the dataset's window buffer: name -> (shape after the row axis, dtype)."""
        k = (self.views_per_sample,) if self.num_views and self.views_per_sample > 1 else ()
        out = {name: (k + s.shape, s.dtype) for name, s in self.layout_obj.arrays().items()}
        if self.num_views:
            out[VIEW_PARAMS] = (k + (self.param_count,), np.dtype("float32"))
            out[VIEW] = (k, np.dtype("int64"))
        out[fmt.LABELS] = ((), np.dtype("int64"))
        out[fmt.SAMPLE_IDS] = ((), np.dtype("int64"))
        return out

    def read_into(self, unit: int, out: dict[str, np.ndarray], *, verify: bool, seed: int, epoch: int) -> None:
        """Read unit ``unit`` (checksum-verified with ``verify``) into ``out``: one row per sample."""
        block = self.store.read_unit(unit, verify=verify)
        ids = block[fmt.SAMPLE_IDS]
        if not self.num_views:
            for k, v in out.items():
                np.copyto(v, block[k])
        else:
            many = self.views_per_sample > 1
            view = choose_views(seed, ids, epoch, self.num_views, self.views_per_sample if many else None)
            rows = np.arange(len(ids))[:, None] if many else np.arange(len(ids))
            for k, v in out.items():
                if k == VIEW:
                    v[...] = view
                elif k in (fmt.LABELS, fmt.SAMPLE_IDS):
                    np.copyto(v, block[k])
                else:  # [n, V, ...] -> the chosen view(s) of each sample
                    np.copyto(v, block[k][rows, view])
        # ids < C and the like, on the rows that will be trained on (read_unit checks only the checksum)
        lead = 2 if self.num_views and self.views_per_sample > 1 else 1  # [n, k, ...] is checked as n·k rows
        self.layout_obj.check({k: out[k].reshape(-1, *out[k].shape[lead:]) for k in self.layout_obj.arrays()})

    def close(self) -> None:
        self.store.close()
