"""The demo's language-model part: offline distillation of a GPT on CPython's own help text.

Every step is a real command (``tools/lm_data.py``, then ``softlabels train|generate|eval``
in subprocesses), offline, on the CPU, with fixed seeds, under ``RUN/lm``:

1. ``tools/lm_data.py``: a byte-level BPE tokenizer trained on ``pydoc_data.topics`` (the
   English help text that ships with every Python) and train / held-out token files;
2. a teacher GPT trained on hard next-token CE (``softlabels train --data``, no store);
3. ``softlabels generate`` with the teacher's weights: a *sampled* token store of the
   training text (S = 12 draws per token, float16), and a dense store of the held-out text
   (only for exact agreement / KL at evaluation);
4. a much smaller student trained from the sampled store (KD at T = 1 mixed with the hard
   next-token CE, alpha = 0.5), and the same student on hard next-token CE alone, for the
   same steps;
5. ``softlabels eval`` of teacher and students on the held-out text against the teacher's
   held-out store: perplexity, top-1 agreement, KL to the teacher and ECE.

``full=True`` (``tools/demo --lm-full``) is the full-size run: a 4-layer teacher with 17x
the student's parameters and more epochs (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

LM = "lm"
TOOLS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class LMSettings:
    """Everything the LM part depends on (written to RUN/lm/results.json)."""

    vocab_size: int = 1024
    seq_len: int = 128
    teacher: str = "gpt-small"
    teacher_epochs: int = 6
    teacher_lr: float = 3e-3
    student: str = "gpt-tiny"
    student_epochs: int = 3
    student_lr: float = 3e-3
    batch_size: int = 16
    samples: int = 12
    alpha: float = 0.5
    temperature: float = 1.0
    seed: int = 0
    full: bool = False
    quick: bool = False


FULL = {"teacher": "gpt-medium", "teacher_epochs": 6, "student_epochs": 8}
QUICK = {"teacher_epochs": 2, "student_epochs": 1}
"""--quick (the test suite): one student epoch; the table's shape, not its numbers, is what it checks."""

MODELS = (("teacher", "teacher: hard next-token CE on the training text"),
          ("student_kd", "student: KD from the teacher's sampled store (T 1, alpha 0.5: half hard next-token CE)"),
          ("student_hard", "student: hard next-token CE only (no teacher), same steps"))


def settings_for(*, full: bool, quick: bool, seed: int) -> LMSettings:
    s = LMSettings(seed=seed, full=full, quick=quick)
    return replace(s, **FULL) if full else replace(s, **QUICK) if quick else s


