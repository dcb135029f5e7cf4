"""Trust boundaries through the real CLI: data never runs code, writes stay inside the store,
a resume never mixes teachers, and signals take the Ctrl-C path (docs/SECURITY.md)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from softlabels.errors import StoreLocked
from softlabels.store.lock import StoreLock
from softlabels.store.summary import diff_stores
from softlabels.teacher.models import build_model
from tests.conftest import (
    assert_one_line_error,
    make_rows,
    read_plain,
    run_cli,
    write_store,
)

N, D, C = 48, 6, 4
CHUNK = 8

# Importing this module, or calling its factories, leaves a file: proof that code ran.
MARKER_MODULE = '''
import os
from pathlib import Path
Path(os.environ["TRUST_MARKER"]).touch()
from torch import nn
def make(): return nn.Linear(6, 4)
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    np.savez(d / "data.npz", x=x, y=np.arange(N) % C)
    torch.manual_seed(0)
    torch.save(build_model("mlp", (D,), C).state_dict(), d / "w.pt")
    (d / "trust_marker.py").write_text(MARKER_MODULE)
    e = {"dir": d, "data": d / "data.npz", "w": d / "w.pt", "h5": d / "s.h5", "marker": d / "imported"}
    ok(gen(e, e["h5"]))
    ok(run_cli("train", "--student", "mlp", "--store", str(e["h5"]), "--epochs", "1", "--batch-size", "16",
               "--no-progress", "--out", str(d / "run")))
    old = os.environ.get("TRUST_MARKER")
    os.environ["TRUST_MARKER"] = str(e["marker"])
    sys.path.insert(0, str(d))
    yield e
    sys.path.remove(str(d))
    sys.modules.pop("trust_marker", None)
    os.environ.pop("TRUST_MARKER") if old is None else os.environ.__setitem__("TRUST_MARKER", old)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def gen(env, out, *extra, weights=True):
    args = ["generate", "--teacher", "mlp", "--data", str(env["data"]), "--out", str(out), "--chunk-rows", str(CHUNK),
            "--batch-size", "8", "--no-progress", *(["--weights", str(env["w"])] if weights else []), *extra]
    return run_cli(*map(str, args))


def no_import(env):
    assert not env["marker"].exists(), "a spec read from a file was imported"
    assert "trust_marker" not in sys.modules


# -- 1. recorded specs are data -------------------------------------------------------------------
def test_recorded_specs_never_import(env, tmp_path):
    store = write_store(tmp_path / "f.h5", make_rows(N, C), num_classes=C, source={"spec": "trust_marker:make"})
    r = run_cli("train", "--student", "mlp", "--store", str(store), "--out", str(tmp_path / "r"), "--no-progress")
    assert_one_line_error(r, "records the data spec 'trust_marker:make'", "pass --data trust_marker:make")
    ckpt = torch.load(env["dir"] / "run" / "checkpoint.pt", weights_only=True)
    for spec in ("trust_marker:make", str(tmp_path / "student.pt")):  # code, and a program (TorchScript)
        torch.save({**ckpt, "config": {**ckpt["config"], "student": spec}}, tmp_path / "checkpoint.pt")
        r = run_cli("eval", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--data", str(env["data"]))
        assert_one_line_error(r, f"records the model spec '{spec}'", f"pass --student {spec}")
    no_import(env)
    # Named on the command line, the architecture is used.
    r = ok(run_cli("eval", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--data", str(env["data"]),
                   "--student", "mlp", "--json"))
    assert json.loads(r.stdout)["student"] == "mlp"


def test_report_takes_no_code_from_eval_json(env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(env["dir"] / "run", run)
    (run / "eval.json").write_text(json.dumps({"data": "trust_marker:make", "accuracy": 0.5}))
    r = ok(run_cli("report", str(run), "--out", str(tmp_path / "report.md")))
    no_import(env)
    text = (tmp_path / "report.md").read_text()
    assert "records the data spec 'trust_marker:make'" in text, r.output


# -- 2. .pt2 programs and pickles ------------------------------------------------------------------
def test_pt2_without_pickles_loads_and_allow_pickle_opens_the_rest(env, tmp_path):
    from tests.test_errors import export_linear, pickled_pt2

    clean = export_linear(tmp_path / "clean.pt2")
    ok(run_cli("generate", "--teacher", str(clean), "--data", str(env["data"]), "--out", str(tmp_path / "a.h5"),
               "--no-progress"))
    marker = tmp_path / "unpickled"
    evil = pickled_pt2(tmp_path / "evil.pt2", marker)
    r = run_cli("generate", "--teacher", str(evil), "--data", str(env["data"]), "--out", str(tmp_path / "b.h5"))
    assert_one_line_error(r, "refusing to load", "--allow-pickle")
    assert not marker.exists()
    run_cli("generate", "--teacher", str(evil), "--allow-pickle", "--data", str(env["data"]),
            "--out", str(tmp_path / "b.h5"), "--no-progress")  # (its garbage sample inputs may then fail)
    assert marker.exists()  # the flag really lifts the restriction


def test_train_allow_pickle_for_student_weights(env, tmp_path):
    torch.save(build_model("mlp", (D,), C), tmp_path / "whole.pt")  # a pickled module
    args = ["train", "--student", "mlp", "--student-weights", str(tmp_path / "whole.pt"), "--data", str(env["data"]),
            "--epochs", "1", "--no-progress"]
    assert_one_line_error(run_cli(*args, "--out", str(tmp_path / "a")), "refusing to unpickle", "--allow-pickle")
    ok(run_cli(*args, "--allow-pickle", "--out", str(tmp_path / "b")))


# -- 3. confinement ------------------------------------------------------------------------------
def _outside(tmp_path: Path) -> Path:
    with h5py.File(tmp_path / "outside.h5", "w") as f:
        f["labels"] = np.full(N, 7, np.int64)
        f["raw"] = np.zeros(N, np.int64)
    return tmp_path / "outside.h5"


def _external_link(f, outside):
    del f["labels"]
    f["labels"] = h5py.ExternalLink(str(outside), "/labels")


def _soft_link(f, outside):
    f.move("labels", "labels_real")
    f["labels"] = h5py.SoftLink("/labels_real")


def _external_storage(f, outside):
    raw = outside.with_suffix(".raw")
    raw.write_bytes(np.zeros(N, np.int64).tobytes())
    del f["labels"]
    f.create_dataset("labels", shape=(N,), dtype=np.int64, external=[(str(raw), 0, N * 8)])


def _virtual(f, outside):
    layout = h5py.VirtualLayout(shape=(N,), dtype=np.int64)
    layout[:] = h5py.VirtualSource(str(outside), "labels", shape=(N,))
    del f["labels"]
    f.create_virtual_dataset("labels", layout)


def _group_loop(f, outside):
    f["loop"] = f["/"]  # a hard link back to the root: walking it never ends


def _deep_groups(f, outside):
    g = f
    for _ in range(1200):  # deeper than Python's recursion limit
        g = g.create_group("g")


@pytest.mark.parametrize("edit", [_external_link, _soft_link, _external_storage, _virtual, _group_loop, _deep_groups])
def test_hdf5_store_leading_elsewhere_is_refused(env, tmp_path, edit):
    outside = _outside(tmp_path)
    store = tmp_path / "s.h5"
    shutil.copyfile(env["h5"], store)
    with h5py.File(store, "r+") as f:
        f["unit_done"][1] = 0  # a resume would rewrite unit 1
        f.attrs["status"] = "writing"
        edit(f, outside)
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p != store}
    for r in (run_cli("inspect", str(store)), gen(env, store), gen(env, store, "--repair")):
        assert_one_line_error(r, "must lie inside its own file", "regenerate the store")
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p != store} == before


def _zarr_copy(env, tmp_path):
    store = tmp_path / "s.zarr"
    ok(gen(env, store))
    return store


@pytest.mark.parametrize("kind", ["file", "dir", "dangling", "hardlink"])
def test_zarr_store_leading_elsewhere_is_refused(env, tmp_path, kind):
    store = _zarr_copy(env, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"keep me")
    chunk = store / "logits" / "c.1.0"
    chunk.unlink()
    if kind == "file":
        chunk.symlink_to(victim)
    elif kind == "dangling":
        chunk.symlink_to(outside / "new-file")
    elif kind == "hardlink":
        os.link(victim, chunk)
    else:
        shutil.move(store / "logits", outside / "logits")  # a whole array's directory
        (store / "logits").symlink_to(outside / "logits")
    needle = "hard link" if kind == "hardlink" else "outside the store"
    assert_one_line_error(gen(env, store, "--repair"), needle)
    if kind != "hardlink":  # reading through a hard link changes nothing outside; writing would
        assert_one_line_error(run_cli("inspect", str(store)), needle)
    assert victim.read_bytes() == b"keep me" and not (outside / "new-file").exists()


def test_symlink_inside_the_store_is_fine(env, tmp_path):
    store = _zarr_copy(env, tmp_path)
    (store / "alias").symlink_to(store / "logits")
    ok(run_cli("inspect", "--verify", str(store)))


def test_a_second_path_to_a_store_hits_the_same_lock(env, tmp_path):
    store = _zarr_copy(env, tmp_path)
    (tmp_path / "link.zarr").symlink_to(store)
    (tmp_path / "linkdir").symlink_to(tmp_path)
    with StoreLock(store):
        for path in (tmp_path / "link.zarr", tmp_path / "linkdir" / "s.zarr"):
            assert_one_line_error(gen(env, path), "is being written by another job")


def test_out_never_replaces_an_input(env, tmp_path):
    data = tmp_path / "in.zarr"
    import zarr

    g = zarr.open_group(str(data), mode="w")
    g.create_array("x", data=np.zeros((N, D), np.float32))
    g.create_array("y", data=np.arange(N) % C)
    before = read_plain_tree(data)
    for out in (data, data / "inner.zarr"):  # is the input, lies inside it
        r = gen({**env, "data": f"{data}:x,y"}, out, "--overwrite")
        assert_one_line_error(r, "the input --data", "never overwritten")
    assert read_plain_tree(data) == before
    # train: a store as --out or around it, or a run's model.pt as --student-weights of the same --out
    store = _zarr_copy(env, tmp_path)
    run = tmp_path / "run"
    shutil.copytree(env["dir"] / "run", run)
    for extra, out in ((["--store", str(store)], store), (["--store", str(store)], store / "run"),
                       (["--store", str(env["h5"]), "--student-weights", str(run / "model.pt"), "--overwrite"], run)):
        r = run_cli("train", "--student", "mlp", *extra, "--out", str(out), "--no-progress")
        assert_one_line_error(r, "the input --", "never overwritten")
    # a run directory beside the data (not one of the files train writes) is fine
    shutil.copyfile(env["data"], run / "data.npz")
    ok(run_cli("train", "--student", "mlp", "--data", str(run / "data.npz"), "--epochs", "1", "--no-progress",
               "--overwrite", "--out", str(run)))


def read_plain_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- 4. one teacher per store ------------------------------------------------------------------------
def test_random_teacher_is_explicit_seeded_and_resumes_bit_identical(env, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert_one_line_error(gen(env, a, weights=False), "--random-teacher")
    ok(gen(env, a, "--random-teacher", "--seed", "3", weights=False))
    assert read_plain(a)[1]["teacher"]["init_seed"] == 3
    ok(gen(env, b, "--random-teacher", "--seed", "3", weights=False))
    from softlabels.store.writer import UnitWriter

    w = UnitWriter.resume(b)
    w.invalidate([0, 3])  # as if killed: two units to redo in a new process with a new random draw
    w.close()
    assert_one_line_error(gen(env, b, weights=False), "--random-teacher")
    assert_one_line_error(gen(env, b, "--random-teacher", "--seed", "4", weights=False), "init_seed 3")
    assert_one_line_error(gen(env, b, "--random-teacher", "--seed", "3", "--batch-size", "4", weights=False),
                          "batch_size 8 in the store, 4 asked")
    ok(gen(env, b, "--random-teacher", "--seed", "3", weights=False))
    assert diff_stores(a, b) == []
    c = tmp_path / "c.zarr"
    ok(gen(env, c, "--random-teacher", "--seed", "4", weights=False))
    assert diff_stores(a, c)  # another seed, another teacher


# -- 5. train --resume by store identity -----------------------------------------------------------
def test_train_resume_follows_a_moved_store(env, tmp_path):
    moved = tmp_path / "moved.h5"
    shutil.copyfile(env["h5"], moved)
    run = tmp_path / "run"
    args = ["train", "--student", "mlp", "--batch-size", "16", "--no-progress", "--out", str(run), "--data",
            str(env["data"])]
    ok(run_cli(*args, "--store", str(env["h5"]), "--epochs", "1"))
    # the resume flags a changed epoch count only through --epochs, which is not an identity key
    ok(run_cli(*args, "--store", str(moved), "--epochs", "2", "--resume"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


# -- 6, 7. locks and signals, in real processes ----------------------------------------------------
def _spawn(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "softlabels", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env_extra or {})},
                            cwd=Path(__file__).resolve().parents[1])


def _wait_for(cond, timeout=60.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


def _lock_is_free(path: Path) -> bool:
    try:
        with StoreLock(path):
            return True
    except StoreLocked:
        return False


def _units_done(store: Path) -> int:
    """Units flagged done in a Zarr store being written (a group of flags per file; HDF5 would be locked).

    zarr writes a file as ``<name>.<random>.partial`` and renames it: those, and files replaced
    while listed, are skipped."""
    done = 0
    for p in (store / "unit_done").glob("c.*"):
        try:
            done += 0 if p.name.endswith(".partial") else p.read_bytes().count(b"\x01")
        except FileNotFoundError:
            pass
    return done


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_signals_with_workers_leave_no_lock_and_resume(env, tmp_path, sig):
    big = tmp_path / "big.npz"
    np.savez(big, x=np.random.default_rng(1).standard_normal((400, D)).astype(np.float32), y=np.arange(400) % C)
    store = tmp_path / "s.zarr"
    args = ["generate", "--teacher", "mlp", "--weights", str(env["w"]), "--data", str(big), "--out", str(store),
            "--chunk-rows", "8", "--batch-size", "8", "--num-workers", "2", "--no-progress"]
    p = _spawn(*args, env_extra={"SOFTLABELS_TEST_DELAY_PER_UNIT": "0.2"})  # 50 units: 10 s
    _wait_for(lambda: _units_done(store) >= 2)
    assert p.poll() is None
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert _lock_is_free(store), "a worker or the job still holds the lock"
    if sig != signal.SIGKILL:
        assert p.returncode == 2 and err.strip() == "error: interrupted; rerun the same command to resume", err
    ok(run_cli(*args))
    ref = tmp_path / "ref.zarr"
    ok(run_cli(*[str(ref) if a == str(store) else a for a in args]))
    assert diff_stores(ref, store) == []


def test_train_sigterm_is_ctrl_c_and_two_runs_on_one_out_are_refused(env, tmp_path):
    big = tmp_path / "big.npz"
    np.savez(big, x=np.random.default_rng(1).standard_normal((400, D)).astype(np.float32), y=np.arange(400) % C)
    run = tmp_path / "run"
    args = ["train", "--student", "mlp", "--data", str(big), "--batch-size", "4", "--epochs", "500", "--no-progress",
            "--out", str(run)]
    p = _spawn(*args)
    _wait_for(lambda: not _lock_is_free(run), timeout=120)
    second = run_cli(*args, "--resume")  # while the first one runs
    assert_one_line_error(second, "is being written by another job")
    # once training runs: a signal during start-up's lazy C-extension imports can end the process
    # with -2 after the one line (CPython's own flag; documented), which is not what this tests
    _wait_for(lambda: (run / "metrics.jsonl").exists(), timeout=120)
    p.send_signal(signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        print([l for l in open(f"/proc/{p.pid}/status").read().splitlines() if l.startswith("Sig")])
        p.kill()
        print(p.communicate())
        raise
    assert p.returncode == 2 and "continue with the same command plus --resume" in err and \
        len(err.strip().splitlines()) == 1, err
    assert _lock_is_free(run)
