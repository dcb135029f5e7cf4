"""Where a KD step's extra time goes: the batch and the loss, KD from a float16 store vs hard labels.

    python tools/bench/kd_split.py [--rows 20000] [--epochs 15] [--profile]

The ``kd`` row's setting (tools/bench/table.py: 20k x 256, C = 100, batch 256, T = 2, alpha 0.5,
the ``bench_train`` student): both tasks are built as ``softlabels train`` builds them, then epochs
alternate between them; per step, CPU time (``time.process_time``) of the batch (in-process loader
plus ``to_device``) and of the loss (the student's forward, the loss, backward; no optimizer step).
Medians over epochs. ``--profile`` adds a cProfile (process time) of one KD epoch's batches.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from softlabels._runtime.device import DistEnv
    from softlabels.inputs.loader import batch_loader
    from softlabels.student.classifier import Classifier
    from softlabels.student.config import TrainConfig
    from softlabels.teacher.job import generate

    rows, features, classes = args.rows, 256, 100
    bench_train.ROWS, bench_train.FEATURES, bench_train.CLASSES = rows, features, classes
    tmp = Path(tempfile.mkdtemp(prefix="kd_split"))
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, rows)
    x = (rng.standard_normal((classes, features)).astype(np.float32)[y]
         + 2.0 * rng.standard_normal((rows, features))).astype(np.float32)
    np.savez(tmp / "kd.npz", x=x, y=y)
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(bench_train.teacher().eval()), tmp / "t.pt")
    generate(str(tmp / "t.pt"), str(tmp / "kd.npz"), tmp / "kd.h5", dtype="float16", batch_size=1024, progress=False)
    common = {"student": "bench_train:student", "batch_size": 256, "epochs": 2, "lr": 1e-3, "schedule": "constant",
              "device": "cpu", "progress": False, "overwrite": True}
    env, quiet = DistEnv.start("cpu"), (lambda _line: None)
    tasks = {"plain": Classifier(TrainConfig(data=(str(tmp / "kd.npz"),), out=str(tmp / "p"), **common), env, quiet),
             "kd": Classifier(TrainConfig(stores=(str(tmp / "kd.h5"),), out=str(tmp / "k"), **common), env, quiet)}
    loaders = {k: batch_loader(t.batches, num_workers=0) for k, t in tasks.items()}
    res: dict[str, dict[str, list[float]]] = {k: {"batch": [], "loss": []} for k in tasks}
    for ep in range(args.epochs + 1):
        for name, task in tasks.items():
            task.batches.set_epoch(ep)
            tb = tl = 0.0
            n = 0
            it = iter(loaders[name])
            while True:
                t0 = time.process_time()
                b = next(it, None)
                if b is None:
                    break
                b = task.to_device(b)
                t1 = time.process_time()
                loss, _ = task.loss(task.student, b, 1.0)
                task.student.zero_grad(set_to_none=True)
                loss.backward()
                tl += time.process_time() - t1
                tb += t1 - t0
                n += 1
            if ep:  # epoch 0 warms up
                res[name]["batch"].append(tb / n * 1e6)
                res[name]["loss"].append(tl / n * 1e6)
    for name, parts in res.items():
        print(f"{name:6s} " + "  ".join(f"{k} {statistics.median(v):5.0f} us/step "
                                        f"({min(v):.0f}-{max(v):.0f})" for k, v in parts.items()))
    if args.profile:
        task = tasks["kd"]
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        for b in loaders["kd"]:
            task.to_device(b)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
