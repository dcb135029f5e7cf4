"""Hostile content: damaged or lying stores, checkpoints and run directories, through the real CLI.

Each test builds hostile files here (tiny: a few KB each), then runs commands on them in a
child process under a memory limit (RLIMIT_AS) and a CPU-time limit, with a planted module
on PYTHONPATH that leaves a marker file if anything imports it (the stores and checkpoints
name it as their spec). Every command must end with exit 0 or with exactly one ``error:``
line (exit 2) and no traceback, write nothing outside its work directory, never import the
planted module, and stay within the peak memory bound (``ru_maxrss`` of the child, from
``os.wait4``). To keep the suite fast, one child runs a batch of commands through click's
runner (the real CLI code); one test also runs ``python -m softlabels`` itself.

Hooks for hostile content handled elsewhere: ``EXTRA_MUTATIONS`` takes more store
mutations (links leaving the store, for instance) as ``name -> (build, must_fail)``. Stores
of both format versions are attacked: the good ones are written by ``generate`` (format 2)
and by the plain format-1 writer of tests/_v1stores.py.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from softlabels.store.schema import StoreMetaV2
from tests._v1stores import crc, write_v1
from tests.conftest import read_plain, run_cli

ROOT = Path(__file__).resolve().parents[1]
N, D, C, CHUNK = 40, 6, 4, 16
MEMORY_LIMIT = 3 << 30  # address space of a child (torch alone maps ~0.8 GiB)
PEAK_BOUND = (1 << 30) + (512 << 20)  # the 1 GiB read limit plus the interpreter, torch and h5py
CPU_SECONDS = 240

COMMANDS = ("inspect", "verify", "train", "eval", "repair")

PLANTED = """
import pathlib
pathlib.Path(__file__).with_name("IMPORTED").write_text("imported")
def make(*a, **k): raise SystemExit(0)
"""

DRIVER = r"""
import json, sys, traceback
from click.testing import CliRunner
from softlabels.cli import main
out = []
for args in json.loads(open(sys.argv[1]).read()):
    r = CliRunner().invoke(main, args)
    tb = "" if r.exception is None or isinstance(r.exception, SystemExit) else \
        "Traceback\n" + "".join(traceback.format_exception(r.exception))
    out.append({"args": args, "code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr + tb})
open(sys.argv[2], "w").write(json.dumps(out))
"""


# -- the world: data, weights, a good store of each kind, a training run ----------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("adversarial")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.standard_normal((N, D)).astype(np.float32), y=np.arange(N) % C)
    from softlabels.teacher.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("mlp", (D,), C).state_dict(), d / "w.pt")
    for out, extra in (("s.h5", []), ("s.zarr", []), ("k.h5", ["--layout", "topk", "--topk", "2"])):
        r = run_cli("generate", "--teacher", "mlp", "--weights", str(d / "w.pt"), "--data", str(d / "data.npz"),
                    "--chunk-rows", str(CHUNK), "--batch-size", "8", "--no-progress", "--out", str(d / out), *extra)
        assert r.exit_code == 0, r.output
    r = run_cli("train", "--student", "mlp", "--epochs", "1", "--batch-size", "16", "--no-progress",
                "--store", str(d / "s.h5"), "--data", str(d / "data.npz"), "--out", str(d / "run"))
    assert r.exit_code == 0, r.output
    arrays, attrs = read_plain(d / "s.h5")  # the same teacher outputs as a format-1 store
    write_v1(d / "v1.h5", {k: arrays[k] for k in ("logits", "labels", "sample_ids")}, num_classes=C, chunk_rows=CHUNK,
             teacher=attrs["teacher"], source=attrs["source"])
    return d


# -- hostile stores: each mutation edits a copy of a good store ------------------------------------
def _attrs(path: Path, **attrs: Any) -> None:
    if path.suffix == ".zarr":
        zarr.open_group(str(path), mode="r+").attrs.update(attrs)
        return
    with h5py.File(path, "r+") as f:
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, dict) else v


def _array(path: Path, name: str, edit: Callable[[np.ndarray], None]) -> None:
    """Edit one array in place (checksums left as they were, unless the edit is to them)."""
    node = zarr.open_group(str(path), mode="r+")[name] if path.suffix == ".zarr" else None
    if node is not None:
        a = node[...]
        edit(a)
        node[...] = a
        return
    with h5py.File(path, "r+") as f:
        a = f[name][...]
        edit(a)
        f[name][...] = a


def _rechecksum(path: Path) -> None:
    """Make the checksums agree with the (hostile) content: only the content checks can catch it."""
    arrays, attrs = read_plain(path)
    if attrs["softlabels_format"] == 1:
        rows = attrs["chunk_rows"]
        sums = [crc({k: v[c * rows:(c + 1) * rows] for k, v in arrays.items() if k not in ("chunk_done", "checksums")},
                    attrs["checksum"]) for c in range(len(arrays["checksums"]))]
        _array(path, "checksums", lambda a: a.__setitem__(slice(None), sums))
        return
    from softlabels.store.schema import unit_checksum

    meta = StoreMetaV2.from_attrs(attrs)  # a sample store: a unit's positions are its samples
    sums = [unit_checksum(meta, {k: arrays[k][slice(*meta.geometry.unit_samples_range(u))]
                                 for k in meta.checksum_order()}) for u in range(meta.num_units)]
    _array(path, "unit_checksums", lambda a: a.__setitem__(slice(None), sums))


def claimed(path: Path, num_samples: int, num_classes: int, chunk_rows: int, done: int) -> None:
    """Replace the store by one of its version whose attributes and shapes agree, claiming data it does not hold."""
    version = read_plain(path)[1]["softlabels_format"] if path.suffix == ".h5" else 2
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    status, plant = "complete" if done else "writing", {"spec": "advplant:make"}
    if version == 2:
        meta = StoreMetaV2(positions="sample", layout="dense", num_samples=num_samples, num_classes=num_classes,
                           chunk_samples=chunk_rows, status=status, source=plant, teacher=plant)
        attrs, flags = meta.to_attrs(), "unit_done"
        arrays = {name: (a.shape, a.dtype, a.chunk) for name, a in meta.arrays().items()}
    else:
        chunks = -(-num_samples // chunk_rows)
        attrs = {"softlabels_format": 1, "status": status, "layout": "dense", "num_samples": num_samples,
                 "num_classes": num_classes, "logits_dtype": "float32", "chunk_rows": chunk_rows, "teacher": plant,
                 "source": plant, "created_by": {}}
        flags = "chunk_done"
        arrays = {"logits": ((num_samples, num_classes), np.float32, chunk_rows),
                  "labels": ((num_samples,), np.int64, chunk_rows),
                  "sample_ids": ((num_samples,), np.int64, chunk_rows),
                  "chunk_done": ((chunks,), np.uint8, 1), "checksums": ((chunks,), np.uint32, 1)}
    if path.suffix == ".zarr":
        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        g.attrs.update(attrs)
        for name, (shape, dtype, chunk) in arrays.items():
            g.create_array(name, shape=shape, dtype=dtype, fill_value=0, chunks=(chunk,) + shape[1:])
        if done:
            g[flags][:] = 1
        return
    with h5py.File(path, "w") as f:  # chunks never allocated: h5py's default
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, dict) else v
        for name, (shape, dtype, chunk) in arrays.items():
            f.create_dataset(name, shape=shape, dtype=dtype, chunks=(max(1, min(chunk, shape[0])),) + shape[1:])
        if done:
            f[flags][:] = 1


def damage_json(path: Path, which: str, how: str) -> None:
    file = path / which / "zarr.json" if which else path / "zarr.json"
    text = file.read_bytes()
    file.write_bytes({"empty": b"", "cut": text[: len(text) // 2], "bytes": b"\xff\xfe\x00{", "list": b"[1, 2]",
                      "nested": b"[" * 100_000, "not-array": b'{"zarr_format": 3, "node_type": "array"}'}[how])


def truncate(path: Path, fraction: float) -> None:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")
        path = files[int(fraction * (len(files) - 1))]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# name -> (base store, build(path, draw-params), commands that must fail)
MUTATIONS: dict[str, tuple[str, Callable[..., None], tuple[str, ...]]] = {
    "huge-h5": ("s.h5", lambda p, x: claimed(p, 10 ** (6 + x % 4), 10 ** (3 + x % 3), 1 << 16, done=1), COMMANDS),
    # chunks of 16 MB (read) or 4 GB (refused): zarr fills a missing chunk's zeros in memory
    "huge-zarr": ("s.zarr", lambda p, x: claimed(p, 10 ** (6 + x % 3), [4, 1000][x % 2], 1 << 20, done=x // 2 % 2),
                  ("train", "eval")),
    "many-chunks": ("s.h5", lambda p, x: _attrs(p, num_samples=(1 << 24) + 1 + x, chunk_samples=1), COMMANDS),
    "attrs-lie": ("s.h5", lambda p, x: _attrs(p, num_samples=N + 1 + x), COMMANDS),
    "topk-lie": ("k.h5", lambda p, x: _attrs(p, layout_params={"k": 3 + x}), COMMANDS),
    "zarr-json": ("s.zarr", lambda p, x: damage_json(p, ["", "logits", "labels", "unit_done", "unit_checksums",
                                                          "sample_ids"][x % 6],
                                                     ["empty", "cut", "bytes", "list", "nested", "not-array"][x % 5]),
                  COMMANDS),
    "h5-json-attr": ("s.h5", lambda p, x: _attrs(p, teacher=["{", "", "[" * 5000][x % 3]), COMMANDS),
    "duplicate-ids": ("s.h5", lambda p, x: (_array(p, "sample_ids", lambda a: a.__setitem__(x % N, (x + 1) % N)),
                                            _rechecksum(p)), ("train", "eval")),
    "repeated-topk": ("k.h5", lambda p, x: (_array(p, "topk_indices", lambda a: a.__setitem__(
        (x % N, 1), a[x % N, 0])), _rechecksum(p)), ()),
    "nan-logits": ("s.h5", lambda p, x: (_array(p, "logits", lambda a: a.__setitem__(slice(None), np.nan)),
                                         _rechecksum(p)), ("train",)),
    "truncated": ("s.zarr", lambda p, x: truncate(p, (x % 10) / 10), ()),
    "truncated-h5": ("s.h5", lambda p, x: truncate(p, (x % 10) / 10), ()),
    "labels-range": ("s.h5", lambda p, x: (_array(p, "labels", lambda a: a.__setitem__(x % N, [C, -2, 2**62][x % 3])),
                                           _rechecksum(p)), ("train", "eval")),
    # format 1, read through its own validation
    "v1-huge": ("v1.h5", lambda p, x: claimed(p, 10 ** (6 + x % 4), 10 ** (3 + x % 3), 1 << 16, done=1), COMMANDS),
    "v1-many-chunks": ("v1.h5", lambda p, x: _attrs(p, num_samples=(1 << 24) + 1 + x, chunk_rows=1), COMMANDS),
    "v1-attrs-lie": ("v1.h5", lambda p, x: _attrs(p, **[{"num_samples": N + 1 + x}, {"layout": "topk"},
                                                      {"logits_dtype": "int8"}, {"teacher": "[1]"}][x % 4]), COMMANDS),
    "v1-duplicate-ids": ("v1.h5", lambda p, x: (_array(p, "sample_ids", lambda a: a.__setitem__(x % N, (x + 1) % N)),
                                                _rechecksum(p)), ("train", "eval", "repair")),
    "v1-labels-range": ("v1.h5", lambda p, x: (_array(p, "labels", lambda a: a.__setitem__(x % N, [C, -2][x % 2])),
                                               _rechecksum(p)), ("train", "eval", "repair")),
}
EXTRA_MUTATIONS: dict[str, tuple[str, Callable[..., None], tuple[str, ...]]] = {}  # links: see the module doc


def _commands(mutation: str) -> tuple[str, ...]:
    return COMMANDS


def store_args(world: Path, command: str, store: Path, work: Path) -> list[str]:
    data = str(world / "data.npz")
    return {
        "inspect": ["inspect", str(store)],
        "verify": ["inspect", "--verify", str(store)],
        "train": ["train", "--student", "mlp", "--epochs", "1", "--batch-size", "16", "--no-progress",
                  "--store", str(store), "--data", data, "--out", str(work / "run")],
        "eval": ["eval", "--checkpoint", str(world / "run"), "--data", data, "--store", str(store), "--json"],
        "repair": ["generate", "--teacher", "mlp", "--weights", str(world / "w.pt"), "--data", data, "--chunk-rows",
                   str(CHUNK), "--batch-size", "8", "--no-progress", "--out", str(store), "--repair"]
                  + (["--layout", "topk", "--topk", "2"] if store.stem.startswith("k") else []),
    }[command]


# -- hostile checkpoints and run directories -----------------------------------------------------------
def _ckpt(run: Path, **fields: Callable[[dict], Any]) -> None:
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**ck, **{k: f(ck) for k, f in fields.items()}}, run / "checkpoint.pt")


RUN_MUTATIONS: dict[str, Callable[[Path, int], None]] = {
    "epoch": lambda r, x: _ckpt(r, epoch=lambda ck: ["x", -1, 2**70, None, 1.5][x % 5]),
    "step": lambda r, x: _ckpt(r, step=lambda ck: ["x", -5, None][x % 3]),
    "optimizer": lambda r, x: _ckpt(r, optimizer=lambda ck: [{}, {"state": 1}, [1], None][x % 4]),
    "scheduler": lambda r, x: _ckpt(r, scheduler=lambda ck: [[], {"last_epoch": "x"}, None][x % 3]),
    "rng": lambda r, x: _ckpt(r, rng=lambda ck: [{}, {**ck["rng"], "numpy": []}, {**ck["rng"], "torch": 3}][x % 3]),
    "config": lambda r, x: _ckpt(r, config=lambda ck: [[], {**ck["config"], "input_shape": "6"},
                                                        {**ck["config"], "num_classes": 0}][x % 3]),
    "model": lambda r, x: _ckpt(r, model=lambda ck: [{"a": 1}, {}, {k: torch.zeros(2) for k in ck["model"]}][x % 3]),
    "pickle": lambda r, x: torch.save({"format": 1, "obj": threading.Lock}, r / "checkpoint.pt"),
    "truncated": lambda r, x: truncate(r / "checkpoint.pt", (x % 10) / 10),
    "metrics": lambda r, x: (r / "metrics.jsonl").write_bytes([b"{", b"\xff" * 9, b"[1]\n" * 3][x % 3]),
}


# A torn metrics line is dropped on resume (that epoch reruns) and eval never reads it; eval loads a
# run's weights from model.pt, so well-formed tensors of the wrong shape in the checkpoint's model pass.
RUN_MAY_PASS = {("metrics", "train"), ("metrics", "eval"), ("model", "eval")}
# Hook: a checkpoint whose config names "advplant:make" as its student joins RUN_MUTATIONS once eval
# accepts only built-in specs and plain paths from recorded configs (the planted module must stay unimported).


def run_args(world: Path, command: str, run: Path) -> list[str]:
    data = str(world / "data.npz")
    if command == "eval":
        return ["eval", "--checkpoint", str(run), "--data", data, "--json"]
    return ["train", "--student", "mlp", "--epochs", "2", "--batch-size", "16", "--no-progress", "--resume",
            "--store", str(world / "s.h5"), "--data", data, "--out", str(run)]


# -- running a batch in a limited child ------------------------------------------------------------------
def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` but the commands' own places (work/, and the hostile copies in case/)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
            if p.is_file() and not {"work", "case"} & set(p.relative_to(path).parts)}


def run_limited(tmp: Path, argv: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``python argv`` in ``tmp/work`` under the limits; return its result and peak RSS in bytes."""
    plant, work = tmp / "plant", tmp / "work"
    plant.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    (plant / "advplant.py").write_text(PLANTED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plant), str(ROOT)]), "HOME": str(work),
           "TMPDIR": str(work)}
    env.pop("SOFTLABELS_MAX_READ_BYTES", None)
    before = _tree(tmp)
    with open(work / "stdout", "w+") as out, open(work / "stderr", "w+") as err:
        p = subprocess.Popen([sys.executable, *argv], cwd=work, env=env, stdout=out, stderr=err, preexec_fn=_limits)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(argv, p.returncode, out.read(), err.read())
    assert not (plant / "IMPORTED").exists(), "a planted module named by hostile content was imported"
    after = _tree(tmp)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"files outside the work and case directories changed: {changed}"
    return result, usage.ru_maxrss * 1024


