"""Property-based attacks on the values of format-2 stores, through the real console script.

A module fixture writes valid small stores with ``softlabels generate`` (sample positions in
the dense, top-k and sampled layouts; a views store; a tokens store written with UnitWriter)
and a training run. Each drawn case copies one store, changes one root attribute (another
type, out of range, NaN, huge) or one array element (NaN, inf, negative, huge, a duplicate
of its neighbour), then makes the unit checksums agree with the new content, so that only
the value checks can catch it. Then each command applies to the store — ``inspect --verify``,
``train`` (one step), ``eval --store``, ``generate --views-from`` (views) and ``merge`` — runs
as ``softlabels ...`` in its own process, under a timeout, and must:

- exit 0 (``inspect --verify``: 1 when it lists bad units), or exit 2 with exactly one
  ``error:`` line on stderr; never a traceback, a hang or a crash;
- exit 2 (or list the unit, for ``inspect --verify``) where the change is invalid by the
  format's own rules (a label >= C, a view parameter outside its op's range, ...);
- write nothing outside its ``--out``: every other file under the test's directory is
  unchanged;
- stay within a peak memory bound (the children's ``ru_maxrss``).

The CI version draws a few cases; ``-m extended`` draws many and runs every command on each.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests._v2stores import write_tokens
from tests.conftest import run_cli

N, C = 24, 4
CLI = str(Path(sys.executable).with_name("softlabels"))
TIMEOUT = 120  # seconds per command: a hang fails the test instead of the suite
PEAK_BOUND = 1536 << 20  # a child's peak RSS: torch and the interpreter, plus what a hostile store may cost
STORES = {  # name -> generate options (tokens.h5 is written by UnitWriter)
    "dense.h5": [],
    "topk.h5": ["--layout", "topk", "--topk", "2"],
    "sampled.h5": ["--layout", "sampled", "--samples", "8"],
    "views.h5": ["--views", "3", "--augment", "crop(8,padding=2)+flip"],
}
BOOKKEEPING = ("unit_done", "unit_checksums")
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)  # each example runs processes: report, do not shrink


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("value-attacks")
    rng = np.random.default_rng(0)
    np.savez(d / "img.npz", x=rng.random((N, 1, 8, 8)).astype(np.float32), y=np.arange(N) % C)
    import torch

    from softlabels.teacher.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("mlp", (1, 8, 8), C).state_dict(), d / "w.pt")
    for name, extra in STORES.items():
        r = run_cli("generate", "--teacher", "mlp", "--weights", str(d / "w.pt"), "--data", str(d / "img.npz"),
                    "--chunk-rows", "8", "--no-progress", "--out", str(d / name), *extra)
        assert r.exit_code == 0, r.output
    write_tokens(d / "tokens.h5", str(d / "img.npz"))
    r = run_cli("train", "--student", "mlp", "--epochs", "1", "--batch-size", str(N), "--no-progress",
                "--store", str(d / "dense.h5"), "--data", str(d / "img.npz"), "--out", str(d / "run"))
    assert r.exit_code == 0, r.output
    return d


# -- mutations ----------------------------------------------------------------------------------------
ATTR_VALUES = ["zz", -1, 0, 2**63, 1e15, 1.5, float("nan"), None, [], {}, True, [1, 8, 8], -(2**40)]


def _load_attrs(f: h5py.File) -> dict[str, Any]:
    return {k: json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v for k, v in f.attrs.items()}


def attribute_paths(path: Path) -> list[tuple[str, ...]]:
    """Every root attribute, and every key of the object-valued ones."""
    with h5py.File(path, "r") as f:
        attrs = _load_attrs(f)
    out = []
    for k, v in sorted(attrs.items()):
        out.append((k,))
        if isinstance(v, dict):
            out += [(k, sub) for sub in sorted(v) if not isinstance(v[sub], dict)]
    return out


def set_attribute(path: Path, where: tuple[str, ...], value: Any) -> None:
    with h5py.File(path, "r+") as f:
        attrs = _load_attrs(f)
        if len(where) == 1:
            new = value
        else:
            new = dict(attrs[where[0]])
            new[where[1]] = value
        if isinstance(new, (dict, list)) or new is None or (isinstance(new, float) and not np.isfinite(new)):
            f.attrs[where[0]] = json.dumps(new)  # how dicts are stored; the rest as JSON text, a wrong type
        elif isinstance(new, int) and not isinstance(new, bool) and abs(new) >= 2**63:
            f.attrs[where[0]] = str(new)
        else:
            f.attrs[where[0]] = new


def array_names(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return sorted(k for k in f if k not in BOOKKEEPING)


def element_values(a: np.ndarray, flat: int) -> list[Any]:
    """Hostile values for one element of ``a``, in its dtype where it can hold them."""
    vals: list[Any] = []
    if a.dtype.kind == "f":
        vals += [np.nan, np.inf, -np.inf, -1.0, 1e30, 0.5]
    info = np.iinfo(a.dtype) if a.dtype.kind in "iu" else None
    if info is not None:
        vals += [info.max, info.min, -1 if info.min < 0 else info.max - 1, 7, 2**31 - 1 if info.max > 2**31 else 3]
    neighbour = a.reshape(-1)[(flat + 1) % a.size]
    vals.append(neighbour)  # a duplicate
    out = []
    for v in vals:
        try:
            with np.errstate(all="ignore"):
                cast = np.array(v).astype(a.dtype)
        except (OverflowError, ValueError):
            continue
        if cast.item() == v or (isinstance(v, float) and np.isnan(v)) or v is neighbour:
            out.append(cast)
    return out


def set_element(path: Path, name: str, flat: int, value: Any) -> None:
    with h5py.File(path, "r+") as f:
        a = f[name][...]
        a.reshape(-1)[flat] = value
        f[name][...] = a


def rechecksum(path: Path) -> None:
    """Make every unit's checksum agree with its (hostile) content, where the metadata still parses."""
    from softlabels.errors import SoftLabelsError
    from softlabels.store.schema import StoreMetaV2, unit_checksum

    with h5py.File(path, "r+") as f:
        try:
            meta = StoreMetaV2.from_attrs(_load_attrs(f))
            lengths = f["lengths"][...] if meta.positions == "tokens" else None
            positions = meta.make_positions(lengths)
        except (SoftLabelsError, ValueError, KeyError, TypeError, OverflowError):
            return
        order = meta.checksum_order()
        sums = []
        for u in range(meta.num_units):
            s0, s1 = meta.geometry.unit_samples_range(u)
            a0, a1 = positions.unit_axis_range(u)
            block = {k: f[k][a0:a1] if meta.arrays()[k].family == "position" else f[k][s0:s1] for k in order}
            sums.append(unit_checksum(meta, block))
        f["unit_checksums"][...] = sums


