"""``softlabels generate``: run the teacher once and store its raw logits."""

from __future__ import annotations

import os

import click

from softlabels.errors import SoftLabelsError


@click.command("generate")
@click.option("--teacher", required=True,
              help="Teacher model: a built-in name, module:factory, TorchScript or .pt2 file.")
@click.option("--weights", type=click.Path(dir_okay=False), help="state_dict file loaded into the teacher.")
@click.option("--allow-pickle", is_flag=True,
              help="Allow unpickling arbitrary objects in --weights (trusted files only).")
@click.option("--random-teacher", is_flag=True,
              help="Allow a built-in --teacher without --weights: random weights seeded by --seed (for tests).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds a teacher's random init (recorded).")
@click.option("--data", required=True, help="Input data spec, e.g. digits:train, x.npz, data.h5:X,Y, module:factory.")
@click.option("--out", required=True, type=click.Path(), help="Store to write: *.h5, *.hdf5 or *.zarr.")
@click.option("--layout", type=click.Choice(["dense", "topk"]), default="dense", show_default=True)
@click.option("--topk", type=int, help="K for --layout topk.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Stored logits dtype.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), default="none", show_default=True,
              help="Run the teacher under autocast.")
@click.option("--chunk-rows", type=int, help="Rows per chunk (default: ~1 MiB chunks; a rerun adopts the store's).")
@click.option("--shard-chunks", type=int, help="Chunks per shard (Zarr only).")
@click.option("--num-classes", type=int, help="Class count (default: from the data).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store instead of resuming it.")
@click.option("--on-nonfinite", type=click.Choice(["error", "record"]), default="error", show_default=True,
              help="NaN/inf teacher outputs: stop, or store them and list their sample ids.")
@click.option("--repair", is_flag=True, help="Verify checksums and regenerate the chunks that fail.")
@click.option("--no-progress", is_flag=True, help="No progress bar (it is shown only on a terminal anyway).")
def command(teacher: str, weights: str | None, allow_pickle: bool, random_teacher: bool, seed: int, data: str,
            out: str, layout: str, topk: int | None, dtype: str, batch_size: int, num_workers: int, device: str, amp: str,
            chunk_rows: int | None, shard_chunks: int | None, num_classes: int | None, overwrite: bool,
            on_nonfinite: str, repair: bool, no_progress: bool) -> None:
    """Run TEACHER over DATA once and write its raw logits to the store OUT.

    Rerunning the same command resumes an interrupted job (and says so when the
    store is already complete). Under torchrun --nproc-per-node=P the ranks
    share the work.
    """
    from softlabels.generate import generate

    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        result = generate(
            teacher, data, out, weights=weights, allow_pickle=allow_pickle, random_teacher=random_teacher,
            seed=seed, layout=layout, topk=topk,
            dtype=dtype, batch_size=batch_size, num_workers=num_workers, device=device, amp=amp,
            chunk_rows=chunk_rows, shard_chunks=shard_chunks, num_classes=num_classes, overwrite=overwrite,
            on_nonfinite=on_nonfinite, repair=repair, progress=False if no_progress else None,
            echo=lambda line: click.echo(line, err=True),
        )
    except SoftLabelsError:
        if not main_rank:  # rank 0 reports it; the other ranks only fail
            raise SystemExit(2) from None
        raise
    if not result.is_main:
        return
    if result.already_complete:
        click.echo(f"{out} is already complete ({result.num_samples} rows); nothing to do")
        return
    if result.rows_generated == 0:  # a job killed after its last chunk, before it marked the store complete
        click.echo(f"finished {out}: every chunk was already written ({result.num_samples} rows)")
        return
    click.echo(f"wrote {result.rows_generated} rows to {out} in {result.seconds:.2f} s "
               f"({result.samples_per_second:,.0f} samples/s)")
