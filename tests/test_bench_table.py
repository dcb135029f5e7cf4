"""tools/bench/run's store rows at their tiny size: the entry point runs end to end and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_table_store_rows_tiny(tmp_path):
    out = tmp_path / "table.json"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "table.py"), "--only", "reader,cache",
                        "--size", "tiny", "--rounds", "1", "--json", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"reader_h5py", "reader_zarr", "reader_memcpy", "cache"}
    for r in rows.values():  # a ratio of two positive timings, one per round
        assert len(r["ratios"]) == 1 and r["ratio"] > 0 and r["min"] <= r["ratio"] <= r["max"]
    assert "| cache |" in p.stdout

