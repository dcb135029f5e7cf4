"""KD divergences between a student's logits and a typed teacher target, per row.

Every function returns a [B] tensor *without* the T^2 factor (the loss modules
in :mod:`softlabels.student.losses` apply it). Teacher targets are data: no gradient
flows into them.

Dense targets are exact. Sparse targets (top-k, sampled) know the teacher's
exact probability of each stored class (logit - logsumexp) and the exact total
of the rest (the tail), so every divergence is computed over the stored classes
plus one tail *bucket*, for teacher and student alike. At T = 1 that is the
exact divergence between the two bucketed distributions, which by the data
processing inequality is a lower bound of the full one; with all C classes
stored it equals the dense divergence for any T. At T != 1 the teacher's tail
bucket is softened as if it were one class with logit ``lse + log(tail mass)``.
A tail mass below :data:`TAIL_FLOOR` (float32's resolution, that of the stored
logsumexp) is taken as the floor, so reverse-type divergences stay finite.

The sampled layout's forward KL is instead the estimator of Anshumann et al.
(2025): at T = 1, sum_j (c_j / S) (log p_j - log q_j), an unbiased estimate of
KL(p || q) and of its gradient. At T != 1 the draws (from p at T = 1) are
reweighted to p_T by self-normalised importance sampling, w_j ~ c_j exp(z_j (1/T - 1)),
and log p_T(j) uses the same estimate of the partition function; this is
consistent (S -> inf) but not unbiased, and reduces to the T = 1 estimator at T = 1.

The student's side of a sparse divergence needs only its logits at the stored
ids and one logsumexp over all C (:class:`_GatherLSE`: no [B, C] temporaries
beyond the gradient itself); dense forward KL and the hard-label CE share one
fused pass (:class:`_DenseKD`). Both work over bounded blocks of rows, so a
128k vocabulary never makes a second [B, C] float32 copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from softlabels.store.layouts._base import row_chunks
from softlabels.store.layouts.targets import (
    TAIL_FLOOR,
    DenseTarget,
    SampledTarget,
    TopKTarget,
)

__all__ = ["DIVERGENCES", "compute_dtype", "dense_kl_and_ce", "divergence", "from_log_probs", "gather_lse", "sampled_kl"]

DIVERGENCES = ("forward_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd")
# rows per block: about this many elements of [rows, C] live at once in the fused paths; 1 MiB of
# float32 keeps a block's temporaries in cache (at C = 128k, 8 MiB blocks ran the sparse loss 1.7x slower)
BLOCK_ELEMENTS = 1 << 18
# from this many classes on, dense KD runs over row blocks (torchtune chunks its KD loss likewise)
CHUNKED_MIN_CLASSES = 32_768


def compute_dtype(student_logits: Tensor) -> torch.dtype:
    """float32 for half-precision students (too coarse for log-softmax sums); float64 stays."""
    return torch.promote_types(student_logits.dtype, torch.float32)


# -- the student's side, fused --------------------------------------------------------------------
def _scaled(s: Tensor, rows: slice, dt: torch.dtype, temperature: float) -> Tensor:
    x = s[rows].to(dt)
    return x if temperature == 1 else x / temperature


def _blocks(s: Tensor, block: int) -> list[slice]:
    return row_chunks(len(s), s.shape[-1], block)


class _GatherLSE(torch.autograd.Function):
    """(s[cols] / T, logsumexp(s / T), logsumexp(s) or empty) in the compute dtype, s [B, C], cols [B, W].

    One exp pass per block forward and one backward: the logsumexp at T = 1 (for the
    hard CE at T != 1) comes from the same exponentials, exp(x - m) = exp((x - m) / T) ** T
    (a square at T = 2), and so does the softmax at 1 in backward. Backward writes
    softmax(s / T) * dL (+ softmax(s) * dL1) into one [B, C] buffer block by block and
    scatter-adds the gathered columns' gradients; nothing of size [B, C] is saved.
    """

    @staticmethod
    def forward(ctx, s: Tensor, cols: Tensor, temperature: float, block: int, with_t1: bool):
        dt = compute_dtype(s)
        with_t1 = with_t1 and temperature != 1
        inv_t = 1 / temperature
        n = len(s)
        lse = torch.empty(n, dtype=dt, device=s.device)
        lse1 = torch.empty(n if with_t1 else 0, dtype=dt, device=s.device)
        for rows in _blocks(s, block):
            x = s[rows].to(dt)
            m = x.amax(-1, keepdim=True)
            e = torch.sub(x, m)
            if temperature != 1:
                e.mul_(inv_t)
            e.exp_()
            torch.log(e.sum(-1), out=lse[rows]).add_(m.squeeze(-1), alpha=inv_t)
            if with_t1:  # exp(x - m) = exp((x - m) / T) ** T: no second exp pass (a square at T = 2)
                torch.log(e.pow_(temperature).sum(-1), out=lse1[rows]).add_(m.squeeze(-1))
        gathered = s.gather(1, cols).to(dt).mul_(inv_t)
        ctx.save_for_backward(s, cols, lse, lse1)
        ctx.temperature, ctx.block, ctx.with_t1 = temperature, block, with_t1
        return gathered, lse, lse1

    @staticmethod
    def backward(ctx, d_gathered: Tensor, d_lse: Tensor, d_lse1: Tensor):
        s, cols, lse, lse1 = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty(s.shape, dtype=lse.dtype, device=s.device)
        shift = lse * t
        if ctx.with_t1:  # q_1 = q_T ** T * exp(T lse_T - lse_1)
            w1 = (shift - lse1).exp_().mul_(d_lse1)
        for rows in _blocks(s, ctx.block):  # softmax * dL, computed in place in the gradient
            g = torch.sub(s[rows].to(lse.dtype), shift[rows, None], out=grad[rows])
            if t != 1:
                g.mul_(1 / t)
            g.exp_()
            if ctx.with_t1:
                q1 = g.pow(t).mul_(w1[rows, None])
                g.mul_(d_lse[rows, None] / t).add_(q1)
            else:
                g.mul_(d_lse[rows, None] / t)
        grad.scatter_add_(1, cols, d_gathered / t)
        return grad.to(s.dtype), None, None, None, None


def gather_lse(s: Tensor, cols: Tensor, temperature: float = 1.0, block: int = BLOCK_ELEMENTS,
               with_t1: bool = False) -> tuple[Tensor, ...]:
    """The student's scaled logits at ``cols`` [B, W] and its logsumexp over all C at ``temperature``.

    With ``with_t1`` (and T != 1) a third tensor: the logsumexp at T = 1, from the same pass.
    """
    out = _GatherLSE.apply(s, cols.long(), float(temperature), block, with_t1)
    return out if with_t1 else out[:2]


class _DenseKD(torch.autograd.Function):
    """Per row: KL(softmax(t/T) || softmax(s/T)) and the hard CE of s, in one pass over blocks of rows.

    Built from the fused softmax / log_softmax kernels (on CPUs about twice as fast
    as exp or logsumexp); nothing of size [B, C] is saved: backward recomputes the
    softmaxes. Rows with label < 0 have CE 0.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, labels: Tensor | None, temperature: float, block: int):
        dt = compute_dtype(s)
        lo = torch.finfo(dt).min
        kl, ce = [], []
        with_ce = labels is not None
        safe = labels.clamp_min(0).long()[:, None] if with_ce else None
        for rows in _blocks(s, block):
            x, y = _scaled(s, rows, dt, temperature), _scaled(t, rows, dt, temperature)
            lq = torch.log_softmax(x, -1)
            # p (log p - log q), with 0 log 0 = 0 for -inf teacher logits (clamped, never NaN)
            diff = torch.log_softmax(y, -1).clamp_min_(lo).sub_(lq)
            kl.append(diff.mul_(torch.softmax(y, -1)).sum(-1))
            if with_ce:  # at T = 1 the student's log-softmax serves the CE too
                lq1 = lq if temperature == 1 else torch.log_softmax(s[rows].to(dt), -1)
                ce.append(-lq1.gather(1, safe[rows]).squeeze(1))
        kl = torch.cat(kl)
        if with_ce:
            ce = torch.where(labels >= 0, torch.cat(ce), torch.zeros_like(kl))
            ctx.save_for_backward(s, t, labels)
        else:
            ce = torch.zeros_like(kl)
            ctx.save_for_backward(s, t)
        ctx.temperature, ctx.block, ctx.with_ce = temperature, block, with_ce
        return kl, ce

    @staticmethod
    def backward(ctx, d_kl: Tensor, d_ce: Tensor):
        s, t, *rest = ctx.saved_tensors
        temp = ctx.temperature
        dt = d_kl.dtype
        ce_w = torch.where(rest[0] >= 0, d_ce, torch.zeros_like(d_ce))[:, None] if ctx.with_ce else None
        grad = torch.empty(s.shape, dtype=dt, device=s.device)
        for rows in _blocks(s, ctx.block):
            # d KL / d s = (q_T - p_T) / T;  d CE / d s = q_1 - onehot
            w = d_kl[rows, None] / temp
            g = torch.ops.aten._softmax.out(_scaled(s, rows, dt, temp), -1, False, out=grad[rows])
            if ce_w is not None and temp == 1:
                g.mul_(w + ce_w[rows])
            else:
                g.mul_(w)
                if ce_w is not None:
                    g.add_(torch.softmax(s[rows].to(dt), -1).mul_(ce_w[rows]))
            g.sub_(torch.softmax(_scaled(t, rows, dt, temp), -1).mul_(w))
        if ce_w is not None:
            grad.scatter_add_(1, rest[0].clamp_min(0).long()[:, None], -ce_w)
        return grad.to(s.dtype), None, None, None, None


