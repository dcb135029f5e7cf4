"""The performance table: every row's candidate against its honest baseline, side by side, one run.

    tools/bench/run [--size small|large] [--rounds 5] [--only kd,workers,...] [--json FILE]
    tools/bench/run --scale ...    (scale.py: generate and the reader at 1x, 10x, 100x)

Each row builds its data once, then runs the candidate and the baseline alternately
(``--rounds`` interleaved pairs, after one warm-up pair), so load from other jobs on a
shared machine hits both alike; the figure is the median of the per-round ratios, with
the range. One torch thread in this process. CPU time (``time.process_time``: every
thread of this process, none of the others') is the clock where all the work runs in
this process; the DataLoader row, whose work runs in other processes, is timed by the
wall clock. Ratios only: the absolute times of a shared 2-core machine mean little.

Rows (goal in brackets):

* ``kd``: one KD epoch from a float16 store / one plain hard-label epoch, same student,
  same batches (20k x 256, C = 100) [<= 1.15]
* ``workers``: training throughput with 2 DataLoader workers / in-process, an MLP from a
  60k x 64 float16 HDF5 store [>= 0.9]
* ``tokens``: the token-store reader (``SoftLabelDataset`` over an HDF5 sampled S = 12 store,
  checksums on, joined with the token ids) / plain h5py reads of the same arrays, chunk by
  chunk, and of the token ids: tokens per CPU second [>= 0.7]
* ``lm``: the token job (producer + ``UnitWriter``, HDF5) / the bare teacher loop, sampled
  S = 12, V = 4,096, ``gpt-medium`` [<= 1.05]
* ``classifier``: ``generate`` at C = 32,768 dense float16 (HDF5) / the bare teacher loop
  over the same batches [<= 1.2]
* ``online``: one KD epoch with the teacher in the loop / one KD epoch from the float16 store,
  the ``kd`` row's data, student and teacher (~30x the student) [>= 3]
* ``reader`` (three rows), ``cache``, ``bytes`` (three rows): :mod:`rows_store`: the reader against
  plain h5py, plain zarr and memcpy; against one ``torch.save`` file per sample; bytes on disk per
  token of each sparse layout against dense float16.

A row function returns one result, or several keyed by their row names.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the benchmarks beside this file

import rows_store  # noqa: E402
from pairs import cpu, paired  # noqa: E402

SIZES = {  # per row: the small and the large size's knobs
    "kd": {"small": {"rows": 20_000}, "large": {"rows": 100_000}},
    "workers": {"small": {"rows": 60_000}, "large": {"rows": 200_000}},
    "tokens": {"small": {"seqs": 512}, "large": {"seqs": 4096}},
    "lm": {"small": {"seqs": 32}, "large": {"seqs": 128}},
    "classifier": {"small": {"rows": 1024}, "large": {"rows": 4096}},
    "online": {"small": {"rows": 20_000}, "large": {"rows": 50_000}, "tiny": {"rows": 1024}},
    "reader": {"small": {"rows": 20_000}, "large": {"rows": 100_000}, "tiny": {"rows": 2048}},
    "cache": {"small": {"rows": 20_000, "files": 2000}, "large": {"rows": 100_000, "files": 5000},
              "tiny": {"rows": 2048, "files": 64}},
    "bytes": {"small": {"seqs": 64}, "large": {"seqs": 256}, "tiny": {"seqs": 2}},
}  # "tiny": a smoke test's size (tests/test_bench_table.py), for the rows that have one


# -- rows ---------------------------------------------------------------------------------------
def kd_setup(tmp: Path, rows: int) -> tuple[dict, torch.nn.Module]:
    """The KD rows' data, teacher and float16 store (built once per temp dir): the train options they share
    and the teacher module (for the online row)."""
    import bench_train

    from softlabels.teacher.job import generate

    features, classes = 256, 100
    bench_train.ROWS, bench_train.FEATURES, bench_train.CLASSES = rows, features, classes
    torch.manual_seed(0)
    teacher = bench_train.teacher().eval()
    if not (tmp / f"kd{rows}.h5").exists():
        rng = np.random.default_rng(0)
        centers = rng.standard_normal((classes, features)).astype(np.float32)
        y = rng.integers(0, classes, rows)
        x = (centers[y] + 2.0 * rng.standard_normal((rows, features))).astype(np.float32)
        np.savez(tmp / "kd.npz", x=x, y=y)
        torch.jit.save(torch.jit.script(teacher), tmp / "kd_teacher.pt")
        generate(str(tmp / "kd_teacher.pt"), str(tmp / "kd.npz"), tmp / f"kd{rows}.h5", dtype="float16",
                 batch_size=1024, progress=False)
    common = dict(student="bench_train:student", batch_size=256, epochs=2, lr=1e-3, schedule="constant",
                  device="cpu", progress=False, overwrite=True)
    return common, teacher


def second_epoch_cpu(cfg, teacher: torch.nn.Module | None = None) -> Callable[[], float]:
    """CPU seconds of epoch 2 of the 2-epoch run ``cfg`` (epoch 1 warms the caches)."""
    from softlabels.student.trainer import train

    def run() -> float:
        stamps: list[float] = []
        train(cfg, teacher=teacher, on_epoch_end=lambda _rec: stamps.append(time.process_time()))
        return stamps[1] - stamps[0]
    return run


def row_kd(tmp: Path, rounds: int, rows: int) -> dict:
    """Epoch 2's CPU seconds of a 2-epoch run: KD from the float16 store vs hard labels only."""
    from softlabels.student.trainer import TrainConfig

    common, _ = kd_setup(tmp, rows)
    plain = TrainConfig(data=(str(tmp / "kd.npz"),), out=str(tmp / "kd_plain"), **common)
    store = TrainConfig(stores=(str(tmp / f"kd{rows}.h5"),), out=str(tmp / "kd_store"), **common)
    return {"size": f"{rows:,} x 256, C = 100, batch 256", "clock": "cpu", "goal": "<= 1.15",
            **paired(second_epoch_cpu(store), second_epoch_cpu(plain), rounds)}


