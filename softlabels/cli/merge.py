"""``softlabels merge``: several teachers' stores of the same data combined into one store."""

from __future__ import annotations

import click

from softlabels.cli.storage import storage_option
from softlabels.store.defaults import DEFAULT_TEMPERATURE
from softlabels.teacher.config import ENSEMBLE_MODES
from softlabels.teacher.config import MergeConfig as D


def parse_weights(text: str | None, flag: str) -> tuple[float, ...] | None:
    """``"2,1,1"`` -> (2.0, 1.0, 1.0); a one-line usage error for anything else."""
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas (e.g. 2,1,1), got {text!r}",
                                 param_hint=flag) from None


@click.command("merge", short_help="Combine teachers' stores of the same data into one ensemble store.")
@click.option("--store", "stores", multiple=True, required=True, metavar="STORE",
              help="A teacher's store; repeat it for every teacher (format 1 or 2, same data and positions).")
@click.option("--out", required=True, type=click.Path(), help="The merged store to write (*.zarr or *.h5).")
@click.option("--mode", type=click.Choice(ENSEMBLE_MODES), default=D.mode, show_default=True,
              help="Arithmetic: the mean of probabilities at T; geometric: the mean of log-probabilities.")
@click.option("--weights", metavar="W1,W2,...", help="Per-store weights, in --store order [default: equal].")
@click.option("--temperature", type=float,
              help=f"T of the arithmetic mean; train at this T [default: {DEFAULT_TEMPERATURE} for dense classifier "
                   "stores; the T the members answer (1 by default) for token stores and top-k / sampled layouts].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@storage_option
def command(stores, weights, **options) -> None:
    """Write the combined targets of several teachers' stores as one store (docs/ENSEMBLES.md)."""
    from softlabels.teacher.merging import merge

    config = D(stores=tuple(stores), weights=parse_weights(weights, "--weights"), **options)
    merge(config, log=click.echo)
