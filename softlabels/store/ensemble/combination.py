"""Combining several teachers' typed targets for the same positions (docs/ENSEMBLES.md derives each rule).

``arithmetic`` (the weighted mean of the teachers' probabilities at a T) or ``geometric`` (the
normalised weighted geometric mean); a combined target has the type of its members' targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from softlabels._runtime.options import is_number
from softlabels.errors import ConfigError, CorruptStore
from softlabels.store.layouts.sampled import unique_counts
from softlabels.store.layouts.targets import (
    DenseTarget,
    SampledTarget,
    Target,
    TopKTarget,
)
from softlabels.store.temperatures import require_temperature

__all__ = ["MODES", "Combination", "check_member", "check_temperature", "combine", "weight_problems"]

MODES = ("arithmetic", "geometric")
_F64 = torch.float64


def weight_problems(weights: Sequence[float]) -> list[str]:
    """Ensemble weights that cannot be normalised: not finite numbers > 0, or a sum that overflows."""
    shown = ", ".join(map(str, weights))
    if not all(is_number(x) and x > 0 for x in weights):
        return [f"ensemble weights must be finite numbers > 0, got {shown}"]
    if not math.isfinite(sum(float(x) for x in weights)):
        return [f"ensemble weights must have a finite sum (they are divided by it), got {shown}; scale them down"]
    return []


@dataclass(frozen=True)
class Combination:
    """How to combine n teachers: ``mode``, ``weights`` (None: equal), ``temperature`` (arithmetic)."""

    mode: str = "arithmetic"
    weights: tuple[float, ...] | None = None
    temperature: float = 1.0

    def problems(self, members: int, layout: str, draw_temperature: float = 1.0) -> list[str]:
        """Every problem with these settings for ``members`` teachers of one ``layout`` (sampled: drawn at
        ``draw_temperature``)."""
        p = []
        if self.mode not in MODES:
            p.append(f"ensemble mode {self.mode!r} is not one of {', '.join(MODES)}")
        if members < 2:
            p.append(f"an ensemble needs at least 2 stores, got {members}")
        t = self.temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            p.append(f"ensemble temperature must be a finite number > 0, got {t!r}")
        w = self.weights
        if w is not None:
            if len(w) != members:
                p.append(f"{len(w)} ensemble weights for {members} stores; give one weight per store")
            elif bad := weight_problems(w):
                p += bad
            elif layout == "sampled" and not all(float(x).is_integer() for x in w):
                p.append("sampled stores combine by pooling draws, so their ensemble weights must be whole "
                         f"numbers (draw multiplicities), got {', '.join(map(str, w))}")
        if layout == "sampled" and self.mode == "geometric":
            p.append("the geometric mean has no estimator from sampled draws; use --mode arithmetic for sampled stores")
        if layout == "sampled" and isinstance(t, (int, float)) and t != draw_temperature:
            p.append(f"sampled stores hold draws at T = {draw_temperature:g}, so they combine at temperature "
                     f"{draw_temperature:g} only, got {t}")
        return p

    def check(self, members: int, layout: str, draw_temperature: float = 1.0) -> None:
        if problems := self.problems(members, layout, draw_temperature):
            raise ConfigError(problems)

    def normalised(self, members: int) -> Tensor:
        w = torch.tensor(self.weights if self.weights is not None else [1.0] * members, dtype=_F64)
        return w / w.sum()

    def multiplicities(self, members: int) -> list[int]:
        """Integer draw multiplicities (sampled)."""
        return [int(x) for x in self.weights] if self.weights is not None else [1] * members

    def to_attrs(self, members: int) -> dict:
        # the geometric mean holds at every T (dense) or is made at T = 1 (top-k): no T to record
        return {"mode": self.mode, "temperature": float(self.temperature) if self.mode == "arithmetic" else None,
                "weights": [float(x) for x in self.normalised(members)]}


def combine(targets: Sequence[Target], how: Combination, num_classes: int) -> Target:
    """The combined target of ``targets`` (one per teacher, same rows, same type); float32 values."""
    kinds = {type(t) for t in targets}
    if len(kinds) != 1:
        raise ConfigError(f"an ensemble needs stores of one layout, got {', '.join(sorted(k.__name__ for k in kinds))}")
    rule = {DenseTarget: _dense, TopKTarget: _topk, SampledTarget: _sampled}[kinds.pop()]
    return rule(targets, how, num_classes)


# -- dense ------------------------------------------------------------------------------------------
def _dense(targets: Sequence[DenseTarget], how: Combination, num_classes: int) -> DenseTarget:
    w = how.normalised(len(targets))
    z = torch.stack([t.logits.to(_F64) for t in targets])  # [n, B, C]
    if how.mode == "geometric":
        out = torch.einsum("n,nbc->bc", w, z)
    else:
        t = float(how.temperature)
        lp = torch.log_softmax(z / t, -1) + w.log()[:, None, None]
        out = t * torch.logsumexp(lp, 0)
    return DenseTarget(out.float())


# -- top-k ------------------------------------------------------------------------------------------
def _union_ids(ids: Sequence[Tensor], width: int, num_classes: int) -> Tensor:
    """[B, width] distinct ids per row: the union of ``ids`` first, then the smallest ids outside it."""
    cat = torch.cat([i.long() for i in ids], 1)
    rows, total = cat.shape
    srt, _ = cat.sort(-1)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    span = min(num_classes, 2 * width)
    r = torch.arange(span, dtype=torch.int64).expand(rows, span).contiguous()
    pos = torch.searchsorted(srt, r).clamp_max(total - 1)
    taken = srt.gather(1, pos) == r
    cand = torch.cat([srt, r], 1)
    # priority: union ids (0), then fillers not in the union (1), repeats and taken fillers last (2)
    prio = torch.cat([dup.long() * 2, 1 + taken.long()], 1)
    order = torch.argsort(prio * (total + span) + torch.arange(total + span), dim=1)
    return cand.gather(1, order[:, :width])


def _lookup(cand: Tensor, ids: Tensor, lp: Tensor, spread: Tensor) -> tuple[Tensor, Tensor]:
    """Per candidate id: the teacher's stored log-prob, else ``spread``; and whether it was stored."""
    srt, perm = ids.long().sort(-1)
    pos = torch.searchsorted(srt, cand).clamp_max(srt.shape[1] - 1)
    hit = srt.gather(1, pos) == cand
    vals = lp.gather(1, perm.gather(1, pos))
    return torch.where(hit, vals, spread[:, None].expand_as(vals)), hit


