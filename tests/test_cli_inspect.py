"""`softlabels inspect`: what it reports, and one-line errors for bad stores."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import zarr

from tests.conftest import assert_one_line_error, make_rows, run_cli, write_store


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_inspect_reports_layout_labels_and_teacher_stats(tmp_path, suffix):
    rows = make_rows(30, 5, layout="topk", k=2)
    path = write_store(tmp_path / f"s{suffix}", rows, num_classes=5, chunk_rows=8,
                       teacher={"spec": "mlp"}, source={"spec": "x.npz", "fingerprint": "sha256:ab"})
    info = json.loads(run_cli("inspect", str(path), "--json", "--verify").output)
    assert (info["layout"], info["topk"], info["num_samples"], info["num_classes"]) == ("topk", 2, 30, 5)
    assert (info["labeled"], info["unlabeled"]) == (20, 10)
    assert info["status"] == "complete" and info["missing_chunks"] == [] and info["corrupt_chunks"] == []
    lab = rows["labels"]
    top1 = rows["topk_indices"][:, 0]
    assert info["teacher_accuracy"] == pytest.approx(np.mean(top1[lab >= 0] == lab[lab >= 0]))
    assert info["teacher"] == {"spec": "mlp"} and info["source"]["fingerprint"] == "sha256:ab"
    text = run_cli("inspect", str(path)).output
    assert "topk  float32  N=30  C=5  K=2" in text and "20 labeled, 10 unlabeled" in text


def test_inspect_shows_missing_chunks_of_partial_store(tmp_path):
    path = write_store(tmp_path / "p.zarr", make_rows(20, 3), num_classes=3, chunk_rows=8, finish=False)
    from softlabels.store.writer import UnitWriter

    w = UnitWriter.resume(path)
    w.invalidate([1])
    w.close()
    info = json.loads(run_cli("inspect", str(path), "--json").output)
    assert info["status"] == "writing" and info["missing_chunks"] == [1]


def test_missing_path(tmp_path):
    assert_one_line_error(run_cli("inspect", str(tmp_path / "nope.zarr")), "no store at", "nope.zarr")


def test_not_a_store(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    assert_one_line_error(run_cli("inspect", str(tmp_path / "junk.h5")), "not a readable HDF5 file")
    (tmp_path / "dir.zarr").mkdir()
    assert_one_line_error(run_cli("inspect", str(tmp_path / "dir.zarr")), "not a Zarr v3 store")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    assert_one_line_error(run_cli("inspect", str(tmp_path / "plain.h5")), "'softlabels_format' is missing")
    (tmp_path / "what.txt").write_text("x")
    assert_one_line_error(run_cli("inspect", str(tmp_path / "what.txt")), "not a readable HDF5 file")


def test_unknown_version(tmp_path):
    path = write_store(tmp_path / "s.h5", make_rows(10, 3), num_classes=3)
    with h5py.File(path, "r+") as f:
        f.attrs["softlabels_format"] = 7
    assert_one_line_error(run_cli("inspect", str(path)), "unsupported softlabels format version 7")


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_wrong_array_shapes(tmp_path, suffix):
    path = write_store(tmp_path / f"s{suffix}", make_rows(10, 3), num_classes=3)
    if suffix == ".h5":
        with h5py.File(path, "r+") as f:
            del f["labels"]
            f.create_dataset("labels", data=np.zeros(9, np.int64), chunks=(8,))
    else:
        g = zarr.open_group(str(path), mode="r+")
        g.create_array("labels", shape=(9,), dtype="int64", chunks=(8,), overwrite=True)
    assert_one_line_error(run_cli("inspect", str(path)), "labels has shape (9,)", "regenerate")


@pytest.mark.parametrize("attr,value,needle", [
    ("num_samples", 11, "logits has shape (10, 3)"),
    ("num_classes", 4, "logits has shape (10, 3)"),
    ("layout", "topk", "topk layout: "),
    ("chunk_samples", 0, "chunk_samples must be"),
])
def test_edited_attributes(tmp_path, attr, value, needle):
    path = write_store(tmp_path / "s.zarr", make_rows(10, 3), num_classes=3)
    zarr.open_group(str(path), mode="r+").attrs[attr] = value
    assert_one_line_error(run_cli("inspect", str(path)), needle)


def test_truncated_and_flipped_chunks_are_named(tmp_path):
    path = write_store(tmp_path / "s.zarr", make_rows(32, 4), num_classes=4, chunk_rows=8)
    chunk_file = path / "logits" / "c.2.0"
    data = bytearray(chunk_file.read_bytes())
    data[5] ^= 0x10
    chunk_file.write_bytes(bytes(data))
    info = json.loads(run_cli("inspect", str(path), "--json", "--verify").output)
    assert info["corrupt_chunks"] == [2]
    (path / "labels" / "c.1").write_bytes((path / "labels" / "c.1").read_bytes()[:10])
    info = json.loads(run_cli("inspect", str(path), "--json", "--verify").output)
    assert info["corrupt_chunks"] == [1, 2]
    # a reader hitting the damaged chunk says which one and how to recover
    from softlabels.errors import CorruptStore
    from softlabels.store.reader import open_store

    with pytest.raises(CorruptStore, match=r"unit 2 \(samples 16..24\).*--repair"):
        open_store(path).read_unit(2)


def test_truncated_hdf5_file(tmp_path):
    path = write_store(tmp_path / "s.h5", make_rows(64, 4), num_classes=4, chunk_rows=8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("inspect", str(path)), "s.h5")


def test_flipped_byte_in_hdf5_chunk(tmp_path):
    rows = make_rows(64, 4)
    path = write_store(tmp_path / "s.h5", rows, num_classes=4, chunk_rows=8)
    with h5py.File(path, "r") as f:
        offset = f["logits"].id.get_chunk_info(3).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 2)
        b = fh.read(1)
        fh.seek(offset + 2)
        fh.write(bytes([b[0] ^ 0x01]))
    info = json.loads(run_cli("inspect", str(path), "--json", "--verify").output)
    assert info["corrupt_chunks"] == [3]


def test_console_script_runs_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "softlabels", "inspect", str(tmp_path / "x.h5")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: no store at") and "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [["inspect", "{store}"], ["inspect", "{store}", "--json", "--verify"], ["--help"]])
def test_a_closed_stdout_ends_the_command_quietly(tmp_path, args):
    """`softlabels inspect STORE | head -1`: the reader leaves early; that is no error (no line on stderr)."""
    store = write_store(tmp_path / "s.h5", make_rows(30, 5), num_classes=5, chunk_rows=8)
    argv = [a.format(store=store) for a in args]
    proc = subprocess.Popen([sys.executable, "-m", "softlabels", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert err.decode() == "" and proc.returncode == 1, err.decode()
    shell = subprocess.run(f"{sys.executable} -m softlabels {' '.join(argv)} | head -c 1", shell=True,
                           capture_output=True, text=True, timeout=120)
    assert shell.stderr == "" and len(shell.stdout) == 1, shell.stderr


def test_a_broken_pipe_of_our_own_is_still_an_error(tmp_path):
    """Only a closed stdout ends quietly: a BrokenPipeError from elsewhere (a worker's pipe) is one error line."""
    code = ("import sys, softlabels.store.summary as s\n"
            "def summarize(*a, **k): raise BrokenPipeError(32, 'Broken pipe')\n"
            "s.summarize = summarize\n"
            "from softlabels.cli import main\n"
            "sys.argv = ['softlabels', 'inspect', 'x.h5']\n"
            "main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("error: Broken pipe;") and len(p.stderr.splitlines()) == 1, \
        p.stderr
