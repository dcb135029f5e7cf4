"""tools/lm_data.py: the LM demo's tokenizer and token files, built in a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from softlabels.inputs.text import load_tokenizer, resolve_token_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    pytest.importorskip("tokenizers")
    out = tmp_path_factory.mktemp("lm_data")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "lm_data.py"), "--out", str(out), "--vocab-size", "600",
         "--seq-len", "64"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_files_round_trip_to_the_texts(built):
    summary = json.loads((built / "lm_data.json").read_text())
    tok = load_tokenizer(built / "tokenizer.json")
    assert tok.get_vocab_size() == summary["vocab_size"] == 600
    for name in ("train", "heldout"):
        ds = resolve_token_data(str(built / f"{name}.npz"))
        lengths = ds.lengths()
        assert (lengths[:-1] == 64).all() and lengths.sum() == summary[name]["tokens"]
        batch = ds.get_batch(np.arange(len(ds)))
        stream = batch.ids.numpy()[batch.valid.numpy()]
        assert stream.max() < 600 and stream[-1] == 0  # every document ends with <|endoftext|> (id 0)
        docs = tok.decode(stream.tolist(), skip_special_tokens=False).split("<|endoftext|>")[:-1]
        assert "\n\n".join(docs) == (built / f"{name}.txt").read_text(encoding="utf-8")
        assert len(docs) == summary[name]["documents"]


def test_held_out_text_is_unseen_and_about_a_tenth(built):
    summary = json.loads((built / "lm_data.json").read_text())
    train = (built / "train.txt").read_text(encoding="utf-8")
    held = (built / "heldout.txt").read_text(encoding="utf-8").split("\n\n")
    long_paragraphs = [p for p in held if len(p) > 200]
    assert long_paragraphs and not any(p in train for p in long_paragraphs)
    share = summary["heldout"]["characters"] / (summary["heldout"]["characters"] + summary["train"]["characters"])
    assert 0.05 < share < 0.15
