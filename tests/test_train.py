"""The student trainer: store path == live teacher, learning, resume, supervised mode, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from softlabels.cli import main
from softlabels.errors import ConfigError
from softlabels.inputs.fingerprints import fingerprint
from softlabels.inputs.spec import resolve_data
from softlabels.student.trainer import TrainConfig, train
from softlabels.teacher.models import build_model
from softlabels.teacher.spec import resolve_model
from tests.conftest import write_store

D, C = 8, 4
TIMING = ("epoch_seconds", "samples_per_s", "val_seconds")


# -- tiny problems made here (imported by test_eval and test_train_distributed) ------------------
def make_data(tmp_path: Path, *, n: int = 240, seed: int = 0, name: str = "data.npz", noise: float = 1.0) -> str:
    """Gaussian blobs around 4 fixed centres in 8-D, saved as .npz; returns the data spec."""
    centers = np.random.default_rng(123).standard_normal((C, D)).astype(np.float32) * 2
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    x = (centers[y] + noise * rng.standard_normal((n, D))).astype(np.float32)
    np.savez(tmp_path / name, x=x, y=y)
    return str(tmp_path / name)


def make_teacher(tmp_path: Path) -> tuple[torch.nn.Module, str]:
    """A linear teacher whose logits are x . centres (nearly Bayes-optimal here); returns (module, weights file)."""
    model = build_model("linear", (D,), C)
    centers = np.random.default_rng(123).standard_normal((C, D)).astype(np.float32) * 2
    with torch.no_grad():
        model.net[1].weight.copy_(torch.from_numpy(centers))
        model.net[1].bias.copy_(-0.5 * torch.from_numpy(centers).square().sum(1))
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), str(path)


def write_teacher_store(path: Path, spec: str, teacher: torch.nn.Module, *, dtype: str = "float32",
                        perturb: float = 0.0, topk: int | None = None, finish: bool = True, chunk_rows: int = 32) -> str:
    """Teacher logits of every row of ``spec``, stored in a shuffled row order (so the join by id matters)."""
    ds = resolve_data(spec)
    n = len(ds)
    ids = np.random.default_rng(7).permutation(n)
    x, y = ds.get_batch(ids)
    with torch.no_grad():
        z = teacher(x)
    if perturb:
        z = z + perturb * torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    rows = {"labels": y.numpy(), "sample_ids": ids}
    if topk:
        v, i = z.topk(topk, dim=-1)
        rows.update(topk_values=v.numpy(), topk_indices=i.numpy(), logsumexp=z.logsumexp(-1).numpy())
    else:
        rows["logits"] = z.numpy()
    write_store(path, rows, num_classes=C, logits_dtype=dtype, chunk_rows=chunk_rows, finish=finish,
                teacher={"spec": "linear"}, source={"spec": spec, "num_samples": n, "fingerprint": fingerprint(ds)})
    return str(path)


def load_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(out) / "model.pt", weights_only=True)


def metrics(out: Path, *, drop_timing: bool = True) -> list[dict]:
    recs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (drop_timing and k in TIMING)} for r in recs]


def same_weights(a: dict, b: dict, **tol) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], **tol) for k in a)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("problem")
    spec = make_data(tmp)
    teacher, weights = make_teacher(tmp)
    return {"dir": tmp, "spec": spec, "teacher": teacher, "weights": weights,
            "store": write_teacher_store(tmp / "t.h5", spec, teacher)}


def base(problem, out: Path, **kw) -> TrainConfig:
    opts = dict(student="mlp", stores=(problem["store"],), out=str(out), epochs=3, batch_size=32, lr=1e-2,
                temperature=2.0, alpha=0.3, progress=False)
    opts.update(kw)
    return TrainConfig(**opts)


# -- the store path is faithful ------------------------------------------------------------------
def test_offline_equals_online_and_can_fail(problem, tmp_path):
    cfg = base(problem, tmp_path / "offline")
    train(cfg)
    train(replace(cfg, out=str(tmp_path / "online")), teacher=problem["teacher"])  # teacher live, same batches
    offline, online = load_weights(tmp_path / "offline"), load_weights(tmp_path / "online")
    assert same_weights(offline, online, rtol=1e-5, atol=1e-6)
    # the comparison can fail: a store whose logits differ slightly gives other weights
    bad = write_teacher_store(tmp_path / "perturbed.h5", problem["spec"], problem["teacher"], perturb=0.05)
    train(replace(cfg, stores=(bad,), out=str(tmp_path / "perturbed")))
    perturbed = load_weights(tmp_path / "perturbed")
    assert not same_weights(perturbed, online, rtol=1e-5, atol=1e-6)
    gap = max((perturbed[k] - online[k]).abs().max().item() for k in online)
    assert gap > 2e-5  # 20x the tolerance above


def test_student_learns_the_teacher(problem, tmp_path):
    cfg = base(problem, tmp_path / "run", epochs=6, val_data=problem["spec"])
    summary = train(cfg)
    recs = metrics(tmp_path / "run")
    assert [r["epoch"] for r in recs] == list(range(1, 7))
    assert recs[-1]["loss"] < 0.5 * recs[0]["loss"]
    assert recs[-1]["loss"] == pytest.approx(recs[-1]["loss_hard"] + recs[-1]["loss_soft"])
    assert recs[-1]["val_accuracy"] > 0.9
    # agreement with the teacher, before vs after training
    ds = resolve_data(problem["spec"])
    x, _ = ds.get_batch(np.arange(len(ds)))
    t_top = problem["teacher"](x).argmax(-1)
    torch.manual_seed(cfg.seed)
    untrained = build_model("mlp", (D,), C)
    trained = resolve_model("mlp", input_shape=(D,), num_classes=C, weights=tmp_path / "run" / "model.pt").module
    with torch.no_grad():
        before = (untrained(x).argmax(-1) == t_top).float().mean().item()
        after = (trained(x).argmax(-1) == t_top).float().mean().item()
    assert after > 0.9 and after > before + 0.3, (before, after)
    assert summary["steps"] == 6 * 8 and summary["first_loss"] == recs[0]["loss"]


def test_topk_store_default_loss(problem, tmp_path):
    store = write_teacher_store(tmp_path / "k.zarr", problem["spec"], problem["teacher"], topk=2, dtype="float16")
    # a store written without a tail grid (logsumexp over all C) answers T = 1 only
    with pytest.raises(ConfigError, match="answers only that T exactly, not T = 2"):
        train(base(problem, tmp_path / "refused", stores=(store,), alpha=0.0))
    summary = train(base(problem, tmp_path / "run", stores=(store,), alpha=0.0, temperature=1.0))
    assert summary["config"]["loss"] == "topk_kl" and summary["config"]["layout"] == "topk"
    recs = metrics(tmp_path / "run")
    assert recs[-1]["loss"] < recs[0]["loss"] and recs[-1]["loss_hard"] == 0


def test_dataloader_workers_are_deterministic(problem, tmp_path):
    for name in ("a", "b"):
        train(base(problem, tmp_path / name, num_workers=2, epochs=2))
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


# -- resume ---------------------------------------------------------------------------------------
class _Crash(Exception):
    pass


def _crash_after(epoch: int):
    def hook(record):
        if record["epoch"] == epoch:
            raise _Crash
    return hook


def test_resume_after_crash_is_identical(problem, tmp_path):
    """Cosine schedule, warmup, AdamW, a val set: a run killed after epoch 2 and resumed == one run."""
    cfg = base(problem, tmp_path / "a", warmup_steps=5, weight_decay=0.01, val_data=problem["spec"])
    with pytest.raises(_Crash):
        train(cfg, on_epoch_end=_crash_after(2))
    assert [r["epoch"] for r in metrics(tmp_path / "a")] == [1, 2]
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:  # a crash mid-append of epoch 3
        f.write('{"epoch": 3, "loss": 1')
    train(replace(cfg, resume=True))
    train(replace(cfg, out=str(tmp_path / "b")))
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert (ca["epoch"], ca["step"]) == (cb["epoch"], cb["step"]) == (3, 24)
    assert ca["scheduler"] == cb["scheduler"]
    # changed settings are refused on resume
    with pytest.raises(Exception, match="--resume with other settings.*lr"):
        train(replace(cfg, resume=True, lr=0.5))


def test_cli_resume_extends_a_run(problem, tmp_path):
    """--epochs 2, then --resume --epochs 3 == --epochs 3 (constant LR, SGD)."""
    args = ["train", "--student", "mlp", "--store", problem["store"], "--batch-size", "32", "--lr", "0.05",
            "--optimizer", "sgd", "--schedule", "constant", "--no-progress", "--seed", "3"]
    runner = CliRunner()
    r = runner.invoke(main, args + ["--epochs", "2", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "recorded source.spec" in r.output and "done: 2 epochs" in r.output
    r = runner.invoke(main, args + ["--epochs", "3", "--out", str(tmp_path / "a"), "--resume"])
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    r = runner.invoke(main, args + ["--epochs", "3", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["config"]["teachers"][0]["teacher"] == {"spec": "linear"}


# -- plain supervised training (teachers, baselines) ----------------------------------------------
def test_supervised_training_and_teacher_weights_round_trip(problem, tmp_path):
    out = tmp_path / "teacher"
    more = make_data(tmp_path, n=50, seed=11, name="more.npz")
    summary = train(TrainConfig(student="mlp", data=(problem["spec"], more), out=str(out), epochs=4, batch_size=32,
                                lr=1e-2, val_data=problem["spec"], progress=False))
    recs = metrics(out)
    assert recs[-1]["loss"] < recs[0]["loss"] and recs[-1]["loss_soft"] == 0 and recs[-1]["val_accuracy"] > 0.85
    assert summary["config"]["loss"] is None and recs[0]["samples"] == 240 + 50
    # model.pt is a plain state_dict that feeds --weights of generate/eval
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "epoch", "step", "rng", "config"}
    assert ckpt["config"]["input_shape"] == [D] and ckpt["config"]["num_classes"] == C
    info = resolve_model("mlp", input_shape=(D,), num_classes=C, weights=out / "model.pt")
    assert info.num_parameters == summary["num_parameters"]
    # ... so a trained teacher feeds `softlabels generate`
    r = CliRunner().invoke(main, ["generate", "--teacher", "mlp", "--weights", str(out / "model.pt"), "--data", more,
                                  "--out", str(tmp_path / "gen.h5")])
    assert r.exit_code == 0, r.output
    with torch.no_grad():
        x, _ = resolve_data(more).get_batch(np.arange(50))
        expected = info.module(x)
    from softlabels.store.reader import open_store
    with open_store(tmp_path / "gen.h5") as store:
        blocks = [store.read_unit(u) for u in range(store.num_units)]
    block = {k: np.concatenate([b[k] for b in blocks]) for k in ("logits", "sample_ids")}
    assert torch.allclose(torch.from_numpy(block["logits"]), expected[block["sample_ids"]], atol=1e-5)


def test_labeled_and_unlabeled_stores(problem, tmp_path):
    pool = make_data(tmp_path, n=100, seed=21, name="pool.npz") + "?unlabeled"
    unlabeled = write_teacher_store(tmp_path / "u.zarr", pool, problem["teacher"])
    summary = train(base(problem, tmp_path / "run", stores=(problem["store"], unlabeled), epochs=2))
    assert [t["source"]["spec"] for t in summary["config"]["teachers"]] == [problem["spec"], pool]
    assert summary["config"]["data"] == [problem["spec"], pool]  # recorded specs, resolved
    assert [r["samples"] for r in metrics(tmp_path / "run")] == [340, 340]


# -- bad input through the CLI: exit 2, one "error:" line, no traceback --------------------------
def _invoke(args):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


def test_cli_errors(problem, tmp_path):
    spec, store = problem["spec"], problem["store"]
    run = ["train", "--student", "mlp", "--epochs", "1", "--no-progress"]
    out = ["--out", str(tmp_path / "o")]

    other = make_data(tmp_path, seed=5, name="other.npz")
    assert "not the data the store was generated from" in _invoke(run + ["--store", store, "--data", other] + out)

    partial = write_teacher_store(tmp_path / "partial.h5", spec, problem["teacher"], finish=False)
    assert "incomplete" in _invoke(run + ["--store", partial] + out)

    wide = tmp_path / "wide.pt"  # a TorchScript student with 7 outputs; the store has 4 classes
    torch.jit.save(torch.jit.script(torch.nn.Linear(D, 7)), wide)
    msg = _invoke(["train", "--student", str(wide), "--store", store] + out)
    assert "outputs 7 classes" in msg and "4" in msg

    assert "unknown loss 'kl2'" in _invoke(run + ["--store", store, "--loss", "kl2"] + out)

    topk = write_teacher_store(tmp_path / "k.h5", spec, problem["teacher"], topk=2)
    assert "--loss topk_kl" in _invoke(run + ["--store", topk, "--loss", "kl"] + out)
    assert "--loss kl" in _invoke(run + ["--store", store, "--loss", "topk_kl"] + out)

    assert "no store" in _invoke(run + ["--store", str(tmp_path / "missing.h5")] + out)
    assert "no labels" in _invoke(run + ["--data", spec + "?unlabeled"] + out)
    assert "--data for 1 --store" in _invoke(run + ["--store", store, "--data", spec, "--data", spec] + out)

    ok = CliRunner().invoke(main, run + ["--store", store] + out)
    assert ok.exit_code == 0, ok.output
    assert "--resume" in _invoke(run + ["--store", store] + out)  # --out holds a run
    assert CliRunner().invoke(main, run + ["--store", store, "--overwrite"] + out).exit_code == 0


def test_cli_error_in_a_real_process(problem, tmp_path):
    other = make_data(tmp_path, seed=5, name="other.npz")
    p = subprocess.run([sys.executable, "-m", "softlabels", "train", "--student", "mlp", "--store", problem["store"],
                        "--data", other, "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "fingerprint" in p.stderr
