"""``views`` positions: ``V`` augmented views per sample, each replayable from its parameters.

Per-position arrays are [N, V, ...], chunked along N only; ``view_params`` [N, V, P] and the
``views`` root attribute replay each view exactly (docs/FORMAT.md, docs/VIEWS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from softlabels.errors import SoftLabelsError, UnsupportedFormat
from softlabels.inputs.augment import parse_augment
from softlabels.inputs.augment.compose import PARAM_DTYPES, ParamRanges
from softlabels.store.layouts.sampled import splitmix64
from softlabels.store.positions.base import UnitGeometry, sample_id_problems
from softlabels.store.positions.sample import SamplePositions

__all__ = ["PARAM_DTYPES", "VIEW_PARAMS", "ViewPositions", "choose_views", "refuse_code_terms",
           "view_attr_problems"]

VIEW_PARAMS = "view_params"


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of uint64 arrays: the sampled layout's hash, on the same bits."""
    return splitmix64(torch.from_numpy(x.view(np.int64))).numpy().view(np.uint64)


def choose_views(seed: int, sample_ids: np.ndarray, epoch: int, num_views: int, per_epoch: int | None = None
                 ) -> np.ndarray:
    """Which stored views each sample trains on in ``epoch``: int64 [B] in ``0..V-1``, or [B, k] with ``per_epoch=k``.

    Entries ``epoch·k .. epoch·k + k − 1`` of each sample's sequence of permutations of its
    V views (cycle ``c``: the argsort of splitmix64(seed, sample id, c, view)); docs/VIEWS.md.
    """
    v = int(num_views)
    k = 1 if per_epoch is None else int(per_epoch)
    if not 1 <= k <= v:
        raise ValueError(f"per_epoch must lie in 1..num_views ({v}), got {per_epoch}")
    ids = np.asarray(sample_ids, dtype=np.int64).astype(np.uint64)
    entries = int(epoch) * k + np.arange(k)
    out = np.empty((len(ids), k), np.int64)
    base = _mix(_mix(np.full(ids.shape, seed, np.uint64)) ^ ids)
    views = _mix(np.arange(v, dtype=np.uint64))[None, :]
    for cycle in np.unique(entries // v):  # one or two cycles
        keys = _mix(_mix(base ^ np.uint64(cycle))[:, None] ^ views)
        cols = entries // v == cycle
        out[:, cols] = np.argsort(keys, axis=1, kind="stable")[:, entries[cols] % v]
    return out[:, 0] if per_epoch is None else out


@dataclass(frozen=True)
class ViewPositions(SamplePositions):
    """Position ``(i, v)`` is view ``v`` of sample ``i``: sample ``i``'s row holds its V views, so the
    position axis and the units are a ``sample`` store's."""

    num_views: int
    param_names: tuple[str, ...]
    augment: str = ""
    seed: int = 0
    param_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)
    ranges: ParamRanges | None = field(default=None, compare=False, repr=False)
    kind: ClassVar[str] = "views"

    def __post_init__(self) -> None:
        if self.num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {self.num_views}")

    @property
    def num_positions(self) -> int:
        return self.geometry.num_samples * self.num_views

    def to_attrs(self) -> dict[str, Any]:
        return {"views": {"count": self.num_views, "augment": self.augment, "seed": self.seed,
                          "param_names": list(self.param_names), "param_dtype": self.param_dtype, **self.extra}}

    def value_problems(self, block: Mapping[str, np.ndarray]) -> list[str]:
        """Sample ids as for ``sample`` positions; every view parameter finite and (for built-in ops)
        within the range its op declares for the recorded input size."""
        p = sample_id_problems(block)
        params = block.get(VIEW_PARAMS)
        if params is None or not params.size:
            return p
        if self.ranges is not None:
            return p + self.ranges.problems(params, self.param_names)
        if params.dtype.kind == "f" and not np.isfinite(params).all():
            p.append("view_params holds NaN or inf")
        return p

    @classmethod
    def from_attrs(cls, geometry: UnitGeometry, attrs: dict[str, Any],
                   input_shape: Any = None) -> ViewPositions:
        """Rebuild from the ``views`` root attribute (JSON data, never evaluated; checked by
        :func:`view_attr_problems`) and the recorded ``input_shape`` [C, H, W] (None: unknown)."""
        v = dict(attrs["views"])
        known = ("count", "augment", "seed", "param_names", "param_dtype")
        augment = str(v.get("augment", ""))
        return cls(geometry, num_views=int(v["count"]), param_names=tuple(str(n) for n in v["param_names"]),
                   augment=augment, seed=int(v.get("seed", 0)), param_dtype=str(v.get("param_dtype", "float32")),
                   extra={k: val for k, val in v.items() if k not in known},
                   ranges=_ranges(augment, _input_size(input_shape), len(v["param_names"])))


def refuse_code_terms(path: Any, augment: str, fix: str) -> None:
    """Refuse to replay a recorded augmentation with a ``package.module:factory`` term: code named in a
    store is never imported; ``fix`` says what the caller can do instead (E1751, L2414)."""
    code = [t.strip() for t in augment.split("+") if ":" in t]
    if code:
        raise UnsupportedFormat(f"{path} records the augmentation '{augment}', whose term '{code[0]}' names "
                                f"code; code named in a store is never imported, so {fix}")


def _input_size(input_shape: Any) -> tuple[int, int] | None:
    """(H, W) of a recorded ``input_shape`` [C, H, W] of whole numbers >= 1; None when absent or not that."""
    if isinstance(input_shape, list) and len(input_shape) == 3 and all(
            isinstance(d, int) and not isinstance(d, bool) and 1 <= d < 2**31 for d in input_shape):
        return input_shape[1], input_shape[2]
    return None


def _ranges(augment: str, size: tuple[int, int] | None, count: int) -> ParamRanges | None:
    """The declared ranges of a recorded built-in augmentation of ``count`` parameters (None for one
    naming code, never imported, or of another count)."""
    if not augment or ":" in augment:
        return None
    ranges = parse_augment(augment).param_ranges(size)
    return ranges if ranges is not None and len(ranges.low) == count else None


def view_attr_problems(views: Mapping[str, Any], input_shape: Any) -> list[str]:
    """The ``views`` root attribute's values: ``seed`` a whole number in 0..2**63 - 1, ``param_names``
    strings, and a built-in ``augment`` that parses and fits the recorded input size. (A
    ``package.module:factory`` term is never imported from a store; a parameter count that differs
    from the names is refused where the views are replayed.)"""
    seed, names, augment = views.get("seed", 0), views.get("param_names"), views.get("augment", "")
    p = []
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        p.append(f"views' seed {seed!r} is not a whole number in 0..2**63 - 1")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        p.append("views' param_names is not a list of strings")
    if not isinstance(augment, str):
        p.append(f"views' augment {augment!r} is not a string")
    if p or not augment or ":" in augment:
        return p
    try:
        aug = parse_augment(augment)
        size = _input_size(input_shape)
        if size is not None:
            aug.output_size(size)
    except SoftLabelsError as err:
        return [f"views' augment: {err}"]
    return p
