"""docs/ERRORS.md, machine-checked: every catalogued error, triggered for real.

Each ``E`` row of the catalogue has a case here that makes that exact situation and
runs the real CLI (click's CliRunner on ``softlabels.cli.main``) on tiny data made
in the test. The test then checks the output: exit status 2, exactly one stderr
line, starting with ``error: ``, no traceback, and the message matching the one the
row quotes (the doc's ``<placeholders>`` match anything). It also checks that the
exception behind the line is, or subclasses, every class the row names. Each ``L``
row (library only) is raised through the library and checked the same way. Rows
that cannot run here name their test in COVERED_ELSEWHERE. The meta-tests at the end
keep the doc and the cases in step. The whole file takes about 10 s.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import click
import h5py
import numpy as np
import pytest
import torch
import zarr

from softlabels.teacher.models import build_model
from tests.conftest import make_rows, run_cli, write_store

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ERRORS.md"
N, D, C = 40, 6, 4
CHUNK, BATCH = 16, 8  # 3 chunks per store

# Rows that need more than one process: the test that covers each.
COVERED_ELSEWHERE = {
    "E951": "tests/test_generate_distributed.py::test_two_ranks_equal_one_process",
    # --augment specs, raised through the library until generate takes --augment
    **{f"E{i}": "tests/test_augment.py::test_errors_match_the_catalogue" for i in range(1408, 1418)},
    "E1419": "tests/test_augment.py::test_errors_match_the_catalogue",
    # token generate (softlabels.teacher.tokens)
    "E1800": "tests/test_token_producer.py::test_token_producer_refusals",
    "E1782": "tests/test_augment.py::test_errors_match_the_catalogue",  # a user op module on sys.path
    "E1541": "tests/test_hf_cli.py::test_a_broken_torchvision_is_named_with_its_fix",  # a broken package, in a subprocess
    "E1430": "tests/test_torchvision_names.py::test_what_cannot_replay_is_refused_in_one_line",
    "L2405": "tests/test_library.py::test_views_hand_the_transform_the_stored_parameters",  # a views store
    "L2406": "tests/test_library.py::test_token_targets_align_with_input_ids",  # a token store
    # object storage: a moto S3 server (tests/test_object_store.py checks each message against its row)
    **{f"E{i}": "tests/test_object_store.py::test_bad_urls_one_line" for i in (2501, 2502, 2503, 2504, 2505, 2506,
                                                                             2507, 2511, 2512)},
    "E2508": "tests/test_object_store.py::test_two_writers_one_store",
    "E2509": "tests/test_object_store.py::test_two_writers_one_store",
    "E2510": "tests/test_object_store.py::test_faults_are_retried_never_wrong",
}

# Cases of known bugs: they must fail until the bug is fixed (strict xfail), then the mark goes.
KNOWN_BUGS: dict[str, str] = {}


# -- the catalogue ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    id: str
    classes: tuple[str, ...]  # the exception column's `Names`
    message: str  # the message column's quoted text, with <placeholders>
    text: str  # the whole row

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(".*?".join(re.escape(part) for part in re.split(r"<[^<>]+>", self.message)))


def read_catalogue() -> tuple[list[str], dict[str, Row]]:
    """Every row id in document order (duplicates kept), and the rows by id."""
    ids, rows = [], {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*([EL]\d{3,4})\s*\|(.*)", line)
        if not m:
            continue
        cells = re.split(r"(?<!\\)\|", m[2])
        quoted = re.search(r"`([^`]*)`", cells[1])
        assert quoted, f"{m[1]}: the message column quotes no message"
        ids.append(m[1])
        rows[m[1]] = Row(m[1], tuple(re.findall(r"`([A-Za-z_]\w*)`", cells[0])), quoted[1].replace("\\|", "|"), line)
    return ids, rows


IDS, ROWS = read_catalogue()


# -- tiny inputs, weights, stores and a training run, shared by every case ---------------------------
MODELS = '''
import torch
from torch import nn

NOT_CALLABLE = 3

def boom(): raise ValueError("bad factory")
def not_a_module(): return 42
def wrong_input(): return nn.Linear(7, 4)
def wrong_width(): return nn.Linear(6, 3)

class TupleOut(nn.Linear):
    def forward(self, x): return (super().forward(x),)

class OutOfMemory(nn.Linear):
    def forward(self, x): raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

class CtrlCTeacher(nn.Linear):  # Ctrl-C at the first real batch (the first call is a 2-row probe)
    def forward(self, x):
        if x.shape[0] != 2: raise KeyboardInterrupt
        return super().forward(x)

class CtrlCStudent(nn.Linear):  # Ctrl-C at the first training step
    def forward(self, x):
        if self.training: raise KeyboardInterrupt
        return super().forward(x)

class TermTeacher(nn.Linear):  # SIGTERM to this process at the first real batch
    def forward(self, x):
        if x.shape[0] != 2:
            import os, signal
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)

class TermStudent(nn.Linear):  # SIGTERM at the first training step
    def forward(self, x):
        if self.training:
            import os, signal
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)

def tuple_out(): return TupleOut(6, 4)
def term_teacher(): return TermTeacher(6, 4)
def term_student(): return TermStudent(6, 4)
def oom(): return OutOfMemory(6, 4)
def ctrl_c_teacher(): return CtrlCTeacher(6, 4)
def ctrl_c_student(): return CtrlCStudent(6, 4)
'''

DATASETS = '''
import torch
from torch.utils.data import Dataset, IterableDataset
from softlabels.inputs.arrays import InputDataset

class Items(Dataset):
    def __init__(self, items, **attrs): self.items = items; self.__dict__.update(attrs)
    def __len__(self): return len(self.items)
    def __getitem__(self, i): return self.items[i]

class Stream(IterableDataset):
    def __iter__(self): yield torch.zeros(6)

class Broken(Dataset):
    def __len__(self): return 3
    def __getitem__(self, i): raise IndexError("no item here")

class WorkerOnly(InputDataset):  # fine in the main process, fails in a DataLoader worker; an InputDataset
    input_shape, num_classes, has_labels = (6,), 4, True  # is used as it is, so its error is not a DataError
    def __len__(self): return 40
    def __getitem__(self, i):
        if torch.utils.data.get_worker_info() is not None:
            raise OSError("cannot open image 7")
        return torch.zeros(6), torch.tensor(i % 4)

def iterable(): return Stream()
def broken(): return Broken()
def empty(): return Items([])
def three_parts(): return Items([(torch.zeros(6), 1, 2)])
def not_numeric(): return Items([("abc", 1)])
def float_label(): return Items([(torch.zeros(6), 1.5)])
def ragged(): return Items([(torch.zeros(6), 0), (torch.zeros(5), 1)], num_classes=2)
def few_classes(): return Items([(torch.zeros(6), 0), (torch.zeros(6), 5)], num_classes=2)

class Random(Dataset):  # augments in __getitem__
    def __len__(self): return 8
    def __getitem__(self, i): return torch.rand(6), i % 2

def random(): return Random()

def worker_only(): return WorkerOnly()

class LaterFailure(Dataset):  # item 0 fine, item 3 raises: inside generate's loop
    num_classes = 4
    def __len__(self): return 40
    def __getitem__(self, i):
        if i >= 3: raise RuntimeError("disk went away")
        return torch.zeros(6), i % 4

def later_failure(): return LaterFailure()
'''


def invoke(*args: Any):
    return run_cli(*map(str, args))


def train_args(out: Path, *extra: Any, student: Any = "mlp") -> list[Any]:
    return ["train", "--student", student, "--epochs", "1", "--batch-size", "16", "--no-progress", "--out", out, *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    y = rng.permutation(np.arange(N) % C).astype(np.int64)  # every class present: C = 4
    x_nan = x.copy()
    x_nan[[3, 20]] = np.nan
    for name, arrays in {"data": dict(x=x, y=y), "other": dict(x=x + 1, y=y), "short": dict(x=x[:10], y=y[:10]),
                         "wide": dict(x=np.zeros((N, D + 1), np.float32), y=y), "nan": dict(x=x_nan, y=y)}.items():
        np.savez(d / f"{name}.npz", **arrays)
    torch.manual_seed(0)
    torch.save(build_model("mlp", (D,), C).state_dict(), d / "w.pt")
    modules = {"errcat_models": MODELS, "errcat_data": DATASETS, "errcat_broken": "import not_a_real_package_zz\n"}
    for name, source in modules.items():
        (d / f"{name}.py").write_text(source)
    e = SimpleNamespace(data=d / "data.npz", other=d / "other.npz", short=d / "short.npz", wide=d / "wide.npz",
                        nan=d / "nan.npz", w=d / "w.pt", h5=d / "s.h5", zarr=d / "s.zarr", topk=d / "k.h5",
                        run=d / "run")
    for out, extra in ((e.h5, []), (e.zarr, []), (e.topk, ["--layout", "topk", "--topk", "2"])):
        r = invoke("generate", "--teacher", "mlp", "--weights", e.w, "--data", e.data, "--chunk-rows", CHUNK,
                   "--batch-size", BATCH, "--no-progress", "--out", out, *extra)
        assert r.exit_code == 0, r.output
    r = invoke(*train_args(e.run, "--store", e.h5))
    assert r.exit_code == 0, r.output
    sys.path.insert(0, str(d))
    yield e
    sys.path.remove(str(d))
    for name in modules:
        sys.modules.pop(name, None)


@dataclass
class Ctx:
    """What a case gets: the shared files, its own directory, monkeypatch and cleanups."""

    env: SimpleNamespace
    tmp: Path
    mp: pytest.MonkeyPatch
    cleanups: list[Callable[[], Any]] = field(default_factory=list)

    cli = staticmethod(invoke)

    def gen(self, *extra: Any, out: Path | None = None, teacher: str = "mlp", weights: Path | None = None,
            data: Any = None):
        """``softlabels generate`` of the shared data (by default a seeded random-init ``mlp``, no weights)."""
        args = ["generate", "--teacher", teacher, *(["--weights", weights] if weights else ["--random-teacher"]),
                "--data", data or self.env.data, "--out", out or self.tmp / "o.h5", "--chunk-rows", CHUNK,
                "--batch-size", BATCH, "--no-progress", *extra]
        return invoke(*args)

    def train(self, *extra: Any, out: Path | None = None, student: Any = "mlp"):
        return invoke(*train_args(out or self.tmp / "run", *extra, student=student))

    def copy(self, src: Path) -> Path:
        dst = self.tmp / src.name
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
        return dst

    def write(self, name: str, content: bytes | str) -> Path:
        p = self.tmp / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
        return p

    def mkdir(self, name: str) -> Path:
        (self.tmp / name).mkdir()
        return self.tmp / name

    def npz(self, name: str, **arrays: np.ndarray) -> str:
        np.savez(self.tmp / name, **arrays)
        return str(self.tmp / name)

    def tmpfs(self, size: str) -> Path:
        mnt = self.tmp / "mnt"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        self.cleanups.append(lambda: subprocess.run(["umount", "-l", str(mnt)], capture_output=True))
        return mnt


def run_process(*args: Any) -> SimpleNamespace:
    """The console entry point in a real process (no exception object to inspect)."""
    p = subprocess.run([sys.executable, "-m", "softlabels", *map(str, args)], capture_output=True, text=True,
                       timeout=120)
    return SimpleNamespace(exit_code=p.returncode, stdout=p.stdout, stderr=p.stderr, output=p.stdout + p.stderr,
                           in_process=False)


def edit_h5(path: Path, edit: Callable[[h5py.File], Any]) -> Path:
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def set_h5_attr(path: Path, name: str, value: Any) -> Path:
    return edit_h5(path, lambda f: f.attrs.__setitem__(name, value))


def edit_zarr_attrs(path: Path, **attrs: Any) -> Path:
    zarr.open_group(str(path), mode="r+").attrs.update(attrs)
    return path


def damage_chunk(store: Path, damage: Callable[[bytes], bytes]) -> Path:
    chunk = store / "logits" / "c.1.0"  # chunk 1 (rows 16..32) of a Zarr store
    chunk.write_bytes(damage(chunk.read_bytes()))
    return store


def set_value(store: Path, name: str, row: int, value: int) -> Path:
    """Write one value into a sample or views store (HDF5 or Zarr) and re-checksum its unit: damage that
    checksums cannot see."""
    from softlabels.store.backend import open_backend
    from softlabels.store.schema import StoreMetaV2, unit_checksum

    def edit(set_row: Callable[[Any], None]) -> None:
        if store.suffix == ".zarr":
            set_row(zarr.open_group(str(store), mode="r+"))
            return
        with h5py.File(store, "r+") as f:
            set_row(f)

    edit(lambda f: f[name].__setitem__(row, value))
    b = open_backend(store, "r")
    meta = StoreMetaV2.from_attrs(b.attrs())
    u = row // meta.geometry.unit_samples
    s0, s1 = meta.geometry.unit_samples_range(u)
    block = {k: b.read(k, s0, s1) for k in meta.checksum_order()}
    b.close()
    edit(lambda f: f["unit_checksums"].__setitem__(u, unit_checksum(meta, block)))
    return store


def flip_a_bit(data: bytes) -> bytes:
    return data[:5] + bytes([data[5] ^ 0x10]) + data[6:]


def plain_h5(path: Path) -> Path:
    """An HDF5 file that is no store."""
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    return path


def _drop_arrays(f: h5py.File) -> None:
    for name in list(f):
        del f[name]


def _short_labels(f: h5py.File) -> None:
    del f["labels"]
    f.create_dataset("labels", data=np.zeros(9, np.int64), chunks=(8,))


# -- the cases: one per E row; each returns the CLI's result ----------------------------------------
CASES: dict[str, Callable[[Ctx], Any]] = {
    # 1. store paths and formats
    "E101": lambda c: c.cli("inspect", c.tmp / "nope.h5"),
    "E102": lambda c: c.cli("inspect", c.tmp / "store-without-suffix"),
    "E103": lambda c: c.cli("inspect", c.write("junk.h5", b"not hdf5 at all")),
    "E104": lambda c: c.cli("inspect", c.mkdir("empty.zarr")),
    "E106": lambda c: c.cli("inspect", plain_h5(c.tmp / "plain.h5")),
    "E107": lambda c: c.cli("inspect", set_h5_attr(c.copy(c.env.h5), "softlabels_format", 7)),
    "E108": lambda c: c.gen(out=c.tmp / "s.txt"),
    "E109": lambda c: c.gen(out=c.write("junk.h5", b"not hdf5 at all")),
    # 2. incomplete or damaged stores
    "E202": lambda c: c.cli("inspect", edit_h5(c.copy(c.env.h5), lambda f: f["unit_done"].__setitem__(1, 0))),
    "E203": lambda c: c.cli("inspect", edit_h5(c.copy(c.env.h5), _short_labels)),
    "E204": lambda c: c.cli("inspect", edit_h5(c.copy(c.env.h5), _drop_arrays)),
    "E205": lambda c: c.cli("inspect", edit_zarr_attrs(c.copy(c.env.zarr), chunk_samples=0)),
    "E208": lambda c: c.cli("inspect", edit_zarr_attrs(c.copy(c.env.zarr), teacher=[1, 2])),
    "E209": lambda c: c.train("--store", damage_chunk(c.copy(c.env.zarr), flip_a_bit)),
    "E210": lambda c: c.train("--store", damage_chunk(c.copy(c.env.zarr), lambda b: b[:7])),
    "E211": lambda c: c.gen("--dtype", "float16", weights=c.env.w, out=c.copy(c.env.h5)),
    "E212": lambda c: c.gen("--repair", out=c.tmp / "none.h5"),
    "E213": lambda c: c.gen("--repair", "--overwrite"),
    # 3. models and weights (the factories are in MODELS)
    "E301": lambda c: c.gen(teacher="no-such-model"),
    "E302": lambda c: c.gen(teacher=":make"),
    "E303": lambda c: c.gen(teacher="errcat_broken:make"),
    "E304": lambda c: c.gen(teacher="errcat_models:nothere"),
    "E305": lambda c: c.gen(teacher="errcat_models:NOT_CALLABLE"),
    "E306": lambda c: c.gen(teacher="errcat_models:boom"),
    "E307": lambda c: c.gen(teacher="errcat_models:not_a_module"),
    "E308": lambda c: c.gen(teacher=str(c.tmp / "missing.pt")),
    "E309": lambda c: c.gen(teacher=str(c.env.w)),  # a state_dict given as the model
    "E310": lambda c: c.gen(weights=c.tmp / "missing.pt"),
    "E312": lambda c: c.gen("--allow-pickle", weights=c.write("garbage.pt", b"garbage, not a torch file")),
    "E313": lambda c: c.gen(weights=c.write("empty.pt", b"")),
    "E316": lambda c: c.gen(teacher="cnn"),  # 6 features are no image
    "E317": lambda c: c.gen(teacher="errcat_models:wrong_input"),
    "E318": lambda c: c.gen(teacher="errcat_models:tuple_out"),
    "E319": lambda c: c.gen("--num-classes", str(C), teacher="errcat_models:wrong_width"),
    "E320": lambda c: c.gen(teacher="errcat_models:oom"),
    # 4. data specs and fingerprints (the factories are in DATASETS)
    "E401": lambda c: c.gen(data="nosuchdata"),
    "E402": lambda c: c.gen(data="digits:tain"),
    "E403": lambda c: c.gen(data=f"{c.env.data}?unlabelled"),
    "E404": lambda c: c.gen(data=str(c.write("data.txt", "1 2 3\n"))),
    "E405": lambda c: c.gen(data=str(c.tmp / "missing.npz")),
    "E406": lambda c: c.gen(data=str(c.write("bad.npz", b"not a zip file"))),
    "E407": lambda c: c.gen(data=f"{c.write('bad.h5', b'not hdf5')}:x"),
    "E408": lambda c: c.gen(data=f"{c.env.data}:inputs,labels"),
    "E410": lambda c: c.gen(data=c.npz("complex.npz", x=np.zeros((3, D), np.complex64))),
    "E411": lambda c: c.gen(data=c.npz("labels.npz", x=np.zeros((3, D), np.float32), y=np.array([0.5, 1, 2]))),
    "E412": lambda c: c.gen(data=c.npz("empty.npz", x=np.zeros((0, D), np.float32), y=np.zeros(0, np.int64))),
    "E413": lambda c: c.gen(data=c.npz("unlabeled.npz", x=np.zeros((3, D), np.float32))),
    "E414": lambda c: c.gen("--num-classes", "2"),
    "E415": lambda c: c.gen(data="errcat_data:few_classes"),
    "E416": lambda c: c.gen(data="errcat_data:iterable"),
    "E417": lambda c: c.gen(data="errcat_data:broken"),
    "E418": lambda c: c.gen(data="errcat_data:empty"),
    "E419": lambda c: c.gen(data="errcat_data:three_parts"),
    "E420": lambda c: c.gen(data="errcat_data:not_numeric"),
    "E421": lambda c: c.gen(data="errcat_data:float_label"),
    "E422": lambda c: c.gen(data="errcat_data:ragged"),
    "E423": lambda c: c.train("--store", c.env.h5, "--data", c.env.other),
    "E427": lambda c: c.train("--data", f"{c.env.data}?unlabeled"),
    "E428": lambda c: c.train("--data", c.env.data, "--data", c.env.wide),
    "E429": lambda c: c.train("--data", c.env.data, "--val-data", c.env.wide),
    "E430": lambda c: c.cli("eval", "--checkpoint", c.env.run, "--data", c.env.wide),
    # 5. options, devices and losses
    "E501": lambda c: c.gen("--layout", "topk"),
    "E502": lambda c: c.gen("--topk", "3"),
    "E503": lambda c: c.gen("--layout", "topk", "--topk", str(C + 1)),
    "E504": lambda c: c.gen("--chunk-rows", "0"),
    "E505": lambda c: c.gen("--num-workers", "-1"),
    "E506": lambda c: c.gen("--shard-chunks", "2"),
    "E507": lambda c: c.gen("--device", "bogus"),
    "E508": lambda c: c.gen("--device", "mps"),
    "E509": lambda c: c.gen("--device", "cuda:99"),
    "E511": lambda c: c.train("--store", c.env.h5, "--epochs", "0"),
    "E512": lambda c: c.train("--store", c.env.h5, "--warmup-steps", "-1"),
    "E513": lambda c: c.train("--store", c.env.h5, "--lr", "-1"),
    "E514": lambda c: c.train("--store", c.env.h5, "--weight-decay", "-1"),
    "E515": lambda c: c.train("--store", c.env.h5, "--temperature", "0"),
    "E516": lambda c: c.train("--store", c.env.h5, "--alpha", "2"),
    "E517": lambda c: c.train("--store", c.env.h5, "--loss", "kl2"),
    "E518": lambda c: c.train("--store", c.env.h5, "--data", c.env.data, "--data", c.env.data),
    "E519": lambda c: c.train(),
    "E520": lambda c: c.train("--data", c.env.data, "--temperature", "2"),
    "E521": lambda c: c.train("--store", c.env.h5, "--resume", "--overwrite"),
    "E522": lambda c: c.train("--store", c.env.topk, "--loss", "kl"),
    "E523": lambda c: c.train("--store", c.env.h5, "--loss", "topk_kl"),
    # 6. run directories, resume, checkpoints, reports, Ctrl-C
    "E601": lambda c: c.train("--store", c.env.h5, out=c.env.run),
    "E602": lambda c: c.train("--store", c.env.h5, "--resume", "--lr", "0.5", out=c.env.run),
    "E604": lambda c: c.cli("eval", "--checkpoint", c.tmp / "nope", "--data", c.env.data),
    "E605": lambda c: c.cli("eval", "--checkpoint", c.env.run / "model.pt", "--data", c.env.data),
    "E608": lambda c: c.cli("report", c.tmp / "nope"),
    "E609": lambda c: c.cli("report", c.tmp),
    "E611": lambda c: c.gen(teacher="errcat_models:ctrl_c_teacher"),
    "E612": lambda c: c.train("--data", c.env.data, student="errcat_models:ctrl_c_student"),
    # 8. OS errors; 9. non-finite values
    "E805": lambda c: c.gen(out=c.write("a-file", "x") / "s.zarr"),
    "E901": lambda c: c.gen(data=c.env.nan),
    "E902": lambda c: c.train("--data", c.env.data, "--lr", "1e30", "--batch-size", "4"),
    # 12. first use
    "E1201": lambda c: c.train("--store", c.env.h5, "--no-such-option"),
    "E1202": lambda c: c.train("--store", c.env.h5, "--threads", "-1"),
    "E1203": lambda c: c.gen(teacher="errcat_models:wrong_width"),  # 3 outputs, labels up to 3

    # 13. reading and writing
    "E1301": lambda c: c.train("--store", set_value(c.copy(c.env.h5), "labels", 20, 99)),
    "E1302": lambda c: c.train("--store", set_value(c.copy(c.env.topk), "topk_indices", 20, C + 3),
                               "--loss", "topk_kl"),
    "E1303": lambda c: c.train("--data", "errcat_data:worker_only", "--num-workers", "2"),
    "E1111": lambda c: c.train("--store", set_value(c.copy(c.env.h5), "sample_ids", 1, 20)),
    "E1112": lambda c: c.train("--store", set_value(c.copy(c.env.h5), "sample_ids", 1, -5)),
}


def case(cid: str, table: dict = CASES):
    def register(fn):
        assert cid not in table, cid
        table[cid] = fn
        return fn
    return register


@case("E105")
def _(c):
    (c.mkdir("bad.zarr") / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array"}')
    return c.cli("inspect", c.tmp / "bad.zarr")


@case("E201")
def _(c):
    from softlabels.store.writer import UnitWriter

    p = c.copy(c.env.zarr)
    w = UnitWriter.resume(p)
    w.invalidate([2])
    w.close()
    return c.train("--store", p)


@case("E206")
def _(c):
    p = c.copy(c.env.zarr)
    meta = json.loads((p / "zarr.json").read_text())
    del meta["attributes"]["layout"]
    (p / "zarr.json").write_text(json.dumps(meta))
    return c.cli("inspect", p)


@case("E207")
def _(c):
    # In a real process: in this one the reader would leave h5py's global lock held by a
    # suspended generator, and later HDF5 use from another thread could deadlock.
    return run_process("inspect", set_h5_attr(c.copy(c.env.h5), "teacher", "{broken"))


@case("E311")
def _(c):
    torch.save(build_model("mlp", (D,), C), c.tmp / "whole-model.pt")  # pickles the module object
    return c.gen(weights=c.tmp / "whole-model.pt")


@case("E314")
def _(c):
    torch.save([torch.zeros(3)], c.tmp / "list.pt")
    return c.gen(weights=c.tmp / "list.pt")


@case("E315")
def _(c):
    torch.save(build_model("mlp", (D - 1,), C).state_dict(), c.tmp / "w5.pt")
    return c.gen(weights=c.tmp / "w5.pt")


@case("E321")
def _(c):
    torch.jit.save(torch.jit.script(torch.nn.Linear(D, C + 3)), c.tmp / "wide.pt")  # 7 outputs, C = 4
    return c.train("--store", c.env.h5, student=c.tmp / "wide.pt")


@case("E322")
def _(c):
    torch.export.save(torch.export.export(build_model("linear", (D,), C), (torch.zeros(2, D),)), c.tmp / "s.pt2")
    return c.train("--store", c.env.h5, student=c.tmp / "s.pt2")


@case("E409")
def _(c):
    np.save(c.tmp / "x.npy", np.zeros((3, D), np.float32))
    return c.gen(data=f"{c.tmp / 'x.npy'}:x")


@case("E424")
def _(c):  # made by the library without a fingerprint; its recorded data is too short
    p = write_store(c.tmp / "no-fingerprint.h5", make_rows(N, C), num_classes=C, source={"spec": str(c.env.short)})
    return c.train("--store", p)


@case("E425")
def _(c):
    return c.train("--store", write_store(c.tmp / "no-source.h5", make_rows(N, C), num_classes=C))


@case("E426")
def _(c):
    p = write_store(c.tmp / "c5.h5", make_rows(N, C + 1), num_classes=C + 1, source={"spec": str(c.env.data)})
    return c.train("--store", c.env.h5, "--store", p)


@case("E431")
def _(c):
    p = write_store(c.tmp / "c5.h5", make_rows(N, C + 1), num_classes=C + 1)
    return c.cli("eval", "--checkpoint", c.env.run, "--data", c.env.data, "--store", p)


@case("E432")
def _(c):
    from softlabels.inputs import digits

    digits._digits_arrays.cache_clear()
    c.mp.setitem(sys.modules, "sklearn.datasets", None)  # import sklearn.datasets -> ImportError
    return c.gen(data="digits:train")


@case("E510")
def _(c):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return c.train("--store", c.env.h5, "--device", "cuda")


@case("E603")
def _(c):
    run = c.copy(c.env.run)
    (run / "checkpoint.pt").write_bytes(b"truncated")
    return c.train("--store", c.env.h5, "--resume", out=run)


@case("E606")
def _(c):
    torch.save({"a": 1}, c.tmp / "other.pt")
    return c.cli("eval", "--checkpoint", c.tmp / "other.pt", "--data", c.env.data)


@case("E607")
def _(c):
    ckpt = torch.load(c.env.run / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "format": 9}, c.tmp / "checkpoint.pt")
    return c.cli("eval", "--checkpoint", c.tmp / "checkpoint.pt", "--data", c.env.data)


@case("E610")
def _(c):
    c.mp.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    return c.cli("report", c.env.run, "--out", c.tmp / "report.md")


@case("E701")
def _(c):
    from softlabels.store.lock import StoreLock

    with StoreLock(c.tmp / "s.zarr"):  # another job holds the store
        return c.gen(out=c.tmp / "s.zarr")


@case("E702")
def _(c):
    p = c.copy(c.env.h5)
    holder = subprocess.Popen(  # another process has the HDF5 file open for writing
        [sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True); "
                               "sys.stdin.read()", str(p)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    c.cleanups.append(lambda: (holder.stdin.close(), holder.wait(timeout=30)))
    assert holder.stdout.readline().strip() == "open"
    return c.cli("inspect", p)


# 8. disk full and read-only: a small tmpfs (skipped where none can be mounted)
@case("E801")
def _(c):  # C = 2000: ~320 KB of logits for a 64 KB disk
    return c.gen("--num-classes", "2000", teacher="linear", out=c.tmpfs("64k") / "s.h5")


@case("E802")
def _(c):
    return c.gen("--num-classes", "2000", teacher="linear", out=c.tmpfs("64k") / "s.zarr")


@case("E803")
def _(c):
    mnt = c.tmpfs("64k")
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    return c.gen(out=mnt / "s.zarr")


@case("E804")
def _(c):
    mnt = c.tmpfs("8k")  # two pages: one for this file, one for the lock file, none for the store
    (mnt / "filler").write_bytes(b"\0" * 4096)
    return c.gen(out=mnt / "s.h5")


@case("E903")
def _(c):
    store = c.tmp / "nan.h5"
    r = c.gen("--on-nonfinite", "record", data=c.env.nan, out=store)
    assert r.exit_code == 0, r.output
    return c.train("--store", store)


@case("E904")
def _(c):  # a record run that stopped before its last unit, resumed in the default mode
    store = c.tmp / "nan.h5"
    assert c.gen("--on-nonfinite", "record", data=c.env.nan, out=store).exit_code == 0
    edit_h5(store, lambda f: (f["unit_done"].__setitem__(2, 0), f.attrs.__setitem__("status", "writing")))
    return c.gen(data=c.env.nan, out=store)


@case("E952")
def _(c):  # a second rank with no rows, simulated: a real torchrun run takes ~20 s on 2 cores
    from softlabels._runtime.device import DistEnv

    def all_reduce(self, t, op=None):  # [max, -min] of the ranks' step counts: another rank has 0
        return torch.tensor([int(t[0]), 0])

    c.mp.setattr(DistEnv, "all_reduce", all_reduce)
    return c.train("--data", c.env.data)


# 14. views and augmentation: image folders
def image_folder(c: Ctx, *images: tuple[str, bytes | tuple[int, int]]) -> Path:
    """DIR/a/<name> for each (name, PNG size (w, h) or raw bytes)."""
    folder = c.tmp / "images" / "a"
    folder.mkdir(parents=True)
    for name, content in images:
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            from PIL import Image

            Image.new("RGB", content).save(folder / name)
    return folder.parent


CASES.update({
    "E1401": lambda c: c.gen(data="errcat_data:random"),
    "E1402": lambda c: c.gen(data=f"imagefolder:{c.tmp / 'nope'}"),
    "E1403": lambda c: c.gen(data=f"imagefolder:{c.mkdir('empty')}"),
    "E1404": lambda c: c.gen(data=f"imagefolder:{c.tmp}?size=big"),
    "E1405": lambda c: c.gen(data=f"imagefolder:{image_folder(c, ('0.png', b'not a png'))}"),
    "E1406": lambda c: c.gen(data=f"imagefolder:{image_folder(c, ('0.png', (8, 8)), ('1.png', (9, 8)))}"),
})


@case("E1407")
def _(c):
    folder = image_folder(c, ("0.png", b"any bytes"))
    c.mp.setitem(sys.modules, "PIL", None)  # from PIL import Image -> ImportError
    return c.gen(data=f"imagefolder:{folder}")


@case("E1420")
def _(c):
    folder = image_folder(c, ("0.png", (8, 8)))
    os.symlink(".", folder / "a" / "self")  # a loop
    return c.gen(data=f"imagefolder:{folder}")


@case("E1421")
def _(c):
    folder = image_folder(c, ("0.png", (8, 8)))
    shutil.copyfile(folder / "a" / "0.png", c.tmp / "outside.png")
    os.symlink(c.tmp / "outside.png", folder / "a" / "1.png")
    return c.gen(data=f"imagefolder:{folder}")


@case("E1422")
def _(c):
    from PIL import Image

    folder = image_folder(c, ("0.png", (8, 8)))
    (folder / "a" / "0.png").unlink()
    Image.fromarray(np.full((8, 8), 2.5, np.float32)).save(folder / "a" / "0.tiff")  # mode F
    return c.gen(data=f"imagefolder:{folder}")


@case("E433")
def _(c):  # in a process of its own, bounded by a timeout: opened, the FIFO would block forever
    os.mkfifo(c.tmp / "pipe.npz")
    return run_process("generate", "--teacher", "mlp", "--random-teacher", "--data", c.tmp / "pipe.npz",
                       "--out", c.tmp / "o.h5", "--no-progress")

# -- 16. compression and fine-tuning ---------------------------------------------------------------
def _compress(c: Ctx, *extra: Any, run: Any = None):
    return c.cli("compress", run or c.env.run, "--out", c.tmp / "c", "--data", c.env.data, "--repeats", "1", *extra)


CASES.update({
    "E1601": lambda c: _compress(c, run=c.tmp / "nope"),
    "E1602": lambda c: _compress(c, run=c.mkdir("empty")),
    "E1604": lambda c: _compress(c, "--prune", "1"),
    "E1605": lambda c: _compress(c, "--finetune-epochs", "0"),
    "E1606": lambda c: _compress(c, "--finetune-lr", "0"),
    "E1610": lambda c: _compress(c, "--out", c.mkdir("existing")),
    "E1611": lambda c: c.cli("compress", c.env.run, "--out", c.tmp / "c", "--data", c.env.wide),
    "E1613": lambda c: c.train("--data", c.env.data, "--init", c.tmp / "nope"),
    "E1614": lambda c: c.train("--data", c.env.data, "--init", c.env.run, "--student-weights", c.env.w),
})


@case("E1603")
def _(c):
    run = c.copy(c.env.run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["config"]["student"] = "errcat_models:wrong_width"
    torch.save(ckpt, run / "checkpoint.pt")
    return _compress(c, run=run)


@case("E1607")
def _(c):
    c.mp.setitem(sys.modules, "torchao", None)  # find_spec -> None: as if not installed
    return _compress(c, "--quantize", "int8-weight")


@case("E1608")
def _(c):
    c.mp.setitem(sys.modules, "onnxscript", None)
    return _compress(c, "--onnx")


@case("E1609")
def _(c):
    assert c.train("--data", c.env.data, student="linear").exit_code == 0
    return _compress(c, "--prune-structured", "0.5", run=c.tmp / "run")


@case("E1612")
def _(c):
    return _compress(c, "--store", write_store(c.tmp / "c3.h5", make_rows(N, 3), num_classes=3))


@case("E1713")
def _(c):
    return c.gen("--compress")  # the default layout is dense


# -- 17. format-2 generate: views, the sampled layout ------------------------------------------------
def image_npz(c: Ctx, n: int = N) -> Path:
    """Tiny 3x8x8 image data (views need images)."""
    path = c.tmp / f"img{n}.npz"
    np.savez(path, x=np.random.default_rng(0).random((n, 3, 8, 8)).astype(np.float32),
             y=np.arange(n) % C)
    return path


def views_store(c: Ctx, augment: str = "flip", data: Path | None = None) -> Path:
    out = c.tmp / "views.zarr"
    r = c.gen("--views", "2", "--augment", augment, data=data or image_npz(c), out=out)
    assert r.exit_code == 0, r.output
    return out


CASES.update({
    "E1418": lambda c: c.gen("--views", "2", "--augment", "flip"),  # flat 6-vectors, no images
    "E1700": lambda c: c.gen("--views", "2"),
    "E1701": lambda c: c.gen("--augment", "flip"),
    "E1702": lambda c: c.gen("--layout", "sampled", "--samples", "0"),
    "E1703": lambda c: c.gen("--samples", "4"),
    "E1705": lambda c: c.gen("--views", "0", "--augment", "flip"),
    "E1706": lambda c: c.gen(out=c.copy(ROOT / "tests" / "fixtures" / "v1" / "dense.h5")),
    "E1708": lambda c: c.gen("--views-from", c.env.zarr, data=image_npz(c)),
    "E1709": lambda c: c.gen("--views-from", views_store(c), data=image_npz(c, N // 2)),
    "E1710": lambda c: c.gen("--views-from", views_store(c), "--augment", "flip(p=0.25)", data=image_npz(c)),
    "E1712": lambda c: c.gen("--views-from", views_store(c), "--views", "3", data=image_npz(c)),
})


@case("E1714")
def _(c):
    store = views_store(c, augment="crop(8,padding=1)")  # 8x8 inputs: offsets 0..2
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["source"] = {k: v for k, v in g.attrs["source"].items() if k != "input_shape"}  # as older stores
    return c.gen("--views-from", set_value(store, "view_params", 3, 7), data=image_npz(c), out=c.tmp / "again.zarr")


@case("E1711")
def _(c):
    (c.tmp / "errcat_aug.py").write_text("from softlabels.inputs.augment import RandomHorizontalFlip\n"
                                         "class make(RandomHorizontalFlip):\n"
                                         "    spec = 'errcat_aug:make'  # recorded as the factory term\n"
                                         "    def __init__(self): super().__init__(0.5)\n")
    c.mp.syspath_prepend(str(c.tmp))
    store = views_store(c, augment="errcat_aug:make")
    return c.gen("--views-from", store, data=image_npz(c))

# 17. reading format-2 stores and views replay
def _v2(c: Ctx, **kw: Any) -> tuple[Path, str]:
    """A format-2 store of tiny images (tests/_v2stores.py) and their data spec."""
    from tests._v2stores import make_images, write_v2

    spec = make_images(c.tmp)
    write_v2(c.tmp / "v2.h5", spec, **kw)
    return c.tmp / "v2.h5", spec


@case("E1761")
def _(c):
    from tests._v2stores import make_images, write_tokens

    write_tokens(c.tmp / "t.h5", make_images(c.tmp))
    return c.train("--store", c.tmp / "t.h5", "--augment", "flip", student="linear")


CASES.update({
    "E1751": lambda c: c.train("--store", _v2(c, positions="views", views_attrs={
        "augment": "crop(6,padding=1)+flip+mypkg.augs:jitter"})[0], student="linear"),
    "E1752": lambda c: c.train("--store", _v2(c, positions="views", views_attrs={"augment": "flip"})[0],
                               student="linear"),
    "E1753": lambda c: c.train("--store", _v2(c, layout="topk")[0], "--loss", "sampled_kl", student="linear"),
    "E1754": lambda c: c.train("--store", _v2(c, source={})[0], "--data", c.npz(
        "few.npz", x=np.zeros((10, 1, 6, 6), np.float32), y=np.zeros(10, np.int64)), student="linear"),
    "E1760": lambda c: c.train("--store", _v2(c, positions="views")[0], "--augment", "flip", student="linear"),
})

# -- 17. ensembles and merge ------------------------------------------------------------------------
def _merge(c: Ctx, *stores: Any, extra: tuple = ()):
    """``softlabels merge`` of ``stores``; a refused merge must leave no output."""
    out = c.tmp / "merged.zarr"
    r = c.cli("merge", *[x for s in stores for x in ("--store", s)], "--out", out, *extra)
    assert r.exit_code == 0 or not out.exists()
    return r


def _sampled(c: Ctx, name: str, seed: int) -> Path:
    """A format-2 sampled store of 12 samples."""
    from softlabels.store.layouts import to_numpy
    from softlabels.store.schema import StoreMetaV2
    from softlabels.store.writer import UnitWriter

    meta = StoreMetaV2(positions="sample", layout="sampled", num_samples=12, num_classes=C, chunk_samples=4,
                       layout_params={"samples": 4, "seed": seed})
    z = torch.from_numpy(np.random.default_rng(seed).standard_normal((12, C)).astype(np.float32))
    enc = meta.layout_obj().encode(z, sample_ids=torch.arange(12), positions=torch.zeros(12, dtype=torch.long))
    with UnitWriter.create(c.tmp / name, meta) as w:
        w.write(0, labels=np.arange(12) % C, sample_ids=np.arange(12), **{k: to_numpy(v) for k, v in enc.items()})
    return c.tmp / name


CASES.update({
    "E1900": lambda c: (c.gen(data=c.env.other, out=c.tmp / "other.h5"), _merge(c, c.env.h5, c.tmp / "other.h5"))[1],
    "E1901": lambda c: _merge(c, c.env.h5, write_store(c.tmp / "c3.h5", make_rows(N, 3), num_classes=3)),
    "E1902": lambda c: _merge(c, c.env.h5, c.env.topk),
    "E1903": lambda c: (c.gen("--chunk-rows", 8, weights=c.env.w, out=c.tmp / "c8.h5"),
                        _merge(c, c.env.h5, c.tmp / "c8.h5"))[1],
    "E1904": lambda c: _merge(c, c.env.h5),
    "E1905": lambda c: _merge(c, c.env.h5, c.env.zarr, extra=("--weights", "1,2,3")),
    "E1906": lambda c: c.cli("merge", "--store", c.env.h5, "--store", c.env.zarr, "--out", c.env.h5),
    "E1907": lambda c: _merge(c, _sampled(c, "a.zarr", 0), _sampled(c, "b.zarr", 1), extra=("--mode", "geometric")),
    "E1908": lambda c: _merge(c, _sampled(c, "a.zarr", 0), _sampled(c, "b.zarr", 1), extra=("--weights", "1.5,1")),
    "E1909": lambda c: _merge(c, _sampled(c, "a.zarr", 0), _sampled(c, "b.zarr", 1), extra=("--temperature", "2")),
    "E1910": lambda c: _merge(c, c.env.h5, c.env.zarr, extra=("--weights", "0,1")),
    "E1912": lambda c: c.train("--ensemble", c.env.h5, "--ensemble", c.env.zarr, "--store", c.env.h5),
    "E1911": lambda c: c.train("--store", _merged(c), "--temperature", "4"),
    "E1913": lambda c: c.cli("merge", "--store", c.env.h5, "--store", _merged(c), "--temperature", "3",
                             "--out", c.tmp / "again.zarr"),
    "E1914": lambda c: _merge(c, c.env.h5, c.env.zarr, extra=("--weights", "1e308,1e308")),
    "E1915": lambda c: c.cli("eval", "--checkpoint", c.env.run, "--data", c.env.data, "--store", _merged(c)),
    "E1916": lambda c: _merge(c, _nan_member(c, 0), _nan_member(c, 1)),
})


def _nan_member(c: Ctx, seed: int) -> Path:
    """A store whose teacher met a NaN input row (the shared data's), written with --on-nonfinite record."""
    x = np.load(c.env.data)["x"].copy()
    x[1] = np.nan
    data = c.npz("nan.npz", x=x, y=np.load(c.env.data)["y"])
    assert c.gen("--on-nonfinite", "record", "--seed", seed, data=data, out=c.tmp / f"nan{seed}.h5").exit_code == 0
    return c.tmp / f"nan{seed}.h5"


# 26. temperatures of sparse stores
def _legacy_topk(c: Ctx) -> Path:
    """A format-2 top-k store written before tails were recorded per T (logsumexp over all C)."""
    rows = make_rows(N, C, layout="topk", k=2)
    return write_store(c.tmp / "legacy.h5", rows, num_classes=C, chunk_rows=CHUNK,
                       source={"spec": str(c.env.data)})


def _sampled_at(c: Ctx, td: str) -> Path:
    out = c.tmp / "s2.h5"
    r = c.gen("--layout", "sampled", "--sample-temperature", td, out=out)
    assert r.exit_code == 0, r.output
    return out


def _ids_only(c: Ctx, name: str) -> Path:
    out = c.tmp / name
    r = c.gen("--layout", "sampled", "--sampled-ids-only", out=out)
    assert r.exit_code == 0, r.output
    return out


CASES.update({
    "E2700": lambda c: c.train("--store", c.env.topk, "--temperature", "3"),
    "E2701": lambda c: c.train("--store", _legacy_topk(c), "--data", c.env.data, "--temperature", "2"),
    "E2702": lambda c: c.train("--store", _sampled_at(c, "2"), "--temperature", "1"),
    "E2703": lambda c: c.gen("--layout", "topk", "--topk", "2", "--tail-temperatures", "1,2,2"),
    "E2704": lambda c: c.gen("--layout", "topk", "--topk", "2", "--tail-temperatures", "0,1"),
    "E2705": lambda c: c.gen("--layout", "topk", "--topk", "2", "--tail-temperatures", "1,two"),
    "E2706": lambda c: c.gen("--layout", "sampled", "--sample-temperature", "0"),
    "E2707": lambda c: c.gen("--tail-temperatures", "1,2"),
    "E2708": lambda c: _merge(c, _ids_only(c, "a.h5"), _ids_only(c, "b.h5")),
    "E2709": lambda c: c.gen("--layout", "sampled", "--sampled-ids-only", data=c.env.nan),
    "E2710": lambda c: c.gen("--layout", "sampled", "--on-nonfinite", "record", data=c.env.nan),
})


def _merged(c: Ctx) -> Path:
    """An arithmetic ensemble store merged at T = 2."""
    r = _merge(c, c.env.h5, c.env.zarr)
    assert r.exit_code == 0, r.output
    return c.tmp / "merged.zarr"


@case("E1304")
def _(c):
    store = set_value(_v2(c, positions="views")[0], "view_params", 3, 7)  # flip = 7, and crop offsets of 7
    return c.train("--store", store, student="linear")


# 20. several views per input read
CASES.update({
    "E1780": lambda c: c.train("--store", _v2(c)[0], "--views-per-sample", "2", student="linear"),
    "E1781": lambda c: c.train("--store", _v2(c, positions="views")[0], "--views-per-sample", "4", student="linear"),
})

# 10. trust boundaries
def pickled_pt2(path: Path, marker: Path) -> Path:
    """A .pt2 program whose sample inputs unpickle to a call that creates ``marker``."""
    import io
    import zipfile

    clean = path.with_name("clean.pt2")
    export_linear(clean)
    buf = io.BytesIO()
    torch.save(((_Touch(marker),), {}), buf)
    with zipfile.ZipFile(clean) as z, zipfile.ZipFile(path, "w") as out:
        for name in z.namelist():
            out.writestr(name, buf.getvalue() if name.endswith("sample_inputs/model.pt") else z.read(name))
    return path


def export_linear(path: Path) -> Path:
    """A clean .pt2 of a linear model over batches of any size."""
    program = torch.export.export(build_model("linear", (D,), C), (torch.zeros(2, D),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


class _Touch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def checkpoint_with(c: Ctx, **config: Any) -> Path:
    ckpt = torch.load(c.env.run / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], **config}}, c.tmp / "checkpoint.pt")
    return c.tmp / "checkpoint.pt"


