"""The teacher job: run a teacher once over a dataset and store its raw outputs.

``generate(teacher, data, out, ...)`` checks the options, then the producer of the job's
position kind resolves the inputs and the teacher (a classifier over samples or their views:
:func:`softlabels.teacher.classify.classify_producer`; a causal LM over token data:
:func:`softlabels.teacher.tokens.token_producer`) and runs the teacher on a first tiny batch,
so a model that does not fit its inputs fails before any store exists. The job runner
(:func:`softlabels.teacher.runner.run_job`) then writes the store: lock, create or resume
(only missing write units are computed), repair, ranks under ``torchrun``, status complete
last. Batches are ``--batch-size`` samples (views: views; tokens: sequences) on one global
grid whatever the chunk size, so a resumed or multi-rank store is bit-identical to a
one-shot one (for a deterministic teacher on the same device type; on CPU, BLAS libraries
may round differently with another thread count).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from softlabels._runtime import distributed as _distributed
from softlabels._runtime.device import resolve_device, set_threads
from softlabels.errors import ConfigError, SoftLabelsError
from softlabels.store.location import store_location
from softlabels.store.objects import store_exists
from softlabels.store.reader import UnitStore
from softlabels.teacher.classify import classify_producer
from softlabels.teacher.config import GenerateConfig
from softlabels.teacher.runner import GenerateResult, run_job
from softlabels.teacher.tokens import is_token_job, token_producer

__all__ = ["GenerateResult", "generate"]


def generate(teacher: str, data: str, out: str | Path, *, weights: str | Path | None = None,
        allow_pickle: bool = False, random_teacher: bool = False, seed: int = 0, layout: str | None = None,
        topk: int | None = None, samples: int | None = None, views: int | None = None, augment: str | None = None,
        views_from: str | Path | None = None, dtype: str = "float32", batch_size: int = 256, num_workers: int = 0,
        device: str = "auto", threads: int = 1, amp: str = "none", chunk_rows: int | None = None,
        shard_chunks: int | None = None, num_classes: int | None = None, overwrite: bool = False,
        on_nonfinite: str = "error", repair: bool = False, progress: bool | None = None,
        echo: Callable[[str], None] | None = None, seq_len: int | None = None, tokenizer: str | Path | None = None,
        compress: bool = False, tail_temperatures: str | tuple[float, ...] | None = None,
        sample_temperature: float | None = None, sampled_ids_only: bool = False) -> GenerateResult:
    """Run ``teacher`` over ``data`` and write its raw logits to the store ``out`` (format 2).

    Reruns resume an unfinished store (same settings required; ``chunk_rows`` and
    ``shard_chunks`` left as ``None`` adopt the store's). ``repair`` re-verifies the
    units and regenerates bad ones. ``num_classes=None`` takes the teacher's
    class count (a built-in's from its weights, any other's from its output width).
    ``threads`` sets torch's CPU threads (0: torch's default). ``progress=None``
    shows a bar on a TTY and a line every 30 s through ``echo`` otherwise. ``echo``
    receives status lines (warnings, repairs, progress) on rank 0. A built-in teacher
    needs ``weights``, or ``random_teacher=True`` (tests): its init is seeded by ``seed``,
    which the store records, so a resumed store holds one teacher. Option defaults
    and their meaning: :class:`softlabels.teacher.config.GenerateConfig`. Views
    (``views``/``augment``/``views_from``): :mod:`softlabels.teacher.classify`. Token data
    (``text:``, ``tokenizer``, ``seq_len``, an LM teacher): :mod:`softlabels.teacher.tokens`.
    Temperatures (docs/FORMAT.md): ``tail_temperatures`` is the top-k tail grid ("1,2,4" by
    default), ``sample_temperature`` the sampled draw temperature (1), ``sampled_ids_only``
    keeps only the draws' ids.
    """
    if layout is None:  # views: top-k with a small K (docs/VIEWS.md); else every logit
        layout = "topk" if views is not None or views_from is not None else "dense"
    config = GenerateConfig(
        teacher=teacher, data=data, out=store_location(out), weights=None if weights is None else str(weights),
        allow_pickle=allow_pickle, random_teacher=random_teacher, seed=seed, layout=layout, topk=topk,
        samples=samples, views=views, augment=augment, views_from=None if views_from is None else str(views_from),
        dtype=dtype, batch_size=batch_size, num_workers=num_workers, device=device, threads=threads, amp=amp,
        chunk_rows=chunk_rows, shard_chunks=shard_chunks, num_classes=num_classes, overwrite=overwrite,
        on_nonfinite=on_nonfinite, repair=repair, progress=progress, seq_len=seq_len,
        tokenizer=None if tokenizer is None else str(tokenizer), compress=compress,
        tail_temperatures=tail_temperatures, sample_temperature=sample_temperature, sampled_ids_only=sampled_ids_only)
    if problems := config.problems():
        raise ConfigError(problems)
    set_threads(threads)
    dev = resolve_device(device)
    dist = _distributed.init(dev.type)
    say = echo if echo is not None and dist.is_main else (lambda _line: None)
    exc, producer = None, None
    try:
        geometry = {} if config.overwrite else adopted_geometry(config.out)
        if is_token_job(config):
            producer = token_producer(config, dev, geometry=geometry)
        else:
            producer = classify_producer(config, dev, dist, say, geometry=geometry)
    except Exception as err:  # noqa: BLE001 - agreed on by every rank, then raised
        exc = err
    dist.agree(exc)
    views_attr = producer.meta().views
    span = max(1, batch_size // int(views_attr["count"])) if views_attr else batch_size  # --batch-size counts views
    return run_job(producer, config.out, batch_size=span, overwrite=overwrite, repair=repair,
                   on_nonfinite=on_nonfinite, dist=dist, say=say,
                   progress=progress if dist.is_main and progress is not False else False, compress=compress)


def adopted_geometry(out: Path | str) -> dict[str, int]:
    """The chunking of a format-2 store at ``out``, which a rerun that gives none of its own adopts."""
    if not store_exists(out):
        return {}
    try:
        with UnitStore(out, allow_partial=True) as store:
            m = store.meta
            return {"chunk_rows": m.chunk_samples, "shard_chunks": m.shard_chunks, "group_units": m.group_units}
    except SoftLabelsError:  # damaged, or no format-2 store: the runner says what is wrong
        return {}