def dense_kl_and_ce(s: Tensor, target: DenseTarget, labels: Tensor | None, temperature: float,
                    block: int = BLOCK_ELEMENTS, chunked: bool | None = None) -> tuple[Tensor, Tensor]:
    """Per-row KL(p_T || q_T) (no T^2) and hard CE (0 where label < 0; all 0 for ``labels=None``).

    Below :data:`CHUNKED_MIN_CLASSES` (or with ``chunked=False``) plain autograd ops, fastest
    when [B, C] is small: one student log-softmax serves the KL and, at T = 1, the CE. From
    there on (or ``chunked=True``) :class:`_DenseKD` over row blocks of ``block`` elements,
    which saves no [B, C] tensor and makes none besides the gradient.
    """
    teacher = target.logits.detach()
    if chunked or (chunked is None and s.shape[-1] >= CHUNKED_MIN_CLASSES):
        return _DenseKD.apply(s, teacher, labels, float(temperature), block)
    dt = compute_dtype(s)
    x = s.to(dt)
    lq = torch.log_softmax(x if temperature == 1 else x / temperature, -1)
    lp = torch.log_softmax(teacher.to(dt) / temperature, -1).clamp_min(torch.finfo(dt).min)
    # the fused kl_div is ~30% faster than an explicit select; the clamp keeps 0 log 0 = 0 for -inf logits
    kl = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    if labels is None:
        return kl, torch.zeros_like(kl)
    lq1 = lq if temperature == 1 else torch.log_softmax(x, -1)
    return kl, F.nll_loss(lq1, labels.long(), ignore_index=-1, reduction="none")


