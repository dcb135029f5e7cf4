"""``softlabels compress`` and ``train --init`` through the CLI, on a tiny digits run made here.

References are computed independently with numpy from the student's own ``model.pt``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from softlabels.inputs.digits import load_digits_split
from tests.conftest import assert_one_line_error, run_cli


def cli(*args):
    result = run_cli(*map(str, args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("compress")
    quiet = ["--no-progress", "--batch-size", "64"]
    cli("train", "--student", "mlp", "--data", "digits:train", "--epochs", "3", *quiet, "--out", d / "teacher")
    for split, store in (("digits:train", "train.h5"), ("digits:test", "test.h5")):
        cli("generate", "--teacher", "mlp", "--weights", d / "teacher" / "model.pt", "--data", split, "--out",
            d / store, "--no-progress")
    cli("train", "--student", "mlp", "--store", d / "train.h5", "--epochs", "3", *quiet, "--out", d / "student")
    return SimpleNamespace(dir=d, teacher=d / "teacher", student=d / "student", train=d / "train.h5",
                           test=d / "test.h5")


def compress(runs, out: Path, *extra):
    cli("compress", runs.student, "--out", out, "--data", "digits:test", "--store", runs.test, "--repeats", "3",
        *extra)
    return json.loads((out / "compress.json").read_text())


def np_weights(path: Path) -> dict[str, np.ndarray]:
    sd = torch.load(path, weights_only=True)
    return {k: v.numpy() for k, v in sd.items()}


def digits_x(n: int | None = None) -> np.ndarray:
    ds = load_digits_split("test")
    return ds.get_batch(np.arange(n or len(ds)))[0].numpy()


def np_mlp(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The built-in one-hidden-layer MLP (net.1, net.3) in numpy, float64."""
    h = np.maximum(x @ w["net.1.weight"].T.astype(np.float64) + w["net.1.bias"], 0)
    return h @ w["net.3.weight"].T.astype(np.float64) + w["net.3.bias"]


