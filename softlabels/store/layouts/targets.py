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

from softlabels.errors import ConfigError
from softlabels.store.temperatures import require_temperature

__all__ = ["DenseTarget", "TopKTarget", "SampledTarget", "Target", "TAIL_FLOOR"]

# smallest teacher tail mass a sparse target is taken to have (when some classes are not stored)
TAIL_FLOOR = torch.finfo(torch.float32).eps


class _Target:
    def to(self, device: torch.device | str, non_blocking: bool = False):
        """The same target with every tensor on ``device`` (its temperatures stay Python numbers)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self) if isinstance(getattr(self, f.name), Tensor)})

    def select(self, rows: Tensor):
        """The same target restricted to ``rows`` (an index or bool mask over its rows)."""
        return replace(self, **{f.name: getattr(self, f.name)[rows]
                                for f in fields(self) if isinstance(getattr(self, f.name), Tensor)})

    def __len__(self) -> int:
        return len(getattr(self, fields(self)[0].name))



@dataclass(frozen=True)
class DenseTarget(_Target):
    """``logits`` [B, C]: the teacher's raw logits (they answer every T)."""

    logits: Tensor
    temperatures = None

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
    """The K largest raw logits and the tail's logsumexp on a temperature grid.

    ``values`` [B, K] largest raw logits (descending), ``ids`` [B, K] int64, ``tails`` [B, G]:
    ``logsumexp_{j not stored}(z_j / T_g)`` for each ``T_g`` of ``temperatures`` (-inf: no tail).
    A store written before tails were recorded per T decodes to ``temperatures = (1.0,)``
    (:meth:`from_logsumexp`).
    """

    values: Tensor
    ids: Tensor
    tails: Tensor
    temperatures: tuple[float, ...] = (1.0,)
    num_classes: int | None = None  # the store's C, when decoded from one (the student must output C)

    @classmethod
    def from_logsumexp(cls, values: Tensor, ids: Tensor, logsumexp: Tensor, num_classes: int | None = None
                       ) -> TopKTarget:
        """A target from the logsumexp over all C at T = 1 (the legacy top-k arrays): it answers T = 1 only.

        The tail is ``lse + log(1 - sum_K exp(z_i - lse))``, its mass floored at :data:`TAIL_FLOOR`
        (the stored float32 logsumexp's resolution).
        """
        lse = logsumexp.float()
        mass = (-torch.expm1(values.float().logsumexp(-1) - lse)).clamp_min(TAIL_FLOOR)
        return cls(values, ids, (lse + mass.log()).unsqueeze(-1), (1.0,), num_classes)

    def tail(self, temperature: float) -> Tensor:
        """[B] the tail's logsumexp of z / T at a grid T (refused off the grid, in one line)."""
        require_temperature(self.temperatures, temperature, "this top-k target", "topk", option="temperature=")
        grid = self.temperatures
        return self.tails[..., min(range(len(grid)), key=lambda i: abs(grid[i] - float(temperature)))]

    @property
    def logsumexp(self) -> Tensor:
        """[B] float32 logsumexp of the raw logits over all C, at T = 1 (refused when 1 is not on the grid)."""
        return torch.logaddexp(self.values.float().logsumexp(-1), self.tail(1.0).float())

    def bucket_log_probs(self, temperature: float = 1.0, num_classes: int | None = None,
                         dtype: torch.dtype = torch.float32) -> Tensor:
        """Exact teacher log-probabilities of p_T over K + 1 buckets (K stored ids, then the tail), [B, K + 1].

        ``num_classes == K`` (all classes stored) makes the tail bucket -inf whatever is stored.
        """
        tail = self.tail(temperature).to(dtype)
        if num_classes is not None and self.ids.shape[-1] >= num_classes:
            tail = torch.full_like(tail, -math.inf)
        v = self.values.to(dtype) / temperature
        return torch.log_softmax(torch.cat([v, tail.unsqueeze(-1)], -1), -1)

    def log_probs(self, temperature: float = 1.0) -> Tensor:
        """Exact teacher log-probabilities of the K stored classes at a grid T, float32 [B, K]."""
        return self.bucket_log_probs(temperature)[:, :-1]

    def probs(self, temperature: float = 1.0) -> Tensor:
        """The teacher's exact probabilities of the K stored classes [B, K] at a T of the tail grid (others refused)."""
        return self.log_probs(temperature).exp()

    def densify(self, num_classes: int) -> Tensor:
        """[B, C] log-probs at T = 1: exact for the K stored classes, the tail mass spread evenly over the rest."""
        return _spread(self.log_probs(1.0), self.ids, num_classes)

    def top1(self) -> Tensor:
        return self.ids[:, 0]


@dataclass(frozen=True)
class SampledTarget(_Target):
    """S draws from softmax(z / Td) (``temperature`` = Td), as unique ids with counts (padding: count 0).

    ``ids`` [B, S] int64, ``counts`` [B, S] int (their row sum is S), ``logits`` [B, S] the raw
    teacher logits of those ids and ``logsumexp`` [B] = logsumexp(z / Td) over all C; both None
    for an ids-only store, which knows the draws but not the teacher's probabilities.
    """

    ids: Tensor
    counts: Tensor
    logits: Tensor | None = None
    logsumexp: Tensor | None = None
    temperature: float = 1.0
    num_classes: int | None = None  # the store's C, when decoded from one (the student must output C)

    @property
    def samples(self) -> int:
        return self.ids.shape[-1]

    @property
    def valid(self) -> Tensor:
        return self.counts > 0

    @property
    def has_logits(self) -> bool:
        return self.logits is not None and self.logsumexp is not None

    @property
    def temperatures(self) -> tuple[float, ...]:
        """The one T this target answers: its draw temperature."""
        return (float(self.temperature),)

    def log_probs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Exact teacher log-probabilities of the sampled ids at Td, [B, S] in ``dtype`` (padding: -inf).

        An ids-only target cannot answer: refused in one line.
        """
        if not self.has_logits:
            raise ConfigError("an ids-only sampled store holds the draws but not the teacher's logits, so the "
                              "teacher's probabilities (an exact KL, the tail mass) are unknown; regenerate with "
                              "'softlabels generate --layout sampled' without --sampled-ids-only to get them")
        lp = self.logits.to(dtype) / self.temperature - self.logsumexp.to(dtype).unsqueeze(-1)
        return lp.masked_fill(~self.valid, -math.inf)

    def probs(self, temperature: float | None = None) -> Tensor:
        """The teacher's exact probabilities of the sampled ids [B, S] (padding 0) at the draw T (the default;
        another T: refused)."""
        t = self.temperature if temperature is None else temperature
        require_temperature(self.temperatures, t, "this sampled target", "sampled", option="temperature=")
        return self.log_probs().exp()

    def densify(self, num_classes: int) -> Tensor:
        """[B, C] log-probs of the empirical distribution counts / S (-inf for ids never drawn)."""
        freq = self.counts.float() / self.counts.sum(-1, keepdim=True).clamp_min(1).float()
        out = torch.full((len(self.ids), num_classes), -math.inf, dtype=torch.float32, device=self.ids.device)
        # padding slots carry id 0 and log(0) = -inf: amax lets a real id 0 win whatever the order
        return out.scatter_reduce(1, self.ids, freq.log(), reduce="amax")

    def top1(self) -> Tensor:
        """The most probable drawn id (by the teacher's exact probability; ids-only: the most drawn)."""
        score = self.log_probs() if self.has_logits else self.counts.float()
        return self.ids.gather(1, score.argmax(-1, keepdim=True)).squeeze(-1)


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
