"""Benchmark: SoftLabelDataset and UnitWriter against the storage libraries, memcpy and a per-sample-file cache.

Not a test. Makes a store in a temp dir for each backend (default N=200k rows,
C=1000 float16, the default ~1 MiB chunks: 400 MB of logits) and prints samples/s of

  reads, in-process (interleaved rounds, best round kept):
    memcpy       chunk-sized copies of the same bytes (logits, labels, ids) between resident arrays
    plain        the storage library's own whole-chunk reads of the same arrays into preallocated
                 buffers (h5py ``read_direct``; zarr ``get_basic_selection(out=)``), no checksums
    read_unit    ``UnitStore.read_unit`` loop, checksums verified
    dataset      ``SoftLabelDataset``, shuffled, batch 256, checksums on / off
  reads, with DataLoader workers (after the in-process ones, with the in-process dataset again beside them):
    dataset with 1 and 2 workers through ``batch_loader`` (softlabels' transport), with 2 through a plain DataLoader,
    and a no-op dataset yielding batches of the same shapes through each (the transport alone)
  the per-sample-file cache (one ``torch.save`` file per sample, read back in shuffled order;
  the design torchdistill uses), on a few thousand samples, extrapolated
  writes: ``UnitWriter`` batch by batch (as ``generate`` writes; a unit is committed as it fills) against that cache,
    interleaved round by round (``--write-rounds``; ``--writes-only`` stops there)
  checksums: GB/s of zlib.crc32, CRC-32C (google-crc32c) and, when installed, xxhash's xxh3 on 1 MiB

    python tools/bench/bench_dataset.py [--rows 200000] [--classes 1000] [--backends hdf5 zarr]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset
from zarr.core.buffer.cpu import NDBuffer

from softlabels.inputs.loader import batch_loader
from softlabels.store.format import default_chunk_rows
from softlabels.store.reader import UnitStore
from softlabels.store.schema import StoreMetaV2
from softlabels.store.writer import UnitWriter
from softlabels.student.dataset import SoftLabelDataset

KEYS = ("logits", "labels", "sample_ids")


def rows(n: int, c: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"logits": rng.standard_normal((n, c), dtype=np.float32).astype(np.float16),
            "labels": rng.integers(0, c, n), "sample_ids": np.arange(n)}


def write_store(path: Path, data: dict[str, np.ndarray], c: int, batch: int) -> float:
    """Seconds to write ``data`` as ``generate`` does: batches, each unit committed as it fills."""
    n = len(data["labels"])
    t = time.perf_counter()
    meta = StoreMetaV2(positions="sample", layout="dense", num_samples=n, num_classes=c, logits_dtype="float16",
                       chunk_samples=default_chunk_rows(c, 2))
    w = UnitWriter.create(path, meta, overwrite=True)
    for a in range(0, n, batch):
        w.write(a, **{k: v[a:a + batch] for k, v in data.items()})
    w.finish()
    w.close()
    return time.perf_counter() - t


def write_sample_files(d: Path, data: dict[str, np.ndarray], count: int) -> float:
    """Seconds to write the per-sample-file cache: one ``torch.save`` file per sample (the peer design)."""
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    t = time.perf_counter()
    for i in range(count):
        torch.save({"logits": torch.from_numpy(data["logits"][i].copy()), "label": int(data["labels"][i])},
                   d / f"{i}.pt")
    return time.perf_counter() - t


def read_sample_files(d: Path, count: int, seed: int = 2) -> int:
    """Read the per-sample-file cache back in shuffled order; samples read."""
    for i in np.random.default_rng(seed).permutation(count):
        torch.load(d / f"{i}.pt", weights_only=True)
    return count


def per_sample_files(tmp: Path, data: dict[str, np.ndarray], count: int) -> tuple[float, float]:
    """samples/s of writing and of reading (shuffled) one torch.save file per sample."""
    write = count / write_sample_files(tmp / "per-sample", data, count)
    t = time.perf_counter()
    read_sample_files(tmp / "per-sample", count)
    return write, count / (time.perf_counter() - t)

def chunk_buffers(data: dict[str, np.ndarray], chunk_rows: int) -> dict[str, np.ndarray]:
    """One chunk-sized output buffer per array of ``data``."""
    return {k: np.empty((chunk_rows,) + v.shape[1:], v.dtype) for k, v in data.items()}


def memcpy_pass(data: dict[str, np.ndarray], bufs: dict[str, np.ndarray]) -> int:
    """Chunk-sized copies of every array of ``data`` into ``bufs`` (the memcpy baseline); rows copied."""
    n, cr = len(data["labels"]), len(bufs["labels"])
    for a in range(0, n, cr):
        for k, v in data.items():
            np.copyto(bufs[k][:min(cr, n - a)], v[a:a + cr])
    return n


def plain_pass(path: Path, n: int, bufs: dict[str, np.ndarray]) -> int:
    """The storage library's own whole-chunk reads of ``KEYS`` into ``bufs`` (h5py ``read_direct``; zarr
    ``get_basic_selection(out=)``), no checksums: the plain-read baseline; rows read."""
    cr = len(bufs["labels"])
    if path.suffix == ".h5":
        with h5py.File(path, "r") as f:
            ds = [(f[k], bufs[k]) for k in KEYS]
            for a in range(0, n, cr):
                b = min(n, a + cr)
                for d, out in ds:
                    d.read_direct(out, np.s_[a:b], np.s_[0:b - a])
    else:
        ds = [(zarr.open_array(str(path), path=k, mode="r"), bufs[k]) for k in KEYS]
        for a in range(0, n, cr):
            b = min(n, a + cr)
            for d, out in ds:
                d.get_basic_selection(slice(a, b), out=NDBuffer.from_numpy_array(out[:b - a]))
    return n


def checksum_rates(nbytes: int = 1 << 20, rounds: int = 300) -> dict[str, float]:
    """GB/s of each candidate checksum over one chunk-sized buffer."""
    import zlib

    import google_crc32c

    buf = np.random.default_rng(3).integers(0, 256, nbytes, dtype=np.uint8)
    cands = {"zlib.crc32": lambda: zlib.crc32(buf), "crc32c (google-crc32c)": lambda: google_crc32c.extend(0, buf),
             "memcpy": lambda: np.copyto(np.empty_like(buf), buf)}
    try:
        import xxhash

        cands["xxh3_64 (xxhash)"] = lambda: xxhash.xxh3_64_intdigest(buf)
    except ImportError:
        pass
    rates = dict.fromkeys(cands, 0.0)
    for _ in range(3):
        for name, f in cands.items():
            t = time.perf_counter()
            for _ in range(rounds):
                f()
            rates[name] = max(rates[name], nbytes * rounds / (time.perf_counter() - t) / 1e9)
    return rates


def bench(path: Path, data: dict[str, np.ndarray], batch: int, repeats: int) -> dict[str, float]:
    n = len(data["labels"])
    store = UnitStore(path)
    cr = store.meta.chunk_samples
    bufs = chunk_buffers(data, cr)

    def memcpy() -> int:
        return memcpy_pass(data, bufs)

    def plain() -> int:
        return plain_pass(path, n, bufs)

    def units() -> int:
        for u in range(store.num_units):
            store.read_unit(u, verify=True)
        return n

    def dataset(verify: bool, workers: int = 0, transport: str = "batch_loader"):
        ds = SoftLabelDataset([(path, None)], batch_size=batch, shuffle=True, verify=verify)

        def run() -> int:
            ds.set_epoch(ds.epoch + 1)
            it = (ds if workers == 0 else batch_loader(ds, num_workers=workers) if transport == "batch_loader"
                  else DataLoader(ds, batch_size=None, num_workers=workers))
            got = sum(len(b["labels"]) for b in it)
            assert got == n, got
            return got
        return run

    class Noop(IterableDataset):
        """Batches shaped like the dataset's, made without reading (each worker yields its share)."""

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            w, workers = (0, 1) if info is None else (info.id, info.num_workers)
            for a in range(w * batch, n, batch * workers):
                m = min(batch, n - a)
                yield {"logits": torch.empty(m, data["logits"].shape[1], dtype=torch.float16),
                       **{k: torch.empty(m, dtype=torch.int64) for k in ("labels", "sample_ids", "source")}}

    def noop(transport: str):
        return lambda: sum(len(b["labels"]) for b in (batch_loader(Noop(), num_workers=2) if transport == "batch_loader"
                                                      else DataLoader(Noop(), batch_size=None, num_workers=2)))

    phases = [{
        "memcpy of the same bytes": memcpy,
        "plain whole-chunk reads (no checksums)": plain,
        "read_unit loop, checksums on": units,
        "dataset, checksums on, in-process": dataset(True),
        "dataset, checksums off, in-process": dataset(False),
    }, {  # the in-process dataset again, interleaved with the workers: the ratio is taken within one phase
        "dataset, checksums on, in-process (beside the workers)": dataset(True),
        "dataset, checksums on, 1 worker (batch_loader)": dataset(True, 1),
        "dataset, checksums on, 2 workers (batch_loader)": dataset(True, 2),
        "dataset, checksums on, 2 workers (plain DataLoader)": dataset(True, 2, "DataLoader"),
        "no-op, 2 workers (batch_loader)": noop("batch_loader"),
        "no-op, 2 workers (plain DataLoader)": noop("DataLoader"),
    }]
    rates: dict[str, float] = {}
    # two phases, each interleaved round by round: worker processes wind down asynchronously
    # and would disturb the in-process timings
    for cands in phases:
        for f in cands.values():  # warm-up: page cache, worker imports
            f()
        for _ in range(repeats):
            for name, f in cands.items():
                t = time.perf_counter()
                got = f()
                rates[name] = max(rates.get(name, 0.0), got / (time.perf_counter() - t))
    store.close()
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--files", type=int, default=3000, help="samples for the per-sample-file cache")
    p.add_argument("--backends", nargs="+", default=["hdf5", "zarr"], choices=["hdf5", "zarr"])
    p.add_argument("--write-rounds", type=int, default=3, help="interleaved rounds of cache and store writes")
    p.add_argument("--writes-only", action="store_true", help="only the side-by-side write comparison")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = rows(args.rows, args.classes)
    gb = sum(v.nbytes for v in data.values()) / args.rows / 1e9  # bytes per sample, in GB
    print("checksums over 1 MiB: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in checksum_rates().items()))
    with tempfile.TemporaryDirectory() as tmp:
        file_write, file_read = per_sample_files(Path(tmp), data, args.files)
        paths = {b: Path(tmp) / f"bench{'.h5' if b == 'hdf5' else '.zarr'}" for b in args.backends}
        # writes side by side: each round writes the per-sample files, then each store (the cache's own rate
        # moves several-fold on a loaded machine, so each round's ratio is taken against its own cache rate)
        ratios: dict[str, list[float]] = {b: [] for b in paths}
        best: dict[str, float] = {b: 0.0 for b in paths}
        for _ in range(args.write_rounds):
            cache = per_sample_files(Path(tmp), data, args.files)[0]
            for b, path in paths.items():
                rate = args.rows / write_store(path, data, args.classes, args.batch)
                ratios[b].append(rate / cache)
                best[b] = max(best[b], rate)
        for b in paths:
            print(f"{b} writes / per-sample-file writes, {args.write_rounds} interleaved rounds: median "
                  f"{statistics.median(ratios[b]):,.0f}x (range {min(ratios[b]):,.0f}-{max(ratios[b]):,.0f}x); "
                  f"best {best[b]:,.0f} samples/s")
        if args.writes_only:
            return
        for backend, path in paths.items():
            write = best[backend]
            print(f"\n{backend}: N={args.rows} C={args.classes} float16, batch {args.batch}")
            rates = bench(path, data, args.batch, args.repeats)
            width = max(map(len, rates))
            for name, r in rates.items():
                print(f"  {name:<{width}}  {r:>12,.0f} samples/s  {r * gb:6.2f} GB/s")
            ds0 = rates["dataset, checksums on, in-process"]
            ds2 = rates["dataset, checksums on, 2 workers (batch_loader)"]
            beside = rates["dataset, checksums on, in-process (beside the workers)"]
            print(f"  dataset (checksums on) / plain library reads = {ds0 / rates['plain whole-chunk reads (no checksums)']:.2f}"
                  f";  / memcpy = {ds0 / rates['memcpy of the same bytes']:.2f}")
            print(f"  with the in-process run of the same phase: 1 worker / in-process = "
                  f"{rates['dataset, checksums on, 1 worker (batch_loader)'] / beside:.2f}, 2 workers / in-process = "
                  f"{ds2 / beside:.2f}")
            print(f"  2 workers / in-process = {ds2 / ds0:.2f} (batch_loader), "
                  f"{rates['dataset, checksums on, 2 workers (plain DataLoader)'] / ds0:.2f} (plain DataLoader)")
            print(f"  per-sample files: read {file_read:,.0f} samples/s, write {file_write:,.0f} samples/s; "
                  f"store write {write:,.0f} samples/s")
            print(f"  vs per-sample files: read {ds0 / file_read:,.0f}x (in-process), {ds2 / file_read:,.0f}x "
                  f"(2 workers); write {statistics.median(ratios[backend]):,.0f}x (median of the interleaved rounds)")


if __name__ == "__main__":
    main()