def test_table_fields_consistent_with_files_and_eval(runs, tmp_path):
    got = compress(runs, tmp_path / "c", "--teacher", runs.teacher)
    rows = {r["model"]: r for r in got["rows"]}
    assert list(rows) == ["teacher", "student", "compressed"]
    keys = {"size_bytes", "size_gzip_bytes", "parameters", "nonzero_parameters", "accuracy", "agreement",
            "kl_to_teacher", "correlation", "latency_ms", "latency_min_ms", "latency_batch", "latency_vs_student"}
    assert all(keys <= set(r) for r in rows.values())
    assert rows["student"]["size_bytes"] == (runs.student / "model.pt").stat().st_size
    assert rows["teacher"]["size_bytes"] == (runs.teacher / "model.pt").stat().st_size
    assert rows["compressed"]["size_bytes"] == (tmp_path / "c" / "model.pt").stat().st_size
    assert rows["student"]["parameters"] == sum(v.size for v in np_weights(runs.student / "model.pt").values())
    # nothing asked: the compressed student is the student
    for key in ("parameters", "nonzero_parameters", "accuracy", "agreement", "kl_to_teacher", "correlation"):
        assert rows["compressed"][key] == pytest.approx(rows["student"][key], rel=1e-9), key
    # the teacher against its own logits
    assert rows["teacher"]["agreement"] == 1.0 and rows["teacher"]["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    # the same numbers as `softlabels eval`
    ev = json.loads(cli("eval", "--checkpoint", runs.student, "--data", "digits:test", "--store", runs.test,
                        "--json").output)
    for key in ("accuracy", "agreement", "kl_to_teacher", "correlation"):
        assert rows["student"][key] == pytest.approx(ev[key], rel=1e-9), key
    assert all(0 < r["latency_min_ms"] <= r["latency_ms"] and r["latency_batch"] == 256 for r in rows.values())
    assert rows["student"]["latency_vs_student"] == 1.0
    assert rows["teacher"]["latency_vs_student"] == pytest.approx(
        rows["teacher"]["latency_min_ms"] / rows["student"]["latency_min_ms"])
    md = (tmp_path / "c" / "compress.md").read_text().splitlines()
    assert len(md) == 5 and md[2].startswith("| teacher |") and md[4].startswith("| compressed |")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary directory left


def test_unstructured_pruning_zeroes_the_smallest_weights(runs, tmp_path):
    got = compress(runs, tmp_path / "c", "--prune", "0.3")
    before, after = np_weights(runs.student / "model.pt"), np_weights(tmp_path / "c" / "model.pt")
    names = [k for k in before if k.endswith("weight")]
    flat = np.concatenate([before[k].ravel() for k in names])
    k = round(0.3 * flat.size)
    threshold = np.sort(np.abs(flat))[k - 1]
    for name in before:
        if name.endswith("weight"):
            expect = np.where(np.abs(before[name]) <= threshold, 0, before[name])
        else:
            expect = before[name]  # biases are not pruned
        np.testing.assert_array_equal(after[name], expect)
    zeros = sum(int((after[n] == 0).sum()) for n in names)
    assert zeros == k and got["pruned_fraction"] == pytest.approx(k / flat.size)
    row = got["rows"][-1]
    assert row["nonzero_parameters"] == row["parameters"] - k
    # a dense file: the zeros are still stored
    assert row["size_bytes"] == pytest.approx(got["rows"][0]["size_bytes"], rel=0.05)
    # the exported program loads back and computes what model.pt computes
    x = digits_x(50)
    program = torch.export.load(tmp_path / "c" / "model.pt2").module()
    np.testing.assert_allclose(program(torch.from_numpy(x)).detach().numpy(), np_mlp(after, x), rtol=1e-5, atol=1e-5)


def test_structured_pruning_removes_units_and_keeps_the_rest(runs, tmp_path):
    got = compress(runs, tmp_path / "c", "--prune-structured", "0.5")
    w = np_weights(runs.student / "model.pt")
    keep = np.sort(np.argsort(-np.abs(w["net.1.weight"]).sum(1), kind="stable")[:16])
    assert got["hidden_units"] == [16]
    rows = {r["model"]: r for r in got["rows"]}
    assert rows["compressed"]["parameters"] == 64 * 16 + 16 + 16 * 10 + 10 < rows["student"]["parameters"]
    assert rows["compressed"]["size_bytes"] < rows["student"]["size_bytes"]
    masked = dict(w)  # the original with the removed units' inputs zeroed: they output ReLU(0) = 0
    drop = np.setdiff1d(np.arange(32), keep)
    masked["net.1.weight"] = w["net.1.weight"].copy()
    masked["net.1.weight"][drop] = 0
    masked["net.1.bias"] = w["net.1.bias"].copy()
    masked["net.1.bias"][drop] = 0
    x = digits_x(50)
    program = torch.export.load(tmp_path / "c" / "model.pt2").module()
    out = program(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out, np_mlp(masked, x), rtol=1e-5, atol=1e-5)
    small = np_weights(tmp_path / "c" / "model.pt")
    np.testing.assert_array_equal(small["net.1.weight"], w["net.1.weight"][keep])
    np.testing.assert_array_equal(small["net.3.weight"], w["net.3.weight"][:, keep])


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
@pytest.mark.parametrize("how", ["int8-weight", "int8-dynamic"])
def test_quantized_model_close_to_float(runs, tmp_path, how):
    got = compress(runs, tmp_path / "c", "--quantize", how)
    w = np_weights(runs.student / "model.pt")
    x = digits_x()
    ref = np_mlp(w, x)
    out = torch.export.load(tmp_path / "c" / "model.pt2").module()(torch.from_numpy(x)).detach().numpy()
    # Bound from round-to-nearest int8 (scale <= max|W| / 127 per tensor) for the weight-only case,
    # propagated through both layers; dynamic int8 activations add their own error, allowed 3x.
    w1, w2 = w["net.1.weight"].astype(np.float64), w["net.3.weight"].astype(np.float64)
    e1 = np.abs(x) @ np.full(w1.shape, np.abs(w1).max() / 254).T
    h = np.maximum(x @ w1.T + w["net.1.bias"], 0)
    bound = e1 @ np.abs(w2).T + (np.abs(h) + e1) @ np.full(w2.shape, np.abs(w2).max() / 254).T
    slack = 1.05 if how == "int8-weight" else 3.0
    assert np.all(np.abs(out - ref) <= slack * bound + 1e-5)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.97
    rows = {r["model"]: r for r in got["rows"]}
    assert rows["compressed"]["size_bytes"] < 0.6 * rows["student"]["size_bytes"]
    assert rows["compressed"]["agreement"] == pytest.approx(rows["student"]["agreement"], abs=0.03)


def test_prune_then_distil_keeps_pruned_weights_at_zero(runs, tmp_path):
    pruned = np_weights(compress(runs, tmp_path / "p", "--prune", "0.5") and tmp_path / "p" / "model.pt")
    got = compress(runs, tmp_path / "f", "--prune", "0.5", "--finetune-store", runs.train, "--finetune-epochs", "2")
    tuned = np_weights(tmp_path / "f" / "model.pt")
    for name in ("net.1.weight", "net.3.weight"):
        np.testing.assert_array_equal(tuned[name] == 0, pruned[name] == 0)
    assert not np.array_equal(tuned["net.1.weight"], pruned["net.1.weight"])  # the kept weights learned
    assert got["finetune"]["epochs"] == 2 and got["finetune"]["steps"] > 0
    assert (tmp_path / "f" / "finetune" / "summary.json").is_file()


def test_failure_midway_leaves_nothing(runs, tmp_path):
    r = run_cli("compress", str(runs.student), "--out", str(tmp_path / "c"), "--data", "digits:test", "--prune",
                "0.5", "--finetune-store", str(tmp_path / "missing.h5"))
    lines = r.output.strip().splitlines()  # fails while fine-tuning, after the pruning
    assert r.exit_code == 2 and lines[0].startswith("fine-tuning") and lines[-1].startswith("error: no store at")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None or importlib.util.find_spec("onnx") is None,
                    reason="needs onnx and onnxscript")
