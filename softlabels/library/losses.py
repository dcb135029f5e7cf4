"""KD losses on typed targets for a user's own loop: :func:`kd_loss`, one function per divergence, :class:`KDLoss`.

They call the loss modules ``softlabels train`` uses (:mod:`softlabels.student.losses`) the way
its trainer does (:class:`~softlabels.student.losses.DistillationLoss` per sample,
:func:`~softlabels.student.kinds.tokens.lm_loss` per token), so both compute the same number.
This layer checks the arguments first, so a wrong call is one line naming the Python argument to
change. docs/LIBRARY.md ("Losses") describes the arguments and which positions a token loss counts.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from softlabels.errors import ConfigError, ModelMismatch
from softlabels.library.batches import TokenTargets
from softlabels.store.layouts.targets import DenseTarget, SampledTarget, TopKTarget
from softlabels.student.losses import (
    LOSSES,
    DistillationLoss,
    check_number,
    make_soft_loss,
)

__all__ = [
    "KDLoss", "kd_loss", "kl_loss", "soft_ce_loss", "mse_loss", "topk_kl_loss", "sampled_kl_loss",
    "reverse_kl_loss", "skew_kl_loss", "skew_reverse_kl_loss", "jsd_loss",
]

_OWN = {DenseTarget: ("kl", "soft_ce", "mse"), TopKTarget: ("topk_kl",), SampledTarget: ("sampled_kl",)}
_ANY_LAYOUT = ("reverse_kl", "skew_kl", "skew_reverse_kl", "jsd")


def _loss_name(loss: str | None, target: Any) -> str:
    kind = type(target)
    if kind not in _OWN:
        raise ConfigError(f"targets= must be a DenseTarget, TopKTarget, SampledTarget or TokenTargets (from "
                          f"softlabels.collate), got {kind.__name__}")
    if loss is None:
        return _OWN[kind][0]
    fits = (*_OWN[kind], *_ANY_LAYOUT)
    if loss not in fits:
        if loss not in LOSSES:
            raise ConfigError(f"loss={loss!r} is not a loss; pass one of {', '.join(LOSSES)} (or loss=None)")
        raise ConfigError(f"loss={loss!r} does not take {kind.__name__} targets; pass loss={_OWN[kind][0]!r} "
                          f"(or loss=None), or one of {', '.join(_ANY_LAYOUT)}")
    return loss


@functools.lru_cache(maxsize=64)
def _soft_module(name: str, temperature: float, skew: float | None) -> nn.Module:
    """The trainer's loss module (stateless: one per name, T and weight is kept)."""
    if skew is None:
        return make_soft_loss(name, temperature)
    if name not in _ANY_LAYOUT:
        raise ConfigError(f"skew= weights the mixture of {', '.join(_ANY_LAYOUT[1:])}, not loss={name!r}; drop skew")
    check_number("skew", skew, 0.0, 1.0, True, "skew=0.1")
    if not 0 < float(skew) < 1:
        raise ConfigError(f"skew must lie strictly between 0 and 1, got {skew!r}; pass e.g. skew=0.1")
    return LOSSES[name](temperature, float(skew))


def kd_loss(student_logits: Tensor, targets: Any, *, temperature: float, loss: str | None = None,
            alpha: float = 0.0, labels: Tensor | None = None, skew: float | None = None) -> Tensor:
    """The distillation loss of a batch, a scalar: ``alpha * CE(labels) + (1 - alpha) * T² · divergence``.

    ``targets``: a typed target from :func:`softlabels.collate` (per-sample: ``student_logits``
    [B, C]; :class:`TokenTargets`: [B, L, C]). ``loss``: a name of ``softlabels.LOSSES`` (default:
    the layout's own forward KL: ``kl``, ``topk_kl``, ``sampled_kl``). ``alpha`` > 0 needs
    ``labels``. ``skew``: the mixing weight of ``skew_kl``, ``skew_reverse_kl`` (0.1) and ``jsd`` (0.5).
    """
    t = check_number("temperature", temperature, 0.0, math.inf, False, "temperature=2")
    a = check_number("alpha", alpha, 0.0, 1.0, True, "alpha=0.5")
    if a > 0 and labels is None:
        raise ConfigError(f"alpha={alpha!r} mixes in the hard-label cross-entropy; pass labels= too, or alpha=0")
    if not isinstance(student_logits, Tensor):
        raise ConfigError(f"student_logits= must be a tensor, got {type(student_logits).__name__}")
    if isinstance(targets, TokenTargets):
        name = _loss_name(loss, targets.target)
        _check_classes(student_logits, targets.target, labels if a > 0 else None, ignore=-100)
        return _token_loss(student_logits, targets, _soft_module(name, t, skew), a, labels)
    name = _loss_name(loss, targets)
    _check_classes(student_logits, targets, labels if a > 0 else None, ignore=-1)
    if student_logits.ndim != 2:
        raise ModelMismatch(f"student_logits= has shape {tuple(student_logits.shape)} but per-sample targets "
                            "take [batch, classes]; pass the classifier's logits (token targets: use a token store)")
    if labels is None:
        labels = torch.full((len(student_logits),), -1, dtype=torch.long, device=student_logits.device)
    elif labels.shape != student_logits.shape[:1]:
        raise ModelMismatch(f"labels= has shape {tuple(labels.shape)}, student_logits= {tuple(student_logits.shape)}; "
                            "pass one label per row (-1: unlabeled)")
    return _mixed(name, t, skew, a)(student_logits, {"labels": labels, "target": targets})


