"""Fault injection: stop `softlabels generate` and `softlabels train` at random moments.

For each kill point the job runs in a subprocess and gets SIGKILL, SIGTERM or SIGINT
(Ctrl-C) after a random delay, then the same command is rerun (generate) or resumed
(train --resume), sometimes stopped again, until it finishes. The result must equal
an uninterrupted run: stores bit-identical (every array, checksums and flags
included, and every attribute but the timings); training's final weights and the
metrics of every epoch (timings aside) identical. Generate runs alternate between 0
and --workers DataLoader workers; after every stop the store's lock must be free at
once (no orphaned worker holds it). A third generate job uses a seeded random
teacher (--random-teacher --seed): the same checks, and a rerun without the flag
must be refused. A fourth writes a format-2 views store (V views per image, the
sampled layout in float16, drawn from the seed): the same checks, on every array. A
fifth (``--token-kills``) writes a ragged tokens store (sequences of 1 to 300 tokens, a
random GPT teacher, sampled draws, teacher calls crossing write units).

    python tools/faults.py --kills 20              # 20 stopped runs per backend, and 20 for train
    python tools/faults.py --kills 3 --train-kills 2 --backend .zarr
    python tools/faults.py --kills 0 --train-kills 0 --random-kills 0 --view-kills 10   # views only
    python tools/faults.py --kills 0 --train-kills 0 --random-kills 0 --view-kills 0 --token-kills 10

Prints one line per kill point and a summary; exits 1 if any result differs, a lock
is held after a stop, or a SIGTERM/SIGINT did not end in the one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from softlabels.store.summary import diff_stores

N, D, C = 600, 16, 5
CHUNK, BATCH = 16, 16  # 38 units: plenty of places to die in
IMAGE, VIEWS = (3, 8, 8), ("--views", "4", "--augment", "crop(8,padding=2)+flip", "--layout", "sampled",
                           "--samples", "8", "--batch-size", "36")  # 9 samples per batch: batches cross units
# A ragged token store: 1-token and long sequences, a random GPT teacher, sampled draws, calls crossing units
TOKENS = ("--teacher", "gpt-small", "--random-teacher", "--seed", "5", "--num-classes", "300", "--layout", "sampled",
          "--samples", "12", "--batch-size", "7")
# Slows each unit a little so kill times land inside the job rather than in start-up.
DELAY = {"SOFTLABELS_TEST_DELAY_PER_UNIT": "0.04"}


def make_inputs(work: Path) -> dict[str, Path]:
    """Tiny data with some unlabeled rows, and fixed teacher weights."""
    from softlabels.teacher.spec import resolve_model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    y = (x[:, :C].argmax(1)).astype(np.int64)
    y[::4] = -1
    np.savez(work / "data.npz", x=x, y=y)
    torch.manual_seed(0)
    teacher = resolve_model("mlp", input_shape=(D,), num_classes=C).module
    torch.save(teacher.state_dict(), work / "teacher.pt")
    np.savez(work / "images.npz", x=rng.random((N, *IMAGE)).astype(np.float32), y=y)
    teacher = resolve_model("mlp", input_shape=IMAGE, num_classes=C).module
    torch.save(teacher.state_dict(), work / "teacher-images.pt")
    lengths = rng.integers(1, 40, 120)
    lengths[::17], lengths[5] = 1, 300
    np.savez(work / "tokens.npz", tokens=rng.integers(0, 300, int(lengths.sum())).astype(np.int32),
             offsets=np.concatenate([[0], np.cumsum(lengths)]))
    return {"data": work / "data.npz", "weights": work / "teacher.pt", "images": work / "images.npz",
            "image_weights": work / "teacher-images.pt", "tokens": work / "tokens.npz"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "softlabels", *args]


SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
STOPPED = "error: interrupted"  # the one line SIGTERM and SIGINT end in


def _run(cmd: list[str], env: dict[str, str] | None = None, kill_after: float | None = None,
         sig: str = "KILL") -> str | None:
    """Run cmd; with kill_after, send ``sig`` after that many seconds.

    Returns None when it finished, else how the stop ended: 'killed', 'one line'
    (the interrupted message, exit 2) or 'other: ...' (e.g. a signal during start-up).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(SIGNALS[sig])
        _, err = proc.communicate()
        if proc.returncode == 0:  # the signal came after the work was done
            return None
        if sig == "KILL":
            return "killed"
        lines = err.strip().splitlines()
        if proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(STOPPED):
            return "one line"
        # Before the CLI installs its handlers (interpreter start-up) a signal acts as usual.
        return f"other: exit {proc.returncode}, {lines[-1] if lines else 'no output'}"
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:5])} ... failed ({proc.returncode}): {err.strip()}")
    return None


def _lock_free(path: Path) -> bool:
    from softlabels.errors import StoreLocked
    from softlabels.store.lock import StoreLock

    try:
        with StoreLock(path):
            return True
    except StoreLocked:
        return False