@case("E1001")
def _(c):
    p = write_store(c.tmp / "f.h5", make_rows(N, C), num_classes=C, source={"spec": "errcat_data:empty"})
    return c.train("--store", p)


@case("E1002")
def _(c):
    return c.cli("eval", "--checkpoint", checkpoint_with(c, student="errcat_models:wrong_width"), "--data", c.env.data)


@case("E1003")
def _(c):
    return c.cli("eval", "--checkpoint", checkpoint_with(c, student=None), "--data", c.env.data)


@case("E1004")
def _(c):
    r = c.gen(teacher=str(pickled_pt2(c.tmp / "t.pt2", c.tmp / "marker")))
    assert not (c.tmp / "marker").exists()
    return r


@case("E1005")
def _(c):
    def link_labels(f: h5py.File) -> None:
        del f["labels"]
        f["labels"] = h5py.ExternalLink(str(c.env.topk), "/labels")
    return c.cli("inspect", edit_h5(c.copy(c.env.h5), link_labels))


@case("E1006")
def _(c):
    p = c.copy(c.env.zarr)
    outside = c.write("outside", b"")
    chunk = p / "logits" / "c.1.0"
    chunk.unlink()
    chunk.symlink_to(outside)
    return c.gen("--repair", weights=c.env.w, out=p)


