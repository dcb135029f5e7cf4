#!/usr/bin/env python
"""The softlabels demo: offline knowledge distillation on scikit-learn's digits, end to end.

Every step runs the real command line (``softlabels train|generate|eval|report`` in a
subprocess), on the built-in digits splits (shipped with scikit-learn, nothing is
downloaded), on the CPU, with fixed seeds:

1. train a teacher on the hard labels of ``digits:train`` (449 labeled images);
2. ``softlabels generate`` its logits once: ``digits:train`` -> ``stores/train.zarr`` (Zarr),
   ``digits:pool?unlabeled`` (989 images, labels hidden) -> ``stores/pool.h5`` (HDF5), and
   ``digits:test`` -> ``stores/test.zarr`` (only for agreement / KL at evaluation);
3. train the same small student four ways: (a) hard labels only, (b) distilled from the
   labeled store, (c) from the labeled + unlabeled stores, (d) from the unlabeled store
   alone, without any label;
4. ``softlabels eval`` every model on ``digits:test`` against the teacher's test logits,
   print one table, write ``RUN/results.md`` and ``RUN/results.json``, then
   ``softlabels report RUN``;
5. the language-model part (tools/demo_lm.py, ~2 minutes): a GPT teacher on CPython's own
   help text, its sampled token store, a much smaller student distilled from it and one
   trained on hard next-token CE alone, evaluated on held-out text; its table goes to
   ``RUN/lm/results.md`` and ``RUN/lm/results.json`` (``--lm-full``: the full-size run,
   ``--no-lm``: skip it).

The defaults (temperature, alpha, epochs, lr) come from the sweep in docs/DEMO.md.

    python tools/demo.py [--out runs/demo] [--quick] [--seed 0] [--no-lm | --lm-full]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

TEACHER_DIR, STORES = "teacher", "stores"
TEST = "digits:test"


@dataclass(frozen=True)
class Settings:
    """Everything a demo run depends on (written to results.json)."""

    teacher: str = "mlp-large"
    teacher_epochs: int = 30
    teacher_lr: float = 3e-3
    student: str = "linear"
    student_epochs: int = 60
    student_lr: float = 3e-2
    batch_size: int = 32
    temperature: float = 1.0
    alpha: float = 0.5
    seed: int = 0
    quick: bool = False


QUICK = {"teacher_epochs": 20, "student_epochs": 20}
"""--quick: fewer epochs (the test's budget is ~90 s on 2 cores, ~14 process starts included)."""


@dataclass(frozen=True)
class Student:
    key: str
    name: str
    description: str
    stores: tuple[str, ...] = ()


STUDENTS = (
    Student("a", "a_hard", "hard labels of digits:train only (no teacher)"),
    Student("b", "b_kd_labeled", "offline KD from the labeled store (train.zarr): soft + hard loss", ("train.zarr",)),
    Student("c", "c_kd_labeled_unlabeled", "offline KD from train.zarr + pool.h5 (449 labeled + 989 unlabeled rows)",
            ("train.zarr", "pool.h5")),
    Student("d", "d_kd_unlabeled", "offline KD from pool.h5 alone: no label at all", ("pool.h5",)),
)
GENERATE = (("digits:train", "train.zarr"), ("digits:pool?unlabeled", "pool.h5"), (TEST, "test.zarr"))


class StageFailed(RuntimeError):
    pass


def softlabels_command() -> list[str]:
    """The ``softlabels`` console script beside this interpreter, else ``python -m softlabels``."""
    script = Path(sys.executable).parent / "softlabels"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "softlabels"]


class Runner:
    """Runs ``softlabels`` subcommands, logging each to RUN/logs and timing it."""

    def __init__(self, run: Path, *, verbose: bool, threads: int = 1) -> None:
        self.run, self.verbose = run, verbose
        self.logs = run / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.stages: list[dict[str, Any]] = []
        self.cmd = softlabels_command()
        # One thread per process: these models are tiny, so intra-op threads only add overhead,
        # and on shared cores they thrash (mlp, 900 steps: 0.9 s on 1 thread, 17.6 s on 2 under
        # load). A fixed count also keeps reruns bit-identical.
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "PYTHONHASHSEED": "0"}

    def __call__(self, stage: str, log: str, *args: str) -> str:
        return self.tool(stage, log, *self.cmd, *args, shown=["softlabels", *args])

    def tool(self, stage: str, log: str, *argv: str, shown: list[str] | None = None) -> str:
        """Run any command (``argv``) as a stage; ``shown`` is how results.json records it."""
        argv = list(argv)
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=self.run)
        seconds = time.perf_counter() - t0
        log_path = self.logs / f"{log}.log"
        log_path.write_text(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            # The error is on stderr; stdout holds progress lines.
            tail = "\n".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-12:])
            raise StageFailed(f"stage '{stage}' failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}\n"
                              f"(full output: {log_path})")
        self.stages.append({"name": stage, "seconds": seconds, "argv": shown or argv})
        if self.verbose:
            print(f"  {stage:<46} {seconds:6.1f} s", flush=True)
        return proc.stdout


