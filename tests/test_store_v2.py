"""Format v2 round trips: every positions x layout x backend x dtype x sharding, bit-exact.

Units are written in a random order from layout-encoded random logits; each is read back
through softlabels (checksum-verified) and through plain h5py/zarr following
docs/FORMAT.md's version-2 description, and compared with what was written.
"""

from __future__ import annotations

from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softlabels.errors import CorruptStore, IncompleteStore, StoreMismatch
from softlabels.store.layouts import make_layout
from softlabels.store.positions import group_units_for
from softlabels.store.reader import UnitStore
from softlabels.store.schema import StoreMetaV2
from softlabels.store.writer import UnitWriter

LAYOUT_PARAMS = {"dense": {}, "topk": {"k": 3}, "sampled": {"samples": 5, "seed": 7}}


def _meta(positions, layout, n, c, dtype, chunk, shard, lengths=None, views=3):
    from softlabels.store.positions import TokenPositions, UnitGeometry

    g = UnitGeometry(n, chunk, shard, group_units_for(-(-n // (chunk * shard)), 4))
    extra = {}
    if positions == "views":
        extra["views"] = {"count": views, "param_names": ["top", "left", "flip"], "augment": "crop(8,padding=1)+flip",
                          "seed": 0}
    if positions == "tokens":
        t = TokenPositions(g, lengths, chunk_positions=4)
        extra["tokens"] = t.to_attrs()["tokens"]
    return StoreMetaV2(positions=positions, layout=layout, num_samples=n, num_classes=c, logits_dtype=dtype,
                       chunk_samples=chunk, shard_chunks=shard, group_units=g.group_units,
                       layout_params=LAYOUT_PARAMS[layout], **extra)


def _unit_arrays(w: UnitWriter, u: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    meta = w.meta
    layout = meta.layout_obj()
    s0, s1 = w.unit_samples(u)
    a0, a1 = w.unit_positions(u)
    arrays = meta.arrays()
    rows = a1 - a0
    per_sample_positions = arrays[next(iter(layout.arrays()))].shape[1] if meta.positions == "views" else 1
    logits = torch.from_numpy(rng.normal(size=(rows * per_sample_positions, meta.num_classes)).astype(np.float32))
    sids = torch.arange(rows * per_sample_positions)
    enc = layout.encode(logits, sample_ids=sids, positions=sids)
    out = {}
    for k, t in enc.items():
        a = t.cpu()
        a = a.view(torch.int16).numpy().view(np.uint16) if a.dtype == torch.bfloat16 else a.numpy()
        out[k] = a.reshape((rows, *arrays[k].shape[1:]))
    if meta.positions == "views":
        out["view_params"] = rng.integers(0, 2, size=(s1 - s0, *arrays["view_params"].shape[1:])).astype(np.float32)
    out["labels"] = rng.integers(-1, meta.num_classes, size=s1 - s0)
    out["sample_ids"] = np.arange(s0, s1) * 10
    return out


def _plain_read(path, backend, meta, name, lo, hi):
    if backend == "hdf5":
        with h5py.File(path, "r") as f:
            assert f.attrs["softlabels_format"] == 2
            return f[name][lo:hi]
    g = zarr.open_group(str(path), mode="r")
    assert g.attrs["softlabels_format"] == 2
    return g[name][lo:hi]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(positions=st.sampled_from(["sample", "views", "tokens"]), layout=st.sampled_from(["dense", "topk", "sampled"]),
       backend=st.sampled_from(["hdf5", "zarr"]), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       n=st.integers(0, 13), chunk=st.integers(1, 4), shard=st.integers(1, 2), seed=st.integers(0, 2**16),
       data=st.data())
def test_round_trip(tmp_path_factory, positions, layout, backend, dtype, n, chunk, shard, seed, data):
    if backend == "hdf5":
        shard = 1
    rng = np.random.default_rng(seed)
    lengths = None
    if positions == "tokens":
        lengths = np.array(data.draw(st.lists(st.sampled_from([0, 1, 2, 5, 33]), min_size=n, max_size=n)), np.int64)
    meta = _meta(positions, layout, n, 6, dtype, chunk, shard, lengths)
    path = tmp_path_factory.mktemp("v2") / ("s.h5" if backend == "hdf5" else "s.zarr")
    w = UnitWriter.create(path, meta, lengths=lengths)
    order = rng.permutation(w.num_units)
    written = {}
    for u in order:
        written[int(u)] = _unit_arrays(w, int(u), rng)
        w.write_unit(int(u), written[int(u)])
    w.finish()
    w.close()
    with UnitStore(path) as store:
        assert store.missing_units() == [] and store.verify() == []
        for u, arrays in written.items():
            got = store.read_unit(u)
            a0, a1 = store.positions.unit_axis_range(u)
            s0, s1 = store.meta.geometry.unit_samples_range(u)
            for k, v in arrays.items():
                np.testing.assert_array_equal(got[k], v)
                lo, hi = (a0, a1) if store.meta.arrays()[k].family == "position" else (s0, s1)
                np.testing.assert_array_equal(_plain_read(path, backend, meta, k, lo, hi), v)
            if positions == "tokens":
                for i in range(s0, s1):  # the documented rule: sample i is offsets[i] .. + lengths[i]
                    off = int(_plain_read(path, backend, meta, "offsets", i, i + 1)[0])
                    ln = int(_plain_read(path, backend, meta, "lengths", i, i + 1)[0])
                    assert ln == lengths[i]
                    key = next(iter(meta.layout_obj().arrays()))
                    np.testing.assert_array_equal(_plain_read(path, backend, meta, key, off, off + ln),
                                                  arrays[key][off - a0: off - a0 + ln])


@pytest.mark.parametrize("backend", ["hdf5", "zarr"])
def test_incomplete_refused_resume_finishes_and_checksums_catch_damage(tmp_path, backend):
    rng = np.random.default_rng(0)
    lengths = np.array([3, 0, 7, 2, 9, 1], np.int64)
    meta = _meta("tokens", "topk", 6, 6, "float16", 2, 1, lengths)
    path = tmp_path / ("s.h5" if backend == "hdf5" else "s.zarr")
    w = UnitWriter.create(path, meta, lengths=lengths)
    w.write_unit(1, _unit_arrays(w, 1, rng))
    w.close()  # killed before finishing
    with pytest.raises(IncompleteStore):
        UnitStore(path)
    with pytest.raises(StoreMismatch):
        UnitWriter.resume(path, expect=_meta("tokens", "dense", 6, 6, "float16", 2, 1, lengths))
    w = UnitWriter.resume(path, expect=meta)
    assert w.missing_units() == [0, 2]
    for u in w.missing_units():
        w.write_unit(u, _unit_arrays(w, u, rng))
    w.finish()
    w.close()
    with UnitStore(path) as store:
        assert store.verify() == []
        a0, _ = store.positions.unit_axis_range(2)
    if backend == "hdf5":
        with h5py.File(path, "r+") as f:
            f["topk_values"][a0] = f["topk_values"][a0] + 1
    else:
        g = zarr.open_group(str(path), mode="r+")
        g["topk_values"][a0] = g["topk_values"][a0] + 1
    with UnitStore(path) as store:
        assert store.verify() == [2]
        with pytest.raises(CorruptStore, match=r"unit 2 \(samples 4\.\.6\) of .* fails its checksum"):
            store.read_unit(2)


def test_damaged_offsets_and_shapes_refused_before_reading(tmp_path):
    lengths = np.array([3, 4], np.int64)
    meta = _meta("tokens", "dense", 2, 6, "float32", 1, 1, lengths)
    path = tmp_path / "s.zarr"
    UnitWriter.create(path, meta, lengths=lengths).close()
    g = zarr.open_group(str(path), mode="r+")
    g["offsets"][1] = 2
    with pytest.raises(CorruptStore, match=r"offsets\[1\]"):
        UnitStore(path, allow_partial=True)
    g.attrs["num_classes"] = 600
    with pytest.raises(CorruptStore, match="logits has shape"):
        UnitStore(path, allow_partial=True)


def _doc_snippets() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()
    section = text[text.index("## Reading a store without softlabels"):text.index("## Writing a store without")]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_format_doc_snippets_read_v2_stores(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    lengths = np.array([2, 5, 0, 3], np.int64)
    meta = _meta("tokens", "topk", 4, 70_000, "float16", 2, 1, lengths)  # 3-byte ids
    meta = replace(meta, layout_params={**meta.layout_params, "tail_temperatures": [1.0, 2.0, 4.0]})
    with UnitWriter.create(tmp_path / "tokens.h5", meta, lengths=lengths) as w:
        tokens_units = {u: _unit_arrays(w, u, rng) for u in range(w.num_units)}
        for u, arrays in tokens_units.items():
            w.write_unit(u, arrays)
    vmeta = _meta("views", "sampled", 3, 6, "float32", 2, 1, views=4)
    with UnitWriter.create(tmp_path / "views.zarr", vmeta) as w:
        views_units = {u: _unit_arrays(w, u, rng) for u in range(w.num_units)}
        for u, arrays in views_units.items():
            w.write_unit(u, arrays)
    monkeypatch.chdir(tmp_path)
    tokens_snippet, views_snippet = _doc_snippets()
    ns: dict = {}
    exec(compile(tokens_snippet, "FORMAT.md", "exec"), ns)
    layout = meta.layout_obj()
    target = layout.decode({k: v[2:7] for k, v in tokens_units[0].items() if k in layout.arrays()})  # sample 1
    np.testing.assert_array_equal(ns["ids"], target.ids.numpy())
    np.testing.assert_allclose(ns["p_topk"], target.log_probs(2.0).exp().numpy(), rtol=1e-5)  # exact at T = 2
    ns = {}
    exec(compile(views_snippet, "FORMAT.md", "exec"), ns)
    np.testing.assert_array_equal(ns["params"], views_units[0]["view_params"][0])
    np.testing.assert_allclose(ns["q"].sum(-1), 1.0)
    np.testing.assert_array_equal(ns["ids"], views_units[0]["sampled_ids"][0])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(positions=st.sampled_from(["sample", "views", "tokens"]), n=st.integers(1, 11), chunk=st.integers(1, 4),
       seed=st.integers(0, 2**16), data=st.data())
def test_blocks_in_any_order_equal_whole_units(tmp_path_factory, positions, n, chunk, seed, data):
    rng = np.random.default_rng(seed)
    lengths = np.array(data.draw(st.lists(st.sampled_from([0, 1, 4, 9]), min_size=n, max_size=n)), np.int64) \
        if positions == "tokens" else None
    meta = _meta(positions, "topk", n, 6, "float16", chunk, 1, lengths)
    root = tmp_path_factory.mktemp("blocks")
    whole = UnitWriter.create(root / "a.zarr", meta, lengths=lengths)
    units = {u: _unit_arrays(whole, u, rng) for u in range(whole.num_units)}
    for u, arrays in units.items():
        whole.write_unit(u, arrays)
    whole.finish()
    whole.close()
    # the same rows, concatenated over samples, cut into random blocks written in random order
    cat = {k: np.concatenate([units[u][k] for u in sorted(units)]) for k in units[0]}
    cum = np.concatenate([[0], np.cumsum(lengths)]) if lengths is not None else np.arange(n + 1)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=n)) if n > 1 else []))
    bounds = list(zip([0, *cuts], [*cuts, n]))
    w = UnitWriter.create(root / "b.zarr", meta, lengths=lengths)
    for i in rng.permutation(len(bounds)):
        lo, hi = bounds[i]
        piece = {k: (v[cum[lo]:cum[hi]] if meta.arrays()[k].family == "position" else v[lo:hi]) for k, v in cat.items()}
        w.write(lo, **piece)
    w.finish()
    w.close()
    with UnitStore(root / "a.zarr") as a, UnitStore(root / "b.zarr") as b:
        for u in range(a.num_units):
            ga, gb = a.read_unit(u), b.read_unit(u)
            for k in ga:
                np.testing.assert_array_equal(ga[k], gb[k])


@pytest.mark.parametrize("layout", ["dense", "topk", "sampled"])
def test_layout_params_round_trip_through_make_layout(layout):
    lay = make_layout(layout, num_classes=9, logits_dtype="float16", **LAYOUT_PARAMS[layout])
    assert make_layout(layout, num_classes=9, logits_dtype="float16", **lay.params()) == lay
    assert lay.params() == LAYOUT_PARAMS[layout]


@pytest.mark.parametrize("positions,layout,dtype", [("sample", "dense", "float16"), ("views", "topk", "bfloat16"),
                                                    ("tokens", "sampled", "float32"), ("tokens", "dense", "float16")])
def test_hdf5_whole_chunk_writes_leave_the_bytes_of_plain_h5py_writes(tmp_path, monkeypatch, positions, layout, dtype):
    """Whole uncompressed chunks are written with H5Dwrite_chunk; the file must be byte for byte the one
    h5py's ordinary writes (``dataset[a:b] = rows``) make, and read back equal through plain h5py."""
    from softlabels.store._hdf5 import HDF5Backend

    lengths = np.array([3, 0, 7, 2, 9, 1, 4, 4, 0, 5, 2, 6, 1], np.int64) if positions == "tokens" else None
    meta = _meta(positions, layout, 13, 6, dtype, 4, 1, lengths)  # 4 units, the last one an edge chunk
    calls = {"setitem": 0}
    setitem = h5py.Dataset.__setitem__

    def counted(self, key, value):
        calls["setitem"] += 1
        return setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", counted)

    def write(path: str) -> dict[int, dict[str, np.ndarray]]:
        rng = np.random.default_rng(5)
        w = UnitWriter.create(tmp_path / path, meta, lengths=lengths)
        written = {}
        for u in rng.permutation(w.num_units):
            written[int(u)] = _unit_arrays(w, int(u), rng)
            w.write_unit(int(u), written[int(u)])
        w.finish()
        w.close()
        return written

    written = write("direct.h5")
    direct_calls = calls["setitem"]
    with monkeypatch.context() as m:
        m.setattr(HDF5Backend, "_raw_rows", lambda self, name, d: 0)  # every write through h5py's __setitem__
        calls["setitem"] = 0
        write("plain.h5")
        plain_calls = calls["setitem"]
    assert direct_calls < plain_calls  # the whole chunks did take the direct path
    assert (tmp_path / "direct.h5").read_bytes() == (tmp_path / "plain.h5").read_bytes()
    with UnitStore(tmp_path / "direct.h5") as store:
        assert store.verify() == []  # every unit's checksum, over the bytes as read
        for u, arrays in written.items():
            a0, a1 = store.positions.unit_axis_range(u)
            s0, s1 = store.meta.geometry.unit_samples_range(u)
            for k, v in arrays.items():
                lo, hi = (a0, a1) if meta.arrays()[k].family == "position" else (s0, s1)
                np.testing.assert_array_equal(_plain_read(tmp_path / "direct.h5", "hdf5", meta, k, lo, hi), v)
