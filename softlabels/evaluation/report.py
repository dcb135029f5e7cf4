"""Turn a run directory into a small Markdown or HTML report with PNG plots.

A *run directory* is either one ``softlabels train --out`` directory (it holds
``metrics.jsonl``) or a directory of them, such as the demo's ``RUN`` (one
sub-directory per model, plus ``results.json``). What the report shows:

* **training curves**: loss and validation accuracy per epoch, from every model's
  ``metrics.jsonl``;
* **accuracy vs teacher**: one bar per student, the teacher's accuracy as a line
  (needs test metrics: ``results.json`` or a model's ``eval.json``);
* **reliability diagram**: accuracy against confidence per bin, one panel per
  model. Bins come from an eval JSON's ``reliability`` section
  (:meth:`softlabels.student.metrics.EvalAccumulator.reliability`) or, when it has none,
  are computed here from the model's checkpoint and the eval's ``data`` spec.

Where the numbers come from, first found wins: ``results.json`` (the demo's
schema: ``{"teacher": NAME, "models": [{"name", "dir", "role", "arch",
"description", "accuracy", ..., "eval": {...}}], "stages": [...]}``), then
``<model dir>/eval.json`` (``softlabels eval --json`` output), then the model's
``summary.json``. matplotlib is optional (``pip install 'softlabels[demo]'``) and
is imported only when plotting.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softlabels.errors import ConfigError, RunNotFound, SoftLabelsError
from softlabels.evaluation.config import REPORT_FORMATS
from softlabels._runtime.paths import out_overlaps
from softlabels.student.checkpoint import CHECKPOINT, METRICS, RUN_FILES, SUMMARY, read_metrics

__all__ = [
    "FORMATS", "PLOT_DPI", "ModelRun", "build_report", "compute_reliability", "find_models", "plot_size",
]

FORMATS = REPORT_FORMATS
RESULTS = "results.json"
EVAL = "eval.json"
PLOT_DPI = 100
_PANEL_PX = {"curves": (600, 420), "accuracy": (800, 420), "reliability": (300, 400)}
_MAX_COLS = 5  # reliability panels per row


@dataclass
class ModelRun:
    """One model of a run: its training log, and its test metrics when known."""

    name: str
    dir: Path | None
    role: str = "student"  # "teacher" or "student"
    arch: str | None = None
    description: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)  # test metrics (accuracy, agreement, ...)
    reliability: dict[str, list] | None = None
    note: str = ""  # why something is missing

    @property
    def accuracy(self) -> float | None:
        return _num(self.result.get("accuracy"))


def plot_size(kind: str, n_models: int = 1) -> tuple[int, int]:
    """Width and height in pixels of the PNG ``kind`` (curves, accuracy, reliability) for ``n_models``."""
    w, h = _PANEL_PX[kind]
    if kind == "curves":
        return 2 * w, h
    if kind == "reliability":
        cols = max(1, min(n_models, _MAX_COLS))
        return cols * w, math.ceil(max(n_models, 1) / cols) * h
    return w, h


# -- discovery -------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _load_run(name: str, d: Path | None) -> ModelRun:
    m = ModelRun(name=name, dir=d)
    if d is None or not d.is_dir():
        return m
    m.metrics = read_metrics(d)
    m.summary = _read_json(d / SUMMARY) or {}
    m.arch = m.summary.get("student") or (m.summary.get("config") or {}).get("student")
    ev = _read_json(d / EVAL)
    if ev:
        m.result = dict(ev)
    return m


def find_models(run_dir: str | Path) -> tuple[list[ModelRun], dict[str, Any]]:
    """The models of ``run_dir`` (teacher first) and its ``results.json`` (empty if absent)."""
    root = Path(run_dir)
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise RunNotFound(f"run directory {str(run_dir)!r} {what}; pass a 'softlabels train --out' directory "
                          "or a tools/demo.py --out directory")
    results = _read_json(root / RESULTS) or {}
    models: list[ModelRun] = []
    if isinstance(results.get("models"), list):
        for entry in results["models"]:
            if not isinstance(entry, dict) or "name" not in entry:
                continue
            d = root / entry["dir"] if entry.get("dir") else None
            m = _load_run(str(entry["name"]), d)
            m.role = entry.get("role") or m.role
            m.arch = entry.get("arch") or m.arch
            m.description = entry.get("description") or ""
            ev = entry.get("eval") if isinstance(entry.get("eval"), dict) else {}
            m.result = {**m.result, **ev, **{k: v for k, v in entry.items() if k not in ("eval", "dir")}}
            models.append(m)
    elif (root / METRICS).is_file():
        models.append(_load_run(root.resolve().name, root))
    else:
        # A directory of runs: every sub-directory (one or two levels down) with a metrics log.
        dirs = sorted({p.parent for p in [*root.glob(f"*/{METRICS}"), *root.glob(f"*/*/{METRICS}")]})
        models = [_load_run(d.relative_to(root).as_posix(), d) for d in dirs]
    if not models:
        raise RunNotFound(f"no training run in {str(run_dir)!r} (no {METRICS} in it or its sub-directories, "
                          f"no {RESULTS}); pass a 'softlabels train --out' directory")
    teacher = results.get("teacher")
    for m in models:
        if m.name == teacher or (teacher is None and m.name == "teacher"):
            m.role = "teacher"
        if m.result.get("reliability"):
            m.reliability = m.result["reliability"]
    models.sort(key=lambda m: m.role != "teacher")  # stable: the teacher first, the rest in order
    return models, results


def compute_reliability(model: ModelRun, *, n_bins: int = 15) -> None:
    """Fill ``model.reliability`` from its checkpoint and its eval's data spec, when both are known."""
    if model.reliability is not None:
        return
    data = model.result.get("data")
    if model.dir is None or not (model.dir / CHECKPOINT).is_file() or not data:
        model.note = "no reliability bins: no eval JSON with them, and no checkpoint + eval data spec to compute them"
        return
    import numpy as np
    import torch

    from softlabels.evaluation.evaluator import load_student
    from softlabels.inputs.spec import resolve_data
    from softlabels.student.metrics import EvalAccumulator
    from softlabels.teacher.spec import recorded_spec

    try:  # the eval's data spec and the checkpoint's student spec are data: built-ins and files only
        spec = recorded_spec(data, kind="data", where=f"the eval results of {model.name!r}",
                             flag=f"softlabels eval --checkpoint {model.dir} --json --data")
        net, config = load_student(model.dir)
        dataset = resolve_data(spec)
        acc = EvalAccumulator(int(config["num_classes"]), n_bins=n_bins)
        with torch.no_grad():
            for start in range(0, len(dataset), 1024):
                x, y = dataset.get_batch(np.arange(start, min(start + 1024, len(dataset)), dtype=np.int64))
                acc.update(net(x), y)
    except SoftLabelsError as err:
        model.note = f"no reliability bins ({err})"
        return
    model.reliability = acc.reliability()
    model.result.setdefault("ece", acc.compute()["ece"])


