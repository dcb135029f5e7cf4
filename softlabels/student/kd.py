"""KD divergences between a student's logits and a typed teacher target, per row.

Every function returns a [B] tensor *without* the T^2 factor (the loss modules in
:mod:`softlabels.student.losses` apply it); no gradient flows into a teacher target. Dense
targets are exact. Sparse ones are computed over the stored classes plus one tail bucket, for
teacher and student alike, at a T the target answers exactly (any other T is refused in one
line); the sampled forward KL is the unbiased estimator of Anshumann et al. (2025) at the draw
temperature. The student's side of a sparse divergence is one gather and one logsumexp
(:class:`_GatherLSE`), and dense forward KL shares one pass with the hard CE (:class:`_DenseKD`),
both over bounded blocks of rows. docs/LAYOUTS.md ("KD losses") has the formulas and the why.
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
from softlabels.store.temperatures import require_temperature, supports

__all__ = ["DIVERGENCES", "compute_dtype", "dense_kl_and_ce", "divergence", "from_log_probs", "gather_lse",
           "reported_kl", "sampled_kl"]

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
            x, y = _over(s[rows].to(dt), temperature), _over(t[rows].to(dt), temperature)
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
            g = torch.ops.aten._softmax.out(_over(s[rows].to(dt), temp), -1, False, out=grad[rows])
            if ce_w is not None and temp == 1:
                g.mul_(w + ce_w[rows])
            else:
                g.mul_(w)
                if ce_w is not None:
                    g.add_(torch.softmax(s[rows].to(dt), -1).mul_(ce_w[rows]))
            g.sub_(torch.softmax(_over(t[rows].to(dt), temp), -1).mul_(w))
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
    lq = torch.log_softmax(_over(x, temperature), -1)
    lp = torch.log_softmax(_over(teacher.to(dt), temperature), -1).clamp_min_(torch.finfo(dt).min)
    # the fused kl_div is ~30% faster than an explicit select; the clamp keeps 0 log 0 = 0 for -inf logits
    kl = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    if labels is None:
        return kl, torch.zeros_like(kl)
    lq1 = lq if temperature == 1 else torch.log_softmax(x, -1)
    return kl, F.nll_loss(lq1, labels.long(), ignore_index=-1, reduction="none")


def _over(x: Tensor, temperature: float) -> Tensor:
    """x / T. A power-of-two T (2^-60..2^60) multiplies by 1 / T instead: the same bits (both round the
    same real number; so do their gradients, grad / T and grad * (1 / T)), and a CPU multiplies
    [256, 100] floats in two thirds of a division's time."""
    if temperature == 1:
        return x
    mantissa, exponent = math.frexp(temperature)
    return x * (1 / temperature) if mantissa == 0.5 and abs(exponent) <= 60 else x / temperature


# -- sparse targets: stored support plus one tail bucket -------------------------------------------
def _teacher_buckets(target: TopKTarget | SampledTarget, num_classes: int, temperature: float, dt: torch.dtype
                     ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(ids, the teacher's exact log p_T [B, W + 1] over the stored ids plus the tail, valid mask or None,
    whether there is no tail) of a sparse target; a T it does not answer is refused in one line."""
    if isinstance(target, TopKTarget):
        k = target.ids.shape[-1]
        no_tail = torch.as_tensor(k >= num_classes, device=target.ids.device)
        return target.ids.long(), target.bucket_log_probs(temperature, num_classes, dt), None, no_tail
    _require_draw_temperature(target, temperature)
    valid = target.valid
    lp = target.log_probs(dt)  # exact at Td; -inf on padding
    no_tail = valid.sum(-1) >= num_classes
    # the tail mass is known to the float32 logsumexp's resolution: below it, take that resolution, so a
    # student tail over a rounded-to-zero teacher tail is not an infinite reverse KL
    tail = (-torch.expm1(lp.logsumexp(-1).clamp_max(0))).clamp_min(TAIL_FLOOR).log()
    tail = torch.where(no_tail, torch.full_like(tail, -math.inf), tail)
    return target.ids.long(), torch.cat([lp, tail[:, None]], 1), valid, no_tail


def _require_draw_temperature(target: SampledTarget, temperature: float) -> None:
    require_temperature(target.temperatures, temperature, "this sampled target", "sampled", option="temperature=")


def _student_buckets(g: Tensor, lse_s: Tensor, valid: Tensor | None, no_tail: Tensor) -> Tensor:
    """The student's log q_T [B, W + 1] at the stored ids (its gathered logits / T) plus its tail."""
    lq = g - lse_s[:, None]  # the student's exact log q_T at the stored ids
    if valid is not None:
        lq = lq.masked_fill(~valid, -math.inf)
    # the student's tail from its one logsumexp: log(1 - sum q); clamped so rounding never gives log(<= 0)
    tail_q = (-torch.expm1(lq.logsumexp(-1).clamp_max(0))).clamp_min(torch.finfo(g.dtype).tiny).log()
    lq_tail = torch.where(no_tail, torch.full_like(tail_q, -math.inf), tail_q)
    return torch.cat([lq, lq_tail[:, None]], 1)


def sampled_kl(s: Tensor, target: SampledTarget, temperature: float, block: int = BLOCK_ELEMENTS,
               student: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Per-row estimate of KL(p_Td || q_Td) from S draws at the draw temperature Td (no T^2).

    ``(1/S) sum_d [log p_Td(i_d) - log q_Td(i_d)]``: unbiased, as is its gradient. An ids-only
    target gives the soft cross-entropy estimate ``-(1/S) sum_d log q_Td(i_d)`` instead (the KL
    estimate plus the teacher's entropy, which it cannot know; the same gradient). Any T other
    than Td is refused in one line.
    """
    _require_draw_temperature(target, temperature)
    dt = compute_dtype(s)
    ids, valid = target.ids.long(), target.valid
    g, lse_s = student or gather_lse(s, ids, temperature, block)
    counts = target.counts.to(dt)
    w = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    lq = g - lse_s[:, None]
    if not target.has_logits:
        return -(w * lq.masked_fill(~valid, 0)).sum(-1)
    lo = torch.finfo(dt).min
    return (w * (target.log_probs(dt).clamp_min(lo) - lq)).sum(-1)


def reported_kl(s: Tensor, target: DenseTarget | TopKTarget | SampledTarget) -> tuple[Tensor | None, float | None]:
    """(per-row forward KL, no T^2, the T it is at) as metrics report it: at T = 1 where the target answers
    it, else at the smallest T it answers; (None, None) for an ids-only sampled target, which cannot answer."""
    temps = target.temperatures
    if isinstance(target, SampledTarget) and not target.has_logits:
        return None, None
    t = 1.0 if supports(temps, 1.0) else float(temps[0])
    return divergence("forward_kl", s, target, t), t


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
    ids, lp, valid, no_tail = _teacher_buckets(target, s.shape[-1], temperature, dt)
    g, lse_s = student or gather_lse(s, ids, temperature, block)
    return from_log_probs(kind, lp, _student_buckets(g, lse_s, valid, no_tail), alpha, beta)
