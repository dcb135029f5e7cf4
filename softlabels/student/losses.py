"""Distillation losses over precomputed teacher targets: the registry and the hard + soft mix.

The soft losses (:mod:`softlabels.student.soft_losses`: ``nn.Module``s with one signature,
``forward(student_logits [B, C], batch) -> Tensor [B]``, per row) are chosen by name from
:data:`LOSSES` (:func:`make_soft_loss`); :class:`DistillationLoss` mixes one with the
hard-label cross-entropy, ``alpha * CE + (1 - alpha) * soft``, as the classifier trainer does
(the language model's per-position form is :func:`softlabels.student.kinds.tokens.lm_loss`).
A batch's typed teacher target comes from :func:`as_target`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from softlabels.errors import ConfigError
from softlabels.student.soft_losses import (
    JSD,
    SAMPLED_KEYS,
    TOPK_KEYS,
    Batch,
    KLDivergence,
    LogitsMSE,
    ReverseKL,
    SampledKL,
    SkewKL,
    SkewReverseKL,
    SoftCrossEntropy,
    TopKKL,
    _as_float,
    _check_temperature,
    _compute_dtype,
    as_target,
    target_arrays,
)

__all__ = [
    "Batch", "TOPK_KEYS", "SAMPLED_KEYS", "KLDivergence", "SoftCrossEntropy", "LogitsMSE", "TopKKL", "SampledKL",
    "ReverseKL", "SkewKL", "SkewReverseKL", "JSD", "LOSSES", "as_target", "target_arrays", "make_soft_loss",
    "DistillationLoss",
]

LOSSES: dict[str, type[nn.Module]] = {
    "kl": KLDivergence,
    "soft_ce": SoftCrossEntropy,
    "mse": LogitsMSE,
    "topk_kl": TopKKL,
    "sampled_kl": SampledKL,
    "reverse_kl": ReverseKL,
    "skew_kl": SkewKL,
    "skew_reverse_kl": SkewReverseKL,
    "jsd": JSD,
}


def make_soft_loss(name: str, temperature: float) -> nn.Module:
    """The soft loss called ``name`` (a key of :data:`LOSSES`) at ``temperature``.

    Raises :class:`ConfigError` listing every problem (unknown name, T <= 0).
    """
    problems = []
    if name not in LOSSES:
        problems.append(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    try:
        _check_temperature(temperature)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    cls = LOSSES[name]
    return cls() if cls is LogitsMSE else cls(temperature)


class DistillationLoss(nn.Module):
    """Hard-label cross-entropy mixed with a soft loss: one scalar per batch.

    With ``soft`` given, the total is the mean over *all* rows of
    ``alpha * CE(row) + (1 - alpha) * soft(row)``, where CE is 0 on unlabeled rows
    (label -1). The soft loss is skipped when alpha == 1 (the total is then the
    CE summed over labeled rows divided by *all* rows) and CE is skipped when
    alpha == 0. With ``soft=None`` (plain supervised training, alpha ignored) the
    total is the mean CE over labeled rows, and 0 (still part of the graph) when
    there are none. Labels must lie in [-1, C).

    After each forward, ``last_parts`` holds detached 0-dim tensors ``"hard"`` and
    ``"soft"``, the weighted contributions with ``hard + soft == total``; read them
    with :meth:`parts` only when logging, since that syncs with the device.
    """

    def __init__(self, soft: nn.Module | None, alpha: float) -> None:
        super().__init__()
        a = _as_float(alpha)
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"alpha must be between 0 and 1, got {alpha!r}; pass e.g. --alpha 0.5")
        self.soft = soft
        self.alpha = a
        self.last_parts: dict[str, Tensor] = {}

    def forward(self, student_logits: Tensor, batch: Batch) -> Tensor:
        """Scalar loss for the batch; also sets ``last_parts``."""
        s = student_logits.to(_compute_dtype(student_logits))
        labels = batch["labels"].long()
        zero = s.new_zeros(())
        if self.soft is None:
            ce = F.cross_entropy(s, labels, ignore_index=-1, reduction="sum")
            # clamp_min keeps an all-unlabeled batch at 0 (with a graph) without a sync.
            hard = ce / (labels >= 0).sum().clamp_min(1)
            soft = zero
        else:
            fused = getattr(self.soft, "rows_with_ce", None) if 0 < self.alpha < 1 else None
            if fused is not None:  # one pass over the student's logits for both terms
                soft_rows, ce_rows = fused(student_logits, batch, labels)
                hard, soft = self.alpha * ce_rows.mean(), (1 - self.alpha) * soft_rows.mean()
            else:
                hard = zero
                soft = zero
                if self.alpha > 0:
                    ce_rows = F.cross_entropy(s, labels, ignore_index=-1, reduction="none")
                    hard = self.alpha * ce_rows.mean()
                if self.alpha < 1:
                    soft = (1 - self.alpha) * self.soft(student_logits, batch).mean()
        self.last_parts = {"hard": hard.detach(), "soft": soft.detach()}
        return hard + soft

    def parts(self) -> dict[str, float]:
        """``last_parts`` as Python floats (syncs with the device; call when logging)."""
        return {k: float(v.item()) for k, v in self.last_parts.items()}
