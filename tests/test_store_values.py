"""The value checks of format-2 stores: what each position kind and augmentation op declares valid.

Stores are written here with UnitWriter (tests/_v2stores.py), then one attribute or one value is
changed and the unit re-checksummed, so only the value checks can catch it. The declared ranges
are checked the other way too: every parameter an op draws lies in them, for random specs and sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softlabels.errors import CorruptStore, IncompleteStore
from softlabels.inputs.augment import draw_views, parse_augment
from softlabels.store.reader import UnitStore, open_store
from softlabels.store.schema import StoreMetaV2, unit_checksum
from tests._v2stores import make_images, write_tokens, write_v2
from tests.conftest import run_cli


def _attrs(path: Path, **attrs) -> None:
    with h5py.File(path, "r+") as f:
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, dict) else v


def _set(path: Path, name: str, index, value) -> None:
    """One value changed, and every unit's checksum made to agree with the content."""
    with h5py.File(path, "r+") as f:
        a = f[name][...]
        a[index] = value
        f[name][...] = a
        meta = StoreMetaV2.from_attrs({k: json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v
                                       for k, v in f.attrs.items()})
        sums = []
        for u in range(meta.num_units):
            s0, s1 = meta.geometry.unit_samples_range(u)
            sums.append(unit_checksum(meta, {k: f[k][s0:s1] for k in meta.checksum_order()}))
        f["unit_checksums"][...] = sums


def _views_attr(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["views"])


@pytest.fixture()
def views_store(tmp_path):
    spec = make_images(tmp_path)  # 1x6x6 images
    path = tmp_path / "v.h5"
    write_v2(path, spec, positions="views", source={"spec": spec, "input_shape": [1, 6, 6]})
    return path


def _one_line(result) -> str:
    assert result.exit_code == 2 and result.exception is not None and isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("index, value, needle", [
    ((3, 1, 0), 5, "is 5, outside 0..2"),  # crop(6,padding=1) on 6x6: offsets 0..2
    ((3, 1, 2), 7, "is 7, outside 0..1"),  # flip
    ((3, 0, 1), 1.5, "holds a fraction"),
    ((3, 0, 0), np.nan, "holds NaN or inf"),
])
def test_view_params_outside_their_declared_range_are_refused_on_read(views_store, index, value, needle):
    _set(views_store, "view_params", index, value)
    with UnitStore(views_store) as store, pytest.raises(CorruptStore, match="holds invalid views values") as err:
        store.read_unit(0)
    assert needle in str(err.value)
    r = run_cli("inspect", "--verify", str(views_store))
    assert r.exit_code == 1 and "unit 0" in r.stdout and needle in r.stdout  # listed with its reason


def test_a_store_without_its_input_size_still_checks_what_needs_none(tmp_path):
    spec = make_images(tmp_path)
    path = tmp_path / "v.h5"
    write_v2(path, spec, positions="views")  # no source.input_shape: upper crop bounds unknown
    _set(path, "view_params", (2, 0, 0), 30)
    with UnitStore(path) as store:
        store.read_unit(0)  # offsets are whole numbers >= 0: nothing to refuse without the size
    _set(path, "view_params", (2, 0, 2), 2)
    with UnitStore(path) as store, pytest.raises(CorruptStore, match="is 2, outside 0..1"):
        store.read_unit(0)


@pytest.mark.parametrize("views, needle", [
    ({"seed": "zz"}, "views' seed 'zz' is not a whole number"),
    ({"seed": -1}, "views' seed -1"),
    ({"augment": "crop(1e8,padding=1e8)+flip"}, "the largest view side or padding"),
    ({"augment": "crop(9)+flip"}, "needs inputs of at least 9x9"),
    ({"augment": "spin(3)"}, "unknown augmentation 'spin'"),
    ({"param_names": "p0"}, "param_names is not a list"),
])
def test_hostile_views_attributes_are_one_line_refusals(views_store, views, needle):
    _attrs(views_store, views={**_views_attr(views_store), **views})
    with pytest.raises(CorruptStore, match="invalid store metadata") as err:
        open_store(views_store)
    assert needle in str(err.value)
    assert needle in _one_line(run_cli("inspect", str(views_store)))


@pytest.mark.parametrize("count", [-5, 100, 10**15, 1e15, "7", None])
def test_tokens_num_positions_must_be_what_the_lengths_give(tmp_path, count):
    path = tmp_path / "t.h5"
    write_tokens(path, make_images(tmp_path))  # 8 tokens
    with h5py.File(path, "r") as f:
        tokens = json.loads(f.attrs["tokens"])
    _attrs(path, tokens={**tokens, "num_positions": count})
    with pytest.raises(CorruptStore, match="num_positions"):
        open_store(path)
    assert "num_positions" in _one_line(run_cli("inspect", str(path)))


def test_duplicate_sample_ids_are_listed_with_their_units(tmp_path):
    spec = make_images(tmp_path)
    path = tmp_path / "s.h5"
    arrays = write_v2(path, spec)  # 40 samples in units of 8
    _set(path, "sample_ids", 1, arrays["sample_ids"][20])
    r = run_cli("inspect", "--verify", str(path))
    assert r.exit_code == 1
    sid = int(arrays["sample_ids"][20])
    assert f"sample id {sid} is also in unit(s) 2" in r.stdout and f"sample id {sid} is also in unit(s) 0" in r.stdout
    info = json.loads(run_cli("inspect", "--verify", "--json", str(path)).stdout)
    assert info["corrupt_chunks"] == [0, 2] and set(info["corrupt_reasons"]) == {"0", "2"}
    _set(path, "sample_ids", 2, arrays["sample_ids"][20])  # now twice within unit 0 as well
    with pytest.raises(CorruptStore, match=f"holds sample id {sid} 3 times"):  # read whole: refused when opened
        open_store(path)
    _set(path, "sample_ids", slice(None), -1 - np.arange(len(arrays["sample_ids"])))
    with pytest.raises(CorruptStore, match="negative sample id"):
        open_store(path)
    with UnitStore(path, allow_partial=True) as store, pytest.raises(CorruptStore, match="is negative"):
        store.read_unit(0)  # each unit read checks it too


def test_a_store_with_every_unit_written_but_not_finished_says_so(tmp_path):
    spec = make_images(tmp_path)
    path = tmp_path / "s.h5"
    write_v2(path, spec)
    _attrs(path, status="writing")
    with pytest.raises(IncompleteStore) as err:
        open_store(path)
    assert "all 5 units written but the store never marked complete" in str(err.value)
    assert "missing: )" not in str(err.value)


@settings(max_examples=60, deadline=None)
@given(spec=st.sampled_from(["crop(4,padding=2)+flip", "crop(5,padding_mode=edge,padding=1)", "flip(p=0.3)",
                             "rrc(4,scale=0.2-1)+flip", "rrc(3x5,scale=0.05-0.5,ratio=0.5-2)",
                             "affine(15,translate=0.2,scale=0.9-1.1)", "affine(0.01-0.02,translate=0.5x0.1)",
                             "crop(6,padding=3)+affine(30,scale=0.5-2)+rrc(4)"]),
       h=st.integers(6, 40), w=st.integers(6, 40), seed=st.integers(0, 2**63 - 1))
def test_every_drawn_parameter_lies_in_its_declared_range(spec, h, w, seed):
    """No false alarms: what the ops draw (in the dtype a store keeps) always passes the check."""
    aug = parse_augment(spec)
    params = draw_views(aug, seed, torch.arange(64), 3, (3, h, w)).numpy()
    assert aug.param_ranges((h, w)).problems(params) == []
    assert aug.param_ranges(None).problems(params) == []