@case("E1007")
def _(c):
    with h5py.File(c.tmp / "in.h5", "w") as f:
        f["x"], f["y"] = np.zeros((N, D), np.float32), np.zeros(N, np.int64)
    return c.gen("--overwrite", data=f"{c.tmp / 'in.h5'}:x,y", out=c.tmp / "in.h5")


@case("E1008")
def _(c):
    run = c.copy(c.env.run)
    return c.train("--store", c.env.h5, "--student-weights", run / "model.pt", "--overwrite", out=run)


@case("E1009")
def _(c):
    return c.cli("generate", "--teacher", "mlp", "--data", c.env.data, "--out", c.tmp / "o.h5")


@case("E1010")
def _(c):
    return c.gen("--random-teacher", weights=c.env.w)


@case("E1011")
def _(c):
    assert c.gen("--seed", "1").exit_code == 0
    return c.gen("--seed", "2")


@case("E1012")
def _(c):
    other = c.tmp / "other.h5"
    assert c.gen(out=other).exit_code == 0  # the same data, another (random) teacher
    return c.train("--store", other, "--resume", out=c.copy(c.env.run))


@case("E1013")
def _(c):
    from softlabels.store.lock import StoreLock

    with StoreLock(c.tmp / "run"):  # another train holds the run directory
        return c.train("--data", c.env.data, out=c.tmp / "run")


