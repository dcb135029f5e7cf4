"""Overhead of the teacher job: ``generate(...)`` against a bare inference loop.

Same teacher (a built-in with saved weights), same inputs (synthetic 3x32x32
images, a memory-mapped ``.npy``), same batches: the bare loop is
``for x, _ in loader: teacher(x)`` under ``inference_mode`` with the most efficient
loader (one vectorised ``get_batch`` per batch), so the ratio measures all that
generate adds: spec resolution, fingerprint, store creation, casts, the writer
thread (checksums, flushes, flags), finish. Runs alternate (bare, generate, bare,
generate, ...) and the median of each is reported, for dense float16 on both
backends (top-k too for the large-vocabulary case). Three scenarios by default:

* ``cnn-large``, 100 classes: a compute-bound teacher (the usual case; ~200 B of
  logits per sample).
* ``mlp-large``, 1000 classes: an output-bound worst case, ~30k samples/s and
  ~60 MB/s of logits from two CPU cores, where the storage library's own CPU work
  (it cannot overlap with a teacher that already uses every core) shows.
* ``mlp-32k``: ``mlp`` with 32,768 classes, dense and top-k: ~1 MiB chunks are 16
  rows, yet the teacher must get ``--batch-size`` rows per call (the calls and their
  sizes are counted and printed beside the times).

    python tools/bench/bench_generate.py                          # both scenarios
    python tools/bench/bench_generate.py --teacher mlp-large --rows 80000 --classes 1000 --chunk-rows 4096

Target: generate / bare <= 1.05.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from softlabels.inputs.spec import resolve_data
from softlabels.teacher import classify as _classify
from softlabels.teacher.job import generate
from softlabels.teacher.models import build_model
from softlabels.teacher.spec import resolve_model


class _GetBatch(Dataset):
    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx):
        return self.ds.get_batch(idx)


def bare_loop(teacher: str, data: str, weights: Path, batch_size: int, num_classes: int) -> float:
    """Seconds for one plain pass of the teacher over the data (model built outside the timing)."""
    ds = resolve_data(data)
    model = resolve_model(teacher, input_shape=ds.input_shape, num_classes=num_classes, weights=weights).module
    n = len(ds)
    batches = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    loader = DataLoader(_GetBatch(ds), batch_size=None, sampler=batches)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            model(x)
    return time.perf_counter() - t0


SCENARIOS = {  # name -> (teacher, rows, classes, layouts): a 2.5-6 s bare pass on 2 quiet CPU cores
    "cnn-large": ("cnn-large", 1500, 100, ("dense",)),
    "mlp-large": ("mlp-large", 80000, 1000, ("dense",)),
    "mlp-32k": ("mlp", 4096, 32768, ("dense", "topk")),
}

CALLS: list[int] = []  # rows of each teacher call made by generate (the first is its 2-row probe)


def _counting(forward):
    def wrapped(self, x, where):
        CALLS.append(len(x))
        return forward(self, x, where)
    return wrapped


_classify.Teacher.forward = _counting(_classify.Teacher.forward)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=None, help="one scenario, or a built-in model (default: every scenario)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--classes", type=int, default=None)
    ap.add_argument("--shape", default="3,32,32", help="per-sample input shape")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--layout", default=None, help="dense or topk (default: the scenario's)")
    ap.add_argument("--topk", type=int, default=32, help="K of the top-k runs")
    ap.add_argument("--chunk-rows", type=int, default=None, help="passed to generate (default: ~1 MiB chunks)")
    ap.add_argument("--shard-chunks", type=int, default=None, help="passed to generate for the Zarr store")
    ap.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # generate's default (--threads 1), for the bare loop too
    teachers = [args.teacher] if args.teacher else list(SCENARIOS)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_generate_"))
    for name in teachers:
        teacher, rows, classes, layouts = SCENARIOS.get(name, (name, 10000, 100, ("dense",)))
        for layout in [args.layout] if args.layout else layouts:
            run(args, teacher, args.rows or rows, args.classes or classes, layout, root / f"{name}-{layout}")
    if args.dir is None:
        shutil.rmtree(root)


def run(args: argparse.Namespace, teacher: str, rows: int, classes: int, layout: str, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = tuple(int(d) for d in args.shape.split(","))
    np.save(work / "x.npy", rng.standard_normal((rows, *shape), dtype=np.float32))
    data = str(work / "x.npy")
    torch.manual_seed(0)
    weights = work / "teacher.pt"
    torch.save(build_model(teacher, shape, classes).state_dict(), weights)
    print(f"{teacher} on {args.shape} inputs, {classes} classes, N={rows}, batch {args.batch_size}, "
          f"{layout} {args.dtype}, chunk_rows {args.chunk_rows or 'default'}, shard_chunks (zarr) "
          f"{args.shard_chunks or 'none'}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    bare_loop(teacher, data, weights, args.batch_size, classes)  # warm-up: page cache, kernels

    topk = {"layout": "topk", "topk": args.topk} if layout == "topk" else {}
    for suffix in (".h5", ".zarr"):
        bare, gen = [], []
        out = work / f"store{suffix}"
        for _ in range(args.repeats):
            bare.append(bare_loop(teacher, data, weights, args.batch_size, classes))
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            CALLS.clear()
            t0 = time.perf_counter()
            generate(teacher, data, out, weights=weights, num_classes=classes, dtype=args.dtype,
                     batch_size=args.batch_size, chunk_rows=args.chunk_rows, progress=False,
                     shard_chunks=args.shard_chunks if suffix == ".zarr" else None, **topk)
            gen.append(time.perf_counter() - t0)
        b, g = statistics.median(bare), statistics.median(gen)
        sizes = sorted(set(CALLS[1:]), reverse=True)
        print(f"{suffix[1:]:>5}: bare {b:6.2f} s  generate {g:6.2f} s  ratio {g / b:.3f}   "
              f"teacher calls {len(CALLS) - 1} of {', '.join(map(str, sizes[:3]))} rows (+ a 2-row probe)   "
              f"(bare {', '.join(f'{t:.2f}' for t in bare)}; generate {', '.join(f'{t:.2f}' for t in gen)})",
              flush=True)


if __name__ == "__main__":
    main()
