"""`torchrun --nproc-per-node=2` training (gloo, CPU) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from softlabels.student.trainer import weights_digest
from softlabels.teacher.models import build_model
from tests.test_train import C, D, make_data, make_teacher, metrics, write_teacher_store


def test_two_process_training(tmp_path):
    # 201 rows: rank 0 streams 100, rank 1 101 -> 5 and 6 batches of 20, so the ranks' last steps differ
    spec = make_data(tmp_path, n=201)
    teacher, _ = make_teacher(tmp_path)
    store = write_teacher_store(tmp_path / "t.h5", spec, teacher, chunk_rows=16)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           "-m", "softlabels", "train", "--student", "mlp", "--store", store, "--epochs", "4", "--batch-size", "20",
           "--lr", "0.01", "--val-data", spec, "--out", str(out), "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("done: 4 epochs") == 1  # rank 0 alone prints
    assert (out / "checkpoint.pt").is_file() and (out / "model.pt").is_file()

    recs = metrics(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    assert all(r["samples"] == 201 for r in recs)  # losses averaged over both ranks' rows
    assert [r["step"] for r in recs] == [6, 12, 18, 24]  # the longer rank's count, on every rank
    assert recs[-1]["loss"] < 0.6 * recs[0]["loss"] and recs[-1]["val_accuracy"] > 0.9

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    per_rank = summary["weights_digest_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    model = build_model("mlp", (D,), C)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert weights_digest(model) == per_rank[0]  # what rank 0 saved is what both ranks hold
