"""`softlabels report`: Markdown/HTML reports with PNG plots from a run directory."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest

from softlabels.evaluation.report import build_report
from softlabels.evaluation.report_plots import plot_size
from tests.conftest import assert_one_line_error, run_cli

try:
    import matplotlib  # noqa: F401  - optional: pip install 'softlabels[demo]'
except ImportError:
    matplotlib = None
needs_mpl = pytest.mark.skipif(matplotlib is None, reason="needs matplotlib (pip install 'softlabels[demo]')")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ACCURACY = {"teacher": 0.9722, "a_hard": 0.9361, "b_kd": 0.9444, "d_unlabeled": 0.9583}


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking the signature and the IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def assert_image(path: Path, size: tuple[int, int]) -> None:
    import matplotlib.image

    assert path.is_file() and path.stat().st_size > 1000, path
    assert png_size(path) == size
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (size[1], size[0])
    assert pixels[..., :3].std() > 0.05, f"{path} is blank"  # something was drawn


def write_metrics(d: Path, epochs: int, *, start_loss: float, val: bool = True) -> None:
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for e in range(1, epochs + 1):
            rec = {"epoch": e, "loss": start_loss / e, "samples": 100}
            if val:
                rec["val_accuracy"] = min(0.99, 0.5 + 0.08 * e)
            f.write(json.dumps(rec) + "\n")


def reliability(shift: float) -> dict[str, list]:
    lo = [i / 5 for i in range(5)]
    count = [0, 2, 5, 13, 80]
    return {"bin_lower": lo, "bin_upper": [x + 0.2 for x in lo], "count": count,
            "accuracy": [None, 0.5, 0.6, 0.75, 0.97 - shift], "confidence": [None, 0.3, 0.5, 0.7, 0.95]}


@pytest.fixture
def demo_run(tmp_path: Path) -> Path:
    """A fake demo run: per-model metrics.jsonl plus results.json with test metrics and bins."""
    run = tmp_path / "run"
    models = []
    for i, (name, acc) in enumerate(ACCURACY.items()):
        write_metrics(run / name, 5 + i, start_loss=2.0 + i)
        models.append({"name": name, "dir": name, "role": "teacher" if name == "teacher" else "student",
                       "arch": "mlp-large" if name == "teacher" else "mlp", "description": f"model {name}",
                       "accuracy": acc, "agreement": 0.95, "kl_to_teacher": 0.05, "num_parameters": 1000,
                       "flops": 900, "eval": {"data": "digits:test", "ece": 0.03, "reliability": reliability(i / 50)}})
    (run / "results.json").write_text(json.dumps({"teacher": "teacher", "models": models,
                                                  "stages": [{"name": "teacher training", "seconds": 3.5}]}))
    return run


@needs_mpl
def test_markdown_report_of_a_demo_run(demo_run: Path):
    result = run_cli("report", str(demo_run))
    assert result.exit_code == 0, result.output
    report = demo_run / "report.md"
    text = report.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert linked == ["report-curves.png", "report-accuracy.png", "report-reliability.png"]
    assert_image(demo_run / "report-curves.png", plot_size("curves"))
    assert_image(demo_run / "report-accuracy.png", plot_size("accuracy"))
    assert_image(demo_run / "report-reliability.png", plot_size("reliability", len(ACCURACY)))
    for name, acc in ACCURACY.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"{100 * acc:.2f}%" in row
    assert "| teacher training | 3.5 |" in text


@needs_mpl
def test_html_report_with_out_file(demo_run: Path, tmp_path: Path):
    out = tmp_path / "elsewhere" / "summary.html"
    result = run_cli("report", str(demo_run), "--out", str(out))
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("<!doctype html>")
    for kind in ("curves", "accuracy", "reliability"):
        assert f"<img src='summary-{kind}.png'" in text
        assert png_size(out.parent / f"summary-{kind}.png") == plot_size(kind, len(ACCURACY))
    for acc in ACCURACY.values():
        assert f"{100 * acc:.2f}%" in text


@needs_mpl
def test_single_training_run_gets_curves_only(tmp_path: Path):
    run = tmp_path / "one"
    write_metrics(run, 4, start_loss=1.5, val=False)
    info = build_report(run)
    assert [Path(p).name for p in info["plots"]] == ["report-curves.png"]
    assert_image(run / "report-curves.png", plot_size("curves"))
    text = (run / "report.md").read_text()
    assert "![Training curves](report-curves.png)" in text and "| one | student |" in text


@needs_mpl
def test_directory_of_runs_without_results_json(tmp_path: Path):
    for name in ("x", "y"):
        write_metrics(tmp_path / "runs" / name, 3, start_loss=1.0)
        (tmp_path / "runs" / name / "eval.json").write_text(json.dumps({"accuracy": 0.5 if name == "x" else 0.75}))
    info = build_report(tmp_path / "runs", compute_missing=False)
    assert [m["name"] for m in info["models"]] == ["x", "y"]
    assert [Path(p).name for p in info["plots"]] == ["report-curves.png", "report-accuracy.png"]
    text = (tmp_path / "runs" / "report.md").read_text()
    assert "50.00%" in text and "75.00%" in text


@needs_mpl
def test_reliability_is_computed_from_the_checkpoint_when_eval_has_no_bins(tmp_path: Path):
    from softlabels.student.trainer import TrainConfig, train

    run = tmp_path / "linear"
    train(TrainConfig(student="linear", data=("digits:train",), epochs=1, out=str(run), device="cpu",
                      progress=False))
    (run / "eval.json").write_text(json.dumps({"data": "digits:test", "accuracy": 0.8}))
    info = build_report(run)
    assert [Path(p).name for p in info["plots"]] == ["report-curves.png", "report-accuracy.png",
                                                     "report-reliability.png"]
    assert_image(run / "report-reliability.png", plot_size("reliability", 1))


def test_missing_run_dir_is_a_one_line_error(tmp_path: Path):
    assert_one_line_error(run_cli("report", str(tmp_path / "nope")), "does not exist")


def test_directory_without_runs_is_a_one_line_error(tmp_path: Path):
    assert_one_line_error(run_cli("report", str(tmp_path)), "no training run")


def test_missing_matplotlib_says_how_to_install_it(demo_run: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert_one_line_error(run_cli("report", str(demo_run)), "pip install 'softlabels[demo]'")


@pytest.mark.parametrize("name", ["model.pt", "metrics.jsonl", "checkpoint.pt", "summary.json", "eval.json",
                                  "../results.json"])
def test_out_may_not_be_a_file_the_report_reads(demo_run: Path, name: str):
    """`report RUN --out RUN/model.pt` overwrote the run's weights with Markdown, exit 0 (issue 20, case 1)."""
    target = demo_run / "b_kd" / name
    (demo_run / "b_kd" / "model.pt").write_bytes(b"weights")
    before = target.read_bytes() if target.exists() else None
    result = run_cli("report", str(demo_run), "--out", str(target))
    assert_one_line_error(result, f"--out '{target}' is the input RUN_DIR file", "choose another --out")
    assert (target.read_bytes() if target.exists() else None) == before
    assert not list(demo_run.rglob("*.png"))  # refused before anything was drawn


@needs_mpl
def test_out_beside_the_run_files_is_fine(demo_run: Path):
    result = run_cli("report", str(demo_run), "--out", str(demo_run / "b_kd" / "notes.md"))
    assert result.exit_code == 0, result.output
    assert (demo_run / "b_kd" / "notes-curves.png").is_file()
