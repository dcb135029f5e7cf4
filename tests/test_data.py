"""Input datasets: every data spec form, digits splits, lazy HDF5 opening, fingerprints."""

from __future__ import annotations

import multiprocessing
import pickle

import h5py
import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.utils.data import DataLoader

from softlabels.errors import DataError, SpecError
from softlabels.inputs.array_files import LazyArray
from softlabels.inputs.arrays import ArrayDataset, InputDataset
from softlabels.inputs.fingerprints import fingerprint
from softlabels.inputs.spec import resolve_data


def _arrays(n: int = 37, shape: tuple[int, ...] = (3, 4), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(-1, 5, n).astype(np.int64)
    y[0] = 4  # max label present: num_classes = 5
    return x, y


def _all(ds: InputDataset) -> tuple[np.ndarray, np.ndarray]:
    x, y = ds.get_batch(np.arange(len(ds)))
    return x.numpy(), y.numpy()


def _assert_matches(ds: InputDataset, x: np.ndarray, y: np.ndarray | None) -> None:
    got_x, got_y = _all(ds)
    np.testing.assert_array_equal(got_x, x.astype(np.float32))
    np.testing.assert_array_equal(got_y, np.full(len(x), -1) if y is None else y)
    assert len(ds) == len(x) and ds.input_shape == x.shape[1:]
    item_x, item_y = ds[len(x) - 1]
    assert item_x.dtype == torch.float32 and item_y.dtype == torch.int64 and item_y.ndim == 0
    np.testing.assert_array_equal(item_x.numpy(), x[-1])


# ----------------------------------------------------------------- spec forms


def test_npz_with_and_without_labels(tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez(tmp_path / "b.npz", x=x)
    np.savez(tmp_path / "c.npz", inputs=x, targets=y)
    a = resolve_data(str(tmp_path / "a.npz"))
    _assert_matches(a, x, y)
    assert a.has_labels and a.num_classes == 5
    b = resolve_data(str(tmp_path / "b.npz"))
    _assert_matches(b, x, None)
    assert not b.has_labels and b.num_classes is None
    _assert_matches(resolve_data(f"{tmp_path / 'c.npz'}:inputs,targets"), x, y)
    _assert_matches(resolve_data(f"{tmp_path / 'c.npz'}:inputs"), x, None)


def test_npz_without_x_lists_arrays(tmp_path):
    np.savez(tmp_path / "a.npz", feats=np.zeros((2, 2)), labels=np.zeros(2, int))
    with pytest.raises(DataError, match=r"no array 'x'.*feats, labels"):
        resolve_data(str(tmp_path / "a.npz"))


def test_npy_is_memory_mapped_inputs_only(tmp_path):
    x = (np.arange(60, dtype=np.uint8).reshape(10, 6))
    np.save(tmp_path / "x.npy", x)
    ds = resolve_data(str(tmp_path / "x.npy"))
    assert isinstance(ds._x, LazyArray) and ds._x.kind == "npy"  # stays in the file
    _assert_matches(ds, x, None)


@pytest.mark.parametrize("suffix", ["h5", "hdf5"])
def test_hdf5_named_arrays(tmp_path, suffix):
    x, y = _arrays()
    path = tmp_path / f"d.{suffix}"
    with h5py.File(path, "w") as f:
        f["grp/images"] = x
        f["grp/labels"] = y
        f["x"], f["y"] = x[:5], y[:5]
    _assert_matches(resolve_data(f"{path}:grp/images,grp/labels"), x, y)
    _assert_matches(resolve_data(f"{path}:grp/images"), x, None)
    _assert_matches(resolve_data(str(path)), x[:5], y[:5])
    with pytest.raises(DataError, match=r"no array 'nope'.*grp/images"):
        resolve_data(f"{path}:nope")


def test_zarr_named_arrays(tmp_path):
    x, y = _arrays()
    root = zarr.open_group(tmp_path / "d.zarr", mode="w")
    root.create_array("inputs", data=x, chunks=(8, 3, 4))
    root.create_array("targets", data=y, chunks=(8,))
    _assert_matches(resolve_data(f"{tmp_path / 'd.zarr'}:inputs,targets"), x, y)
    _assert_matches(resolve_data(f"{tmp_path / 'd.zarr'}:inputs"), x, None)


def test_missing_file_and_unknown_spec(tmp_path):
    for spec in [f"{tmp_path}/gone.npz", f"{tmp_path}/gone.h5:x", f"{tmp_path}/gone.zarr:x"]:
        with pytest.raises(DataError, match="gone.* does not exist"):
            resolve_data(spec)
    with pytest.raises(SpecError, match="unknown dataset 'digts'.*digits:train"):
        resolve_data("digts")
    with pytest.raises(SpecError, match="unknown data option 'nolabels'"):
        resolve_data("digits:pool?nolabels")


def test_module_factory_dataset(tmp_path, monkeypatch):
    (tmp_path / "userdata.py").write_text(
        "import numpy as np\n"
        "class Pairs:\n"
        "    def __len__(self): return 6\n"
        "    def __getitem__(self, i): return np.full((2, 3), i, np.float64), (None if i % 2 else i % 3)\n"
        "def make(): return Pairs()\n"
        "def inputs_only(): return [np.ones(4) * i for i in range(5)]\n"
        "def broken(): raise RuntimeError('no data here')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = resolve_data("userdata:make")
    x, y = _all(ds)
    np.testing.assert_array_equal(x, np.stack([np.full((2, 3), i, np.float32) for i in range(6)]))
    np.testing.assert_array_equal(y, [0, -1, 2, -1, 1, -1])
    assert ds.input_shape == (2, 3) and ds.has_labels
    plain = resolve_data("userdata:inputs_only")
    assert _all(plain)[1].tolist() == [-1] * 5 and plain.input_shape == (4,)
    with pytest.raises(SpecError, match="raised RuntimeError: no data here"):
        resolve_data("userdata:broken")
    with pytest.raises(SpecError, match="cannot import module 'no_such_mod'"):
        resolve_data("no_such_mod:make")


def test_unlabeled_suffix_hides_labels(tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = resolve_data(f"{tmp_path / 'a.npz'}?unlabeled")
    _assert_matches(ds, x, None)
    assert not ds.has_labels and ds.num_classes == 5
    pool = resolve_data("digits:pool?unlabeled")
    assert (_all(pool)[1] == -1).all() and not pool.has_labels


# -------------------------------------------------------------------- arrays


def test_array_dataset_label_validation():
    x = np.zeros((3, 2))
    with pytest.raises(DataError, match="minimum -2"):
        ArrayDataset(x, np.array([0, -2, 1]))
    with pytest.raises(DataError, match="dtype float64"):
        ArrayDataset(x, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(DataError, match=r"shape \(2,\).*pass 3 integer"):
        ArrayDataset(x, np.array([0, 1]))
    with pytest.raises(DataError, match="num_classes=2"):
        ArrayDataset(x, np.array([0, 1, 2]), num_classes=2)
    assert ArrayDataset(x, np.array([0, 1, -1]), num_classes=7).num_classes == 7


@settings(max_examples=25, deadline=None)
@given(
    x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)),
    data=st.data(),
)
def test_get_batch_equals_stacked_items(x, data):
    ds = ArrayDataset(x, np.arange(len(x)) % 3)
    idx = np.array(data.draw(st.lists(st.integers(0, len(x) - 1), max_size=12)), dtype=np.int64)
    bx, by = ds.get_batch(idx)
    items = [ds[int(i)] for i in idx]
    assert bx.shape == (len(idx), *x.shape[1:]) and by.dtype == torch.int64
    if items:
        torch.testing.assert_close(bx, torch.stack([a for a, _ in items]), equal_nan=True)
        assert by.tolist() == [int(b) for _, b in items]


def test_file_get_batch_any_order_and_repeats(tmp_path):
    x, y = _arrays(n=200)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = x, y
    zarr.open_group(tmp_path / "d.zarr", mode="w").create_array("x", data=x, chunks=(16, 3, 4))
    idx = np.array([150, 3, 3, 199, 0, 77])  # sparse: fancy read; then a dense range: one slab
    for spec in [str(tmp_path / "d.h5"), f"{tmp_path / 'd.zarr'}:x"]:
        ds = resolve_data(spec)
        for ids in (idx, np.arange(40, 90)[::-1]):
            bx, _ = ds.get_batch(ids)
            np.testing.assert_array_equal(bx.numpy(), x[ids])
            np.testing.assert_array_equal(bx.numpy(), torch.stack([ds[int(i)][0] for i in ids]).numpy())


# --------------------------------------------------------------- digits


def test_digits_splits_disjoint_cover_and_deterministic():
    sizes = {"train": 449, "pool": 989, "test": 359, "all": 1797}
    splits = {name: resolve_data(f"digits:{name}") for name in sizes}
    assert {name: len(ds) for name, ds in splits.items()} == sizes
    all_x, all_y = _all(splits["all"])
    assert all_x.shape == (1797, 64) and all_x.min() == 0.0 and all_x.max() == 1.0
    rows = {}
    for name in ("train", "pool", "test"):
        x, y = _all(splits[name])
        assert splits[name].num_classes == 10 and splits[name].has_labels
        assert set(np.unique(y)) == set(range(10))  # stratified: every class in every split
        # locate each row in the full set by (pixels, label)
        keys = {(r.tobytes(), int(t)) for r, t in zip(x, y)}
        rows[name] = keys
    assert not (rows["train"] & rows["pool"]) and not (rows["train"] & rows["test"])
    assert not (rows["pool"] & rows["test"])
    all_keys = {(r.tobytes(), int(t)) for r, t in zip(all_x, all_y)}
    assert rows["train"] | rows["pool"] | rows["test"] == all_keys
    again = resolve_data("digits:train")
    np.testing.assert_array_equal(_all(again)[0], _all(splits["train"])[0])


# --------------------------------------------------------- lazy HDF5 and workers


def test_hdf5_lazy_open_pickle_and_fork_workers(tmp_path):
    x, y = _arrays(n=64)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = x, y
    ds = resolve_data(str(tmp_path / "d.h5"))
    assert ds._x._handle is None  # nothing held open before the fork
    clone = pickle.loads(pickle.dumps(ds))  # pickled before first access
    np.testing.assert_array_equal(clone[5][0].numpy(), x[5])
    ds[0]  # now open in the parent: forked workers must notice the pid and reopen
    assert ds._x._handle is not None
    for dataset in (pickle.loads(pickle.dumps(resolve_data(str(tmp_path / "d.h5")))), ds):
        loader = DataLoader(
            dataset,
            batch_size=8,
            num_workers=2,
            multiprocessing_context=multiprocessing.get_context("fork"),
        )
        batches = list(loader)
        np.testing.assert_array_equal(torch.cat([bx for bx, _ in batches]).numpy(), x)
        np.testing.assert_array_equal(torch.cat([by for _, by in batches]).numpy(), y)


# ------------------------------------------------------------- fingerprints


def test_fingerprint_stable_and_sensitive(tmp_path):
    x, y = _arrays(n=500)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    fp = fingerprint(resolve_data(str(tmp_path / "a.npz")))
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert fingerprint(resolve_data(str(tmp_path / "a.npz"))) == fp
    with h5py.File(tmp_path / "a.h5", "w") as f:  # same data, other container: same fingerprint
        f["x"], f["y"] = x, y
    assert fingerprint(resolve_data(str(tmp_path / "a.h5"))) == fp

    changed = x.copy()
    changed[0, 1, 2] += 1.0  # item 0 is always sampled
    assert fingerprint(ArrayDataset(changed, y)) != fp
    changed = x.copy()
    changed[-1, 0, 0] = 0.5  # so is the last one
    assert fingerprint(ArrayDataset(changed, y)) != fp
    assert fingerprint(ArrayDataset(x[:-1], y[:-1])) != fp
    assert fingerprint(resolve_data(f"{tmp_path / 'a.npz'}?unlabeled")) != fp
    assert fingerprint(ArrayDataset(x, y)) == fp
    assert fingerprint(resolve_data("digits:train")) == fingerprint(resolve_data("digits:train"))
    assert fingerprint(resolve_data("digits:train")) != fingerprint(resolve_data("digits:test"))
