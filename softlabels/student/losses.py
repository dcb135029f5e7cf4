"""Distillation losses over precomputed teacher targets.

Every soft loss is a plain :class:`torch.nn.Module` with one signature,
``forward(student_logits [B, C], batch) -> Tensor [B]``, returning the *per-row*
loss so that :class:`DistillationLoss` can mask and weight rows. Losses are
chosen by name from :data:`LOSSES`.

The teacher side is a typed target (:mod:`softlabels.store.layouts.targets`):
``DenseTarget``, ``TopKTarget`` or ``SampledTarget``. ``batch`` may be such a
target, a dict holding one under ``"target"``, or a dict of the store's arrays
(:func:`as_target` turns it into one):

* dense: ``"logits"`` [B, C] raw teacher logits;
* top-k: ``"topk_values"`` [B, K] (largest raw logits, descending),
  ``"topk_indices"`` [B, K] and ``"logsumexp"`` [B] over all C raw logits;
* sampled: ``"sampled_ids"``, ``"sampled_counts"``, ``"sampled_logits"`` [B, S] and ``"logsumexp"`` [B].

Forward KL has one loss per layout (``kl``, ``topk_kl``, ``sampled_kl``); the
other divergences (``reverse_kl``, ``skew_kl``, ``skew_reverse_kl``, ``jsd``) take
any layout (:mod:`softlabels.student.kd` says how sparse targets are handled). The
temperature T is applied here and nowhere else. Half-precision inputs are
computed in float32 (float64 inputs stay float64). Nothing in a forward pass
copies to the host, so the losses add no CUDA synchronisation.
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
    "Batch",
    "TOPK_KEYS",
    "SAMPLED_KEYS",
    "KLDivergence",
    "SoftCrossEntropy",
    "LogitsMSE",
    "TopKKL",
    "SampledKL",
    "ReverseKL",
    "SkewKL",
    "SkewReverseKL",
    "JSD",
    "LOSSES",
    "as_target",
    "target_arrays",
    "make_soft_loss",
    "DistillationLoss",
]

Batch = dict[str, Any]
TOPK_KEYS = ("topk_values", "topk_indices", "logsumexp")
SAMPLED_KEYS = ("sampled_ids", "sampled_counts", "sampled_logits", "logsumexp")
_DENSE_LOSS_NAMES = "kl, soft_ce or mse"
_LAYOUT_WORDS = {DenseTarget: "dense", TopKTarget: "top-k", SampledTarget: "sampled"}
_DEFAULT_LOSS = {DenseTarget: "kl", TopKTarget: "topk_kl", SampledTarget: "sampled_kl"}


def as_target(batch: Any) -> DenseTarget | TopKTarget | SampledTarget | None:
    """The typed teacher target of a batch (a target, ``batch["target"]``, or the store's arrays), or None."""
    if isinstance(batch, (DenseTarget, TopKTarget, SampledTarget)):
        return batch
    target = batch.get("target")
    if target is not None:
        return target
    if "logits" in batch:
        return DenseTarget(batch["logits"])
    if "sampled_ids" in batch:
        missing = [k for k in SAMPLED_KEYS if k not in batch]
        if missing:
            raise DataError(f"sampled batch lacks {', '.join(missing)}; rebuild the batch with all of "
                            f"{', '.join(SAMPLED_KEYS)}")
        return SampledTarget(*(batch[k] for k in SAMPLED_KEYS))
    present = [k for k in TOPK_KEYS if k in batch]
    if not present:
        return None
    if len(present) < len(TOPK_KEYS):
        missing = [k for k in TOPK_KEYS if k not in batch]
        raise DataError(f"top-k batch lacks {', '.join(missing)}; rebuild the batch with all of {', '.join(TOPK_KEYS)}")
    return TopKTarget(batch["topk_values"], batch["topk_indices"], batch["logsumexp"])


# a typed target's fields -> the stored arrays' names, under which its tensors travel in a batch
_ARRAYS = {DenseTarget: {"logits": "logits"},
           TopKTarget: {"values": "topk_values", "ids": "topk_indices", "logsumexp": "logsumexp"},
           SampledTarget: dict(zip(("ids", "counts", "logits", "logsumexp"), SAMPLED_KEYS))}


def target_arrays(target: DenseTarget | TopKTarget | SampledTarget) -> dict[str, Tensor]:
    """A typed target's tensors under the stored arrays' names (what a batch carries; :func:`as_target` inverts it)."""
    return {name: getattr(target, f) for f, name in _ARRAYS[type(target)].items()}


_compute_dtype = kd.compute_dtype


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


def _no_teacher(loss_name: str) -> ConfigError:
    return ConfigError(
        f"loss {loss_name!r} needs teacher logits but the batch has none; "
        "pass a soft-label store or train on hard labels only (no soft loss)"
    )


def _dense_target(student_logits: Tensor, batch: Batch, loss_name: str) -> DenseTarget:
    """The batch's dense teacher target, or a clear error."""
    target = as_target(batch)
    if target is None:
        raise _no_teacher(loss_name)
    if not isinstance(target, DenseTarget):
        word, default = _LAYOUT_WORDS[type(target)], _DEFAULT_LOSS[type(target)]
        raise ConfigError(
            f"loss {loss_name!r} needs dense teacher logits but the batch has the {word} layout; "
            f"use --loss {default} for a {word} store"
        )
    _check_dense_shape(student_logits, target)
    return target


def _check_dense_shape(student_logits: Tensor, target: DenseTarget) -> None:
    if target.logits.shape != student_logits.shape:
        raise ModelMismatch(
            f"student logits have shape {tuple(student_logits.shape)} but teacher logits "
            f"{tuple(target.logits.shape)}; the student's class count must match the store's"
        )


def _dense_teacher(student_logits: Tensor, batch: Batch, loss_name: str) -> Tensor:
    """The batch's dense teacher logits in the compute dtype, or a clear error."""
    return _dense_target(student_logits, batch, loss_name).logits.to(_compute_dtype(student_logits))


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
        kl, ce = kd.dense_kl_and_ce(student_logits, _dense_target(student_logits, batch, self.name), labels, t)
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

    target_type: type = TopKTarget

    def forward(self, student_logits: Tensor, batch: Batch) -> Tensor:
        """Per-row loss, shape [B]."""
        target = self._target(student_logits, batch)
        return self._rows(student_logits, target, None)

    def rows_with_ce(self, student_logits: Tensor, batch: Batch, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(per-row soft loss, per-row hard CE); at T = 1 both come from the same logsumexp."""
        target = self._target(student_logits, batch)
        t = self.temperature
        cols = torch.cat([target.ids.long(), labels.clamp_min(0).long()[:, None]], 1)
        g, lse, *rest = kd.gather_lse(student_logits, cols, t, with_t1=True)  # one pass, one gradient buffer
        soft = self._rows(student_logits, target, (g[:, :-1], lse))
        lse1 = rest[0] if t != 1 else lse
        return soft, torch.where(labels >= 0, lse1 - g[:, -1] * t, torch.zeros_like(lse))

    def _rows(self, student_logits: Tensor, target: Any, student: tuple[Tensor, Tensor] | None) -> Tensor:
        raise NotImplementedError

    def _target(self, student_logits: Tensor, batch: Batch) -> Any:
        target = as_target(batch)
        want = _LAYOUT_WORDS[self.target_type]
        if target is None:
            raise ConfigError(f"loss {self.name!r} needs teacher targets but the batch has none; "
                              f"pass a {want} soft-label store or train on hard labels only (no soft loss)")
        if isinstance(target, DenseTarget):
            raise ConfigError(f"loss {self.name!r} needs a {want} batch but the batch has dense 'logits'; "
                              f"use --loss {_DENSE_LOSS_NAMES} for a dense store")
        if not isinstance(target, self.target_type):
            word = _LAYOUT_WORDS[type(target)]
            raise ConfigError(f"loss {self.name!r} needs a {want} batch but the batch has the {word} layout; "
                              f"use --loss {_DEFAULT_LOSS[type(target)]} for a {word} store")
        _check_sparse_shape(student_logits, target)
        return target


def _check_sparse_shape(student_logits: Tensor, target: TopKTarget | SampledTarget) -> None:
    """Shapes only: ids >= C are not checked here (that would sync); the gather refuses them."""
    values = target.values if isinstance(target, TopKTarget) else target.logits
    b, c = student_logits.shape
    if values.shape != target.ids.shape or values.shape[0] != b or target.logsumexp.shape != (b,) \
            or (isinstance(target, TopKTarget) and values.shape[1] > c):
        word = _LAYOUT_WORDS[type(target)]
        raise ModelMismatch(
            f"{word} batch shapes values {tuple(values.shape)}, indices {tuple(target.ids.shape)}, "
            f"logsumexp {tuple(target.logsumexp.shape)} do not fit student logits {tuple(student_logits.shape)}; "
            "the student's class count must match the store's"
        )


class TopKKL(_Sparse):
    """T^2 * KL over K+1 buckets (the K stored classes plus one tail) for top-k stores.

    Teacher bucket logits are the K stored values plus
    ``z_tail = lse + log(1 - sum_topk exp(z_i - lse))``; student bucket log-probs are
    its exact log-softmax at the K indices plus the log of the rest, both at T
    (the student's tail comes from its one logsumexp over all C). At T = 1 this is
    the exact KL between the bucketed teacher and student distributions; with
    K = C it equals :class:`KLDivergence` for any T. Top-k indices within a row are
    assumed distinct (not checked: that would sync).
    """

    name = "topk_kl"
    target_type = TopKTarget

    def _rows(self, student_logits: Tensor, target: TopKTarget, student: tuple[Tensor, Tensor] | None) -> Tensor:
        t = self.temperature
        return t * t * kd.divergence("forward_kl", student_logits, target, t, student=student)


class SampledKL(_Sparse):
    """T^2 * the sampled layout's forward-KL estimate: unbiased at T = 1, self-normalised IS otherwise."""

    name = "sampled_kl"
    target_type = SampledTarget

    def _rows(self, student_logits: Tensor, target: SampledTarget, student: tuple[Tensor, Tensor] | None) -> Tensor:
        t = self.temperature
        return t * t * kd.sampled_kl(student_logits, target, t, student=student)


class _Divergence(_Softened):
    """T^2 * a divergence for any layout: exact on dense targets, over stored ids + tail on sparse ones."""

    kind = ""

    def __init__(self, temperature: float = 1.0, alpha: float = 0.1) -> None:
        super().__init__(temperature)
        a = _as_float(alpha)
        if not 0.0 < a < 1.0:
            raise ConfigError(f"loss {self.name!r}: alpha must lie strictly between 0 and 1, got {alpha!r}; "
                              "pass e.g. 0.1")
        self.alpha = a

    def forward(self, student_logits: Tensor, batch: Batch) -> Tensor:
        """Per-row loss, shape [B]."""
        target = as_target(batch)
        if target is None:
            raise _no_teacher(self.name)
        if isinstance(target, DenseTarget):
            _check_dense_shape(student_logits, target)
        else:
            _check_sparse_shape(student_logits, target)
        t = self.temperature
        return t * t * kd.divergence(self.kind, student_logits, target, t, alpha=self.alpha, beta=self.alpha)


class ReverseKL(_Divergence):
    """T^2 * KL(q_T || p_T): mode-seeking."""

    name = kind = "reverse_kl"


class SkewKL(_Divergence):
    """T^2 * KL(p || alpha p + (1 - alpha) q) (DistiLLM's skew KL, alpha = 0.1 by default)."""

    name = kind = "skew_kl"


class SkewReverseKL(_Divergence):
    """T^2 * KL(q || (1 - alpha) p + alpha q) (DistiLLM's skew reverse KL, alpha = 0.1 by default)."""

    name = kind = "skew_reverse_kl"


class JSD(_Divergence):
    """T^2 * (b KL(p || m) + (1 - b) KL(q || m)), m = b p + (1 - b) q; b = ``alpha``, 0.5 by default (plain JSD)."""

    name = kind = "jsd"

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5) -> None:
        super().__init__(temperature, alpha)


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
