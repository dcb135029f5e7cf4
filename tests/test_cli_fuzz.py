"""Fuzz the CLI's argument values: whatever the user types, no traceback.

Values are drawn from a mix of valid and hostile inputs (paths that exist or not,
wrong types, negative and huge numbers, unknown names). Each invocation must end
as a normal exit: 0, a click usage error, or one `error:` line with status 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softlabels.cli import main
from softlabels.teacher.spec import resolve_model
from tests.conftest import make_rows, write_store

N, D, C = 24, 4, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.standard_normal((N, D)).astype(np.float32), y=rng.integers(0, C, N))
    torch.manual_seed(0)
    torch.save(resolve_model("linear", input_shape=(D,), num_classes=C).module.state_dict(), d / "w.pt")
    (d / "junk.h5").write_bytes(b"junk")
    write_store(d / "s.zarr", make_rows(N, C), num_classes=C)
    write_store(d / "partial.h5", make_rows(N, C), num_classes=C, finish=False)
    return d


def texts(d):
    """Strings a user might type where a path or spec is expected."""
    return st.sampled_from([
        "", " ", "-", "--", "nope", "x:y", ":", "a.b:c", "os:system", "digits", "digits:train", "digits:nope",
        "digits:pool?unlabeled", "digits:test?bogus", "mlp", "cnn", "linear", "\x00", "é", "../..", "/",
        str(d / "data.npz"), str(d / "data.npz") + ":nope", str(d / "w.pt"), str(d / "junk.h5"),
        str(d / "s.zarr"), str(d / "partial.h5"), str(d / "missing.zarr"), str(d / "new.zarr"), str(d / "new.h5"),
        str(d / "out.txt"), str(d), "1e309", "nan", "-1",
    ]) | st.text(max_size=12)


numbers = st.sampled_from(["0", "1", "-1", "2", "3", "1e9", "nan", "inf", "-0.5", "0.5", "x", "", "99999999999"])


def _check(result) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    if result.exit_code == 2:  # click's usage errors too: one line (docs/ERRORS.md, E1201)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output


FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=st.data())
def test_generate_arguments(world, data):
    t = texts(world)
    args = ["generate", "--no-progress", "--teacher", data.draw(t), "--data", data.draw(t), "--out", data.draw(t)]
    for opt, values in [("--weights", t), ("--batch-size", numbers), ("--chunk-rows", numbers), ("--topk", numbers),
                        ("--num-classes", numbers), ("--shard-chunks", numbers), ("--layout", st.sampled_from(["dense", "topk", "x"])),
                        ("--dtype", st.sampled_from(["float32", "bfloat16", "int8"])), ("--device", t)]:
        if data.draw(st.booleans()):
            args += [opt, data.draw(values)]
    _check(CliRunner().invoke(main, args))


@FUZZ
@given(data=st.data())
def test_train_arguments(world, data):
    t = texts(world)
    out = world / f"run{data.draw(st.integers(0, 3))}"
    args = ["train", "--no-progress", "--overwrite", "--epochs", "1", "--student", data.draw(t), "--out", str(out)]
    for opt, values in [("--store", t), ("--data", t), ("--loss", st.sampled_from(["kl", "topk_kl", "mse", "x"])),
                        ("--temperature", numbers), ("--alpha", numbers), ("--batch-size", numbers), ("--lr", numbers),
                        ("--val-data", t), ("--student-weights", t), ("--warmup-steps", numbers), ("--device", t)]:
        if data.draw(st.booleans()):
            args += [opt, data.draw(values)]
    _check(CliRunner().invoke(main, args))


@FUZZ
@given(data=st.data())
def test_eval_inspect_report_arguments(world, data):
    t = texts(world)
    command = data.draw(st.sampled_from(["eval", "inspect", "report"]))
    if command == "eval":
        args = ["eval", "--checkpoint", data.draw(t), "--data", data.draw(t)]
        if data.draw(st.booleans()):
            args += ["--store", data.draw(t)]
    elif command == "inspect":
        args = ["inspect", data.draw(t)] + (["--verify"] if data.draw(st.booleans()) else [])
    else:
        args = ["report", data.draw(t)]
    _check(CliRunner().invoke(main, args))
