"""Specs recorded in stores and eval results are absolute: a store trains from any working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from softlabels.inputs.spec import absolute_data_spec
from tests.conftest import read_plain

Image = pytest.importorskip("PIL.Image")


def _cli(cwd: Path, *args: object) -> subprocess.CompletedProcess:
    """The console entry point in a real process, run from ``cwd``."""
    return subprocess.run([sys.executable, "-m", "softlabels", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


@pytest.mark.parametrize(("spec", "expected"), [
    ("imagefolder:imgs?size=12", "imagefolder:{cwd}/imgs?size=12"),
    ("imagefolder:imgs?size=12,gray,unlabeled", "imagefolder:{cwd}/imgs?size=12,gray,unlabeled"),
    ("imagefolder:./imgs/", "imagefolder:{cwd}/imgs"),
    ("text:corpus/t.txt", "text:{cwd}/corpus/t.txt"),
    ("x.npz:a,b?unlabeled", "{cwd}/x.npz:a,b?unlabeled"),
    ("tokens.npy", "{cwd}/tokens.npy"),
    ("digits:train", "digits:train"),
    ("mypkg.data:make", "mypkg.data:make"),
])
def test_absolute_data_spec(tmp_path, monkeypatch, spec, expected):
    monkeypatch.chdir(tmp_path)
    assert absolute_data_spec(spec) == expected.format(cwd=tmp_path)
    assert absolute_data_spec(absolute_data_spec(spec)) == absolute_data_spec(spec)  # already absolute: kept


def test_a_store_made_here_trains_from_elsewhere(tmp_path):
    """generate in one directory with relative specs, train and report from another (issue 20, case 12)."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (here / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(here / "imgs" / c / f"{i}.png")
    elsewhere.mkdir()
    (elsewhere / "imgs").mkdir()  # a different imgs/ where training runs: it must not be the one read
    r = _cli(here, "generate", "--teacher", "mlp", "--random-teacher", "--data", "imagefolder:imgs?size=8",
             "--out", "s.h5", "--no-progress")
    assert r.returncode == 0, r.stderr
    _, attrs = read_plain(here / "s.h5")
    assert attrs["source"]["spec"] == f"imagefolder:{here}/imgs?size=8"
    r = _cli(elsewhere, "train", "--student", "mlp", "--store", here / "s.h5", "--epochs", "1", "--batch-size", "4",
             "--no-progress", "--out", "run")
    assert r.returncode == 0, r.stderr
    r = _cli(here, "eval", "--checkpoint", elsewhere / "run", "--data", "imagefolder:imgs?size=8", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["data"] == f"imagefolder:{here}/imgs?size=8"


def test_a_token_store_made_here_trains_from_elsewhere(tmp_path):
    from softlabels.inputs.text import pydoc_topics, train_bpe

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    text = pydoc_topics()["if"][:1500]
    (here / "t.txt").write_text(text)
    train_bpe(text, 300).save(str(here / "tok.json"))
    r = _cli(here, "generate", "--teacher", "gpt-tiny", "--random-teacher", "--data", "text:t.txt",
             "--tokenizer", "tok.json", "--seq-len", "32", "--out", "t.h5", "--no-progress")
    assert r.returncode == 0, r.stderr
    _, attrs = read_plain(here / "t.h5")
    assert attrs["source"]["spec"] == f"text:{here}/t.txt"
    r = _cli(elsewhere, "train", "--student", "gpt-tiny", "--store", here / "t.h5", "--epochs", "1",
             "--batch-size", "8", "--no-progress", "--out", "run")
    assert r.returncode == 0, r.stderr