def invalid_by_rule(store: str, name: str, value: Any, a: np.ndarray, flat: int) -> bool:
    """Element changes the format's own rules forbid (docs/FORMAT.md, Values): they must be refused."""
    v = np.asarray(value).item()
    if name == "labels":
        return not -1 <= v < C
    if name == "sample_ids":
        return v < 0 or v in np.delete(a.reshape(-1), flat)
    if name == "view_params":  # crop(8,padding=2) on 8x8: offsets 0..4; flip 0 or 1
        col = flat % a.shape[-1]
        return not (np.isfinite(v) and float(v).is_integer() and 0 <= v <= (4 if col < 2 else 1))
    if name == "topk_indices" or name == "sampled_ids":
        return v >= C and name == "topk_indices"
    return False


# -- commands -------------------------------------------------------------------------------------------
def commands(world: Path, store: Path, work: Path) -> dict[str, list[str]]:
    """Each command that applies to ``store``, as console-script arguments writing under ``work``."""
    data, kind = str(world / "img.npz"), store.name
    cmds = {"inspect --verify": ["inspect", "--verify", str(store)]}
    if kind == "tokens.h5":
        return cmds
    if kind != "views.h5":
        cmds["eval"] = ["eval", "--checkpoint", str(world / "run"), "--data", data, "--store", str(store), "--json"]
    cmds["train"] = ["train", "--student", "mlp", "--epochs", "1", "--batch-size", str(N), "--no-progress",
                     "--threads", "1", "--store", str(store), "--data", data, "--out", str(work / "run")]
    cmds["merge"] = ["merge", "--store", str(store), "--store", str(world / kind), "--out", str(work / "m.h5")]
    if kind == "views.h5":
        cmds["generate --views-from"] = ["generate", "--teacher", "mlp", "--weights", str(world / "w.pt"),
                                         "--data", data, "--views-from", str(store), "--no-progress",
                                         "--out", str(work / "g.h5")]
    return cmds


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and "work" not in p.relative_to(root).parts}


