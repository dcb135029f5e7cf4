"""A Hugging Face student in and out: ``--init hf:DIR``, ``RUN/hf`` (save_pretrained) and ``eval`` of it,
and the tokenizer identity a store records (a student of another vocabulary refused in one line).

Teacher and student are tiny random Llamas sharing the ChatML tokenizer of :mod:`tests._chatdata`;
the store is generated from the teacher's own directory (its tokenizer is the default).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests._chatdata import CORPUS
from tests._hfmodels import hf_model_dir
from tests.conftest import assert_one_line_error, run_cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfs")
    (root / "t.txt").write_text(" ".join(CORPUS))
    hf_model_dir(root / "teacher", "llama", seed=0, hidden_size=32, intermediate_size=64)
    hf_model_dir(root / "student", "llama", seed=1)
    hf_model_dir(root / "pretrained", "llama", seed=2)
    hf_model_dir(root / "gpt2", "gpt2", seed=3)
    r = run_cli("generate", "--teacher", f"hf:{root / 'teacher'}", "--data", f"text:{root / 't.txt'}", "--seq-len",
                "16", "--layout", "sampled", "--samples", "12", "--out", str(root / "s.zarr"), "--no-progress")
    assert r.exit_code == 0, r.output
    return root


def train(dirs, out, *extra):
    return run_cli("train", "--store", str(dirs / "s.zarr"), "--epochs", "1", "--batch-size", "4", "--out", str(out),
                   "--no-progress", *map(str, extra))


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def test_store_records_the_teacher_tokenizer(dirs):
    from softlabels.inputs.vocabulary import tokenizer_fingerprint
    from softlabels.store.reader import open_store

    with open_store(dirs / "s.zarr") as store:
        source = store.meta.source
    assert source["tokenizer"] == str((dirs / "teacher" / "tokenizer.json").resolve())
    assert source["tokenizer_fingerprint"] == tokenizer_fingerprint(dirs / "teacher")


def test_run_hf_loads_in_transformers_with_the_trained_logits(dirs, tmp_path):
    from softlabels.teacher.lm import resolve_lm

    r = train(dirs, tmp_path / "run", "--student", f"hf:{dirs / 'student'}")
    assert r.exit_code == 0, r.output
    export = tmp_path / "run" / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in export.iterdir()}
    shipped = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    trained = resolve_lm(f"hf:{dirs / 'student'}", weights=tmp_path / "run" / "model.pt").module
    ids = torch.randint(0, shipped.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(shipped, ids), logits(trained, ids))
    before = transformers.AutoModelForCausalLM.from_pretrained(dirs / "student").eval()
    assert not torch.equal(logits(before, ids), logits(shipped, ids))  # it did train
    tok = transformers.AutoTokenizer.from_pretrained(export)
    assert tok.chat_template and tok("hello world")["input_ids"]
    losses = []
    for checkpoint in (tmp_path / "run", export):  # a run of an hf: student, and its hf/ directly
        r = run_cli("eval", "--checkpoint", str(checkpoint), "--data", f"text:{dirs / 't.txt'}",
                    "--store", str(dirs / "s.zarr"), "--json")
        assert r.exit_code == 0, r.output
        result = json.loads(r.output)
        assert result["student"] == f"hf:{export}" and np.isfinite(result["kl_to_teacher"]), result
        losses.append(result["loss"])
    r = run_cli("eval", "--checkpoint", str(tmp_path / "run"), "--student", f"hf:{dirs / 'student'}", "--data",
                f"text:{dirs / 't.txt'}", "--json")  # the architecture named, model.pt's weights
    assert r.exit_code == 0, r.output
    assert losses == [json.loads(r.output)["loss"]] * 2


def test_init_from_a_pretrained_checkpoint(dirs, tmp_path):
    from softlabels.teacher.lm import resolve_lm

    info = resolve_lm(f"hf:{dirs / 'student'}", weights=f"hf:{dirs / 'pretrained'}")
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(dirs / "pretrained").state_dict()
    got = info.module.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in pretrained.items())
    r = train(dirs, tmp_path / "run", "--student", f"hf:{dirs / 'student'}", "--init", f"hf:{dirs / 'pretrained'}")
    assert r.exit_code == 0, r.output
    assert f"starting from the weights of hf:{dirs / 'pretrained'}" in r.output
    r = train(dirs, tmp_path / "bad", "--student", f"hf:{dirs / 'student'}", "--init", f"hf:{dirs / 'gpt2'}",
              "--temperature", "1", "--alpha", "0.5")  # T and alpha given: no line saying which defaults it chose
    assert_one_line_error(r, f"hf:{dirs / 'gpt2'} does not fit student", "pass --init a checkpoint")
    assert not (tmp_path / "bad" / "model.pt").exists()


def _other_vocabulary(tmp_path):
    """A model directory whose tokenizer has the same size but two ids swapped: another vocabulary."""
    other = hf_model_dir(tmp_path / "other", "llama")
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    return other


def test_a_student_of_another_tokenizer_is_refused(dirs, tmp_path):
    other = _other_vocabulary(tmp_path)
    r = train(dirs, tmp_path / "run", "--student", f"hf:{other}")
    assert_one_line_error(r, f"the tokenizer of hf:{other}", "has another vocabulary than the tokenizer store",
                          "cross-tokenizer distillation is not supported")
    assert not (tmp_path / "run" / "model.pt").exists()


def test_seq_len_beyond_the_model_positions_is_refused(dirs, tmp_path):
    r = run_cli("generate", "--teacher", f"hf:{dirs / 'teacher'}", "--data", f"text:{dirs / 't.txt'}",
                "--seq-len", "65", "--out", str(tmp_path / "s.zarr"))
    assert_one_line_error(r, "sequences of 65 tokens exceed the 64 positions of", "pass --seq-len 64 or less")
    assert not (tmp_path / "s.zarr").exists()


def test_eval_against_a_store_of_another_tokenizer_is_refused(dirs, tmp_path):
    other = _other_vocabulary(tmp_path)
    r = run_cli("eval", "--checkpoint", str(other), "--data", f"text:{dirs / 't.txt'}", "--store",
                str(dirs / "s.zarr"))
    assert_one_line_error(r, "the student's tokenizer", "has another vocabulary than the tokenizer store")
