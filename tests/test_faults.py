"""A handful of the fault-injection tool's kill points in CI (the tool itself runs 20+ per backend)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import faults  # noqa: E402


@pytest.mark.slow
def test_killed_generate_and_train_resume_to_identical_results(tmp_path):
    records = faults.run(kills=2, train_kills=1, backends=[".zarr", ".h5"], seed=1, work=tmp_path, random_kills=1,
                         view_kills=1)
    for r in records:
        assert r["identical"], r
    killed = [r for r in records if r["kill_delays_s"]]
    assert {(r["job"], r["backend"]) for r in killed} == {("generate", ".zarr"), ("generate", ".h5"), ("gen-rand", ".zarr"),
                                                          ("gen-views", ".zarr"), ("gen-views", ".h5"), ("train", ".zarr")}
    assert len(killed) >= 8 and not any(r["lock_held_after_stop"] for r in records)


@pytest.mark.slow
@pytest.mark.extended
def test_killed_views_generate_resumes_bit_identical_at_ten_points_per_backend(tmp_path):
    """A format-2 views store (sampled layout, batches crossing units): 10 stopped runs per backend."""
    records = faults.run(kills=0, train_kills=0, backends=[".zarr", ".h5"], seed=2, work=tmp_path, random_kills=0,
                         view_kills=10)
    for r in records:
        assert r["identical"], r
    for suffix in (".zarr", ".h5"):
        killed = [r for r in records if r["kill_delays_s"] and r["backend"] == suffix]
        assert len(killed) >= 10 and all(r["job"] == "gen-views" for r in killed)
    assert not any(r["lock_held_after_stop"] for r in records)


@pytest.mark.slow
@pytest.mark.extended
def test_killed_tokens_generate_resumes_bit_identical_at_ten_points_per_backend(tmp_path):
    """A ragged tokens store (sampled layout, a random GPT, calls crossing units): 10 stopped runs per backend."""
    records = faults.run(kills=0, train_kills=0, backends=[".zarr", ".h5"], seed=3, work=tmp_path, random_kills=0,
                         view_kills=0, token_kills=10)
    for r in records:
        assert r["identical"], r
    for suffix in (".zarr", ".h5"):
        killed = [r for r in records if r["kill_delays_s"] and r["backend"] == suffix]
        assert len(killed) >= 10 and all(r["job"] == "gen-tokens" for r in killed)
    assert not any(r["lock_held_after_stop"] for r in records)
