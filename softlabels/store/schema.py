"""The on-disk format, version 2: positions × layouts (docs/FORMAT.md): the names, attributes and
validation, knowing neither storage library nor teacher. Version 1 is read through
:mod:`softlabels.store.v1`, which presents it in these terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from softlabels.errors import CorruptStore, SoftLabelsError
from softlabels.store import format as fmt
from softlabels.store.positions import (
    POSITION_KINDS,
    Positions,
    SamplePositions,
    TokenPositions,
    UnitGeometry,
    ViewPositions,
)
from softlabels.store.positions.tokens import LENGTHS, OFFSETS, token_attr_problems
from softlabels.store.positions.views import PARAM_DTYPES, VIEW_PARAMS, view_attr_problems
from softlabels.store.temperatures import intersect, require_temperature

if TYPE_CHECKING:
    from softlabels.store.layouts import Layout

__all__ = ["FORMAT_VERSION_2", "StoreMetaV2", "V2Array", "UNIT_CHECKSUMS", "UNIT_DONE", "unit_checksum"]

FORMAT_VERSION_2 = 2
UNIT_DONE = "unit_done"
UNIT_CHECKSUMS = "unit_checksums"

# per-sample arrays in checksum order (after the layout's per-position arrays)
SAMPLE_ORDER: tuple[str, ...] = (VIEW_PARAMS, OFFSETS, LENGTHS, fmt.LABELS, fmt.SAMPLE_IDS)
REQUIRED = ("softlabels_format", "status", "positions", "layout", "num_samples", "num_classes",
            "logits_dtype", "chunk_samples", "shard_chunks", "group_units", "layout_params", "checksum")
OBJECTS = ("layout_params", "views", "tokens", "teacher", "source", "created_by")


@dataclass(frozen=True)
class V2Array:
    """One array of a v2 store: full shape, stored dtype, first-axis chunk, and its family.

    ``family``: ``position`` (a layout's per-position array), ``sample`` (one row per
    sample, written with its unit), ``creation`` (written once at creation: offsets,
    lengths) or ``unit`` (bookkeeping: one element per write unit).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk: int
    family: str



