"""Commands run under ``torchrun --nproc-per-node=2`` (gloo, CPU), as a real two-process job runs them.

One launch runs every case through the CLI (``softlabels.cli.main``) in the same two
processes, so the cost of starting torch is paid once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DRIVER = '''
import contextlib, faulthandler, io, json, os, sys
import click
faulthandler.dump_traceback_later(100, exit=True)  # a hang shows where, instead of a silent timeout
from softlabels.cli import main

rank = int(os.environ["RANK"])
with open(sys.argv[1]) as f:
    cases = json.load(f)
with open(os.path.join(sys.argv[2], f"results-{rank}.jsonl"), "w") as out:
    for name, args in cases:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                main(args, standalone_mode=False)
                code = 0
            except click.ClickException as err:
                err.show()
                code = err.exit_code
            except SystemExit as err:
                code = err.code
        out.write(json.dumps({"name": name, "code": code, "output": buf.getvalue()}) + "\\n")
'''


def run_two_ranks(tmp_path: Path, cases: list[list], timeout: int) -> list[dict[str, dict]]:
    """Run each ``[name, argv]`` of ``cases`` in order on two ranks; per rank, ``{name: {"code", "output"}}``."""
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "driver.py").write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(tmp_path / "driver.py"), str(tmp_path / "cases.json"), str(tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [{r["name"]: r for r in map(json.loads, (tmp_path / f"results-{rank}.jsonl").read_text().splitlines())}
            for rank in (0, 1)]
