"""The unit writer and reader on plain per-sample stores: refusals, resume, crash safety, attributes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import zarr

from softlabels.errors import (
    CorruptStore,
    IncompleteStore,
    NotAStore,
    StoreExists,
    StoreMismatch,
    UnsupportedFormat,
)
from softlabels.store.reader import UnitStore, open_store
from softlabels.store.schema import StoreMetaV2
from softlabels.store.writer import UnitWriter
from tests.conftest import make_rows, write_store


def _meta(n: int, c: int, chunk: int = 8) -> StoreMetaV2:
    return StoreMetaV2(positions="sample", layout="dense", num_samples=n, num_classes=c, chunk_samples=chunk)


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_unfinished_store_is_refused_and_resumable(tmp_path, suffix):
    rows = make_rows(40, 4)
    path = tmp_path / f"s{suffix}"
    w = UnitWriter.create(path, _meta(40, 4))
    w.write(8, **{k: v[8:24] for k, v in rows.items()})   # units 1, 2
    w.write(30, **{k: v[30:34] for k, v in rows.items()})  # part of unit 3: buffered, never written
    w.close()
    with pytest.raises(IncompleteStore, match=r"3 of 5 units missing: 0, 3, 4"):
        open_store(path)
    w = UnitWriter.resume(path)
    assert w.missing_units() == [0, 3, 4]
    with pytest.raises(IncompleteStore):
        w.finish()
    for a in (0, 24, 32):
        w.write(a, **{k: v[a:a + 8] for k, v in rows.items()})
    w.finish()
    w.close()
    with open_store(path) as store:
        np.testing.assert_array_equal(np.concatenate([store.read_unit(u)["logits"] for u in range(5)]),
                                      rows["logits"])


def test_resume_with_other_settings_and_existing_path_are_refused(tmp_path):
    path = write_store(tmp_path / "s.h5", make_rows(10, 3), num_classes=3, finish=False)
    with pytest.raises(StoreMismatch, match="num_classes: 3 != 5"):
        UnitWriter.resume(path, expect=_meta(10, 5))
    with pytest.raises(StoreExists):
        UnitWriter.create(path, _meta(10, 3))
    UnitWriter.create(path, _meta(4, 2), overwrite=True).close()
    assert open_store(path, allow_partial=True).num_samples == 4


_KILL_CHILD = r"""
import sys, time, numpy as np
from softlabels.store.schema import StoreMetaV2
from softlabels.store.writer import UnitWriter
path, pause = sys.argv[1], float(sys.argv[2])
n, c = 64, 5
rng = np.random.default_rng(0)
z = rng.standard_normal((n, c)).astype(np.float32)
w = UnitWriter.create(path, StoreMetaV2(positions="sample", layout="dense", num_samples=n, num_classes=c,
                                        chunk_samples=4))
for start in range(0, n, 4):
    w.write(start, logits=z[start:start + 4], labels=np.zeros(4, np.int64), sample_ids=np.arange(start, start + 4))
    print(start // 4, flush=True)
    time.sleep(pause)
w.finish()
"""


def _unit_logits(store, u: int) -> np.ndarray:
    return store.read_unit(u)["logits"]


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_sigkilled_writer_leaves_a_refused_resumable_store(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path), "0.2"], stdout=subprocess.PIPE, text=True)
    for _ in range(5):  # units 0..4 flagged, then kill while it sleeps
        child.stdout.readline()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with pytest.raises(IncompleteStore, match="status 'writing'"):
        open_store(path)
    with open_store(path, allow_partial=True) as store:
        done = set(range(16)) - set(store.missing_units())
    assert {0, 1, 2, 3, 4} <= done and done <= {0, 1, 2, 3, 4, 5}  # unit 5 may have landed before the kill
    w = UnitWriter.resume(path)
    assert w.missing_units() == sorted(set(range(16)) - done)
    w.close()
    # every unit flagged done holds exactly what was written
    z = np.random.default_rng(0).standard_normal((64, 5)).astype(np.float32)
    store = open_store(path, allow_partial=True)
    for u in done:
        np.testing.assert_array_equal(_unit_logits(store, u), z[4 * u:4 * u + 4])


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_sigkill_at_random_moments_never_flags_bad_units(tmp_path, suffix):
    z = np.random.default_rng(0).standard_normal((64, 5)).astype(np.float32)
    for delay in (0.05, 0.3, 0.6):
        path = tmp_path / f"s{delay}{suffix}"
        child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path), "0"], stdout=subprocess.DEVNULL)
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        if not path.exists():
            continue
        try:
            store = open_store(path, allow_partial=True)
        except (NotAStore, CorruptStore):
            continue  # killed before the layout existed: nothing was claimed
        for u in set(range(store.num_units)) - set(store.missing_units()):
            np.testing.assert_array_equal(_unit_logits(store, u), z[4 * u:4 * u + 4])


def test_unknown_version_and_bad_attrs(tmp_path):
    path = write_store(tmp_path / "s.zarr", make_rows(10, 3), num_classes=3)
    g = zarr.open_group(str(path), mode="r+")
    g.attrs["softlabels_format"] = 99
    with pytest.raises(UnsupportedFormat, match="version 99; this softlabels reads versions 1 and 2"):
        open_store(path)
    g.attrs["softlabels_format"] = 2
    g.attrs["layout"] = "sparse"
    with pytest.raises(CorruptStore, match="layout 'sparse'"):
        open_store(path)
    del g.attrs["softlabels_format"]
    with pytest.raises(CorruptStore, match="'softlabels_format' is missing"):
        UnitStore(path)


def test_values_out_of_range_are_refused_as_read(tmp_path):
    """Labels outside -1..C-1 and top-k ids >= C: the unit is named, with or without its checksum."""
    rows = make_rows(24, 5, layout="topk", k=2)
    rows["labels"][17] = 7
    path = write_store(tmp_path / "s.h5", rows, num_classes=5)
    with open_store(path) as store:
        for verify in (True, False):
            with pytest.raises(CorruptStore, match=rf"^unit 2 \(samples 16\.\.24\) of {path} holds label 7, "
                                                   r"outside -1\.\.4; regenerate it with 'softlabels generate --repair'"):
                store.read_unit(2, verify=verify)
        assert store.verify() == [2]
