"""Counter-based random numbers for views: a pure function of (seed, sample id, view, stream, draw).

Nothing advances across rows, and the hash (32-bit words in int64 tensors, multiplied in 16-bit
halves) gives the same bits on every device; the ops turn the numbers into parameters with exact
float64 operations only (:func:`_randint`, :func:`_exp`, :func:`_half_within`). docs/VIEWS.md,
"Seeding", has the design.
"""

from __future__ import annotations

import copy
import math

import torch

__all__ = ["ViewRandom"]

_MASK = 0xFFFFFFFF
_START = 0x9E3779B9  # any odd constant: the chain's starting state
_TO_UNIT = 2.0 ** -24  # 24-bit uniforms are exact in float32 as well as float64


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for 32-bit ``x`` and a constant ``c``, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = (x * (c >> 16)) & 0xFFFF
    return (lo + (hi << 16)) & _MASK


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash ("lowbias32", C. Wellons' hash prospector)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class ViewRandom:
    """Uniform numbers for ``n`` rows, row ``r`` keyed by ``(seed, ids[r], views[r])``:
    ``uniform(k)`` continues each row's own sequence; ``stream(i)`` is an independent one (op ``i``
    of a ``Compose``)."""

    def __init__(self, seed: int, ids: torch.Tensor, views: torch.Tensor | int = 0) -> None:
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        views = torch.as_tensor(views, dtype=torch.int64, device=ids.device).expand(ids.shape)
        h = torch.full_like(ids, _START)
        for word in (int(seed) & _MASK, int(seed) >> 32, ids & _MASK, ids >> 32, views & _MASK):
            h = _mix(h ^ word)
        self._key = h
        self._used = 0

    @property
    def n(self) -> int:
        """The number of rows."""
        return int(self._key.numel())

    @property
    def device(self) -> torch.device:
        return self._key.device

    def stream(self, index: int) -> ViewRandom:
        """An independent generator for the same rows, numbered ``index >= 0``."""
        rng = copy.copy(self)
        rng._key, rng._used = _mix(_mix(self._key ^ (int(index) & _MASK)) ^ 0x5BD1E995), 0
        return rng

    def uniform(self, k: int) -> torch.Tensor:
        """float64 ``[n, k]`` in ``[0, 1)``: the row's next ``k`` numbers, multiples of ``2**-24``."""
        counters = torch.arange(self._used, self._used + k, dtype=torch.int64, device=self.device)
        self._used += k
        bits = _mix(_mix(self._key[:, None] ^ counters[None, :]))
        return (bits >> 8).to(torch.float64) * _TO_UNIT


def _randint(u: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """Integers uniform in ``[0, n)`` from uniforms ``u`` in [0, 1) (float64)."""
    n = torch.as_tensor(n, dtype=torch.float64, device=u.device)
    return torch.minimum(torch.floor(u * n), n - 1)


def _exp(t: torch.Tensor) -> torch.Tensor:
    """``exp(t)`` for float64 ``|t| <= 32`` from exact operations: a Taylor series at t/32, squared 5 times."""
    r = t / 32
    p = torch.full_like(r, 1 / math.factorial(12))
    for k in range(11, -1, -1):
        p = p * r + 1 / math.factorial(k)
    for _ in range(5):
        p = p * p
    return p


def _half_within(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``x`` rounded to float16 values (as float32), kept in ``[low, high]`` where the range holds
    one: round to nearest, then one float16 step back inside, done on the bits (the same on every
    device)."""
    h = x.to(torch.float16)
    bits = h.view(torch.int16)
    neg = bits < 0  # sign-magnitude: a step towards -inf grows a negative number's bits
    down = torch.where(neg, bits + 1, bits - 1).view(torch.float16)
    up = torch.where(neg, bits - 1, bits + 1).view(torch.float16)
    hd = h.double()
    h = torch.where((hd > high) & (down.double() >= low), down, h)
    h = torch.where((hd < low) & (up.double() <= high), up, h)
    return h.float()
