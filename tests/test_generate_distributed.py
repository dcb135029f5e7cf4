"""`torchrun --nproc-per-node=2 ... softlabels generate` (gloo, CPU) equals the one-process store.

One torchrun launch runs every case through the CLI (``softlabels.cli.main``) in
the same two processes, so the cost of starting torch is paid once: Zarr (plain
and sharded), HDF5 (rank 0 writes what the ranks gather to it), resuming partial
stores of both backends, and a non-finite error that must stop both ranks with a
single ``error:`` line from rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import zarr

from softlabels.store.writer import UnitWriter
from tests.test_generate import (  # noqa: F401 - tiny is a fixture
    assert_same_store,
    gen_args,
    ok,
    read_plain,
    run_cli,
    status,
    tiny,
)

DRIVER = '''
import contextlib, faulthandler, io, json, os, sys
import click
faulthandler.dump_traceback_later(100, exit=True)  # a hang shows where, instead of a silent timeout
from softlabels.cli import main

rank = int(os.environ["RANK"])
with open(sys.argv[1]) as f:
    cases = json.load(f)
with open(os.path.join(sys.argv[2], f"results-{rank}.jsonl"), "w") as out:
    for name, args in cases:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                main(args, standalone_mode=False)
                code = 0
            except click.ClickException as err:
                err.show()
                code = err.exit_code
            except SystemExit as err:
                code = err.code
        out.write(json.dumps({"name": name, "code": code, "output": buf.getvalue()}) + "\\n")
'''

CASES = {  # name -> extra generate options
    "plain.zarr": (),
    "sharded.zarr": ("--shard-chunks", "2", "--layout", "topk", "--topk", "3", "--dtype", "bfloat16"),
    "dense.h5": ("--dtype", "float16"),
    "topk.h5": ("--layout", "topk", "--topk", "4"),
    "resume.h5": (),
    "resume.zarr": ("--shard-chunks", "2"),
}


def _make_partial(path: Path, units: list[int], rows: list[tuple[int, int]]) -> None:
    """A store with some units unflagged and their rows zeroed, as a crash would leave it."""
    w = UnitWriter.resume(path)
    w.invalidate(units)
    w.close()
    if path.suffix == ".h5":
        with h5py.File(path, "r+") as f:
            for a, b in rows:
                f["logits"][a:b] = 0
    else:
        g = zarr.open_group(str(path), mode="r+")
        for a, b in rows:
            g["logits"][a:b] = 0


def test_two_ranks_equal_one_process(tmp_path, tiny):
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    for name, extra in CASES.items():
        ok(run_cli(*gen_args(tiny, single / name, *extra)))
    shutil.copyfile(single / "resume.h5", multi / "resume.h5")
    shutil.copytree(single / "resume.zarr", multi / "resume.zarr")
    _make_partial(multi / "resume.h5", [1, 4, 5], [(16, 32), (64, 96)])
    _make_partial(multi / "resume.zarr", [1], [(32, 64)])  # one whole shard: unit 1

    cases = [[name, gen_args(tiny, multi / name, *extra)] for name, extra in CASES.items()]
    cases += [[f"nan{suffix}", gen_args(tiny, multi / f"nan{suffix}", data=str(tiny["nan"]))]
              for suffix in (".h5", ".zarr")]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "driver.py").write_text(DRIVER)
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2",
           str(tmp_path / "driver.py"), str(tmp_path / "cases.json"), str(tmp_path)]
    if not Path(cmd[0]).exists():
        cmd[:1] = [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [{r["name"]: r for r in map(json.loads, (tmp_path / f"results-{rank}.jsonl").read_text().splitlines())}
               for rank in (0, 1)]

    for name in CASES:
        r0, r1 = results[0][name], results[1][name]
        assert (r0["code"], r1["code"]) == (0, 0), (name, r0, r1)
        assert r0["output"].startswith("wrote ") and r1["output"] == ""  # only rank 0 prints
        assert_same_store(multi / name, single / name)
        assert status(multi / name) == "complete"
        assert read_plain(multi / name)[1]["created_by"]["timings"]["ranks"] == 2
    for suffix in (".h5", ".zarr"):
        r0, r1 = results[0][f"nan{suffix}"], results[1][f"nan{suffix}"]
        assert (r0["code"], r1["code"]) == (2, 2)
        lines = r0["output"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "non-finite" in lines[0], r0["output"]
        assert r1["output"] == "" and "Traceback" not in r0["output"]
        assert status(multi / f"nan{suffix}") == "writing"
        assert not (multi / f"nan{suffix}.lock").exists()