def generate_cmd(inputs: dict[str, Path], out: Path, workers: int = 0, random_teacher: bool = False,
                 views: bool = False, tokens: bool = False) -> list[str]:
    if tokens:
        return _cli("generate", *TOKENS, "--data", str(inputs["tokens"]), "--out", str(out), "--chunk-rows", "4",
                    "--dtype", "float16", "--num-workers", str(workers), "--no-progress")
    teacher = ["--random-teacher", "--seed", "7"] if random_teacher else \
        ["--weights", str(inputs["image_weights" if views else "weights"])]
    return _cli("generate", "--teacher", "mlp", *teacher, "--data", str(inputs["images" if views else "data"]),
                "--out", str(out), "--chunk-rows", str(CHUNK), "--batch-size", str(BATCH), "--dtype", "float16",
                "--num-workers", str(workers), "--no-progress", *(VIEWS if views else ()))


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    _run(cmd, env)
    return time.perf_counter() - t0


def _kill_delay(rng: random.Random, killed: int, start_s: float, clean_s: float) -> float | None:
    """A kill time inside the job (after interpreter start-up), or None to let the run finish.

    The first run is always killed; reruns are killed again with probability 0.3, at most 3 times.
    """
    if killed >= 3 or (killed and rng.random() >= 0.3):
        return None
    return rng.uniform(0.8 * start_s, clean_s)