def _topk(targets: Sequence[TopKTarget], how: Combination, num_classes: int) -> TopKTarget:
    n, c = len(targets), num_classes
    w = how.normalised(n)
    t = float(how.temperature) if how.mode == "arithmetic" else 1.0
    width = min(sum(x.ids.shape[1] for x in targets), c)
    cand = _union_ids([x.ids for x in targets], width, c)
    per, outside, spreads = [], [], []
    for x in targets:
        k = x.ids.shape[1]  # the teacher's exact bucket log-probs at T, as the losses see them
        buckets = x.bucket_log_probs(t, c, _F64)
        lp, tail = buckets[:, :k], buckets[:, k]
        spread = tail - math.log(c - k) if k < c else torch.full_like(tail, -math.inf)
        lpc, hit = _lookup(cand, x.ids, lp, spread)
        per.append(lpc)
        spreads.append(spread)
        # this teacher's mass on classes outside the candidates: its tail less the spread shares used
        left = (c - k) - (~hit).sum(-1)
        outside.append(spread + torch.log(left.to(_F64)))  # log 0 = -inf when none are left
    lp = torch.stack(per)  # [n, B, K']
    if how.mode == "arithmetic":
        values = t * torch.logsumexp(lp + w.log()[:, None, None], 0)
        rest = t * torch.logsumexp(torch.stack(outside) + w.log()[:, None], 0)
    else:  # every class outside the candidates has the same geometric mean of spread shares
        values = torch.einsum("n,nbk->bk", w, lp)
        share = torch.einsum("n,nb->b", w, torch.stack(spreads))
        rest = share + math.log(c - width) if c > width else torch.full_like(share, -math.inf)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    # values / t and rest / t are the mixture's log-probabilities at t (up to one constant): its grid is (t,)
    return TopKTarget(values.float(), cand.gather(1, order), (rest / t).float()[:, None], (t,), c)


