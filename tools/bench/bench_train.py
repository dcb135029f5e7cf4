"""Benchmark: one KD epoch from a store vs one plain epoch vs one online-KD epoch.

    python tools/bench/bench_train.py [--rows 20000] [--features 256] [--classes 100] [--device cpu]

Synthetic data (Gaussian class blobs), a small student (MLP 256-128-100) and a
teacher ~30x its cost (MLP 256-1024-1024-100). The teacher's logits are written once
with ``softlabels generate`` to a float16 store. Then the same student, batch size
and optimizer train for a few epochs in three ways, side by side:

* plain: hard labels only (the floor: no teacher at all);
* store: KD from the float16 store (inputs joined by sample id);
* online: KD with the teacher's forward pass in the loop;
* store-io: the store path with ``alpha=1`` (the soft loss is skipped), which splits
  store's cost over plain into reading the store vs computing the KD loss.

Each mode runs ``--epochs`` epochs ``--rounds`` times (modes interleaved, so load
from other processes hits all of them); the figure per mode is the median epoch
time after the first epoch of each run, in wall-clock seconds and in CPU seconds of
this process (the CPU figure stays meaningful on a machine shared with other jobs;
use ``--threads 1`` there). Targets: store <= 1.15x plain, online >= 3x store.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROWS, FEATURES, CLASSES, HIDDEN, TEACHER_HIDDEN = 20_000, 256, 100, 128, 1024


def student() -> nn.Module:
    """The student (module:factory spec ``bench_train:student``)."""
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def teacher() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, TEACHER_HIDDEN), nn.ReLU(), nn.Linear(TEACHER_HIDDEN, TEACHER_HIDDEN),
                         nn.ReLU(), nn.Linear(TEACHER_HIDDEN, CLASSES))


def main() -> None:
    global ROWS, FEATURES, CLASSES
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--features", type=int, default=FEATURES)
    ap.add_argument("--classes", type=int, default=CLASSES)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (their CPU time is not counted)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ROWS, FEATURES, CLASSES = args.rows, args.features, args.classes
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # so "bench_train:student" imports this file

    from softlabels.student.trainer import TrainConfig, train
    from softlabels.teacher.job import generate
    from softlabels.teacher.models import count_flops

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((CLASSES, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, ROWS)
    x = (centers[y] + 2.0 * rng.standard_normal((ROWS, FEATURES))).astype(np.float32)
    np.savez(tmp / "data.npz", x=x, y=y)
    spec = str(tmp / "data.npz")

    torch.manual_seed(0)
    t_model = teacher().eval()
    torch.jit.save(torch.jit.script(t_model), tmp / "teacher.pt")
    s_flops, t_flops = count_flops(student(), (FEATURES,)), count_flops(t_model, (FEATURES,))
    t0 = time.perf_counter()
    generate(str(tmp / "teacher.pt"), spec, tmp / "teacher.h5", dtype=args.dtype, device=args.device,
             batch_size=1024, progress=False)
    gen_s = time.perf_counter() - t0
    store_mib = (tmp / "teacher.h5").stat().st_size / 2**20

    common = dict(student="bench_train:student", batch_size=args.batch_size, epochs=args.epochs, lr=1e-3,
                  schedule="constant", device=args.device, num_workers=args.num_workers, progress=False, overwrite=True)
    modes = {
        "plain": (TrainConfig(data=(spec,), out=str(tmp / "plain"), **common), None),
        "store": (TrainConfig(stores=(str(tmp / "teacher.h5"),), out=str(tmp / "store"), **common), None),
        "online": (TrainConfig(data=(spec,), out=str(tmp / "online"), **common), t_model),
        "store-io": (TrainConfig(stores=(str(tmp / "teacher.h5"),), alpha=1.0, out=str(tmp / "io"), **common), None),
    }
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for name, (cfg, live) in modes.items():
            stamps: list[float] = []
            train(cfg, teacher=live, on_epoch_end=lambda _rec: stamps.append(time.process_time()))
            recs = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
            wall[name] += [r["epoch_seconds"] for r in recs[1:]]
            cpu[name] += list(np.diff(stamps))  # epoch 2, 3, ...: training plus a ~ms checkpoint write
    sec = {m: statistics.median(v) for m, v in wall.items()}
    cpu_sec = {m: statistics.median(v) for m, v in cpu.items()}

    print(f"{ROWS} rows x {FEATURES} features, {CLASSES} classes, batch {args.batch_size}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, DataLoader workers {args.num_workers}")
    print(f"student {s_flops / 1e3:.0f}k MACs/sample, teacher {t_flops / 1e6:.2f}M ({t_flops / s_flops:.0f}x); "
          f"{args.dtype} store {store_mib:.1f} MiB written in {gen_s:.1f}s (once)")
    print(f"{'mode':<9}{'wall s/epoch':>14}{'samples/s':>11}{'vs plain':>10}{'CPU s/epoch':>13}{'vs plain':>10}")
    for m in modes:
        print(f"{m:<9}{sec[m]:>14.3f}{ROWS / sec[m]:>11.0f}{sec[m] / sec['plain']:>9.2f}x"
              f"{cpu_sec[m]:>13.3f}{cpu_sec[m] / cpu_sec['plain']:>9.2f}x")
    ratios = {f"{clock}_{name}": value for clock, t in (("wall", sec), ("cpu", cpu_sec))
              for name, value in (("store_vs_plain", t["store"] / t["plain"]), ("online_vs_store", t["online"] / t["store"]))}
    for clock in ("wall", "cpu"):
        print(f"{clock:>4}: KD from store / plain = {ratios[clock + '_store_vs_plain']:.2f}x (target <= 1.15x); "
              f"online / KD from store = {ratios[clock + '_online_vs_store']:.2f}x (target >= 3x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_seconds_per_epoch": sec, "cpu_seconds_per_epoch": cpu_sec,
                                               "wall_all": wall, "cpu_all": cpu, **ratios,
                                               "generate_seconds": gen_s}, indent=2))


if __name__ == "__main__":
    main()
