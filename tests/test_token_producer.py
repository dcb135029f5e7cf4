"""The token producer (softlabels.teacher.tokens): stored values against the teacher's direct logits.

Stores are written with the minimal loop the job runner performs
(``UnitWriter.create``; ``write(start, **arrays)`` for every piece of ``batches``;
``finish``) and read back with plain h5py/zarr through ``offsets``/``lengths``. The
references are computed independently: the teacher called on one sequence at a time
(or on the same batch), then ``layout.encode`` of its logits per real position.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from softlabels.errors import ConfigError
from softlabels.inputs.tokens import RaggedTokens, TokenDataset, offsets_of
from softlabels.store.layouts import make_layout, to_numpy
from softlabels.store.reader import UnitStore
from softlabels.store.writer import UnitWriter
from softlabels.teacher.config import GenerateConfig
from softlabels.teacher.lm import CausalLM, resolve_lm
from softlabels.teacher.tokens import (
    TokenProducer,
    default_chunk_samples,
    is_token_job,
    token_producer,
)

LAYOUTS = {"dense": {}, "topk": {"k": 5}, "sampled": {"samples": 12, "seed": 3}}
LENGTHS = np.array([1, 7, 1, 130, 3, 1, 64, 2, 9, 1, 33])  # 1-token and long (>> 4-position chunks) samples


class Lookup(nn.Module):
    """A causal teacher whose logits at token t are ``table[ids[t] % rows] + bias[t]``: exact whatever the batch."""

    def __init__(self, vocab: int, rows: int = 7, seed: int = 0, hot: tuple[int, ...] = ()) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(rows, vocab, generator=g) * 3
        for i, cls in enumerate(hot):  # make some classes likely (ids above 65,536 in the wide test)
            table[i % rows, cls] += 12.0
        self.table = nn.Parameter(table)
        self.bias = nn.Parameter(torch.randn(512, 1, generator=g))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids % len(self.table)] + self.bias[: ids.shape[1]]


class WithEmpty(TokenDataset):
    """Ragged data that, unlike the data specs, holds empty samples (the format allows them)."""

    def __init__(self, lengths: np.ndarray, vocab: int, seed: int = 0) -> None:
        self._lengths = np.asarray(lengths, np.int64)
        self._off = offsets_of(self._lengths)
        self._tokens = np.random.default_rng(seed).integers(0, vocab, int(self._lengths.sum()))

    def lengths(self) -> np.ndarray:
        return self._lengths

    def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.concatenate([self._tokens[self._off[i]:self._off[i + 1]] for i in indices] or [np.empty(0, int)])
        return ids.astype(np.int64), np.ones(ids.size, bool)


def ragged(lengths: np.ndarray, vocab: int, seed: int = 0) -> RaggedTokens:
    tokens = np.random.default_rng(seed).integers(0, vocab, int(np.sum(lengths)))
    return RaggedTokens(tokens, offsets_of(np.asarray(lengths)))


def write(producer: TokenProducer, path: Path, spans: list[tuple[int, int]] | None = None) -> Path:
    """The runner's loop, minimal: create, write every piece, finish."""
    w = UnitWriter.create(path, producer.meta(), lengths=producer.lengths())
    for start, arrays in producer.batches(spans or [(0, len(producer.lengths()))]):
        w.write(start, **arrays)
    w.finish()
    w.close()
    return path


def plain(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    if path.suffix == ".zarr":
        g = zarr.open_group(str(path), mode="r")
        return {k: a[...] for k, a in g.arrays()}, dict(g.attrs)
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in f}, dict(f.attrs)


def encode_direct(teacher: nn.Module, layout, ids: np.ndarray, sample: int) -> dict[str, np.ndarray]:
    """The reference: the teacher on this one sequence, every position encoded."""
    with torch.inference_mode():
        logits = teacher(torch.as_tensor(ids, dtype=torch.int64)[None])[0]
        enc = layout.encode(logits, sample_ids=torch.full((len(ids),), sample), positions=torch.arange(len(ids)))
    return {k: to_numpy(v) for k, v in enc.items()}


