"""Documents as token data (softlabels.inputs.text): JSON Lines, Parquet and saved ``datasets``
directories, cut into windows that never cross a document; the tokenizer helpers beside them.

Windows are checked against the tokenizer's own ``encode`` of each document, cut by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from softlabels.errors import DataError, SpecError
from softlabels.inputs.spec import absolute_data_spec, data_spec_path
from softlabels.inputs.text import (
    absolute_document_spec,
    parse_document_spec,
    resolve_documents,
    resolve_token_data,
    teacher_tokenizer,
    window_documents,
)
from softlabels.inputs.tokens import token_fingerprint
from softlabels.inputs.vocabulary import tokenizer_fingerprint
from softlabels.student.lm_metrics import next_token_targets
from tests._chatdata import (
    DOCUMENTS,
    tokenizer_dir,
    train_tokenizer,
    write_jsonl,
    write_parquet,
)

pytest.importorskip("tokenizers")
SEQ = 5


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return tokenizer_dir(tmp_path_factory.mktemp("tok") / "tok")


def expected_windows(tok, texts: list[str], seq_len: int) -> tuple[list[list[int]], list[int]]:
    """Each document's ids from the tokenizer itself, cut by hand; and the document of each window."""
    windows, owners = [], []
    for d, text in enumerate(texts):
        ids = tok.encode(text).ids
        for k in range(0, len(ids), seq_len):
            windows.append(ids[k:k + seq_len])
            owners.append(d)
    return windows, owners


def windows_of(ds) -> list[list[int]]:
    batch = ds.get_batch(np.arange(len(ds)))
    return [batch.ids[i, :n].tolist() for i, n in enumerate(batch.lengths.tolist())]


def test_jsonl_documents_are_cut_into_windows_of_one_document_each(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "id": i} for i, t in enumerate(DOCUMENTS)])
    ds = resolve_token_data(f"jsonl:{data}?field=text", tokenizer=tok_dir / "tokenizer.json", seq_len=SEQ)
    want, owners = expected_windows(train_tokenizer(), DOCUMENTS, SEQ)
    assert windows_of(ds) == want
    assert ds.document_of.tolist() == owners  # the empty document (index 2) has no window
    assert 2 not in owners and len(want) > len(DOCUMENTS)
    assert not ds.has_mask and ds.vocab_size == train_tokenizer().get_vocab_size()


def test_no_next_token_target_crosses_a_document(tmp_path, tok_dir):
    """Every target is the next token of the same document: the last token of document A is never
    trained to predict document B's first token."""
    texts = ["hello world", "The quick brown fox", "thank you"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    tok = train_tokenizer()
    docs = [tok.encode(t).ids for t in texts]
    for seq_len in (1, 2, 3, 64):
        ds = resolve_documents(f"jsonl:{data}?field=text", tokenizer=tok_dir, seq_len=seq_len)
        batch = ds.get_batch(np.arange(len(ds)))
        targets, valid = next_token_targets(batch.ids, batch.mask, batch.lengths)
        start = {d: 0 for d in range(len(docs))}
        counted = 0
        for i, d in enumerate(ds.document_of.tolist()):
            for t in np.flatnonzero(valid[i].numpy()):
                p = start[d] + int(t)  # the position inside document d
                assert p + 1 < len(docs[d]) and int(targets[i, t]) == docs[d][p + 1], (seq_len, i, t)
                counted += 1
            start[d] += int(batch.lengths[i])
        assert start == {d: len(ids) for d, ids in enumerate(docs)}
        # every pair of neighbours inside a window is trained; none across windows or documents
        assert counted == sum(int(n) - 1 for n in batch.lengths)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=12).filter(any), st.integers(1, 9), st.booleans())