@case("E1014")
def _(c):
    return c.gen(teacher="errcat_models:term_teacher")


@case("E1015")
def _(c):
    return c.train("--data", c.env.data, student="errcat_models:term_student")


# -- 24. format-1 stores and upgrade ---------------------------------------------------------------
V1_FIXTURE = ROOT / "tests" / "fixtures" / "v1" / "dense.h5"


def _v1_partial(c: Ctx) -> Path:
    from tests._v1stores import write_v1

    return write_v1(c.tmp / "partial-v1.h5", make_rows(N, C), num_classes=C, chunk_rows=CHUNK, status="writing",
                    done=[0])


CASES.update({
    "E2401": lambda c: c.cli("upgrade", c.env.h5, "--out", c.tmp / "new.h5"),
    "E2402": lambda c: c.cli("upgrade", _v1_partial(c), "--out", c.tmp / "new.h5"),
    "E2403": lambda c: c.cli("upgrade", (p := c.copy(V1_FIXTURE)), "--out", p),
    "E2404": lambda c: c.cli("upgrade", V1_FIXTURE, "--out", c.tmp / "new.npz"),
    "E2405": lambda c: c.cli("upgrade", edit_h5(c.copy(V1_FIXTURE), lambda f: f["logits"].__setitem__(9, 7.0)),
                             "--out", c.tmp / "new.h5"),
    "E2406": lambda c: c.train("--store", _v1_partial(c)),
})