@pytest.mark.parametrize("backend", ["h5", "zarr"])
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stored_equal_direct_encoding(tmp_path, backend, name, dtype):
    vocab = 40
    data, teacher = ragged(LENGTHS, vocab), Lookup(vocab)
    layout = make_layout(name, num_classes=vocab, logits_dtype=dtype, **LAYOUTS[name])
    p = TokenProducer(data, teacher, layout, batch_size=3, chunk_samples=2, chunk_positions=4)
    arrays, attrs = plain(write(p, tmp_path / f"s.{backend}"))
    assert attrs["status"] == "complete" and attrs["positions"] == "tokens" and attrs["layout"] == name
    np.testing.assert_array_equal(arrays["lengths"], LENGTHS)
    assert (arrays["offsets"][1:] >= arrays["offsets"][:-1] + np.r_[LENGTHS]).all()
    np.testing.assert_array_equal(arrays["sample_ids"], np.arange(len(LENGTHS)))
    np.testing.assert_array_equal(arrays["labels"], -1)
    for i, n in enumerate(LENGTHS):
        start = int(arrays["offsets"][i])
        want = encode_direct(teacher, layout, data.get_batch(np.array([i])).ids[0].numpy(), i)
        for key, value in want.items():
            np.testing.assert_array_equal(arrays[key][start:start + n], value, err_msg=f"{key} of sample {i}")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gpt_teacher_equals_its_batch_logits(tmp_path, name):
    """A real GPT (whose float rounding may depend on the batch): stored = encode of the same call's logits."""
    vocab = 64
    data = ragged(LENGTHS, vocab, seed=1)
    info = resolve_lm("gpt-tiny", vocab_size=vocab, context=int(LENGTHS.max()), seed=0)
    layout = make_layout(name, num_classes=vocab, **LAYOUTS[name])
    p = TokenProducer(data, info.module, layout, batch_size=4, chunk_samples=4, chunk_positions=8)
    with UnitStore(write(p, tmp_path / "s.h5")) as store:
        got = {u: store.read_unit(u) for u in range(store.num_units)}
    rows = {k: np.concatenate([b[k] for b in got.values()]) for k in layout.arrays()}
    want: dict[str, list[np.ndarray]] = {k: [] for k in layout.arrays()}
    for lo in range(0, len(LENGTHS), 4):
        idx = np.arange(lo, min(lo + 4, len(LENGTHS)))
        batch = data.get_batch(idx)
        with torch.inference_mode():
            z = info.module(batch.ids)
            valid = batch.valid
            sid = torch.as_tensor(idx)[:, None].expand_as(valid)[valid]
            t = torch.arange(valid.shape[1]).expand_as(valid)[valid]
            enc = layout.encode(z[valid], sample_ids=sid, positions=t)
        for k, v in enc.items():
            want[k].append(to_numpy(v))
    for k in layout.arrays():
        np.testing.assert_array_equal(rows[k], np.concatenate(want[k]), err_msg=k)


def test_autocast_bf16_stores_the_autocast_logits(tmp_path):
    vocab = 48
    data = ragged(LENGTHS[:6], vocab, seed=2)
    info = resolve_lm("gpt-tiny", vocab_size=vocab, context=int(LENGTHS.max()), seed=1)
    layout = make_layout("topk", num_classes=vocab, logits_dtype="bfloat16", k=4)
    p = TokenProducer(data, info.module, layout, amp="bf16", batch_size=6, chunk_samples=8, chunk_positions=8)
    arrays, _ = plain(write(p, tmp_path / "s.zarr"))
    batch = data.get_batch(np.arange(6))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = info.module(batch.ids)
    assert z.dtype == torch.bfloat16
    valid = batch.valid
    enc = layout.encode(z[valid], sample_ids=torch.arange(6)[:, None].expand_as(valid)[valid],
                        positions=torch.arange(valid.shape[1]).expand_as(valid)[valid])
    n = int(LENGTHS[:6].sum())
    for k, v in enc.items():
        np.testing.assert_array_equal(arrays[k][:n], to_numpy(v), err_msg=k)


