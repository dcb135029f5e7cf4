"""Write-unit geometry of format v2's position kinds: the invariants the writer relies on.

Each property is checked against a plain recomputation: every sample's positions lie
inside its own unit's range, units start on a chunk (or shard) boundary, ranges never
overlap, and no chunk or shard of any array is touched by two bookkeeping groups (so
two writers never share a file).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softlabels.store.positions import (
    POSITION_KINDS,
    SamplePositions,
    TokenPositions,
    UnitGeometry,
    ViewPositions,
    group_units_for,
)
from softlabels.store.positions.views import choose_views


@st.composite
def geometries(draw, max_samples: int = 60) -> UnitGeometry:
    n = draw(st.integers(0, max_samples))
    return UnitGeometry(num_samples=n, chunk_samples=draw(st.integers(1, 9)),
                        shard_chunks=draw(st.integers(1, 3)), group_units=draw(st.integers(1, 4)))


def _chunks(lo: int, hi: int, size: int) -> set[int]:
    return set(range(lo // size, -(-hi // size))) if hi > lo else set()


@settings(max_examples=150, deadline=None)
@given(geometries(), st.data())
def test_token_units_are_aligned_disjoint_and_hold_their_samples(g, data):
    lengths = np.array(data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 7, 40, 300]), min_size=g.num_samples,
                                          max_size=g.num_samples)), dtype=np.int64)
    chunk = data.draw(st.integers(1, 16))
    pos = TokenPositions(g, lengths, chunk_positions=chunk)
    assert pos.num_positions == lengths.sum()
    assert pos.offsets[0] == 0 and pos.offsets[-1] == pos.axis_length
    assert np.all(np.diff(pos.offsets) >= lengths)  # padding only ever adds
    owner_of_shard: dict[int, int] = {}
    prev_stop = 0
    for u in range(g.num_units):
        s0, s1 = g.unit_samples_range(u)
        a0, a1 = pos.unit_axis_range(u)
        w0, w1 = pos.unit_written_range(u)
        assert a0 % pos.alignment == 0 and a0 >= prev_stop  # aligned, in order, disjoint
        assert w0 == a0 and w1 >= a1 and (w1 - w0) % chunk == 0 and w1 - a1 < chunk
        prev_stop = w1
        assert a1 - a0 == lengths[s0:s1].sum()
        # every sample of the unit lies inside it, back to back
        expect = a0
        for i in range(s0, s1):
            assert pos.offsets[i] == expect and pos.lengths[i] == lengths[i]
            expect += lengths[i]
        group = u // g.group_units
        for shard in _chunks(w0, w1, pos.alignment):
            assert owner_of_shard.setdefault(shard, group) == group
    assert prev_stop <= pos.axis_length


@settings(max_examples=100, deadline=None)
@given(geometries())
def test_sample_and_view_units_share_no_chunk_across_groups(g):
    for pos in (SamplePositions(g), ViewPositions(g, num_views=3, param_names=("a", "b"))):
        owner: dict[int, int] = {}
        for u in range(g.num_units):
            a0, a1 = pos.unit_written_range(u)
            assert (a0, a1) == g.unit_samples_range(u)
            for shard in _chunks(a0, a1, g.chunk_samples * g.shard_chunks):
                assert owner.setdefault(shard, u // g.group_units) == u // g.group_units
        covered = sorted(i for u in range(g.num_units) for i in range(*pos.unit_axis_range(u)))
        assert covered == list(range(g.num_samples))


@settings(max_examples=100, deadline=None)
@given(geometries(), st.integers(1, 5))
def test_ranks_split_whole_groups_exactly_once(g, world):
    seen = [grp for r in range(world) for grp in g.groups_of_rank(r, world)]
    assert seen == list(range(g.num_groups))
    sizes = [len(g.groups_of_rank(r, world)) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1


def test_axes_and_attributes():
    g = UnitGeometry(num_samples=10, chunk_samples=4)
    assert SamplePositions(g).axis_length == 10
    v = ViewPositions(g, num_views=5, param_names=("top", "left", "flip"), augment="crop(8,padding=1)+flip", seed=3)
    assert v.axis_length == 10 and v.num_positions == 50
    assert ViewPositions.from_attrs(g, v.to_attrs()) == v
    t = TokenPositions(g, np.array([3, 0, 5, 1, 9, 2, 2, 2, 0, 1]), chunk_positions=4)
    # units: samples 0-3 (9 tokens -> 12), 4-7 (15 -> 16), 8-9 (1 -> 4)
    assert list(t.unit_starts) == [0, 12, 28, 32]
    assert list(t.offsets) == [0, 3, 3, 8, 12, 21, 23, 25, 28, 28, 32]
    assert t.axis_length == 32 and t.axis_length - t.num_positions == 32 - 25
    assert set(POSITION_KINDS) == {"sample", "views", "tokens"}


def test_sharded_tokens_align_to_shards_and_empty_stores():
    g = UnitGeometry(num_samples=3, chunk_samples=1, shard_chunks=2)
    t = TokenPositions(g, np.array([5, 1, 0]), chunk_positions=4)
    assert t.alignment == 8 and list(t.unit_starts) == [0, 8, 8]
    assert TokenPositions(UnitGeometry(0, 4), np.zeros(0, np.int64), 8).axis_length == 0


def test_group_units_caps_bookkeeping_files():
    assert group_units_for(0) == 1 and group_units_for(1024) == 1 and group_units_for(1025) == 2
    assert np.ceil(100_000 / group_units_for(100_000)) <= 1024


@pytest.mark.parametrize("bad", [dict(lengths=np.array([-1, 2])), dict(lengths=np.array([1.5, 2.0])),
                                 dict(lengths=np.array([1, 2, 3])), dict(chunk_positions=0)])
def test_tokens_refuse_bad_lengths(bad):
    kw = dict(lengths=np.array([1, 2]), chunk_positions=4) | bad
    with pytest.raises(ValueError):
        TokenPositions(UnitGeometry(2, 1), **kw)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**40), st.integers(1, 12), st.integers(0, 3), st.lists(st.integers(0, 10**9), min_size=1,
                                                                               max_size=20, unique=True))
def test_views_cycle_through_every_view_before_repeating(seed, num_views, cycle, ids):
    ids = np.array(ids)
    epochs = range(cycle * num_views, (cycle + 1) * num_views)
    chosen = np.stack([choose_views(seed, ids, e, num_views) for e in epochs], axis=1)  # [B, V]
    assert np.all(np.sort(chosen, axis=1) == np.arange(num_views))
    # independent of batch composition: one sample alone gets the same view
    for e in epochs:
        assert choose_views(seed, ids[-1:], e, num_views)[0] == choose_views(seed, ids, e, num_views)[-1]


def test_views_differ_across_samples_cycles_and_seeds():
    ids = np.arange(2000)
    a, b = choose_views(0, ids, 0, 8), choose_views(0, ids, 8, 8)
    assert 0.05 < np.mean(a == b) < 0.25  # another cycle, another permutation (1/8 agree by chance)
    assert np.bincount(a, minlength=8).min() > 150  # spread over the views
    assert np.mean(choose_views(1, ids, 0, 8) == a) < 0.25


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**40), st.integers(1, 12), st.data(), st.lists(st.integers(0, 10**9), min_size=1, max_size=20,
                                                                      unique=True))
def test_k_views_per_epoch_are_consecutive_entries_of_the_one_view_sequence(seed, num_views, data, ids):
    """per_epoch=k takes entries e·k .. e·k+k-1 of the sequence one view per epoch walks: k = 1 is that
    choice exactly, every view is used before any repeats, and rows do not depend on the batch."""
    ids = np.array(ids)
    k = data.draw(st.integers(1, num_views))
    epochs = -(-num_views // k) + 1
    got = np.stack([choose_views(seed, ids, e, num_views, per_epoch=k) for e in range(epochs)], 1)  # [B, e, k]
    assert got.shape == (len(ids), epochs, k) and got.dtype == np.int64
    want = np.stack([choose_views(seed, ids, e, num_views) for e in range(epochs * k)], 1)
    assert np.array_equal(got.reshape(len(ids), -1), want)
    assert np.all(np.sort(got.reshape(len(ids), -1)[:, :num_views], axis=1) == np.arange(num_views))
    assert np.array_equal(choose_views(seed, ids[-1:], 1, num_views, per_epoch=k)[0],
                          choose_views(seed, ids, 1, num_views, per_epoch=k)[-1])
    if num_views % k == 0:  # whole permutations per cycle: the k views of an epoch are distinct
        assert all(len(set(row)) == k for row in got.reshape(-1, k).tolist())
    with pytest.raises(ValueError):
        choose_views(seed, ids, 0, num_views, per_epoch=num_views + 1)