# -- plots -----------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("softlabels report draws its plots with matplotlib, which is not installed; "
                          "pip install 'softlabels[demo]'") from None
    matplotlib.use("Agg", force=True)  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


def _figure(plt, kind: str, n: int = 1, **kw):
    w, h = plot_size(kind, n)
    return plt.subplots(figsize=(w / PLOT_DPI, h / PLOT_DPI), dpi=PLOT_DPI, **kw)


def _save(fig, path: Path) -> None:
    # No bbox_inches="tight": the PNG keeps exactly plot_size() pixels.
    fig.savefig(path, dpi=PLOT_DPI, format="png", metadata={"Software": None})
    fig.clf()


def _colors(models: list[ModelRun]) -> dict[str, Any]:
    palette = [f"C{i}" for i in range(10)]
    return {m.name: ("black" if m.role == "teacher" else palette[i % 10]) for i, m in enumerate(models)}


def plot_curves(models: list[ModelRun], path: Path, plt) -> None:
    fig, (ax_loss, ax_acc) = _figure(plt, "curves", ncols=2)
    colors = _colors(models)
    has_val = False
    for m in models:
        epochs = [r["epoch"] for r in m.metrics if "epoch" in r and _num(r.get("loss")) is not None]
        losses = [r["loss"] for r in m.metrics if "epoch" in r and _num(r.get("loss")) is not None]
        style = {"color": colors[m.name], "lw": 2.2 if m.role == "teacher" else 1.5}
        if epochs:
            ax_loss.plot(epochs, losses, label=m.name, **style)
        val = [(r["epoch"], r["val_accuracy"]) for r in m.metrics if _num(r.get("val_accuracy")) is not None]
        if val:
            has_val = True
            ax_acc.plot([e for e, _ in val], [100 * a for _, a in val], label=m.name, **style)
    ax_loss.set(title="training loss (each model's own objective)", xlabel="epoch", ylabel="loss")
    if any(r.get("loss", 0) > 0 for m in models for r in m.metrics):
        ax_loss.set_yscale("log")
    specs = {(m.summary.get("config") or {}).get("val_data") for m in models} - {None}
    where = f" on {specs.pop()}" if len(specs) == 1 else ""
    ax_acc.set(title=f"validation accuracy{where} after each epoch", xlabel="epoch", ylabel="accuracy (%)")
    if has_val:
        ax_acc.set_ylim(top=100)
    else:
        ax_acc.text(0.5, 0.5, "no validation data\n(train with --val-data)", ha="center", va="center",
                    transform=ax_acc.transAxes, color="gray")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if models and any(m.metrics for m in models):
        (ax_acc if has_val else ax_loss).legend(fontsize=8, loc="lower right" if has_val else "upper right")
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy(models: list[ModelRun], path: Path, plt) -> None:
    fig, ax = _figure(plt, "accuracy")
    teacher = next((m for m in models if m.role == "teacher" and m.accuracy is not None), None)
    bars = [m for m in models if m.role != "teacher" and m.accuracy is not None]
    colors = _colors(models)
    xs = range(len(bars))
    accs = [100 * m.accuracy for m in bars]
    ax.bar(xs, accs, color=[colors[m.name] for m in bars], width=0.6)
    for x, a in zip(xs, accs):
        ax.text(x, a, f"{a:.1f}%", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(xs), [m.name for m in bars], fontsize=8)
    values = accs[:]
    if teacher is not None:
        t = 100 * teacher.accuracy
        values.append(t)
        arch = f" ({teacher.arch})" if teacher.arch else ""
        ax.axhline(t, color="black", ls="--", lw=1.5, label=f"teacher{arch}: {t:.1f}%")
        ax.legend(loc="lower right", fontsize=9)
    low = min(values) if values else 0.0
    ax.set_ylim(max(0.0, low - max(5.0, 0.25 * (100 - low))), 100.5)
    ax.set(title="test accuracy of each student vs the teacher", ylabel="accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_reliability(models: list[ModelRun], path: Path, plt) -> None:
    n = len(models)
    cols = max(1, min(n, _MAX_COLS))
    rows = math.ceil(n / cols)
    # Per model: the diagram on top, the share of rows per confidence bin below (log scale),
    # since on a small test set most rows sit in the top bin and the low bins hold a handful.
    fig, axes = _figure(plt, "reliability", n, nrows=2 * rows, ncols=cols, squeeze=False,
                        gridspec_kw={"height_ratios": [3, 1] * rows})
    colors = _colors(models)
    for i, m in enumerate(models):
        ax, hist = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        r = m.reliability or {}
        lo, hi = r.get("bin_lower", []), r.get("bin_upper", [])
        acc, conf, count = r.get("accuracy", []), r.get("confidence", []), r.get("count", [])
        keep = [j for j, a in enumerate(acc) if a is not None]
        widths = [hi[j] - lo[j] for j in keep]
        ax.bar([lo[j] for j in keep], [acc[j] for j in keep], width=widths, align="edge",
               color=colors[m.name], alpha=0.75, edgecolor="white")
        ax.plot([conf[j] for j in keep], [acc[j] for j in keep], "o", ms=3, color="black")
        ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1)
        ece = _num(m.result.get("ece"))
        ax.set(xlim=(0, 1), ylim=(0, 1), title=m.name + (f"  ECE {ece:.3f}" if ece is not None else ""))
        ax.title.set_fontsize(9)
        ax.tick_params(labelbottom=False)
        total = sum(count)
        if keep and total:
            hist.bar([lo[j] for j in keep], [count[j] / total for j in keep], width=widths, align="edge",
                     color="gray", edgecolor="white")
            hist.set_yscale("log")
            hist.set_ylim(0.5 / total, 1.5)
        else:
            ax.text(0.5, 0.5, "no bins", ha="center", va="center", color="gray", transform=ax.transAxes)
        hist.set(xlim=(0, 1), xlabel="confidence")
        hist.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("accuracy")
            hist.set_ylabel(f"rows (n={total})", fontsize=7)
    for i in range(n, rows * cols):
        axes[2 * (i // cols), i % cols].set_visible(False)
        axes[2 * (i // cols) + 1, i % cols].set_visible(False)
    fig.tight_layout(h_pad=0.3)
    _save(fig, path)


# -- the document ----------------------------------------------------------------------------
_EXPLAIN = {
    "curves": "Left: training loss per epoch (log scale); distillation losses include the T^2-scaled soft "
              "term, so compare shapes, not levels, across models. Right: accuracy on --val-data after each epoch.",
    "accuracy": "Test accuracy of each student (bars) against the teacher's (dashed line).",
    "reliability": "Top: accuracy per confidence bin (bars) and the bin's mean confidence (dots); a calibrated "
                   "model follows the diagonal. Bottom: share of test rows per bin (log scale): bins holding a "
                   "handful of rows are noise.",
}
def _fmt(value: Any, how: str) -> str:
    v = _num(value)
    if v is None:
        return "-"
    return {"pct": f"{100 * v:.2f}%", "f4": f"{v:.4f}", "int": f"{int(v):,}", "x": f"{v:.3g}x",
            "s": f"{v:.1f}"}[how]


_COLUMNS = (
    ("accuracy", "accuracy", "pct"), ("agreement", "agreement", "pct"), ("kl_to_teacher", "KL to teacher", "f4"),
    ("ece", "ECE", "f4"), ("num_parameters", "params", "int"), ("flops", "MACs/sample", "int"),
)


def _table(models: list[ModelRun]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "role", "arch", *[label for _, label, _ in _COLUMNS], "epochs", "final loss", "final val acc"]
    rows = []
    for m in models:
        final = m.metrics[-1] if m.metrics else {}
        result = {**{k: m.summary.get(k) for k in ("num_parameters", "flops")}, **m.result}
        rows.append([m.name, m.role, m.arch or "-", *[_fmt(result.get(k), how) for k, _, how in _COLUMNS],
                     str(final.get("epoch", "-")), _fmt(final.get("loss"), "f4"),
                     _fmt(final.get("val_accuracy"), "pct")])
    return head, rows


def _stages(results: dict[str, Any]) -> list[list[str]]:
    out = []
    for s in results.get("stages") or []:
        if isinstance(s, dict) and "name" in s:
            out.append([str(s["name"]), _fmt(s.get("seconds"), "s")])
    return out


def _markdown(title: str, models, stages, plots, notes) -> str:
    head, rows = _table(models)
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    described = [m for m in models if m.description]
    if described:
        lines += ["", *[f"- **{m.name}**: {m.description}" for m in described]]
    if stages:
        lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in stages]
    for caption, name, explain in plots:
        lines += ["", f"## {caption}", "", explain, "", f"![{caption}]({name})"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _html(title: str, models, stages, plots, notes) -> str:
    e = html.escape
    head, rows = _table(models)
    parts = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%}</style></head><body>", f"<h1>{e(title)}</h1>", "<table>",
             "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts.append("</table>")
    described = [m for m in models if m.description]
    if described:
        parts.append("<ul>" + "".join(f"<li><b>{e(m.name)}</b>: {e(m.description)}</li>" for m in described) + "</ul>")
    if stages:
        parts.append("<h2>Wall time per stage</h2><table><tr><th>stage</th><th>seconds</th></tr>"
                     + "".join(f"<tr><td>{e(a)}</td><td>{e(b)}</td></tr>" for a, b in stages) + "</table>")
    for caption, name, explain in plots:
        parts.append(f"<h2>{e(caption)}</h2><p>{e(explain)}</p><img src='{e(name)}' alt='{e(caption)}'>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_report(run_dir: str | Path, *, out: str | Path | None = None, fmt: str | None = None,
                 compute_missing: bool = True) -> dict[str, Any]:
    """Write the report of ``run_dir`` and its PNGs; return ``{"report": path, "plots": [paths], "models": [...]}``.

    ``out`` defaults to ``RUN_DIR/report.<fmt>``; the PNGs go beside it, named
    ``<stem>-curves.png``, ``<stem>-accuracy.png``, ``<stem>-reliability.png``.
    ``fmt`` (md or html) defaults to the suffix of ``out``, else md. With
    ``compute_missing``, reliability bins absent from the eval JSON are computed
    from each model's checkpoint.
    """
    if fmt is None:
        fmt = "html" if out is not None and Path(out).suffix.lower() in (".html", ".htm") else "md"
    if fmt not in FORMATS:
        raise ConfigError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    models, results = find_models(run_dir)
    plt = _pyplot()
    out_path = Path(out) if out is not None else Path(run_dir) / f"report.{fmt}"
    if out_path.is_dir():
        raise ConfigError(f"--out {str(out_path)!r} is a directory; pass a file name such as report.{fmt}")
    reads = [Path(run_dir) / RESULTS, *(m.dir / name for m in models if m.dir for name in (*RUN_FILES, EVAL))]
    if clash := out_overlaps(out_path, [("RUN_DIR file", str(path)) for path in reads]):
        raise ConfigError(clash)  # the report would replace a file it reads (model.pt, metrics.jsonl, ...)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stem = out_path.stem
    plots: list[tuple[str, str, str]] = []
    notes: list[str] = []

    def emit(kind: str, caption: str, draw, subset: list[ModelRun]) -> None:
        name = f"{stem}-{kind}.png"
        draw(subset, out_path.parent / name, plt)
        plots.append((caption, name, _EXPLAIN[kind]))

    if any(m.metrics for m in models):
        emit("curves", "Training curves", plot_curves, models)
    else:
        notes.append(f"no {METRICS} found: no training curves")
    if any(m.accuracy is not None for m in models if m.role != "teacher"):
        emit("accuracy", "Accuracy vs teacher", plot_accuracy, models)
    elif len(models) > 1:
        notes.append("no test accuracies (results.json or eval.json): no accuracy chart")
    if compute_missing:
        for m in models:
            compute_reliability(m)
    calibrated = [m for m in models if m.reliability]
    if calibrated:
        emit("reliability", "Reliability diagram", plot_reliability, calibrated)
    notes += [f"{m.name}: {m.note}" for m in models if m.note and not m.reliability and m.result]
    plt.close("all")
    title = f"softlabels report: {Path(run_dir).resolve().name}"
    render = _markdown if fmt == "md" else _html
    out_path.write_text(render(title, models, _stages(results), plots, notes))
    return {"report": str(out_path), "plots": [str(out_path.parent / n) for _, n, _ in plots],
            "models": [{"name": m.name, "role": m.role, "accuracy": m.accuracy} for m in models]}
