"""``softlabels upgrade``: a format-1 store written again as format 2."""

from __future__ import annotations

import click

from softlabels.cli.storage import storage_option


@click.command("upgrade", short_help="Convert a format-1 store to format 2 (bit-identical logits).")
@click.argument("store", type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(), help="The format-2 store to write: *.h5, *.hdf5 or *.zarr.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out instead of resuming it.")
@storage_option
def command(store: str, out: str, overwrite: bool) -> None:
    """Write the format-1 STORE as a format-2 store OUT: the same values, labels and sample ids, bit for bit.

    The chunking is kept; rerunning the same command resumes an interrupted upgrade.
    STORE itself is only read.
    """
    from softlabels.teacher.config import UpgradeConfig
    from softlabels.teacher.merging import upgrade

    result = upgrade(UpgradeConfig(store=store, out=out, overwrite=overwrite))
    if result.already_complete:
        click.echo(f"{out} is already complete ({result.num_samples} samples); nothing to do")
    else:
        click.echo(f"wrote {out}: {result.num_samples} samples of {store} as format 2 in {result.seconds:.2f} s")
