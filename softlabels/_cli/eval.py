"""``softlabels eval``: accuracy, calibration and teacher agreement of a trained student."""

from __future__ import annotations

import json

import click

from softlabels.evaluate import evaluate, format_table


@click.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(), help="A 'softlabels train' run directory or its checkpoint.pt.")
@click.option("--data", "data_spec", required=True, metavar="SPEC", help="Data to evaluate on.")
@click.option("--store", type=click.Path(), help="Teacher logits for exactly this data: adds agreement, KL, ...")
@click.option("--student", metavar="SPEC",
              help="Student architecture (default: the checkpoint's, if a built-in name; code is never taken from it).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def command(checkpoint: str, data_spec: str, store: str | None, student: str | None, as_json: bool, batch_size: int,
            device: str) -> None:
    """Evaluate the student of CHECKPOINT on --data (and against --store's teacher)."""
    result = evaluate(checkpoint, data_spec, store, batch_size=batch_size, device=device, student=student)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    header = f"{result['student']} from {checkpoint} on {data_spec}" + (f" vs {store}" if store else "")
    click.echo(header)
    click.echo(format_table(result))
