"""Benchmark: forward + backward time and peak memory of the KD losses vs plain cross-entropy.

    python tools/bench/bench_losses.py [--classes 131072] [--rows 2048] [--k 32] [--samples 32] [--rounds 3]

One student logits tensor [rows, classes] (float32, as an LM head gives them to
the loss), hard labels, and a teacher target of each layout, made once. Each
case runs forward + backward ``--rounds`` times, cases interleaved; the figures
are the median time and the peak memory above what the inputs hold, side by side.
Time is CPU seconds of this process on the CPU (it stays meaningful on a machine
shared with other jobs; with ``--threads 1`` it is the work done) and wall-clock
seconds on CUDA:

* ce: ``F.cross_entropy`` (the floor);
* plain-kd: 0.5 CE + 0.5 KL written the usual way (three log_softmax; the reference);
* kl, topk_kl, sampled_kl: ``DistillationLoss(make_soft_loss(...), alpha)`` — with
  ``alpha`` 0.5 (the hard CE fused in) and 0 (the soft loss alone).

Peak memory: on CUDA ``max_memory_allocated``; on the CPU the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs before each case), which
counts whole pages and the allocator's caching, so compare cases with each other.
Targets (issue 13): top-k/sampled within 1.5x the time and 1.2x the peak memory of ce.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for softlabels

from softlabels.store.layouts import DenseTarget, make_layout, to_numpy  # noqa: E402
from softlabels.student.losses import DistillationLoss, make_soft_loss  # noqa: E402


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Peak:
    """Peak bytes allocated while the block runs, above what was allocated when it started."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Peak:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = _status("VmHWM") - self.base


def make_cases(s: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, args) -> dict[str, Callable]:
    c = s.shape[1]
    ids = torch.arange(len(s), device=s.device)
    targets = {"kl": DenseTarget(teacher)}
    for name, layout in (("topk_kl", make_layout("topk", num_classes=c, logits_dtype="bfloat16", k=args.k)),
                         ("sampled_kl", make_layout("sampled", num_classes=c, logits_dtype="bfloat16",
                                                    samples=args.samples))):
        block = {k: to_numpy(v.cpu()) for k, v in layout.encode(teacher, sample_ids=ids, positions=0 * ids).items()}
        targets[name] = layout.decode(block).to(s.device)
    t = args.temperature

    def plain_kd() -> torch.Tensor:
        kl = F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(teacher / t, -1), reduction="none",
                      log_target=True).sum(-1)
        return 0.5 * F.cross_entropy(s, labels) + 0.5 * t * t * kl.mean()

    cases: dict[str, Callable] = {"ce": lambda: F.cross_entropy(s, labels), "plain-kd a=0.5": plain_kd}
    for name, target in targets.items():
        for alpha in (0.5, 0.0):
            loss = DistillationLoss(make_soft_loss(name, t), alpha)
            cases[f"{name} a={alpha}"] = (lambda loss=loss, target=target: loss(s, {"labels": labels, "target": target}))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=131_072)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    teacher = (4 * torch.randn(args.rows, args.classes, generator=g)).to(dev)
    s = torch.randn(args.rows, args.classes, generator=g).to(dev).requires_grad_()
    labels = torch.randint(0, args.classes, (args.rows,), generator=g).to(dev)
    cases = make_cases(s, labels, teacher, args)
    times: dict[str, list[float]] = {k: [] for k in cases}
    peaks: dict[str, int] = {k: 0 for k in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            s.grad = None
            with Peak(dev) as peak:
                clock = time.perf_counter if dev.type == "cuda" else time.process_time
                t0 = clock()
                fn().backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(clock() - t0)
            peaks[name] = max(peaks[name], peak.bytes)
    base_t, base_m = statistics.median(times["ce"]), peaks["ce"]
    rows = [{"case": k, "seconds": statistics.median(v), "time_vs_ce": statistics.median(v) / base_t,
             "peak_mib": peaks[k] / 2**20, "peak_vs_ce": peaks[k] / base_m} for k, v in times.items()]
    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        return
    print(f"C={args.classes} rows={args.rows} K={args.k} S={args.samples} T={args.temperature} "
          f"threads={args.threads} device={dev} (median of {args.rounds}; logits [rows, C] float32 = "
          f"{args.rows * args.classes * 4 / 2**20:.0f} MiB)")
    print(f"{'case':18s} {'ms':>9s} {'x ce':>6s} {'peak MiB':>9s} {'x ce':>6s}")
    for r in rows:
        print(f"{r['case']:18s} {r['seconds'] * 1e3:9.1f} {r['time_vs_ce']:6.2f} {r['peak_mib']:9.0f} "
              f"{r['peak_vs_ce']:6.2f}")


if __name__ == "__main__":
    main()
