"""EnsembleStore: several stores of the same data, read as one store of combined targets.

It has UnitStore's reading API, so every reader works on an ensemble unchanged; each unit is
read from every member, combined and encoded as ``softlabels merge`` writes it (docs/ENSEMBLES.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from softlabels.errors import ConfigError, StoreMismatch
from softlabels.store import format as fmt
from softlabels.store.ensemble.combination import Combination, check_member, combine
from softlabels.store.handle import Units
from softlabels.store.layouts import Layout, encode_ids
from softlabels.store.positions.tokens import LENGTHS, OFFSETS
from softlabels.store.positions.views import VIEW_PARAMS
from softlabels.store.reader import open_store
from softlabels.store.schema import StoreMetaV2

__all__ = ["EnsembleStore"]

_SAME_DATA = ("an ensemble combines stores generated from the same --data with the same positions; regenerate the "
              "odd one out")
_SAME_UNITS = "combine stores written with the same --chunk-rows (and shards); regenerate the odd one out"


def _brief(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:19] + "..."


class EnsembleStore(Units):
    """Stores of the same data combined as one read-only store (``combination``: mode, weights, T)."""

    def __init__(self, stores: Sequence[str | Path | Any], *, mode: str = "arithmetic",
                 weights: Sequence[float] | None = None, temperature: float = 1.0,
                 allow_partial: bool = False) -> None:
        self.how = Combination(mode, tuple(weights) if weights is not None else None, temperature)
        self._owned = [not hasattr(s, "read_unit") for s in stores]
        self.members: list[Any] = []
        try:
            for s in stores:
                self.members.append(open_store(s, allow_partial=allow_partial) if not hasattr(s, "read_unit") else s)
            self._check_same()
            first = self.members[0].meta.layout_obj()
            self.how.check(len(self.members), first.name, getattr(first, "temperature", 1.0))
            for m in self.members:  # a merged member first: its refusal names what combining it needs
                check_member(m.meta, self.how, str(m.path))
            self._check_temperatures()
            self.meta = self._combined_meta()
        except BaseException:
            self.close()
            raise
        self.path = Path(" + ".join(str(m.path) for m in self.members))
        self._layouts: list[Layout] = [m.meta.layout_obj() for m in self.members]
        self._layout = self.meta.layout_obj()
        self.positions = self.members[0].positions

    # -- validation -----------------------------------------------------------------------------
    def _check_same(self) -> None:
        if len(self.members) < 2:
            raise ConfigError(f"an ensemble needs at least 2 stores, got {len(self.members)}; pass more stores")
        a = self.members[0]
        for b in self.members[1:]:
            for what, detail, fix in self._differences(a, b):
                raise StoreMismatch(f"{str(a.path)!r} and {str(b.path)!r} {what} ({detail}); {fix}")

    def _check_temperatures(self) -> None:
        """Every member must answer the T the combination is made at (sampled: their draw T; top-k: a tail
        grid holding it); ids-only sampled stores hold no logits to mix."""
        how = self.how
        t = float(how.temperature) if how.mode == "arithmetic" else 1.0
        for m in self.members:
            if m.meta.layout == "sampled" and m.meta.layout_params.get("logits", True) is False:
                raise ConfigError(f"{m.path} is an ids-only sampled store: it holds no logits, so the mixture's "
                                  "probabilities are unknown; merge sampled stores generated with their logits")
            if m.meta.layout != "dense" or how.mode == "arithmetic":
                m.meta.require_temperature(t, str(m.path))

    @staticmethod
    def _differences(a: Any, b: Any):
        """Yield (what differs, how, the fix) for each difference, the cheapest checks first."""
        ma, mb = a.meta, b.meta
        values = [("hold different numbers of samples", ma.num_samples, mb.num_samples, _SAME_DATA),
                  ("have different class counts", ma.num_classes, mb.num_classes,
                   "an ensemble's teachers must predict the same classes; drop the store of the other model"),
                  ("have different position kinds", ma.positions, mb.positions, _SAME_DATA),
                  ("have different layouts", ma.layout, mb.layout, ("combine stores of one layout (dense, topk or "
                   "sampled); regenerate the odd one out with the others' --layout")),
                  ("have different write units (chunk_samples x shard_chunks)", ma.geometry.unit_samples,
                   mb.geometry.unit_samples, _SAME_UNITS),
                  ("record different views", ma.views, mb.views, _SAME_DATA),
                  ("have different token chunking", ma.tokens, mb.tokens, _SAME_UNITS)]
        fa, fb = ma.source.get("fingerprint"), mb.source.get("fingerprint")
        if fa and fb:  # both record what their inputs were
            values.insert(1, ("were generated from different data (input fingerprints)", fa, fb, _SAME_DATA))
        for what, x, y, fix in values:
            if x != y:
                yield what, f"{_brief(x)} vs {_brief(y)}", fix
        arrays = [("token counts (offsets)", a.positions.lengths, b.positions.lengths)] \
            if ma.positions == "tokens" else []
        names = [fmt.SAMPLE_IDS, fmt.LABELS] + ([VIEW_PARAMS] if ma.positions == "views" else [])
        arrays += [(name.replace("_", " "), a.whole(name), b.whole(name)) for name in names]
        for what, x, y in arrays:
            rows = np.flatnonzero((x != y).reshape(len(x), -1).any(1))
            if len(rows):
                yield f"hold different {what}", f"{len(rows)} of {len(x)} samples, the first at row {rows[0]}", \
                    _SAME_DATA

    def _combined_meta(self) -> StoreMetaV2:
        first = self.members[0].meta
        layout, n = first.layout, len(self.members)
        if layout == "dense":
            params: dict[str, Any] = {}
        elif layout == "topk":
            made = float(self.how.temperature) if self.how.mode == "arithmetic" else 1.0
            params = {"k": min(sum(int(m.meta.layout_params["k"]) for m in self.members), first.num_classes),
                      "tail_temperatures": [made]}  # the combined tails answer the T they were made at
        else:
            mult = self.how.multiplicities(n)
            params = {"samples": sum(w * int(m.meta.layout_params["samples"]) for w, m in zip(mult, self.members)),
                      "seed": 0}
            td = float(first.layout_obj().temperature)
            if td != 1:
                params["temperature"] = td
        ensemble = {**self.how.to_attrs(n),
                    "members": [{"store": str(Path(m.path).resolve()), "layout": m.meta.layout,
                                 "layout_params": m.meta.layout_params, "teacher": m.meta.teacher}
                                for m in self.members]}
        complete = all(m.meta.complete for m in self.members)
        return StoreMetaV2(positions=first.positions, layout=layout, num_samples=first.num_samples,
                           num_classes=first.num_classes, logits_dtype="float32",
                           chunk_samples=first.geometry.unit_samples, shard_chunks=1, group_units=first.group_units,
                           layout_params=params, views=first.views, tokens=first.tokens,
                           status=fmt.STATUS_COMPLETE if complete else fmt.STATUS_WRITING,
                           teacher={"ensemble": ensemble}, source=first.source,
                           created_by={"command": "ensemble"})

    # -- the unit API ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"EnsembleStore({len(self.members)} stores, {self.how.mode}, T={self.how.temperature}, "
                f"{self.meta.positions} x {self.meta.layout}, N={self.meta.num_samples}, C={self.meta.num_classes})")

    def unit_done(self) -> np.ndarray:
        return np.logical_and.reduce([m.unit_done() for m in self.members])

    def read_unit(self, unit: int, *, verify: bool = True) -> dict[str, np.ndarray]:
        """The combined unit: the combined layout's arrays (float32 values), the first member's per-sample arrays."""
        blocks = [m.read_unit(unit, verify=verify) for m in self.members]
        targets = [layout.decode({k: block[k].reshape(-1, *spec.shape) for k, spec in layout.arrays().items()})
                   for layout, block in zip(self._layouts, blocks)]  # leading axes (samples, views) flattened
        with torch.no_grad():
            arrays = _encode(self._layout, combine(targets, self.how, self.meta.num_classes))
        key, spec = next(iter(self._layouts[0].arrays().items()))
        first = blocks[0][key]
        lead = first.shape[:first.ndim - len(spec.shape)]  # (n,) or (n, V)
        out = {k: v.reshape(*lead, *v.shape[1:]) for k, v in arrays.items()}
        for k in (VIEW_PARAMS, OFFSETS, LENGTHS, fmt.LABELS, fmt.SAMPLE_IDS):
            if k in blocks[0]:
                out[k] = blocks[0][k]
        return out

    def verify(self) -> list[int]:
        return sorted({u for m in self.members for u in m.verify()})

    def close(self) -> None:
        for m, owned in zip(self.members, self._owned):
            if owned:
                m.close()


def _encode(layout: Layout, target: Any) -> dict[str, np.ndarray]:
    """A combined target as ``layout``'s stored arrays (float32 values; ids and counts in stored form)."""
    c, specs = layout.num_classes, layout.arrays()
    names = list(specs)
    if layout.name == "dense":
        values = [target.logits.numpy()]
    elif layout.name == "topk":
        values = [target.values.numpy(), encode_ids(target.ids, c).numpy(), target.tails.numpy()]
    else:
        values = [encode_ids(target.ids, c).numpy(), target.counts.numpy().astype(specs[names[1]].dtype),
                  target.logits.numpy(), target.logsumexp.numpy()]
    return {k: np.ascontiguousarray(v, dtype=specs[k].dtype) for k, v in zip(names, values)}
