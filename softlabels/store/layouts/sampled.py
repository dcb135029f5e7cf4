"""The ``sampled`` layout: S draws from the teacher's distribution at a draw temperature Td.

docs/LAYOUTS.md describes its arrays, its estimator (Anshumann et al., ACL 2025; exact at Td
only) and its counter-based draws: the same bytes for any batch, rank or resume on one device type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from softlabels._runtime.options import is_number
from softlabels.errors import ConfigError, NonFiniteOutputs
from softlabels.store import format as fmt
from softlabels.store.temperatures import TAIL_T_RANGE
from softlabels.store.layouts._base import (
    Layout,
    _is_int,
    decode_ids,
    encode_ids,
    id_dtype,
    row_chunks,
    unpack_ids,
)
from softlabels.store.layouts.targets import SampledTarget
from softlabels.store.layouts.topk import tail_mass

__all__ = ["Sampled", "splitmix64", "uniforms", "unique_counts"]

SAMPLED_IDS = "sampled_ids"
SAMPLED_COUNTS = "sampled_counts"
SAMPLED_LOGITS = "sampled_logits"
LOGSUMEXP = "logsumexp"


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GAMMA = _i64(0x9E3779B97F4A7C15)
_MUL1 = _i64(0xBF58476D1CE4E5B9)
_MUL2 = _i64(0x94D049BB133111EB)


def _shr(x: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """The splitmix64 finaliser of ``x + gamma`` on int64 tensors (wrapping arithmetic, any device)."""
    z = x + _GAMMA
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def uniforms(seed: int, sample_ids: Tensor, positions: Tensor, draws: int) -> Tensor:
    """float64 [B, draws] in [0, 1): draw d of row r hashes (seed, sample_ids[r], positions[r], d)."""
    key = splitmix64(splitmix64(splitmix64(torch.full_like(sample_ids, seed)) ^ sample_ids.long()) ^ positions.long())
    d = torch.arange(draws, device=key.device, dtype=torch.int64)
    bits = splitmix64(key.unsqueeze(-1) ^ splitmix64(d))
    return _shr(bits, 11).double() * 2.0**-53  # the top 53 bits, as numpy's and torch's generators do


def _count_dtype(samples: int) -> np.dtype:
    return np.dtype("uint8") if samples <= 0xFF else np.dtype("uint16") if samples <= 0xFFFF else np.dtype("uint32")


@dataclass(frozen=True, kw_only=True)
class Sampled(Layout):
    """``sampled_ids`` [S] (ids), ``sampled_counts`` [S] (uint8 for S <= 255), ``sampled_logits`` [S], ``logsumexp`` []
    (= logsumexp(z / Td)); with ``logits=False`` only ``sampled_ids`` [S], every draw sorted ascending."""

    samples: int
    seed: int = 0
    temperature: float = 1.0
    logits: bool = True

    name = "sampled"
    default_loss = "sampled_kl"
    temperature_kind = "sampled"

    def temperatures(self) -> tuple[float, ...]:
        """The one T a sampled store answers: its draw temperature."""
        return (float(self.temperature),)

    def problems(self) -> list[str]:
        p = super().problems()
        if not _is_int(self.samples) or not 1 <= self.samples <= 1 << 16:
            p.append(f"samples must be an integer in 1..65536, got {self.samples!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 1 << 63:
            p.append(f"seed must be an integer in 0..2**63-1, got {self.seed!r}")
        t, (low, high) = self.temperature, TAIL_T_RANGE
        if not is_number(t) or not low <= t <= high:
            p.append(f"the draw temperature must be between {low:g} and {high:g}, got {t!r}; pass e.g. "
                     "--sample-temperature 1")
        if not isinstance(self.logits, bool):
            p.append(f"logits must be true or false, got {self.logits!r}")
        return p

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": int(self.samples), "seed": int(self.seed)}
        if self.temperature != 1:  # absent: draws at T = 1 (every store written before Td was recorded)
            out["temperature"] = float(self.temperature)
        if not self.logits:  # absent: with logits
            out["logits"] = False
        return out

    def arrays(self) -> dict[str, fmt.ArraySpec]:
        s = self.samples
        ids, tail = id_dtype(self.num_classes)
        if not self.logits:
            return {SAMPLED_IDS: fmt.ArraySpec((s, *tail), ids)}
        return {
            SAMPLED_IDS: fmt.ArraySpec((s, *tail), ids),
            SAMPLED_COUNTS: fmt.ArraySpec((s,), _count_dtype(s)),
            SAMPLED_LOGITS: fmt.ArraySpec((s,), fmt.LOGITS_DTYPES[self.logits_dtype]),
            LOGSUMEXP: fmt.ArraySpec((), np.dtype("float32")),
        }

    def validate(self, block: Mapping[str, np.ndarray]) -> list[str]:
        p = super().validate(block)
        if p:
            return p
        if not self.logits:
            self._check_ids(p, SAMPLED_IDS, block)
            ids = decode_ids(block[SAMPLED_IDS]).numpy()
            if ids.shape[-1] > 1 and (np.diff(ids, axis=-1) < 0).any():
                p.append("sampled_ids of an ids-only store are not in ascending order within a row")
            return p
        # every unit read is checked: the common case in a few passes over blocks of rows small enough to
        # stay in cache (and below malloc's mmap threshold: a unit's worth of temporaries page-faults each time)
        rows = len(block[SAMPLED_COUNTS])
        if all(_valid_fast(self, {k: v[a:a + _CHECK_ROWS] for k, v in block.items()})
               for a in range(0, rows, _CHECK_ROWS)) and rows:
            return p
        return self._problems(block)

    def _problems(self, block: Mapping[str, np.ndarray]) -> list[str]:
        """Every problem of a block with logits (what :meth:`validate` reports), one check at a time."""
        p: list[str] = []
        counts = block[SAMPLED_COUNTS]
        sums = counts.sum(-1, dtype=np.int64)
        if len(sums) and (sums != self.samples).any():
            p.append(f"sampled_counts of rows {np.flatnonzero(sums != self.samples)[:5].tolist()} do not sum to "
                     f"samples={self.samples}")
        if counts.shape[-1] > 1 and (counts[:, 1:] > counts[:, :-1]).any():
            p.append("sampled_counts are not in descending order")
        self._check_ids(p, SAMPLED_IDS, block, counts > 0)
        if p or not len(counts):
            return p
        ids = decode_ids(block[SAMPLED_IDS]).numpy()
        logits = self._decode_logits(block[SAMPLED_LOGITS]).double().numpy()
        pad = counts == 0
        if (ids[pad] != 0).any() or (logits[pad] != 0).any():
            p.append("padding slots (count 0) must hold id 0 and logit 0")
        keyed = np.where(pad, -1 - np.arange(counts.shape[-1]), ids)  # padding never repeats
        if counts.shape[-1] > 1 and (np.diff(np.sort(keyed, -1), axis=-1) == 0).any():
            p.append("sampled_ids name a class twice within a row")
        lse = block[LOGSUMEXP].astype(np.float64)
        if not np.isfinite(lse).all():
            p.append("logsumexp holds NaN or inf")
        elif np.isfinite(logits).all():
            top = np.where(pad, -np.inf, logits).max(-1) / self.temperature
            eps = float(torch.finfo(self.store_dtype).eps)
            if (lse < top - (np.abs(top) * eps + 1e-4)).any():
                p.append("logsumexp is below a stored logit / Td (the logsumexp covers every class)")
        return p

    def encode(self, logits: Tensor, *, sample_ids: Tensor | None = None, positions: Tensor | None = None
               ) -> dict[str, Tensor]:
        self._check_logits(logits)
        if sample_ids is None or positions is None or sample_ids.shape != (len(logits),) \
                or positions.shape != (len(logits),):
            raise ConfigError("the sampled layout needs sample_ids [B] and positions [B] (int64) to seed its "
                              "draws; pass both")
        raw = logits
        if self.temperature != 1:  # draws from softmax(z / Td): scaled in float32, recorded as Td
            logits = logits.float() / self.temperature
        n = len(logits)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        u = uniforms(self.seed, sample_ids.to(logits.device), positions.to(logits.device), self.samples)
        draws = torch.empty(u.shape, dtype=torch.int64, device=logits.device)
        # inverse-CDF sampling in float64, a block of rows at a time: on a CPU small enough that the
        # chain (logsumexp, float64 copy, exp, cumsum, search) stays in cache, 2.5x faster than 32 MiB
        # blocks; every op is row-wise, so the bits do not depend on the block (tests/test_sampled_pinned.py)
        budget = _DRAW_BLOCK.get(logits.device.type, _DRAW_BLOCK["cuda"])
        blocks = row_chunks(n, logits.shape[-1], budget)
        # one float64 workspace for every block (never the caller's tensor): a fresh copy per block cost
        # as much as the exp; copy_ converts exactly, as .to(float64) does, so the bits are the same
        work = torch.empty((blocks[0].stop - blocks[0].start, logits.shape[-1]), dtype=torch.float64,
                           device=logits.device)
        for rows in blocks:
            block, lse_rows = logits[rows], lse[rows]
            torch.logsumexp(block.float(), -1, out=lse_rows)  # float32, as top-k's tails
            cdf = work[:len(block)].copy_(block).sub_(lse_rows.double()[:, None]).exp_().cumsum_(-1)
            # scale by the row total so rounding of the sum never pushes a draw past the last class
            found = draws[rows]
            torch.searchsorted(cdf, u[rows] * cdf[:, -1:], right=True, out=found)
            found.clamp_(max=self.num_classes - 1)
        if not bool(torch.isfinite(lse).all()):  # NaN/inf logits: no distribution to draw from, nothing to store
            bad = sample_ids[(~torch.isfinite(lse)).to(sample_ids.device)].unique().tolist()
            raise NonFiniteOutputs(
                f"the teacher produced non-finite logits (NaN/inf) for sample ids {fmt.chunk_list(bad, 5)}; nothing "
                "was marked complete; a sampled store cannot hold them (its draws need a finite distribution): fix "
                "the teacher or its inputs, or use --layout dense or topk with --on-nonfinite record")
        if not self.logits:  # ids only: every draw, sorted (repeats are the counts)
            return {SAMPLED_IDS: encode_ids(draws.sort(-1).values, self.num_classes)}
        ids, counts = unique_counts(draws)
        picked = raw.gather(1, ids).masked_fill(counts == 0, 0)
        return {SAMPLED_IDS: encode_ids(ids, self.num_classes),
                SAMPLED_COUNTS: counts.to(_TORCH_COUNTS[_count_dtype(self.samples)]),
                SAMPLED_LOGITS: picked.to(self.store_dtype), LOGSUMEXP: lse}

    def decode(self, block: Mapping[str, np.ndarray]) -> SampledTarget:
        if not self.logits:
            ids, counts = unique_counts(decode_ids(block[SAMPLED_IDS]))
            return SampledTarget(ids, counts.int(), None, None, float(self.temperature), self.num_classes)
        return SampledTarget(decode_ids(block[SAMPLED_IDS]), torch.from_numpy(block[SAMPLED_COUNTS].astype(np.int32)),
                             self._decode_logits(block[SAMPLED_LOGITS]), torch.from_numpy(block[LOGSUMEXP]),
                             float(self.temperature), self.num_classes)

    def inspect(self, target: SampledTarget) -> dict[str, Tensor]:
        """Unique ids, the teacher's exact mass on them at Td (not for ids only: unknown), and the entropy of the
        empirical distribution."""
        freq = target.counts.float() / target.counts.sum(-1, keepdim=True).clamp_min(1)
        out = {"unique_ids": target.valid.sum(-1).float(),
               "empirical_entropy": -(freq * freq.log()).nan_to_num().sum(-1)}
        if target.has_logits:
            out["tail_mass"] = tail_mass(target.log_probs())
        return out


def _valid_fast(layout: Sampled, block: Mapping[str, np.ndarray]) -> bool:
    """True only if :meth:`Sampled._problems` finds nothing in ``block`` (a sampled block with logits);
    False sends it there, which names the problems (or finds none: a store this cannot clear quickly).

    The same checks on slot-major copies ([S, R]: each slot's column contiguous), so every per-row
    test is an elementwise pass over R values in the stored dtypes (16-bit logits as their bits:
    numpy converts float16 at ~2 ns a value); ids < C is checked in every slot (padding must hold 0
    anyway), and padding slot j is keyed C + j for the repeat check, which no id can equal.
    """
    ids, counts = block[SAMPLED_IDS], block[SAMPLED_COUNTS]
    rows, slots = counts.shape
    if not rows:
        return False
    c = np.ascontiguousarray(counts.T)
    wide = {1: np.uint16, 2: np.uint32}.get(c.itemsize, np.uint64)  # S slots of counts never overflow it
    if (np.add.reduce(c, axis=0, dtype=wide) != layout.samples).any() or (c[1:] > c[:-1]).any():
        return False
    i = np.ascontiguousarray(unpack_ids(ids).T)
    if int(i.max()) >= layout.num_classes:
        return False
    pad = c == 0
    if ((i != 0) & pad).any():
        return False
    top_key = layout.num_classes + slots
    key = np.uint16 if top_key <= 0xFFFF else np.uint32 if top_key <= 0xFFFFFFFF else np.uint64
    keys = i.astype(key)
    np.copyto(keys, (layout.num_classes + np.arange(slots, dtype=key))[:, None], where=pad)
    if any((keys[:j] == keys[j]).any() for j in range(1, slots)):
        return False
    top = _top_logit(np.ascontiguousarray(block[SAMPLED_LOGITS].T), pad, layout.logits_dtype)
    lse = block[LOGSUMEXP]
    if top is None or not np.isfinite(lse).all():
        return False
    top = top / layout.temperature
    eps = float(torch.finfo(layout.store_dtype).eps)
    return not (lse.astype(np.float64) < top - (np.abs(top) * eps + 1e-4)).any()


def _top_logit(logits: np.ndarray, pad: np.ndarray, logits_dtype: str) -> np.ndarray | None:
    """float64 [R]: each row's largest stored logit over its real slots (``logits``, ``pad``: [S, R]); None
    if a padding slot holds a nonzero logit or any logit is NaN or inf."""
    if logits_dtype == "float32":
        if ((logits != 0) & pad).any() or not np.isfinite(logits).all():
            return None
        return np.where(pad, np.float32(-np.inf), logits).max(0).astype(np.float64)  # may view the block
    bits = logits.view(np.uint16)
    inf = 0x7C00 if logits_dtype == "float16" else 0x7F80  # exponent all ones: inf or NaN
    if (((bits & 0x7FFF) != 0) & pad).any() or ((bits & inf) == inf).any():
        return None
    s = bits.view(np.int16)
    order = s ^ ((s >> 15) & np.int16(0x7FFF))  # ordered like the values (finite ones; -0 just below +0)
    np.copyto(order, np.int16(-0x8000), where=pad)
    m = order.max(0)
    m ^= (m >> 15) & np.int16(0x7FFF)  # the same map undoes itself: the top logit's bits
    if logits_dtype == "float16":
        return m.view(np.float16).astype(np.float64)
    return (m.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


_TORCH_COUNTS = {np.dtype("uint8"): torch.uint8, np.dtype("uint16"): torch.uint16, np.dtype("uint32"): torch.uint32}


def unique_counts(draws: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per row: unique values by count descending (ties: smaller id first), padded with id 0, count 0.

    ``weights`` (default 1) is what each draw adds to its id's count. Vectorised over rows:
    sort, mark run starts, scatter-add run lengths.
    """
    d, perm = draws.sort(-1)
    w = torch.ones_like(d) if weights is None else weights.gather(1, perm)
    start = torch.ones_like(d, dtype=torch.bool)
    start[:, 1:] = d[:, 1:] != d[:, :-1]
    run = start.long().cumsum(-1) - 1  # run index of each draw
    counts = torch.zeros_like(w).scatter_add_(1, run, w)
    ids = torch.zeros_like(d).scatter_(1, run, d)  # every draw of a run has the same id
    counts, order = counts.sort(dim=-1, descending=True, stable=True)  # runs are in id order: ties keep it
    ids = ids.gather(1, order).masked_fill_(counts == 0, 0)
    return ids, counts


_CHECK_ROWS = 1 << 14
"""Rows per pass of the fast checks of :meth:`Sampled.validate`."""

_DRAW_BLOCK = {"cpu": 1 << 17, "cuda": 1 << 22}
"""Elements of [rows, C] per block of the draw kernel, by device type (others: the cuda figure)."""
