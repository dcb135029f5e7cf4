"""Inputs are never overwritten, bad input is refused before anything is written, damage is reported
(merge, --views-from, --views, token ids, inspect --verify).

Tiny data made in the test; the real CLI (in-process) as a user would run it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

from tests.conftest import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _vec(tmp_path: Path, name: str = "vec.npz") -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / name
    np.savez(path, x=rng.random((40, 16)).astype(np.float32), y=rng.integers(0, 4, 40))
    return path


def _img(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "img.npz"
    np.savez(path, x=(rng.integers(0, 9, (40, 1, 6, 6)) / 8).astype(np.float32), y=rng.integers(0, 4, 40))
    return path


def _gen(data: Path, out: Path, *extra: str):
    return run_cli("generate", "--teacher", "mlp", "--random-teacher", "--data", str(data), "--out", str(out),
                   "--num-classes", "4", "--chunk-rows", "8", "--no-progress", *extra)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_out_never_replaces_the_stores_recorded_input_data(tmp_path):
    """`merge --out DATA --overwrite` replaced the stores' own input .npz with an HDF5 file (data loss).
    generate refuses the same (E1007: an input is never overwritten, not even with --overwrite); merge
    must too, and should also insist on a .h5/.hdf5/.zarr suffix as generate does."""
    data = _vec(tmp_path)
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert _gen(data, a).exit_code == 0
    assert _gen(data, b, "--seed", "1").exit_code == 0
    before = _sha(data)
    result = run_cli("merge", "--store", str(a), "--store", str(b), "--out", str(data), "--overwrite")
    assert _sha(data) == before, "merge overwrote the stores' recorded --data file"
    assert_one_line_error(result)


def test_merge_out_inside_an_input_store_is_refused(tmp_path):
    """`merge --store A --store B --out B/sub.zarr` wrote a new store inside input B (SECURITY.md: --out that
    lies inside an input is refused)."""
    data = _vec(tmp_path)
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert _gen(data, a).exit_code == 0
    assert _gen(data, b, "--seed", "1").exit_code == 0
    result = run_cli("merge", "--store", str(a), "--store", str(b), "--out", str(b / "sub.zarr"))
    assert not (b / "sub.zarr").exists()
    assert_one_line_error(result)


def test_generate_views_from_itself_with_overwrite_is_refused(tmp_path):
    """`generate --views-from V --out V --overwrite` deleted the input views store and wrote a new one that
    records views_from = itself. --views-from is an input: E1007 must refuse it, --overwrite or not."""
    img = _img(tmp_path)
    views = tmp_path / "views.zarr"
    ok = run_cli("generate", "--teacher", "cnn", "--random-teacher", "--data", str(img), "--out", str(views),
                 "--num-classes", "4", "--views", "3", "--augment", "crop(6,padding=1)+flip", "--no-progress")
    assert ok.exit_code == 0, ok.output
    before = zarr.open_group(str(views), mode="r")["view_params"][...]
    teacher_before = dict(zarr.open_group(str(views), mode="r").attrs)["teacher"]
    result = run_cli("generate", "--teacher", "cnn", "--random-teacher", "--seed", "7", "--data", str(img),
                     "--views-from", str(views), "--out", str(views), "--overwrite", "--no-progress")
    g = zarr.open_group(str(views), mode="r")
    assert dict(g.attrs)["teacher"] == teacher_before, "the input views store was replaced"
    np.testing.assert_array_equal(g["view_params"][...], before)
    assert_one_line_error(result)


def test_absurd_views_count_is_refused_before_allocating(tmp_path):
    """`generate --views 1000000000 --augment flip` was killed by the OOM killer (no error line) and left a
    'writing' store whose view_params chunk is 16 x 1e9 floats. A claimed size must be checked before
    anything is allocated (docs/USAGE.md: Reliability). Run in a subprocess under a 2 GiB address-space limit."""
    img = _img(tmp_path)
    out = tmp_path / "many.zarr"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
            "from softlabels.cli import main; sys.argv[0] = 'softlabels'; main()")
    proc = subprocess.run(
        [sys.executable, "-c", code, "generate", "--teacher", "cnn", "--random-teacher", "--data", str(img),
         "--out", str(out), "--num-classes", "4", "--views", "1000000000", "--augment", "flip", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]


def test_inspect_verify_exits_nonzero_on_corrupt_chunks(tmp_path):
    """`inspect --verify` printed '1 corrupt chunks: 0' and exited 0, so a script or CI step cannot tell a
    damaged store from a good one (v1 and v2 alike)."""
    data = _vec(tmp_path)
    store = tmp_path / "s.zarr"
    assert _gen(data, store).exit_code == 0
    g = zarr.open_group(str(store), mode="r+")
    labels = g["labels"][...]
    labels[0] = (labels[0] + 1) % 4
    g["labels"][...] = labels
    result = run_cli("inspect", "--verify", str(store))
    assert "corrupt" in result.output
    assert result.exit_code != 0, result.output


def test_token_ids_outside_the_vocabulary_leave_no_store_behind(tmp_path):
    """Token ids >= the teacher's vocabulary are bad input found only after the store was created: the
    error line is right, but a 'writing' store stays behind and the corrected rerun is then refused as
    'made with other settings' until --overwrite. Bad input must be caught before anything is written."""
    tokens = tmp_path / "tok.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 50, (6, 12)))
    out = tmp_path / "tok.zarr"
    bad = run_cli("generate", "--teacher", "gpt-tiny", "--random-teacher", "--data", str(tokens), "--out", str(out),
                  "--num-classes", "10", "--no-progress")
    assert_one_line_error(bad, "outside the vocabulary")
    assert not out.exists(), "a half-created store was left behind"
    good = run_cli("generate", "--teacher", "gpt-tiny", "--random-teacher", "--data", str(tokens), "--out", str(out),
                   "--num-classes", "50", "--no-progress")
    assert good.exit_code == 0, good.output
