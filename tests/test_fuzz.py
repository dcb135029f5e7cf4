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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softlabels.cli import main
from softlabels.errors import SoftLabelsError
from softlabels.store.format import StoreMeta
from tests.conftest import make_rows, write_store

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
ATTRS = ["softlabels_format", "status", "layout", "num_samples", "num_classes", "topk", "logits_dtype",
         "chunk_rows", "teacher", "source", "created_by"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(ATTRS), json_values, max_size=len(ATTRS)))
def test_from_attrs_raises_only_softlabels_errors(attrs):
    base = StoreMeta(layout="dense", num_samples=10, num_classes=3, chunk_rows=4).to_attrs()
    base.update(attrs)
    try:
        StoreMeta.from_attrs(base)
    except SoftLabelsError as err:
        assert "\n" not in str(err)


@pytest.fixture(scope="module")
def clean_stores():
    tmp = Path(tempfile.mkdtemp())
    rows = make_rows(20, 4)
    stores = {s: write_store(tmp / f"clean{s}", rows, num_classes=4, chunk_rows=8) for s in (".h5", ".zarr")}
    yield stores
    shutil.rmtree(tmp)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from([".h5", ".zarr"]), attr=st.sampled_from(ATTRS), value=json_values)
def test_inspect_with_edited_attribute_never_tracebacks(clean_stores, suffix, attr, value):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"s{suffix}"
        src = clean_stores[suffix]
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