def _check_classes(logits: Tensor, target: Any, labels: Tensor | None, ignore: int) -> None:
    """Refuse labels (given when the hard term uses them) and stored ids the student's last dimension cannot
    index. A target decoded from a store carries its class count: compared without reading the ids."""
    c = logits.shape[-1] if logits.ndim else 0
    if (stored := getattr(target, "num_classes", None)) is not None and stored != c:
        raise ModelMismatch(f"targets= come from a store of {stored} classes but student_logits= has {c}; the "
                            "student must output the store's class count (its num_classes)")
    ids = getattr(target, "ids", None) if stored is None else None  # a hand-made target: its ids (one sync)
    if ids is not None and ids.numel() and (high := int(ids.max())) >= c:
        raise ModelMismatch(f"targets= hold class id {high} but student_logits= has {c} classes; the student must "
                            "output the store's class count (its num_classes)")
    if labels is None:
        return
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise ConfigError(f"labels= must be an integer tensor of class ids, got {got}; pass e.g. "
                          f"labels=y.long() ({ignore}: no label)")
    labels = labels.long()  # compared as class ids, not in a narrow dtype (uint8 would wrap -1 and C)
    bad = (labels != ignore) & ((labels < 0) | (labels >= c))
    if labels.numel() and bool(bad.any()):
        raise ConfigError(f"labels= holds {int(labels[bad][0])}, outside 0..{c - 1} (the student's classes; "
                          f"{ignore}: no label); pass class ids the student outputs")


@functools.lru_cache(maxsize=64)
def _mixed(name: str, temperature: float, skew: float | None, alpha: float) -> nn.Module:
    return DistillationLoss(_soft_module(name, temperature, skew), alpha)


def _token_loss(logits: Tensor, targets: TokenTargets, soft: nn.Module, alpha: float, labels: Tensor | None) -> Tensor:
    from softlabels.student.kinds.tokens import lm_loss
    from softlabels.student.lm_metrics import IGNORE, next_token_targets

    if logits.ndim != 3 or logits.shape[0] != len(targets.lengths):
        raise ModelMismatch(f"student_logits= has shape {tuple(logits.shape)} but the token targets are for "
                            f"{len(targets.lengths)} sequences; pass the LM's [batch, seq_len, vocab] logits")
    b, seq, _ = logits.shape
    longest = int(targets.lengths.max()) if len(targets.lengths) else 0
    if seq < longest:
        raise ModelMismatch(f"student_logits= has {seq} positions per sequence but the store holds {longest} for "
                            "one of them; pass the logits of the same input_ids the targets were paired with")
    if labels is not None and labels.shape != (b, seq):
        raise ModelMismatch(f"labels= has shape {tuple(labels.shape)}, student_logits= {tuple(logits.shape)}; "
                            "pass the causal LM's labels [batch, seq_len] (-100: ignored)")
    ids = torch.zeros(b, seq, dtype=torch.long) if labels is None else labels.long()
    nxt, keep = next_token_targets(ids.to(logits.device), lengths=targets.lengths)
    keep &= nxt != IGNORE
    batch = {"index": targets.index(seq).to(logits.device), "loss_mask": keep, "targets": nxt.masked_fill(~keep, 0),
             "target": targets.target}
    total, _, _ = lm_loss(logits, batch, soft, alpha)
    return total / keep.sum().clamp_min(1)


class KDLoss(nn.Module):
    """:func:`kd_loss` as a module: ``KDLoss(temperature=2, alpha=0.5)(student_logits, targets, labels)``."""

    def __init__(self, loss: str | None = None, *, temperature: float, alpha: float = 0.0,
                 skew: float | None = None) -> None:
        super().__init__()
        self.loss, self.temperature, self.alpha, self.skew = loss, temperature, alpha, skew
        check_number("temperature", temperature, 0.0, math.inf, False, "temperature=2")
        check_number("alpha", alpha, 0.0, 1.0, True, "alpha=0.5")

    def forward(self, student_logits: Tensor, targets: Any, labels: Tensor | None = None) -> Tensor:
        """The scalar loss of the batch (see :func:`kd_loss`)."""
        return kd_loss(student_logits, targets, temperature=self.temperature, loss=self.loss, alpha=self.alpha,
                       labels=labels, skew=self.skew)


def _named(name: str, what: str):
    def fn(student_logits: Tensor, targets: Any, *, temperature: float, alpha: float = 0.0,
           labels: Tensor | None = None, **kw: Any) -> Tensor:
        return kd_loss(student_logits, targets, temperature=temperature, loss=name, alpha=alpha, labels=labels, **kw)

    fn.__name__ = fn.__qualname__ = f"{name}_loss"
    fn.__doc__ = f"{what}: :func:`kd_loss` with ``loss={name!r}``."
    return fn


kl_loss = _named("kl", "T² · KL(teacher_T ‖ student_T) on dense targets (Hinton et al. 2015)")
soft_ce_loss = _named("soft_ce", "T² · cross-entropy of the student against the softened teacher, dense targets")
mse_loss = _named("mse", "Mean squared error between raw logits (no temperature), dense targets")
topk_kl_loss = _named("topk_kl", "T² · KL over the K stored classes plus the exact tail bucket, top-k targets")
sampled_kl_loss = _named("sampled_kl", "T² · the sampled-ids estimate of forward KL, sampled targets")
reverse_kl_loss = _named("reverse_kl", "T² · KL(student_T ‖ teacher_T), any layout")
skew_kl_loss = _named("skew_kl", "T² · DistiLLM's skew KL (skew= 0.1), any layout")
skew_reverse_kl_loss = _named("skew_reverse_kl", "T² · DistiLLM's skew reverse KL (skew= 0.1), any layout")
jsd_loss = _named("jsd", "T² · the Jensen-Shannon divergence (skew= 0.5), any layout")
