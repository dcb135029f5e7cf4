"""Benchmark: what the per-unit value checks cost a reader, against plain reads.

    python tools/bench/bench_values.py [--units 16] [--rounds 7] [--backends hdf5 zarr]

Builds one complete store per case (random values, written with UnitWriter in one bulk write),
chunked as ``generate`` chunks it (``default_chunk_rows``: ~1 MiB, at most 4,096 samples per
unit), with ``--units`` write units:

* ``views topk``: N samples x 4 views, top-5 of 100 classes, ``crop(32,padding=4)+flip``
  parameters in range (the position kind with the most to check);
* ``sample dense``: N samples x 100 float32 logits;
* ``sample sampled``: N samples, S = 12 draws of 1,000 classes.

Then, ``--rounds`` times (after a warm-up round), each store in turn, every unit is read five ways,
side by side, each way first in turn:

* ``plain``: the storage library alone (``h5py`` / ``zarr`` slices of every array the
  reader returns), no checks: the honest baseline;
* ``reader, no checks``: ``UnitStore.read_unit(verify=False)`` with the value checks
  replaced by a no-op;
* ``reader, old checks``: labels and the layout's check only (what readers checked before
  the position kinds' checks);
* ``reader``: every value check (labels, the position kind's ``value_problems``, the layout);
* ``reader + checksum``: the same with each unit's checksum verified (how ``train`` reads).

Prints the least CPU seconds (``time.process_time``: the machine is shared, and wall time
measures the neighbours) of each, and the ratios: the checks' cost against the plain reads (all of them, and the
position kinds' alone) and against a checksummed read (target: at most 5 %).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for softlabels

import softlabels.store.reader as reader_module  # noqa: E402
from softlabels.inputs.augment import draw_views, parse_augment  # noqa: E402
from softlabels.store.format import default_chunk_rows  # noqa: E402
from softlabels.store.layouts import make_layout, to_numpy  # noqa: E402
from softlabels.store.reader import UnitStore  # noqa: E402
from softlabels.store.schema import StoreMetaV2, check_unit  # noqa: E402
from softlabels.store.writer import UnitWriter  # noqa: E402

AUGMENT, V = "crop(32,padding=4)+flip", 4
CASES = {  # name -> (positions, layout, classes, layout params)
    "views topk": ("views", "topk", 100, {"k": 5}),
    "sample dense": ("sample", "dense", 100, {}),
    "sample sampled": ("sample", "sampled", 1000, {"samples": 12, "seed": 0}),
}


def build(path: Path, case: str, units: int) -> None:
    positions, layout, c, params = CASES[case]
    lay = make_layout(layout, num_classes=c, **params)
    per_sample = lay.bytes_per_position * (V if positions == "views" else 1)
    chunk = default_chunk_rows(per_sample, 1)
    n = units * chunk
    rows = n * (V if positions == "views" else 1)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, c, generator=gen)
    ids = torch.arange(rows)
    enc = {k: to_numpy(t) for k, t in lay.encode(logits, sample_ids=ids, positions=ids).items()}
    extra = {}
    arrays = {"labels": np.arange(n) % c, "sample_ids": np.arange(n)}
    if positions == "views":
        aug = parse_augment(AUGMENT)
        extra["views"] = {"count": V, "augment": AUGMENT, "seed": 0, "param_dtype": "uint8",
                          "param_names": ["crop.0", "crop.1", "flip.0"]}
        arrays["view_params"] = draw_views(aug, 0, torch.arange(n), V, (3, 32, 32)).numpy().astype(np.uint8)
        enc = {k: v.reshape(n, V, *v.shape[1:]) for k, v in enc.items()}
    meta = StoreMetaV2(positions=positions, layout=layout, num_samples=n, num_classes=c, chunk_samples=chunk,
                       layout_params=lay.params(), source={"input_shape": [3, 32, 32]}, **extra)
    with UnitWriter.create(path, meta) as w:
        w.write(0, **enc, **arrays)
        w.finish()


def plain_reader(path: Path):
    """A function reading unit u's arrays with the storage library alone."""
    with UnitStore(path) as store:
        names = [k for k, a in store.meta.arrays().items() if a.family in ("position", "sample")]
        units = [store.meta.geometry.unit_samples_range(u) for u in range(store.meta.num_units)]
    if path.suffix == ".zarr":
        import zarr

        g = zarr.open_group(str(path), mode="r")
        arrays = [g[name] for name in names]
    else:
        import h5py

        f = h5py.File(path, "r")
        arrays = [f[name] for name in names]
    return lambda u: [a[units[u][0]:units[u][1]] for a in arrays]


