"""Distillation losses over typed teacher targets: one ``nn.Module`` per divergence, and the hard + soft mix.

Every soft loss has one signature, ``forward(student_logits [B, C], batch) -> Tensor [B]``,
returning the *per-row* loss so that :class:`DistillationLoss` can mask and weight rows
(``alpha * CE + (1 - alpha) * soft``, as the classifier trainer mixes them; the language
model's per-position form is :func:`softlabels.student.kinds.tokens.lm_loss`). :data:`LOSSES`
names them and :func:`make_soft_loss` makes one.

The teacher side is a typed target (:mod:`softlabels.store.layouts.targets`):
``DenseTarget``, ``TopKTarget`` or ``SampledTarget``. ``batch`` may be such a target, a dict
holding one under ``"target"``, or a dict of the store's arrays (:func:`as_target` turns it
into one; :func:`target_arrays` is its inverse):

* dense: ``"logits"`` [B, C] raw teacher logits;
* top-k: ``"topk_values"`` [B, K] (largest raw logits, descending), ``"topk_indices"`` [B, K],
  ``"tail_logsumexp"`` [B, G] with ``"tail_temperatures"`` (a tuple of G floats; absent: (1,)), or
  a store's from before the grid, ``"logsumexp"`` [B] over all C raw logits (T = 1 only);
* sampled: ``"sampled_ids"``, ``"sampled_counts"`` [B, S], ``"sampled_logits"`` [B, S] and ``"logsumexp"`` [B]
  (= logsumexp(z / Td); both absent for an ids-only store) and ``"sample_temperature"`` (Td; absent: 1).

docs/LAYOUTS.md ("KD losses") tabulates the losses per layout. T is applied here and nowhere
else; half-precision inputs are computed in float32, and nothing in a forward pass copies to the
host (no CUDA synchronisation).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softlabels.errors import ConfigError, DataError, ModelMismatch
from softlabels.store.layouts.targets import DenseTarget, SampledTarget, TopKTarget
from softlabels.student import kd

__all__ = [
    "Batch", "TOPK_KEYS", "LEGACY_TOPK_KEYS", "SAMPLED_KEYS", "as_target", "target_arrays", "check_number",
    "KLDivergence", "SoftCrossEntropy", "LogitsMSE", "TopKKL", "SampledKL",
    "ReverseKL", "SkewKL", "SkewReverseKL", "JSD", "LOSSES", "make_soft_loss", "DistillationLoss",
]

Batch = dict[str, Any]
TOPK_KEYS = ("topk_values", "topk_indices", "tail_logsumexp")
LEGACY_TOPK_KEYS = ("topk_values", "topk_indices", "logsumexp")
SAMPLED_KEYS = ("sampled_ids", "sampled_counts", "sampled_logits", "logsumexp")
_LAYOUT_WORDS = {DenseTarget: "dense", TopKTarget: "top-k", SampledTarget: "sampled"}
_LOSSES_FOR = {DenseTarget: "kl, soft_ce or mse", TopKTarget: "topk_kl", SampledTarget: "sampled_kl"}


def as_target(batch: Any) -> DenseTarget | TopKTarget | SampledTarget | None:
    """The typed teacher target of a batch (a target, ``batch["target"]``, or the store's arrays), or None."""
    if isinstance(batch, (DenseTarget, TopKTarget, SampledTarget)):
        return batch
    if batch.get("target") is not None:
        return batch["target"]
    if "logits" in batch:
        return DenseTarget(batch["logits"])
    if "sampled_ids" in batch:
        _require(batch, SAMPLED_KEYS[:2], "sampled")
        if "sampled_logits" in batch or "logsumexp" in batch:
            _require(batch, SAMPLED_KEYS, "sampled")
        return SampledTarget(batch["sampled_ids"], batch["sampled_counts"], batch.get("sampled_logits"),
                             batch.get("logsumexp"), float(batch.get("sample_temperature", 1.0)))
    if any(k in batch for k in TOPK_KEYS + LEGACY_TOPK_KEYS):
        if "tail_logsumexp" in batch:
            _require(batch, TOPK_KEYS, "top-k")
            grid = tuple(float(t) for t in batch.get("tail_temperatures", (1.0,)))
            return TopKTarget(batch["topk_values"], batch["topk_indices"], batch["tail_logsumexp"], grid)
        _require(batch, LEGACY_TOPK_KEYS, "top-k")
        return TopKTarget.from_logsumexp(batch["topk_values"], batch["topk_indices"], batch["logsumexp"])
    return None


def _require(batch: Batch, names: tuple[str, ...], word: str) -> None:
    missing = [k for k in names if k not in batch]
    if missing:
        raise DataError(f"{word} batch lacks {', '.join(missing)}; rebuild the batch with all of {', '.join(names)}")


def target_arrays(target: DenseTarget | TopKTarget | SampledTarget) -> dict[str, Any]:
    """A typed target's tensors under the stored arrays' names, and its temperatures (what a batch carries;
    :func:`as_target` inverts it)."""
    if isinstance(target, DenseTarget):
        return {"logits": target.logits}
    if isinstance(target, TopKTarget):
        return {"topk_values": target.values, "topk_indices": target.ids, "tail_logsumexp": target.tails,
                "tail_temperatures": target.temperatures}
    out: dict[str, Any] = {"sampled_ids": target.ids, "sampled_counts": target.counts,
                           "sample_temperature": target.temperature}
    if target.has_logits:
        out.update(sampled_logits=target.logits, logsumexp=target.logsumexp)
    return out


def _as_float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def check_number(name: str, value: Any, low: float, high: float, closed: bool, example: str) -> float:
    """``value`` as a float in [low, high] (``closed``) or in (low, high] and finite; else a one-line
    :class:`ConfigError` ending ``pass e.g. <example>``."""
    v = _as_float(value)
    ok = (low <= v <= high) if closed else (low < v and v <= high and math.isfinite(v))
    if not ok:
        span = f"between {low:g} and {high:g}" if closed else f"a finite number > {low:g}"
        raise ConfigError(f"{name} must be {span}, got {value!r}; pass e.g. {example}")
    return v


def _check_temperature(temperature: float) -> float:
    return check_number("temperature", temperature, 0.0, math.inf, False, "--temperature 2")


def _target(name: str, student_logits: Tensor, batch: Batch, want: type | None = None) -> Any:
    """The batch's typed target for loss ``name`` (of type ``want``; None: any layout), shapes checked; or a clear
    error. Ids >= C are not checked here (that would sync); the gather refuses them."""
    target = as_target(batch)
    word = _LAYOUT_WORDS.get(type(target))
    if target is None:
        needs = "logits but the batch has none; pass a soft-label store"
        if want in (TopKTarget, SampledTarget):
            needs = f"targets but the batch has none; pass a {_LAYOUT_WORDS[want]} soft-label store"
        raise ConfigError(f"loss {name!r} needs teacher {needs} or train on hard labels only (no soft loss)")
    if want is not None and not isinstance(target, want):
        need = "dense teacher logits" if want is DenseTarget else f"a {_LAYOUT_WORDS[want]} batch"
        has = "dense 'logits'" if word == "dense" else f"the {word} layout"
        raise ConfigError(f"loss {name!r} needs {need} but the batch has {has}; use --loss "
                          f"{_LOSSES_FOR[type(target)]} for a {word} store")
    if isinstance(target, DenseTarget):
        if target.logits.shape != student_logits.shape:
            raise ModelMismatch(f"student logits have shape {tuple(student_logits.shape)} but teacher logits "
                                f"{tuple(target.logits.shape)}; the student's class count must match the store's")
        return target
    values = target.values if isinstance(target, TopKTarget) else target.counts
    lse = target.tails if isinstance(target, TopKTarget) else target.logsumexp
    b, c = student_logits.shape
    bad_lse = lse is not None and (lse.shape[0] != b if isinstance(target, TopKTarget) else lse.shape != (b,))
    if values.shape != target.ids.shape or values.shape[0] != b or bad_lse \
            or (isinstance(target, TopKTarget) and values.shape[1] > c):
        raise ModelMismatch(f"{word} batch shapes values {tuple(values.shape)}, indices {tuple(target.ids.shape)}, "
                            f"logsumexp {tuple(lse.shape) if lse is not None else None} do not fit student logits "
                            f"{tuple(student_logits.shape)}; the student's class count must match the store's")
    return target


def _dense_teacher(student_logits: Tensor, batch: Batch, loss_name: str) -> Tensor:
    """The batch's dense teacher logits in the compute dtype, or a clear error."""
    return _target(loss_name, student_logits, batch, DenseTarget).logits.to(kd.compute_dtype(student_logits))


class _Softened(nn.Module):
    """A soft loss evaluated at a distillation temperature T."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)


class KLDivergence(_Softened):
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per row (Hinton et al., 2015); dense targets.

    One fused pass over blocks of rows (:func:`softlabels.student.kd.dense_kl_and_ce`), which
    also gives :class:`DistillationLoss` the hard CE without another log-softmax.
    """

    name = "kl"

    def forward(self, student_logits: Tensor, batch: Batch) -> Tensor:
        """Per-row loss, shape [B]."""
        return self.rows_with_ce(student_logits, batch, None)[0]

    def rows_with_ce(self, student_logits: Tensor, batch: Batch, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """(per-row soft loss, per-row hard CE) from one pass; CE is 0 where label < 0 or labels is None."""
        t = self.temperature
        kl, ce = kd.dense_kl_and_ce(student_logits, _target(self.name, student_logits, batch, DenseTarget), labels, t)
        return t * t * kl, ce


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


class _Sparse(_Softened):
    """A soft loss over a sparse target's stored ids: the student's side is one gather and one logsumexp."""

    target_type: type

    def forward(self, student_logits: Tensor, batch: Batch) -> Tensor:
        """Per-row loss, shape [B]."""
        return self._rows(student_logits, _target(self.name, student_logits, batch, self.target_type), None)

    def rows_with_ce(self, student_logits: Tensor, batch: Batch, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(per-row soft loss, per-row hard CE); at T = 1 both come from the same logsumexp."""
        target = _target(self.name, student_logits, batch, self.target_type)
        t = self.temperature
        cols = torch.cat([target.ids.long(), labels.clamp_min(0).long()[:, None]], 1)
        g, lse, *rest = kd.gather_lse(student_logits, cols, t, with_t1=True)  # one pass, one gradient buffer
        soft = self._rows(student_logits, target, (g[:, :-1], lse))
        lse1 = rest[0] if t != 1 else lse
        return soft, torch.where(labels >= 0, lse1 - g[:, -1] * t, torch.zeros_like(lse))

    def _rows(self, student_logits: Tensor, target: Any, student: tuple[Tensor, Tensor] | None) -> Tensor:
        t = self.temperature
        if isinstance(target, SampledTarget):
            return t * t * kd.sampled_kl(student_logits, target, t, student=student)
        return t * t * kd.divergence("forward_kl", student_logits, target, t, student=student)


class TopKKL(_Sparse):
    """T^2 * the exact KL over K+1 buckets (the K stored classes plus one tail) at a T of the tail grid.

    With K = C it equals :class:`KLDivergence`; a T off the grid is refused. Top-k ids within a row
    are assumed distinct (the store's validator checks them; checking here would sync).
    """

    name = "topk_kl"
    target_type = TopKTarget


class SampledKL(_Sparse):
    """T^2 * the sampled layout's forward-KL estimate at its draw temperature Td (any other T: refused).

    Unbiased; an ids-only store gives the soft cross-entropy estimate (the KL estimate plus the
    teacher's entropy at Td, which it cannot know), with the same gradient.
    """

    name = "sampled_kl"
    target_type = SampledTarget


class _Divergence(_Softened):
    """T^2 * a divergence for any layout: exact on dense targets, over stored ids + tail on sparse ones."""

    default_alpha = 0.1

    def __init__(self, temperature: float = 1.0, alpha: float | None = None) -> None:
        super().__init__(temperature)
        a = _as_float(self.default_alpha if alpha is None else alpha)
        if not 0.0 < a < 1.0:
            raise ConfigError(f"loss {self.name!r}: alpha must lie strictly between 0 and 1, got {alpha!r}; "
                              "pass e.g. 0.1")
        self.alpha = a

    def forward(self, student_logits: Tensor, batch: Batch) -> Tensor:
        """Per-row loss, shape [B]."""
        target, t = _target(self.name, student_logits, batch), self.temperature
        return t * t * kd.divergence(self.name, student_logits, target, t, alpha=self.alpha, beta=self.alpha)


class ReverseKL(_Divergence):
    """T^2 * KL(q_T || p_T): mode-seeking."""

    name = "reverse_kl"


class SkewKL(_Divergence):
    """T^2 * KL(p || alpha p + (1 - alpha) q) (DistiLLM's skew KL, alpha = 0.1 by default)."""

    name = "skew_kl"


class SkewReverseKL(_Divergence):
    """T^2 * KL(q || (1 - alpha) p + alpha q) (DistiLLM's skew reverse KL, alpha = 0.1 by default)."""

    name = "skew_reverse_kl"


class JSD(_Divergence):
    """T^2 * (b KL(p || m) + (1 - b) KL(q || m)), m = b p + (1 - b) q; b = ``alpha``, 0.5 by default (plain JSD)."""

    name = "jsd"
    default_alpha = 0.5


LOSSES: dict[str, type[nn.Module]] = {cls.name: cls for cls in (
    KLDivergence, SoftCrossEntropy, LogitsMSE, TopKKL, SampledKL, ReverseKL, SkewKL, SkewReverseKL, JSD)}


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
        self.soft = soft
        self.alpha = check_number("alpha", alpha, 0.0, 1.0, True, "--alpha 0.5")
        self.last_parts: dict[str, Tensor] = {}

    def forward(self, student_logits: Tensor, batch: Batch) -> Tensor:
        """Scalar loss for the batch; also sets ``last_parts``."""
        s = student_logits.to(kd.compute_dtype(student_logits))
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
                hard = soft = zero
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