@pytest.mark.parametrize("backend", ["h5", "zarr"])
def test_same_bytes_whatever_the_batches_and_unit_order(tmp_path, backend):
    """Sampled draws depend on (seed, sample, token, draw), never on the batch: other batch sizes,
    spans in reverse unit order (a resume, another rank) and one-sample calls write the same bytes."""
    vocab = 30
    data, teacher = ragged(LENGTHS, vocab, seed=4), Lookup(vocab, seed=5)
    layout = make_layout("sampled", num_classes=vocab, samples=12, seed=11)
    stores = []
    for i, (batch, spans) in enumerate([(5, None), (1, None), (2, [(8, 11), (4, 8), (0, 4)]),
                                        (3, [(10, 11), (2, 3), (5, 8), (0, 2), (3, 5), (8, 10)])]):
        p = TokenProducer(data, teacher, layout, batch_size=batch, chunk_samples=2, chunk_positions=4,
                          max_tokens=None if i != 3 else 40)
        stores.append(plain(write(p, tmp_path / f"s{i}.{backend}", spans))[0])
    for other in stores[1:]:
        assert other.keys() == stores[0].keys()
        for k in stores[0]:
            np.testing.assert_array_equal(other[k], stores[0][k], err_msg=k)


def test_vocabulary_above_65536_uses_wide_ids(tmp_path):
    vocab = 70_001
    hot = (65_536, 70_000, 66_000, 3)
    data, teacher = ragged([1, 5, 12, 2], vocab, seed=6), Lookup(vocab, rows=3, hot=hot)
    for name, params in (("topk", {"k": 3}), ("sampled", {"samples": 12, "seed": 0})):
        layout = make_layout(name, num_classes=vocab, logits_dtype="float16", **params)
        p = TokenProducer(data, teacher, layout, batch_size=2, chunk_samples=2, chunk_positions=4)
        path = write(p, tmp_path / f"{name}.h5")
        arrays, _ = plain(path)
        key = "topk_indices" if name == "topk" else "sampled_ids"
        assert arrays[key].dtype == np.uint8 and arrays[key].shape[-1] == 3  # 3-byte ids, no 16-bit cap
        with UnitStore(path) as store:
            ids = torch.cat([layout.decode(store.read_unit(u)).ids.flatten() for u in range(store.num_units)])
        assert int(ids.max()) >= 65_536
        for i in range(4):
            start, n = int(arrays["offsets"][i]), int(arrays["lengths"][i])
            want = encode_direct(teacher, layout, data.get_batch(np.array([i])).ids[0].numpy(), i)
            for k, v in want.items():
                np.testing.assert_array_equal(arrays[k][start:start + n], v, err_msg=f"{name} {k} of {i}")


def test_empty_samples_take_no_positions(tmp_path):
    lengths = np.array([0, 3, 0, 0, 1, 6, 0])
    data, teacher = WithEmpty(lengths, 20), Lookup(20)
    layout = make_layout("topk", num_classes=20, k=2)
    p = TokenProducer(data, teacher, layout, batch_size=2, chunk_samples=2, chunk_positions=2)
    path = write(p, tmp_path / "s.zarr", [(2, 4), (0, 2), (4, 7)])
    arrays, attrs = plain(path)
    assert attrs["tokens"]["num_positions"] == 10
    for i in np.flatnonzero(lengths):
        start = int(arrays["offsets"][i])
        want = encode_direct(teacher, layout, data.get_batch(np.array([i])).ids[0].numpy(), int(i))
        for k, v in want.items():
            np.testing.assert_array_equal(arrays[k][start:start + lengths[i]], v)
    with UnitStore(path) as store:
        assert store.verify() == []


def test_max_tokens_cuts_calls_without_changing_the_store(tmp_path):
    data, teacher = ragged(LENGTHS, 16), Lookup(16)
    layout = make_layout("dense", num_classes=16)
    p = TokenProducer(data, teacher, layout, batch_size=8, max_tokens=64, chunk_samples=4, chunk_positions=8)
    calls = list(p.calls(0, len(LENGTHS)))
    assert calls[0][0] == 0 and calls[-1][1] == len(LENGTHS)
    assert all(a[1] == b[0] for a, b in zip(calls, calls[1:]))
    for lo, hi in calls:  # within the budget, or a single sequence longer than it
        assert hi - lo == 1 or LENGTHS[lo:hi].max() * (hi - lo) <= 64
    q = TokenProducer(data, teacher, layout, batch_size=8, chunk_samples=4, chunk_positions=8)
    a, b = plain(write(p, tmp_path / "a.h5"))[0], plain(write(q, tmp_path / "b.h5"))[0]
    np.testing.assert_array_equal(a["logits"], b["logits"])


