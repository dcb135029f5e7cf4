"""`softlabels generate`: stored values equal the teacher's, resume after SIGKILL is
bit-identical, repair, the lock, and one-line errors for bad input.

Everything runs on ~100 tiny rows made here, through the CLI (click's CliRunner,
or a real subprocess where the job must be killed); assertions read the stores
with plain h5py / zarr.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from softlabels.store.lock import StoreLock, lock_path
from softlabels.teacher.job import generate
from softlabels.teacher.models import build_model
from softlabels.teacher.spec import resolve_model
from tests.conftest import assert_one_line_error, read_plain, run_cli

N, D, C = 100, 12, 10
CHUNK, BATCH = 16, 8  # 7 chunks; batches of 8 never straddle a chunk


# -- tiny inputs, a teacher with saved weights, and helpers ------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    y = rng.integers(0, C, N).astype(np.int64)
    y[::4] = -1  # unlabeled rows
    np.savez(d / "data.npz", x=x, y=y)
    x_nan = x.copy()
    x_nan[[5, 42]] = np.nan
    np.savez(d / "nan.npz", x=x_nan, y=y)
    torch.manual_seed(0)
    torch.save(build_model("mlp", (D,), C).state_dict(), d / "w.pt")
    torch.manual_seed(1)
    torch.save(build_model("mlp", (D,), C).state_dict(), d / "w2.pt")
    torch.save(build_model("mlp", (5,), C).state_dict(), d / "w_wrong.pt")
    (d / "gen_teachers.py").write_text(
        "from torch import nn\n"
        "def wrong_input():\n    return nn.Linear(7, 10)\n"
        "def wrong_width():\n    return nn.Linear(12, 5)\n")
    (d / "broken_teacher.py").write_text("import not_a_real_package_zz  # noqa\n")
    return {"dir": d, "data": d / "data.npz", "nan": d / "nan.npz", "w": d / "w.pt", "w2": d / "w2.pt",
            "w_wrong": d / "w_wrong.pt", "x": x, "y": y}


def gen_args(tiny, out: Path, *extra: str, data: str | None = None, weights: str | None = None) -> list[str]:
    return ["generate", "--teacher", "mlp", "--weights", weights or str(tiny["w"]), "--data", data or str(tiny["data"]),
            "--out", str(out), "--chunk-rows", str(CHUNK), "--batch-size", str(BATCH), "--no-progress", *extra]


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


def without_timings(attrs: dict) -> dict:
    attrs = copy.deepcopy(attrs)
    attrs["created_by"].pop("timings", None)
    return attrs


def assert_same_store(a: Path, b: Path) -> None:
    """Bit-identical arrays (checksums and flags included) and equal non-timing attributes."""
    (arr_a, attrs_a), (arr_b, attrs_b) = read_plain(a), read_plain(b)
    assert sorted(arr_a) == sorted(arr_b)
    for k in arr_a:
        assert arr_a[k].dtype == arr_b[k].dtype and arr_a[k].tobytes() == arr_b[k].tobytes(), k
    assert without_timings(attrs_a) == without_timings(attrs_b)


def status(path: Path) -> str | None:
    if not path.exists():
        return None
    return read_plain(path)[1].get("status")


def reference_logits(tiny) -> torch.Tensor:
    """The teacher run directly, batch by batch as the job batches (8 rows from each chunk start)."""
    model = resolve_model("mlp", input_shape=(D,), num_classes=C, weights=tiny["w"]).module
    x = torch.from_numpy(tiny["x"])
    with torch.inference_mode():
        out = torch.cat([model(x[s:s + BATCH]) for s in range(0, N, BATCH)])
        assert torch.allclose(out, model(x), rtol=1e-5, atol=1e-6)
    return out


def as_stored(t: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(getattr(torch, dtype)).numpy()


# -- stored values ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
@pytest.mark.parametrize("layout,dtype", [("dense", "float32"), ("dense", "float16"), ("dense", "bfloat16"),
                                          ("topk", "float32"), ("topk", "bfloat16")])
def test_stored_values_equal_the_teacher(tmp_path, tiny, suffix, layout, dtype):
    out = tmp_path / f"s{suffix}"
    extra = ["--dtype", dtype] + (["--layout", "topk", "--topk", "3"] if layout == "topk" else [])
    text = ok(run_cli(*gen_args(tiny, out, *extra)))
    assert f"wrote {N} samples to {out}" in text and "samples/s" in text
    arrays, attrs = read_plain(out)
    z = reference_logits(tiny)
    if layout == "dense":
        assert np.array_equal(arrays["logits"], as_stored(z, dtype))  # exact: the cast of the float32 logits
    else:
        values, indices = torch.topk(z, 3, dim=1)
        assert np.array_equal(arrays["topk_values"], as_stored(values, dtype))
        assert np.array_equal(arrays["topk_indices"], indices.numpy().astype(np.uint16))
        rest = z.scatter(1, indices, -torch.inf)  # the tail at each T of the default grid, in float32
        want = torch.stack([torch.logsumexp(rest / t, dim=1) for t in (1.0, 2.0, 4.0)], -1)
        np.testing.assert_allclose(arrays["tail_logsumexp"], want.numpy(), rtol=1e-6)
        assert "logsumexp" not in arrays
        assert "logits" not in arrays
    assert np.array_equal(arrays["labels"], tiny["y"])  # -1 exactly where the data has no label
    assert np.array_equal(arrays["sample_ids"], np.arange(N))
    assert arrays["unit_done"].tolist() == [1] * 7
    assert attrs["softlabels_format"] == 2 and attrs["positions"] == "sample"
    assert attrs["status"] == "complete" and attrs["layout"] == layout and attrs["logits_dtype"] == dtype
    assert attrs["num_samples"] == N and attrs["num_classes"] == C and attrs["chunk_samples"] == CHUNK
    t, s, cb = attrs["teacher"], attrs["source"], attrs["created_by"]
    assert t["spec"] == "mlp" and t["kind"] == "builtin" and len(t["weights_sha256"]) == 64
    assert t["num_parameters"] == D * 32 + 32 + 32 * C + C and t["amp"] == "none" and t["device"] == "cpu"
    assert s["spec"] == str(tiny["data"]) and s["num_samples"] == N and s["fingerprint"].startswith("sha256:")
    assert cb["settings"]["batch_size"] == BATCH and cb["settings"]["seed"] == 0
    assert cb["timings"]["samples_generated"] == N and cb["timings"]["samples_per_second"] > 0
    assert cb["softlabels"] and not lock_path(out).exists()


def test_sharded_zarr_amp_and_library_api(tmp_path, tiny):
    out = tmp_path / "s.zarr"
    r = generate("mlp", str(tiny["data"]), out, weights=tiny["w"], chunk_rows=CHUNK, shard_chunks=2,
                 batch_size=BATCH, dtype="bfloat16", amp="bf16", progress=False)
    assert (r.samples_generated, r.num_samples, r.already_complete, r.is_main) == (N, N, False, True)
    assert r.tokens_generated is None
    arrays, attrs = read_plain(out)
    assert zarr.open_array(str(out / "logits"), mode="r").shards == (2 * CHUNK, C)
    assert attrs["teacher"]["amp"] == "bf16" and attrs["status"] == "complete"
    z = reference_logits(tiny)
    got = torch.from_numpy(arrays["logits"].view(np.int16)).view(torch.bfloat16).float()
    assert torch.allclose(got, z, atol=0.1, rtol=0.05)  # autocast: close, not equal


def test_unlabeled_builtin_data(tmp_path):
    out = tmp_path / "pool.h5"
    ok(run_cli("generate", "--teacher", "linear", "--random-teacher", "--data", "digits:test?unlabeled",
               "--out", str(out), "--no-progress"))
    arrays, attrs = read_plain(out)
    assert (arrays["labels"] == -1).all() and np.array_equal(arrays["sample_ids"], np.arange(len(arrays["labels"])))
    assert attrs["source"]["spec"] == "digits:test?unlabeled" and attrs["num_classes"] == 10


# -- reruns -----------------------------------------------------------------------------------
def test_rerun_of_complete_store_is_a_no_op_and_mismatch_is_refused(tmp_path, tiny):
    out = tmp_path / "s.h5"
    ok(run_cli(*gen_args(tiny, out)))
    before = out.read_bytes()
    assert "already complete" in ok(run_cli(*gen_args(tiny, out)))
    assert out.read_bytes() == before
    assert_one_line_error(run_cli(*gen_args(tiny, out, "--dtype", "float16")),
                          "logits_dtype 'float32' in the store, 'float16' asked", "--overwrite")
    assert_one_line_error(run_cli(*gen_args(tiny, out, weights=str(tiny["w2"]))), "teacher.weights_sha256")
    assert_one_line_error(run_cli(*gen_args(tiny, out, "--layout", "topk", "--topk", "2")), "layout", "topk")
    assert out.read_bytes() == before
    ok(run_cli(*gen_args(tiny, out, "--dtype", "float16", "--overwrite")))
    assert read_plain(out)[1]["logits_dtype"] == "float16"


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_repair_regenerates_corrupt_chunks(tmp_path, tiny, suffix):
    clean, out = tmp_path / f"clean{suffix}", tmp_path / f"s{suffix}"
    ok(run_cli(*gen_args(tiny, clean)))
    ok(run_cli(*gen_args(tiny, out)))
    if suffix == ".h5":
        with h5py.File(out, "r+") as f:
            f["logits"][20] += 1.0  # silent damage in unit 1
    else:
        g = zarr.open_group(str(out), mode="r+")
        g["logits"][20] = g["logits"][20] + 1.0
        (out / "labels" / "c.4").unlink()  # a lost chunk file (unit 4)
    text = ok(run_cli(*gen_args(tiny, out, "--repair")))
    assert "repair:" in text and ("(1, 4)" if suffix == ".zarr" else "(1)") in text
    assert_same_store(out, clean)
    assert "every written unit" in ok(run_cli(*gen_args(tiny, out, "--repair")))


# -- crash and resume -------------------------------------------------------------------------
def _spawn(tiny, out: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "softlabels", *gen_args(tiny, out, *extra)]
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _done_units(path: Path) -> int:
    try:
        if path.suffix == ".zarr":
            return int(zarr.open_array(str(path / "unit_done"), mode="r")[...].sum())
        with h5py.File(path, "r", locking=False) as f:
            return int(f["unit_done"][...].sum())
    except Exception:  # not created yet
        return 0


def test_killed_jobs_resume_bit_identical(tmp_path, tiny):
    """SIGKILL after the k-th unit is flagged (test hook) or at an arbitrary moment; the rerun equals a clean run."""
    cases = {  # store -> (extra args, units it has, kill after k units; 0 = killed from outside)
        "k2.h5": ((), 7, 2), "kall.h5": ((), 7, 7), "ext.h5": ((), 7, 0),
        "k1.zarr": (("--shard-chunks", "2"), 4, 1),
        "ext.zarr": (("--layout", "topk", "--topk", "3", "--dtype", "float16"), 7, 0),
    }
    procs = {}
    for name, (extra, _, k) in cases.items():
        env = ({"SOFTLABELS_TEST_KILL_AFTER_UNITS": str(k)} if k else {"SOFTLABELS_TEST_DELAY_PER_UNIT": "0.3"})
        procs[name] = _spawn(tiny, tmp_path / name, env, *extra)
    for name, (extra, units, k) in sorted(cases.items(), key=lambda item: item[1][2] != 0):  # outside kills first
        out, p = tmp_path / name, procs[name]
        if not k:  # kill from outside once some, but not all, units are flagged
            deadline = time.monotonic() + 60
            while _done_units(out) < 2 and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        assert p.returncode == -signal.SIGKILL, p.stdout.read().decode()
        assert status(out) == "writing"
        done = _done_units(out)
        if k:
            assert done == min(units, k), name
        else:
            assert 2 <= done < units, name
        assert lock_path(out).exists()  # left by the killed job, and no obstacle:
        ok(run_cli(*gen_args(tiny, out, *extra)))
        clean = tmp_path / f"clean-{name}"
        ok(run_cli(*gen_args(tiny, clean, *extra)))
        assert_same_store(out, clean)
        assert not lock_path(out).exists()


# -- the lock ---------------------------------------------------------------------------------
def test_second_job_on_same_store_is_refused(tmp_path, tiny):
    out = tmp_path / "s.zarr"
    with StoreLock(out):  # another job holds the store
        assert_one_line_error(run_cli(*gen_args(tiny, out)), "being written by another job", str(os.getpid()))
    assert not out.exists()  # refused before touching anything
    lock_path(out).write_text("12345\n")  # left behind by a dead job: no obstacle
    ok(run_cli(*gen_args(tiny, out)))
    assert status(out) == "complete" and not lock_path(out).exists()


# -- non-finite outputs -----------------------------------------------------------------------
@pytest.mark.parametrize("suffix,dtype", [(".h5", "float32"), (".zarr", "bfloat16")])
def test_nonfinite_outputs_stop_or_are_recorded(tmp_path, tiny, suffix, dtype):
    out = tmp_path / f"s{suffix}"
    args = ("--dtype", dtype)
    assert_one_line_error(run_cli(*gen_args(tiny, out, *args, data=str(tiny["nan"]))), "non-finite",
                          "sample ids 5", "--on-nonfinite record")
    assert status(out) == "writing"
    result = run_cli(*gen_args(tiny, out, *args, "--on-nonfinite", "record", data=str(tiny["nan"])))
    text = ok(result)
    assert "warning: stored non-finite teacher logits for 2 sample(s): 5, 42" in text
    arrays, attrs = read_plain(out)
    assert attrs["status"] == "complete" and attrs["created_by"]["nonfinite_sample_ids"] == [5, 42]
    logits = arrays["logits"]
    if dtype == "bfloat16":
        logits = torch.from_numpy(logits.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.flatnonzero(~np.isfinite(logits).all(axis=1)).tolist() == [5, 42]


def test_logits_too_large_for_float16_count_as_nonfinite(tmp_path, tiny):
    big = tmp_path / "big.npz"
    x = tiny["x"].copy()
    x[7] *= 1e6  # finite float32 logits beyond float16's 65504
    np.savez(big, x=x, y=tiny["y"])
    out = tmp_path / "s.h5"
    assert_one_line_error(run_cli(*gen_args(tiny, out, "--dtype", "float16", data=str(big))), "sample ids 7")
    ok(run_cli(*gen_args(tiny, out, "--dtype", "float32", "--overwrite", data=str(big))))


# -- bad input: one line, exit 2, nothing marked complete ------------------------------------
BAD = {
    "unknown teacher": (lambda t: ["--teacher", "no-such-model"], "unknown model"),
    "import error": (lambda t: ["--teacher", "broken_teacher:make"], "cannot import module 'broken_teacher'"),
    "weights do not fit": (lambda t: ["--weights", str(t["w_wrong"])], "do not fit"),
    "wrong input shape": (lambda t: ["--teacher", "gen_teachers:wrong_input"],
                          "failed on inputs of shape (2, 12)"),
    "wrong output width": (lambda t: ["--teacher", "gen_teachers:wrong_width"], "outputs 5 logits per sample"),
    "num-classes vs teacher": (lambda t: ["--num-classes", "12"], "do not fit"),
    "num-classes vs data": (lambda t: ["--num-classes", "4"], "less than the 10 classes"),
    "unknown data": (lambda t: ["--data", "nosuchdata"], "unknown dataset"),
    "missing data file": (lambda t: ["--data", str(t["dir"] / "nope.npz")], "does not exist"),
    "nan outputs": (lambda t: ["--data", str(t["nan"])], "non-finite"),
    "topk without layout": (lambda t: ["--topk", "3"], "--topk is only for --layout topk"),
    "topk with sampled": (lambda t: ["--layout", "sampled", "--topk", "3"], "--topk is only for --layout topk"),
    "topk too large": (lambda t: ["--layout", "topk", "--topk", "11"], "more than the 10 classes"),
    "no cuda": (lambda t: ["--device", "cuda:7"], "CUDA device"),
    "bad suffix": (lambda t: ["--out", str(t["dir"] / "x.txt")], "--out must end in"),
    "repair nothing": (lambda t: ["--repair"], "no store"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_error(tmp_path, tiny, monkeypatch, case):
    monkeypatch.syspath_prepend(str(tiny["dir"]))
    out = tmp_path / "s.h5"
    make_args, needle = BAD[case]
    args = gen_args(tiny, out)
    extra = make_args(tiny)
    if "--teacher" in extra:  # a factory teacher: no weights
        del args[3:5]
    for i in range(0, len(extra), 2):  # later options of click win, but replace to keep it plain
        if extra[i] in args:
            j = args.index(extra[i])
            args[j:j + 2] = extra[i:i + 2]
        else:
            args += extra[i:i + 2] if i + 1 < len(extra) else extra[i:]
    result = run_cli(*args)
    assert_one_line_error(result, needle)
    assert status(out) != "complete"


def test_teacher_that_fails_mid_run_is_one_line_error(tmp_path, tiny, monkeypatch):
    mod = tiny["dir"] / "flaky_teacher.py"
    mod.write_text(
        "import torch\nfrom torch import nn\n"
        "class Flaky(nn.Linear):\n"
        "    def forward(self, x):\n"
        "        if x.shape[0] == 4:\n            raise RuntimeError('boom on the last batch')\n"
        "        return super().forward(x)\n"
        "def make():\n    return Flaky(12, 10)\n")
    monkeypatch.syspath_prepend(str(tiny["dir"]))
    out = tmp_path / "s.zarr"
    args = gen_args(tiny, out)
    args[2:5] = ["flaky_teacher:make"]  # no weights
    assert_one_line_error(run_cli(*args), "failed on samples 96..100", "boom on the last batch")
    assert status(out) == "writing"


def test_a_resume_checks_earlier_units_only_after_a_record_run(tmp_path, tiny, monkeypatch):
    """A store a record run touched is marked created_by.on_nonfinite and its earlier units are checked when
    resumed in the default mode (E904); one the default mode wrote is resumed without reading them again."""
    import softlabels.teacher.sinks as sinks

    def stop_after_one_unit(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            f["unit_done"][1:] = 0
            f.attrs["status"] = "writing"

    def gen(out: Path, *extra: str, data: Path = tiny["nan"]):
        return run_cli("generate", "--teacher", "mlp", "--weights", str(tiny["w"]), "--data", str(data),
                       "--out", str(out), "--chunk-rows", "16", "--no-progress", *extra)

    recorded = tmp_path / "recorded.h5"
    assert gen(recorded, "--on-nonfinite", "record").exit_code == 0
    stop_after_one_unit(recorded)  # unit 0 holds the NaN of sample 5
    assert_one_line_error(gen(recorded), "already holds non-finite teacher logits for sample ids 5")
    read = []
    monkeypatch.setattr(sinks, "nonfinite_ids", lambda store, units: read.append(list(units)) or [])
    clean = tmp_path / "clean.h5"
    assert gen(clean, data=tiny["data"]).exit_code == 0
    stop_after_one_unit(clean)
    assert gen(clean, data=tiny["data"]).exit_code == 0 and read == []
