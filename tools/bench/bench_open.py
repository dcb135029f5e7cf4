"""Benchmark: open a format-v2 store and read its bookkeeping, at many write units.

    python tools/bench/bench_open.py [--units 100000] [--backends hdf5 zarr] [--rounds 5]

Builds one complete store per backend with ``--units`` write units of one sample
each (dense, 4 classes, float16: the data is tiny, the unit count is what costs),
bookkeeping grouped as ``generate`` groups it (``group_units_for``). The arrays are
filled in one write each (not unit by unit: building is not what is measured). Then,
``--rounds`` times, each backend in turn:

* open: ``UnitStore(path)`` (attributes, every array's shape/dtype/chunking and its
  backing storage, ``unit_done``, the completeness check);
* bookkeeping: ``unit_done()`` and every unit's checksum (``unit_checksums``), as a
  reader that plans its epoch or a ``--repair`` scan reads them;
* the baseline, side by side: the storage library alone opening the same store and
  reading the same two arrays (``h5py.File``; ``zarr.open_group``), no checks.

Prints the median seconds of each, their sum against the 0.5 s target (issue 13) and
against the library alone.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for softlabels

from softlabels.store.positions import group_units_for  # noqa: E402
from softlabels.store.reader import UnitStore  # noqa: E402
from softlabels.store.schema import UNIT_CHECKSUMS, UNIT_DONE, StoreMetaV2  # noqa: E402
from softlabels.store.writer import UnitWriter  # noqa: E402


def build(path: Path, units: int) -> None:
    meta = StoreMetaV2(positions="sample", layout="dense", num_samples=units, num_classes=4,
                       logits_dtype="float16", chunk_samples=1, group_units=group_units_for(units))
    w = UnitWriter.create(path, meta)
    b = w._backend  # bulk fill: one write per array
    for name, spec in meta.arrays().items():
        if spec.family in ("position", "sample"):
            b.write(name, 0, np.zeros(spec.shape, spec.dtype))
    b.write(UNIT_CHECKSUMS, 0, np.zeros(units, np.uint32))
    b.write(UNIT_DONE, 0, np.ones(units, np.uint8))
    b.flush()
    w.finish()
    w.close()


def plain_read(kind: str, path: Path) -> float:
    """Seconds for the storage library alone to open the store and read both bookkeeping arrays."""
    t0 = time.perf_counter()
    if kind == "hdf5":
        import h5py

        with h5py.File(path, "r") as f:
            f[UNIT_DONE][...], f[UNIT_CHECKSUMS][...]
    else:
        import zarr

        g = zarr.open_group(str(path), mode="r")
        g[UNIT_DONE][...], g[UNIT_CHECKSUMS][...]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, default=100_000)
    ap.add_argument("--backends", nargs="+", default=["hdf5", "zarr"])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_open_"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # hundreds of thousands of chunk files


def run(args: argparse.Namespace, tmp: Path) -> None:
    paths = {}
    for kind in args.backends:
        paths[kind] = tmp / ("store.h5" if kind == "hdf5" else "store.zarr")
        t0 = time.perf_counter()
        build(paths[kind], args.units)
        print(f"{kind}: built {args.units:,} units in {time.perf_counter() - t0:.1f} s (once)")
    times: dict[str, dict[str, list[float]]] = {k: {"open": [], "bookkeeping": [], "plain": [], "cpu": []} for k in paths}
    for _ in range(args.rounds):
        for kind, path in paths.items():
            c0, t0 = time.process_time(), time.perf_counter()
            store = UnitStore(path)
            t1 = time.perf_counter()
            done = store.unit_done()
            sums = store._handle().read(UNIT_CHECKSUMS, 0, store.num_units)
            t2 = time.perf_counter()
            times[kind]["cpu"].append(time.process_time() - c0)
            assert done.all() and len(sums) == args.units
            store.close()
            times[kind]["open"].append(t1 - t0)
            times[kind]["bookkeeping"].append(t2 - t1)
            times[kind]["plain"].append(plain_read(kind, path))
    print(f"{args.units:,} units, median of {args.rounds} (wall seconds; cpu: user + system of open + bookkeeping)")
    print(f"{'backend':8s} {'open':>8s} {'bookkeeping':>12s} {'total':>8s} {'cpu':>6s} {'library alone':>14s} "
          f"{'ratio':>6s}  target < 0.5 s")
    for kind, t in times.items():
        o, k, b, c = (statistics.median(t[key]) for key in ("open", "bookkeeping", "plain", "cpu"))
        print(f"{kind:8s} {o:8.3f} {k:12.3f} {o + k:8.3f} {c:6.3f} {b:14.3f} {(o + k) / b:5.1f}x  "
              f"{'met' if o + k < 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