def run_batch(tmp: Path, batch: list[tuple[str, list[str], bool]]) -> None:
    """``batch``: (label, CLI args, must fail). One child runs them all; then every check."""
    (tmp / "cases.json").write_text(json.dumps([args for _, args, _ in batch]))
    (tmp / "driver.py").write_text(DRIVER)
    results = tmp / "work" / "results.json"
    proc, peak = run_limited(tmp, [str(tmp / "driver.py"), str(tmp / "cases.json"), str(results)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert peak <= PEAK_BOUND, f"peak memory {peak / 2**20:.0f} MiB over {PEAK_BOUND / 2**20:.0f} MiB"
    for (label, _, must_fail), r in zip(batch, json.loads(results.read_text())):
        assert_clean(label, r["code"], r["stdout"], r["stderr"], must_fail)


def assert_clean(label: str, code: int, stdout: str, stderr: str, must_fail: bool) -> None:
    assert "Traceback" not in stdout + stderr, f"{label}: traceback\n{stderr[-3000:]}"
    ok = (2,) if must_fail else (0, 2)
    if "corrupt chunks (" in stdout:  # inspect --verify lists damaged chunks in its table and exits 1
        ok += (1,)
    assert code in ok, f"{label}: exit {code}\n{stdout[-500:]}{stderr[-1500:]}"
    if code == 2:
        lines = stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1].startswith("error: "), f"{label}: {stderr[-1500:]}"


def build_store(world: Path, tmp: Path, mutation: str, x: int, tag: str = "") -> Path:
    """A fresh hostile copy per command (repair may fix what it is given)."""
    base, build, _ = {**MUTATIONS, **EXTRA_MUTATIONS}[mutation]
    dest = tmp / "case" / f"{mutation}-{x}-{tag}" / base
    dest.parent.mkdir(parents=True)
    (shutil.copytree if (world / base).is_dir() else shutil.copyfile)(world / base, dest)
    build(dest, x)
    return dest


def build_run(world: Path, tmp: Path, mutation: str, x: int, tag: str = "") -> Path:
    dest = tmp / "case" / f"run-{mutation}-{x}-{tag}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(world / "run", dest)
    RUN_MUTATIONS[mutation](dest, x)
    return dest


def store_case(world: Path, tmp: Path, mutation: str, x: int, command: str) -> tuple[str, list[str], bool]:
    store = build_store(world, tmp, mutation, x, command)
    must_fail = command in {**MUTATIONS, **EXTRA_MUTATIONS}[mutation][2]
    args = store_args(world, command, store, tmp / "work" / f"{mutation}-{x}-{command}")
    return f"{mutation}[{x}] {command}", args, must_fail


def run_case(world: Path, tmp: Path, mutation: str, x: int, command: str) -> tuple[str, list[str], bool]:
    run = build_run(world, tmp, mutation, x, command)
    return f"run {mutation}[{x}] {command}", run_args(world, command, run), (mutation, command) not in RUN_MAY_PASS


# -- the tests -------------------------------------------------------------------------------------------
def test_every_store_mutation_with_every_command(world, tmp_path):
    """Each hostile store kind, once, under each command it applies to."""
    batch = [store_case(world, tmp_path, m, 1, cmd) for m in MUTATIONS for cmd in _commands(m)]
    run_batch(tmp_path, batch)


def test_every_checkpoint_mutation(world, tmp_path):
    """Damaged checkpoints and run directories, under train --resume and eval."""
    run_batch(tmp_path, [run_case(world, tmp_path, m, x, cmd) for m in RUN_MUTATIONS for x in (0, 1)
                         for cmd in ("train", "eval")])


NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)  # each example is a child process: report, do not shrink