def row_online(tmp: Path, rounds: int, rows: int) -> dict:
    """Epoch 2's CPU seconds: KD with the teacher in the loop vs KD from the float16 store."""
    from softlabels.student.trainer import TrainConfig

    common, teacher = kd_setup(tmp, rows)
    online = TrainConfig(data=(str(tmp / "kd.npz"),), out=str(tmp / "kd_online"), **common)
    store = TrainConfig(stores=(str(tmp / f"kd{rows}.h5"),), out=str(tmp / "kd_store"), **common)
    return {"size": f"{rows:,} x 256, C = 100, batch 256; teacher 256-1024-1024-100 (~30x the student)",
            "clock": "cpu", "goal": ">= 3",
            **paired(second_epoch_cpu(online, teacher), second_epoch_cpu(store), rounds),
            "note": "time ratio: online KD / KD from the store (what the store saves per epoch)"}


def row_workers(tmp: Path, rounds: int, rows: int) -> dict:
    """Wall seconds of epoch 2 of a 2-epoch run from an HDF5 store: 2 workers vs in-process (throughput ratio)."""
    from softlabels.student.trainer import TrainConfig, train
    from softlabels.teacher.job import generate

    features, classes = 64, 10
    rng = np.random.default_rng(1)
    y = rng.integers(0, classes, rows)
    x = (rng.standard_normal((classes, features))[y] + rng.standard_normal((rows, features))).astype(np.float32)
    np.savez(tmp / "w.npz", x=x, y=y)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(features, 256), torch.nn.ReLU(), torch.nn.Linear(256, classes))
    torch.jit.save(torch.jit.script(teacher.eval()), tmp / "w_teacher.pt")
    generate(str(tmp / "w_teacher.pt"), str(tmp / "w.npz"), tmp / "w.h5", dtype="float16", batch_size=4096,
             progress=False)
    common = dict(student="table:mlp64", stores=(str(tmp / "w.h5"),), data=(str(tmp / "w.npz"),), batch_size=256,
                  epochs=2, lr=1e-3, schedule="constant", device="cpu", progress=False, overwrite=True)

    def second_epoch(workers: int) -> Callable[[], float]:
        cfg = TrainConfig(out=str(tmp / f"w{workers}"), num_workers=workers, **common)

        def run() -> float:
            stamps: list[float] = []
            train(cfg, on_epoch_end=lambda _rec: stamps.append(time.perf_counter()))
            return stamps[1] - stamps[0]
        return run

    # throughput ratio = in-process time / 2-worker time: "candidate" is the in-process run here
    r = paired(second_epoch(0), second_epoch(2), rounds)
    return {"size": f"{rows:,} x {features}, C = {classes}, batch 256", "clock": "wall", "goal": ">= 0.9", **r,
            "note": "throughput ratio: in-process epoch time / 2-worker epoch time"}


