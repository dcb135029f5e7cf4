"""Typed teacher targets: what a layout decodes to and what the KD losses take.

One small frozen dataclass per layout (torchtune passes teacher logits as a typed
argument too): a loss dispatches on the type, never on dict keys. Tensors keep
their stored dtypes (fp16/bf16 logits, int64 ids) until a loss upcasts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

__all__ = ["DenseTarget", "TopKTarget", "SampledTarget", "Target", "TAIL_FLOOR"]

# smallest teacher tail mass a sparse target is taken to have (when some classes are not stored)
TAIL_FLOOR = torch.finfo(torch.float32).eps


class _Target:
    def to(self, device: torch.device | str, non_blocking: bool = False):
        """The same target with every tensor on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self)})

    def __len__(self) -> int:
        return len(getattr(self, fields(self)[0].name))

    def _exact_at_one(self, temperature: float) -> None:
        if float(temperature) != 1.0:
            from softlabels.errors import ConfigError

            raise ConfigError(f"a {type(self).__name__} knows the teacher's exact probabilities at temperature 1 only "
                              f"(got temperature={temperature!r}): its stored logits are a subset of the classes; "
                              "pass temperature=1, or generate a dense store for other temperatures")


@dataclass(frozen=True)
class DenseTarget(_Target):
    """``logits`` [B, C]: the teacher's raw logits."""

    logits: Tensor

    def probs(self, temperature: float = 1.0) -> Tensor:
        """Teacher probabilities softmax(logits / T) [B, C], float32: exact at any T."""
        return torch.softmax(self.logits.float() / float(temperature), -1)

    def densify(self, num_classes: int | None = None) -> Tensor:
        """Teacher log-probabilities [B, C] at T = 1."""
        return torch.log_softmax(self.logits.float(), -1)

    def top1(self) -> Tensor:
        return self.logits.argmax(-1)


@dataclass(frozen=True)
class TopKTarget(_Target):
    """``values`` [B, K] largest raw logits (descending), ``ids`` [B, K] int64, ``logsumexp`` [B] over all C."""

    values: Tensor
    ids: Tensor
    logsumexp: Tensor

    def log_probs(self) -> Tensor:
        """Exact teacher log-probabilities of the K stored classes at T = 1, float32 [B, K]."""
        return self.values.float() - self.logsumexp.float().unsqueeze(-1)

    def probs(self, temperature: float = 1.0) -> Tensor:
        """The teacher's exact probabilities of the K stored classes [B, K] at T = 1 (other T: refused)."""
        self._exact_at_one(temperature)
        return self.log_probs().exp()

    def densify(self, num_classes: int) -> Tensor:
        """[B, C] log-probs at T = 1: exact for the K stored classes, the tail mass spread evenly over the rest."""
        return _spread(self.log_probs(), self.ids, num_classes)

    def top1(self) -> Tensor:
        return self.ids[:, 0]


@dataclass(frozen=True)
class SampledTarget(_Target):
    """S draws from softmax(logits) at T = 1, as unique ids with counts (padding: count 0).

    ``ids`` [B, S] int64, ``counts`` [B, S] int (descending; their row sum is S),
    ``logits`` [B, S] the raw teacher logits of those ids, ``logsumexp`` [B] over all C.
    """

    ids: Tensor
    counts: Tensor
    logits: Tensor
    logsumexp: Tensor

    @property
    def samples(self) -> int:
        return self.ids.shape[-1]

    @property
    def valid(self) -> Tensor:
        return self.counts > 0

    def log_probs(self) -> Tensor:
        """Exact teacher log-probabilities of the sampled ids at T = 1, float32 [B, S] (padding: -inf)."""
        lp = self.logits.float() - self.logsumexp.float().unsqueeze(-1)
        return lp.masked_fill(~self.valid, -math.inf)

    def probs(self, temperature: float = 1.0) -> Tensor:
        """The teacher's exact probabilities of the sampled ids [B, S] at T = 1 (padding 0; other T: refused)."""
        self._exact_at_one(temperature)
        return self.log_probs().exp()

    def densify(self, num_classes: int) -> Tensor:
        """[B, C] log-probs of the empirical distribution counts / S (-inf for ids never drawn)."""
        freq = self.counts.float() / self.counts.sum(-1, keepdim=True).clamp_min(1).float()
        out = torch.full((len(self.ids), num_classes), -math.inf, dtype=torch.float32, device=self.ids.device)
        # padding slots carry id 0 and log(0) = -inf: amax lets a real id 0 win whatever the order
        return out.scatter_reduce(1, self.ids, freq.log(), reduce="amax")

    def top1(self) -> Tensor:
        """The most probable drawn id (by the teacher's exact probability, not the count)."""
        return self.ids.gather(1, self.log_probs().argmax(-1, keepdim=True)).squeeze(-1)


def _spread(logp_k: Tensor, ids: Tensor, num_classes: int) -> Tensor:
    """Stored log-probs scattered into [B, C], the remaining mass shared evenly by the classes not stored."""
    k = ids.shape[-1]
    stored = logp_k.logsumexp(-1).clamp(max=-1e-7)
    log_tail = torch.log(-torch.expm1(stored))
    rest = torch.as_tensor(num_classes - k, dtype=logp_k.dtype, device=logp_k.device)
    fill = torch.where(rest > 0, log_tail - rest.clamp_min(1).log(), torch.full_like(log_tail, -math.inf))
    out = fill.unsqueeze(-1).expand(len(ids), num_classes).clone()
    return out.scatter(1, ids.long(), logp_k)


Target = DenseTarget | TopKTarget | SampledTarget
