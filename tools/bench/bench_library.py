"""The library seam's overhead in a user's own loop, against the honest baseline, side by side in one process.

Both loops read the same batches (sizes and shuffling), first alone (the data path: the issue's
overhead), then with a training step of the same MLP per batch (the whole loop):

* baseline: the user's ``TensorDataset`` plus the store's logits read plainly with h5py (whole
  chunks, once, into memory), joined by sample id by hand, ``default_collate``, and a
  hand-written ``alpha * CE + (1 - alpha) * T² KL``;
* library: ``softlabels.with_targets(the same TensorDataset, store)``, ``softlabels.collate`` and
  ``softlabels.kd_loss``.

Runs alternate (A B A B ...) and each ratio is the median of per-pair ratios of epoch times.

    .venv/bin/python tools/bench/bench_library.py [--n 20000] [--classes 100] [--layout dense] [--pairs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import softlabels as sl

T, ALPHA = 2.0, 0.5


class Joined(Dataset):
    """The baseline's user dataset with the plainly read teacher logits appended, joined by id."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        self.x, self.y, self.logits = x, y, logits

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], self.logits[i]


def plain_logits(path: Path, n: int) -> torch.Tensor:
    with h5py.File(path, "r") as f:
        ids, logits = f["sample_ids"][:], f["logits"][:]  # whole chunks, contiguous
    out = np.empty_like(logits)
    out[ids] = logits
    return torch.from_numpy(out)


def hand_kd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t.float() / T, -1), log_target=True, reduction="batchmean")
    return ALPHA * F.cross_entropy(s, y) + (1 - ALPHA) * T * T * kl


def epoch(loader: DataLoader, student: nn.Module | None, opt: torch.optim.Optimizer, library: bool) -> float:
    """One epoch's seconds: the data alone (``student`` None) or a training step per batch."""
    start = time.perf_counter()
    for batch in loader:
        if student is None:
            continue
        if library:
            (x, y), targets = batch
            loss = sl.kd_loss(student(x), targets, temperature=T, alpha=ALPHA, labels=y)
        else:
            x, y, t = batch
            loss = hand_kd(student(x), t, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.features)).astype(np.float32)
    y = rng.integers(0, args.classes, args.n).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "data.npz", x=x, y=y)
        store = Path(tmp) / "store.h5"
        sl.generate(teacher="mlp", data=str(Path(tmp) / "data.npz"), out=str(store), random_teacher=True,
                    layout="dense", num_classes=args.classes, progress=False)
        user = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        t0 = time.perf_counter()
        joined = Joined(user.tensors[0], user.tensors[1], plain_logits(store, args.n))
        read_plain = time.perf_counter() - t0
        paired = sl.with_targets(user, store)
        common = {"batch_size": args.batch, "shuffle": True, "num_workers": args.workers,
                  "persistent_workers": args.workers > 0}
        loaders = {False: DataLoader(joined, **common), True: DataLoader(paired, collate_fn=sl.collate, **common)}
        student = nn.Sequential(nn.Linear(args.features, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.classes))
        opt = torch.optim.SGD(student.parameters(), lr=0.01)
        epoch(loaders[True], student, opt, True)  # warm both (the library's first epoch also reads the units)
        epoch(loaders[False], student, opt, False)
        results = {}
        for what, model in (("data only", None), ("training step", student)):
            ratios, base, lib = [], [], []
            for _ in range(args.pairs):
                a = epoch(loaders[False], model, opt, False)
                b = epoch(loaders[True], model, opt, True)
                base.append(a)
                lib.append(b)
                ratios.append(b / a)
            results[what] = base, lib, ratios
    print(f"N={args.n} C={args.classes} hidden={args.hidden} batch={args.batch} workers={args.workers}; "
          f"plain h5py read of the store {read_plain:.3f} s")
    for what, (base, lib, ratios) in results.items():
        print(f"{what:>13}: baseline {statistics.median(base):.3f} s/epoch, library {statistics.median(lib):.3f} "
              f"s/epoch, overhead {100 * (statistics.median(ratios) - 1):+.1f} % (median of {args.pairs} paired "
              f"ratios; min {100 * (min(ratios) - 1):+.1f} %, max {100 * (max(ratios) - 1):+.1f} %)")


if __name__ == "__main__":
    main()
