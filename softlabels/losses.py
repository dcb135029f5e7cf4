"""Distillation losses over precomputed teacher targets.

Every soft loss is a plain :class:`torch.nn.Module` with one signature,
``forward(student_logits [B, C], batch) -> Tensor [B]``, returning the *per-row*
loss so that :class:`DistillationLoss` can mask and weight rows. Losses are
chosen by name from :data:`LOSSES`.

A batch is a dict of tensors: ``"labels"`` int64 [B] (-1 = unlabeled) plus the
teacher targets in one of two layouts:

* dense: ``"logits"`` [B, C] raw teacher logits;
* top-k: ``"topk_values"`` [B, K] (largest raw logits, descending),
  ``"topk_indices"`` [B, K] and ``"logsumexp"`` [B] over all C raw logits.

The temperature T is applied here and nowhere else. Half-precision inputs are
computed in float32 (float64 inputs stay float64). Nothing in a forward pass
copies to the host, so the losses add no CUDA synchronisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softlabels.errors import ConfigError, DataError, ModelMismatch

__all__ = [
    "Batch",
    "TOPK_KEYS",
    "KLDivergence",
    "SoftCrossEntropy",
    "LogitsMSE",
    "TopKKL",
    "LOSSES",
    "make_soft_loss",
    "DistillationLoss",
]

Batch = dict[str, Tensor]
TOPK_KEYS = ("topk_values", "topk_indices", "logsumexp")
_DENSE_LOSS_NAMES = "kl, soft_ce or mse"


def _compute_dtype(student_logits: Tensor) -> torch.dtype:
    # float16/bfloat16 are too coarse for log-softmax sums; float64 is kept.
    return torch.promote_types(student_logits.dtype, torch.float32)


def _as_float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _check_temperature(temperature: float) -> float:
    t = _as_float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}; pass e.g. --temperature 2")
    return t


def _dense_teacher(student_logits: Tensor, batch: Batch, loss_name: str) -> Tensor:
    """The batch's dense teacher logits in the compute dtype, or a clear error."""
    if "logits" not in batch:
        if any(k in batch for k in TOPK_KEYS):
            raise ConfigError(
                f"loss {loss_name!r} needs dense teacher logits but the batch has the top-k layout; "
                "use --loss topk_kl for a top-k store"
            )
        raise ConfigError(
            f"loss {loss_name!r} needs teacher logits but the batch has none; "
            "pass a soft-label store or train on hard labels only (no soft loss)"
        )
    teacher = batch["logits"]
    if teacher.shape != student_logits.shape:
        raise ModelMismatch(
            f"student logits have shape {tuple(student_logits.shape)} but teacher logits "
            f"{tuple(teacher.shape)}; the student's class count must match the store's"
        )
    return teacher.to(_compute_dtype(student_logits))


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Row-wise KL(p || q) from log-probs, with 0 log 0 = 0.

    The fused kl_div is ~30% faster than an explicit select; clamping the teacher's
    log-probs (data, never differentiated) to the finite minimum keeps -inf logits
    (p = 0) from turning 0 * inf into NaN.
    """
    log_p = log_p.detach().clamp(min=torch.finfo(log_p.dtype).min)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


class _Softened(nn.Module):
    """A soft loss evaluated at a distillation temperature T."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)