def train_teacher(sl: Runner, s: Settings) -> None:
    sl("teacher training", "teacher", "train", "--student", s.teacher, "--data", "digits:train", "--val-data", TEST,
       "--epochs", str(s.teacher_epochs), "--batch-size", str(s.batch_size), "--lr", str(s.teacher_lr),
       "--seed", str(s.seed), "--device", "cpu", "--out", TEACHER_DIR, "--overwrite", "--no-progress")


def generate_stores(sl: Runner, s: Settings) -> None:
    for data, store in GENERATE:
        sl(f"teacher job: {data} -> {store}", f"generate-{store}", "generate", "--teacher", s.teacher,
           "--weights", f"{TEACHER_DIR}/model.pt", "--data", data, "--out", f"{STORES}/{store}",
           "--device", "cpu", "--overwrite", "--no-progress")


def train_student(sl: Runner, s: Settings, st: Student) -> None:
    args = ["train", "--student", s.student, "--val-data", TEST, "--epochs", str(s.student_epochs),
            "--batch-size", str(s.batch_size), "--lr", str(s.student_lr), "--seed", str(s.seed), "--device", "cpu",
            "--out", st.name, "--overwrite", "--no-progress"]
    if st.stores:
        for store in st.stores:
            args += ["--store", f"{STORES}/{store}"]
        # Unlabeled rows carry no hard-label loss; alpha 0 says so explicitly for (d).
        alpha = 0.0 if st.key == "d" else s.alpha
        args += ["--temperature", str(s.temperature), "--alpha", str(alpha)]
    else:
        args += ["--data", "digits:train"]
    sl(f"student ({st.key}) {s.student}: {st.name}", st.name, *args)


def evaluate_all(sl: Runner, names: list[str]) -> dict[str, dict[str, Any]]:
    results = {}
    for name in names:
        out = sl(f"eval {name}", f"eval-{name}", "eval", "--checkpoint", name, "--data", TEST,
                 "--store", f"{STORES}/test.zarr", "--json")
        result = json.loads(out)
        (sl.run / name / "eval.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        results[name] = result
    return results


# -- the table -------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _ratio(x: float, base: float) -> str:
    return f"{x / base:.2%}" if base else "-"


def build_results(run: Path, s: Settings, evals: dict[str, dict[str, Any]], stages: list[dict[str, Any]],
                  total: float) -> dict[str, Any]:
    t = evals[TEACHER_DIR]
    seconds = {st["name"]: st["seconds"] for st in stages}
    models = [{"name": TEACHER_DIR, "dir": TEACHER_DIR, "role": "teacher", "arch": s.teacher,
               "description": "teacher: hard labels of digits:train", "train_seconds": seconds["teacher training"]}]
    for st in STUDENTS:
        key = next(k for k in seconds if k.startswith(f"student ({st.key})"))
        models.append({"name": st.name, "dir": st.name, "role": "student", "arch": s.student,
                       "description": f"({st.key}) {st.description}", "train_seconds": seconds[key]})
    for m in models:
        e = evals[m["name"]]
        m.update({k: e.get(k) for k in ("accuracy", "agreement", "kl_to_teacher", "ece", "num_parameters", "flops")})
        m["params_vs_teacher"] = e["num_parameters"] / t["num_parameters"]
        m["flops_vs_teacher"] = e["flops"] / t["flops"]
        summary = json.loads((run / m["dir"] / "summary.json").read_text())
        m["epochs"], m["steps"], m["train_loop_seconds"] = summary["epochs"], summary["steps"], summary["seconds"]
        m["eval"] = e
    return {"demo": "softlabels digits KD demo", "settings": asdict(s), "teacher": TEACHER_DIR,
            "stores": {store: f"{STORES}/{store}" for _, store in GENERATE},
            "models": models, "stages": stages, "total_seconds": total}


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "arch", "accuracy", "agreement", "KL to teacher", "params (vs teacher)",
            "MACs/sample (vs teacher)", "epochs/steps", "train s: wall (loop)"]
    rows = []
    for m in results["models"]:
        label = "teacher" if m["role"] == "teacher" else m["name"]
        rows.append([label, m["arch"], _pct(m["accuracy"]), _pct(m["agreement"]), f"{m['kl_to_teacher']:.4f}",
                     f"{m['num_parameters']:,} ({m['params_vs_teacher']:.2%})",
                     f"{m['flops']:,} ({m['flops_vs_teacher']:.2%})", f"{m['epochs']}/{m['steps']}",
                     f"{m['train_seconds']:.1f} ({m['train_loop_seconds']:.1f})"])
    return head, rows


