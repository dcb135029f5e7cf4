"""The demo end to end: tools/demo.py --quick through the real CLI (subprocesses of `softlabels`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    import matplotlib  # noqa: F401  - the report stage needs it (pip install 'softlabels[demo]')
except ImportError:
    matplotlib = None


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict, str, float]:
    pytest.importorskip("sklearn", reason="the digits data ship with scikit-learn")
    run = tmp_path_factory.mktemp("demo") / "run"
    argv = [sys.executable, str(ROOT / "tools" / "demo.py"), "--quick", "--out", str(run)]
    if matplotlib is None:
        argv.append("--no-report")
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run, json.loads((run / "results.json").read_text()), proc.stdout, seconds


def _models(results: dict) -> dict[str, dict]:
    return {m["name"]: m for m in results["models"]}


@pytest.mark.slow
def test_demo_distils_a_student_that_learns_without_labels(demo):
    run, results, stdout, seconds = demo
    print(f"quick demo: {seconds:.1f} s")
    m = _models(results)
    teacher = m["teacher"]["accuracy"]
    assert teacher > 0.85, f"teacher accuracy {teacher:.4f}: 10 classes, chance is 0.10"
    # On this data offline KD from the labeled store matches or beats hard labels (docs/DEMO.md).
    assert m["b_kd_labeled"]["accuracy"] >= m["a_hard"]["accuracy"]
    # Trained on the teacher's logits for unlabeled images only, without any label.
    assert m["d_kd_unlabeled"]["accuracy"] >= 0.95 * teacher
    assert m["teacher"]["agreement"] == 1.0 and m["teacher"]["kl_to_teacher"] < 1e-6
    for name, model in m.items():
        assert model["eval"]["data"] == "digits:test" and model["eval"]["n"] == 359
        if name != "teacher":
            assert model["params_vs_teacher"] < 0.05 and model["flops_vs_teacher"] < 0.05
    # Distillation ran from the stores, with the temperature and alpha the demo states.
    config = json.loads((run / "c_kd_labeled_unlabeled" / "summary.json").read_text())["config"]
    assert [Path(p).name for p in config["stores"]] == ["train.zarr", "pool.h5"]
    assert config["temperature"] == results["settings"]["temperature"]


@pytest.mark.slow
def test_demo_uses_both_backends_and_writes_its_outputs(demo):
    run, results, stdout, _ = demo
    assert (run / "stores" / "train.zarr" / "zarr.json").is_file()  # Zarr v3 group
    assert h5py.is_hdf5(run / "stores" / "pool.h5")
    with h5py.File(run / "stores" / "pool.h5", "r") as f:
        assert f.attrs["status"] == "complete" and (f["labels"][:] == -1).all()  # no label reached the pool
    stages = [s["name"] for s in results["stages"]]
    assert stages[0] == "teacher training" and sum(s.startswith("teacher job") for s in stages) == 3
    assert sum(s.startswith("student (") for s in stages) == 4
    assert all(s["seconds"] > 0 for s in results["stages"])
    md = (run / "results.md").read_text()
    for name in _models(results):
        assert name in md and name in stdout
        assert (run / name / "eval.json").is_file() and (run / name / "metrics.jsonl").is_file()
    if matplotlib is not None:
        report = (run / "report.md").read_text()
        for kind in ("curves", "accuracy", "reliability"):
            assert f"(report-{kind}.png)" in report and (run / f"report-{kind}.png").stat().st_size > 1000


@pytest.mark.slow
def test_demo_language_model_part(demo):
    """The LM part's shape (its numbers vary by machine): three models, held-out metrics, the sampled store."""
    run, _, stdout, _ = demo
    lm = json.loads((run / "lm" / "results.json").read_text())
    m = _models(lm)
    assert list(m) == ["teacher", "student_kd", "student_hard"]
    assert m["teacher"]["agreement"] > 0.99 and m["teacher"]["kl_to_teacher"] < 1e-3  # against its own fp16 store
    for name, model in m.items():
        assert model["positions"] == lm["data"]["heldout"]["tokens"] - lm["data"]["heldout"]["windows"]
        assert math.isclose(model["perplexity"], math.exp(model["loss"]), rel_tol=1e-9)
        assert 0 <= model["ece"] <= 1 and 0 <= model["agreement"] <= 1 and model["kl_to_teacher"] >= 0
        if name != "teacher":
            assert model["arch"] == "gpt-tiny" and model["params_vs_teacher"] < 0.35
    assert m["student_kd"]["steps"] == m["student_hard"]["steps"] > 0  # the same steps
    kd = json.loads((run / "lm" / "student_kd" / "summary.json").read_text())["config"]
    assert kd["layout"] == "sampled" and kd["alpha"] == lm["settings"]["alpha"]
    hard = json.loads((run / "lm" / "student_hard" / "summary.json").read_text())["config"]
    assert hard["alpha"] == 1.0 and hard["stores"] == []
    assert (run / "lm" / "stores" / "train-sampled.zarr" / "zarr.json").is_file()
    assert 0 < lm["store"]["bytes_per_token"] < 200
    assert [s["name"] for s in lm["stages"]][:2] == ["LM data: BPE tokenizer + token files",
                                                     "LM teacher training (hard next-token CE)"]
    for name in m:
        assert name in stdout and name in (run / "lm" / "results.md").read_text()
    assert "B/token" in stdout and "language-model part:" in stdout