def run_lm(sl: Any, s: LMSettings) -> dict[str, Any]:
    """Run the LM part with ``sl`` (tools/demo.py's Runner, in RUN); return its results."""
    data, stores = f"{LM}/data", f"{LM}/stores"
    tok = ["--tokenizer", f"{data}/tokenizer.json"]
    common = ["--batch-size", str(s.batch_size), "--seed", str(s.seed), "--device", "cpu", "--overwrite",
              "--no-progress"]
    sl.tool("LM data: BPE tokenizer + token files", "lm-data", sys.executable, str(TOOLS / "lm_data.py"),
            "--out", data, "--vocab-size", str(s.vocab_size), "--seq-len", str(s.seq_len))
    sl("LM teacher training (hard next-token CE)", "lm-teacher", "train", "--student", s.teacher,
       "--data", f"{data}/train.npz", *tok, "--epochs", str(s.teacher_epochs), "--lr", str(s.teacher_lr),
       "--out", f"{LM}/teacher", *common)
    gen = ["generate", "--teacher", s.teacher, "--weights", f"{LM}/teacher/model.pt", *tok, "--dtype", "float16",
           "--seed", str(s.seed), "--batch-size", str(s.batch_size), "--device", "cpu", "--overwrite", "--no-progress"]
    sl(f"LM teacher job: train -> sampled store (S = {s.samples})", "lm-generate-train", *gen,
       "--data", f"{data}/train.npz", "--layout", "sampled", "--samples", str(s.samples),
       "--out", f"{stores}/train-sampled.zarr")
    sl("LM teacher job: held-out -> dense store", "lm-generate-heldout", *gen, "--data", f"{data}/heldout.npz",
       "--out", f"{stores}/heldout-dense.zarr")
    student = ["train", "--student", s.student, "--epochs", str(s.student_epochs), "--lr", str(s.student_lr), *common]
    sl("LM student: KD from the sampled store", "lm-student-kd", *student, "--store",
       f"{stores}/train-sampled.zarr", "--alpha", str(s.alpha), "--temperature", str(s.temperature),
       "--out", f"{LM}/student_kd")
    sl("LM student: hard next-token CE only", "lm-student-hard", *student, "--data", f"{data}/train.npz", *tok,
       "--out", f"{LM}/student_hard")
    evals = {}
    for name, _ in MODELS:
        out = sl(f"LM eval {name}", f"lm-eval-{name}", "eval", "--checkpoint", f"{LM}/{name}", "--data",
                 f"{data}/heldout.npz", "--store", f"{stores}/heldout-dense.zarr", "--json")
        evals[name] = json.loads(out)
        (sl.run / LM / name / "eval.json").write_text(json.dumps(evals[name], indent=2, sort_keys=True) + "\n")
    return build_results(sl.run, s, evals)


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_results(run: Path, s: LMSettings, evals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary = json.loads((run / LM / "data" / "lm_data.json").read_text())
    tokens = summary["train"]["tokens"]
    store = run / LM / "stores" / "train-sampled.zarr"
    teacher_params = json.loads((run / LM / "teacher" / "summary.json").read_text())["num_parameters"]
    models = []
    for name, description in MODELS:
        run_summary = json.loads((run / LM / name / "summary.json").read_text())
        e = evals[name]
        models.append({"name": name, "arch": run_summary["student"], "description": description,
                       "num_parameters": run_summary["num_parameters"],
                       "params_vs_teacher": run_summary["num_parameters"] / teacher_params,
                       "epochs": run_summary["epochs"], "steps": run_summary["steps"],
                       "train_loop_seconds": run_summary["seconds"],
                       **{k: e.get(k) for k in ("loss", "perplexity", "agreement", "kl_to_teacher", "ece",
                                                "positions")}})
    return {"demo": "softlabels language-model KD demo", "settings": asdict(s), "data": summary,
            "store": {"path": f"{LM}/stores/train-sampled.zarr", "layout": "sampled", "samples": s.samples,
                      "tokens": tokens, "bytes_on_disk": _disk_bytes(store),
                      "bytes_per_token": _disk_bytes(store) / tokens},
            "models": models}


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "arch", "params (vs teacher)", "held-out loss", "perplexity", "agreement", "KL to teacher",
            "ECE", "epochs/steps"]
    rows = [[m["name"], m["arch"], f"{m['num_parameters']:,} ({m['params_vs_teacher']:.1%})", f"{m['loss']:.4f}",
             f"{m['perplexity']:.2f}", f"{100 * m['agreement']:.2f}%", f"{m['kl_to_teacher']:.4f}",
             f"{m['ece']:.4f}", f"{m['epochs']}/{m['steps']}"] for m in results["models"]]
    return head, rows


def store_line(results: dict[str, Any]) -> str:
    st = results["store"]
    return (f"sampled store (S = {st['samples']}, float16, uncompressed Zarr): {st['bytes_on_disk']:,} bytes for "
            f"{st['tokens']:,} training tokens = {st['bytes_per_token']:.1f} B/token")


def render_text(results: dict[str, Any]) -> str:
    head, rows = table_rows(results)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows), "", store_line(results)])


def render_markdown(results: dict[str, Any]) -> str:
    s, d = results["settings"], results["data"]
    head, rows = table_rows(results)
    md = ["# softlabels demo: offline KD of a language model on CPython's help text", "",
          f"BPE vocabulary {d['vocab_size']:,}, windows of {d['seq_len']} tokens: {d['train']['tokens']:,} training "
          f"tokens, {d['heldout']['tokens']:,} held-out tokens (text never seen in training). Teacher `{s['teacher']}` "
          f"({s['teacher_epochs']} epochs of hard next-token CE); students `{s['student']}` for "
          f"{s['student_epochs']} epochs each; seed {s['seed']}. Metrics on the held-out tokens; agreement and KL "
          "(exact) against the teacher's dense held-out store.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", *[f"- **{m['name']}**: {m['description']}" for m in results["models"]], "", store_line(results), ""]
    return "\n".join(md)
