"""Language models without a store (hard next-token CE only), and what eval says about a sparse store's KL."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests._lmstore import ragged_data, tiny_teacher, write_token_store
from tests.conftest import run_cli

pytest.importorskip("tokenizers")

TEXT = "\n\n".join(f"The help topic {i} says how {w} works, and why {w} is {i % 3} times faster."
                   for i, w in enumerate(["import", "yield", "lambda", "class", "with", "assert"] * 4))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from softlabels.inputs.text import train_bpe

    d = tmp_path_factory.mktemp("hard")
    (d / "t.txt").write_text(TEXT)
    train_bpe(TEXT, 300).save(str(d / "tok.json"))
    return d


def test_hard_ce_from_data_alone_equals_plain_cross_entropy(text):
    from softlabels.inputs.text import resolve_token_data
    from softlabels.teacher.lm import build_lm

    out = text / "run"
    r = run_cli("train", "--student", "gpt-tiny", "--data", f"text:{text / 't.txt'}", "--tokenizer",
                str(text / "tok.json"), "--seq-len", "16", "--epochs", "2", "--batch-size", "1000", "--device",
                "cpu", "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    assert "hard next-token CE only" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["alpha"] == 1.0 and summary["config"]["store_identity"] == []
    # one batch per epoch: epoch 1's loss is the untrained student's mean next-token CE, by hand
    data = resolve_token_data(f"text:{text / 't.txt'}", tokenizer=str(text / "tok.json"), seq_len=16)
    b = data.get_batch(np.arange(len(data)))
    model = build_lm("gpt-tiny", data.vocab_size, 16, seed=0).eval()
    with torch.no_grad():
        logits = model(b.ids)
    rows = [(i, t) for i, n in enumerate(b.lengths.tolist()) for t in range(n - 1)]
    s = torch.stack([logits[i, t] for i, t in rows]).double()
    y = torch.tensor([int(b.ids[i, t + 1]) for i, t in rows])
    want = float(F.cross_entropy(s, y))
    assert summary["first_loss"] == pytest.approx(want, rel=1e-5)
    assert summary["steps"] == 2 and summary["final"]["positions"] == len(rows)
    r = run_cli("eval", "--checkpoint", str(out), "--data", f"text:{text / 't.txt'}", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["positions"] == len(rows) and math.isclose(m["perplexity"], math.exp(m["loss"]))


def test_eval_of_a_sampled_store_reports_a_kl_that_is_never_negative(tmp_path):
    from softlabels.store.layouts.targets import SampledTarget
    from softlabels.student import kd

    lengths, vocab = [6, 3, 9, 5], 40
    spec, data = ragged_data(tmp_path / "d.npz", lengths, vocab)
    teacher = tiny_teacher(vocab, 16)
    stores = {layout: write_token_store(tmp_path / f"{layout}.h5", teacher, data, layout, spec=spec)
              for layout in ("dense", "sampled")}
    out = tmp_path / "run"
    r = run_cli("train", "--student", "gpt-tiny", "--store", stores["dense"], "--epochs", "1", "--batch-size", "4",
                "--device", "cpu", "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    res = {k: json.loads(run_cli("eval", "--checkpoint", str(out), "--data", spec, "--store", v, "--json").output)
           for k, v in stores.items()}
    assert res["dense"]["kl_to_teacher_kind"] == "exact" and "kl_to_teacher_estimate" not in res["dense"]
    s = res["sampled"]
    assert s["kl_to_teacher_kind"] == "lower bound (stored ids + tail)"
    # the bound is never negative and never above the exact KL; the estimate is reported beside it
    assert 0 <= s["kl_to_teacher"] <= res["dense"]["kl_to_teacher"] + 1e-6
    assert math.isfinite(s["kl_to_teacher_estimate"])
    # the estimator can go negative where the bound cannot: one token, a student equal to its teacher but
    # for one stored id
    target = SampledTarget(ids=torch.tensor([[0, 1, 0]]), counts=torch.tensor([[3, 1, 0]]),
                           logits=torch.tensor([[2.0, 0.0, 0.0]]), logsumexp=torch.tensor([math.log(math.e**2 + 2)]))
    student = torch.tensor([[2.0, 0.5, 0.0]])
    assert float(kd.sampled_kl(student, target, 1.0)) < 0 <= float(kd.divergence("forward_kl", student, target, 1.0))
    table = run_cli("eval", "--checkpoint", str(out), "--data", spec, "--store", stores["sampled"]).output
    assert "KL to teacher, sampled estimate" in table and "lower bound (stored ids + tail)" in table
