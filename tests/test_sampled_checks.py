"""The sampled layout's value checks: the slot-major fast check never clears a block the plain checks refuse.

``Sampled.validate`` first tries a few whole-array passes on the stored dtypes and, when they do
not clear the block, runs the plain one-check-at-a-time code that names the problems. So its
verdicts are the plain code's exactly when the fast check clears only blocks the plain code finds
nothing in: drawn here over id widths (uint16, uint32), logits dtypes, draw temperatures and
single-element mutations of valid blocks (duplicates, padding, counts, NaN, inf, signed zeros, a
logsumexp near the tolerance). Valid blocks must take the fast path (else reads slow down).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softlabels.store.layouts import decode_ids, encode_ids, make_layout, to_numpy
from softlabels.store.layouts.sampled import _valid_fast

CLASSES = [7, 4096, 65_536 - 12, 65_536, 70_000, (1 << 24) + 5]  # uint16 ids (with and without room for keys),
# packed 3-byte ids, uint32 ids


def valid_block(layout, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A valid block made directly (no teacher): distinct ids by count descending, padding 0, lse above the top."""
    arrays = layout.arrays()
    s = layout.samples
    ids = np.zeros((rows, s), np.int64)
    counts = np.zeros((rows, s), arrays["sampled_counts"].dtype)
    logits = torch.zeros(rows, s)
    for r in range(rows):
        draws = rng.integers(0, min(layout.num_classes, 6), s) * max(1, layout.num_classes // 6)
        u, n = np.unique(draws, return_counts=True)
        order = np.lexsort((u, -n))
        ids[r, :len(u)], counts[r, :len(u)] = u[order], n[order]
        logits[r, :len(u)] = torch.from_numpy(rng.normal(0, 4, len(u)))
    stored = to_numpy(logits.to(layout.store_dtype)).copy()
    top = torch.where(torch.from_numpy(counts > 0), logits.to(layout.store_dtype).float(), -torch.inf).amax(-1)
    lse = (top.double() / layout.temperature + torch.from_numpy(rng.uniform(0, 2, rows))).float().numpy()
    return {"sampled_ids": to_numpy(encode_ids(torch.from_numpy(ids), layout.num_classes)).copy(),
            "sampled_counts": counts, "sampled_logits": stored, "logsumexp": lse}


SPECIAL = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-7, -1e-7, 65504.0, -3.5, 3.5]


def mutate(block: dict[str, np.ndarray], layout, data) -> None:
    name = data.draw(st.sampled_from(sorted(block)))
    a = block[name]
    counts = block["sampled_counts"]
    r = data.draw(st.integers(0, len(counts) - 1))
    pads = np.flatnonzero(counts[r] == 0).tolist()
    j = data.draw(st.sampled_from(pads[:1] + pads[-1:] + [0, counts.shape[1] - 1]))  # padding is often the target
    if a.ndim >= 2 and a.shape[1] > 1 and data.draw(st.booleans()):  # swap two slots: sums stay, order does not
        k = data.draw(st.integers(0, a.shape[1] - 1))
        a[r, [j, k]] = a[r, [k, j]]
        return
    if name == "logsumexp":
        cur = float(a[r])
        a[r] = data.draw(st.sampled_from([cur - 1e-4, cur - 1e-3, cur - 10, float("nan"), float("inf"),
                                          float("-inf"), -cur, 0.0]))
        return
    if name == "sampled_logits":
        bits = data.draw(st.booleans())
        if bits:  # any bit pattern
            v = data.draw(st.integers(0, np.iinfo(np.uint32).max if a.itemsize == 4 else 0xFFFF))
            a.view(np.uint32 if a.itemsize == 4 else np.uint16)[r, j] = v
        else:
            value = torch.tensor([data.draw(st.sampled_from(SPECIAL))]).to(layout.store_dtype)
            a[r, j] = to_numpy(value)[0]
        return
    packed = a.ndim == 3  # 3-byte ids
    row = decode_ids(a[r:r + 1]).numpy()[0] if name == "sampled_ids" else a[r].astype(np.int64)
    top = (1 << 24) - 1 if packed else int(np.iinfo(a.dtype).max)
    choices = [0, 1, top, int(row[j]) + 1, int(row[j]) - 1, int(row[(j + 1) % len(row)]), int(row[j - 1])]
    if name == "sampled_ids":
        choices += [layout.num_classes - 1, layout.num_classes, layout.num_classes + j]
    v = data.draw(st.sampled_from([c for c in choices if 0 <= c <= top]))
    a[r, j] = [(v >> 8 * b) & 0xFF for b in range(3)] if packed else v