@dataclass(frozen=True)
class StoreMetaV2:
    """Everything a v2 store's root attributes say, validated on construction."""

    positions: str
    layout: str
    num_samples: int
    num_classes: int
    logits_dtype: str = "float32"
    chunk_samples: int = 1024
    shard_chunks: int = 1
    group_units: int = 1
    layout_params: dict[str, Any] = field(default_factory=dict)
    views: dict[str, Any] | None = None
    tokens: dict[str, Any] | None = None
    checksum: str = fmt.NEW_STORE_CHECKSUM
    status: str = fmt.STATUS_WRITING
    teacher: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    created_by: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION_2

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise CorruptStore("invalid store metadata: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency in these values (empty when valid)."""
        from softlabels.store.layouts import LAYOUTS

        p: list[str] = []
        if not isinstance(self.positions, str) or self.positions not in POSITION_KINDS:
            p.append(f"positions {self.positions!r} is not one of {', '.join(POSITION_KINDS)}")
        if not isinstance(self.layout, str) or self.layout not in LAYOUTS:
            p.append(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        for name, low in (("num_samples", 0), ("num_classes", 1), ("chunk_samples", 1), ("shard_chunks", 1),
                          ("group_units", 1)):
            value = getattr(self, name)
            if not fmt.is_int(value) or value < low:
                p.append(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.logits_dtype, str) or self.logits_dtype not in fmt.LOGITS_DTYPES:
            p.append(f"logits_dtype {self.logits_dtype!r} is not one of {', '.join(fmt.LOGITS_DTYPES)}")
        if self.checksum not in fmt.CHECKSUM_ALGORITHMS:
            p.append(f"checksum {self.checksum!r} is not one of {', '.join(fmt.CHECKSUM_ALGORITHMS)}")
        if self.status not in (fmt.STATUS_WRITING, fmt.STATUS_COMPLETE):
            p.append(f"status {self.status!r} is not 'writing' or 'complete'")
        if (self.positions == "views") != (self.views is not None):
            p.append("the 'views' attribute belongs to, and only to, positions 'views'")
        if (self.positions == "tokens") != (self.tokens is not None):
            p.append("the 'tokens' attribute belongs to, and only to, positions 'tokens'")
        if p:
            return p
        if self.views is not None:
            v = self.views
            if not fmt.is_int(v.get("count")) or v["count"] < 1 or not isinstance(v.get("param_names"), list):
                p.append("views needs an integer 'count' >= 1 and a list 'param_names'")
            dtype = v.get("param_dtype", "float32")
            if not isinstance(dtype, str) or dtype not in PARAM_DTYPES:
                p.append(f"views' param_dtype {dtype!r} is not one of {', '.join(PARAM_DTYPES)}")
            p += view_attr_problems(v, self.source.get("input_shape") if isinstance(self.source, dict) else None)
        if self.tokens is not None:
            p += token_attr_problems(self.tokens, fmt.is_int)
        if not p and self.num_units > fmt.MAX_UNITS:
            p.append(f"num_samples {self.num_samples} in units of {self.geometry.unit_samples} samples make "
                     f"{self.num_units:,} units, over the limit of {fmt.MAX_UNITS:,}")
        if not p:
            try:
                self.layout_obj()
            except SoftLabelsError as err:
                p.append(str(err))
        return p

    def layout_obj(self) -> Layout:
        """The layout, configured from ``layout_params`` (JSON data: names and integers only); made once."""
        if "_layout" not in self.__dict__:  # a cache, not a field: equality and replace() ignore it
            from softlabels.store.layouts import make_layout

            object.__setattr__(self, "_layout", make_layout(self.layout, num_classes=self.num_classes,
                                                            logits_dtype=self.logits_dtype, **self.layout_params))
        return self.__dict__["_layout"]

    def temperatures(self) -> tuple[float, ...] | None:
        """The distillation temperatures this store answers exactly (``None``: every T).

        The layout's (top-k: its tail grid, or T = 1 for a store written before the grid; sampled: its
        draw temperature), intersected with the T of a merged arithmetic ensemble.
        """
        return intersect(self.layout_obj().temperatures(), self._ensemble_temperatures())

    def _ensemble_temperatures(self) -> tuple[float, ...] | None:
        ensemble = self.teacher.get("ensemble") if isinstance(self.teacher, dict) else None
        made = ensemble.get("temperature") if isinstance(ensemble, dict) and ensemble.get("mode") == "arithmetic" \
            else None
        return (float(made),) if isinstance(made, (int, float)) and not isinstance(made, bool) else None

    def require_temperature(self, temperature: float, where: str) -> None:
        """Refuse, in one line naming ``where`` (the store), a T it does not answer exactly (the one check the
        trainer, ``eval``, ``merge`` and the losses share)."""
        layout = self.layout_obj()
        require_temperature(layout.temperatures(), temperature, where, layout.temperature_kind)
        require_temperature(self._ensemble_temperatures(), temperature, where, "ensemble")

    # -- geometry -------------------------------------------------------------------------
    @property
    def geometry(self) -> UnitGeometry:
        return UnitGeometry(self.num_samples, self.chunk_samples, self.shard_chunks, self.group_units)

    @property
    def num_units(self) -> int:
        return self.geometry.num_units

    @property
    def complete(self) -> bool:
        return self.status == fmt.STATUS_COMPLETE

    def make_positions(self, lengths: np.ndarray | None = None) -> Positions:
        """The position kind's geometry; ``tokens`` needs the stored (or planned) ``lengths``."""
        g = self.geometry
        if self.positions == "sample":
            return SamplePositions(g)
        if self.positions == "views":
            return ViewPositions.from_attrs(g, {"views": self.views}, self.source.get("input_shape"))
        if lengths is None:
            raise ValueError("tokens positions need the per-sample lengths")
        if len(lengths) and lengths.max() > self.tokens["axis_length"]:  # before any sum could overflow
            raise CorruptStore(f"the stored lengths hold {int(lengths.max())}, more than the token axis of "
                               f"{self.tokens['axis_length']} positions; regenerate the store")
        pos = TokenPositions(g, lengths, int(self.tokens["chunk_positions"]))
        for name, got in (("axis_length", pos.axis_length), ("num_positions", pos.num_positions)):
            if got != self.tokens[name]:
                raise CorruptStore(f"the stored lengths give {got} for tokens' {name} but the attributes say "
                                   f"{self.tokens[name]}; regenerate the store")
        return pos

    def arrays(self) -> dict[str, V2Array]:
        """Every array: per-position (layout order), per-sample, creation-time, bookkeeping."""
        # the position axis (length, chunk, then any extra dims) from the attributes, without reading lengths
        length, chunk, extra = self.num_samples, self.chunk_samples, ()
        if self.positions == "tokens":
            length, chunk = int(self.tokens["axis_length"]), int(self.tokens["chunk_positions"])
        elif self.positions == "views":
            extra = (int(self.views["count"]),)
        out: dict[str, V2Array] = {}
        for name, spec in self.layout_obj().arrays().items():
            out[name] = V2Array((length, *extra, *spec.shape), spec.dtype, chunk, "position")
        n, cs = self.num_samples, self.chunk_samples
        if self.positions == "views":
            out[VIEW_PARAMS] = V2Array((n, *extra, len(self.views["param_names"])),
                                       np.dtype(self.views.get("param_dtype", "float32")), cs, "sample")
        if self.positions == "tokens":
            out[OFFSETS] = V2Array((n + 1,), np.dtype("int64"), cs, "creation")
            out[LENGTHS] = V2Array((n,), np.dtype("int64"), cs, "creation")
        out[fmt.LABELS] = V2Array((n,), np.dtype("int64"), cs, "sample")
        out[fmt.SAMPLE_IDS] = V2Array((n,), np.dtype("int64"), cs, "sample")
        u, g = self.num_units, self.group_units
        out[UNIT_DONE] = V2Array((u,), np.dtype("uint8"), g, "unit")
        out[UNIT_CHECKSUMS] = V2Array((u,), np.dtype("uint32"), g, "unit")
        return out

    def checksum_order(self) -> tuple[str, ...]:
        """Arrays a unit's checksum covers, in order: per-position, then per-sample and creation."""
        arrays = self.arrays()
        position = tuple(k for k, a in arrays.items() if a.family == "position")
        return position + tuple(k for k in SAMPLE_ORDER if k in arrays)

    # -- attributes -----------------------------------------------------------------------
    def to_attrs(self) -> dict[str, Any]:
        attrs = {"softlabels_format": self.format_version, "status": self.status, "positions": self.positions,
                 "layout": self.layout, "num_samples": int(self.num_samples), "num_classes": int(self.num_classes),
                 "logits_dtype": self.logits_dtype, "chunk_samples": int(self.chunk_samples),
                 "shard_chunks": int(self.shard_chunks), "group_units": int(self.group_units),
                 "layout_params": dict(self.layout_params), "checksum": self.checksum,
                 "teacher": self.teacher, "source": self.source, "created_by": self.created_by}
        if self.views is not None:
            attrs["views"] = dict(self.views)
        if self.tokens is not None:
            attrs["tokens"] = dict(self.tokens)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreMetaV2:
        """Parse and validate v2 root attributes (JSON data only, never evaluated)."""
        missing = [a for a in REQUIRED if a not in attrs]
        if missing:
            raise CorruptStore(f"root attributes missing: {', '.join(missing)}; regenerate the store")
        for name in OBJECTS:
            if name in attrs and not isinstance(attrs[name], dict):
                raise CorruptStore(f"root attribute {name!r} must be an object, got {type(attrs[name]).__name__}; "
                                   "regenerate the store")
        fields = {k: attrs[k] for k in REQUIRED if k != "softlabels_format"}
        return cls(format_version=FORMAT_VERSION_2, views=attrs.get("views"), tokens=attrs.get("tokens"),
                   teacher=attrs.get("teacher", {}), source=attrs.get("source", {}),
                   created_by=attrs.get("created_by", {}), **fields)


def unit_checksum(meta: StoreMetaV2, block: Mapping[str, np.ndarray]) -> int:
    """The store's CRC chained over a unit's arrays in :meth:`StoreMetaV2.checksum_order`."""
    return fmt.checksum_of((block[key] for key in meta.checksum_order()), meta.checksum)


def check_unit(meta: StoreMetaV2, block: Mapping[str, np.ndarray], *, where: str, fix: str,
               positions: Positions | None = None) -> None:
    """The values of a unit as read: labels in -1..C-1, the position kind's per-sample values (sample
    ids, view parameters in their declared ranges), the layout's arrays valid (ids < C, counts sum to S,
    ...); a bad one would crash, or silently skew, a loss. Raises CorruptStore naming ``where``."""
    c, labels = meta.num_classes, block[fmt.LABELS]
    if labels.size and (labels.min() < -1 or labels.max() >= c):
        raise CorruptStore(f"{where} holds label {int(labels.min() if labels.min() < -1 else labels.max())}, "
                           f"outside -1..{c - 1}; {fix}")
    if positions is not None and (problems := positions.value_problems(block)):
        raise CorruptStore(f"{where} holds invalid {positions.kind} values ({'; '.join(problems)}); {fix}")
    layout = meta.layout_obj()
    problems = layout.validate({k: block[k].reshape(-1, *s.shape) for k, s in layout.arrays().items()})
    if problems:
        raise CorruptStore(f"{where} holds invalid {layout.name} arrays ({'; '.join(problems)}); {fix}")


def duplicates(ids: np.ndarray) -> np.ndarray:
    """The values occurring more than once in ``ids`` (sorted; one sort, no Python loop)."""
    s = np.sort(ids)
    return np.unique(s[1:][s[1:] == s[:-1]])


def repeated_in_rows(ids: np.ndarray) -> np.ndarray:
    """bool [B]: the row of ids [B, K] names some class twice (a top-k row densified from it would be wrong)."""
    if ids.shape[-1] < 2 or not len(ids):
        return np.zeros(len(ids), dtype=bool)
    s = np.sort(ids, axis=-1)
    return (s[:, 1:] == s[:, :-1]).any(axis=-1)
