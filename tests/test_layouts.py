"""Layouts: registry, id widths, encode/decode round trips, sampled draws, validation, densify."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softlabels.errors import ConfigError, CorruptStore, ModelMismatch
from softlabels.store.layouts import (
    LAYOUTS,
    DenseTarget,
    SampledTarget,
    TopKTarget,
    decode_ids,
    encode_ids,
    finite_rows,
    id_dtype,
    make_layout,
    to_numpy,
)
from softlabels.store.layouts.sampled import splitmix64, uniforms

MASK64 = (1 << 64) - 1


def ref_splitmix64(x: int) -> int:
    """The published splitmix64 step on Python ints (mod 2**64)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def teacher_logits(b: int, c: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(b, c, generator=torch.Generator().manual_seed(seed))


def stored(arrays: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: to_numpy(v.cpu()) for k, v in arrays.items()}


def sampled_encode(layout, z: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor | None = None):
    pos = torch.zeros_like(ids) if pos is None else pos
    return stored(layout.encode(z, sample_ids=ids, positions=pos))


# -- registry -------------------------------------------------------------------------------------
def test_registry_names_and_bytes_per_position() -> None:
    assert set(LAYOUTS) == {"dense", "topk", "sampled"}
    assert make_layout("dense", num_classes=1000, logits_dtype="float16").bytes_per_position == 2000
    assert make_layout("topk", num_classes=1000, logits_dtype="float16", k=10).bytes_per_position == 10 * 4 + 4
    # C = 128k: ids take 3 bytes; S = 16 counts take 1 byte
    sampled = make_layout("sampled", num_classes=128_000, logits_dtype="bfloat16", samples=16)
    assert sampled.bytes_per_position == 16 * (3 + 1 + 2) + 4
    assert [LAYOUTS[n].default_loss for n in LAYOUTS] == ["kl", "topk_kl", "sampled_kl"]


def test_registry_refuses_unknown_names_and_bad_parameters() -> None:
    with pytest.raises(ConfigError, match="unknown layout 'sparse'; choose one of dense, topk, sampled"):
        make_layout("sparse", num_classes=10)
    with pytest.raises(ConfigError) as info:
        make_layout("topk", num_classes=0, logits_dtype="int8", k=3)
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError, match="it takes samples, seed"):
        make_layout("sampled", num_classes=10, k=3)
    with pytest.raises(ConfigError, match="samples must be"):
        make_layout("sampled", num_classes=10, samples=0)


# -- ids ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c, dtype, tail", [(2, "uint16", ()), (65_536, "uint16", ()), (65_537, "uint8", (3,)),
                                            (1 << 24, "uint8", (3,)), ((1 << 24) + 1, "uint32", ())])
def test_id_width_is_the_fewest_bytes_that_hold_c(c: int, dtype: str, tail: tuple) -> None:
    assert id_dtype(c) == (np.dtype(dtype), tail)


@settings(max_examples=60, deadline=None)
@given(c=st.sampled_from([5, 65_536, 65_537, 131_072, 1 << 24, (1 << 24) + 7, 1 << 32]), data=st.data())
def test_ids_round_trip(c: int, data) -> None:
    ids = torch.tensor(data.draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=12)) + [c - 1, 0])
    enc = encode_ids(ids.view(2, -1) if len(ids) % 2 == 0 else ids[None], c)
    arr = to_numpy(enc)
    assert arr.dtype == id_dtype(c)[0]
    back = decode_ids(arr)
    assert back.dtype == torch.int64 and torch.equal(back.flatten(), ids)
    if arr.dtype == np.uint8:  # little-endian bytes, readable with plain numpy
        flat = arr.reshape(-1, 3).astype(np.int64)
        np.testing.assert_array_equal(flat[:, 0] | flat[:, 1] << 8 | flat[:, 2] << 16, ids.numpy())


def test_v1_int32_ids_decode() -> None:
    assert torch.equal(decode_ids(np.array([[3, 70_000]], np.int32)), torch.tensor([[3, 70_000]]))


