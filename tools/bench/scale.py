"""Scaling: ``generate`` and the reader at 1x, 10x and 100x the rows (or token positions), and the sparse
layouts at C = 131,072; throughput and peak memory per size, each measured in a fresh process.

    tools/bench/run --scale [--cases classifier,tokens,c128k-topk,c128k-sampled] [--factors 1,10,100] [--json FILE]

Cases (the base size is the 1x one):

* ``classifier``: dense float16, C = 1,000, a scripted MLP teacher 64-256-1000 over a ``.npy`` of
  5,000 x 64 float32 rows (input and store both grow with the rows), batches of 256.
* ``tokens``: sampled S = 12, V = 4,096, ``gpt-tiny`` (random) over 64 x 128 token positions, batches of 16.
* ``c128k-topk``, ``c128k-sampled``: top-k K = 32 and sampled S = 12 at C = 131,072, a scripted MLP
  teacher 64-64-131072 over 128 x 64 float32 rows, batches of 128; 1x and 10x only (100x is minutes of
  teacher arithmetic on 2 cores).

The input file is written by this process; then one fresh process runs ``generate`` (HDF5) and
another reads the finished store once with ``SoftLabelDataset`` (shuffled, checksums on; token
stores joined with their token file), so each one's memory is its own. Each child reports its CPU
seconds (``time.process_time``), its peak RSS (VmHWM of /proc/self/status: ``ru_maxrss`` would keep
this parent's peak across fork and exec) and its peak anonymous memory (RssAnon, polled every 10 ms:
memory-mapped input pages are file-backed and do not count there), both also before the work
starts (the imports and the model). Throughput is rows or
positions per CPU second; the table gives it as a ratio to the next smaller size's (fixed costs,
the imports excluded, still weigh on the 1x run). Flat means: that ratio near 1 and the peak
anonymous memory above the start not growing with the size. The JSON keeps each child's
RssAnon trace as the maximum of each tenth of its run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CASES = {  # name: (kind, base rows or sequences, classes, batch size, layout options)
    "classifier": ("rows", 5000, 1000, 256, {}),
    "tokens": ("tokens", 64, 4096, 16, {"layout": "sampled", "samples": 12}),
    "c128k-topk": ("rows", 128, 131_072, 128, {"layout": "topk", "topk": 32}),
    "c128k-sampled": ("rows", 128, 131_072, 128, {"layout": "sampled", "samples": 12}),
}
MAX_FACTOR = {"c128k-topk": 10, "c128k-sampled": 10}  # 100x at C = 128k: minutes of teacher on 2 cores
SEQ_LEN, FEATURES = 128, 64


def _status_kib(field: str) -> int:
    """A KiB field of /proc/self/status (``RssAnon``, ``VmHWM``: this process's own, reset by exec, where
    ``ru_maxrss`` keeps the parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _rss_anon_kib() -> int:
    return _status_kib("RssAnon")


class Peak:
    """The peak of RssAnon, polled every 10 ms in a daemon thread, and its trace (wall seconds, KiB)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.trace = [(0.0, _rss_anon_kib())]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.trace.append((time.perf_counter() - self.t0, _rss_anon_kib()))

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        self.trace.append((time.perf_counter() - self.t0, _rss_anon_kib()))
        return max(kib for _, kib in self.trace)

    def deciles(self) -> list[int]:
        """The trace's maximum in each tenth of the run (KiB): where memory rises and whether it levels off."""
        end = self.trace[-1][0] or 1.0
        out = [0] * 10
        for t, kib in self.trace:
            i = min(9, int(10 * t / end))
            out[i] = max(out[i], kib)
        return out


def prepare(case: str, factor: int, d: Path) -> dict:
    """Write the case's input (and teacher) at ``factor`` x its base size; the child's arguments."""
    import torch

    kind, base, classes, _, _ = CASES[case]
    n = base * factor
    rng = np.random.default_rng(0)
    if kind == "tokens":
        np.save(d / "in.npy", rng.integers(0, classes, (n, SEQ_LEN + 1)).astype(np.int64))
        return {"positions": n * SEQ_LEN, "teacher": "gpt-tiny"}
    f = FEATURES
    x = np.lib.format.open_memmap(d / "in.npy", mode="w+", dtype=np.float32, shape=(n, f))
    for a in range(0, n, 10_000):
        x[a:a + 10_000] = rng.standard_normal((min(10_000, n - a), f), dtype=np.float32)
    x.flush()
    del x
    if not (d / "teacher.pt").exists():
        torch.manual_seed(0)
        hidden = 256 if classes <= 4096 else 64
        t = torch.nn.Sequential(torch.nn.Linear(f, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))
        torch.jit.save(torch.jit.script(t.eval()), d / "teacher.pt")
    return {"positions": n, "teacher": str(d / "teacher.pt")}


def child(step: str, case: str, d: Path) -> dict:
    """Run one step (``generate`` or ``read``) in this fresh process; its CPU seconds and memory."""
    import torch

    torch.set_num_threads(1)
    from softlabels.inputs.tokens import open_token_file
    from softlabels.student.dataset import SoftLabelDataset
    from softlabels.teacher.job import generate

    kind, _, classes, batch, opts = CASES[case]
    store = d / "out.h5"
    tokens = kind == "tokens"
    start_rss, start_anon = _status_kib("VmHWM"), _rss_anon_kib()
    peak = Peak()
    t0 = time.process_time()
    if step == "generate":
        generate("gpt-tiny" if tokens else str(d / "teacher.pt"), str(d / "in.npy"), store, random_teacher=tokens,
                 num_classes=classes, dtype="float16", batch_size=batch, progress=False,
                 overwrite=True, **opts)
        done = None
    else:
        data = open_token_file(d / "in.npy") if tokens else None
        ds = SoftLabelDataset([(store, data)], batch_size=batch, seed=0)
        ds.set_epoch(0)
        done = sum(int(b["loss_mask"].sum()) if tokens else len(b["labels"]) for b in ds)
    cpu = time.process_time() - t0
    anon = peak.stop()
    return {"cpu_s": cpu, "maxrss_kib": _status_kib("VmHWM"),
            "start_maxrss_kib": start_rss, "peak_anon_kib": anon, "start_anon_kib": start_anon, "items": done,
            "anon_deciles_kib": peak.deciles(),
            "store_bytes": sum(p.stat().st_size for p in [store]) if store.exists() else 0}


def run_child(step: str, case: str, d: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", step, "--case", case, "--dir", str(d)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{case} {step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--factors", default="1,10,100")
    ap.add_argument("--json", default="bench-scale.json")
    ap.add_argument("--child", choices=("generate", "read"), help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.case, Path(args.dir))))
        return
    import platform

    import torch

    import softlabels

    factors = [int(f) for f in args.factors.split(",")]
    print(f"softlabels {softlabels.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"one torch thread; a fresh process per step and size", flush=True)
    results: dict = {}
    t_all = time.perf_counter()
    for case in args.cases.split(","):
        results[case] = {}
        for factor in [f for f in factors if f <= MAX_FACTOR.get(case, f)]:
            with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
                d = Path(tmp)
                info = prepare(case, factor, d)
                t0 = time.perf_counter()
                gen = run_child("generate", case, d)
                read = run_child("read", case, d)
                if read["items"] != info["positions"]:
                    raise SystemExit(f"{case} x{factor}: read {read['items']} of {info['positions']}")
                results[case][factor] = {**info, "generate": gen, "read": read,
                                         "wall_s": round(time.perf_counter() - t0, 1)}
                r = results[case][factor]
                print(f"{case} x{factor}: {info['positions']:,} positions; generate {info['positions'] / gen['cpu_s']:,.0f}/CPU s, "
                      f"peak RSS {gen['maxrss_kib'] / 1024:.0f} MiB (start {gen['start_maxrss_kib'] / 1024:.0f}), anon "
                      f"+{(gen['peak_anon_kib'] - gen['start_anon_kib']) / 1024:.0f} MiB; read "
                      f"{info['positions'] / read['cpu_s']:,.0f}/CPU s, peak RSS {read['maxrss_kib'] / 1024:.0f} MiB "
                      f"(start {read['start_maxrss_kib'] / 1024:.0f}), anon "
                      f"+{(read['peak_anon_kib'] - read['start_anon_kib']) / 1024:.0f} MiB; "
                      f"store {gen['store_bytes'] / info['positions']:,.1f} B/position; {r['wall_s']} s", flush=True)
    print(table(results))
    print(f"\nwhole scaling run: {time.perf_counter() - t_all:.0f} s wall")
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"figures written to {args.json}")