def test_windows_rebuild_each_document_and_never_mix_two(lengths, seq_len, flagged):
    rng = np.random.default_rng(sum(lengths) + seq_len)
    docs = [rng.integers(0, 50, n).astype(np.int32) for n in lengths]
    flags = [rng.random(n) < 0.5 for n in lengths]
    ds = window_documents(((d, f if flagged else None) for d, f in zip(docs, flags)), seq_len)
    batch = ds.get_batch(np.arange(len(ds)))
    got_ids = {d: [] for d in range(len(docs))}
    got_flags = {d: [] for d in range(len(docs))}
    for i, d in enumerate(ds.document_of.tolist()):
        n = int(batch.lengths[i])
        assert 1 <= n <= seq_len
        got_ids[d] += batch.ids[i, :n].tolist()
        got_flags[d] += batch.mask[i, :n].tolist()
    for d, doc in enumerate(docs):
        assert got_ids[d] == doc.tolist()
        assert got_flags[d] == (flags[d].tolist() if flagged else [True] * len(doc))
        assert list(ds.document_of).count(d) == -(-len(doc) // seq_len)  # only the last window is short
    assert ds.has_mask == flagged


def test_parquet_and_a_datasets_directory_give_the_jsonl_windows(tmp_path, tok_dir):
    datasets = pytest.importorskip("datasets")
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in DOCUMENTS])
    parquet = write_parquet(tmp_path / "d.parquet", {"text": DOCUMENTS, "n": list(range(len(DOCUMENTS)))})
    datasets.Dataset.from_dict({"text": DOCUMENTS}).save_to_disk(str(tmp_path / "one"))
    split = datasets.Dataset.from_dict({"text": DOCUMENTS[::-1]})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCUMENTS}), "test": split}).save_to_disk(
        str(tmp_path / "two"))
    specs = [f"jsonl:{jsonl}?field=text", f"parquet:{parquet}?field=text", f"hfds:{tmp_path / 'one'}?field=text",
             f"hfds:{tmp_path / 'two'}?field=text,split=train"]
    sets = [resolve_token_data(s, tokenizer=tok_dir, seq_len=SEQ) for s in specs]
    for ds in sets[1:]:
        assert windows_of(ds) == windows_of(sets[0])
        assert token_fingerprint(ds) == token_fingerprint(sets[0])  # the same tokens, whatever the file
    test = resolve_token_data(f"hfds:{tmp_path / 'two'}?field=text,split=test", tokenizer=tok_dir, seq_len=SEQ)
    assert windows_of(test) == expected_windows(train_tokenizer(), DOCUMENTS[::-1], SEQ)[0]


def test_documents_get_the_special_tokens_the_tokenizer_adds(tmp_path):
    tok = train_tokenizer(bos=True)
    tok.save(str(tmp_path / "bos.json"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"text": "thank you"}])
    ds = resolve_documents(f"jsonl:{data}?field=text", tokenizer=tmp_path / "bos.json", seq_len=64)
    bos = tok.token_to_id("<|endoftext|>")
    assert [w[0] for w in windows_of(ds)] == [bos, bos]
    assert windows_of(ds)[1][1:] == train_tokenizer().encode("thank you").ids


