"""The teacher job: run a teacher once over a dataset and store its raw outputs.

``generate`` checks the options, builds the producer of the job's position kind (a classifier:
:mod:`~softlabels.teacher.classify`; a causal LM: :mod:`~softlabels.teacher.tokens`) and
has :func:`softlabels.teacher.runner.run_job` write the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from softlabels._runtime import distributed as _distributed
from softlabels._runtime.device import resolve_device, set_threads
from softlabels.errors import ConfigError, SoftLabelsError
from softlabels.store.reader import UnitStore
from softlabels.store.remote import store_exists
from softlabels.teacher.classify import classify_producer
from softlabels.teacher.config import GenerateConfig
from softlabels.teacher.runner import GenerateResult, agreed, run_job
from softlabels.teacher.tokens import is_token_job, token_producer

__all__ = ["GenerateResult", "generate"]


def generate(teacher: str, data: str, out: str | Path, *, echo: Callable[[str], None] | None = None,
             **options: Any) -> GenerateResult:
    """Run ``teacher`` over ``data`` and write its raw logits to the store ``out`` (format 2).

    ``options`` are the fields of :class:`softlabels.teacher.config.GenerateConfig` (its docstring and
    comments give their defaults and meaning). Reruns resume an unfinished store (same settings required;
    ``chunk_rows`` and ``shard_chunks`` left as ``None`` adopt the store's); ``repair`` re-verifies the units
    and regenerates bad ones. ``echo`` receives status lines (warnings, repairs, progress) on rank 0. Views:
    :mod:`softlabels.teacher.classify`; token data: :mod:`softlabels.teacher.tokens`.
    """
    config = GenerateConfig(teacher=teacher, data=data, out=out, **options)
    if problems := config.problems():
        raise ConfigError(problems)
    set_threads(config.threads)
    dev = resolve_device(config.device)
    dist = _distributed.init(dev.type)
    say = echo if echo is not None and dist.is_main else (lambda _line: None)
    with agreed(dist):
        geometry = {} if config.overwrite else adopted_geometry(config.out)
        if is_token_job(config):
            producer = token_producer(config, dev, geometry=geometry)
        else:
            producer = classify_producer(config, dev, dist, say, geometry=geometry)
    views_attr = producer.meta().views
    batch = config.batch_size  # --batch-size counts views
    span = max(1, batch // int(views_attr["count"])) if views_attr else batch
    return run_job(producer, config.out, batch_size=span, overwrite=config.overwrite, repair=config.repair,
                   on_nonfinite=config.on_nonfinite, dist=dist, say=say, compress=config.compress,
                   progress=config.progress)


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
