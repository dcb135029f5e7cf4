"""Format 1, read forever and upgraded: the committed fixtures (written by the last format-1 writer),
stores made by the plain writer of tests/_v1stores.py, and ``softlabels upgrade``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from _v1stores import crc, write_v1

from softlabels._version import __version__
from softlabels.errors import CorruptStore, IncompleteStore
from softlabels.store.reader import UnitStore, open_store
from softlabels.store.v1 import V1Store
from softlabels.student.dataset import SoftLabelDataset
from tests.conftest import assert_one_line_error, make_rows, read_plain, run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "v1"
STORES = ["dense.h5", "dense.zarr", "topk.h5", "topk.zarr", "sharded.zarr"]
INPUTS = str(FIXTURES / "inputs.npz")
ROW_ARRAYS = ("logits", "topk_values", "topk_indices", "logsumexp", "labels", "sample_ids")


def _units(store) -> dict[str, np.ndarray]:
    """Every unit read through the unit API, concatenated per array."""
    blocks = [store.read_unit(u) for u in range(store.num_units)]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


@pytest.mark.parametrize("name", STORES)
def test_fixtures_read_through_the_unit_api_as_plain_reads(name):
    arrays, attrs = read_plain(FIXTURES / name)
    assert attrs["softlabels_format"] == 1
    with open_store(FIXTURES / name) as store:
        assert isinstance(store, V1Store) and store.format_version == 1 and store.verify() == []
        m = store.meta
        assert (m.positions, m.layout, m.num_samples, m.num_classes) == ("sample", attrs["layout"], 37, 5)
        assert m.chunk_samples == attrs["chunk_rows"] and m.shard_chunks == (2 if name == "sharded.zarr" else 1)
        assert m.teacher == attrs["teacher"] and m.source == attrs["source"]
        got = _units(store)
        for k in ROW_ARRAYS:
            if k in arrays:
                assert got[k].dtype == arrays[k].dtype and got[k].tobytes() == arrays[k].tobytes(), k
    r = run_cli("inspect", str(FIXTURES / name), "--verify", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["format_version"] == 1 and info["corrupt_chunks"] == [] and info["labeled"] == 27


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
@pytest.mark.parametrize("name", STORES)
def test_upgrade_is_bit_identical_and_verifies(tmp_path, name, suffix):
    out = tmp_path / f"new{suffix}"
    r = run_cli("upgrade", str(FIXTURES / name), "--out", str(out))
    assert r.exit_code == 0, r.output
    old, old_attrs = read_plain(FIXTURES / name)
    new, attrs = read_plain(out)
    for k in ROW_ARRAYS:  # C = 5: format 2's ids are uint16 too, so every array is the same bytes
        if k in old:
            assert new[k].dtype == old[k].dtype and new[k].tobytes() == old[k].tobytes(), k
    assert attrs["softlabels_format"] == 2 and attrs["status"] == "complete" and attrs["positions"] == "sample"
    assert attrs["chunk_samples"] == old_attrs["chunk_rows"] and attrs["checksum"] == "crc32c"
    assert attrs["shard_chunks"] == (2 if (name, suffix) == ("sharded.zarr", ".zarr") else 1)
    assert attrs["layout_params"] == ({"k": old_attrs["topk"]} if "topk" in old_attrs else {})
    assert attrs["teacher"] == old_attrs["teacher"] and attrs["source"] == old_attrs["source"]
    created = attrs["created_by"]
    assert created["settings"] == old_attrs["created_by"]["settings"]
    assert created["upgraded_from"]["store"] == str((FIXTURES / name).resolve())
    assert created["upgraded_from"]["timings"] == old_attrs["created_by"]["timings"]
    assert created["upgraded_from"]["softlabels"] == old_attrs["created_by"]["softlabels"] == "0.1.0"
    assert created["softlabels"] == __version__
    assert new["unit_done"].all()
    r = run_cli("inspect", str(out), "--verify", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["corrupt_chunks"] == [], r.output
    assert "already complete" in run_cli("upgrade", str(FIXTURES / name), "--out", str(out)).output


@pytest.mark.parametrize("name", ["dense.h5", "topk.zarr", "sharded.zarr"])
def test_training_from_a_fixture_and_its_upgrade_gives_identical_weights(tmp_path, name):
    upgraded = tmp_path / ("new" + Path(name).suffix)
    assert run_cli("upgrade", str(FIXTURES / name), "--out", str(upgraded)).exit_code == 0
    weights = []
    for store, run in ((FIXTURES / name, "a"), (upgraded, "b")):
        r = run_cli("train", "--store", str(store), "--data", INPUTS, "--student", "mlp", "--epochs", "1",
                    "--batch-size", "8", "--out", str(tmp_path / run))
        assert r.exit_code == 0, r.output
        weights.append(torch.load(tmp_path / run / "model.pt", weights_only=True))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_upgrade_refuses_bad_inputs_in_one_line(tmp_path):
    store = tmp_path / "dense.h5"
    shutil.copy(FIXTURES / "dense.h5", store)
    assert_one_line_error(run_cli("upgrade", str(store), "--out", str(store)), "is the input STORE")
    folder = tmp_path / "old.zarr"
    shutil.copytree(FIXTURES / "dense.zarr", folder)
    assert_one_line_error(run_cli("upgrade", str(folder), "--out", str(folder / "x.zarr")), "lies inside the input")
    assert_one_line_error(run_cli("upgrade", str(store), "--out", str(tmp_path / "x.npz")),
                          "--out must end in .h5, .hdf5 or .zarr")
    assert run_cli("upgrade", str(store), "--out", str(tmp_path / "v2.h5")).exit_code == 0
    assert_one_line_error(run_cli("upgrade", str(tmp_path / "v2.h5"), "--out", str(tmp_path / "v3.h5")),
                          "is already format 2; nothing to upgrade")
    assert_one_line_error(run_cli("upgrade", str(tmp_path / "none.h5"), "--out", str(tmp_path / "v4.h5")),
                          "no store at")
    partial = write_v1(tmp_path / "partial.h5", make_rows(20, 3), num_classes=3, status="writing", done=[0, 2])
    assert_one_line_error(run_cli("upgrade", str(partial), "--out", str(tmp_path / "v5.h5")),
                          "is incomplete", "1 of 3 chunks missing")
    with h5py.File(store, "r+") as f:  # a flipped value: the copy stops at that unit, nothing is marked complete
        f["logits"][20, 0] += 1
    assert_one_line_error(run_cli("upgrade", str(store), "--out", str(tmp_path / "v6.h5")),
                          "chunk 2 (rows 16..24)", "fails its checksum")
    with pytest.raises(IncompleteStore):
        UnitStore(tmp_path / "v6.h5")
    assert not (tmp_path / "v7.h5").exists()
    assert_one_line_error(run_cli("upgrade", str(tmp_path / "v2.h5"), "--out", str(tmp_path / "v7.h5")))
    assert not (tmp_path / "v7.h5").exists()  # a refused upgrade writes nothing


def test_a_killed_upgrade_resumes_to_the_same_store(tmp_path):
    """The upgrade runs on the job runner: killed after one unit, the same command finishes it."""
    one, resumed = tmp_path / "one.zarr", tmp_path / "resumed.zarr"
    assert run_cli("upgrade", str(FIXTURES / "dense.h5"), "--out", str(one)).exit_code == 0
    cmd = [sys.executable, "-m", "softlabels", "upgrade", str(FIXTURES / "dense.h5"), "--out", str(resumed)]
    killed = subprocess.run(cmd, env={**os.environ, "SOFTLABELS_TEST_KILL_AFTER_UNITS": "2"}, capture_output=True)
    assert killed.returncode == -9, killed.stderr
    with UnitStore(resumed, allow_partial=True) as store:
        assert store.meta.status == "writing" and len(store.missing_units()) == 3
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (a, attrs_a), (b, attrs_b) = read_plain(one), read_plain(resumed)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert attrs_a["teacher"] == attrs_b["teacher"] and attrs_b["status"] == "complete"


def test_generate_refuses_to_resume_a_format1_store(tmp_path):
    store = tmp_path / "dense.h5"
    shutil.copy(FIXTURES / "dense.h5", store)
    r = run_cli("generate", "--teacher", "mlp", "--random-teacher", "--data", INPUTS, "--num-classes", "5",
                "--out", str(store), "--chunk-rows", "8", "--no-progress")
    assert_one_line_error(r, "is a format-1 store, which softlabels reads but no longer writes", "softlabels upgrade")
    assert read_plain(store)[1]["softlabels_format"] == 1  # untouched
    assert run_cli("generate", "--teacher", "mlp", "--random-teacher", "--data", INPUTS, "--num-classes", "5",
                   "--out", str(store), "--no-progress", "--overwrite").exit_code == 0
    assert read_plain(store)[1]["softlabels_format"] == 2


# -- stores of the plain writer ---------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_hand_made_store_is_read_and_inspected(tmp_path, suffix):
    """A store written with plain h5py / zarr following docs/FORMAT.md's appendix."""
    n, c = 10, 3
    logits = np.arange(n * c, dtype=np.float32).reshape(n, c) % 7
    labels = np.array([0, 1, 2, -1, 0, 1, 2, -1, 0, 1], dtype=np.int64)
    path = write_v1(tmp_path / f"hand{suffix}", {"logits": logits, "labels": labels, "sample_ids": np.arange(n)},
                    num_classes=c, chunk_rows=4, teacher={"spec": "by-hand"})
    with open_store(path) as store:
        np.testing.assert_array_equal(_units(store)["logits"], logits)
        assert store.verify() == [] and store.meta.teacher == {"spec": "by-hand"}
    r = run_cli("inspect", str(path), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert (info["labeled"], info["unlabeled"]) == (8, 2)
    top1 = logits.argmax(1)
    assert info["teacher_accuracy"] == pytest.approx(np.mean(top1[labels >= 0] == labels[labels >= 0]))
    p = torch.softmax(torch.from_numpy(logits), -1)
    assert info["mean_teacher_entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
@pytest.mark.parametrize("checksum", [None, "crc32", "crc32c"])
def test_checksum_algorithms_and_an_absent_attribute(tmp_path, suffix, checksum):
    """No ``checksum`` attribute (stores from before it) means crc32; both algorithms verify and catch damage."""
    rows = make_rows(24, 4)
    path = write_v1(tmp_path / f"s{suffix}", rows, num_classes=4, checksum=checksum)
    with open_store(path) as store:
        assert store.meta.checksum == (checksum or "crc32") and store.verify() == []
    if suffix == ".h5":
        with h5py.File(path, "r+") as f:
            f["logits"][9, 1] += 1
    else:
        zarr.open_array(str(path / "logits"), mode="r+")[9, 1] += 1
    with open_store(path) as store:
        assert store.verify() == [1]
        with pytest.raises(CorruptStore, match=r"chunk 1 \(rows 8\.\.16\) of .* fails its checksum"):
            store.read_unit(1)
        store.read_unit(1, verify=False)  # the values themselves are plausible


def test_unknown_checksum_algorithm_is_refused_by_name(tmp_path):
    path = write_v1(tmp_path / "s.h5", make_rows(16, 3), num_classes=3, checksum="md5")
    with pytest.raises(CorruptStore, match="checksum 'md5' is not one of crc32, crc32c"):
        open_store(path)


@pytest.mark.parametrize("name, value, what", [("labels", 99, "label 99, outside -1..4"),
                                               ("topk_indices", 7, "top-k index 7, outside 0..4")])
def test_values_out_of_range_name_the_unit(tmp_path, name, value, what):
    rows = make_rows(40, 5, layout="topk", k=3)
    rows[name][21] = value
    path = write_v1(tmp_path / "s.h5", rows, num_classes=5)  # checksummed as damaged: only the value check sees it
    with open_store(path) as store:
        for verify in (True, False):
            with pytest.raises(CorruptStore, match=rf"^unit 2 \(samples 16\.\.24\) of {path} holds {what}"):
                store.read_unit(2, verify=verify)
        assert store.verify() == [2]
    with pytest.raises(CorruptStore, match="unit 2 "):  # and so does training from it
        list(SoftLabelDataset([(path, None)], batch_size=4, rank=0, world_size=1))


def test_v1_bookkeeping_read_from_the_chunk_files_present(tmp_path):
    """chunk_done / checksums (one element per file) come from the files present and equal plain zarr's read."""
    from softlabels.store.backend import open_backend

    path = write_v1(tmp_path / "s.zarr", make_rows(40, 3), num_classes=3, chunk_rows=1, status="writing", done=[])
    g = zarr.open_group(str(path), mode="r+")
    for i in (3, 17, 18, 39):  # only these files exist
        g["chunk_done"][i], g["checksums"][i] = 1, 1000 + i
    b = open_backend(path, "r")
    for name in ("chunk_done", "checksums"):
        plain = zarr.open_array(str(path / name), mode="r")[...]
        for start in (0, 17, 40):
            np.testing.assert_array_equal(b.read(name, start, 40), plain[start:])
    b.close()
    with open_store(path, allow_partial=True) as store:
        assert np.flatnonzero(store.unit_done()).tolist() == [3, 17, 18, 39]


def test_the_plain_writer_matches_the_fixtures_checksums():
    """tests/_v1stores.py computes the checksum the last writer recorded: the two writers agree."""
    arrays, _ = read_plain(FIXTURES / "topk.h5")
    for c in range(5):
        block = {k: arrays[k][8 * c:8 * c + 8] for k in ROW_ARRAYS if k in arrays}
        assert crc(block) == arrays["checksums"][c]


def test_the_format_doc_appendix_snippet_reads_a_fixture(tmp_path, monkeypatch):
    """docs/FORMAT.md's plain-h5py reading of a format-1 store, run on a fixture."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()
    appendix = text[text.index("## Appendix: format 1"):]
    snippet = appendix.split("```python\n")[1].split("```", 1)[0]
    shutil.copy(FIXTURES / "dense.h5", tmp_path / "dense.h5")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(snippet, "FORMAT.md", "exec"), ns)
    arrays, _ = read_plain(FIXTURES / "dense.h5")
    np.testing.assert_array_equal(ns["logits"], arrays["logits"][:8])
    np.testing.assert_array_equal(ns["ids"], arrays["sample_ids"][:8])
