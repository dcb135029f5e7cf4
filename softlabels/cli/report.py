"""``softlabels report``: a Markdown or HTML report with plots for a run directory."""

from __future__ import annotations

import click

from softlabels.evaluation.config import REPORT_FORMATS


@click.command("report", short_help="Write a Markdown or HTML report with plots of training runs.")
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option("--out", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="The report file to write (default: RUN_DIR/report.md or .html); the PNGs go beside it.")
@click.option("--format", "fmt", type=click.Choice(REPORT_FORMATS), default=None,
              help="The report's format, md or html (default: from the --out suffix, else md).")
@click.option("--no-compute", is_flag=True,
              help="Do not load checkpoints to compute reliability bins missing from the eval JSON.")
def command(run_dir: str, out: str | None, fmt: str | None, no_compute: bool) -> None:
    """Write a report of RUN_DIR: training curves, accuracy vs teacher, reliability diagram.

    RUN_DIR is one 'softlabels train --out' directory, or a directory of them (such as
    tools/demo.py's --out, whose results.json and eval.json files give test metrics).
    """
    from softlabels.evaluation.report import build_report

    result = build_report(run_dir, out=out, fmt=fmt, compute_missing=not no_compute)
    click.echo(f"wrote {result['report']}")
    for path in result["plots"]:
        click.echo(f"  plot {path}")
