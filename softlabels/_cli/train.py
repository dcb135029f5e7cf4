"""``softlabels train``: train a student from soft-label stores, or on hard labels."""

from __future__ import annotations

import click

from softlabels.errors import Interrupted
from softlabels.losses import LOSSES
from softlabels.train import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, OPTIMIZERS, SCHEDULES, TrainConfig, train


@click.command("train")
@click.option("--student", required=True, help="Student model spec: built-in name, module:factory or model file.")
@click.option("--student-weights", type=click.Path(dir_okay=False), help="Initial weights (a state_dict file).")
@click.option("--allow-pickle", is_flag=True,
              help="Allow unpickling arbitrary objects in --student-weights (trusted files only).")
@click.option("--store", "stores", multiple=True, metavar="STORE",
              help="Soft-label store to distil from (repeat for several, e.g. labeled + unlabeled).")
@click.option("--data", multiple=True, metavar="SPEC",
              help="Inputs: once per --store in the same order (default: each store's recorded data spec); "
                   "without --store, the labeled data to train on.")
@click.option("--loss", help=f"Soft loss: {', '.join(LOSSES)} [default: kl, or topk_kl for top-k stores].")
@click.option("--temperature", type=float, help=f"Distillation temperature [default: {DEFAULT_TEMPERATURE}].")
@click.option("--alpha", type=float, help=f"Weight of the hard-label loss, 0..1 [default: {DEFAULT_ALPHA}].")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True, help="Rows per batch and rank.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default="cosine", show_default=True)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the student's init and the data order.")
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader workers per rank.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--val-data", metavar="SPEC", help="Data to report accuracy and ECE on after each epoch.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a previous run in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar; one line per epoch instead.")
def command(student, student_weights, allow_pickle, stores, data, loss, temperature, alpha, epochs, batch_size, lr, optimizer,
            weight_decay, schedule, warmup_steps, seed, num_workers, device, val_data, out, resume, overwrite,
            no_progress) -> None:
    """Train a student by distillation from --store(s), or on the hard labels of --data.

    Under torchrun every rank trains on its share of the rows (DDP); rank 0 writes
    OUT/checkpoint.pt, model.pt, metrics.jsonl and summary.json.
    """
    config = TrainConfig(
        student=student, student_weights=student_weights, allow_pickle=allow_pickle, stores=tuple(stores), data=tuple(data), loss=loss,
        temperature=temperature, alpha=alpha, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        weight_decay=weight_decay, schedule=schedule, warmup_steps=warmup_steps, seed=seed, num_workers=num_workers,
        device=device, val_data=val_data, out=out, resume=resume, overwrite=overwrite, progress=not no_progress,
    )
    try:
        train(config, log=click.echo)
    except KeyboardInterrupt:  # the group's generic advice ("rerun the same command") would hit the --out check
        raise Interrupted(f"interrupted; continue with the same command plus --resume (every finished epoch "
                          f"is checkpointed in {out})") from None