# -- library only: each raises ------------------------------------------------------------------
@case("E1101")
def _(c):
    p = c.copy(c.env.zarr)
    (p / "logits" / "zarr.json").write_text("")
    return c.gen("--repair", out=p, weights=c.env.w)


@case("E1102")
def _(c):  # 16 KB of HDF5 claiming 10^9 rows of logits, never allocated
    return c.cli("inspect", claimed_store(c.tmp / "claims.h5", num_samples=10**9, num_classes=1000, chunk_rows=1 << 16))


@case("E1103")
def _(c):
    return c.cli("inspect", edit_h5(c.copy(c.env.h5), lambda f: f.attrs.update(num_samples=1 << 25, chunk_samples=1)))


@case("E1104")
def _(c):  # a chunk larger than the read limit (lowered here, so the store can stay small)
    c.mp.setenv("SOFTLABELS_MAX_READ_BYTES", "100")
    return c.cli("inspect", c.env.h5)


@case("E1105")
def _(c):
    return c.gen(data="errcat_data:later_failure")


@case("E1106")
def _(c):
    return c.gen(data=c.npz("u64.npz", x=np.zeros((3, D), np.float32), y=np.array([0, 1, 2**63], np.uint64)))


@case("E1107")
def _(c):
    return c.gen(data=str(c.write("cut.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'sh")))


