"""Stores on object storage: softlabels against plain zarr + fsspec, on one local S3 server.

Starts ``moto_server`` on 127.0.0.1 (a separate process, so the server does not share the
client's interpreter), then, side by side in one run:

* **write**: a dense float16 store (N rows x C classes, ~1 MiB chunks) written unit by unit
  with ``UnitWriter`` to S3, against plain zarr writing the same array with the same chunks
  through ``FsspecStore`` (and against ``UnitWriter`` to local disk, for scale);
* **read**: one shuffled epoch of ``SoftLabelDataset`` (read-ahead on, checksums verified)
  from S3, against plain zarr + fsspec reading the same chunks whole on a thread pool of the
  same size as the read-ahead (no checksums, no batches);
* **memory**: the peak of numpy/Python allocations (tracemalloc) during that epoch for
  read-ahead depths 0, 4 and 8, against the size of one unit;
* **generate**: ``generate`` with a compute-bound teacher (``cnn-large``, 100 classes,
  3x32x32 inputs) to S3 against the same job to local disk, runs alternating, medians.

    python tools/bench/bench_s3.py                   # ~2-4 minutes on 2 cores
    python tools/bench/bench_s3.py --rows 32768 --generate-rows 4096

Targets (issue 25): read >= 0.8x plain zarr + fsspec; generate to S3 <= 1.10x to local disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

med = statistics.median


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = _port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("bench")
    return proc, endpoint


def store_meta(rows: int, classes: int, chunk: int):
    from softlabels.store.positions import group_units_for
    from softlabels.store.schema import StoreMetaV2

    units = -(-rows // chunk)
    return StoreMetaV2(positions="sample", layout="dense", num_samples=rows, num_classes=classes,
                       logits_dtype="float16", chunk_samples=chunk, group_units=group_units_for(units),
                       teacher={}, source={}, created_by={})


def write_ours(path: str, logits: np.ndarray, chunk: int) -> float:
    from softlabels.store.writer import UnitWriter

    rows, classes = logits.shape
    t = time.perf_counter()
    w = UnitWriter.create(path, store_meta(rows, classes, chunk), overwrite=True)
    with w.burst():
        for u in range(w.num_units):
            a, b = w.unit_samples(u)
            w.write_unit(u, {"logits": logits[a:b], "labels": np.zeros(b - a, np.int64),
                             "sample_ids": np.arange(a, b, dtype=np.int64)})
    w.finish()
    w.close()
    return time.perf_counter() - t


def write_plain(url: str, logits: np.ndarray, chunk: int) -> float:
    import zarr
    from zarr.storage import FsspecStore

    t = time.perf_counter()
    store = FsspecStore.from_url(url, storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    g = zarr.open_group(store, mode="w", zarr_format=3)
    a = g.create_array("logits", shape=logits.shape, dtype=logits.dtype, chunks=(chunk, logits.shape[1]),
                       compressors=None)
    for s in range(0, len(logits), chunk):
        a[s:s + chunk] = logits[s:s + chunk]
    return time.perf_counter() - t


def read_ours(path: str, batch: int) -> tuple[float, float, float]:
    """Seconds to open the dataset (validation: attributes, listings, ids read whole), for its first epoch
    (the handle reopened, labels/ids/checksums read whole once) and for a second epoch (streaming only)."""
    from softlabels.student.dataset import SoftLabelDataset

    t0 = time.perf_counter()
    ds = SoftLabelDataset([(path, None)], batch_size=batch, seed=1)
    t1 = time.perf_counter()
    assert sum(len(b["logits"]) for b in ds) == ds.num_samples
    t2 = time.perf_counter()
    ds.set_epoch(1)
    assert sum(len(b["logits"]) for b in ds) == ds.num_samples
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def read_plain(url: str, threads: int) -> float:
    import zarr
    from zarr.storage import FsspecStore

    t = time.perf_counter()
    store = FsspecStore.from_url(url, storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
                                 read_only=True)
    a = zarr.open_group(store, mode="r")["logits"]
    chunk = a.chunks[0]
    order = np.random.default_rng(1).permutation(-(-a.shape[0] // chunk))
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(lambda c: a[c * chunk:(c + 1) * chunk].nbytes, order.tolist()))
    assert total == a.nbytes
    return time.perf_counter() - t


def peak_memory(path: str, batch: int, depth: int) -> int:
    os.environ["SOFTLABELS_READ_AHEAD"] = str(depth)
    tracemalloc.start()
    tracemalloc.reset_peak()
    read_ours(path, batch)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def generate_pair(tmp: Path, rows: int, repeats: int) -> tuple[list[float], list[float]]:
    from softlabels.teacher.job import generate
    from softlabels.teacher.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("cnn-large", (3, 32, 32), 100).state_dict(), tmp / "w.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp / "x.npz", x=rng.standard_normal((rows, 3, 32, 32)).astype(np.float32),
             y=rng.integers(0, 100, rows))
    local, s3 = [], []
    for r in range(repeats):
        for out, times in ((str(tmp / "g.zarr"), local), (f"s3://bench/g{r}.zarr", s3)):
            t = time.perf_counter()
            generate("cnn-large", str(tmp / "x.npz"), out, weights=str(tmp / "w.pt"), dtype="float16",
                     batch_size=256, threads=0, overwrite=True, progress=False)
            times.append(time.perf_counter() - t)
    return local, s3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--chunk-rows", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--generate-rows", type=int, default=2048)
    args = ap.parse_args()
    proc, endpoint = start_server()
    tmp = Path(tempfile.mkdtemp())
    try:
        logits = np.random.default_rng(0).standard_normal((args.rows, args.classes)).astype(np.float16)
        mb = logits.nbytes / 1e6
        depth = int(os.environ.setdefault("SOFTLABELS_READ_AHEAD", "4"))
        print(f"moto_server at {endpoint}; store {args.rows} x {args.classes} float16 = {mb:.1f} MB in "
              f"{args.chunk_rows}-row chunks; read-ahead {depth}")
        w_ours, w_plain, w_local, r_ours, r_plain = [], [], [], [], []
        for r in range(args.repeats):
            w_plain.append(write_plain(f"s3://bench/plain{r}.zarr", logits, args.chunk_rows))
            w_ours.append(write_ours(f"s3://bench/ours{r}.zarr", logits, args.chunk_rows))
            w_local.append(write_ours(str(tmp / "local.zarr"), logits, args.chunk_rows))
        for r in range(args.repeats):
            r_plain.append(read_plain(f"s3://bench/plain{r}.zarr", min(depth, 4) or 1))
            r_ours.append(read_ours(f"s3://bench/ours{r}.zarr", args.batch_size))
        r_open, r_first, r_warm = (med([x[i] for x in r_ours]) for i in range(3))
        print(f"write  UnitWriter -> S3 {mb / med(w_ours):6.1f} MB/s | plain zarr+fsspec -> S3 "
              f"{mb / med(w_plain):6.1f} MB/s | UnitWriter -> local {mb / med(w_local):6.1f} MB/s | "
              f"ours/plain rate {med(w_plain) / med(w_ours):.2f}x")
        print(f"read   plain zarr+fsspec chunks <- S3 {mb / med(r_plain):6.1f} MB/s ({min(depth, 4) or 1} threads, "
              f"open included) | dataset <- S3: open {r_open:.2f} s, first epoch {mb / r_first:6.1f} MB/s, "
              f"second epoch {mb / r_warm:6.1f} MB/s | ours/plain rate: second epoch {med(r_plain) / r_warm:.2f}x, "
              f"open + first epoch {med(r_plain) / (r_open + r_first):.2f}x (target >= 0.8)")
        unit = args.chunk_rows * args.classes * 2
        peaks = {d: peak_memory("s3://bench/ours0.zarr", args.batch_size, d) for d in (0, 4, 8)}
        print("memory peak traced allocations per epoch: " + ", ".join(
            f"read-ahead {d}: {p / 2**20:.1f} MiB" for d, p in peaks.items()) + f" (one unit = {unit / 2**20:.2f} MiB)")
        local, s3 = generate_pair(tmp, args.generate_rows, args.repeats)
        print(f"generate cnn-large {args.generate_rows} rows: local {med(local):.2f} s, S3 {med(s3):.2f} s "
              f"(median of {args.repeats}); S3/local {med(s3) / med(local):.2f}x (target <= 1.10)")
    finally:
        proc.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