def _draw(kind: str):
    names = sorted(MUTATIONS) if kind == "store" else sorted(RUN_MUTATIONS)
    return st.lists(st.tuples(st.sampled_from(names), st.integers(0, 1000), st.sampled_from(COMMANDS)),
                    min_size=4, max_size=8, unique_by=lambda t: (t[0], t[1]))


def _drawn_batch(world: Path, tmp: Path, cases) -> list[tuple[str, list[str], bool]]:
    batch = []
    for m, x, cmd in cases:
        if m in RUN_MUTATIONS:
            batch.append(run_case(world, tmp / "r", m, x, "eval" if cmd in ("inspect", "eval") else "train"))
        elif cmd in _commands(m):
            batch.append(store_case(world, tmp, m, x, cmd))
    return batch


@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck), phases=NO_SHRINK)
@given(stores=_draw("store"), runs=_draw("run"))
def test_drawn_hostile_content(world, tmp_path_factory, stores, runs):
    tmp = tmp_path_factory.mktemp("drawn")
    run_batch(tmp, _drawn_batch(world, tmp, stores + runs))


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), phases=NO_SHRINK)
@given(stores=_draw("store"), runs=_draw("run"))
def test_drawn_hostile_content_many(world, tmp_path_factory, stores, runs):
    tmp = tmp_path_factory.mktemp("drawn")
    run_batch(tmp, _drawn_batch(world, tmp, stores + runs))


def test_console_entry_point_one_line(world, tmp_path):
    """The real ``python -m softlabels`` (no click runner) on a hostile store: one line, bounded."""
    store = build_store(world, tmp_path, "huge-h5", 3)
    proc, peak = run_limited(tmp_path, ["-m", "softlabels", "inspect", "--verify", str(store)])
    assert_clean("python -m softlabels inspect --verify", proc.returncode, proc.stdout, proc.stderr, True)
    assert peak <= PEAK_BOUND