# -- sparse targets: stored support plus one tail bucket -------------------------------------------
def _support(target: TopKTarget | SampledTarget, dt: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """(ids, raw teacher logits with padding at -inf, valid mask or None) of a sparse target."""
    if isinstance(target, TopKTarget):
        return target.ids.long(), target.values.to(dt), None
    valid = target.valid
    return target.ids.long(), target.logits.to(dt).masked_fill(~valid, -math.inf), valid


def _buckets(g: Tensor, lse_s: Tensor, v: Tensor, lse_t: Tensor, valid: Tensor | None, num_classes: int,
             temperature: float) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs [B, W + 1] over the stored classes plus the tail, at T."""
    stored = v.shape[-1] if valid is None else valid.sum(-1)
    no_tail = torch.as_tensor(stored >= num_classes, device=g.device)
    lq = g - lse_s[:, None]  # the student's exact log q_T at the stored ids
    if valid is not None:
        lq = lq.masked_fill(~valid, -math.inf)
    # the student's tail from its one logsumexp: log(1 - sum q); clamped so rounding never gives log(<= 0)
    tail_q = (-torch.expm1(lq.logsumexp(-1).clamp_max(0))).clamp_min(torch.finfo(g.dtype).tiny).log()
    lq_tail = torch.where(no_tail, torch.full_like(tail_q, -math.inf), tail_q)
    # the teacher's tail mass is known only to the float32 logsumexp's resolution: below it, take that
    # resolution, so a student tail over a rounded-to-zero teacher tail is not an infinite reverse KL
    tail_mass = (-torch.expm1(v.logsumexp(-1) - lse_t)).clamp_min(TAIL_FLOOR)
    t_tail = torch.where(no_tail, torch.full_like(lse_t, -math.inf), lse_t + tail_mass.log())
    lp = torch.log_softmax(torch.cat([v, t_tail[:, None]], 1) / temperature, -1)
    return lp, torch.cat([lq, lq_tail[:, None]], 1)


def sampled_kl(s: Tensor, target: SampledTarget, temperature: float, block: int = BLOCK_ELEMENTS,
               student: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Per-row estimate of KL(p_T || q_T) from S draws (see the module doc); no T^2."""
    dt = compute_dtype(s)
    ids, v, valid = _support(target, dt)
    g, lse_s = student or gather_lse(s, ids, temperature, block)
    lse_t = target.logsumexp.to(dt)
    log_c = target.counts.to(dt).log()  # -inf on padding
    # log importance weights of p_T against p (the draws' distribution); 0 at T = 1
    log_w = log_c + (0 if temperature == 1 else v.masked_fill(~valid, 0) * (1 / temperature - 1))
    w = torch.softmax(log_w, -1)
    samples = target.counts.sum(-1, keepdim=True).to(dt)
    log_z = lse_t + (log_w - samples.log()).logsumexp(-1)  # estimate of log sum exp(z / T)
    lp = v / temperature - log_z[:, None]
    lq = g - lse_s[:, None]
    lo = torch.finfo(dt).min
    return (w * (lp.clamp_min(lo) - lq)).sum(-1)


# -- every divergence from log-probs ------------------------------------------------------------------
def _term(log_a: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """sum exp(log_a) * (x - y) per row; terms with exp(log_a) = 0 are 0 even where x or y is -inf."""
    lo = torch.finfo(x.dtype).min
    return (log_a.exp() * (x.clamp_min(lo) - y.clamp_min(lo))).sum(-1)


def _mix(la: Tensor, lb: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 - w) b) from log a and log b, finite where both are -inf (no NaN gradients)."""
    lo = torch.finfo(la.dtype).min
    return torch.logaddexp(la.clamp_min(lo) + math.log(weight_a), lb.clamp_min(lo) + math.log1p(-weight_a))


def from_log_probs(kind: str, lp: Tensor, lq: Tensor, alpha: float = 0.1, beta: float = 0.5) -> Tensor:
    """Per-row divergence ``kind`` between teacher ``lp`` and student ``lq`` log-probs over the last axis.

    forward_kl: KL(p || q); reverse_kl: KL(q || p); skew_kl: KL(p || a p + (1 - a) q);
    skew_reverse_kl: KL(q || (1 - a) p + a q) (DistiLLM, Ko et al. 2024); jsd:
    b KL(p || m) + (1 - b) KL(q || m) with m = b p + (1 - b) q (b = 0.5: the Jensen-Shannon divergence).
    """
    lp = lp.detach()
    if kind == "forward_kl":
        return _term(lp, lp, lq)
    if kind == "reverse_kl":
        return _term(lq, lq, lp)
    if kind == "skew_kl":
        return _term(lp, lp, _mix(lp, lq, alpha))
    if kind == "skew_reverse_kl":
        return _term(lq, lq, _mix(lp, lq, 1 - alpha))
    if kind == "jsd":
        m = _mix(lp, lq, beta)
        return beta * _term(lp, lp, m) + (1 - beta) * _term(lq, lq, m)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def divergence(kind: str, s: Tensor, target: DenseTarget | TopKTarget | SampledTarget, temperature: float, *,
               alpha: float = 0.1, beta: float = 0.5, block: int = BLOCK_ELEMENTS,
               student: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Per-row divergence between the student and a teacher target at T (no T^2).

    Dense: exact, over all C. Top-k and sampled: over the stored classes plus one
    tail bucket (the module doc). ``student`` may pass a precomputed :func:`gather_lse`
    of the target's ids at T.
    """
    dt = compute_dtype(s)
    if isinstance(target, DenseTarget):
        lp = torch.log_softmax(target.logits.to(dt) / temperature, -1)
        return from_log_probs(kind, lp, torch.log_softmax(s.to(dt) / temperature, -1), alpha, beta)
    ids, v, valid = _support(target, dt)
    g, lse_s = student or gather_lse(s, ids, temperature, block)
    lp, lq = _buckets(g, lse_s, v, target.logsumexp.to(dt), valid, s.shape[-1], temperature)
    return from_log_probs(kind, lp, lq, alpha, beta)
