"""Chat and document data through the real ``softlabels`` console script, and bad data refused
before anything is written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from softlabels.inputs.text import resolve_documents
from softlabels.inputs.tokens import token_fingerprint
from tests._chatdata import CONVERSATIONS, DOCUMENTS, PLAIN, tokenizer_dir, write_jsonl
from tests.conftest import assert_one_line_error, run_cli

pytest.importorskip("transformers")
SCRIPT = Path(sys.executable).parent / "softlabels"  # the console script of this environment


def softlabels(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          check=False)


@pytest.mark.slow
def test_generate_from_chat_jsonl_then_verify(tmp_path):
    tokenizer_dir(tmp_path / "tok", PLAIN)
    long = [{"role": "user", "content": "hello world " * 6}, {"role": "assistant", "content": "thank you " * 8}]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in [*CONVERSATIONS, long]])
    r = softlabels("generate", "--teacher", "gpt-tiny", "--random-teacher", "--data", "jsonl:chat.jsonl?messages=messages",
                   "--tokenizer", "tok", "--seq-len", 32, "--layout", "sampled", "--samples", 4, "--no-progress",
                   "--out", "s.zarr", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    v = softlabels("inspect", "--verify", "s.zarr", cwd=tmp_path)
    assert v.returncode == 0 and "all chunks verified" in v.stdout, v.stdout + v.stderr

    from softlabels.store.reader import UnitStore

    store = UnitStore(tmp_path / "s.zarr")
    try:
        source = store.meta.source
        data = resolve_documents(source["spec"], tokenizer=source["tokenizer"], seq_len=source["seq_len"])
        assert source["spec"] == f"jsonl:{tmp_path / 'chat.jsonl'}?messages=messages"  # absolute: resolves anywhere
        assert source["has_mask"] and source["num_samples"] == len(data) > len(CONVERSATIONS) + 1  # long is cut
        assert np.array_equal(store.positions.lengths, data.lengths())  # one stored sequence per window
        assert source["num_tokens"] == int(data.lengths().sum()) and max(data.lengths()) == 32
    finally:
        store.close()


BAD_ROWS = {  # rows of d.jsonl, the spec's option, and what the one line says
    "malformed message": ([{"messages": [{"role": "user", "text": "hi"}]}], "messages=messages", "line 1 of .*message 0 is"),
    "no assistant": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "gpt", "content": "yo"}]}],
                     "messages=messages", "line 1 of .*no message has the role 'assistant'"),
    "missing field": ([{"text": "a"}, {"body": "b"}], "field=text", "line 2 of '.*' has no 'text'"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_stop_generate_before_anything_is_written(tmp_path, case):
    rows, option, needle = BAD_ROWS[case]
    tok = tokenizer_dir(tmp_path / "tok", PLAIN)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r = run_cli("generate", "--teacher", "gpt-tiny", "--random-teacher", "--data", f"jsonl:{data}?{option}",
                "--tokenizer", str(tok), "--seq-len", "8", "--no-progress", "--out", str(tmp_path / "s.zarr"))
    assert_one_line_error(r)
    assert re.search(needle, r.output), r.output
    assert not (tmp_path / "s.zarr").exists()


def test_text_documents_through_generate(tmp_path):
    tok = tokenizer_dir(tmp_path / "tok", None)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in DOCUMENTS])
    r = run_cli("generate", "--teacher", "gpt-tiny", "--random-teacher", "--data", f"jsonl:{data}?field=text",
                "--tokenizer", str(tok / "tokenizer.json"), "--seq-len", "8", "--no-progress",
                "--out", str(tmp_path / "s.h5"))
    assert r.exit_code == 0, r.output
    from softlabels.store.reader import UnitStore

    store = UnitStore(tmp_path / "s.h5")
    try:
        assert not store.meta.source["has_mask"]
        want = resolve_documents(f"jsonl:{data}?field=text", tokenizer=tok, seq_len=8)
        assert store.meta.source["fingerprint"] == token_fingerprint(want)
        assert np.array_equal(store.positions.lengths, want.lengths())
    finally:
        store.close()


def test_eval_cuts_a_document_spec_with_the_run_s_window_length(tmp_path):
    tok = tokenizer_dir(tmp_path / "tok", PLAIN)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    spec = f"jsonl:{data}?messages=messages"
    r = run_cli("train", "--student", "gpt-tiny", "--data", spec, "--tokenizer", str(tok), "--seq-len", "7",
                "--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run"))
    assert r.exit_code == 0, r.output
    r = run_cli("eval", "--checkpoint", str(tmp_path / "run"), "--data", spec, "--json")
    assert r.exit_code == 0, r.output
    windows = resolve_documents(spec, tokenizer=tok, seq_len=7)
    batch = windows.get_batch(np.arange(len(windows)))
    counted = sum(int(batch.mask[i, 1:n].sum()) for i, n in enumerate(batch.lengths.tolist()))
    assert json.loads(r.stdout[r.stdout.index("{"):])["positions"] == counted  # windows of 7, assistant targets