@case("E1108")
def _(c):  # a planted 'click' sends SIGINT while the command is still importing
    (c.mkdir("plant") / "click.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\n"
                                                "time.sleep(30)\n")
    path = os.pathsep.join([str(c.tmp / "plant"), str(ROOT)])
    p = subprocess.run([sys.executable, "-m", "softlabels", "inspect", str(c.env.h5)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": path})
    return SimpleNamespace(exit_code=p.returncode, stdout=p.stdout, stderr=p.stderr, output=p.stdout + p.stderr,
                           in_process=False)


def _resume_with(c: Ctx, **fields: Any):
    run = c.copy(c.env.run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, **{k: f(ckpt) for k, f in fields.items()}}, run / "checkpoint.pt")
    return c.train("--store", c.env.h5, "--resume", "--epochs", "2", out=run)


@case("E1109")
def _(c):
    return _resume_with(c, rng=lambda ck: {**ck["rng"], "numpy": []})


@case("E1110")
def _(c):
    return _resume_with(c, model=lambda ck: {k: torch.zeros(2) for k in ck["model"]})




def claimed_store(path: Path, *, num_samples: int, num_classes: int, chunk_rows: int, done=()) -> Path:
    """A tiny store whose attributes and array shapes agree but whose data was never written."""
    from softlabels.store.backend import open_backend
    from softlabels.store.schema import StoreMetaV2

    meta = StoreMetaV2(positions="sample", layout="dense", num_samples=num_samples, num_classes=num_classes,
                       chunk_samples=chunk_rows, status="complete" if len(done) else "writing")
    if path.suffix == ".zarr":
        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        g.attrs.update(meta.to_attrs())
        for name, spec in meta.arrays().items():
            g.create_array(name, shape=spec.shape, dtype=spec.dtype, fill_value=0,
                           chunks=(spec.chunk,) + spec.shape[1:])
        for unit in done:
            g["unit_done"][unit] = 1
        return path
    with h5py.File(path, "w") as f:  # h5py's default: chunks allocated only when written
        for name, spec in meta.arrays().items():
            rows = max(1, min(spec.chunk, spec.shape[0]))
            f.create_dataset(name, shape=spec.shape, dtype=spec.dtype, chunks=(rows,) + spec.shape[1:])
    backend = open_backend(path, "r+")
    backend.set_attrs(meta.to_attrs())
    backend.close()
    return path


def _meta(**kw: Any) -> Any:
    from softlabels.store.schema import StoreMetaV2

    return StoreMetaV2(**{"positions": "sample", "layout": "dense", "num_samples": N, "num_classes": C,
                          "chunk_samples": CHUNK, **kw})


def _writer(name: str = "s.zarr", **kw) -> Callable[[Ctx], Any]:
    from softlabels.store.writer import UnitWriter

    return lambda c: UnitWriter.create(c.tmp / name, _meta(**kw))


def _finish_half_written(c: Ctx) -> None:
    w = _writer()(c)
    w.write(0, **{k: v[:CHUNK] for k, v in make_rows(N, C).items()})
    w.finish()


def _resume_other_shape(c: Ctx) -> None:
    from softlabels.store.writer import UnitWriter

    UnitWriter.resume(c.env.h5, expect=_meta(num_classes=C + 1))


def _dataset(c: Ctx, source: Any = None, **kw) -> Any:
    from softlabels.student.dataset import SoftLabelDataset

    return SoftLabelDataset([(source or c.env.h5, None)], **{"batch_size": 4, "rank": 0, "world_size": 1, **kw})


def _partial_store(c: Ctx) -> Any:
    from softlabels.store.reader import open_store

    return open_store(write_store(c.tmp / "p.h5", make_rows(N, C), num_classes=C, finish=False), allow_partial=True)


def _map_dataset(c: Ctx, **kw) -> Any:
    from softlabels.student.dataset import SoftLabelMapDataset

    return SoftLabelMapDataset(c.env.h5, **kw)


def _lm_token_store(c: Ctx) -> Path:
    from tests._v2stores import make_images, write_tokens

    write_tokens(c.tmp / "t.h5", make_images(c.tmp))
    return c.tmp / "t.h5"


def _kl(teacher: dict) -> Callable[[Ctx], Any]:
    from softlabels.student.losses import KLDivergence

    return lambda c: KLDivergence(2.0)(torch.zeros(2, C), {"labels": torch.zeros(2, dtype=torch.long), **teacher})


def _seam_cases() -> dict[str, Callable[[Ctx], Any]]:
    """softlabels.with_targets / kd_loss (softlabels.library) refusals."""
    import softlabels as sl
    from softlabels.store.layouts.targets import TopKTarget

    topk = TopKTarget(torch.zeros(2, 2), torch.tensor([[0, 1], [1, 0]]), torch.zeros(2))

    def relabelled(c: Ctx) -> Any:
        labels = sl.open_store(c.env.h5).labels
        first = int(np.flatnonzero(labels >= 0)[0])
        items = [(torch.zeros(1), int(y)) for y in labels.clip(0)]
        items[first] = (torch.zeros(1), int(labels[first] + 1) % C)
        return sl.with_targets(items, c.env.h5, ids=np.arange(len(labels)))

    def other_data(c: Ctx) -> Any:
        np.savez(c.tmp / "other.npz", x=np.ones((N, D), np.float32), y=np.zeros(N, np.int64))
        c.gen()
        return sl.with_targets(sl.resolve_data(str(c.tmp / "other.npz")), c.tmp / "o.h5")

    return {
        "L2401": lambda c: sl.with_targets(list(range(3)), c.env.h5),
        "L2402": lambda c: sl.with_targets([0, 1, 2], c.env.h5, ids=[0, N + 1, N + 2]),
        "L2403": relabelled,
        "L2404": other_data,
        "L2407": lambda c: sl.kd_loss(torch.zeros(2, C), topk, temperature=2, loss="kl"),
        "L2408": lambda c: sl.kd_loss(torch.zeros(2, C), topk, temperature=0),
        "L2409": lambda c: sl.kd_loss(torch.zeros(2, C), topk, temperature=2, alpha=0.5),
        "L2410": lambda c: TopKTarget(topk.values, topk.ids, torch.zeros(2, 2), (1.0, 2.0)).probs(3.0),
        "L2411": lambda c: sl.kd_loss(torch.zeros(2, 2, C), topk, temperature=2),
        "L2412": lambda c: sl.kd_loss(torch.zeros(2, C), topk, temperature=1, alpha=0.5, labels=torch.tensor([0, C])),
        "L2413": lambda c: sl.kd_loss(torch.zeros(2, 1), topk, temperature=1),
        "L2414": lambda c: sl.with_targets(sl.resolve_data(_v2(c, positions="views", views_attrs={
            "augment": "crop(6,padding=1)+flip+mypkg.augs:jitter"})[1]), c.tmp / "v2.h5", view_transform="replay"),
    }


def _library_cases() -> dict[str, Callable[[Ctx], Any]]:
    from softlabels import open_store
    from softlabels.store.layouts import make_layout
    from softlabels.student import losses
    from softlabels.student.metrics import EvalAccumulator

    return {
        "L101": lambda c: write_store(c.copy(c.env.h5), make_rows(N, C), num_classes=C),
        "L102": _finish_half_written,
        "L103": _resume_other_shape,
        "L104": lambda c: _writer()(c).write(0, **make_rows(N, C + 1)),
        "L105": _writer("s.h5", shard_chunks=2),
        "L106": lambda c: _writer()(c).write(0, **{**make_rows(N, C), "logits": np.zeros((N, C), np.float16)}),
        "L107": lambda c: _meta(logits_dtype="int8"),
        "L108": lambda c: open_store(c.env.h5, backend="netcdf"),
        "L109": lambda c: _dataset(c, _partial_store(c)),
        "L110": lambda c: _dataset(c, batch_size=0),
        "L111": lambda c: _dataset(c, world_size=None),
        "L112": lambda c: _dataset(c).load_state_dict({"epoch": 0}),
        "L113": lambda c: _map_dataset(c, cache_chunks=0),
        "L114": lambda c: _map_dataset(c)[N + 5],
        "L115": lambda c: losses.make_soft_loss("kl", 0),
        "L116": lambda c: losses.DistillationLoss(None, 3),
        "L117": _kl({}),
        "L118": _kl({"logits": torch.zeros(2, C + 1)}),
        "L119": lambda c: EvalAccumulator(0),
        "L120": lambda c: EvalAccumulator(C).update(torch.zeros(2, C), torch.tensor([0, C + 1])),
        "L201": lambda c: make_layout("sparse", num_classes=C),
        "L202": lambda c: make_layout("topk", num_classes=C, k=C + 1),
        "L203": lambda c: make_layout("sampled", num_classes=C, samples=0),
        "L204": lambda c: make_layout("dense", num_classes=0),
        "L205": lambda c: make_layout("sampled", num_classes=C, samples=4, k=2),
        "L206": lambda c: make_layout("topk", num_classes=C, k=2).encode(torch.zeros(2, C + 1)),
        "L207": lambda c: make_layout("sampled", num_classes=C, samples=4).encode(torch.zeros(2, C)),
        "L208": lambda c: make_layout("topk", num_classes=C, k=2).check(
            {"topk_values": np.zeros((2, 2), np.float32), "topk_indices": np.full((2, 2), C, np.uint16),
             "logsumexp": np.zeros(2, np.float32)}),
        "L209": lambda c: losses.SampledKL(1.0)(torch.zeros(2, C), _topk_target()),
        "L210": lambda c: losses.KLDivergence(1.0)(torch.zeros(2, C), _topk_target()),
        "L211": lambda c: losses.SkewKL(1.0, alpha=0.0),
        "L212": lambda c: losses.SampledKL(1.0)(torch.zeros(2, C), {"sampled_ids": torch.zeros(2, 3)}),
        "L213": lambda c: losses.TopKKL(1.0)(torch.zeros(3, C), _topk_target()),
        "L214": lambda c: losses.ReverseKL(1.0)(torch.zeros(2, C), _ids_only_target()),
        "L1751": lambda c: _dataset(c, _lm_token_store(c)),
    }


def _topk_target() -> Any:
    from softlabels.store.layouts import TopKTarget

    return TopKTarget(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 1))


def _ids_only_target() -> Any:
    from softlabels.store.layouts import SampledTarget

    return SampledTarget(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[3, 0, 0], [3, 0, 0]]))


LIB_CASES = _library_cases()


# -- section 15, token data and language models: raised through softlabels.lm, checked like the
# library rows until the commands take token data; then each case moves to CASES.
def _token_npz(c: Ctx, **arrays: Any) -> str:
    return c.npz("tokens.npz", **arrays)


def _lm_factories(c: Ctx) -> str:
    class Raising(torch.nn.Embedding):
        def forward(self, ids):
            raise RuntimeError("boom")

    class LastOnly(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids)[:, -1]

    factories = SimpleNamespace(raising=lambda: Raising(7, 7), last=lambda: LastOnly(7, 7),
                                wide=lambda: torch.nn.Embedding(7, 9))  # 9 logits per token
    c.mp.setitem(sys.modules, "errcat_lm", factories)
    return "errcat_lm"


REMOTE_CODE_CONFIG = {"model_type": "mine", "auto_map": {"AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}}


def _hf_dir(c: Ctx, *files: str, config: Any = None) -> Path:
    d = c.mkdir("hf")
    for name in ("config.json", *files):
        (d / name).write_text("{}")
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


def _hf_model(c: Ctx, arch: str) -> Path:
    """A tiny random ``arch`` model directory (weights, tokenizer), written by transformers."""
    pytest.importorskip("transformers")
    from tests._hfmodels import hf_model_dir

    return hf_model_dir(c.tmp / f"hf-{arch}", arch)


def _hf_load_fails(c: Ctx) -> Any:
    """A GPT-2 directory whose weights file is damaged, refused by the real transformers."""
    pytest.importorskip("transformers")
    from softlabels.teacher.lm import resolve_lm

    d = c.mkdir("hf")
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 7, "n_positions": 8, "n_embd": 4,
                                               "n_layer": 1, "n_head": 2}))
    (d / "model.safetensors").write_bytes(b"not safetensors")
    return resolve_lm(f"hf:{d}")


def _wordlevel_without_unk(c: Ctx) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0}, unk_token="[UNK]"))  # loads; fails on the first unknown word
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(c.tmp / "wordlevel.json"))
    return c.tmp / "wordlevel.json"