def test_default_geometry_keeps_padding_small():
    lengths = np.full(1000, 100)
    cs = default_chunk_samples(lengths, 1024)
    assert cs & (cs - 1) == 0 and cs * 100 >= 16 * 1024
    layout = make_layout("sampled", num_classes=128_000, logits_dtype="bfloat16", samples=12)
    p = TokenProducer(ragged(lengths, 50), CausalLM(Lookup(50), "t"), layout)
    meta = p.meta()
    assert meta.tokens["axis_length"] - meta.tokens["num_positions"] <= 0.07 * meta.tokens["num_positions"]


# -- generate's entry -------------------------------------------------------------------------------
def _npz(tmp_path: Path, lengths, vocab: int, mask: bool = False) -> Path:
    tokens = np.random.default_rng(0).integers(0, vocab, int(np.sum(lengths))).astype(np.int32)
    extra = {"mask": np.random.default_rng(1).random(tokens.size) < 0.7} if mask else {}
    np.savez(tmp_path / "tok.npz", tokens=tokens, offsets=offsets_of(np.asarray(lengths)), **extra)
    return tmp_path / "tok.npz"


def test_token_producer_from_generate_config(tmp_path):
    data = _npz(tmp_path, [4, 1, 20, 7, 3], 50, mask=True)
    cfg = GenerateConfig(teacher="gpt-tiny", data=str(data), out=tmp_path / "t.zarr", random_teacher=True, seed=2,
                         layout="sampled", samples=12, num_classes=50, batch_size=2, chunk_rows=2)
    assert is_token_job(cfg)
    p = token_producer(cfg)
    meta = p.meta()
    assert meta.layout_params == {"samples": 12, "seed": 2} and meta.num_classes == 50
    assert meta.source["has_mask"] and meta.source["num_tokens"] == 35
    assert meta.source["fingerprint"].startswith("sha256:")
    assert meta.teacher["spec"] == "gpt-tiny" and meta.teacher["seed"] == 2
    np.testing.assert_array_equal(p.lengths(), [4, 1, 20, 7, 3])
    with UnitStore(write(p, cfg.out)) as store:
        assert store.verify() == [] and store.meta.teacher == meta.teacher
    again = token_producer(cfg).meta()  # what a resume compares
    assert again == meta


def test_token_producer_refusals(tmp_path):
    data = str(_npz(tmp_path, [3, 2], 10))
    base = dict(teacher="gpt-tiny", data=data, out=tmp_path / "t.h5", num_classes=10)
    with pytest.raises(ConfigError) as err:  # E1800: the message docs/ERRORS.md quotes
        token_producer(GenerateConfig(**base))
    assert str(err.value) == ("--teacher gpt-tiny is an architecture without --weights, so it would label the tokens "
                              "with random weights; pass --weights FILE, or --random-teacher (for tests)")
    assert GenerateConfig(**base, layout="dense", seq_len=0).problems() == ["--seq-len must be >= 1, got 0"]


def test_is_token_job(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.zeros((3, 2), np.float32), y=np.zeros(3, np.int64))
    data = _npz(tmp_path, [2, 2], 5)
    job = lambda **kw: GenerateConfig(**{"teacher": "m:f", "data": str(data), "out": tmp_path / "o.h5", **kw})
    assert is_token_job(job()) and is_token_job(job(data="text:a.txt")) and is_token_job(job(teacher="gpt-tiny"))
    assert not is_token_job(job(data=str(tmp_path / "x.npz"))) and not is_token_job(job(data="digits:train"))
    assert is_token_job(job(data="digits:train", seq_len=8))


def _pieces(spans, batch):
    """The runner's cut: spans of whole units, cut into batch-size pieces that may cross units."""
    out = []
    for lo, hi in spans:
        out += [(a, min(a + batch, hi)) for a in range(lo, hi, batch)]
    return out