def mlp64() -> torch.nn.Module:
    """The DataLoader row's student (``table:mlp64``)."""
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def row_tokens(tmp: Path, rounds: int, seqs: int) -> dict:
    """CPU seconds to stream every token of an HDF5 sampled store: the dataset vs plain h5py chunk reads."""
    import h5py

    from softlabels.inputs.tokens import open_token_file
    from softlabels.student.dataset import SoftLabelDataset
    from softlabels.teacher.job import generate

    seq_len, vocab = 128, 4096
    rng = np.random.default_rng(0)
    np.save(tmp / "tok.npy", rng.integers(0, vocab, (seqs, seq_len + 1)).astype(np.int64))
    generate("gpt-tiny", str(tmp / "tok.npy"), tmp / "tok.h5", random_teacher=True, num_classes=vocab,
             layout="sampled", samples=12, dtype="float16", progress=False)
    data = open_token_file(tmp / "tok.npy")

    def plain() -> None:
        np.load(tmp / "tok.npy")
        with h5py.File(tmp / "tok.h5", "r") as f:
            for name in f:
                d = f[name]
                if not isinstance(d, h5py.Dataset) or d.ndim == 0:
                    continue
                step = d.chunks[0] if d.chunks else len(d)
                for a in range(0, len(d), step):
                    d[a:a + step]

    def stream() -> None:
        ds = SoftLabelDataset([(tmp / "tok.h5", data)], batch_size=16, seed=0)
        ds.set_epoch(0)
        for _ in ds:
            pass

    return {"size": f"{seqs} x {seq_len + 1} tokens, V = {vocab:,}, sampled S = 12 float16, batch 16",
            "clock": "cpu", "goal": "<= 1.43 (time; >= 0.7 in throughput)", **paired(cpu(stream), cpu(plain), rounds),
            "note": "time ratio: dataset / plain h5py; throughput ratio = 1 / this"}


def row_lm(tmp: Path, rounds: int, seqs: int) -> dict:
    """CPU seconds: producer + UnitWriter (HDF5) vs the bare teacher loop, sampled S = 12, V = 4,096."""
    import bench_lm_generate as lmg

    from softlabels.store.layouts import make_layout
    from softlabels.teacher.tokens import TokenProducer

    vocab, seq_len = 4096, 128
    ds = lmg.data(seqs, seq_len, vocab)
    teacher, _ = lmg.calibrated(vocab, seq_len, 2.5, ds.get_batch(np.arange(4)).ids)
    layout = make_layout("sampled", num_classes=vocab, logits_dtype="float16", samples=12, seed=0)
    p = TokenProducer(ds, teacher, layout, batch_size=16)
    return {"size": f"{seqs} x {seq_len} tokens, gpt-medium, batches of 16", "clock": "cpu", "goal": "<= 1.05",
            **paired(lambda: lmg.job(p, tmp / "lm.h5")[0], lambda: lmg.bare(p), rounds)}