def generate_faults(work: Path, inputs: dict[str, Path], suffix: str, kills: int, rng: random.Random,
                    start_s: float, workers: int, random_teacher: bool = False, views: bool = False,
                    tokens: bool = False) -> list[dict]:
    """Kill points for one backend; returns one record per kill point."""
    job = "gen-rand" if random_teacher else "gen-views" if views else "gen-tokens" if tokens else "generate"
    ref = work / f"ref-{job}{suffix}"
    clean_s = _timed(generate_cmd(inputs, ref, random_teacher=random_teacher, views=views, tokens=tokens), DELAY)
    # The store records --num-workers (nothing else differs): a reference per worker count,
    # checked to hold the same bytes.
    refs = {0: ref, workers: work / f"ref-{job}-w{workers}{suffix}"}
    _run(generate_cmd(inputs, refs[workers], workers, random_teacher, views, tokens))
    same = diff_stores(ref, refs[workers], ignore=("timings", "settings"))
    records: list[dict] = [{"job": job, "backend": suffix, "workers": workers, "kill_delays_s": [],
                            "identical": not same, "diffs": same[:3], "state_at_kill": [], "ends": [],
                            "lock_held_after_stop": 0}]  # 0 vs `workers` workers: the same bytes
    for i in range(3 * kills + 5):  # until `kills` runs were really stopped (a stop can come after the end)
        if sum(bool(r["kill_delays_s"]) for r in records) >= kills:
            break
        out = work / f"g{i}-{job}{suffix}"
        w = workers if i % 2 else 0
        delays, progress, ends, killed, lock_held = [], [], [], 0, 0
        while True:  # stop, rerun, sometimes stop the rerun too, until it finishes
            delay = _kill_delay(rng, killed, start_s, clean_s)
            sig = rng.choice(list(SIGNALS))
            end = _run(generate_cmd(inputs, out, w, random_teacher, views, tokens), DELAY, kill_after=delay, sig=sig)
            if end is None:
                break
            killed += 1
            delays.append(round(delay, 2))
            ends.append(f"{sig}: {end}")
            lock_held += not _lock_free(out)
            progress.append(_chunks_done(out))
        diffs = diff_stores(refs[w], out)
        if random_teacher and killed:  # the same rerun without --random-teacher is refused
            cmd = [a for a in generate_cmd(inputs, out, w, True) if a not in ("--random-teacher",)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 2 or "--random-teacher" not in p.stderr:
                diffs.append(f"rerun without --random-teacher not refused: {p.returncode} {p.stderr.strip()[-200:]}")
        records.append({"job": job, "backend": suffix, "workers": w, "kill_delays_s": delays,
                        "identical": not diffs, "diffs": diffs[:3], "state_at_kill": progress, "ends": ends,
                        "lock_held_after_stop": lock_held})
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    return records


def _chunks_done(path: Path) -> str:
    """How far a killed job got: 'k/n units', or why there is no readable store."""
    from softlabels.errors import SoftLabelsError
    from softlabels.store.reader import open_store

    try:
        with open_store(path, allow_partial=True) as store:
            return f"{store.num_units - len(store.missing_units())}/{store.num_units} units"
    except SoftLabelsError as err:
        return f"no readable store yet ({type(err).__name__})"


TIMING_KEYS = ("epoch_seconds", "samples_per_s", "seconds", "wall_s")


def train_cmd(store: Path, out: Path, resume: bool) -> list[str]:
    return _cli("train", "--student", "mlp", "--store", str(store), "--epochs", "8", "--batch-size", "32",
                "--out", str(out), "--no-progress", "--resume" if resume else "--overwrite")


def _train_result(out: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    weights = torch.load(out / "model.pt", weights_only=True)
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    return weights, metrics


def train_faults(work: Path, store: Path, kills: int, rng: random.Random, start_s: float) -> list[dict]:
    """Kill `softlabels train` at random moments, resume, compare with an uninterrupted run."""
    ref = work / "train-ref"
    clean_s = _timed(train_cmd(store, ref, resume=False))
    ref_weights, ref_metrics = _train_result(ref)
    records: list[dict] = []
    for i in range(3 * kills + 5):
        if sum(bool(r["kill_delays_s"]) for r in records) >= kills:
            break
        out = work / f"t{i}"
        delays, progress, ends, killed, lock_held = [], [], [], 0, 0
        while True:
            resume = (out / "checkpoint.pt").exists()
            delay = _kill_delay(rng, killed, start_s, clean_s)
            sig = rng.choice(list(SIGNALS))
            end = _run(train_cmd(store, out, resume), kill_after=delay, sig=sig)
            if end is None:
                break
            killed += 1
            delays.append(round(delay, 2))
            ends.append(f"{sig}: {end}")
            lock_held += not _lock_free(out)
            progress.append(f"{len((out / 'metrics.jsonl').read_text().splitlines()) if (out / 'metrics.jsonl').exists() else 0} epochs")
        weights, metrics = _train_result(out)
        same_weights = weights.keys() == ref_weights.keys() and all(torch.equal(weights[k], ref_weights[k])
                                                                   for k in weights)
        records.append({"job": "train", "backend": store.suffix, "kill_delays_s": delays,
                        "identical": same_weights and metrics == ref_metrics,
                        "diffs": [] if same_weights else ["final weights differ"]
                        + ([] if metrics == ref_metrics else ["metrics differ"]), "state_at_kill": progress,
                        "ends": ends, "lock_held_after_stop": lock_held, "workers": 0})
        shutil.rmtree(out)
    return records


def run(kills: int, train_kills: int, backends: list[str], seed: int, work: Path, workers: int = 2,
        random_kills: int | None = None, view_kills: int | None = None, token_kills: int = 0) -> list[dict]:
    rng = random.Random(seed)
    inputs = make_inputs(work)
    start_s = _timed(_cli("--version"))  # interpreter + imports: kills before this test nothing
    records = []
    for suffix in backends:
        if kills:
            records += generate_faults(work, inputs, suffix, kills, rng, start_s, workers)
        if view_kills if view_kills is not None else kills:
            records += generate_faults(work, inputs, suffix, kills if view_kills is None else view_kills, rng,
                                       start_s, workers, views=True)
        if token_kills:
            records += generate_faults(work, inputs, suffix, token_kills, rng, start_s, workers, tokens=True)
    random_kills = kills if random_kills is None else random_kills
    if random_kills:
        records += generate_faults(work, inputs, backends[0], random_kills, rng, start_s, workers, random_teacher=True)
    if train_kills:
        records += train_faults(work, work / f"ref-generate{backends[0]}", train_kills, rng, start_s)
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="killed runs per backend for generate")
    parser.add_argument("--train-kills", type=int, default=None, help="kill points for train (default: --kills)")
    parser.add_argument("--random-kills", type=int, default=None,
                        help="stopped runs of the random-teacher job (default: --kills)")
    parser.add_argument("--view-kills", type=int, default=None,
                        help="stopped runs per backend of the views job (default: --kills)")
    parser.add_argument("--token-kills", type=int, default=0,
                        help="stopped runs per backend of the ragged tokens job (sampled, random GPT teacher)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of every other generate run")
    parser.add_argument("--backend", nargs="+", default=[".zarr", ".h5"], choices=[".zarr", ".h5"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = run(args.kills, args.kills if args.train_kills is None else args.train_kills,
                      args.backend, args.seed, Path(tmp), args.workers, args.random_kills, args.view_kills,
                      args.token_kills)
    for r in records:
        print(f"{r['job']:8} {r['backend']:5} workers {r['workers']} stops {r['ends'] or 'none (finished first)'} "
              f"at {r['kill_delays_s'] or '-'} s ({', '.join(r['state_at_kill']) or '-'}): "
              f"{'identical' if r['identical'] else 'DIFFERENT ' + '; '.join(r['diffs'])}"
              f"{'; LOCK HELD after a stop' if r['lock_held_after_stop'] else ''}")
    killed = [r for r in records if r["kill_delays_s"]]
    bad = [r for r in records if not r["identical"] or r["lock_held_after_stop"]]
    for job in ("generate", "gen-rand", "gen-views", "gen-tokens", "train"):
        for suffix in sorted({r["backend"] for r in records if r["job"] == job}):
            sel = [r for r in killed if r["job"] == job and r["backend"] == suffix]
            ends = [e for r in sel for e in r["ends"]]
            by_sig = ", ".join(f"{s} {sum(e.startswith(s + ':') for e in ends)}" for s in SIGNALS)
            clean = sum(e.endswith("one line") for e in ends)
            soft = sum(not e.startswith("KILL") for e in ends)
            print(f"summary {job} {suffix}: {len(sel)} runs stopped ({len(ends)} stops: {by_sig}; "
                  f"{clean}/{soft} TERM/INT ended in the one-line message), "
                  f"{sum(r['identical'] for r in sel)} identical to the uninterrupted run, "
                  f"{sum(r['lock_held_after_stop'] for r in sel)} with a lock held after a stop")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