@pytest.mark.parametrize("backend", ["h5", "zarr"])
def test_resume_and_ranks_bit_identical_with_a_batch_sensitive_teacher(tmp_path, backend):
    """The built-in GPT's CPU rounding depends on the batch's shape; calls fixed per unit make a
    store written in pieces (kill after some units, resume; or two ranks' unit groups) equal one run."""
    vocab = 96
    data = ragged(LENGTHS, vocab, seed=7)
    info = resolve_lm("gpt-small", vocab_size=vocab, context=int(LENGTHS.max()), seed=3)
    layout = make_layout("sampled", num_classes=vocab, samples=12, seed=1)
    p = TokenProducer(data, info.module, layout, batch_size=3, chunk_samples=4, chunk_positions=8)
    n = len(LENGTHS)  # units [0, 4), [4, 8), [8, 11)
    one = plain(write(p, tmp_path / f"one.{backend}", _pieces([(0, n)], 3)))[0]
    path = tmp_path / f"resumed.{backend}"
    w = UnitWriter.create(path, p.meta(), lengths=p.lengths())
    for start, arrays in p.batches(_pieces([(4, 11)], 3)):  # units 1 and 2, then "killed"
        w.write(start, **arrays)
    w.close()
    w = UnitWriter.resume(path, expect=p.meta())
    assert w.missing_units() == [0]
    for start, arrays in p.batches(_pieces([(0, 4)], 3)):
        w.write(start, **arrays)
    w.finish()
    w.close()
    resumed = plain(path)[0]
    for k in one:
        np.testing.assert_array_equal(resumed[k], one[k], err_msg=k)


def test_pieces_stay_inside_their_spans():
    data, teacher = ragged(LENGTHS, 16), Lookup(16)
    p = TokenProducer(data, teacher, make_layout("topk", num_classes=16, k=2), batch_size=4, chunk_samples=4,
                      chunk_positions=4)
    spans = [(0, 3), (3, 6), (6, 9), (10, 11)]
    pieces = [(s, len(a["sample_ids"]), len(a["logsumexp"])) for s, a in p.batches(spans)]
    assert [s for s, _, _ in pieces] == [0, 3, 4, 6, 8, 10]  # calls [0,4) [4,8) [8,9) [10,11), cut at span ends
    for start, n, rows in pieces:
        assert rows == LENGTHS[start:start + n].sum()
        assert any(lo <= start and start + n <= hi for lo, hi in spans)


def test_text_data_with_a_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    from softlabels.inputs.text import train_bpe

    text = "the quick brown fox jumps over the lazy dog. " * 40
    train_bpe(text, 300, min_frequency=1).save(str(tmp_path / "tok.json"))
    (tmp_path / "a.txt").write_text(text)
    cfg = GenerateConfig(teacher="gpt-tiny", data=f"text:{tmp_path / 'a.txt'}", out=tmp_path / "t.h5",
                         random_teacher=True, tokenizer=str(tmp_path / "tok.json"), seq_len=16,
                         layout="topk", topk=4, batch_size=4)
    assert is_token_job(cfg)
    p = token_producer(cfg)
    meta = p.meta()
    lengths = p.lengths()
    assert (lengths[:-1] == 16).all() and 1 <= lengths[-1] <= 16
    assert meta.num_classes == p.data.vocab_size and meta.source["seq_len"] == 16
    with UnitStore(write(p, cfg.out)) as store:
        assert store.verify() == [] and store.meta.tokens["num_positions"] == int(lengths.sum())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=12), batch=st.integers(1, 5),
       chunk=st.integers(1, 4), positions=st.integers(1, 9), max_tokens=st.none() | st.integers(1, 60),
       name=st.sampled_from(list(LAYOUTS)), backend=st.sampled_from(["h5", "zarr"]), seed=st.integers(0, 99))
def test_any_geometry_and_calls_store_the_direct_encoding(tmp_path_factory, lengths, batch, chunk, positions,
                                                         max_tokens, name, backend, seed):
    """Random lengths (empty ones too), calls, chunking and span order: every real position equals the
    one-sequence reference, and the store verifies."""
    lengths = np.array(lengths)
    data, teacher = WithEmpty(lengths, 23, seed), Lookup(23, seed=seed)
    layout = make_layout(name, num_classes=23, **LAYOUTS[name])
    p = TokenProducer(data, teacher, layout, batch_size=batch, max_tokens=max_tokens, chunk_samples=chunk,
                      chunk_positions=positions)
    cut = sorted(set(np.random.default_rng(seed).integers(0, len(lengths), 3).tolist()) | {0, len(lengths)})
    spans = list(zip(cut, cut[1:]))[::-1]  # out of order
    path = write(p, tmp_path_factory.mktemp("s") / f"s.{backend}", spans)
    arrays, _ = plain(path)
    for i in np.flatnonzero(lengths):
        start = int(arrays["offsets"][i])
        want = encode_direct(teacher, layout, data.get_batch(np.array([i])).ids[0].numpy(), int(i))
        for k, v in want.items():
            np.testing.assert_array_equal(arrays[k][start:start + lengths[i]], v, err_msg=f"{k} of {i}")
    with UnitStore(path) as store:
        assert store.verify() == []


