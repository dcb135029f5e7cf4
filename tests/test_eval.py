"""softlabels eval: numbers equal an independent numpy computation on the same predictions."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from softlabels.cli import main
from softlabels.evaluation.evaluator import evaluate
from softlabels.inputs.spec import resolve_data
from softlabels.student.trainer import TrainConfig, train
from softlabels.teacher.job import generate
from softlabels.teacher.models import build_model
from tests.test_train import C, D, make_data, make_teacher, write_teacher_store


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_ece(logits: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    p = np.exp(np_log_softmax(logits))
    conf, pred = p.max(1), p.argmax(1)
    b = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)  # bins closed on the right
    return sum(abs((pred[b == i] == y[b == i]).sum() - conf[b == i].sum()) for i in range(bins)) / len(y)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Teacher weights -> `softlabels generate` -> student trained from the store."""
    tmp = tmp_path_factory.mktemp("eval")
    spec = make_data(tmp, noise=2.0)  # overlapping blobs: neither model is perfect
    teacher, weights = make_teacher(tmp)
    store = tmp / "gen.h5"
    generate("linear", spec, store, weights=weights, dtype="float32", progress=False)
    out = tmp / "student"
    train(TrainConfig(student="mlp", stores=(str(store),), out=str(out), epochs=2, batch_size=32, lr=1e-2,
                      progress=False))
    return {"tmp": tmp, "spec": spec, "teacher": teacher, "store": str(store), "out": out}


def test_eval_matches_numpy(run):
    ds = resolve_data(run["spec"])
    x, y = ds.get_batch(np.arange(len(ds)))
    student = build_model("mlp", (D,), C)
    student.load_state_dict(torch.load(run["out"] / "model.pt", weights_only=True))
    with torch.no_grad():
        s, t = student(x).double().numpy(), run["teacher"](x).double().numpy()
    y = y.numpy()
    log_p, log_q = np_log_softmax(t), np_log_softmax(s)
    sc, tc = s - s.mean(1, keepdims=True), t - t.mean(1, keepdims=True)
    expected = {
        "accuracy": (s.argmax(1) == y).mean(),
        "ece": np_ece(s, y),
        "teacher_accuracy": (t.argmax(1) == y).mean(),
        "agreement": (s.argmax(1) == t.argmax(1)).mean(),
        "kl_to_teacher": (np.exp(log_p) * (log_p - log_q)).sum(1).mean(),
        "correlation": ((sc * tc).sum(1) / np.linalg.norm(sc, axis=1) / np.linalg.norm(tc, axis=1)).mean(),
        "teacher_ece": np_ece(t, y),
    }
    assert 0.5 < expected["accuracy"] < 0.99 and expected["ece"] > 0.001  # a non-trivial case
    got = evaluate(run["out"], run["spec"], run["store"])
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert got["n"] == got["n_labeled"] == len(ds)
    assert got["num_parameters"] == D * 32 + 32 + 32 * C + C and got["flops"] == D * 32 + 32 * C
    assert got["epochs_trained"] == 2
    # a store holding the same rows in another order: joined by sample id, same numbers
    shuffled = write_teacher_store(run["tmp"] / "shuffled.zarr", run["spec"], run["teacher"])
    again = evaluate(run["out"] / "checkpoint.pt", run["spec"], shuffled)
    for key in expected:
        assert again[key] == pytest.approx(got[key], rel=1e-9), key
    # without a store: student metrics only
    plain = evaluate(run["out"], run["spec"])
    assert plain["accuracy"] == got["accuracy"] and "agreement" not in plain


def test_eval_cli_json_and_table(run):
    runner = CliRunner()
    r = runner.invoke(main, ["eval", "--checkpoint", str(run["out"]), "--data", run["spec"], "--store", run["store"],
                             "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result == evaluate(str(run["out"]), run["spec"], run["store"])  # floats survive JSON exactly
    r = runner.invoke(main, ["eval", "--checkpoint", str(run["out"]), "--data", run["spec"], "--store", run["store"]])
    assert r.exit_code == 0, r.output
    table = dict(re.fullmatch(r"(.*?)\s{2,}(\S.*)", line).groups() for line in r.stdout.splitlines()[1:])
    assert float(table["accuracy"].rstrip(" %")) == pytest.approx(100 * result["accuracy"], abs=0.006)
    assert float(table["KL to teacher"]) == pytest.approx(result["kl_to_teacher"], abs=6e-5)
    assert {"ECE", "top-1 agreement", "teacher ECE", "parameters", "MACs / sample"} <= set(table)


def test_eval_errors(run, tmp_path):
    runner = CliRunner()
    other = make_data(tmp_path, seed=9, name="other.npz")
    for args, needle in [
        (["--checkpoint", str(run["out"]), "--data", other, "--store", run["store"]], "not the data"),
        (["--checkpoint", str(tmp_path), "--data", run["spec"]], "no training checkpoint"),
        (["--checkpoint", str(run["out"] / "model.pt"), "--data", run["spec"]], "holds weights only"),
    ]:
        r = runner.invoke(main, ["eval", *args])
        assert r.exit_code == 2, r.output
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


@pytest.mark.parametrize("batch_size", [0, 2.5, True])
def test_library_evaluate_refuses_a_batch_size_that_is_not_a_positive_integer(run, batch_size):
    from softlabels.errors import ConfigError

    with pytest.raises(ConfigError, match="--batch-size must be an integer >= 1"):
        evaluate(run["out"], run["spec"], batch_size=batch_size)