def old_checks(meta, block, *, where, fix, positions=None, layout=None):
    """Labels and the layout's check: what the reader checked before the position kinds' checks."""
    check_unit(meta, block, where=where, fix=fix, positions=None, layout=layout)


def time_reads(path: Path, checks, verify: bool = False) -> float:
    """CPU seconds to read every unit with the reader, ``checks`` standing in for the value checks
    (``verify``: and each unit's checksum, as ``train`` reads)."""
    reader_module.check_unit = checks
    try:
        with UnitStore(path) as store:
            t0 = time.process_time()
            for u in range(store.meta.num_units):
                store.read_unit(u, verify=verify)
            return time.process_time() - t0
    finally:
        reader_module.check_unit = check_unit


def time_plain(path: Path) -> float:
    read = plain_reader(path)
    units = UnitStore(path).meta.num_units
    t0 = time.process_time()
    for u in range(units):
        read(u)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--backends", nargs="+", default=["hdf5", "zarr"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    ways = {"plain": time_plain,
            "reader, no checks": lambda p: time_reads(p, lambda *a, **k: None),
            "reader, old checks": lambda p: time_reads(p, old_checks),
            "reader": lambda p: time_reads(p, check_unit),
            "reader + checksum": lambda p: time_reads(p, check_unit, verify=True)}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {}
        for case in CASES:
            for backend in args.backends:
                path = Path(tmp) / f"{case.replace(' ', '_')}.{'h5' if backend == 'hdf5' else 'zarr'}"
                build(path, case, args.units)
                stores[(case, backend)] = path
        times: dict[tuple, list[float]] = {(key, way): [] for key in stores for way in ways}
        order = list(ways)
        for r in range(args.rounds + 1):  # round 0 warms the page cache and is dropped
            for key, path in stores.items():
                for way in order[r % len(order):] + order[:r % len(order)]:  # each way first in turn
                    t = ways[way](path)
                    if r:
                        times[(key, way)].append(t)
    print(f"{args.units} units of ~1 MiB per store, least CPU seconds of {args.rounds} rounds to read every unit")
    print(f"{'store':<20} {'plain':>7} {'none':>7} {'old':>7} {'all':>7} {'all+crc':>7}  {'all/plain':>9} "
          f"{'new/plain':>9} {'all/crc':>8}")
    for key in stores:
        t = {way: min(times[(key, way)]) for way in ways}
        checks = t["reader"] - t["reader, no checks"]  # every value check
        new = t["reader"] - t["reader, old checks"]  # the position kinds' checks alone
        print(f"{key[0] + ' ' + key[1]:<20} {t['plain']:7.4f} {t['reader, no checks']:7.4f} "
              f"{t['reader, old checks']:7.4f} {t['reader']:7.4f} {t['reader + checksum']:7.4f}  "
              f"{checks / t['plain']:9.1%} {new / t['plain']:9.1%} {checks / t['reader + checksum']:8.1%}")
    print("all/plain: every value check against the plain reads; new/plain: the position kinds' checks "
          "(view parameters, sample ids) alone; all/crc: every value check against a checksummed read")


if __name__ == "__main__":
    main()
