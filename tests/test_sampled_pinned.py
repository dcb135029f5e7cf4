"""The sampled layout's stored bytes pinned bit for bit, so a faster draw kernel must draw the same ids.

Fixed teacher logits (a seeded torch generator, float32 and float16), encoded by the layout; the
digest covers every array it returns (ids, counts, logits, logsumexp). Recorded with the
float64 inverse-CDF kernel; a kernel that changes one draw fails here, and must instead record
its sampler in the store (docs/FORMAT.md) and prove it draws from the same distribution.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from softlabels.store.layouts import make_layout, to_numpy

# name -> (classes, samples, seed, logits dtype, rows, scale): sha256 of the encoded arrays, first 16 hex digits
CASES = {
    "v4096-s12-fp32": ((4096, 12, 0, torch.float32, 96, 4.0), "9638ad2530b0c7ce"),
    "v4096-s12-fp16": ((4096, 12, 3, torch.float16, 96, 4.0), "61ae17b8a35810c2"),
    "v100-s300": ((100, 300, 5, torch.float32, 64, 1.0), "cd6b56d699370dc8"),
    "v70000-s8-packed-ids": ((70_000, 8, 11, torch.float32, 6, 8.0), "3caaff9eaba546fc"),
    # odd vocabularies over several blocks of the draw kernel (their tails land mid-vector)
    "v4099-s12-fp32": ((4099, 12, 2, torch.float32, 100, 3.0), "7a9a3fab031e6214"),
    "v50257-s12-bf16": ((50_257, 12, 4, torch.bfloat16, 12, 6.0), "6fbb634527044dad"),
}


def digest(classes: int, samples: int, seed: int, dtype: torch.dtype, rows: int, scale: float) -> str:
    g = torch.Generator().manual_seed(classes + samples)
    logits = (torch.randn(rows, classes, generator=g) * scale).to(dtype)
    layout = make_layout("sampled", num_classes=classes, logits_dtype="float16", samples=samples, seed=seed)
    sample_ids = torch.arange(rows, dtype=torch.int64) // 4 + 1000
    positions = torch.arange(rows, dtype=torch.int64) % 4
    with torch.inference_mode():
        arrays = layout.encode(logits, sample_ids=sample_ids, positions=positions)
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(to_numpy(arrays[name]))
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(CASES))
def test_sampled_bytes_pinned(name: str) -> None:
    args, want = CASES[name]
    torch.set_num_threads(1)
    assert digest(*args) == want, f"{name}: the sampled layout now stores other bytes"


def _reference_problems(layout, block) -> list[str]:
    """The checks of ``Sampled.validate`` written plainly, in int64."""
    counts, ids = block["sampled_counts"].astype(np.int64), block["sampled_ids"].astype(np.int64)
    p = []
    sums = counts.sum(-1)
    if (sums != layout.samples).any():
        p.append(f"sampled_counts of rows {np.flatnonzero(sums != layout.samples)[:5].tolist()} do not sum to "
                 f"samples={layout.samples}")
    if (np.diff(counts, axis=-1) > 0).any():
        p.append("sampled_counts are not in descending order")
    used = ids[counts > 0]
    if not p and used.size and used.max() >= layout.num_classes:
        p.append(f"sampled_ids holds class id {used.max()} but there are {layout.num_classes} classes")
    return p


@pytest.mark.parametrize("corrupt", ["none", "sum", "order", "id", "unused-id"])
def test_sampled_validate_matches_plain_checks(corrupt: str) -> None:
    layout = make_layout("sampled", num_classes=50, logits_dtype="float16", samples=12, seed=0)
    logits = torch.randn(40, 50, generator=torch.Generator().manual_seed(1))
    block = {k: to_numpy(v).copy() for k, v in layout.encode(logits, sample_ids=torch.arange(40),
                                                              positions=torch.zeros(40, dtype=torch.int64)).items()}
    row = int(np.flatnonzero(block["sampled_counts"][:, -1] == 0)[0])  # a row with an unused slot
    if corrupt == "sum":
        block["sampled_counts"][row, 0] += 1
    elif corrupt == "order":  # ascending: same sum, an unused slot first
        block["sampled_counts"][row] = np.sort(block["sampled_counts"][row])
    elif corrupt == "id":
        block["sampled_ids"][row, 0] = 50
    elif corrupt == "unused-id":  # a slot with count 0 is padding, which holds id 0 (docs/FORMAT.md)
        block["sampled_ids"][row, -1] = 7
    if corrupt == "unused-id":
        assert layout.validate(block) == ["padding slots (count 0) must hold id 0 and logit 0"]
        return
    assert layout.validate(block) == _reference_problems(layout, block)
    assert (layout.validate(block) == []) == (corrupt == "none")