# -- sampled ----------------------------------------------------------------------------------------
def _sampled(targets: Sequence[SampledTarget], how: Combination, num_classes: int) -> SampledTarget:
    mult = how.multiplicities(len(targets))
    slots = sum(m * x.samples for m, x in zip(mult, targets))
    # the pooled draws sample the mixture with weights m_i S_i / S'; the logits use the same mixture
    w = torch.tensor([m * x.samples for m, x in zip(mult, targets)], dtype=_F64) / slots
    ids = torch.cat([x.ids.long() for x in targets], 1)
    counts = torch.cat([x.counts.long() * m for m, x in zip(mult, targets)], 1)
    # sum the counts of each id: padding (count 0) moves to id -1 so it never merges with a real id
    u_ids, u_counts = unique_counts(torch.where(counts > 0, ids, torch.full_like(ids, -1)), counts)
    # the mixture's log-probability of each id: exact for the teachers that drew it, spread otherwise
    mix = []
    for x in targets:
        lp = x.log_probs().to(_F64)  # -inf on padding
        drawn = x.valid.sum(-1)
        left = (-torch.expm1(lp.logsumexp(-1).clamp_max(0))).clamp_min(0)
        spread = torch.log(left) - torch.log((num_classes - drawn).clamp_min(1).to(_F64))
        drawn_ids = torch.where(x.valid, x.ids.long(), torch.full_like(x.ids.long(), -1))  # padding never matches
        mix.append(_lookup(u_ids, drawn_ids, lp, spread)[0])
    logits = torch.logsumexp(torch.stack(mix) + w.log()[:, None, None], 0)
    logits = logits.masked_fill(u_counts == 0, 0)
    # the layout's order (count descending, ties by id; padding 0, 0, 0), S' slots wide
    pad = (0, slots - u_ids.shape[1])  # whole multiplicities >= 1: never fewer slots than draws
    ids, counts, logits = (torch.nn.functional.pad(a, pad) for a in (u_ids, u_counts, logits))
    # logits / Td - 0 is the mixture's log-probability at the members' draw temperature Td
    td = float(targets[0].temperature)
    zero = torch.zeros(len(ids), dtype=torch.float32)
    return SampledTarget(ids, counts, (td * logits).float(), zero, td, num_classes)


def _made_at(meta: object, where: str) -> float | None:
    """The T of an arithmetic ensemble store (None for any other store)."""
    teacher = getattr(meta, "teacher", None)
    ensemble = teacher.get("ensemble") if isinstance(teacher, dict) else None
    if not isinstance(ensemble, dict) or ensemble.get("mode") != "arithmetic":
        return None
    made = ensemble.get("temperature")
    if not is_number(made) or made <= 0:
        raise CorruptStore(f"{where}: its teacher.ensemble.temperature is {made!r}, not a finite number > 0; merge the "
                           "stores again")
    return float(made)


def check_temperature(meta: object, temperature: float, where: str, *, command: str = "train") -> None:
    """Refuse reading an arithmetic ensemble store at a T other than the one it was combined at
    (docs/ENSEMBLES.md); ``command`` "eval" (comparing with the teacher at T = 1) words the fix.
    """
    made = _made_at(meta, where)
    if made is None or math.isclose(made, float(temperature), rel_tol=1e-9):
        return
    if command == "eval":
        raise ConfigError(f"{where} is an arithmetic ensemble made at T = {made:g}, so it is exact only at T = "
                          f"{made:g}, but eval compares the student with the teacher at T = {temperature:g}; merge "
                          f"again with --temperature {temperature:g} to evaluate against it")
    require_temperature((made,), temperature, where, "ensemble")  # the one check's refusal (E1911)


def check_member(meta: object, how: Combination, where: str) -> None:
    """Refuse an ensemble member that is itself an arithmetic ensemble unless combining it is exact:
    arithmetically at its own T0 (docs/ENSEMBLES.md, "A merged store as a member")."""
    made = _made_at(meta, where)
    if made is None or (how.mode == "arithmetic" and math.isclose(made, float(how.temperature), rel_tol=1e-9)):
        return
    at = f"at T = {how.temperature:g}" if how.mode == "arithmetic" else "in a geometric mean (used at every T)"
    raise ConfigError(f"{where} is an arithmetic ensemble made at T = {made:g}, so it combines exactly only "
                      f"arithmetically at T = {made:g}, not {at}; combine at --temperature {made:g}, or combine "
                      "the stores it was merged from")
