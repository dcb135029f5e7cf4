"""tools/experiments/lm_experiment.py --quick: every method trains, evaluates and lands in the table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_experiment(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    methods = ["hard", "dense", "topk8", "topk8-renorm", "sampled"]
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "experiments" / "lm_experiment.py"), "--quick", "--out", str(tmp_path),
                           "--seeds", "2", "--epochs", "1", "--methods", *methods, "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["methods"]) == methods
    for method, entry in results["methods"].items():
        assert len(entry["runs"]) == 2
        for metric in ("loss", "perplexity", "kl_to_teacher", "agreement", "ece"):
            mean, std = entry[metric]
            assert math.isfinite(mean) and std >= 0
        assert math.isclose(entry["perplexity"][0], sum(math.exp(r["loss"]) for r in entry["runs"]) / 2)
    m = results["methods"]
    # 8 fp16 values + 8 uint16 ids + a float32 logsumexp; dense: 64 fp16 logits
    assert m["topk8"]["bytes_per_token"] == 36 and m["dense"]["bytes_per_token"] == 128
    assert m["topk8"]["runs"] != m["topk8-renorm"]["runs"]  # renormalising changes the target
    table = (tmp_path / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(methods) and table[2].startswith("| hard | 0 | 0 |")
