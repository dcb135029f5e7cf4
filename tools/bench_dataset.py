"""Benchmark: SoftLabelDataset throughput against contiguous chunk reads and naive row reads.

Not a test. Makes a store in a temp dir (default N=200k rows, C=100 float16,
chunk_rows=1024: ~40 MB of logits) for each backend and prints samples/s of

  (a) SoftLabelDataset, logits only, batch 256, shuffle on, num_workers 0 and 2
  (b) contiguous whole-chunk reads of the same store (a loop over read_chunk, and
      a plain h5py read_direct / zarr slice loop over the logits array)
  (c) a naive map-style reader: store.read_rows(i, i + 1) for random i
      (a few thousand rows, extrapolated)
  (d) the DataLoader's own transport: a no-op IterableDataset yielding batches of
      the same shapes with 2 workers (the ceiling for (a) with workers)

and the ratios (a)/(b) (target >= 0.5) and (a)/(c) (target >= 100), measured side
by side in one run: candidates run interleaved, round by round, best round kept
(in-process ones first, then those with DataLoader workers).
The store is freshly written, so reads come from the page cache.

    python tools/bench_dataset.py [--rows 200000] [--classes 100] [--backends hdf5 zarr]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset

from softlabels.dataset import SoftLabelDataset
from softlabels.reader import SoftLabelStore
from softlabels.writer import StoreWriter


def make_store(path: Path, n: int, c: int, chunk_rows: int) -> None:
    rng = np.random.default_rng(0)
    w = StoreWriter.create(path, num_samples=n, num_classes=c, logits_dtype="float16", chunk_rows=chunk_rows)
    step = chunk_rows * 16
    for start in range(0, n, step):
        m = min(step, n - start)
        w.write(start, logits=rng.standard_normal((m, c), dtype=np.float32).astype(np.float16),
                labels=rng.integers(0, c, m), sample_ids=np.arange(start, start + m))
    w.finish()
    w.close()


def bench(path: Path, n: int, batch: int, repeats: int, naive_rows: int) -> dict[str, float]:
    """samples/s of every reader; the candidates run interleaved, round by round, and
    each keeps its best round, so load from other processes hits them alike."""
    store = SoftLabelStore(path)

    def chunks(verify: bool):
        def run() -> int:
            for c in range(store.num_chunks):
                store.read_chunk(c, verify=verify)
            return n
        return run

    def plain() -> int:
        if path.suffix == ".h5":
            with h5py.File(path, "r") as f:
                d = f["logits"]
                out = np.empty((store.chunk_rows, d.shape[1]), d.dtype)
                for c in range(store.num_chunks):
                    a, b = store.chunk_bounds(c)
                    d.read_direct(out, np.s_[a:b], np.s_[0:b - a])
        else:
            d = zarr.open_array(str(path), path="logits", mode="r")
            for c in range(store.num_chunks):
                a, b = store.chunk_bounds(c)
                d[a:b]
        return n

    def dataset(verify: bool, workers: int):
        ds = SoftLabelDataset([(path, None)], batch_size=batch, shuffle=True, verify=verify)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)

        def run() -> int:
            ds.set_epoch(ds.epoch + 1)
            rows = sum(len(b["labels"]) for b in loader)
            assert rows == n, rows
            return rows
        return run

    def noop_loader(workers: int):
        """DataLoader transport alone: batches shaped like (a)'s, made without any reading."""
        class Noop(IterableDataset):
            def __iter__(self):
                for a in range(0, n, batch):
                    m = min(batch, n - a)
                    yield {"logits": torch.zeros(m, store.num_classes, dtype=torch.float16),
                           **{k: torch.zeros(m, dtype=torch.int64) for k in ("labels", "sample_ids", "source")}}
        loader = DataLoader(Noop(), batch_size=None, num_workers=workers)
        return lambda: sum(len(b["labels"]) for b in loader)

    rng = np.random.default_rng(1)
    idx = rng.integers(0, n, naive_rows)

    def naive() -> int:
        for i in idx:
            store.read_rows(int(i), int(i) + 1)
        return naive_rows

    cands = {
        "(b) read_chunk verify=True": chunks(True),
        "(b) read_chunk verify=False": chunks(False),
        "(b) plain logits-only loop": plain,
        "(a) dataset verify=True workers=0": dataset(True, 0),
        "(a) dataset verify=False workers=0": dataset(False, 0),
        "(a) dataset verify=True workers=2": dataset(True, 2),
        "(a) dataset verify=False workers=2": dataset(False, 2),
        "(d) no-op IterableDataset workers=2": noop_loader(2),
        "(c) naive read_rows(i, i+1)": naive,
    }
    rates = dict.fromkeys(cands, 0.0)
    # two phases, each interleaved: in-process readers, then DataLoader workers (their
    # processes wind down asynchronously and would disturb the in-process timings)
    for phase in (lambda name: "workers=2" not in name, lambda name: "workers=2" in name):
        names = [name for name in cands if phase(name)]
        for name in names:  # warm-up: page cache, worker imports
            if not name.startswith("(c)"):
                cands[name]()
        for r in range(repeats):
            for name in names:
                if name.startswith("(c)") and r > 0:
                    continue  # slow; one round of a few thousand rows is plenty
                t = time.perf_counter()
                rows = cands[name]()
                rates[name] = max(rates[name], rows / (time.perf_counter() - t))
    store.close()
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--chunk-rows", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--naive-rows", type=int, default=3000)
    p.add_argument("--backends", nargs="+", default=["hdf5", "zarr"], choices=["hdf5", "zarr"])
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            path = Path(tmp) / f"bench{'.h5' if backend == 'hdf5' else '.zarr'}"
            make_store(path, args.rows, args.classes, args.chunk_rows)
            mb = args.rows * args.classes * 2 / 1e6
            print(f"\n{backend}: N={args.rows} C={args.classes} float16 chunk_rows={args.chunk_rows} "
                  f"({mb:.0f} MB logits), batch {args.batch}")
            rates = bench(path, args.rows, args.batch, args.repeats, args.naive_rows)
            width = max(map(len, rates))
            for name, r in rates.items():
                print(f"  {name:<{width}}  {r:>12,.0f} samples/s  {r * args.classes * 2 / 1e9:6.2f} GB/s")
            c = rates["(c) naive read_rows(i, i+1)"]
            for verify in (True, False):
                a0 = rates[f"(a) dataset verify={verify} workers=0"]
                a2 = rates[f"(a) dataset verify={verify} workers=2"]
                b = rates[f"(b) read_chunk verify={verify}"]
                print(f"  verify={verify!s:<5}: (a)/(b) = {a0 / b:.2f} (workers 0), {a2 / b:.2f} (workers 2);  "
                      f"(a)/(c) = {a0 / c:,.0f} (workers 0), {a2 / c:,.0f} (workers 2)")
            plain = rates["(b) plain logits-only loop"]
            print(f"  (a, verify=False, workers 0) / (b, plain logits-only loop) = "
                  f"{rates['(a) dataset verify=False workers=0'] / plain:.2f}")
            print(f"  (a, verify=False, workers 2) / (d, DataLoader transport ceiling) = "
                  f"{rates['(a) dataset verify=False workers=2'] / rates['(d) no-op IterableDataset workers=2']:.2f}")


if __name__ == "__main__":
    main()