@pytest.mark.parametrize("backend", ["h5", "zarr"])
def test_generate_cli_writes_what_the_producer_yields(tmp_path, backend):
    """`softlabels generate` on token data = the runner driving token_producer: the same arrays as the
    minimal loop over the same producer; a rerun finds the store complete."""
    from tests.conftest import run_cli

    data = _npz(tmp_path, [5, 1, 40, 7, 3, 12, 1, 9], 50, mask=True)
    out = tmp_path / f"cli.{backend}"
    args = ["generate", "--teacher", "gpt-tiny", "--random-teacher", "--seed", "4", "--num-classes", "50", "--data",
            str(data), "--out", str(out), "--layout", "sampled", "--samples", "12", "--dtype", "bfloat16",
            "--batch-size", "3", "--chunk-rows", "2", "--no-progress"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    cfg = GenerateConfig(teacher="gpt-tiny", data=str(data), out=tmp_path / f"lib.{backend}", random_teacher=True,
                         seed=4, num_classes=50, layout="sampled", samples=12, dtype="bfloat16", batch_size=3,
                         chunk_rows=2)
    want = plain(write(token_producer(cfg), cfg.out))[0]
    got, attrs = plain(out)
    assert attrs["status"] == "complete" and attrs["positions"] == "tokens"
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    again = run_cli(*args)
    assert again.exit_code == 0 and "already complete" in again.output


@pytest.mark.parametrize("seq_len", [8, 3])
def test_packed_rows_with_seq_len_generate_and_train(tmp_path, seq_len):
    """A packed [N, L] .npy with an LM teacher and --seq-len (issue 20, case 15): L is the rows as they are,
    another S re-windows each row; train then rebuilds the same windows from the store's record."""
    from tests.conftest import read_plain, run_cli

    rows = np.random.default_rng(0).integers(0, 30, (5, 8))
    np.save(tmp_path / "p.npy", rows)
    out = tmp_path / f"s{seq_len}.h5"
    r = run_cli("generate", "--teacher", "gpt-tiny", "--random-teacher", "--data", str(tmp_path / "p.npy"),
                "--num-classes", "30", "--seq-len", str(seq_len), "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    arrays, attrs = read_plain(out)
    windows = -(-8 // seq_len)
    want = [8] * 5 if seq_len == 8 else [3, 3, 2] * 5
    assert attrs["num_samples"] == 5 * windows and arrays["lengths"].tolist() == want
    r = run_cli("train", "--student", "gpt-tiny", "--store", str(out), "--epochs", "1", "--batch-size", "4",
                "--no-progress", "--out", str(tmp_path / f"run{seq_len}"))  # windows from the store's record
    assert r.exit_code == 0, r.output
    r = run_cli("eval", "--checkpoint", str(tmp_path / f"run{seq_len}"), "--data", str(tmp_path / "p.npy"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["sequences"] == 5 * windows  # evaluated on the run's windows



def test_sampled_layout_defaults_to_12_draws(tmp_path):
    """Anshumann et al. found S = 12 draws enough: --layout sampled without --samples stores S = 12."""
    from softlabels.teacher.config import DEFAULT_SAMPLES
    from tests.conftest import read_plain, run_cli

    data = _npz(tmp_path, [4, 6], 20)
    out = tmp_path / "s.zarr"
    r = run_cli("generate", "--teacher", "gpt-tiny", "--random-teacher", "--data", str(data), "--num-classes", "20",
                "--layout", "sampled", "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    _, attrs = read_plain(out)
    assert DEFAULT_SAMPLES == 12 and attrs["layout_params"]["samples"] == 12
    assert GenerateConfig(teacher="gpt-tiny", data=str(data), out=out, layout="sampled").samples == 12
    assert GenerateConfig(teacher="gpt-tiny", data=str(data), out=out, layout="dense").samples is None
    help_text = run_cli("generate", "--help").output
    assert "default: 12" in " ".join(help_text.split())
