"""Property-based fuzzing: no metadata or argument value makes softlabels print a traceback."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import h5py
import pytest
import zarr
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from softlabels.cli import main
from softlabels.errors import SoftLabelsError
from softlabels.store import v1
from softlabels.store.schema import StoreMetaV2
from tests._v1stores import write_v1
from tests.conftest import make_rows, write_store

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
ATTRS = ["softlabels_format", "status", "positions", "layout", "layout_params", "num_samples", "num_classes",
         "logits_dtype", "chunk_samples", "shard_chunks", "group_units", "checksum", "views", "tokens", "teacher",
         "source", "created_by"]
V1_ATTRS = ["softlabels_format", "status", "layout", "num_samples", "num_classes", "topk", "logits_dtype",
            "chunk_rows", "checksum", "teacher", "source", "created_by"]
V1_BASE = {"softlabels_format": 1, "status": "complete", "layout": "dense", "num_samples": 10, "num_classes": 3,
           "logits_dtype": "float32", "chunk_rows": 4}


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(ATTRS), json_values, max_size=len(ATTRS)))
def test_from_attrs_raises_only_softlabels_errors(attrs):
    base = StoreMetaV2(positions="sample", layout="dense", num_samples=10, num_classes=3, chunk_samples=4).to_attrs()
    base.update(attrs)
    try:
        StoreMetaV2.from_attrs(base)
    except SoftLabelsError as err:
        assert "\n" not in str(err)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(V1_ATTRS), json_values, max_size=len(V1_ATTRS)))
def test_v1_attrs_raise_only_softlabels_errors(attrs):
    try:
        v1._meta({**V1_BASE, **attrs})
    except SoftLabelsError as err:
        assert "\n" not in str(err)


@pytest.fixture(scope="module")
def clean_stores():
    tmp = Path(tempfile.mkdtemp())
    rows = make_rows(20, 4)
    stores = {(2, s): write_store(tmp / f"clean{s}", rows, num_classes=4, chunk_rows=8) for s in (".h5", ".zarr")}
    stores.update({(1, s): write_v1(tmp / f"v1{s}", rows, num_classes=4, chunk_rows=8) for s in (".h5", ".zarr")})
    yield stores
    shutil.rmtree(tmp)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(version=st.sampled_from([1, 2]), suffix=st.sampled_from([".h5", ".zarr"]), data=st.data(), value=json_values)
def test_inspect_with_edited_attribute_never_tracebacks(clean_stores, version, suffix, data, value):
    attr = data.draw(st.sampled_from(ATTRS if version == 2 else V1_ATTRS))
    assume(not (suffix == ".h5" and isinstance(value, str) and "\x00" in value))  # HDF5 strings hold no NUL
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"s{suffix}"
        src = clean_stores[version, suffix]
        shutil.copytree(src, path) if src.is_dir() else shutil.copy(src, path)
        if suffix == ".h5":
            with h5py.File(path, "r+") as f:
                f.attrs[attr] = json.dumps(value) if not isinstance(value, (int, float, str)) or isinstance(value, bool) else value
        else:
            zarr.open_group(str(path), mode="r+").attrs[attr] = value
        result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
        assert result.exit_code in (0, 2), result.output
        assert "Traceback" not in result.output
        if result.exit_code == 2:
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ")
        else:
            json.loads(result.output)
