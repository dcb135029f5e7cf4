"""`torchrun --nproc-per-node=2 ... softlabels generate` (gloo, CPU) equals the one-process store.

One torchrun launch (tests/_torchrun.py) runs every case: Zarr (plain
and sharded), HDF5 (rank 0 writes what the ranks gather to it), resuming partial
stores of both backends, and a non-finite error that must stop both ranks with a
single ``error:`` line from rank 0.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import zarr

from softlabels.store.writer import UnitWriter
from tests._torchrun import run_two_ranks
from tests.test_generate import (  # noqa: F401 - tiny is a fixture
    assert_same_store,
    gen_args,
    ok,
    read_plain,
    run_cli,
    status,
    tiny,
)

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
    results = run_two_ranks(tmp_path, cases, timeout=150)

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