def render_text(results: dict[str, Any]) -> str:
    head, rows = table_rows(results)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = [line(head), "  ".join("-" * w for w in widths), *map(line, rows), ""]
    width = max(len(st["name"]) for st in results["stages"])
    out.append(f"{'stage':<{width}}  wall s")
    out += [f"{st['name']:<{width}}  {st['seconds']:6.1f}" for st in results["stages"]]
    out.append(f"{'total':<{width}}  {results['total_seconds']:6.1f}")
    return "\n".join(out)


def render_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    head, rows = table_rows(results)
    md = ["# softlabels demo: offline KD on digits", "",
          f"Teacher `{s['teacher']}`, student `{s['student']}`; T = {s['temperature']}, alpha = {s['alpha']} "
          f"(alpha = 0 for (d)); seed {s['seed']}{', --quick' if s['quick'] else ''}. "
          f"Metrics on `{TEST}` (359 images); agreement and KL against the teacher's stored test logits. "
          "Train time: wall time of the `softlabels train` process (start-up included) and, in brackets, "
          "of its training loop.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", *[f"- **{m['name']}**: {m['description']}" for m in results["models"]], "",
           "| stage | command | wall s |", "|---|---|---|"]
    md += [f"| {st['name']} | `{' '.join(st['argv'])}` | {st['seconds']:.1f} |" for st in results["stages"]]
    md += [f"| total | | {results['total_seconds']:.1f} |", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="fewer epochs (for the test suite)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-report", action="store_true", help="skip 'softlabels report' (needs matplotlib)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final table")
    lm = p.add_mutually_exclusive_group()
    lm.add_argument("--no-lm", action="store_true", help="skip the language-model part")
    lm.add_argument("--lm-full", action="store_true", help="the language-model part at full size (~10 min)")
    args = p.parse_args(argv)

    s = Settings(seed=args.seed, quick=args.quick)
    if args.quick:
        s = replace(s, **QUICK)
    run = args.out.resolve()
    # Only the demo's own outputs are replaced; anything else in RUN is left alone.
    for name in (STORES, "logs", TEACHER_DIR, *(st.name for st in STUDENTS)):
        shutil.rmtree(run / name, ignore_errors=True)
    run.mkdir(parents=True, exist_ok=True)
    sl = Runner(run, verbose=not args.quiet)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    t0 = time.perf_counter()
    try:
        say(f"softlabels demo -> {run}  (teacher {s.teacher}, student {s.student}, T={s.temperature}, "
            f"alpha={s.alpha}{', quick' if s.quick else ''})")
        train_teacher(sl, s)
        generate_stores(sl, s)
        for st in STUDENTS:
            train_student(sl, s, st)
        evals = evaluate_all(sl, [TEACHER_DIR, *(st.name for st in STUDENTS)])
        results = build_results(run, s, evals, sl.stages, time.perf_counter() - t0)
        (run / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (run / "results.md").write_text(render_markdown(results))
        if not args.no_report:
            sl("report", "report", "report", ".")
            results["stages"], results["total_seconds"] = sl.stages, time.perf_counter() - t0
            (run / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            (run / "results.md").write_text(render_markdown(results))
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print()
    print(render_text(results))
    print(f"\nwrote {run / 'results.md'}, {run / 'results.json'}"
          + ("" if args.no_report else f", {run / 'report.md'}"))
    return 0 if args.no_lm else language_model(run, args)


def language_model(run: Path, args: argparse.Namespace) -> int:
    """The LM part (tools/demo_lm.py) in RUN/lm, after the classifier's table."""
    import demo_lm

    s = demo_lm.settings_for(full=args.lm_full, quick=args.quick, seed=args.seed)
    shutil.rmtree(run / demo_lm.LM, ignore_errors=True)
    sl = Runner(run, verbose=not args.quiet)
    if not args.quiet:
        print(f"\nlanguage model: teacher {s.teacher}, student {s.student}, pydoc_data.topics{', full' if s.full else ''}",
              flush=True)
    t0 = time.perf_counter()
    try:
        results = demo_lm.run_lm(sl, s)
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    results["stages"], results["total_seconds"] = sl.stages, time.perf_counter() - t0
    (run / demo_lm.LM / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (run / demo_lm.LM / "results.md").write_text(demo_lm.render_markdown(results))
    print()
    print(demo_lm.render_text(results))
    print(f"language-model part: {results['total_seconds']:.1f} s; wrote {run / demo_lm.LM / 'results.md'}, "
          f"{run / demo_lm.LM / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