def table(results: dict) -> str:
    """Markdown: per case and size, throughput / the next smaller size's, and peak memory over the start."""
    lines = ["", ("| case | size | positions | generate: throughput / smaller size | generate: peak RSS, MiB "
                  "(anon over start) | read: throughput / smaller size | read: peak RSS, MiB (anon over start) "
                  "| B/position |"), "|---|---|---|---|---|---|---|---|"]
    for case, sizes in results.items():
        prev = None
        for factor, r in sizes.items():
            g, rd, n = r["generate"], r["read"], r["positions"]
            rate = (n / g["cpu_s"], n / rd["cpu_s"])
            tg, tr = ("–", "–") if prev is None else (f"{rate[0] / prev[0]:.2f}", f"{rate[1] / prev[1]:.2f}")
            prev = rate
            lines.append(f"| {case} | {factor}x | {n:,} | {tg} | {g['maxrss_kib'] / 1024:.0f} "
                         f"(+{(g['peak_anon_kib'] - g['start_anon_kib']) / 1024:.0f}) | {tr} | "
                         f"{rd['maxrss_kib'] / 1024:.0f} (+{(rd['peak_anon_kib'] - rd['start_anon_kib']) / 1024:.0f}) | "
                         f"{g['store_bytes'] / n:,.1f} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
