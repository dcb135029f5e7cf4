"""`torchrun --nproc-per-node=2 ... softlabels generate` on token data (gloo, CPU) writes the one-process store.

One torchrun launch (tests/_torchrun.py) runs every case
through the CLI: a sampled Zarr store (draws hashed per sample and token, so the ranks
draw what one process draws), a sharded top-k Zarr store and a dense one (HDF5 under
torchrun is refused for token stores on this branch). Every array and every root attribute but the timings must be
equal bit for bit to the one-process store, read with zarr / h5py alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import zarr

from tests._lmstore import ragged_data
from tests.conftest import run_cli
from tests._torchrun import run_two_ranks

V = 50
LENGTHS = [5, 1, 9, 3, 7, 2, 8, 4, 6, 11, 1, 10, 3]
CASES = {
    "sampled.zarr": ("--layout", "sampled", "--samples", "12", "--dtype", "float16"),
    "topk.zarr": ("--layout", "topk", "--topk", "4", "--shard-chunks", "2"),
    "dense.zarr": ("--dtype", "bfloat16"),
}


def _args(spec: str, out: Path, *extra: str) -> list[str]:
    return ["generate", "--teacher", "gpt-tiny", "--random-teacher", "--seed", "3", "--num-classes", str(V),
            "--data", spec, "--chunk-rows", "2", "--batch-size", "3", "--device", "cpu", "--no-progress",
            "--out", str(out), *extra]


def _plain(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Every array and the root attributes but ``created_by`` (timings, ranks), with zarr or h5py alone."""
    if path.suffix == ".zarr":
        g = zarr.open_group(str(path), mode="r")
        arrays = {name: np.asarray(a[...]) for name, a in g.arrays()}
        attrs = dict(g.attrs)
    else:
        with h5py.File(path, "r") as f:
            arrays = {name: f[name][...] for name in f.keys()}
            attrs = {k: f.attrs[k] for k in f.attrs}
    attrs = {k: v for k, v in attrs.items() if k != "created_by"}
    return arrays, attrs


def test_two_ranks_write_the_token_store_of_one_process(tmp_path):
    spec, _ = ragged_data(tmp_path / "tokens.npz", LENGTHS, V)
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    for name, extra in CASES.items():
        r = run_cli(*_args(spec, single / name, *extra))
        assert r.exit_code == 0, r.output
    cases = [[name, _args(spec, multi / name, *extra)] for name, extra in CASES.items()]
    results = run_two_ranks(tmp_path, cases, timeout=300)
    for name in CASES:
        r0, r1 = results[0][name], results[1][name]
        assert (r0["code"], r1["code"]) == (0, 0), (name, r0, r1)
        # only rank 0 prints, and it counts every rank's tokens
        assert f"wrote {len(LENGTHS)} sequences ({sum(LENGTHS)} tokens)" in r0["output"] and r1["output"] == ""
        (a, attrs_a), (b, attrs_b) = _plain(multi / name), _plain(single / name)
        assert attrs_a["status"] == "complete" and json.dumps(attrs_a, sort_keys=True, default=str) == \
            json.dumps(attrs_b, sort_keys=True, default=str)
        assert a.keys() == b.keys() and "offsets" in a
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), (name, key)
