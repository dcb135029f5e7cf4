"""Disk full and read-only destinations: a clear error, and the store stays resumable.

Uses a real small tmpfs (skipped where this process may not mount one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from softlabels.store.backend import open_backend
from softlabels.store.summary import diff_stores
from softlabels.teacher.spec import resolve_model

N, D, C = 2000, 8, 50


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)


@pytest.fixture
def job(tmp_path):
    x = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    torch.manual_seed(0)
    torch.save(resolve_model("linear", input_shape=(D,), num_classes=C).module.state_dict(), tmp_path / "w.pt")

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "softlabels", "generate", "--teacher", "linear", "--weights",
               str(tmp_path / "w.pt"), "--data", str(tmp_path / "data.npz"), "--num-classes", str(C),
               "--out", str(out), "--chunk-rows", "100", "--batch-size", "100", "--no-progress", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})

    return run


def assert_one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_disk_full_fails_clearly_and_resumes_identically(tmp_path, tmpfs, job, suffix):
    ref = tmp_path / f"ref{suffix}"
    assert job(ref).returncode == 0
    out = tmpfs / f"s{suffix}"  # the store (~400 KB of logits) cannot fit in 160 KB
    assert_one_line_error(job(out), "No space left on device")
    if out.exists():  # whatever was left is never marked complete
        backend = open_backend(out, "r")
        assert backend.attrs().get("status") != "complete"
        backend.close()
    remount(tmpfs, "size=4m")
    done = job(out)
    assert done.returncode == 0, done.stderr
    assert diff_stores(ref, out) == []


def test_read_only_destination_fails_clearly_and_resumes(tmp_path, tmpfs, job):
    remount(tmpfs, "size=4m")
    ref = tmp_path / "ref.zarr"
    assert job(ref).returncode == 0
    out = tmpfs / "s.zarr"
    first = job(out)  # a full run, then two units marked for regeneration: a store to resume
    assert first.returncode == 0, first.stderr
    from softlabels.store.writer import UnitWriter

    w = UnitWriter.resume(out)
    w.invalidate([3, 7])
    w.close()
    remount(tmpfs, "ro")
    assert_one_line_error(job(out), "Read-only file system")
    remount(tmpfs, "rw")
    done = job(out)
    assert done.returncode == 0, done.stderr
    assert diff_stores(ref, out) == []