def row_classifier(tmp: Path, rounds: int, rows: int) -> dict:
    """CPU seconds: ``generate`` (dense float16, HDF5) vs the bare loop, built-in ``mlp`` at C = 32,768."""
    import bench_generate as bg

    from softlabels.teacher.job import generate
    from softlabels.teacher.models import build_model

    classes, shape = 32_768, (3, 32, 32)
    np.save(tmp / "c.npy", np.random.default_rng(0).standard_normal((rows, *shape), dtype=np.float32))
    torch.manual_seed(0)
    torch.save(build_model("mlp", shape, classes).state_dict(), tmp / "c.pt")
    data = str(tmp / "c.npy")

    def gen() -> None:
        generate("mlp", data, tmp / "c.h5", weights=tmp / "c.pt", num_classes=classes, dtype="float16",
                 batch_size=256, progress=False, overwrite=True)

    return {"size": f"{rows:,} rows of 3x32x32, built-in mlp, C = {classes:,}, batch 256", "clock": "cpu",
            "goal": "<= 1.2",
            **paired(cpu(gen), cpu(lambda: bg.bare_loop("mlp", data, tmp / "c.pt", 256, classes)), rounds)}


ROWS = {"kd": ("KD epoch from a float16 store / plain hard-label epoch", row_kd),
        "workers": ("2 DataLoader workers / in-process, training throughput", row_workers),
        "tokens": ("token-store reader (HDF5) / plain h5py chunk reads, time", row_tokens),
        "lm": ("LM generate, sampled S = 12, V = 4,096 / bare teacher", row_lm),
        "classifier": ("classifier generate, C = 32k dense / bare teacher", row_classifier),
        "online": ("online KD epoch (teacher in the loop) / KD epoch from the store", row_online),
        "reader": ("reader / plain h5py, plain zarr, memcpy", rows_store.row_reader),
        "cache": ("reader / per-sample-file cache (one torch.save per sample), time per sample", rows_store.row_cache),
        "bytes": ("bytes per token on disk per layout / dense float16", rows_store.row_bytes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("small", "large", "tiny"), default="small")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default=",".join(ROWS), help="comma-separated rows: " + ", ".join(ROWS))
    ap.add_argument("--json", default="bench-table.json", help="where to write the figures")
    args = ap.parse_args()
    if missing := [k for k in args.only.split(",") if k not in ROWS or args.size not in SIZES[k]]:
        ap.error(f"no row {', '.join(missing)} at size {args.size}; rows: {', '.join(ROWS)} (tiny: "
                 f"{', '.join(k for k in ROWS if 'tiny' in SIZES[k])})")
    torch.set_num_threads(1)
    import softlabels

    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "softlabels": softlabels.__version__, "machine": platform.machine(), "cpus": _cpus(),
           "size": args.size, "rounds": args.rounds, "torch_threads": torch.get_num_threads()}
    print(f"softlabels {env['softlabels']}, torch {env['torch']}, python {env['python']}, {env['cpus']} CPUs "
          f"({env['machine']}), size {args.size}, {args.rounds} interleaved rounds, one torch thread", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_table_") as d:
        for key in args.only.split(","):
            title, fn = ROWS[key]
            t0 = time.perf_counter()
            got = fn(Path(d), args.rounds, **SIZES[key][args.size])
            seconds = round(time.perf_counter() - t0, 1)
            for sub, r in ({key: {"title": title, **got}} if "ratio" in got else got).items():
                results[sub] = {**r, "bench_seconds": seconds}
                print(f"{sub:<15} {r['ratio']:.4g} (range {r['min']:.4g}-{r['max']:.4g}; {r['clock']}; goal "
                      f"{r['goal']})  {r['title']}; {r['size']}", flush=True)
    print("\n| row | measure | size | clock | goal | ratio (median) | range |\n|---|---|---|---|---|---|---|")
    for key, r in results.items():
        print(f"| {key} | {r['title']} | {r['size']} | {r['clock']} | {r['goal']} | **{r['ratio']:.3g}** | "
              f"{r['min']:.3g}–{r['max']:.3g} |")
    Path(args.json).write_text(json.dumps({"environment": env, "rows": results}, indent=2))
    print(f"\nfigures written to {args.json}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


if __name__ == "__main__":
    main()
