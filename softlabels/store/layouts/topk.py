"""The ``topk`` layout: the K largest raw logits, their class ids, and the tail's logsumexp on a temperature grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from softlabels.store import format as fmt
from softlabels.store.layouts._base import (
    Layout,
    _is_int,
    decode_ids,
    encode_ids,
    id_dtype,
    row_chunks,
)
from softlabels.store.layouts.targets import TopKTarget
from softlabels.store.temperatures import format_grid, grid_problems, supports

__all__ = ["TopK", "TAIL_LOGSUMEXP", "tail_logsumexp"]

TAIL_LOGSUMEXP = "tail_logsumexp"


@dataclass(frozen=True, kw_only=True)
class TopK(Layout):
    """``topk_values`` [K] (logits dtype, descending), ``topk_indices`` [K] (ids) and ``tail_logsumexp`` [G]
    float32: the logsumexp of z / T over the classes not stored, for each T of ``tail_temperatures``.

    ``tail_temperatures=None`` is a store written before the grid was recorded: ``logsumexp`` []
    over all C at T = 1 instead, which answers T = 1 only.
    """

    k: int
    tail_temperatures: tuple[float, ...] | None = None

    name = "topk"
    default_loss = "topk_kl"

    def __post_init__(self) -> None:
        if isinstance(self.tail_temperatures, list):  # from a store's JSON attributes
            object.__setattr__(self, "tail_temperatures", tuple(self.tail_temperatures))
        super().__post_init__()

    @property
    def legacy(self) -> bool:
        return self.tail_temperatures is None

    def problems(self) -> list[str]:
        p = super().problems()
        c = self.num_classes if _is_int(self.num_classes) else 0
        if not _is_int(self.k) or not 1 <= self.k <= c:
            p.append(f"k must be an integer in 1..num_classes ({c}), got {self.k!r}")
        if not self.legacy:
            p += grid_problems(self.tail_temperatures, "tail_temperatures")
        return p

    def params(self) -> dict[str, Any]:
        if self.legacy:
            return {"k": int(self.k)}
        return {"k": int(self.k), "tail_temperatures": [float(t) for t in self.tail_temperatures]}

    def temperatures(self) -> tuple[float, ...]:
        """The T this layout's stores answer exactly: the tail grid (T = 1 for a legacy store)."""
        return (1.0,) if self.legacy else tuple(float(t) for t in self.tail_temperatures)

    @property
    def temperature_kind(self) -> str:
        return "topk-legacy" if self.legacy else "topk"

    def arrays(self) -> dict[str, fmt.ArraySpec]:
        ids, tail = id_dtype(self.num_classes)
        out = {
            fmt.TOPK_VALUES: fmt.ArraySpec((self.k,), fmt.LOGITS_DTYPES[self.logits_dtype]),
            fmt.TOPK_INDICES: fmt.ArraySpec((self.k, *tail), ids),
        }
        if self.legacy:
            out[fmt.LOGSUMEXP] = fmt.ArraySpec((), np.dtype("float32"))
        else:
            out[TAIL_LOGSUMEXP] = fmt.ArraySpec((len(self.tail_temperatures),), np.dtype("float32"))
        return out

    def validate(self, block: Mapping[str, np.ndarray]) -> list[str]:
        tails = block.get(TAIL_LOGSUMEXP)
        if not self.legacy and tails is not None and tails.ndim == 2 and tails.shape[1] != len(self.tail_temperatures):
            return [f"tail_logsumexp holds {tails.shape[1]} temperatures per position but the attributes' "
                    f"tail_temperatures list {len(self.tail_temperatures)} ({format_grid(self.tail_temperatures)})"]
        p = super().validate(block)
        self._check_ids(p, fmt.TOPK_INDICES, block)
        if p or not len(block[fmt.TOPK_VALUES]):
            return p
        ids = decode_ids(block[fmt.TOPK_INDICES]).numpy()
        if self.k > 1 and (np.diff(np.sort(ids, -1), axis=-1) == 0).any():
            p.append("topk_indices name a class twice within a row")
        v = self._decode_logits(block[fmt.TOPK_VALUES]).double().numpy()
        if not np.isfinite(v).all():
            return p  # non-finite values: the writer's --on-nonfinite policy names those rows
        if self.k > 1 and (np.diff(v, axis=-1) > 0).any():
            p.append("topk_values are not in descending order")
        eps = float(torch.finfo(self.store_dtype).eps)
        if self.legacy:
            lse = block[fmt.LOGSUMEXP].astype(np.float64)
            if (lse < v[:, 0] - (np.abs(v[:, 0]) * eps + 1e-4)).any():
                p.append("logsumexp is below the largest stored value")
            return p
        t = np.asarray(self.tail_temperatures, np.float64)
        tails = block[TAIL_LOGSUMEXP].astype(np.float64)
        if np.isnan(tails).any() or np.isposinf(tails).any():
            p.append("tail_logsumexp holds NaN or +inf")
        elif self.k < self.num_classes:
            # every tail logit is <= the smallest stored value (up to the values' dtype rounding)
            vmin = v[:, -1:]
            bound = (vmin + np.abs(vmin) * eps) / t + np.log(self.num_classes - self.k) + 1e-4 * (1 + np.abs(vmin) / t)
            if (tails > bound).any():
                p.append("tail_logsumexp exceeds what the classes not stored can hold (each tail logit is at most "
                         "the smallest stored value)")
        elif np.isfinite(tails).any():
            p.append("tail_logsumexp is finite but K = C leaves no tail")
        return p

    def encode(self, logits: Tensor, *, sample_ids: Tensor | None = None, positions: Tensor | None = None
               ) -> dict[str, Tensor]:
        self._check_logits(logits)
        # top-k on the teacher's own dtype: the values are exact either way, and no copy is made
        top, idx = torch.topk(logits, self.k, dim=1, largest=True, sorted=True)
        out = {fmt.TOPK_VALUES: top.to(self.store_dtype), fmt.TOPK_INDICES: encode_ids(idx, self.num_classes)}
        if self.legacy:
            out[fmt.LOGSUMEXP] = tail_logsumexp(logits, idx[:, :0], (1.0,))[:, 0]  # all C, T = 1
        else:
            out[TAIL_LOGSUMEXP] = tail_logsumexp(logits, idx, self.tail_temperatures)
        return out

    def decode(self, block: Mapping[str, np.ndarray]) -> TopKTarget:
        values, ids = self._decode_logits(block[fmt.TOPK_VALUES]), decode_ids(block[fmt.TOPK_INDICES])
        if self.legacy:
            return TopKTarget.from_logsumexp(values, ids, torch.from_numpy(block[fmt.LOGSUMEXP]), self.num_classes)
        return TopKTarget(values, ids, torch.from_numpy(block[TAIL_LOGSUMEXP]), self.temperatures(), self.num_classes)

    def inspect(self, target: TopKTarget) -> dict[str, Tensor]:
        """Entropy over the K classes plus one tail bucket (a lower bound of the full entropy) and the tail
        mass, at T = 1 (at the grid's first T when 1 is not on it)."""
        t = 1.0 if supports(target.temperatures, 1.0) else target.temperatures[0]
        buckets = target.bucket_log_probs(t, self.num_classes)
        return {"entropy": -(buckets.exp() * buckets).nan_to_num().sum(-1), "tail_mass": buckets[:, -1].exp()}


def tail_logsumexp(logits: Tensor, top_ids: Tensor, grid: tuple[float, ...]) -> Tensor:
    """float32 [B, G]: logsumexp of z / T over the classes not in ``top_ids``, for each T of ``grid``.

    From the full-precision logits, upcast to float32 one bounded block of rows at a time;
    -inf where nothing is left (K = C) or every tail logit is -inf.
    """
    out = torch.empty(len(logits), len(grid), dtype=torch.float32, device=logits.device)
    for rows in row_chunks(len(logits), logits.shape[-1]):
        # a copy (never the caller's tensor: .float() of float32 logits would be the same storage)
        x = logits[rows].to(torch.float32, copy=True).scatter_(1, top_ids[rows], -math.inf)
        for g, t in enumerate(grid):
            out[rows, g] = torch.logsumexp(x if t == 1 else x / t, dim=-1)
    return out


def tail_mass(logp: Tensor) -> Tensor:
    """1 - sum(exp(logp)) over the last axis, via expm1 and clamped to [0, 1] (rounding can overshoot)."""
    return (-torch.expm1(logp.logsumexp(-1))).clamp(0, 1)