# -- dense and top-k ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dense_round_trip(dtype: str) -> None:
    layout = make_layout("dense", num_classes=7, logits_dtype=dtype)
    z = teacher_logits(5, 7)
    block = stored(layout.encode(z))
    assert layout.validate(block) == []
    target = layout.decode(block)
    assert isinstance(target, DenseTarget)
    torch.testing.assert_close(target.logits.float(), z.to(getattr(torch, dtype)).float())
    expected = torch.log_softmax(target.logits.float(), -1)
    torch.testing.assert_close(target.densify(layout.num_classes), expected)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("c", [9, 70_000])
def test_topk_encode_matches_torch_and_decodes(dtype: str, c: int) -> None:
    layout = make_layout("topk", num_classes=c, logits_dtype=dtype, k=4)
    z = teacher_logits(6, c, seed=1)
    block = stored(layout.encode(z))
    assert layout.validate(block) == []
    values, idx = torch.topk(z, 4, dim=1)
    target = layout.decode(block)
    assert isinstance(target, TopKTarget)
    assert torch.equal(target.ids, idx)
    torch.testing.assert_close(target.values.float(), values.to(getattr(torch, dtype)).float())
    assert torch.equal(torch.from_numpy(block["logsumexp"]), torch.logsumexp(z, 1))  # the legacy array, as before
    np.testing.assert_allclose(target.logsumexp.numpy(), np.log(np.exp(z.double().numpy()).sum(1)), rtol=1e-6)


def test_topk_logsumexp_of_half_logits_is_float32_and_exact() -> None:
    z = teacher_logits(3, 50_000, seed=2).half()
    block = stored(make_layout("topk", num_classes=50_000, logits_dtype="float16", k=2).encode(z))
    assert block["logsumexp"].dtype == np.float32
    np.testing.assert_allclose(block["logsumexp"], torch.logsumexp(z.double(), 1).numpy(), rtol=1e-6)


def test_topk_densify_spreads_the_tail_like_the_reader() -> None:
    layout = make_layout("topk", num_classes=8, k=3)
    target = layout.decode(stored(layout.encode(teacher_logits(4, 8, seed=3))))
    dense = target.densify(layout.num_classes)
    logp_k = target.values.float() - target.logsumexp[:, None]  # the stored classes, exact
    spread = torch.log((1 - logp_k.exp().sum(-1)) / (8 - 3))  # the tail shared evenly by the other 5
    expected = spread[:, None].expand(4, 8).scatter(1, target.ids, logp_k)
    torch.testing.assert_close(dense, expected)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(4))
    full = make_layout("topk", num_classes=8, k=8)
    z = teacher_logits(4, 8, seed=3)
    full_target = full.decode(stored(full.encode(z)))
    torch.testing.assert_close(full_target.densify(full.num_classes), torch.log_softmax(z, -1))


# -- sampled --------------------------------------------------------------------------------------
def test_splitmix64_matches_the_reference() -> None:
    xs = [0, 1, 2, 12345, (1 << 63) - 1, 1 << 63, MASK64]
    got = splitmix64(torch.tensor([signed(x) for x in xs], dtype=torch.int64))
    assert [g & MASK64 for g in got.tolist()] == [ref_splitmix64(x) for x in xs]


