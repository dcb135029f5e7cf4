"""``softlabels train``: train a student from soft-label stores, or on hard labels."""

from __future__ import annotations

import click

from softlabels._runtime.options import DEVICE_HELP, THREADS_HELP
from softlabels.cli.storage import storage_option
from softlabels.store.defaults import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, SPARSE_ALPHA
from softlabels.student.config import LOSS_NAMES, OPTIMIZERS, SCHEDULES, TrainConfig
from softlabels.teacher.config import ENSEMBLE_MODES

D = TrainConfig  # defaults: the dataclass's field defaults


@click.command("train", short_help="Train a student from teacher stores, or on hard labels.")
@click.option("--student", required=True,
              help="The student model: a built-in name, package.module:factory, or a TorchScript file; for a "
                   "language model also hf:DIR (its run then writes OUT/hf with save_pretrained).")
@click.option("--student-weights", type=click.Path(dir_okay=False),
              help="A state_dict file with the student's initial weights.")
@click.option("--allow-pickle", is_flag=True,
              help="Allow unpickling arbitrary objects in --student-weights (only for files you trust).")
@click.option("--store", "stores", multiple=True, metavar="STORE",
              help="A soft-label store to distil from; repeat it for several (labeled + unlabeled, say).")
@click.option("--data", multiple=True, metavar="SPEC",
              help="The inputs, once per --store in the same order (default: the data spec each store recorded, "
                   "with absolute paths); without --store, the labeled data to train on.")
@click.option("--loss", help=f"The soft loss: {', '.join(LOSS_NAMES)} [default: kl, or topk_kl for top-k stores].")
@click.option("--temperature", type=float,
              help=f"The distillation temperature T [default: {DEFAULT_TEMPERATURE} for dense classifier stores; for "
                   "token stores and top-k / sampled layouts, the T the store answers (1 by default)]; sparse "
                   "stores answer only the T they record.")
@click.option("--alpha", type=float,
              help=f"The weight of the hard-label loss, 0 to 1; it needs labeled rows [default: {DEFAULT_ALPHA} for "
                   f"dense classifier stores, {SPARSE_ALPHA} for token stores and sparse layouts].")
@click.option("--epochs", type=int, default=D.epochs, show_default=True, help="Passes over the training rows.")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True, help="Rows per batch and rank.")
@click.option("--lr", type=float, default=D.lr, show_default=True, help="The peak learning rate.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=D.optimizer, show_default=True,
              help="The optimizer (sgd uses momentum 0.9).")
@click.option("--weight-decay", type=float, default=D.weight_decay, show_default=True, help="The weight decay.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=D.schedule, show_default=True,
              help="The learning-rate schedule after the warm-up.")
@click.option("--warmup-steps", type=int, default=D.warmup_steps, show_default=True,
              help="Steps of linear learning-rate warm-up.")
@click.option("--seed", type=int, default=D.seed, show_default=True,
              help="Seeds the student's init and the data order.")
@click.option("--num-workers", type=int, default=D.num_workers, show_default=True, help="DataLoader workers per rank.")
@click.option("--device", default=D.device, show_default=True, help=DEVICE_HELP)
@click.option("--threads", type=int, default=D.threads, show_default=True, help=THREADS_HELP)
@click.option("--augment", metavar="SPEC",
              help="Augment each sample with a fresh view every epoch, drawn from (--seed, sample id, epoch), e.g. "
                   "'crop(32,padding=4)+flip' (docs/VIEWS.md); the target stays the store's one output per sample. "
                   "A views store replays its own views instead.")
@click.option("--val-data", metavar="SPEC", help="Data to report accuracy and ECE on after each epoch.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The run directory to write.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a previous run in --out.")
@click.option("--no-progress", is_flag=True,
              help="No progress bar: one line per epoch (what a log file gets anyway when stderr is no terminal).")
@click.option("--init", metavar="RUN|hf:DIR",
              help="Fine-tune: start from the model.pt of this training run (new optimizer); for an hf: student, "
                   "hf:DIR starts it from that checkpoint of its architecture (a pretrained model).")
@click.option("--ensemble", multiple=True, metavar="STORE",
              help="A teacher's store of one ensemble target; repeat it per teacher (the same data; unlike --store, "
                   "which concatenates datasets). Combined at --temperature.")
@click.option("--ensemble-mode", type=click.Choice(ENSEMBLE_MODES), default=D.ensemble_mode, show_default=True,
              help="Arithmetic: the mean of the teachers' probabilities at T; geometric: the mean of log-probabilities.")
@click.option("--ensemble-weights", metavar="W1,W2,...", help="Per --ensemble store weights [default: equal].")
@click.option("--views-per-sample", type=int, default=D.views_per_sample, show_default=True,
              help="Views stores: train on this many stored views of each input read (FKD), at most V; a step "
                   "then has batch-size x this many rows.")
@click.option("--tokenizer", type=click.Path(),
              help="Token data: the tokenizer.json of --data (its vocabulary; needed for text:FILE), or for "
                   "jsonl:/parquet:/hfds: data a tokenizer directory (with the chat template for messages=).")
@click.option("--seq-len", type=int, help="Token data: cut text:FILE or a flat token stream into windows of this length, "
                                         "and each sequence (a packed row, say) into windows of at most this length.")
@storage_option
def command(stores, data, no_progress, ensemble, ensemble_weights, **options) -> None:
    """Train a student by distillation from --store(s), or on the hard labels of --data.

    Under torchrun every rank trains on its share of the rows (DDP); rank 0 writes
    OUT/checkpoint.pt, model.pt, metrics.jsonl and summary.json.
    """
    from softlabels.cli.merge import parse_weights
    from softlabels.errors import Interrupted
    from softlabels.student.trainer import train

    config = TrainConfig(stores=tuple(stores), data=tuple(data), progress=False if no_progress else None,
                         ensemble=tuple(ensemble),
                         ensemble_weights=parse_weights(ensemble_weights, "--ensemble-weights"), **options)
    try:
        train(config, log=click.echo)
    except KeyboardInterrupt:  # the group's generic advice ("rerun the same command") would hit the --out check
        raise Interrupted(f"interrupted; continue with the same command plus --resume (every finished epoch "
                          f"is checkpointed in {config.out})") from None
