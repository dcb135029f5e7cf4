"""``softlabels generate``: run the teacher once and store its raw logits."""

from __future__ import annotations

import os

import click

from softlabels._runtime.options import DEVICE_HELP, THREADS_HELP
from softlabels.cli.storage import storage_option
from softlabels.teacher.config import AMP_MODES, DEFAULT_SAMPLES, LAYOUTS, LOGITS_DTYPES, ON_NONFINITE
from softlabels.teacher.config import (
    GenerateConfig as D,  # defaults: the dataclass's field defaults
)


@click.command("generate", short_help="Run a teacher once over data and store its logits.")
@click.option("--teacher", required=True,
              help="The teacher model: a built-in name, package.module:factory, a TorchScript or a .pt2 file.")
@click.option("--weights", type=click.Path(dir_okay=False), help="A state_dict file loaded into the teacher.")
@click.option("--allow-pickle", is_flag=True,
              help="Allow unpickling arbitrary objects in --weights (only for files you trust).")
@click.option("--random-teacher", is_flag=True,
              help="Allow a built-in --teacher without --weights: random weights seeded by --seed (for tests).")
@click.option("--seed", type=int, default=D.seed, show_default=True,
              help="Seeds a teacher's random initialisation (recorded in the store).")
@click.option("--data", required=True, metavar="SPEC",
              help="The inputs: digits:train, x.npz, data.h5:X,Y, package.module:factory, text:FILE, "
                   "jsonl:FILE?field=text and so on (docs/TOKENS.md for token data); append "
                   "'?unlabeled' to hide every label (e.g. 'pool.npz?unlabeled'). The store records it with "
                   "absolute paths.")
@click.option("--out", required=True, type=click.Path(), help="The store to write: *.h5, *.hdf5 or *.zarr.")
@click.option("--layout", type=click.Choice(LAYOUTS), default=D.layout,
              help="Store every logit (dense), the K largest per output plus their logsumexp (topk), or S draws "
                   "from the teacher's distribution (sampled). Default: dense; topk with K = 5 for --views.")
@click.option("--topk", type=int, help="K for --layout topk.")
@click.option("--samples", type=int,
              help=f"S, the draws per output for --layout sampled (seeded by --seed; default: {DEFAULT_SAMPLES}, "
                   "which Anshumann et al. found enough).")
@click.option("--tail-temperatures", metavar="T1,T2,...",
              help="The temperatures at which --layout topk stores its tail's logsumexp; training and eval "
                   "answer exactly these T (default: 1,2,4).")
@click.option("--sample-temperature", type=float,
              help="The draw temperature Td of --layout sampled (draws from softmax(z / Td)); the store trains at "
                   "this T only (default: 1).")
@click.option("--sampled-ids-only", is_flag=True,
              help="Store every draw's id only with --layout sampled (S x 2 bytes per output when C <= 65,536; "
                   "no logits, so no exact KL in eval).")
@click.option("--views", type=int, help="Store V augmented views per sample, with their parameters "
                                        "(docs/VIEWS.md).")
@click.option("--augment", metavar="SPEC", help="How each view is drawn, e.g. 'crop(32,padding=4)+flip' (docs/VIEWS.md); "
                                               "a package.module:factory term imports that code.")
@click.option("--views-from", type=click.Path(), metavar="STORE",
              help="Label exactly the views of another views store (same data), e.g. with another teacher.")
@click.option("--dtype", type=click.Choice(LOGITS_DTYPES), default=D.dtype, show_default=True,
              help="The stored logits' dtype.")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True, help="Rows per teacher call.")
@click.option("--num-workers", type=int, default=D.num_workers, show_default=True,
              help="DataLoader worker processes.")
@click.option("--device", default=D.device, show_default=True, help=DEVICE_HELP)
@click.option("--threads", type=int, default=D.threads, show_default=True, help=THREADS_HELP)
@click.option("--amp", type=click.Choice(AMP_MODES), default=D.amp, show_default=True,
              help="Run the teacher under autocast in this precision.")
@click.option("--chunk-rows", type=int,
              help="Rows per chunk (default: chunks of about 1 MiB; a rerun adopts the store's).")
@click.option("--shard-chunks", type=int, help="Chunks per shard (Zarr only).")
@click.option("--num-classes", type=int,
              help="The class count C (default: the teacher's output width, which must then cover the labels).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store instead of resuming it.")
@click.option("--on-nonfinite", type=click.Choice(ON_NONFINITE), default=D.on_nonfinite, show_default=True,
              help="On NaN/inf teacher outputs: stop (error), or store them and list their sample ids (record).")
@click.option("--repair", is_flag=True, help="Verify the checksums and regenerate the chunks that fail.")
@click.option("--compress", is_flag=True,
              help="Compress the top-k / sampled arrays (Zarr: zstd; HDF5: gzip + shuffle): ~1.7-2x smaller.")
@click.option("--no-progress", is_flag=True,
              help="No progress at all (without it: a bar on a terminal, else a line every 30 s).")
@click.option("--seq-len", type=int,
              help="Token data: cut text:FILE or a flat token stream into windows of this many tokens, and each "
                   "sequence (a packed row, say) into windows of at most this many; none crosses two sequences.")
@click.option("--tokenizer", type=click.Path(),
              help="Token data: the tokenizer.json of text:FILE (and the vocabulary of a built-in LM teacher); "
                   "for jsonl:/parquet:/hfds: data also a tokenizer directory, which chat data (messages=) needs.")
@storage_option
def command(out: str, no_progress: bool, **options) -> None:
    """Run TEACHER over DATA once and write its raw logits to the store OUT.

    Rerunning the same command resumes an interrupted job (and says so when the
    store is already complete). Under torchrun --nproc-per-node=P the ranks
    share the work.
    """
    from softlabels.errors import SoftLabelsError
    from softlabels.teacher.job import generate

    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        result = generate(out=out, progress=False if no_progress else None,
                          echo=lambda line: click.echo(line, err=True), **options)
    except SoftLabelsError:
        if not main_rank:  # rank 0 reports it; the other ranks only fail
            raise SystemExit(2) from None
        raise
    if not result.is_main:
        return
    tokens = result.tokens_generated  # token data: samples are sequences of tokens
    samples = "samples" if tokens is None else "sequences"
    if result.already_complete:
        click.echo(f"{out} is already complete ({result.num_samples} {samples}); nothing to do")
        return
    if result.samples_generated == 0:  # a job killed after its last unit, before it marked the store complete
        click.echo(f"finished {out}: every unit was already written ({result.num_samples} {samples})")
        return
    if tokens is not None:
        click.echo(f"wrote {result.samples_generated:,} sequences ({tokens:,} tokens) to {out} in "
                   f"{result.seconds:.2f} s ({result.tokens_per_second:,.0f} tokens/s)")
        return
    click.echo(f"wrote {result.samples_generated} samples to {out} in {result.seconds:.2f} s "
               f"({result.samples_per_second:,.0f} samples/s)")
