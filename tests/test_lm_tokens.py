"""Token data: packed, ragged and text specs against plain numpy references."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from softlabels.errors import DataError, SpecError
from softlabels.inputs.text import encode_text, resolve_token_data, train_bpe
from softlabels.inputs.tokens import (
    PackedTokens,
    RaggedTokens,
    offsets_of,
    pack_stream,
    token_fingerprint,
)

BIG_VOCAB = 200_000  # ids need 18 bits: nothing may squeeze them into 16


def reference_batch(seqs: list[np.ndarray], masks: list[np.ndarray], idx: np.ndarray):
    """Right-padded ids, mask and lengths of ``idx``, built with a plain loop."""
    width = max(len(seqs[i]) for i in idx)
    ids = np.zeros((len(idx), width), np.int64)
    mask = np.zeros((len(idx), width), bool)
    for row, i in enumerate(idx):
        ids[row, :len(seqs[i])] = seqs[i]
        mask[row, :len(seqs[i])] = masks[i]
    return ids, mask, np.array([len(seqs[i]) for i in idx])


def assert_batch(ds, seqs, masks, idx) -> None:
    batch = ds.get_batch(idx)
    ids, mask, lengths = reference_batch(seqs, masks, idx)
    assert batch.ids.dtype == torch.int64 and batch.mask.dtype == torch.bool
    np.testing.assert_array_equal(batch.ids.numpy(), ids)
    np.testing.assert_array_equal(batch.mask.numpy(), mask)
    np.testing.assert_array_equal(batch.lengths.numpy(), lengths)
    np.testing.assert_array_equal(batch.valid.numpy(), np.arange(ids.shape[1]) < lengths[:, None])


def write_ragged(path, seqs, masks=None, dtype=np.int32) -> str:
    arrays = {"tokens": np.concatenate(seqs).astype(dtype), "offsets": offsets_of(np.array([len(s) for s in seqs]))}
    if masks is not None:
        arrays["mask"] = np.concatenate(masks)
    chunks = {name: (max(1, min(len(a), 64 if len(a) < 5000 else 16384)),) for name, a in arrays.items()}
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    elif path.suffix == ".h5":
        with h5py.File(path, "w") as f:
            for name, a in arrays.items():
                f.create_dataset(name, data=a, chunks=chunks[name])
    else:
        g = zarr.open_group(str(path), mode="w")
        for name, a in arrays.items():
            g.create_array(name, data=a, chunks=chunks[name])
    return str(path)


@st.composite
def ragged_data(draw):
    n = draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, BIG_VOCAB, k) for k in lengths]
    masks = [rng.random(k) < 0.7 for k in lengths]
    idx = rng.integers(0, n, draw(st.integers(1, 2 * n)))
    return seqs, masks, idx


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".zarr"])
@settings(max_examples=15, deadline=None)
@given(data=ragged_data())
def test_ragged_round_trip(tmp_path_factory, suffix, data):
    seqs, masks, idx = data
    path = write_ragged(tmp_path_factory.mktemp("r") / f"t{suffix}", seqs, masks)
    ds = resolve_token_data(path)
    assert isinstance(ds, RaggedTokens) and ds.has_mask and len(ds) == len(seqs)
    np.testing.assert_array_equal(ds.lengths(), [len(s) for s in seqs])
    assert_batch(ds, seqs, masks, idx)
    ids, mask = ds[len(seqs) - 1]
    np.testing.assert_array_equal(ids.numpy(), seqs[-1])
    np.testing.assert_array_equal(mask.numpy(), masks[-1])


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 9), length=st.integers(1, 30), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["npy", "npz", "h5"]))
def test_packed_round_trip(tmp_path_factory, n, length, seed, kind):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, BIG_VOCAB, (n, length)).astype(np.int64)
    mask = rng.random((n, length)) < 0.5
    d = tmp_path_factory.mktemp("p")
    masked = kind != "npy"
    if kind == "npz":
        np.savez(d / "t.npz", tokens=tokens, mask=mask)
        ds = resolve_token_data(str(d / "t.npz"))
    elif kind == "h5":
        with h5py.File(d / "t.h5", "w") as f:
            f.create_dataset("tokens", data=tokens.astype(np.uint32), chunks=(1, length))
            f.create_dataset("mask", data=mask.astype(np.uint8), chunks=(1, length))
        ds = resolve_token_data(str(d / "t.h5"))
    else:
        np.save(d / "t.npy", tokens)
        ds, mask = resolve_token_data(str(d / "t.npy")), np.ones_like(mask)
    assert isinstance(ds, PackedTokens) and ds.has_mask == masked
    np.testing.assert_array_equal(ds.lengths(), np.full(n, length))
    idx = rng.integers(0, n, 2 * n)
    assert_batch(ds, list(tokens), list(mask), idx)


def test_length_one_and_very_long_sequences(tmp_path):
    rng = np.random.default_rng(1)
    lengths = [1, 1, 300_000, 1, 5]
    seqs = [rng.integers(0, BIG_VOCAB, k) for k in lengths]
    masks = [rng.random(k) < 0.5 for k in lengths]
    for suffix in (".h5", ".zarr"):
        ds = resolve_token_data(write_ragged(tmp_path / f"long{suffix}", seqs, masks))
        for idx in ([0], [1, 3], [2], [4, 2, 0], [3, 3, 3]):
            assert_batch(ds, seqs, masks, np.array(idx))


def test_sparse_and_dense_reads_agree(tmp_path):
    """A few sequences far apart are read one by one, many together from one slab: same result."""
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, 1000, rng.integers(1, 20)) for _ in range(400)]
    masks = [np.ones(len(s), bool) for s in seqs]
    ds = resolve_token_data(write_ragged(tmp_path / "t.h5", seqs))
    assert_batch(ds, seqs, masks, np.array([399, 0, 200]))  # sparse: 3 spans of a wide hull
    assert_batch(ds, seqs, masks, np.arange(400)[::-1])  # dense: one slab


def test_wide_ids_stay_exact(tmp_path):
    ids = np.array([0, 65_535, 65_536, 131_071, 131_072, 2**31 - 1], dtype=np.int64)
    np.save(tmp_path / "t.npy", ids[None, :])
    batch = resolve_token_data(str(tmp_path / "t.npy")).get_batch(np.array([0]))
    assert batch.ids.dtype == torch.int64
    np.testing.assert_array_equal(batch.ids.numpy()[0], ids)


def test_stream_is_cut_into_windows(tmp_path):
    stream = np.arange(23, dtype=np.uint32)
    np.save(tmp_path / "s.npy", stream)
    ds = resolve_token_data(str(tmp_path / "s.npy"), seq_len=5)
    np.testing.assert_array_equal(ds.lengths(), [5, 5, 5, 5, 3])
    batch = ds.get_batch(np.arange(len(ds)))
    np.testing.assert_array_equal(batch.ids.numpy()[batch.valid.numpy()], stream)
    assert ds.get_batch(np.array([], np.int64)).ids.shape == (0, 0)
    with pytest.raises(DataError, match="pass --seq-len"):
        resolve_token_data(str(tmp_path / "s.npy"))
    mask = np.arange(23) % 3 == 0
    np.savez(tmp_path / "m.npz", tokens=stream, mask=mask)  # a masked stream: the mask is cut alike
    batch = resolve_token_data(str(tmp_path / "m.npz"), seq_len=5).get_batch(np.arange(5))
    np.testing.assert_array_equal(batch.mask.numpy()[batch.valid.numpy()], mask)


def _windows(seqs: list[np.ndarray], s: int) -> list[np.ndarray]:
    """Each sequence cut into windows of at most ``s``, by a plain loop: no window crosses two sequences."""
    return [seq[i:i + s] for seq in seqs for i in range(0, len(seq), s)]


@pytest.mark.parametrize("kind", [".npy", ".npz", ".h5", ".zarr"])
def test_seq_len_rewindows_packed_rows_never_across_rows(tmp_path, kind):
    """A packed [N, L] file with --seq-len: L is the rows as they are; another S cuts each row (a document)."""
    rng = np.random.default_rng(7)
    rows = rng.integers(0, 1000, (6, 10)).astype(np.int32)
    mask = rng.random((6, 10)) < 0.7
    path = str(tmp_path / f"p{kind}")
    if kind == ".npy":
        np.save(path, rows)
        mask = np.ones_like(mask)
    elif kind == ".npz":
        np.savez(path, tokens=rows, mask=mask)
    elif kind == ".h5":
        with h5py.File(path, "w") as f:
            f["tokens"], f["mask"] = rows, mask
    else:
        g = zarr.open_group(path, mode="w")
        g.create_array("tokens", data=rows)
        g.create_array("mask", data=mask)
    whole = resolve_token_data(path)
    same = resolve_token_data(path, seq_len=10)
    assert token_fingerprint(same) == token_fingerprint(whole)
    for s in (10, 5, 4, 3, 1, 16):
        ds = resolve_token_data(path, seq_len=s)
        want = _windows(list(rows), s)
        want_mask = _windows(list(mask), s)
        np.testing.assert_array_equal(ds.lengths(), [len(w) for w in want])
        order = rng.permutation(len(ds))
        batch = ds.get_batch(order)
        for b, i in enumerate(order):
            n = len(want[i])
            np.testing.assert_array_equal(batch.ids.numpy()[b, :n], want[i])
            np.testing.assert_array_equal(batch.mask.numpy()[b, :n], want_mask[i])
        assert pickle.loads(pickle.dumps(ds)).get_batch(order[:3]).ids.equal(batch.ids[:3])


def test_seq_len_rewindows_ragged_sequences(tmp_path):
    seqs = [np.arange(7), np.arange(100, 102), np.arange(200, 209)]
    np.savez(tmp_path / "r.npz", tokens=np.concatenate(seqs), offsets=offsets_of(np.array([7, 2, 9])))
    ds = resolve_token_data(str(tmp_path / "r.npz"), seq_len=4)
    want = _windows(seqs, 4)
    np.testing.assert_array_equal(ds.lengths(), [4, 3, 2, 4, 4, 1])
    batch = ds.get_batch(np.arange(len(ds)))
    for i, w in enumerate(want):
        np.testing.assert_array_equal(batch.ids.numpy()[i, :len(w)], w)


TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "Über naïve café — ✓ done.\n"


def test_text_spec_tokenizes_and_packs(tmp_path):
    tok = train_bpe(TEXT, 300, min_frequency=1)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    ds = resolve_token_data(f"text:{tmp_path / 'a.txt'}", tokenizer=tmp_path / "tokenizer.json", seq_len=16)
    expected = np.array(tok.encode(TEXT).ids)
    assert ds.vocab_size == tok.get_vocab_size() and not ds.has_mask
    assert (ds.lengths()[:-1] == 16).all() and ds.lengths().sum() == expected.size
    batch = ds.get_batch(np.arange(len(ds)))
    np.testing.assert_array_equal(batch.ids.numpy()[batch.valid.numpy()], expected)
    assert tok.decode(expected.tolist()) == TEXT  # byte-level BPE: lossless
    np.save(tmp_path / "ids.npy", expected[None, :])
    assert resolve_token_data(str(tmp_path / "ids.npy"), tokenizer=tmp_path / "tokenizer.json").vocab_size == 300


def test_bpe_training_is_deterministic():
    assert train_bpe(TEXT, 300).to_str() == train_bpe(TEXT, 300).to_str()
    tok = train_bpe(TEXT, 300)
    assert tok.token_to_id("<|endoftext|>") == 0
    assert encode_text("", tok).size == 0


def test_fingerprint_is_content_sensitive(tmp_path):
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 500, k) for k in (3, 1, 7, 2)]
    a = token_fingerprint(resolve_token_data(write_ragged(tmp_path / "a.npz", seqs)))
    assert a == token_fingerprint(resolve_token_data(write_ragged(tmp_path / "a.h5", seqs)))  # format-blind
    assert a.startswith("sha256:")
    changed = [s.copy() for s in seqs]
    changed[2][4] += 1
    assert a != token_fingerprint(resolve_token_data(write_ragged(tmp_path / "b.npz", changed)))
    resplit = [seqs[0], seqs[1], seqs[2][:3], np.concatenate([seqs[2][3:], seqs[3]])]  # same stream
    assert a != token_fingerprint(resolve_token_data(write_ragged(tmp_path / "c.npz", resplit)))
    masked = [np.ones(len(s), bool) for s in seqs]
    masked[0][0] = False
    assert a != token_fingerprint(resolve_token_data(write_ragged(tmp_path / "d.npz", seqs, masked)))


def test_lengths_need_no_token_reads_and_datasets_pickle(tmp_path):
    seqs = [np.arange(k) for k in (4, 9, 1)]
    ds = resolve_token_data(write_ragged(tmp_path / "t.h5", seqs))
    np.testing.assert_array_equal(ds.lengths(), [4, 9, 1])
    assert ds._tokens._array is None  # no handle opened for the tokens
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy[1][0].numpy(), seqs[1])
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork")
    assert [len(ids) for ids, _ in loader] == [4, 9, 1]


def test_bad_token_data(tmp_path):
    def npz(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        return str(tmp_path / name)

    cases = {
        npz("a.npz", tokens=np.arange(5), offsets=np.array([0, 2, 4])): "offsets of",
        npz("b.npz", tokens=np.arange(5), offsets=np.array([0, 3, 2, 5])): "offsets of",
        npz("c.npz", tokens=np.arange(5), offsets=np.array([0, 2, 2, 5])): "sequence 1 of",
        npz("d.npz", tokens=np.arange(5), offsets=np.array([0, 5]), mask=np.ones(4, bool)): "mask of",
        npz("e.npz", tokens=np.zeros((2, 3)), offsets=np.array([0, 3, 6])): "with offsets, store the token ids flat",
        npz("f.npz", tokens=np.zeros((2, 3), np.float32)): "store integer token ids",
        npz("g.npz", ids=np.zeros((2, 3), np.int64)): "no array 'tokens'",
        str(tmp_path / "missing.npy"): "does not exist",
    }
    for spec, needle in cases.items():
        with pytest.raises(DataError, match=needle):
            resolve_token_data(spec)
    ds = resolve_token_data(npz("h.npz", tokens=np.array([[1, -3, 2]])))
    with pytest.raises(DataError, match="negative token id -3"):
        ds.get_batch(np.array([0]))
    with pytest.raises(SpecError, match="unknown token data"):
        resolve_token_data("nothing-here")
    with pytest.raises(DataError, match="needs a tokenizer"):
        resolve_token_data("text:whatever.txt")
    with pytest.raises(DataError, match="seq_len must be"):
        pack_stream(np.arange(4), 0)
    with pytest.raises(IndexError):
        ds.get_batch(np.array([1]))


# -- tokenizers that load but cannot encode (issue 20, case 10) ---------------------------------------
def _wordlevel_without_unk(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"the": 0, "a": 1}, unk_token="[UNK]"))  # [UNK] is not in the vocabulary
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _normalizer_beyond_the_regex_engine(path):
    from tokenizers import Regex, Tokenizer, models, normalizers

    tok = Tokenizer(models.WordLevel({"x": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Replace(Regex("(a+)+$"), "x")  # backtracks past Oniguruma's retry limit
    tok.save(str(path))


@pytest.mark.parametrize(("make", "text", "reason"), [
    (_wordlevel_without_unk, "the cat sat on a mat", "WordLevel error: Missing [UNK] token"),
    (_normalizer_beyond_the_regex_engine, "a" * 5000 + "b", "retry-limit-in-match"),
])
def test_a_tokenizer_that_fails_to_encode_is_one_line(tmp_path, make, text, reason):
    """The WordLevel error (an Exception) and the regex engine's PanicException (a BaseException, with
    a Rust panic message written straight to fd 2) both end as one error line naming the file, exit 2."""
    pytest.importorskip("tokenizers")
    make(tmp_path / "tok.json")
    (tmp_path / "t.txt").write_text(text)
    with pytest.raises(DataError, match=rf"tokenizer '.*tok.json' cannot encode text file '.*t.txt' \(.*{re.escape(reason)}"):
        resolve_token_data(f"text:{tmp_path / 't.txt'}", tokenizer=tmp_path / "tok.json", seq_len=4)
    p = subprocess.run([sys.executable, "-m", "softlabels", "generate", "--teacher", "gpt-tiny", "--random-teacher",
                        "--data", f"text:{tmp_path / 't.txt'}", "--tokenizer", str(tmp_path / "tok.json"),
                        "--seq-len", "4", "--out", str(tmp_path / "s.h5"), "--no-progress"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "RUST_BACKTRACE": "1"})
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"error: tokenizer '{tmp_path / 'tok.json'}' cannot encode") and reason in p.stderr
    assert not (tmp_path / "s.h5").exists()


def test_encoding_keeps_other_output_on_stderr(capfd):
    """What a tokenizer writes to fd 2 while encoding well is passed on, not swallowed."""
    tok = train_bpe("some text to learn from", 260)
    os.write(2, b"before\n")
    assert encode_text("some text", tok).size > 0
    assert capfd.readouterr().err == "before\n"