class KLDivergence(_Softened):
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per row (Hinton et al., 2015); dense targets."""

    name = "kl"

    def forward(self, student_logits: Tensor, batch: Batch) -> Tensor:
        """Per-row loss, shape [B]."""
        t = self.temperature
        teacher = _dense_teacher(student_logits, batch, self.name)
        s = student_logits.to(teacher.dtype)
        return t * t * _kl_rows(F.log_softmax(teacher / t, -1), F.log_softmax(s / t, -1))


class SoftCrossEntropy(_Softened):
    """T^2 * cross-entropy -sum softmax(t/T) log_softmax(s/T) per row; dense targets.

    Equals :class:`KLDivergence` plus T^2 times the (student-independent) teacher
    entropy at T, so both give the same gradients.
    """

    name = "soft_ce"

    def forward(self, student_logits: Tensor, batch: Batch) -> Tensor:
        """Per-row loss, shape [B]."""
        t = self.temperature
        teacher = _dense_teacher(student_logits, batch, self.name)
        s = student_logits.to(teacher.dtype)
        p = F.softmax(teacher / t, -1)
        return -t * t * (p * F.log_softmax(s / t, -1)).sum(-1)


class LogitsMSE(nn.Module):
    """Mean over classes of (s - t)^2 per row; dense targets.

    Matches raw logits, so it has no temperature: :func:`make_soft_loss` ignores
    the temperature it is given for ``"mse"``.
    """

    name = "mse"

    def forward(self, student_logits: Tensor, batch: Batch) -> Tensor:
        """Per-row loss, shape [B]."""
        teacher = _dense_teacher(student_logits, batch, self.name)
        return (student_logits.to(teacher.dtype) - teacher).square().mean(-1)


class TopKKL(_Softened):
    """T^2 * KL over K+1 buckets (the K stored classes plus one tail) for top-k stores.

    Teacher bucket logits are the K stored values plus
    ``z_tail = lse + log(1 - sum_topk exp(z_i - lse))``; student bucket logits are
    its logits at the K indices plus the log-sum-exp of the others. Both are
    softened by T. At T = 1 this is the exact KL between the bucketed teacher and
    student distributions; with K = C it equals :class:`KLDivergence` for any T.
    Top-k indices within a row are assumed distinct (not checked: that would sync).
    """

    name = "topk_kl"

    def forward(self, student_logits: Tensor, batch: Batch) -> Tensor:
        """Per-row loss, shape [B]."""
        t = self.temperature
        teacher_log_p, student_log_q = _topk_bucket_log_probs(student_logits, batch, t)
        return t * t * _kl_rows(teacher_log_p, student_log_q)


def _topk_bucket_log_probs(student_logits: Tensor, batch: Batch, temperature: float) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs over the K+1 top-k buckets at ``temperature``, each [B, K+1]."""
    missing = [k for k in TOPK_KEYS if k not in batch]
    if missing:
        if "logits" in batch and len(missing) == len(TOPK_KEYS):
            raise ConfigError(
                f"loss 'topk_kl' needs a top-k batch but the batch has dense 'logits'; "
                f"use --loss {_DENSE_LOSS_NAMES} for a dense store"
            )
        if len(missing) == len(TOPK_KEYS):
            raise ConfigError(
                "loss 'topk_kl' needs teacher targets but the batch has none; "
                "pass a top-k soft-label store or train on hard labels only (no soft loss)"
            )
        raise DataError(f"top-k batch lacks {', '.join(missing)}; rebuild the batch with all of {', '.join(TOPK_KEYS)}")
    dtype = _compute_dtype(student_logits)
    values = batch["topk_values"].to(dtype)
    indices = batch["topk_indices"].long()
    lse = batch["logsumexp"].to(dtype)
    b, c = student_logits.shape
    if values.shape != indices.shape or values.shape[0] != b or lse.shape != (b,) or values.shape[1] > c:
        raise ModelMismatch(
            f"top-k batch shapes values {tuple(values.shape)}, indices {tuple(indices.shape)}, "
            f"logsumexp {tuple(lse.shape)} do not fit student logits {tuple(student_logits.shape)}; "
            "the student's class count must match the store's"
        )
    s = student_logits.to(dtype) / temperature

    # Classes outside the top-k set; a row whose set covers every class has no tail.
    outside = torch.ones_like(s, dtype=torch.bool).scatter(1, indices, False)
    no_tail = ~outside.any(-1)
    # finfo.min rather than -inf keeps an empty tail finite: no inf - inf in backward.
    student_tail = s.masked_fill(~outside, torch.finfo(dtype).min).logsumexp(-1)
    student_buckets = torch.cat([s.gather(1, indices), student_tail[:, None]], 1)

    # Tail mass 1 - exp(lse_topk - lse) via expm1; rounding can make it slightly
    # negative, and it is exactly 0 when there is no tail, so clamp and allow -inf.
    tail_mass = (-torch.expm1(values.logsumexp(-1) - lse)).clamp_min(0)
    teacher_tail = torch.where(no_tail, torch.full_like(lse, -math.inf), lse + tail_mass.log())
    teacher_buckets = torch.cat([values, teacher_tail[:, None]], 1) / temperature
    return F.log_softmax(teacher_buckets, -1), F.log_softmax(student_buckets, -1)


LOSSES: dict[str, type[nn.Module]] = {
    "kl": KLDivergence,
    "soft_ce": SoftCrossEntropy,
    "mse": LogitsMSE,
    "topk_kl": TopKKL,
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
