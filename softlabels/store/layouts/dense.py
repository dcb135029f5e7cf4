"""The ``dense`` layout: all C raw teacher logits per position."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from softlabels.store import format as fmt
from softlabels.store.layouts._base import Layout
from softlabels.store.layouts.targets import DenseTarget

__all__ = ["Dense"]


class Dense(Layout):
    """``logits`` [C] in the logits dtype (bfloat16 stored as its uint16 bits)."""

    name = "dense"
    default_loss = "kl"

    def arrays(self) -> dict[str, fmt.ArraySpec]:
        return {fmt.LOGITS: fmt.ArraySpec((self.num_classes,), fmt.LOGITS_DTYPES[self.logits_dtype])}

    def encode(self, logits: Tensor, *, sample_ids: Tensor | None = None, positions: Tensor | None = None
               ) -> dict[str, Tensor]:
        self._check_logits(logits)
        return {fmt.LOGITS: logits.to(self.store_dtype)}  # no copy for float32 logits into a float32 store

    def decode(self, block: Mapping[str, np.ndarray]) -> DenseTarget:
        return DenseTarget(self._decode_logits(block[fmt.LOGITS]))

    def inspect(self, target: DenseTarget) -> dict[str, Tensor]:
        logp = torch.log_softmax(target.logits.float(), -1)
        return {"entropy": -(logp.exp() * logp).nan_to_num().sum(-1)}