def test_onnx_export(runs, tmp_path):
    import onnx

    got = compress(runs, tmp_path / "c", "--prune", "0.2", "--onnx")
    assert got["files"]["onnx"] == "model.onnx"
    onnx.checker.check_model(onnx.load(str(tmp_path / "c" / "model.onnx")))


def test_train_init_starts_from_the_run(runs, tmp_path):
    sha = hashlib.sha256((runs.student / "model.pt").read_bytes()).hexdigest()
    args = ["train", "--student", "mlp", "--data", "digits:train", "--no-progress", "--init", runs.student,
            "--optimizer", "sgd", "--lr", "1e-30", "--out", tmp_path / "ft"]
    cli(*args, "--epochs", "1")
    cli(*args, "--epochs", "2", "--resume")  # resumable like any run
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["config"]["init"] == str(runs.student)
    assert summary["config"]["student_weights_sha256"] == sha
    before, after = np_weights(runs.student / "model.pt"), np_weights(tmp_path / "ft" / "model.pt")
    for name in before:  # lr 1e-30: the weights are the run's
        np.testing.assert_allclose(after[name], before[name], rtol=0, atol=1e-12)
    r = run_cli(*map(str, args), "--epochs", "3", "--resume", "--init", str(runs.teacher))
    assert r.exit_code == 2 and "init:" in r.output


def test_student_spec_from_the_run_is_data(runs, tmp_path):
    """A run recording a non-built-in student needs --student; with it, compress works."""
    state = torch.load(runs.student / "checkpoint.pt", weights_only=True)
    state["config"]["student"] = "os:system"
    fake = tmp_path / "run"
    fake.mkdir()
    torch.save(state, fake / "checkpoint.pt")
    (fake / "model.pt").write_bytes((runs.student / "model.pt").read_bytes())
    r = run_cli("compress", str(fake), "--out", str(tmp_path / "c"), "--data", "digits:test")
    assert_one_line_error(r, "'os:system'", "--student SPEC")
    cli("compress", fake, "--out", tmp_path / "c", "--data", "digits:test", "--student", "mlp", "--repeats", "1")
    assert json.loads((tmp_path / "c" / "compress.json").read_text())["student"] == "mlp"


@pytest.mark.slow
def test_compress_experiment_script(tmp_path):
    """tools/experiments/compress_experiment.py runs end to end and writes the tables of docs/COMPRESS.md."""
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "tools" / "experiments" / "compress_experiment.py"), "--out", str(tmp_path),
                        "--finetune-epochs", "1"], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, p.stderr[-2000:]
    tables = [b for b in (tmp_path / "compress_experiment.md").read_text().split("\n\n") if b.startswith("|")]
    assert [len(t.splitlines()) for t in tables] == [2 + 10, 2 + 5, 2 + 3]
    result = json.loads((tmp_path / "compress_experiment.json").read_text())
    assert result["compress"]["teacher, hidden units -50%"]["hidden_units"] == [256, 256]


def test_cli_choices_match_the_library():
    """The CLI spells the --quantize choices out (importing softlabels.evaluation.compression would pull in torch)."""
    from softlabels.cli import compress as cli_module
    from softlabels.evaluation import compression as lib

    assert cli_module.QUANTIZE == lib.QUANTIZE


def test_compress_never_replaces_its_input_run(tmp_path):
    """--out on the run itself, or on a folder holding it, is refused even with --overwrite."""
    from softlabels.evaluation.compression import CompressConfig

    run = tmp_path / "par" / "run"
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"weights")
    for out in (run, run.parent):
        problems = CompressConfig(run=str(run), out=str(out), data="digits:test", overwrite=True).problems()
        assert any("an input is never overwritten" in p and "RUN" in p for p in problems), problems
    assert (run / "model.pt").read_bytes() == b"weights"
    assert CompressConfig(run=str(run), out=str(tmp_path / "small"), data="digits:test").problems() == []
