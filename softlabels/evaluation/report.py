"""Turn a run directory into a Markdown or HTML report with PNG plots (docs/USAGE.md, Reports).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from softlabels.errors import ConfigError
from softlabels.evaluation.config import REPORT_FORMATS
from softlabels.evaluation.report_plots import _pyplot, plot_accuracy, plot_curves, plot_reliability
from softlabels.evaluation.report_runs import ModelRun, EVAL, RESULTS, _num, compute_reliability, find_models
from softlabels._runtime.paths import out_overlaps
from softlabels.student.checkpoint import METRICS, RUN_FILES

__all__ = ["build_report"]


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
    return [[str(s["name"]), _fmt(s.get("seconds"), "s")] for s in results.get("stages") or []
            if isinstance(s, dict) and "name" in s]


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
    """Write the report of ``run_dir`` to ``out`` (``RUN_DIR/report.<fmt>``; ``fmt``: its suffix,
    else md) and its PNGs beside it as ``<stem>-<plot>.png``; return their paths and the models."""
    if fmt is None:
        fmt = "html" if out is not None and Path(out).suffix.lower() in (".html", ".htm") else "md"
    if fmt not in REPORT_FORMATS:
        raise ConfigError(f"unknown report format {fmt!r}; choose one of {', '.join(REPORT_FORMATS)}")
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
