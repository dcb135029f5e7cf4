"""generate through the job runner: values against a direct teacher computation.

Every case builds tiny image data and a fixed teacher, runs ``softlabels generate`` and
compares the stored arrays (read with plain h5py/zarr) with the teacher run directly on
the same batches: dense logits bit for bit, top-k and sampled equal to the layout's
``encode`` of the teacher's logits; views equal the teacher on the views rebuilt from
the stored parameters.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from softlabels.inputs.augment import draw_views, parse_augment
from softlabels.store.layouts import make_layout, to_numpy
from softlabels.teacher.spec import resolve_model
from tests._torchrun import run_two_ranks
from tests.conftest import assert_one_line_error, read_plain, run_cli

N, C, SHAPE = 30, 5, (3, 8, 8)
AUG, V, SEED = "crop(8,padding=2)+flip", 3, 4
LAYOUTS = {"dense": (), "topk": ("--topk", "2"), "sampled": ("--samples", "6")}
BOOKKEEPING = ("unit_done", "unit_checksums")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    work = tmp_path_factory.mktemp("job")
    rng = np.random.default_rng(0)
    x = rng.random((N, *SHAPE)).astype(np.float32)
    y = rng.integers(0, C, N)
    np.savez(work / "img.npz", x=x, y=y)
    torch.manual_seed(0)
    model = resolve_model("mlp", input_shape=SHAPE, num_classes=C).module
    torch.save(model.state_dict(), work / "t.pt")
    return {"work": work, "x": torch.from_numpy(x), "model": model.eval(), "data": str(work / "img.npz"),
            "weights": str(work / "t.pt")}


def gen(inputs, out: Path, *extra: str, batch: int = 12, chunk: int = 8):
    return run_cli("generate", "--teacher", "mlp", "--weights", inputs["weights"], "--data", inputs["data"],
                   "--out", str(out), "--chunk-rows", str(chunk), "--batch-size", str(batch), "--seed", str(SEED),
                   "--no-progress", *extra)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def expected(inputs, layout: str, extra: tuple[str, ...], *, views: bool, batch: int = 12,
             params: np.ndarray | None = None, spec: str = AUG) -> dict[str, np.ndarray]:
    """The store's per-position arrays computed directly: the teacher on the same batches, then encode."""
    torch.set_num_threads(1)
    kw = {"topk": {"k": 2, "tail_temperatures": [1, 2, 4]}, "sampled": {"samples": 6, "seed": SEED}}.get(layout, {})
    lay = make_layout(layout, num_classes=C, **kw)
    x, model, out = inputs["x"], inputs["model"], {}
    per = batch // V if views else batch
    aug = parse_augment(spec)
    for lo in range(0, N, per):
        ids = torch.arange(lo, min(lo + per, N))
        with torch.inference_mode():
            if views:
                p = torch.from_numpy(params[ids.numpy()].astype(np.float32)) if params is not None else \
                    draw_views(aug, SEED, ids, V, SHAPE)
                z = model(aug.apply(x[ids].repeat_interleave(V, 0), p.reshape(len(ids) * V, -1)))
                enc = lay.encode(z, sample_ids=ids.repeat_interleave(V), positions=torch.arange(V).repeat(len(ids)))
                enc = {k: to_numpy(t).reshape(len(ids), V, *t.shape[1:]) for k, t in enc.items()}
                enc["view_params"] = p.numpy().astype(aug.param_dtype(SHAPE[1:]))  # whole numbers: exact
            else:
                z = model(x[ids])
                enc = {k: to_numpy(t) for k, t in lay.encode(z, sample_ids=ids, positions=torch.zeros_like(ids)).items()}
        for k, v in enc.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def assert_equal_arrays(stored: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for k, v in want.items():
        assert stored[k].dtype == v.dtype and np.array_equal(stored[k], v), k


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("views", [False, True], ids=["sample", "views"])
def test_v2_generate_equals_the_teacher_run_directly(inputs, tmp_path, suffix, layout, views):
    out = tmp_path / f"s{suffix}"
    extra = ("--layout", layout, *LAYOUTS[layout])
    extra += ("--views", str(V), "--augment", AUG) if views else ()
    ok(gen(inputs, out, *extra))
    arrays, attrs = read_plain(out)
    assert attrs["softlabels_format"] == 2 and attrs["status"] == "complete"
    assert arrays["unit_done"].all() and len(arrays["unit_done"]) == -(-N // 8)
    want = expected(inputs, layout, LAYOUTS[layout], views=views)
    assert_equal_arrays(arrays, want)
    assert np.array_equal(arrays["sample_ids"], np.arange(N))
    assert np.array_equal(arrays["labels"], np.load(inputs["data"])["y"])
    if views:  # replay: the stored params rebuild the views the teacher saw
        assert_equal_arrays(arrays, expected(inputs, layout, LAYOUTS[layout], views=True, params=arrays["view_params"]))


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
@pytest.mark.parametrize("spec,dtype", [(AUG, "uint8"), ("affine(20,translate=0.2,scale=0.8-1.25)+flip", "float16"),
                                        ("rrc(8,scale=0.3-1)+flip", "uint8")])
def test_view_params_are_stored_narrow_and_replay_exactly_what_the_teacher_saw(inputs, tmp_path, suffix, spec, dtype):
    """The stored params (uint8/float16) rebuild views whose teacher logits equal the stored ones bit for bit."""
    out = tmp_path / f"s{suffix}"
    ok(gen(inputs, out, "--views", str(V), "--augment", spec, "--layout", "dense"))
    arrays, attrs = read_plain(out)
    views_attr = attrs["views"] if isinstance(attrs["views"], dict) else json.loads(attrs["views"])
    assert views_attr["param_dtype"] == dtype and arrays["view_params"].dtype == np.dtype(dtype)
    drawn = draw_views(parse_augment(spec), SEED, torch.arange(N), V, SHAPE).numpy()
    assert np.array_equal(arrays["view_params"].astype(np.float32), drawn)  # nothing lost in the narrow dtype
    if dtype == "float16":
        assert not np.array_equal(drawn, drawn.round())  # angles and scales that are no whole numbers
    replayed = expected(inputs, "dense", (), views=True, params=arrays["view_params"], spec=spec)
    assert np.array_equal(arrays["logits"], replayed["logits"])
    info = json.loads(ok(run_cli("inspect", str(out), "--json")).output)
    p = arrays["view_params"].shape[-1]
    assert info["bytes_per_view"] == C * 4 + p * np.dtype(dtype).itemsize  # dense float32 logits + the params


def test_views_default_to_top5_and_views_from_reuses_the_params_exactly(inputs, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.h5"
    ok(gen(inputs, a, "--views", str(V), "--augment", AUG))
    ours, attrs = read_plain(a)
    views_attr = attrs["views"] if isinstance(attrs["views"], dict) else json.loads(attrs["views"])
    assert attrs["layout"] == "topk" and views_attr["count"] == V and views_attr["augment"] == AUG
    assert ours["topk_values"].shape == (N, V, 5)
    # another teacher (other weights), the same views
    torch.manual_seed(1)
    other = resolve_model("mlp", input_shape=SHAPE, num_classes=C).module.eval()
    torch.save(other.state_dict(), tmp_path / "t2.pt")
    ok(run_cli("generate", "--teacher", "mlp", "--weights", str(tmp_path / "t2.pt"), "--data", inputs["data"],
               "--out", str(b), "--views-from", str(a), "--chunk-rows", "16", "--batch-size", "12", "--no-progress"))
    theirs, _ = read_plain(b)
    assert np.array_equal(theirs["view_params"], ours["view_params"])
    lay = make_layout("topk", num_classes=C, k=5)
    with torch.inference_mode():
        p = torch.from_numpy(ours["view_params"]).reshape(N * V, -1)
        z = other(parse_augment(AUG).apply(inputs["x"].repeat_interleave(V, 0), p))
    enc = lay.encode(z)  # one batch here, 4 samples per batch in the store: ids are exact, values within rounding
    assert np.array_equal(theirs["topk_indices"], to_numpy(enc["topk_indices"]).reshape(N, V, 5))
    np.testing.assert_allclose(theirs["topk_values"], to_numpy(enc["topk_values"]).reshape(N, V, 5), rtol=1e-6,
                               atol=1e-7)  # batch composition moves float32 matmul rounding near zero


def test_views_from_refuses_other_data_and_other_augment(inputs, tmp_path):
    a = tmp_path / "a.zarr"
    ok(gen(inputs, a, "--views", "2", "--augment", AUG))
    np.savez(tmp_path / "small.npz", x=np.load(inputs["data"])["x"][:10], y=np.zeros(10, np.int64))
    r = run_cli("generate", "--teacher", "mlp", "--weights", inputs["weights"], "--data", str(tmp_path / "small.npz"),
                "--out", str(tmp_path / "b.zarr"), "--views-from", str(a), "--no-progress")
    assert_one_line_error(r, "holds views of 30 samples of other data")
    r = gen(inputs, tmp_path / "c.zarr", "--views-from", str(a), "--augment", "flip")
    assert_one_line_error(r, "is not the augmentation")


COUNTER = '''
import torch
CALLS = []
class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 4096)
    def forward(self, x):
        CALLS.append(len(x))
        return self.w(x)
def make():
    torch.manual_seed(0)
    return Counting()
'''


@pytest.mark.parametrize("layout", ["dense", "topk"])
def test_teacher_batch_size_does_not_depend_on_chunk_size(tmp_path, monkeypatch, layout):
    """C = 32,768 float16: ~1 MiB dense chunks are 16 rows, yet the teacher gets --batch-size rows per call,
    and the store holds exactly what the teacher returned."""
    c = 32768
    name = f"counting_teacher_{layout}"  # a module per case: imports are cached
    (tmp_path / f"{name}.py").write_text(COUNTER.replace("4096", str(c)))
    monkeypatch.syspath_prepend(str(tmp_path))
    counting_teacher = importlib.import_module(name)

    x = np.random.default_rng(0).random((300, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    from softlabels.teacher.job import generate

    topk = {"topk": 8} if layout == "topk" else {}
    out = tmp_path / "s.zarr"
    generate(f"{name}:make", str(tmp_path / "d.npz"), out, layout=layout, batch_size=128, dtype="float16", **topk)
    assert counting_teacher.CALLS == [2, 128, 128, 44]  # the first call checks the teacher on 2 rows
    arrays, attrs = read_plain(out)
    assert attrs["chunk_samples"] == 16 or layout == "topk"
    with torch.inference_mode():  # the same batches as the job's
        teacher = counting_teacher.make()
        z = torch.cat([teacher(torch.from_numpy(x[a:a + 128])) for a in range(0, 300, 128)])
    if layout == "dense":
        assert np.array_equal(arrays["logits"], z.half().numpy())
    else:
        top, idx = torch.topk(z, 8, dim=1)
        assert np.array_equal(arrays["topk_values"], top.half().numpy())
        assert np.array_equal(arrays["topk_indices"].astype(np.int64), idx.numpy())


def _all(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    arrays, attrs = read_plain(path)
    created = attrs["created_by"] if isinstance(attrs["created_by"], dict) else json.loads(attrs["created_by"])
    created.pop("timings", None)
    return arrays, {**attrs, "created_by": created}


def assert_same_v2(a: Path, b: Path) -> None:
    (x, xa), (y, ya) = _all(a), _all(b)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
    assert xa == ya


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_killed_views_generate_resumes_bit_identical(inputs, tmp_path, suffix):
    ref, out = tmp_path / f"ref{suffix}", tmp_path / f"out{suffix}"
    extra = ("--views", str(V), "--augment", AUG, "--layout", "sampled", "--samples", "5", "--dtype", "float16")
    ok(gen(inputs, ref, *extra, batch=9, chunk=4))
    cmd = [sys.executable, "-m", "softlabels", "generate", "--teacher", "mlp", "--weights", inputs["weights"],
           "--data", inputs["data"], "--out", str(out), "--chunk-rows", "4", "--batch-size", "9", "--seed",
           str(SEED), "--no-progress", *extra]
    env = {**os.environ, "SOFTLABELS_TEST_KILL_AFTER_UNITS": "3"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    arrays, attrs = read_plain(out)
    assert attrs["status"] == "writing" and 3 <= arrays["unit_done"].sum() < len(arrays["unit_done"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_same_v2(out, ref)
    # a rerun with other settings is refused on one line; a complete store says so
    assert_one_line_error(gen(inputs, out, *extra[:-2], batch=9, chunk=4), "was made with other settings")
    assert "already complete" in ok(gen(inputs, out, *extra, batch=9, chunk=4)).output


def test_repair_regenerates_a_damaged_unit(inputs, tmp_path):
    out = tmp_path / "s.zarr"
    ok(gen(inputs, out, "--layout", "topk", "--topk", "3"))
    ref = tmp_path / "ref.zarr"
    shutil.copytree(out, ref)
    import zarr

    g = zarr.open_group(str(out), mode="r+")
    g["topk_values"][9] = 0  # unit 1 (chunks of 8)
    r = ok(gen(inputs, out, "--layout", "topk", "--topk", "3", "--repair"))
    assert "1 unit(s) fail verification (1)" in r.output
    assert_same_v2(out, ref)


def test_format2_is_the_only_format_written_and_format_is_no_option(inputs, tmp_path):
    out = tmp_path / "s.h5"
    ok(gen(inputs, out))
    attrs = read_plain(out)[1]
    assert attrs["softlabels_format"] == 2 and attrs["positions"] == "sample"
    assert "already complete" in ok(gen(inputs, out)).output
    assert_one_line_error(gen(inputs, tmp_path / "x.h5", "--format", "1"), "no such option '--format'")
    assert not (tmp_path / "x.h5").exists()


def test_two_ranks_write_the_same_views_store_as_one_process(inputs, tmp_path):
    cases, names = [], []
    for name, extra in (("views.zarr", ("--views", str(V), "--augment", AUG)),
                        ("views.h5", ("--views", str(V), "--augment", AUG)),  # rank 0 writes what ranks send
                        ("sampled.zarr", ("--layout", "sampled", "--samples", "6"))):
        ok(gen(inputs, tmp_path / f"one-{name}", *extra, chunk=4))
        names.append(name)
        cases.append([name, ["generate", "--teacher", "mlp", "--weights", inputs["weights"], "--data",
                             inputs["data"], "--out", str(tmp_path / f"two-{name}"), "--chunk-rows", "4",
                             "--batch-size", "12", "--seed", str(SEED), "--no-progress", *extra]])
    for results in run_two_ranks(tmp_path, cases, timeout=180):
        assert [r["code"] for r in results.values()] == [0, 0, 0], results
    for name in names:
        two, one = tmp_path / f"two-{name}", tmp_path / f"one-{name}"
        (x, xa), (y, ya) = _all(two), _all(one)
        for k in x:
            assert np.array_equal(x[k], y[k]), (name, k)
        assert {k: v for k, v in xa.items() if k != "created_by"} == {k: v for k, v in ya.items() if k != "created_by"}


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_nonfinite_outputs_stop_the_job_or_are_recorded(inputs, tmp_path, suffix):
    x = np.load(inputs["data"])["x"].copy()
    x[[5, 17]] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(N, np.int64))
    args = ("--views", "2", "--augment", "flip", "--data", str(tmp_path / "nan.npz"))
    r = run_cli("generate", "--teacher", "mlp", "--weights", inputs["weights"], "--out", str(tmp_path / f"a{suffix}"),
                "--chunk-rows", "8", "--no-progress", *args)
    assert_one_line_error(r, "non-finite", "sample ids 5")
    assert read_plain(tmp_path / f"a{suffix}")[1]["status"] == "writing"
    r = ok(run_cli("generate", "--teacher", "mlp", "--weights", inputs["weights"], "--out",
                   str(tmp_path / f"a{suffix}"), "--chunk-rows", "8", "--no-progress", "--on-nonfinite", "record",
                   *args))
    assert "2 sample(s): 5, 17" in r.output
    attrs = read_plain(tmp_path / f"a{suffix}")[1]
    created = attrs["created_by"] if isinstance(attrs["created_by"], dict) else json.loads(attrs["created_by"])
    assert attrs["status"] == "complete" and created["nonfinite_sample_ids"] == [5, 17]


class _TokenProducer:
    """A toy producer of a ragged ``tokens`` store: logits are a pure function of (sample, position)."""

    def __init__(self, meta, lengths, nan_sample=None):
        self._meta, self._lengths, self.nan_sample, self.spans = meta, lengths, nan_sample, []
        self.cum = np.concatenate([[0], np.cumsum(lengths)])

    def meta(self):
        return self._meta

    def lengths(self):
        return self._lengths

    def logits(self, lo, hi):
        pos = np.arange(self.cum[lo], self.cum[hi])
        z = np.sin(pos[:, None] * 0.37 + np.arange(self._meta.num_classes)).astype(np.float32)
        if self.nan_sample is not None and lo <= self.nan_sample < hi:
            z[self.cum[self.nan_sample] - self.cum[lo]] = np.nan
        return z

    def batches(self, spans):
        self.spans += list(spans)
        for lo, hi in spans:
            yield lo, {"logits": self.logits(lo, hi), "labels": np.zeros(hi - lo, np.int64),
                       "sample_ids": np.arange(lo, hi, dtype=np.int64)}


def _token_meta(lengths):
    from softlabels.store.positions import TokenPositions, UnitGeometry
    from softlabels.store.schema import StoreMetaV2

    g = UnitGeometry(len(lengths), 3, 1, 2)
    tokens = TokenPositions(g, lengths, chunk_positions=4).to_attrs()["tokens"]
    return StoreMetaV2(positions="tokens", layout="dense", num_samples=len(lengths), num_classes=4,
                       chunk_samples=3, group_units=2, tokens=tokens)


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_the_runner_is_generic_a_ragged_token_producer(tmp_path, suffix):
    """The runner drives any producer: ragged tokens, batches of 5 samples over units of 3, resume, non-finite."""
    from softlabels.errors import NonFiniteOutputs
    from softlabels.store.reader import UnitStore
    from softlabels.store.writer import UnitWriter
    from softlabels.teacher.runner import run_job

    lengths = np.array([3, 0, 7, 1, 2, 9, 4, 0, 5, 6, 2], np.int64)
    out = tmp_path / f"t{suffix}"
    prod = _TokenProducer(_token_meta(lengths), lengths)
    r = run_job(prod, out, batch_size=5)
    assert r.samples_generated == 11 and prod.spans == [(0, 5), (5, 10), (10, 11)]
    with UnitStore(out) as store:
        got = np.concatenate([store.read_unit(u)["logits"] for u in range(store.num_units)])
    assert np.array_equal(got, prod.logits(0, 11))
    w = UnitWriter.resume(out)
    w.invalidate([1, 3])  # samples 3..6 and 9..11
    w.close()
    prod2 = _TokenProducer(_token_meta(lengths), lengths)
    run_job(prod2, out, batch_size=5)
    assert prod2.spans == [(0, 5), (5, 10), (10, 11)]  # the grid's batches around the missing units
    with UnitStore(out) as store:
        assert np.array_equal(np.concatenate([store.read_unit(u)["logits"] for u in range(4)]), prod.logits(0, 11))
    with pytest.raises(NonFiniteOutputs, match="sample ids 5;"):
        run_job(_TokenProducer(_token_meta(lengths), lengths, nan_sample=5), tmp_path / f"n{suffix}", batch_size=5)
    r = run_job(_TokenProducer(_token_meta(lengths), lengths, nan_sample=5), tmp_path / f"n{suffix}", batch_size=5,
                on_nonfinite="record")
    assert r.nonfinite_sample_ids == (5,)


@pytest.mark.parametrize("ext", ["h5", "zarr"])
@pytest.mark.parametrize("layout_args", [("--layout", "sampled", "--samples", "8"), ("--layout", "topk", "--topk", "4")])
def test_compress_stores_the_same_values_in_fewer_bytes(tmp_path, ext, layout_args):
    """generate --compress: the sparse arrays read back equal (plain h5py / zarr) and are stored compressed."""
    import h5py
    import zarr

    common = ["generate", "--teacher", "mlp", "--random-teacher", "--data", "digits:train", "--no-progress",
              *layout_args]
    plain, packed = tmp_path / f"plain.{ext}", tmp_path / f"packed.{ext}"
    assert run_cli(*common, "--out", str(plain)).exit_code == 0
    r = run_cli(*common, "--out", str(packed), "--compress")
    assert r.exit_code == 0, r.output
    a, attrs_a = read_plain(plain)
    b, attrs_b = read_plain(packed)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    layout = make_layout(layout_args[1], num_classes=10, **({"samples": 8} if "sampled" in layout_args
                                                            else {"k": 4, "tail_temperatures": [1, 2, 4]}))
    for name in layout.arrays():
        if ext == "h5":
            with h5py.File(packed, "r") as f, h5py.File(plain, "r") as g:
                assert (f[name].compression, g[name].compression) == ("gzip", None)
        else:
            codecs = [c.to_dict()["name"] for c in zarr.open_array(str(packed / name), mode="r").metadata.codecs]
            assert "zstd" in codecs, (name, codecs)


def test_a_batch_over_several_units_names_every_nonfinite_sample_of_the_batch(tmp_path):
    """The writer thread checks a batch unit by unit; the error still names every bad sample of the batch,
    and no unit holding one is flagged."""
    from softlabels.errors import NonFiniteOutputs
    from softlabels.store.reader import UnitStore
    from softlabels.teacher.runner import run_job

    class TwoBad(_TokenProducer):
        def logits(self, lo, hi):
            z = super().logits(lo, hi)
            for s in (5, 6):  # batch (5, 10): sample 5 ends unit 1, sample 6 starts unit 2
                if lo <= s < hi and self.cum[s + 1] > self.cum[s]:
                    z[self.cum[s] - self.cum[lo]] = np.inf
            return z

    lengths = np.array([3, 0, 7, 1, 2, 9, 4, 0, 5, 6, 2], np.int64)
    with pytest.raises(NonFiniteOutputs, match="sample ids 5, 6;"):
        run_job(TwoBad(_token_meta(lengths), lengths), tmp_path / "n.h5", batch_size=5)
    with UnitStore(tmp_path / "n.h5", allow_partial=True) as store:
        done = store.unit_done()
    assert not done[1] and not done[2]  # the units of samples 5 and 6
