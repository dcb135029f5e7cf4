"""tools/experiments/views_experiment.py --quick: real PNG digits, every method trains, evaluates and lands in the table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~20-60 s on a shared 2-core machine
def test_quick_experiment(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("PIL")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "experiments" / "views_experiment.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pngs = list((tmp_path / "digits" / "heldout").glob("*/*.png"))
    assert pngs and {p.parent.name for p in pngs} <= set("0123456789")
    results = json.loads((tmp_path / "results.json").read_text())
    methods = ["a-hard", "b-single", "c-views-2", "c-views-4", "d-online", "e-no-aug"]
    assert list(results["methods"]) == methods
    for entry in results["methods"].values():
        for metric in ("accuracy", "agreement", "epoch_seconds"):
            assert len(entry[metric]["values"]) == 2 and math.isfinite(entry[metric]["mean"])
        assert 0 <= entry["accuracy"]["mean"] <= 1 and 0 <= entry["agreement"]["mean"] <= 1
    assert results["teacher"]["flops"] > 10 * results["student_flops"]  # the cost ratio the issue asks for
    assert set(results["stores"]) == {"heldout", "single", "views2", "views4"}
    assert proc.stdout.count("| c-views-") == 2
