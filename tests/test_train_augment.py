"""`train --augment`: a fresh view per sample and epoch, drawn from (seed, sample id, epoch), on the device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _v2stores import SHAPE, make_images, write_v2
from conftest import run_cli

from softlabels.inputs.augment import draw_views, parse_augment
from softlabels.inputs.spec import resolve_data
from softlabels.student.config import TrainConfig
from softlabels.student.trainer import train

AUG = "crop(6,padding=1)+flip"
SEED = 4

# A student that keeps every training batch it sees (one .npy per forward call and rank), to compare
# the views the trainer built against views drawn independently with draw_views.
RECORDER = '''
import os
from pathlib import Path

import numpy as np
import torch


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(36, 4)
        self.calls = 0

    def forward(self, x):
        if self.training:
            rank = os.environ.get("RANK", "0")
            np.save(Path(os.environ["REC_DIR"]) / f"r{rank}-{self.calls:03d}.npy", x.detach().cpu().numpy())
            self.calls += 1
        return self.lin(x.flatten(1))


def make():
    return Recorder()
'''


def _rows(a: np.ndarray) -> list[bytes]:
    """The rows of ``a`` as a sorted list (a multiset, whatever the batch order)."""
    return sorted(r.tobytes() for r in np.ascontiguousarray(a, dtype=np.float32).reshape(len(a), -1))


def _expected(spec: str, ids: np.ndarray, epoch: int) -> list[bytes]:
    """View ``epoch`` of every sample in ``ids``, drawn from (SEED, id, epoch) and applied to the raw inputs."""
    x, _ = resolve_data(spec).get_batch(ids)
    aug = parse_augment(AUG)
    t = torch.from_numpy(ids)
    params = draw_views(aug, SEED, t, torch.full_like(t, epoch), SHAPE)
    return _rows(aug.apply(x, params).numpy())


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    (tmp_path / "rec_student.py").write_text(RECORDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    rec = tmp_path / "rec"
    rec.mkdir()
    monkeypatch.setenv("REC_DIR", str(rec))
    return rec


def _recorded(rec: Path, rank: str = "0") -> list[np.ndarray]:
    return [np.load(p) for p in sorted(rec.glob(f"r{rank}-*.npy"))]


@pytest.mark.parametrize("source,workers", [("data", 0), ("v1", 0), ("v2", 0), ("data", 2), ("v2", 2)])
def test_views_are_drawn_from_seed_id_and_epoch(tmp_path, recorder, source, workers):
    """Each epoch's inputs are exactly draw_views(seed, sample ids, epoch) applied to the raw inputs,
    however many DataLoader workers read the batches."""
    spec = make_images(tmp_path)
    kw: dict = {"data": (spec,)}
    if source != "data":
        store = tmp_path / f"s.{'zarr' if source == 'v2' else 'h5'}"
        if source == "v2":
            write_v2(store, spec, positions="sample")
        else:
            r = run_cli("generate", "--teacher", "linear", "--random-teacher", "--data", spec, "--out", str(store))
            assert r.exit_code == 0, r.output
        kw = {"stores": (str(store),)}
    cfg = TrainConfig(student="rec_student:make", out=str(tmp_path / "run"), epochs=3, batch_size=64, seed=SEED,
                      augment=AUG, num_workers=workers, progress=False, **kw)
    steps = train(cfg)["steps"] // 3
    seen = _recorded(recorder)
    assert len(seen) == 3 * steps
    epochs = [np.concatenate(seen[e * steps:(e + 1) * steps]) for e in range(3)]
    for epoch, x in enumerate(epochs):
        assert _rows(x) == _expected(spec, np.arange(40), epoch)
    assert _rows(epochs[0]) != _rows(epochs[1])  # a fresh view every epoch


def _weights(tmp_path, out, store, on_epoch_end=None, **kw):
    cfg = TrainConfig(student="cnn", stores=(str(store),), out=str(tmp_path / out), epochs=3, batch_size=8, lr=0.05,
                      seed=SEED, augment=AUG, progress=False, **kw)
    train(cfg, on_epoch_end=on_epoch_end)
    return torch.load(tmp_path / out / "model.pt", weights_only=True)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Killed after epoch 1 and resumed: the views of epochs 2 and 3 are those of an uninterrupted run."""
    spec = make_images(tmp_path)
    store = tmp_path / "s.h5"
    write_v2(store, spec, positions="sample")
    straight = _weights(tmp_path, "a", store)

    def crash(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _weights(tmp_path, "b", store, on_epoch_end=crash)
    resumed = _weights(tmp_path, "b", store, resume=True)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    plain = TrainConfig(student="cnn", stores=(str(store),), out=str(tmp_path / "d"), epochs=3, batch_size=8,
                        lr=0.05, seed=SEED, progress=False)
    train(plain)
    unaugmented = torch.load(tmp_path / "d" / "model.pt", weights_only=True)
    assert not all(torch.equal(straight[k], unaugmented[k]) for k in straight)


def test_resume_with_another_augment_is_refused(tmp_path):
    spec = make_images(tmp_path)
    out = tmp_path / "run"
    r = run_cli("train", "--student", "linear", "--data", spec, "--augment", AUG, "--epochs", "1", "--out", str(out))
    assert r.exit_code == 0, r.output
    r = run_cli("train", "--student", "linear", "--data", spec, "--augment", "flip", "--epochs", "2", "--out", str(out),
                "--resume")
    assert r.exit_code == 2 and "augment" in r.output


def test_two_ranks_draw_the_views_of_one_process(tmp_path, recorder):
    """Under torchrun each rank draws its rows' views: together exactly the one-process views of each epoch."""
    spec = make_images(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "softlabels",
           "train", "--student", "rec_student:make", "--data", spec, "--augment", AUG, "--seed", str(SEED),
           "--epochs", "2", "--batch-size", "64", "--out", str(tmp_path / "run"), "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    r0, r1 = _recorded(recorder, "0"), _recorded(recorder, "1")
    assert len(r0) == len(r1) == 2  # 20 rows per rank: one batch per epoch
    for epoch in range(2):
        assert len(r0[epoch]) == len(r1[epoch]) == 20
        assert _rows(np.concatenate([r0[epoch], r1[epoch]])) == _expected(spec, np.arange(40), epoch)