def test_uniforms_depend_only_on_seed_sample_position_and_draw() -> None:
    u = uniforms(7, torch.tensor([3, 9, 3]), torch.tensor([0, 0, 1]), 5)
    again = uniforms(7, torch.tensor([3]), torch.tensor([0]), 8)
    assert torch.equal(u[0], again[0, :5])
    assert not torch.equal(u[0], u[2]) and not torch.equal(u[0], uniforms(8, torch.tensor([3]), torch.tensor([0]), 5)[0])
    assert ((u >= 0) & (u < 1)).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampled_rows_are_independent_of_batch_composition(dtype: str) -> None:
    layout = make_layout("sampled", num_classes=300, logits_dtype=dtype, samples=24, seed=5)
    z = teacher_logits(10, 300, seed=4)
    ids = torch.arange(100, 110)
    whole = sampled_encode(layout, z, ids)
    perm = torch.tensor([7, 2, 9, 0, 5, 1, 8, 3, 6, 4])
    parts = [sampled_encode(layout, z[perm[a:b]], ids[perm[a:b]]) for a, b in ((0, 3), (3, 4), (4, 10))]
    for key, arr in whole.items():
        joined = np.concatenate([p[key] for p in parts])
        np.testing.assert_array_equal(joined, arr[perm.numpy()])
    assert layout.validate(whole) == []


def test_sampled_content_is_unique_ids_counts_and_their_logits() -> None:
    c, s = 50, 40
    layout = make_layout("sampled", num_classes=c, samples=s, seed=1)
    z = teacher_logits(64, c, seed=6, scale=2.0)
    z[0] = -1e4
    z[0, 17] = 5.0  # a one-hot teacher: every draw is 17
    target = layout.decode(sampled_encode(layout, z, torch.arange(64)))
    assert isinstance(target, SampledTarget)
    assert target.ids[0, 0] == 17 and target.counts[0, 0] == s and (target.counts[0, 1:] == 0).all()
    assert (target.counts.sum(-1) == s).all() and (target.counts.diff(dim=-1) <= 0).all()
    valid = target.counts > 0
    for r in range(64):  # unique ids, logits are the teacher's own, padding is 0
        assert len(set(target.ids[r][valid[r]].tolist())) == int(valid[r].sum())
    assert torch.equal(target.logits[valid], z.gather(1, target.ids)[valid])
    assert (target.ids[~valid] == 0).all() and (target.logits[~valid] == 0).all()
    torch.testing.assert_close(target.logsumexp, torch.logsumexp(z, -1))
    torch.testing.assert_close(target.densify(layout.num_classes).exp().sum(-1), torch.ones(64))


def test_sampled_draws_follow_the_teacher_distribution() -> None:
    c, s, n = 6, 64, 400
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0, -30.0]]).expand(n, c)
    layout = make_layout("sampled", num_classes=c, samples=s, seed=3)
    target = layout.decode(sampled_encode(layout, z, torch.arange(n)))
    freq = torch.zeros(c, dtype=torch.float64).index_add_(0, target.ids.flatten(), target.counts.flatten().double())
    p = torch.softmax(z[0].double(), -1)
    se = (p * (1 - p) / (n * s)).sqrt()
    assert ((freq / (n * s) - p).abs() <= 4 * se + 1e-12).all()
    assert freq[5] == 0  # p ~ 1e-14: never drawn


def test_sampled_needs_ids_and_positions() -> None:
    layout = make_layout("sampled", num_classes=5, samples=3)
    with pytest.raises(ConfigError, match="needs sample_ids"):
        layout.encode(teacher_logits(2, 5))


# -- validation, finite check ---------------------------------------------------------------------
def test_validation_finds_bad_ids_counts_and_dtypes() -> None:
    layout = make_layout("sampled", num_classes=10, samples=4)
    block = sampled_encode(layout, teacher_logits(3, 10), torch.arange(3))
    bad = {**block, "sampled_ids": block["sampled_ids"].copy()}
    bad["sampled_ids"][1, 0] = 12
    assert any("class id 12" in p for p in layout.validate(bad))
    bad_counts = {**block, "sampled_counts": block["sampled_counts"].copy()}
    bad_counts["sampled_counts"][2, 0] += 1
    assert any("do not sum" in p for p in layout.validate(bad_counts))
    with pytest.raises(CorruptStore, match="stored sampled arrays are invalid: logsumexp has dtype float64"):
        layout.check({**block, "logsumexp": block["logsumexp"].astype(np.float64)})
    topk = make_layout("topk", num_classes=10, k=2)
    tblock = stored(topk.encode(teacher_logits(3, 10)))
    tblock["topk_indices"][0, 1] = 10
    assert topk.validate(tblock) == ["topk_indices holds class id 10 but there are 10 classes"]


