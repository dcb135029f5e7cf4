"""Benchmark: torch CPU threads for the small models softlabels trains (``--threads``).

    python tools/bench/bench_threads.py [--threads 1 2] [--rounds 3]

Times the same work with each thread count, interleaved, median of ``--rounds``:
training steps (AdamW, cross-entropy) of built-in students and a teacher forward
pass, on random data the size of digits (64 features) and MNIST (784). The results
are identical for every thread count; only the time differs. On a machine shared
with other jobs, intra-op threads wait for each other at every op, which is why
``--threads`` defaults to 1 (docs/BENCHMARKS.md has the figures).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from softlabels.teacher.models import build_model

# (model, features, classes, batch, steps, train?)
CASES = [("mlp", 64, 10, 128, 300, True), ("mlp-large", 64, 10, 128, 300, True), ("mlp", 784, 10, 128, 200, True),
         ("cnn", 784, 10, 128, 30, True), ("mlp-large", 784, 10, 256, 100, False)]


def run(threads: int, name: str, features: int, classes: int, batch: int, steps: int, train: bool) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(name, (features,), classes)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randn(batch, features), torch.randint(0, classes, (batch,))
    t0 = time.perf_counter()
    for _ in range(steps):
        if train:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}; threads {args.threads}; median of {args.rounds} rounds, seconds")
    for case in CASES:
        times: dict[int, list[float]] = {t: [] for t in args.threads}
        for _ in range(args.rounds):
            for t in args.threads:  # interleaved: load from other processes hits every count alike
                times[t].append(run(t, *case))
        name, features, _, batch, steps, train = case
        cells = "  ".join(f"{t} thr {statistics.median(v):7.3f}" for t, v in times.items())
        print(f"{name:>9} {features:>3} features, {steps} {'train steps' if train else 'forwards'} of {batch}: {cells}")


if __name__ == "__main__":
    main()
