"""The ``topk`` layout: the K largest raw logits, their class ids, and the logsumexp over all C."""

from __future__ import annotations

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

__all__ = ["TopK", "logsumexp_fp32"]


def logsumexp_fp32(logits: Tensor) -> Tensor:
    """float32 logsumexp over the last axis, [B, C] -> [B], in row chunks.

    A half-precision teacher's logits are upcast one bounded block of rows at a
    time, so no [B, C] float32 temporary is made at large C.
    """
    out = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
    for rows in row_chunks(len(logits), logits.shape[-1]):
        out[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
    return out


@dataclass(frozen=True, kw_only=True)
class TopK(Layout):
    """``topk_values`` [K] (logits dtype, descending), ``topk_indices`` [K] (ids), ``logsumexp`` [] float32."""

    k: int

    name = "topk"
    default_loss = "topk_kl"

    def problems(self) -> list[str]:
        p = super().problems()
        c = self.num_classes if _is_int(self.num_classes) else 0
        if not _is_int(self.k) or not 1 <= self.k <= c:
            p.append(f"k must be an integer in 1..num_classes ({c}), got {self.k!r}")
        return p

    def params(self) -> dict[str, Any]:
        return {"k": int(self.k)}

    def arrays(self) -> dict[str, fmt.ArraySpec]:
        ids, tail = id_dtype(self.num_classes)
        return {
            fmt.TOPK_VALUES: fmt.ArraySpec((self.k,), fmt.LOGITS_DTYPES[self.logits_dtype]),
            fmt.TOPK_INDICES: fmt.ArraySpec((self.k, *tail), ids),
            fmt.LOGSUMEXP: fmt.ArraySpec((), np.dtype("float32")),
        }

    def validate(self, block: Mapping[str, np.ndarray]) -> list[str]:
        p = super().validate(block)
        self._check_ids(p, fmt.TOPK_INDICES, block)
        return p

    def encode(self, logits: Tensor, *, sample_ids: Tensor | None = None, positions: Tensor | None = None
               ) -> dict[str, Tensor]:
        self._check_logits(logits)
        # top-k on the teacher's own dtype: the values are exact either way, and no copy is made
        top, idx = torch.topk(logits, self.k, dim=1, largest=True, sorted=True)
        return {fmt.TOPK_VALUES: top.to(self.store_dtype), fmt.TOPK_INDICES: encode_ids(idx, self.num_classes),
                fmt.LOGSUMEXP: logsumexp_fp32(logits)}

    def decode(self, block: Mapping[str, np.ndarray]) -> TopKTarget:
        return TopKTarget(self._decode_logits(block[fmt.TOPK_VALUES]), decode_ids(block[fmt.TOPK_INDICES]),
                          torch.from_numpy(block[fmt.LOGSUMEXP]))

    def inspect(self, target: TopKTarget) -> dict[str, Tensor]:
        """Entropy over the K classes plus one tail bucket (a lower bound of the full entropy) and the tail mass."""
        logp = target.log_probs()
        tail = tail_mass(logp)
        buckets = torch.cat([logp, tail.log().unsqueeze(-1)], -1)
        return {"entropy": -(buckets.exp() * buckets).nan_to_num().sum(-1), "tail_mass": tail}


def tail_mass(logp: Tensor) -> Tensor:
    """1 - sum(exp(logp)) over the last axis, via expm1 and clamped to [0, 1] (rounding can overshoot)."""
    return (-torch.expm1(logp.logsumexp(-1))).clamp(0, 1)