def test_encode_refuses_the_wrong_class_count() -> None:
    with pytest.raises(ModelMismatch, match=r"teacher logits have shape \(2, 6\), the topk layout expects \[batch, 5\]"):
        make_layout("topk", num_classes=5, k=2).encode(teacher_logits(2, 6))


def test_finite_rows_on_every_16_bit_pattern() -> None:
    """Every float16 and bfloat16 bit pattern, alone in a row and beside a finite value, against np.isfinite."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    half = bits.view(np.float16)
    want = np.isfinite(half.astype(np.float32))
    assert (finite_rows({"logits": half[:, None]}) == want).all()
    assert (finite_rows({"logits": np.stack([half, np.ones_like(half)], 1)}) == want).all()
    want = np.isfinite((bits.astype(np.uint32) << 16).view(np.float32))
    assert (finite_rows({"logits": bits[:, None]}) == want).all()  # uint16 logits: bfloat16 bits
    assert (finite_rows({"topk_values": np.stack([np.full_like(bits, 0x3F80), bits], 1)}) == want).all()
    assert finite_rows({"logits": np.empty((3, 0), np.float16)}).all()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_finite_rows_checks_values_not_ids(dtype: str) -> None:
    layout = make_layout("topk", num_classes=70_000 if dtype == "bfloat16" else 50, logits_dtype=dtype, k=3)
    z = teacher_logits(4, layout.num_classes)
    z[1, 0] = float("nan")
    z[3, :] = float("-inf")  # logsumexp -inf, values -inf
    block = stored(layout.encode(z))
    assert layout.nonfinite_rows(block).tolist() == [1, 3]
    ids_only = {"topk_indices": np.full((2, 3), 0xFFFF, np.uint16)}
    assert finite_rows(ids_only).all()


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["dense", "topk", "sampled"]), c=st.sampled_from([1, 3, 17, 70_000]),
       dtype=st.sampled_from(["float32", "float16", "bfloat16"]), b=st.integers(0, 5), data=st.data())
def test_every_layout_round_trips(name: str, c: int, dtype: str, b: int, data) -> None:
    width = data.draw(st.integers(1, min(c, 6)))
    params = {"dense": {}, "topk": {"k": width}, "sampled": {"samples": width, "seed": data.draw(st.integers(0, 99))}}
    layout = make_layout(name, num_classes=c, logits_dtype=dtype, **params[name])
    z = teacher_logits(b, c, seed=data.draw(st.integers(0, 999)))
    ids = torch.arange(b) * 7
    block = stored(layout.encode(z, sample_ids=ids, positions=ids % 3))
    assert {k: (a.dtype, a.shape[1:]) for k, a in block.items()} == \
        {k: (s.dtype, s.shape) for k, s in layout.arrays().items()}
    assert layout.validate(block) == [] and len(layout.nonfinite_rows(block)) == 0
    assert sum(a[:1].nbytes for a in block.values()) == (layout.bytes_per_position if b else 0)
    target = layout.decode(block)
    rounded = z.to(layout.store_dtype)
    if name == "dense":
        assert torch.equal(target.logits, rounded)
    elif name == "topk":
        values, idx = torch.topk(z, width, dim=1)
        assert torch.equal(target.ids, idx) and torch.equal(target.values, values.to(layout.store_dtype))
    else:
        valid = target.counts > 0
        assert (target.counts.sum(-1) == width).all()
        assert torch.equal(target.logits[valid], rounded.gather(1, target.ids)[valid])
    if b:  # stored half-precision values and a float32 logsumexp of the raw logits differ by rounding
        tol = 1e-5 if dtype == "float32" else 3e-2
        mass = target.densify(layout.num_classes).exp().sum(-1)
        torch.testing.assert_close(mass, torch.ones(b), rtol=0, atol=tol)