@settings(max_examples=300, deadline=None)
@given(c=st.sampled_from(CLASSES), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       samples=st.integers(1, 12), td=st.sampled_from([1.0, 0.5, 3.0]), rows=st.integers(1, 9),
       mutations=st.integers(0, 2), seed=st.integers(0, 999), data=st.data())
def test_the_fast_check_clears_only_blocks_the_plain_checks_accept(c, dtype, samples, td, rows, mutations, seed,
                                                                   data) -> None:
    layout = make_layout("sampled", num_classes=c, logits_dtype=dtype, samples=samples, temperature=td)
    block = valid_block(layout, rows, np.random.default_rng(seed))
    assert layout._problems(block) == []
    assert _valid_fast(layout, block), "a valid block must take the fast path"
    for _ in range(mutations):
        mutate(block, layout, data)
    if _valid_fast(layout, {k: v.copy() for k, v in block.items()}):
        assert layout._problems(block) == []
    assert layout.validate(block) == layout._problems(block)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("rows,samples", [(20, 5), (1, 5), (20, 1)])  # one row or one slot: transposes are views
def test_the_fast_check_leaves_the_block_unchanged(dtype: str, rows: int, samples: int) -> None:
    layout = make_layout("sampled", num_classes=300, logits_dtype=dtype, samples=samples)
    block = valid_block(layout, rows, np.random.default_rng(0))
    before = {k: v.copy() for k, v in block.items()}
    assert _valid_fast(layout, block)
    assert all(np.array_equal(before[k], block[k], equal_nan=True) for k in block)


def _first_pad(block: dict[str, np.ndarray]) -> tuple[int, int]:
    r = int(np.flatnonzero(block["sampled_counts"][:, -1] == 0)[0])
    return r, int(np.flatnonzero(block["sampled_counts"][r] == 0)[0])


def _lse_at_tolerance(block, layout, below: bool) -> None:
    counts, lse = block["sampled_counts"], block["logsumexp"]
    logits = layout._decode_logits(block["sampled_logits"]).double().numpy()
    top = np.where(counts == 0, -np.inf, logits).max(-1) / layout.temperature
    edge = top[0] - (abs(top[0]) * float(torch.finfo(layout.store_dtype).eps) + 1e-4)
    lse[0] = np.nextafter(np.float32(edge), np.float32(-np.inf if below else np.inf))


def _set_id(block, at: tuple[int, int], value: int) -> None:
    a = block["sampled_ids"]
    a[at] = [(value >> 8 * b) & 0xFF for b in range(3)] if a.ndim == 3 else value


def _id(block, at: tuple[int, int]) -> int:
    return int(decode_ids(block["sampled_ids"]).numpy()[at])


CASES = {  # name -> (change, the plain checks refuse it)
    "descending-swap": (lambda b, lay: b["sampled_counts"].__setitem__((1, [0, 3]), b["sampled_counts"][1, [3, 0]]),
                        True),
    "pad-id": (lambda b, lay: _set_id(b, _first_pad(b), 5), True),
    "pad-logit": (lambda b, lay: b["sampled_logits"].__setitem__(_first_pad(b), 1), True),
    "pad-logit-minus-zero": (lambda b, lay: b["sampled_logits"].__setitem__(
        _first_pad(b), to_numpy(torch.tensor([-0.0]).to(lay.store_dtype))[0]), False),
    "duplicate-id": (lambda b, lay: _set_id(b, (0, 1), _id(b, (0, 0))), True),
    "id-equal-to-C": (lambda b, lay: _set_id(b, (0, 1), lay.num_classes), True),
    "padding-key-as-id": (lambda b, lay: _set_id(b, (0, 1), lay.num_classes + 6), True),
    "nan-logit": (lambda b, lay: b["sampled_logits"].__setitem__((0, 0), to_numpy(torch.tensor([float("nan")]).to(
        lay.store_dtype))[0]), False),  # no logsumexp test without finite logits (the plain checks' rule)
    "nan-logsumexp": (lambda b, lay: b["logsumexp"].__setitem__(0, np.nan), True),
    "lse-just-below": (lambda b, lay: _lse_at_tolerance(b, lay, below=True), True),
    "lse-just-above": (lambda b, lay: _lse_at_tolerance(b, lay, below=False), False),
}


@pytest.mark.parametrize("classes", [4096, 70_000])  # uint16 and packed 3-byte ids
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_check_refuses_what_the_plain_checks_refuse(case: str, dtype: str, classes: int) -> None:
    layout = make_layout("sampled", num_classes=classes, logits_dtype=dtype, samples=12, temperature=0.5)
    block = valid_block(layout, 6, np.random.default_rng(1))
    change, refused = CASES[case]
    change(block, layout)
    assert (layout._problems(block) != []) == refused
    assert layout.validate(block) == layout._problems(block)