def test_spec_grammar_paths_and_absolute_recording(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = parse_document_spec("hfds:data dir?field=body,split=train")
    assert (s.kind, s.path, s.key, s.chat, s.split) == ("hfds", "data dir", "body", False, "train")
    assert parse_document_spec("jsonl:a?b.jsonl?messages=conv").path == "a?b.jsonl"  # the last '?' starts options
    assert absolute_document_spec("jsonl:c.jsonl?messages=m") == f"jsonl:{tmp_path / 'c.jsonl'}?messages=m"
    assert absolute_data_spec("parquet:d.parquet?field=t") == f"parquet:{tmp_path / 'd.parquet'}?field=t"
    assert data_spec_path("jsonl:c.jsonl?messages=m") == "c.jsonl"
    from softlabels.teacher.spec import recorded_spec

    assert recorded_spec("jsonl:/x/c.jsonl?field=t", kind="data", where="w", flag="--data")  # data, never code
    for bad, needle in [("jsonl:c.jsonl", "names no key"), ("jsonl:?field=t", "names no path"),
                        ("parquet:d.parquet?field=t,messages=m", "exactly one of"),
                        ("jsonl:c.jsonl?split=train", "unknown option 'split=train'"),
                        ("jsonl:c.jsonl?field=", "unknown option 'field='")]:
        with pytest.raises(SpecError, match=needle):
            parse_document_spec(bad)


def test_a_document_spec_needs_a_tokenizer_and_a_window(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="needs a tokenizer and a window length"):
        resolve_token_data(f"jsonl:{data}?field=text", tokenizer=tok_dir)
    with pytest.raises(DataError, match="seq_len must be an integer >= 1"):
        resolve_token_data(f"jsonl:{data}?field=text", tokenizer=tok_dir, seq_len=0)


def test_teacher_tokenizer_is_the_hf_directory_s_own(tmp_path, tok_dir):
    assert teacher_tokenizer(f"hf:{tok_dir}", "jsonl:c.jsonl?messages=m") == str(tok_dir)
    assert teacher_tokenizer(f"hf:{tok_dir}", "jsonl:c.jsonl?field=t") == str(tok_dir / "tokenizer.json")
    assert teacher_tokenizer(f"hf:{tok_dir}", "text:t.txt") == str(tok_dir / "tokenizer.json")
    assert teacher_tokenizer(f"hf:{tmp_path}") is None  # no tokenizer.json there
    assert teacher_tokenizer("gpt-tiny", "text:t.txt") is None


def test_tokenizer_fingerprint_is_the_vocabulary_not_the_file(tmp_path, tok_dir):
    transformers = pytest.importorskip("transformers")
    base = tokenizer_fingerprint(tok_dir / "tokenizer.json")
    doc = json.loads((tok_dir / "tokenizer.json").read_text())
    (tmp_path / "indented.json").write_text(json.dumps(doc, indent=4, sort_keys=True))
    assert tokenizer_fingerprint(tmp_path / "indented.json") == base
    assert tokenizer_fingerprint(tok_dir) == base == tokenizer_fingerprint(train_tokenizer())
    assert tokenizer_fingerprint(transformers.AutoTokenizer.from_pretrained(str(tok_dir))) == base

    renamed = json.loads(json.dumps(doc))
    token = next(t for t, i in renamed["model"]["vocab"].items() if i == 100)
    renamed["model"]["vocab"][token + "x"] = renamed["model"]["vocab"].pop(token)
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    assert tokenizer_fingerprint(tmp_path / "renamed.json") != base

    unspecial = json.loads(json.dumps(doc))
    unspecial["added_tokens"][1]["special"] = False
    (tmp_path / "unspecial.json").write_text(json.dumps(unspecial))
    assert tokenizer_fingerprint(tmp_path / "unspecial.json") != base


_TEXTS = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(_TEXTS, st.booleans(), st.integers(1, 6))
@example(["a\u2028b\rc\x85d\ne", "\ufeffhello"], False, 2)
def test_any_text_round_trips_through_json_lines(tmp_path_factory, texts, ascii_only, seq_len):
    """Line breaks of every kind inside a string (\\r, \\u2028, \\x85), raw or escaped, stay inside their record."""
    tmp = tmp_path_factory.mktemp("rt")
    tok = train_tokenizer()
    tok.save(str(tmp / "t.json"))
    path = tmp / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=ascii_only) + "\n" for t in texts), encoding="utf-8")
    if not any(tok.encode(t).ids for t in texts):
        with pytest.raises(DataError, match="holds no tokens"):
            resolve_documents(f"jsonl:{path}?field=text", tokenizer=tmp / "t.json", seq_len=seq_len)
        return
    ds = resolve_documents(f"jsonl:{path}?field=text", tokenizer=tmp / "t.json", seq_len=seq_len)
    assert windows_of(ds) == expected_windows(tok, texts, seq_len)[0]
