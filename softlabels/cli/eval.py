"""``softlabels eval``: accuracy, calibration and teacher agreement of a trained student."""

from __future__ import annotations

import json

import click

from softlabels._runtime.options import DEVICE_HELP, THREADS_HELP
from softlabels.cli.storage import storage_option
from softlabels.evaluation.config import EvalConfig as D  # defaults: the dataclass's field defaults


@click.command("eval", short_help="Evaluate a trained student, alone or against its teacher.")
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A 'softlabels train' run directory, or its checkpoint.pt; for a language model also a "
                   "Hugging Face directory (a run's hf/, say).")
@click.option("--data", "data_spec", required=True, metavar="SPEC", help="The data to evaluate on.")
@click.option("--store", type=click.Path(),
              help="The teacher's logits for exactly this data; adds agreement, KL to the teacher and more.")
@click.option("--student", metavar="SPEC",
              help="The student architecture (default: the checkpoint's, if it is a built-in name; code is never "
                   "taken from a checkpoint).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--batch-size", type=click.IntRange(min=1), default=D.batch_size, show_default=True,
              help="Rows per forward pass.")
@click.option("--device", default=D.device, show_default=True, help=DEVICE_HELP)
@click.option("--threads", type=int, default=D.threads, show_default=True, help=THREADS_HELP)
@storage_option
def command(checkpoint: str, data_spec: str, store: str | None, as_json: bool, **options) -> None:
    """Evaluate the student of CHECKPOINT on --data: accuracy and calibration, and
    with --store also its agreement with the teacher that made the store.
    """
    from softlabels.evaluation.evaluator import evaluate, format_table

    result = evaluate(checkpoint, data_spec, store, **options)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True, allow_nan=False))  # evaluate() already nulled NaN
        return
    header = f"{result['student']} from {checkpoint} on {data_spec}" + (f" vs {store}" if store else "")
    click.echo(header)
    click.echo(format_table(result))
    for warning in result.get("warnings", []):
        click.echo(f"warning: {warning}")
