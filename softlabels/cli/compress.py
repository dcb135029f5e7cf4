"""``softlabels compress``: prune, fine-tune, quantize and export a trained student, with a table."""

from __future__ import annotations

import click

from softlabels.cli.storage import storage_option
from softlabels.evaluation.config import QUANTIZE
from softlabels.evaluation.config import CompressConfig as D  # defaults: the dataclass's field defaults


@click.command("compress")
@click.argument("run", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the compressed model.")
@click.option("--data", required=True, metavar="SPEC", help="Data to measure accuracy and latency on.")
@click.option("--store", type=click.Path(), help="Teacher logits for exactly --data: adds agreement, KL, CORR.")
@click.option("--student", metavar="SPEC", help="Architecture of RUN's student [default: its recorded built-in name].")
@click.option("--teacher", metavar="RUN", help="The teacher's training run: adds its size, latency and accuracy.")
@click.option("--teacher-spec", metavar="SPEC", help="Architecture of --teacher [default: its recorded built-in name].")
@click.option("--prune", type=float, metavar="AMOUNT", help="Zero this fraction of weights (global L1, unstructured).")
@click.option("--prune-structured", type=float, metavar="AMOUNT",
              help="Remove this fraction of each hidden layer's units (built-in MLPs).")
@click.option("--quantize", type=click.Choice(QUANTIZE), help="int8 weights (torchao), after pruning.")
@click.option("--finetune-store", "finetune_stores", multiple=True, metavar="STORE",
              help="Distil the pruned student again from this store (repeatable).")
@click.option("--finetune-epochs", type=int, default=D.finetune_epochs, show_default=True)
@click.option("--finetune-lr", type=float, default=D.finetune_lr, show_default=True)
@click.option("--onnx", is_flag=True, help="Also write model.onnx (needs onnx and onnxscript).")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True, help="Rows per evaluated and timed batch.")
@click.option("--repeats", type=int, default=D.repeats, show_default=True, help="Timed forward passes per model.")
@click.option("--seed", type=int, default=D.seed, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--json", "as_json", is_flag=True, help="Print compress.json instead of the table.")
@storage_option
def command(finetune_stores, as_json, **options) -> None:
    """Compress the student of training run RUN; write OUT/model.pt, model.pt2 and a table."""
    import json

    from softlabels.evaluation.compression import compress, format_markdown

    result = compress(D(finetune_stores=tuple(finetune_stores), **options), log=None if as_json else click.echo)
    click.echo(json.dumps(result, sort_keys=True, default=str) if as_json else format_markdown(result))
