"""Side-by-side timing for the benchmark table: interleaved pairs and the clocks they are read on."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def paired(candidate: Callable[[], float], baseline: Callable[[], float], rounds: int) -> dict:
    """``rounds`` interleaved (baseline, candidate) runs after one warm-up pair; each callable returns seconds
    (or seconds per unit of work, when the two do different amounts of it)."""
    baseline(), candidate()
    b, c = [], []
    for _ in range(rounds):
        b.append(baseline())
        c.append(candidate())
    ratios = [x / y for x, y in zip(c, b)]
    return {"ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "candidate_s": statistics.median(c), "baseline_s": statistics.median(b), "ratios": ratios}


def cpu(f: Callable[[], object], per: int = 1) -> Callable[[], float]:
    """``f`` timed by this process's CPU clock (every thread of it, none of the machine's other jobs);
    divided by ``per`` (seconds per sample, when ``per`` is the samples ``f`` handles)."""
    def run() -> float:
        t0 = time.process_time()
        f()
        return (time.process_time() - t0) / per
    return run


def wall(f: Callable[[], object]) -> Callable[[], float]:
    """``f`` timed by the wall clock (for work that runs in other processes)."""
    def run() -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0
    return run