def _lm_cases() -> dict[str, Callable[[Ctx], Any]]:
    from softlabels.inputs.text import resolve_token_data, train_bpe
    from softlabels.inputs.tokens import open_token_file, pack_stream
    from softlabels.inputs.vocabulary import check_same_tokenizer
    from softlabels.student.language import check_student_width
    from softlabels.student.lm_metrics import LMEvalAccumulator, next_token_ce
    from softlabels.teacher.lm import GPT, GPTConfig, build_lm, resolve_lm

    ids = torch.zeros((2, 3), dtype=torch.int64)

    def text_data(c: Ctx, text: str | bytes, tokenizer: Path | None = None) -> Any:
        if tokenizer is None:
            tokenizer = c.tmp / "tokenizer.json"
            train_bpe("some text", 260).save(str(tokenizer))
        return resolve_token_data(f"text:{c.write('t.txt', text)}", tokenizer=tokenizer, seq_len=4)

    def without(module: str, call: Callable[[Ctx], Any]) -> Callable[[Ctx], Any]:
        def run(c: Ctx) -> Any:
            c.mp.setitem(sys.modules, module, None)  # an import of it now fails as if not installed
            return call(c)
        return run

    return {
        "E1501": lambda c: resolve_token_data("no-such-tokens"),
        "E1502": lambda c: open_token_file(c.write("ids.txt", "1 2 3")),
        "E1503": lambda c: resolve_token_data(str(c.tmp / "missing.npz")),
        "E1504": lambda c: resolve_token_data(_token_npz(c, ids=np.zeros((2, 3), np.int64))),
        "E1505": lambda c: resolve_token_data(_token_npz(c, tokens=np.zeros((2, 3), np.float32))),
        "E1506": lambda c: resolve_token_data(_token_npz(c, tokens=np.zeros((2, 3), np.int64), offsets=[0, 3, 6])),
        "E1507": lambda c: resolve_token_data(_token_npz(c, tokens=np.arange(5), offsets=[0, 3, 2, 5])),
        "E1508": lambda c: resolve_token_data(_token_npz(c, tokens=np.arange(5), offsets=[0, 2, 2, 5])),
        "E1509": lambda c: resolve_token_data(_token_npz(c, tokens=np.arange(5), offsets=[0, 5], mask=np.ones(4))),
        "E1510": lambda c: resolve_token_data(_token_npz(c, tokens=np.arange(5))),
        "E1512": lambda c: resolve_token_data(_token_npz(c, tokens=np.array([[3, -2]], np.int16))).get_batch([0]),
        "E1513": lambda c: resolve_token_data(_token_npz(c, tokens=np.zeros((2, 3), np.int64)))[2],
        "E1514": lambda c: resolve_token_data(_token_npz(c, tokens=np.arange(5)), seq_len=0),
        "E1515": lambda c: pack_stream(np.zeros(0, np.int64), 4),
        "E1516": lambda c: resolve_token_data(f"text:{c.write('t.txt', 'text')}"),
        "E1517": without("tokenizers", lambda c: text_data(c, "text", tokenizer=c.tmp / "tokenizer.json")),
        "E1518": lambda c: text_data(c, "text", tokenizer=c.tmp / "missing.json"),
        "E1519": lambda c: text_data(c, "text", tokenizer=c.write("vocab.json", '{"a": 1}')),
        "E1520": lambda c: resolve_token_data(f"text:{c.tmp / 'missing.txt'}", tokenizer=c.tmp / "t.json", seq_len=4),
        "E1521": lambda c: text_data(c, "caf\xe9".encode("latin-1")),
        "E1522": lambda c: text_data(c, ""),
        "E1523": lambda c: resolve_lm("gpt-huge", vocab_size=7),
        "E1524": lambda c: resolve_lm("gpt-tiny"),
        "E1525": lambda c: build_lm("gpt-tiny", 0, 16),
        "E1526": lambda c: GPT(GPTConfig(vocab_size=7, context=4, n_layer=1, n_head=3, d_model=8)),
        "E1527": lambda c: resolve_lm("gpt-tiny", vocab_size=7, context=2).module(ids),
        "E1528": lambda c: resolve_lm("gpt-tiny", vocab_size=7, context=4).module(ids[0]),
        "E1529": lambda c: resolve_lm("gpt-tiny", vocab_size=7, context=4).module(ids + 7),
        "E1530": lambda c: resolve_lm(f"{_lm_factories(c)}:last"),
        "E1531": lambda c: resolve_lm(f"{_lm_factories(c)}:raising"),
        "E1532": lambda c: resolve_lm(f"{_lm_factories(c)}:wide", vocab_size=7),
        "E1533": lambda c: resolve_lm(f"hf:{c.tmp / 'nothing'}"),
        "E1534": lambda c: resolve_lm(f"hf:{_hf_dir(c, 'pytorch_model.bin')}"),
        "E1535": without("transformers", lambda c: resolve_lm(f"hf:{_hf_dir(c, 'model.safetensors')}")),
        "E1536": _hf_load_fails,
        "E1537": lambda c: next_token_ce(torch.zeros(2, 4, 7), ids),
        "E1538": lambda c: next_token_ce(torch.zeros(2, 3, 7), ids, reduction="none"),
        "E1539": lambda c: LMEvalAccumulator().update(torch.zeros(2, 3, 7), ids, teacher_logits=torch.zeros(2, 3, 8)),
        "E1540": lambda c: LMEvalAccumulator(0),
        "E1542": lambda c: text_data(c, "an unknown word", tokenizer=_wordlevel_without_unk(c)),
        "E1543": lambda c: resolve_lm(f"hf:{_hf_dir(c, 'model.safetensors', config='not json')}"),
        "E1544": lambda c: resolve_lm(f"hf:{_hf_dir(c, 'model.safetensors', config=REMOTE_CODE_CONFIG)}"),
        "E1545": lambda c: resolve_lm(f"hf:{_hf_dir(c, 'model.safetensors', config={'model_type': 'nosuchmodel'})}"),
        "E1546": lambda c: resolve_lm(f"hf:{_hf_dir(c, 'model.safetensors', config={'model_type': 't5'})}"),
        "E1547": lambda c: resolve_lm(f"hf:{_hf_model(c, 'llama')}", context=65),
        "E1548": lambda c: resolve_lm(f"hf:{_hf_model(c, 'llama')}", weights=f"hf:{_hf_model(c, 'gpt2')}"),
        "E1549": lambda c: check_same_tokenizer("sha256:00", _hf_model(c, "llama"), what="--tokenizer", store="s.zarr"),
        "E1550": lambda c: check_student_width("hf:wide", 256, "s.zarr", 200),
    }


LM_CASES = _lm_cases()


# -- 17. language-model students from token stores (through the CLI) ---------------------------------
def _token_store(c: Ctx, name: str = "lm.h5", *, lengths=(3, 2, 4, 1), vocab: int = 12, record: bool = True,
                 seed: int = 0) -> tuple[Path, str]:
    from tests._lmstore import ragged_data, tiny_teacher, write_token_store

    spec, data = ragged_data(c.tmp / f"{name}.npz", lengths, vocab, seed=seed)
    store = write_token_store(c.tmp / name, tiny_teacher(vocab, 8), data, "dense", spec=spec if record else None)
    return Path(store), spec


def _lm_train(c: Ctx, store: Path, *extra: Any, student: str = "gpt-tiny", out: str = "lmrun"):
    return invoke("train", "--student", student, "--store", store, "--epochs", "1", "--batch-size", "2",
                  "--device", "cpu", "--no-progress", "--out", c.tmp / out, *extra)


def _lm_run(c: Ctx, student: str = "gpt-tiny") -> Path:
    store, _ = _token_store(c)
    assert _lm_train(c, store, student=student).exit_code == 0
    return c.tmp / "lmrun"


@case("E1850")
def _(c):
    store, _ = _token_store(c, record=False)
    _, other = _token_store(c, "other.h5", lengths=(3, 2, 4, 2))
    return _lm_train(c, store, "--data", other)


@case("E1851")
def _(c):
    store, _ = _token_store(c, record=False)
    _, other = _token_store(c, "other.h5", lengths=(3, 2))
    return _lm_train(c, store, "--data", other)


@case("E1852")
def _(c):
    store, _ = _token_store(c)
    _, other = _token_store(c, "other.h5", seed=5)
    return _lm_train(c, store, "--data", other)


@case("E1853")
def _(c):
    return _lm_train(c, _token_store(c, record=False)[0])


@case("E1854")
def _(c):
    store, spec = _token_store(c)
    return _lm_train(c, store, "--val-data", spec)


@case("E1855")
def _(c):
    store, _ = _token_store(c)
    return _lm_train(c, store, "--store", store)


@case("E1820")
def _(c):
    from tests._lmstore import ragged_data

    spec, _ = ragged_data(c.tmp / "hard.npz", (3, 2, 4), 12)
    return invoke("train", "--student", "gpt-tiny", "--data", spec, "--epochs", "1", "--device", "cpu",
                  "--no-progress", "--out", c.tmp / "hardrun")


@case("E1856")
def _(c):
    return _lm_train(c, _token_store(c)[0], "--loss", "soft_ce")


@case("E1857")
def _(c):
    (c.tmp / "errcat_lm.py").write_text("from softlabels.teacher.lm import GPT, GPTConfig\n"
                                        "def make():\n    return GPT(GPTConfig(12, 8, 1, 2, 16))\n")
    c.mp.syspath_prepend(str(c.tmp))
    run = _lm_run(c, "errcat_lm:make")
    return invoke("eval", "--checkpoint", run, "--data", c.tmp / "lm.h5.npz")


@case("E1858")
def _(c):
    run = _lm_run(c)
    wide, spec = _token_store(c, "wide.h5", vocab=13)
    return invoke("eval", "--checkpoint", run, "--data", spec, "--store", wide)


# -- 24. documents and chat conversations (jsonl:, parquet:, hfds:), through generate ---------------
def _docs_tok(c: Ctx, template: str | None = "plain", *, name: str = "tok", **config: Any) -> Path:
    from tests._chatdata import PLAIN, tokenizer_dir

    d = tokenizer_dir(c.tmp / name, PLAIN if template == "plain" else template)
    if config:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, **config}))
    return d


def _docs_gen(c: Ctx, spec: Any, tokenizer: Any = "dir", seq_len: Any = 8):
    """``generate`` of a document spec with a random gpt-tiny (the data is read before anything is written)."""
    tok = _docs_tok(c) if tokenizer == "dir" else tokenizer
    return invoke("generate", "--teacher", "gpt-tiny", "--random-teacher", "--data", spec, "--no-progress",
                  "--out", c.tmp / "docs.zarr", *(["--tokenizer", tok] if tok else []),
                  *(["--seq-len", seq_len] if seq_len else []))


