"""The op protocol, the storage dtypes of view parameters, and :class:`Compose`.

An op (built-in or ``package.module:factory``) draws a fixed number of float32 parameters per
view and replays them with a pure ``apply`` vectorised over the batch; the built-in ops draw
what torchvision's transforms draw internally (docs/VIEWS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from softlabels.errors import DataError
from softlabels.inputs.augment.rng import ViewRandom

__all__ = ["PARAM_DTYPES", "Augmentation", "BuiltinOp", "Compose", "ParamRanges", "param_dtype"]

Size = tuple[int, int]

PARAM_DTYPES = ("uint8", "float16", "float32")
"""Storage dtypes of ``view_params``, narrowest first: whole numbers in 0..255; whole numbers
of magnitude <= 2048 and float16 values; anything (float32, what an op's ``draw`` returns)."""


def param_dtype(op: Augmentation, size: Size) -> str:
    """The narrowest dtype that holds every parameter ``op`` draws for inputs of ``size`` exactly:
    the op's own ``param_dtype(size)``, else float32 (which holds whatever ``draw`` returns)."""
    own = getattr(op, "param_dtype", None)
    dtype = str(own(size)) if callable(own) else "float32"
    if dtype not in PARAM_DTYPES:
        raise DataError(f"augmentation '{op.spec}' says its params are {dtype!r}, not one of "
                        f"{', '.join(PARAM_DTYPES)}; return one of those from param_dtype()")
    return dtype


@dataclass(frozen=True)
class ParamRanges:
    """What an op declares its parameters may be: ``low <= p <= high`` (float64 [P]), ``whole`` [P]
    (whole numbers only), and ``sums``: pairs ``(i, j, limit)`` with ``p_i + p_j <= limit``.

    A bound that depends on an unknown input size is infinite. :meth:`problems` checks
    a block of parameters in one vectorised pass.
    """

    low: np.ndarray
    high: np.ndarray
    whole: np.ndarray
    sums: tuple[tuple[int, int, float], ...] = ()

    @classmethod
    def of(cls, ranges: Sequence[tuple[float, float, bool]],
           sums: Sequence[tuple[int, int, float]] = ()) -> ParamRanges:
        low, high, whole = zip(*ranges) if ranges else ((), (), ())
        return cls(np.array(low, np.float64), np.array(high, np.float64), np.array(whole, bool), tuple(sums))

    @classmethod
    def join(cls, parts: Sequence[ParamRanges]) -> ParamRanges:
        """Ranges side by side, as :class:`Compose` puts its ops' params."""
        ranges: list[tuple[float, float, bool]] = []
        sums: list[tuple[int, int, float]] = []
        for part in parts:
            sums += [(i + len(ranges), j + len(ranges), limit) for i, j, limit in part.sums]
            ranges += zip(part.low, part.high, part.whole)
        return cls.of(ranges, sums)

    def problems(self, params: np.ndarray, names: Sequence[str] = ()) -> list[str]:
        """What is wrong with ``params`` [..., P] (empty when all lie in their ranges): one min
        and max per column of a transposed copy (numpy reduces a long contiguous axis ~8x faster)"""
        p = np.asarray(params).reshape(-1, len(self.low))
        if not len(p):
            return []
        name = lambda i: names[i] if i < len(names) else f"parameter {i}"  # noqa: E731
        cols = np.ascontiguousarray(p.T)
        lo, hi = cols.min(1), cols.max(1)
        if p.dtype.kind == "f" and not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            bad = ~(np.isfinite(lo) & np.isfinite(hi))
            return [f"{name(int(np.flatnonzero(bad)[0]))} holds NaN or inf"]
        out = [f"{name(i)} is {lo[i] if lo[i] < self.low[i] else hi[i]:g}, outside "
               f"{self.low[i]:g}..{self.high[i]:g}" for i in np.flatnonzero((lo < self.low) | (hi > self.high))]
        if p.dtype.kind == "f" and self.whole.any():
            w = cols[self.whole]
            for i in np.flatnonzero(self.whole)[(w != np.floor(w)).any(1)]:
                out.append(f"{name(i)} holds a fraction, but its values are whole numbers")
        for i, j, limit in self.sums:
            if (cols[i].astype(np.float64) + cols[j] > limit).any():
                out.append(f"{name(i)} + {name(j)} exceeds {limit:g}")
        return out


class BuiltinOp:
    """What the built-in ops share: a view the input's size, and :meth:`param_dtype` from their
    :meth:`param_ranges` (whole numbers in those ranges)."""

    def output_size(self, size: Size) -> Size:
        return size

    def param_dtype(self, size: Size) -> str:
        """The narrowest of :data:`PARAM_DTYPES` that holds every whole number in the ranges."""
        ranges = self.param_ranges(size)  # type: ignore[attr-defined]
        low, high = float(ranges.low.min()), float(ranges.high.max())
        if low >= 0 and high <= 255:
            return "uint8"
        return "float16" if max(-low, high) <= 2048 else "float32"


@runtime_checkable
class Augmentation(Protocol):
    """What an augmentation op provides (the protocol of ``package.module:factory`` ops; each
    attribute is described in docs/VIEWS.md, "Your own ops"; ``param_dtype(size)`` is optional)."""

    num_params: int
    spec: str

    def output_size(self, size: Size) -> Size: ...

    def draw(self, rng: ViewRandom, size: Size) -> torch.Tensor: ...

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor: ...


def _num(v: float) -> str:
    """Shortest text that parses back to the same float (integers without '.0')."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


def _size(s: Size) -> str:
    return _num(s[0]) if s[0] == s[1] else f"{s[0]}x{s[1]}"


class Compose:
    """Ops applied in order; params are the ops' params side by side (``num_params`` = their sum).

    Op ``i`` draws from ``rng.stream(i)``, so adding an op at the end leaves the
    earlier ops' params unchanged.
    """

    def __init__(self, ops: list[Augmentation]) -> None:
        self.ops = list(ops)
        self.num_params = sum(int(op.num_params) for op in self.ops)

    @property
    def spec(self) -> str:
        return "+".join(op.spec for op in self.ops)

    def __repr__(self) -> str:
        return f"Compose({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compose) and self.ops == other.ops

    def output_size(self, size: Size) -> Size:
        for op in self.ops:
            size = tuple(op.output_size(size))
        return size

    def param_dtype(self, size: Size) -> str:
        """The widest of its ops' :func:`param_dtype` (each at the size its input has)."""
        widest = 0
        for op in self.ops:
            widest = max(widest, PARAM_DTYPES.index(param_dtype(op, size)))
            size = tuple(op.output_size(size))
        return PARAM_DTYPES[widest]

    def param_ranges(self, size: Size | None) -> ParamRanges | None:
        """Its ops' declared :class:`ParamRanges` side by side (each at the size its input has; None:
        unknown), or None when an op declares none (a user op without ``param_ranges``)."""
        parts = []
        for op in self.ops:
            own = getattr(op, "param_ranges", None)
            if not callable(own):
                return None
            parts.append(own(size))
            size = None if size is None else tuple(op.output_size(size))
        return ParamRanges.join(parts)

    def draw(self, rng: ViewRandom, size: Size) -> torch.Tensor:
        parts = []
        for i, op in enumerate(self.ops):
            params = op.draw(rng.stream(i), size)
            if not isinstance(params, torch.Tensor) or tuple(params.shape) != (rng.n, op.num_params):
                got = tuple(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
                raise DataError(f"augmentation '{op.spec}' drew params {got}, not [{rng.n}, {op.num_params}]; "
                                "make draw() return float32 [n, num_params]")
            parts.append(params.float())
            size = tuple(op.output_size(size))
        return torch.cat(parts, 1) if parts else torch.empty(rng.n, 0, device=rng.device)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        if params.ndim != 2 or params.shape != (x.shape[0], self.num_params):
            raise DataError(f"augmentation '{self.spec}' takes params [{x.shape[0]}, {self.num_params}], "
                            f"got {list(params.shape)}; pass the params drawn for this spec")
        params = params.to(x.device)
        at = 0
        for op in self.ops:
            x = op.apply(x, params[:, at:at + op.num_params])
            at += op.num_params
        return x
