"""The report's PNG plots, drawn with matplotlib (optional; imported only here, when plotting): training
curves, accuracy against the teacher, and a reliability diagram per model with the share of rows in each
confidence bin, each of a fixed size in pixels (:func:`plot_size`) on every machine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from softlabels.errors import ConfigError
from softlabels.evaluation.report_runs import ModelRun, _num

__all__ = ["PLOT_DPI", "plot_accuracy", "plot_curves", "plot_reliability", "plot_size"]

PLOT_DPI = 100
_PANEL_PX = {"curves": (600, 420), "accuracy": (800, 420), "reliability": (300, 400)}
_MAX_COLS = 5  # reliability panels per row


def plot_size(kind: str, n_models: int = 1) -> tuple[int, int]:
    """Width and height in pixels of the PNG ``kind`` (curves, accuracy, reliability) for ``n_models``."""
    w, h = _PANEL_PX[kind]
    if kind == "curves":
        return 2 * w, h
    if kind == "reliability":
        cols = max(1, min(n_models, _MAX_COLS))
        return cols * w, math.ceil(max(n_models, 1) / cols) * h
    return w, h


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
        loss = [(r["epoch"], r["loss"]) for r in m.metrics
                if "epoch" in r and _num(r.get("loss")) is not None]
        style = {"color": colors[m.name], "lw": 2.2 if m.role == "teacher" else 1.5}
        if loss:
            ax_loss.plot([e for e, _ in loss], [v for _, v in loss], label=m.name, **style)
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