def _jsonl(c: Ctx, *lines: Any, name: str = "d.jsonl") -> Path:
    return c.write(name, "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def _chat(c: Ctx, *conversations: Any, template: str | None = "plain") -> Any:
    data = _jsonl(c, *({"messages": m} for m in conversations))
    return _docs_gen(c, f"jsonl:{data}?messages=messages", _docs_tok(c, template))


def _parquet(c: Ctx, **columns: list) -> Path:
    pytest.importorskip("pyarrow")
    from tests._chatdata import write_parquet

    return write_parquet(c.tmp / "d.parquet", columns)


def _hfds(c: Ctx, name: str = "ds", **splits: dict) -> Path:
    datasets = pytest.importorskip("datasets")
    made = {k: datasets.Dataset.from_dict(v) for k, v in (splits or {"": {"text": ["hello world"]}}).items()}
    (made[""] if "" in made else datasets.DatasetDict(made)).save_to_disk(str(c.tmp / name))
    return c.tmp / name


def _broken_datasets(c: Ctx) -> Any:
    saved = _hfds(c)
    (c.mkdir("broken") / "datasets.py").write_text("raise RuntimeError('compiled against another pyarrow')\n")
    c.mp.syspath_prepend(str(c.tmp / "broken"))
    c.mp.delitem(sys.modules, "datasets", raising=False)
    return _docs_gen(c, f"hfds:{saved}?field=text")


def _state(c: Ctx, files: Any) -> Path:
    d = _hfds(c)
    (d / "state.json").write_text(json.dumps(files if isinstance(files, str) else {"_data_files": files}))
    return d


_ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}<|im_start|>{{ m['role'] }}\n"
                "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_LAST_MARKED = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}<|im_start|>{{ m['role'] }}\n"
                "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_NO_PROMPT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
_CHAT = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
_NOT_UTF8 = b'{"text": "a"}\n{"text": "caf' + "\xe9".encode("latin-1") + b'"}\n'  # line 2 is Latin-1

CASES.update({
    "E2301": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'text': 'a'})}"),
    "E2302": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'text': 'a'})}?field=text,split=train"),
    "E2303": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'text': 'a'})}?field=text,messages=m"),
    "E2304": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'text': 'a'})}?field=text", tokenizer=None, seq_len=None),
    "E2305": lambda c: (c.mp.setitem(sys.modules, "pyarrow", None),
                        _docs_gen(c, f"parquet:{c.write('d.parquet', b'PAR1')}?field=text"))[1],
    "E2306": _broken_datasets,
    "E2307": lambda c: _docs_gen(c, f"jsonl:{c.tmp / 'missing.jsonl'}?field=text"),
    "E2308": lambda c: _docs_gen(c, f"jsonl:{c.mkdir('d.jsonl')}?field=text"),
    "E2309": lambda c: _docs_gen(c, f"jsonl:{c.write('d.jsonl', _NOT_UTF8)}?field=text"),
    "E2310": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'text': 'a'}, '{text: b}')}?field=text"),
    "E2311": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, ['a', 'b'])}?field=text"),
    "E2312": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'text': 'a'}, {'body': 'b'})}?field=text"),
    "E2313": lambda c: _docs_gen(c, f"jsonl:{c.write('d.jsonl', '')}?field=text"),
    "E2314": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'text': 'a'}, {'text': 7})}?field=text"),
    "E2315": lambda c: _docs_gen(c, f"parquet:{c.write('d.parquet', 'not parquet')}?field=text"),
    "E2316": lambda c: _docs_gen(c, f"parquet:{_parquet(c, body=['a'])}?field=text"),
    "E2317": lambda c: _docs_gen(c, f"parquet:{_parquet(c, text=[1, 2])}?field=text"),
    "E2318": lambda c: _docs_gen(c, f"parquet:{_parquet(c, text=['a', None])}?field=text"),
    "E2319": lambda c: _docs_gen(c, f"hfds:{c.tmp / 'missing'}?field=text"),
    "E2320": lambda c: _docs_gen(c, f"hfds:{c.mkdir('ds')}?field=text"),
    "E2321": lambda c: _docs_gen(c, f"hfds:{_state(c, 'not json')}?field=text"),
    "E2322": lambda c: _docs_gen(c, f"hfds:{_state(c, [{'filename': '../d.arrow'}])}?field=text"),
    "E2323": lambda c: _docs_gen(c, f"hfds:{_state(c, [{'filename': 'missing.arrow'}])}?field=text"),
    "E2324": lambda c: _docs_gen(c, f"hfds:{_hfds(c, train={'text': ['a']}, test={'text': ['b']})}?field=text"),
    "E2325": lambda c: _docs_gen(c, f"hfds:{_hfds(c)}?field=text,split=train"),
    "E2326": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'text': ''}, {'text': ''})}?field=text"),
    "E2327": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'text': 'a'})}?field=text", c.tmp / "missing.json"),
    "E2328": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'text': 'a'})}?field=text", c.mkdir("empty")),
    "E2329": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'text': 'a'})}?field=text", c.write("t.json", '{"a": 1}')),
    "E2330": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'messages': _CHAT})}?messages=messages",
                                 _docs_tok(c) / "tokenizer.json"),
    "E2331": lambda c: _docs_gen(c, f"jsonl:{_jsonl(c, {'messages': _CHAT})}?messages=messages",
                                 _docs_tok(c, auto_map={"AutoTokenizer": ["tok.Custom", None]})),  # remote code
    "E2332": lambda c: _chat(c, _CHAT, template=None),
    "E2333": lambda c: _chat(c, _CHAT, {"role": "user", "content": "hi"}),
    "E2334": lambda c: _chat(c, _CHAT, [{"from": "human", "value": "hi"}]),
    "E2335": lambda c: _chat(c, [{"role": "user", "content": "hi"}, {"role": "gpt", "content": "yo"}]),
    "E2336": lambda c: _chat(c, [{"role": "assistant", "content": "hi"}], template=_ALTERNATING),
    "E2337": lambda c: _chat(c, [{"role": "assistant", "content": "hi"}]),
    "E2338": lambda c: _chat(c, _CHAT, template=_NO_PROMPT),
    "E2339": lambda c: _chat(c, _CHAT, template=_LAST_MARKED),
})


def _library_document_cases() -> dict[str, Callable[[Ctx], Any]]:
    from softlabels.inputs.text import parse_document_spec, window_documents

    ids = np.arange(3, dtype=np.int32)
    return {
        "L2301": lambda c: parse_document_spec("text:t.txt"),
        "L2302": lambda c: window_documents([(ids, np.ones(3, bool)), (ids, None)], 4),
        **_seam_cases(),
    }


LIB_CASES.update(_library_document_cases())


# -- running the cases -----------------------------------------------------------------------------
@pytest.fixture
def raised(monkeypatch) -> list[BaseException]:
    """The exceptions that leave a subcommand, before the CLI turns them into its one line."""
    seen: list[BaseException] = []
    group_invoke = click.Group.invoke

    def recording(self, ctx):
        try:
            return group_invoke(self, ctx)
        except BaseException as err:
            seen.append(err)
            raise

    monkeypatch.setattr(click.Group, "invoke", recording)
    return seen


def assert_classes(row: Row, exc: BaseException) -> None:
    names = {cls.__name__ for cls in type(exc).__mro__}
    missing = [name for name in row.classes if name not in names]
    assert not missing, f"{row.id}: raised {type(exc).__name__} ({', '.join(sorted(names))}), " \
                        f"not {', '.join(missing)} as the catalogue says"


def assert_message(row: Row, message: str) -> None:
    assert row.pattern.fullmatch(message), \
        f"{row.id}: the message\n    {message}\ndoes not match the catalogue's\n    {row.message}"


@pytest.mark.parametrize("cid", [
    pytest.param(cid, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[cid])] if cid in KNOWN_BUGS else [])
    for cid in sorted(CASES)])
def test_cli_error(cid, env, tmp_path, monkeypatch, raised):
    row = ROWS[cid]
    ctx = Ctx(env, tmp_path, monkeypatch)
    try:
        result = CASES[cid](ctx)
    finally:
        for cleanup in reversed(ctx.cleanups):
            cleanup()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not any(line.startswith("error") for line in result.stdout.splitlines()), result.stdout
    assert_message(row, lines[0].removeprefix("error: "))
    if getattr(result, "in_process", True):
        assert raised, f"{cid}: no exception left the subcommand"
        assert_classes(row, raised[0])


@pytest.mark.parametrize("cid", sorted(LIB_CASES) + sorted(LM_CASES))
def test_library_error(cid, env, tmp_path, monkeypatch):
    row = ROWS[cid]
    with pytest.raises(Exception) as info:
        {**LIB_CASES, **LM_CASES}[cid](Ctx(env, tmp_path, monkeypatch))
    assert_message(row, str(info.value))
    assert_classes(row, info.value)


# -- the catalogue and the cases agree --------------------------------------------------------------
def test_every_row_has_exactly_one_case():
    duplicates = sorted({i for i in IDS if IDS.count(i) > 1})
    assert not duplicates, f"ids used twice in {DOC.name}: {duplicates}"
    tables = {"CASES": set(CASES), "LIB_CASES": set(LIB_CASES), "LM_CASES": set(LM_CASES),
              "COVERED_ELSEWHERE": set(COVERED_ELSEWHERE)}
    names = list(tables)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not tables[a] & tables[b], f"{a} and {b} share {sorted(tables[a] & tables[b])}"
    covered = set().union(*tables.values())
    assert not set(IDS) - covered, f"rows without a case: {sorted(set(IDS) - covered)}"
    assert not covered - set(IDS), f"cases for rows not in {DOC.name}: {sorted(covered - set(IDS))}"
    assert all(i.startswith("E") for i in CASES) and all(i.startswith("L") for i in LIB_CASES)
    assert all(i.startswith("E15") for i in LM_CASES)
    assert set(KNOWN_BUGS) <= set(CASES)


@pytest.mark.parametrize("cid", sorted(COVERED_ELSEWHERE))
def test_covered_elsewhere_names_a_real_test(cid):
    path, _, name = COVERED_ELSEWHERE[cid].partition("::")
    source = ROOT / path
    assert source.is_file(), f"{cid}: {path} does not exist"
    assert re.search(rf"^def {re.escape(name)}\(", source.read_text(), re.M), f"{cid}: no test {name} in {path}"
    assert COVERED_ELSEWHERE[cid] in ROWS[cid].text, f"{cid}: the row should name {COVERED_ELSEWHERE[cid]}"


def test_every_named_class_exists():
    from softlabels import errors
    from softlabels.evaluation import report
    from softlabels.student import checkpoint

    known = {name for mod in (errors, checkpoint, report, click.exceptions, builtins) for name, value in vars(mod).items()
             if isinstance(value, type) and issubclass(value, BaseException)}
    for row in ROWS.values():
        unknown = [name for name in row.classes if name not in known]
        assert not unknown, f"{row.id}: unknown exception classes {unknown}"
        assert row.classes or row.id in COVERED_ELSEWHERE, f"{row.id}: name the exception class"
