"""First use: a fast --help, one source of version/defaults/devices, and issue 15's frictions.

Every case runs the real CLI (CliRunner, or a subprocess where a fresh interpreter
matters) on tiny data made in the test. The data lives in one temporary directory
and the commands run from another, so no case works only because of its cwd.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import numpy as np
import pytest
import torch

from softlabels._runtime import progress as _progress
from softlabels.cli import main
from softlabels.evaluation import config as eval_config
from softlabels.student import config as train_config
from softlabels.teacher import config as gen_config
from tests.conftest import read_plain, run_cli

ROOT = Path(__file__).resolve().parents[1]
N, D, C = 48, 6, 4
COMMANDS = ("generate", "train", "eval", "inspect", "report")

TEACHER = '''
import torch
from torch import nn
from torch.utils.data import Dataset

def seven(): return nn.Linear(6, 7)  # a teacher for 7 classes

class Labeled(Dataset):  # labels, but no num_classes attribute
    def __len__(self): return 40
    def __getitem__(self, i): return torch.full((6,), float(i % 4)), i % 4

def labeled(): return Labeled()
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data, teacher weights and stores in one directory ("data"), made from another ("work")."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    np.savez(d / "train.npz", x=x, y=np.arange(N) % C)
    np.savez(d / "pool.npz", x=rng.standard_normal((N, D)).astype(np.float32))  # no labels at all
    torch.manual_seed(0)
    from softlabels.teacher.models import build_model

    torch.save(build_model("mlp", (D,), C).state_dict(), d / "teacher.pt")
    (d / "firstuse_models.py").write_text(TEACHER)
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))
    sys.modules.pop("firstuse_models", None)


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The working directory of a case: not the data's."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args):
    return run_cli(*map(str, args))


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def generate(world, out, *extra, data=None):
    return ok(cli("generate", "--teacher", "mlp", "--weights", world / "teacher.pt", "--data", data or world / "train.npz",
                  "--out", out,
                  "--chunk-rows", 16, *extra))


def fresh_python(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return p.stdout


# -- a fast --help (issue 13), the version, the configs ------------------------------------------
@pytest.mark.parametrize("args", [["--help"], ["--version"], *([c, "--help"] for c in COMMANDS)])
def test_help_imports_no_torch_h5py_or_zarr(args):
    out = fresh_python(
        "import runpy, sys\n"
        f"sys.argv = ['softlabels', *{args!r}]\n"
        "try:\n    runpy.run_module('softlabels', run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('LOADED', sorted(m for m in ('torch', 'h5py', 'zarr') if m in sys.modules))\n")
    assert out.strip().splitlines()[-1] == "LOADED []", out


def test_config_module_imports_without_torch():
    assert fresh_python("import sys, softlabels, softlabels.teacher.config, softlabels.student.config, "
                        "softlabels.evaluation.config\n"
                        "print(sorted(m for m in ('torch', 'numpy', 'h5py', 'zarr') if m in sys.modules))").strip() == "[]"


def test_the_version_has_one_source():
    from softlabels import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "softlabels._version.__version__"}
    import softlabels

    assert softlabels.__version__ == __version__
    assert cli("--version").output.strip().endswith(__version__)
    for path in (ROOT / "softlabels").rglob("*.py"):  # nothing imports back up into the package
        assert not re.search(r"from softlabels import .*__version__", path.read_text()), path


def test_functions_named_like_their_modules_stay_functions():
    out = fresh_python("import softlabels.teacher.job, softlabels.student.trainer, softlabels.evaluation.evaluator, softlabels\n"
                       "print(all(callable(getattr(softlabels, n)) and not isinstance(getattr(softlabels, n), type(softlabels))"
                       " for n in ('generate', 'train', 'evaluate')))\n"
                       "print(all(getattr(softlabels, n) is not None for n in softlabels.__all__))")
    assert out.split() == ["True", "True"]


_REQUIRED = {"train": ["--student", "s", "--out", "o"], "generate": ["--teacher", "t", "--data", "d", "--out", "o"],
             "eval": ["--checkpoint", "c", "--data", "d"]}


def _options(name: str) -> dict[str, click.Option]:
    return {p.name: p for p in main.commands[name].params if isinstance(p, click.Option)}


@pytest.mark.parametrize("command, cls, renamed", [
    ("train", train_config.TrainConfig, {}),
    ("generate", gen_config.GenerateConfig, {}),
    ("eval", eval_config.EvalConfig, {"data_spec": "data"}),
])
def test_click_defaults_and_choices_come_from_the_config(command, cls, renamed):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = main.commands[command].make_context(command, _REQUIRED[command]).params  # what click passes on
    for name, opt in _options(command).items():
        field = fields.get(renamed.get(name, name))
        if field is None or opt.is_flag or opt.multiple or opt.required:
            continue
        # None stands for a documented default chosen at run time (--alpha, --loss, --chunk-rows, ...)
        assert defaults[name] == field.default, (command, name)
    gen, train = _options("generate"), _options("train")
    assert tuple(gen["layout"].type.choices) == gen_config.LAYOUTS
    assert tuple(gen["dtype"].type.choices) == gen_config.LOGITS_DTYPES
    assert tuple(train["optimizer"].type.choices) == train_config.OPTIMIZERS


def test_config_choices_and_library_defaults_match_the_modules_that_use_them():
    from softlabels.evaluation.evaluator import evaluate
    from softlabels.store import format, layouts
    from softlabels.student import losses
    from softlabels.teacher.job import generate

    assert gen_config.LAYOUTS == tuple(layouts.LAYOUTS) and gen_config.LOGITS_DTYPES == tuple(format.LOGITS_DTYPES)
    assert train_config.LOSS_NAMES == tuple(losses.LOSSES)
    for fn, cls in ((generate, gen_config.GenerateConfig), (evaluate, eval_config.EvalConfig)):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, param in inspect.signature(fn).parameters.items():
            if name in defaults and param.default is not inspect.Parameter.empty:
                assert param.default == defaults[name], (fn.__name__, name)


def test_one_device_resolver_and_eval_defaults_to_auto():
    import softlabels.teacher.job as _  # noqa: F401 - the module, for its namespace

    assert not hasattr(sys.modules["softlabels.teacher.job"], "_pick_device")
    assert _options("eval")["device"].default == "auto" == eval_config.EvalConfig.device
    from softlabels._runtime.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


# -- item 6: --threads ------------------------------------------------------------------------------
def test_threads_option_sets_torch_threads(world, elsewhere):
    before = torch.get_num_threads()
    try:
        for command in ("generate", "train", "eval"):
            assert _options(command)["threads"].default == 1
        generate(world, "t.h5", "--threads", 2)
        assert torch.get_num_threads() == 2
        ok(cli("train", "--student", "linear", "--store", "t.h5", "--epochs", 1, "--out", "run", "--threads", 1))
        assert torch.get_num_threads() == 1
        ok(cli("eval", "--checkpoint", "run", "--data", world / "train.npz", "--threads", 2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert "--threads" in cli("train", "--help").output and "[default: 1]" in cli("train", "--help").output


# -- item 1: stores record absolute data paths ----------------------------------------------------
def test_train_from_another_directory_with_a_relative_data_path(world, elsewhere, monkeypatch):
    monkeypatch.chdir(world)
    generate(world, elsewhere / "lab.zarr", data="train.npz?unlabeled")  # relative to the data's directory
    monkeypatch.chdir(elsewhere / "..")
    spec = read_plain(elsewhere / "lab.zarr")[1]["source"]["spec"]
    assert spec == f"{world / 'train.npz'}?unlabeled"
    r = ok(cli("train", "--student", "linear", "--store", elsewhere / "lab.zarr", "--alpha", 0, "--epochs", 1,
               "--out", elsewhere / "run"))
    assert f"inputs for {elsewhere / 'lab.zarr'}: {spec}" in r.output


# -- item 3: the teacher gives the class count ------------------------------------------------------
def test_unlabeled_data_needs_no_num_classes(world, elsewhere):
    generate(world, "pool.h5", data=world / "pool.npz")  # built-in: C from its weights
    assert read_plain(elsewhere / "pool.h5")[1]["num_classes"] == C
    ok(cli("generate", "--teacher", "firstuse_models:seven", "--data", world / "pool.npz", "--out", "seven.h5"))
    arrays, attrs = read_plain(elsewhere / "seven.h5")
    assert attrs["num_classes"] == 7 and arrays["logits"].shape == (N, 7)  # the teacher's output width


def test_labels_that_do_not_cover_every_class_take_the_teachers_width(world, elsewhere):
    np.savez("three.npz", x=np.zeros((8, D), np.float32), y=np.arange(8) % 3)  # labels 0..2 only
    generate(world, "three.h5", data="three.npz")
    assert read_plain(elsewhere / "three.h5")[1]["num_classes"] == C


def test_factory_data_with_labels_but_no_class_count_trains(world, elsewhere):
    r = ok(cli("train", "--student", "linear", "--data", "firstuse_models:labeled", "--epochs", 1, "--out", "run"))
    assert json.loads(Path("run/summary.json").read_text())["config"]["num_classes"] == C, r.output


# -- item 4: warnings where an option has no effect -----------------------------------------------
def test_warnings_for_options_without_effect(world, elsewhere):
    generate(world, "pool.h5", data=world / "pool.npz")
    train = ["train", "--student", "linear", "--store", "pool.h5", "--epochs", 1]
    r = ok(cli(*train, "--alpha", 0.5, "--out", "a"))
    assert "warning: the stores hold no labels, so --alpha 0.5 only scales the soft loss" in r.output
    assert "warning" not in ok(cli(*train, "--alpha", 0, "--out", "b")).output
    r = ok(cli(*train, "--alpha", 0, "--loss", "mse", "--temperature", 4, "--out", "c"))
    assert "warning: --temperature has no effect with --loss mse" in r.output
    r = ok(cli("generate", "--teacher", "mlp", "--random-teacher", "--num-classes", C, "--data", world / "train.npz",
               "--out", "x.h5", "--allow-pickle"))
    assert "warning: --allow-pickle has no effect without --weights" in r.stderr


# -- item 5: no bar in a log, periodic lines instead -------------------------------------------------
def test_progress_in_a_log_is_lines_not_a_bar(world, elsewhere, monkeypatch):
    monkeypatch.setattr(_progress, "LINE_EVERY_S", 0.0)  # a line at every update
    r = generate(world, "s.h5", "--batch-size", 16)  # a line after each batch (batches are --batch-size rows)
    assert "\r" not in r.output and re.search(r"^generate: 16/48 samples \(33%\)", r.stderr, re.M), r.stderr
    r = ok(cli("train", "--student", "linear", "--store", "s.h5", "--epochs", 2, "--batch-size", 16, "--out", "run"))
    assert "\r" not in r.output
    assert re.search(r"^epoch 1/2: 1/3 batches \(33%\).*, loss ", r.output, re.M), r.output
    assert re.search(r"^epoch 2/2: loss \d", r.output, re.M), r.output


# -- item 7: help texts, usage errors, options -------------------------------------------------------
def test_help_lists_whole_summaries_and_sentences():
    text = cli("--help").output
    for name in COMMANDS:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(name + " "))
        assert line.rstrip().endswith(".") and "..." not in line, line
    for name in COMMANDS:
        for opt in main.commands[name].params:
            if isinstance(opt, click.Option) and opt.help:
                assert opt.help[0].isupper() and opt.help.endswith("."), (name, opt.name, opt.help)
    assert "?unlabeled" in cli("generate", "--help").output
    assert "--allow-pickle" in cli("train", "--help").output


@pytest.mark.parametrize("args, reason", [
    (["train", "--student", "mlp", "--data", "x.npz", "--out", "FILE"], "invalid value for '--out'"),
    (["report", "DIR", "--out", "DIR"], "invalid value for '--out'"),
    (["generate", "--teacher", "mlp", "--data", "x.npz", "--out", "s.h5", "--weights", "DIR"],
     "invalid value for '--weights'"),
    (["generate", "--teacher", "mlp", "--data", "x.npz"], "missing option '--out'"),
    (["train", "--bogus"], "no such option '--bogus'"),
    (["nosuchcommand"], "no such command 'nosuchcommand'"),
])
def test_usage_errors_are_one_error_line(elsewhere, args, reason):
    Path("FILE").write_text("x")
    Path("DIR").mkdir()
    r = cli(*args)
    assert r.exit_code == 2 and r.stdout == "", r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: softlabels") and reason in lines[0], r.stderr
    assert lines[0].endswith(" --help'") and "Usage:" not in r.output


@pytest.mark.parametrize("spec", ["a\nb", "\x1e", "x\u2028y", "\r"])
def test_an_error_quoting_a_line_break_stays_one_line(elsewhere, spec):
    r = cli("generate", "--teacher", "mlp", "--random-teacher", "--data", spec, "--out", "s.h5")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert repr(spec)[1:-1] in r.stderr  # written as an escape, so the input can still be told apart


# -- item 8: the docs say what remains a user choice; README is short and indexes them ---------------
DOCS = ROOT / "docs"


def _readme_block(heading: str, lang: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(rf"^## {re.escape(heading)}\n.*?```{lang}\n(.*?)```", readme, re.S | re.M)[1]


def test_usage_has_troubleshooting_and_readme_the_setup_time():
    usage = (DOCS / "USAGE.md").read_text()
    faq = usage[usage.index("## Troubleshooting"):]
    for topic in ("--threads", "label −1", "divided by *all* rows", "--random-teacher", "**absolute**"):
        assert topic in faq, topic
    assert "about 1.5 minutes more the first time" in (ROOT / "README.md").read_text()  # the demo with its setup


def test_readme_is_short_shows_the_two_commands_and_indexes_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    commands = [ln.split()[0] for ln in _readme_block("Two commands", "bash").splitlines() if ln[:1].isalpha()]
    assert commands == ["tools/demo", "tools/test"]  # .ci/run runs tools/test
    assert all((ROOT / c).is_file() for c in commands) and "exec tools/test" in (ROOT / ".ci" / "run").read_text()
    index = readme[readme.index("## Documentation"):]
    listed = re.findall(r"^\| \[docs/([A-Za-z]+\.md)\]\(docs/\1\) \| \S", index, re.M)
    assert sorted(listed) == sorted(p.name for p in DOCS.glob("*.md")), "one row per doc in docs/"


def test_no_dead_links_to_docs_or_tools():
    tools = list((ROOT / "tools").rglob("*.py"))
    for path in [*(ROOT / "softlabels").rglob("*.py"), ROOT / "README.md", *DOCS.glob("*.md"), *tools]:
        text = path.read_text()
        for ref in re.findall(r"docs/[A-Z]+\.md", text):
            assert (ROOT / ref).is_file(), f"{path} cites {ref}, which does not exist"
        for ref in re.findall(r"tools/[\w/]+\.py", text):
            assert (ROOT / ref).is_file(), f"{path} cites {ref}, which does not exist"
        if path.parent == DOCS:  # links between the docs are relative
            for ref in re.findall(r"\]\(([A-Z]+\.md)(?:#[\w-]+)?\)", text):
                assert (DOCS / ref).is_file(), f"{path} links {ref}, which does not exist"


def test_readme_library_example_runs(tmp_path, monkeypatch):
    """README's library example, as written there, on a tiny train.npz and teacher.pt made here."""
    from softlabels.teacher.models import build_model

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.savez("train.npz", x=rng.random((96, 64), dtype=np.float32), y=np.arange(96) % 10)
    torch.save(build_model("mlp-large", (64,), 10).state_dict(), "teacher.pt")
    scope: dict = {}
    exec(_readme_block("The library in your own loop", "python"), scope)  # noqa: S102 - our own documentation
    assert Path("logits.zarr").is_dir() and scope["loss"].ndim == 0 and torch.isfinite(scope["loss"])


@pytest.mark.parametrize("bad", [True, 2.5, None, "8", float("nan")])
def test_every_config_refuses_a_size_that_is_not_an_integer_in_one_line(tmp_path, bad):
    """One bound check serves every config: a bool is not a count, a float or None is not a size."""
    gen = gen_config.GenerateConfig(teacher="mlp", data="digits:train", out=str(tmp_path / "s.h5"),
                                    random_teacher=True, batch_size=bad, num_workers=bad)
    assert {"--batch-size", "--num-workers"} <= {p.split()[0] for p in gen.problems()}
    train = train_config.TrainConfig(student="mlp", out=str(tmp_path / "run"), batch_size=bad, threads=bad)
    assert {"--batch-size", "--threads"} <= {p.split()[0] for p in train.problems()}
    lr = train_config.TrainConfig(student="mlp", out=str(tmp_path / "run"), lr=True)  # a bool is not a rate
    assert any(p.startswith("--lr must be a number > 0") for p in lr.problems())
    assert not list(tmp_path.iterdir())  # refused before anything was written