def run_command(root: Path, label: str, args: list[str], must_fail: bool) -> None:
    """``softlabels ARGS`` in a child process; every rule of the module docstring."""
    work = root / "work"
    work.mkdir(exist_ok=True)
    before = _tree(root)
    env = {**os.environ, "HOME": str(work), "TMPDIR": str(work), "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run([CLI, *args], cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{label}: still running after {TIMEOUT} s (a hang)")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak <= PEAK_BOUND, f"{label}: a child peaked at {peak / 2**20:.0f} MiB"
    out = p.stdout + p.stderr
    assert "Traceback" not in out, f"{label}: traceback\n{p.stderr[-3000:]}"
    listed = args[0] == "inspect" and p.returncode == 1 and "corrupt chunks (" in p.stdout
    if p.returncode == 2:
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{label}: {p.stderr[-2000:]}"
    else:
        assert p.returncode == 0 or listed, f"{label}: exit {p.returncode}\n{out[-2000:]}"
        assert not must_fail or listed, f"{label}: an invalid value was accepted (exit 0)\n{p.stdout[-1500:]}"
        if args[0] == "inspect" and p.returncode == 0:
            assert "all chunks verified" in p.stdout, f"{label}: {p.stdout[-1500:]}"
    after = _tree(root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"{label}: files outside --out changed: {changed}"


# -- the properties -------------------------------------------------------------------------------------------
KINDS = [*STORES, "tokens.h5"]


@st.composite
def mutations(draw):
    """(store, description, apply(path), must_fail)."""
    kind = draw(st.sampled_from(KINDS))
    return kind, draw(st.booleans()), draw(st.integers(0, 2**31)), draw(st.integers(0, 2**31))


def build_case(world: Path, root: Path, case: tuple) -> tuple[Path, str, bool]:
    kind, attribute, x, y = case
    dest = root / "case" / kind
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(world / kind, dest)
    if attribute:
        paths = attribute_paths(dest)
        where, value = paths[x % len(paths)], ATTR_VALUES[y % len(ATTR_VALUES)]
        set_attribute(dest, where, value)
        return dest, f"{kind} attribute {'.'.join(where)} = {value!r}", False
    names = array_names(dest)
    name = names[x % len(names)]
    with h5py.File(dest, "r") as f:
        a = f[name][...]
    flat = y % max(1, a.size)
    values = element_values(a, flat) if a.size else []
    if not values:
        return dest, f"{kind}: {name} left as it is", False
    value = values[(x // len(names)) % len(values)]
    set_element(dest, name, flat, value)
    rechecksum(dest)
    return dest, f"{kind} {name}.flat[{flat}] = {value!r}", invalid_by_rule(kind, name, value, a, flat)


def attack(world: Path, root: Path, case: tuple, which: int | None) -> None:
    store, what, must_fail = build_case(world, root, case)
    cmds = commands(world, store, root / "work")
    names = sorted(cmds) if which is None else [sorted(cmds)[which % len(cmds)], "inspect --verify"]
    for name in dict.fromkeys(names):
        run_command(root, f"{what}: {name}", cmds[name], must_fail)
        shutil.rmtree(root / "work", ignore_errors=True)


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), phases=NO_SHRINK)
@given(case=mutations(), which=st.integers(0, 4))
def test_drawn_store_attacks(world, tmp_path_factory, case, which):
    """CI: a few drawn cases, each under ``inspect --verify`` and one other command."""
    attack(world, tmp_path_factory.mktemp("attack"), case, which)


@pytest.mark.extended
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), phases=NO_SHRINK)
@given(case=mutations())
def test_drawn_store_attacks_many(world, tmp_path_factory, case):
    """Many drawn cases, each under every command that applies."""
    attack(world, tmp_path_factory.mktemp("attack"), case, None)


@pytest.mark.parametrize("kind, name, flat, value", [
    ("views.h5", "view_params", 0, 250),  # a crop offset past the padded 8x8 image
    ("dense.h5", "labels", 5, 77),
    ("topk.h5", "topk_indices", 3, 49999),
])
def test_the_reported_values_are_refused_by_the_commands_that_used_them(world, tmp_path, kind, name, flat, value):
    """Values the last attack got through (or into a traceback), under the commands it used."""
    dest = tmp_path / "case" / kind
    dest.parent.mkdir(parents=True)
    shutil.copyfile(world / kind, dest)
    set_element(dest, name, flat, value)
    rechecksum(dest)
    cmds = commands(world, dest, tmp_path / "work")
    for label in ("train", "generate --views-from"):
        if label in cmds:
            run_command(tmp_path, f"{kind} {name}={value}: {label}", cmds[label], must_fail=True)
