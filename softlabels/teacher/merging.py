"""Stores written from stores: ``merge`` (an ensemble's combined targets) and ``upgrade`` (format 1 to 2).

Both run a :class:`~softlabels.teacher.producer.StoreProducer` on the job runner, so an interrupted
one resumes when rerun; every input is checked before the output is created, so a refused job
writes nothing (docs/ENSEMBLES.md, docs/FORMAT.md's appendix).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from softlabels._version import __version__
from softlabels.errors import ConfigError, IncompleteStore, NonFiniteOutputs, UnsupportedFormat
from softlabels.store import format as fmt
from softlabels.store.defaults import default_temperature
from softlabels.store.ensemble import EnsembleStore
from softlabels.store.location import resolved, store_location
from softlabels.store.positions import group_units_for
from softlabels.store.reader import open_store
from softlabels.teacher.config import MergeConfig, UpgradeConfig
from softlabels.teacher.producer import StoreProducer
from softlabels.teacher.runner import GenerateResult, run_job

__all__ = ["merge", "upgrade"]


def merge(config: MergeConfig, log: Callable[[str], None] | None = None) -> Path | str:
    """Combine ``config.stores`` into the store ``config.out``; return its path."""
    if problems := config.problems():
        raise ConfigError(problems)
    t = config.temperature
    if t is None:  # the training default of the members' kind, which every member must answer
        with open_store(config.stores[0], allow_partial=True) as first:
            m = first.meta
            t = default_temperature(m.layout, m.positions, m.temperatures())
    with EnsembleStore(config.stores, mode=config.mode, weights=config.weights, temperature=t) as ensemble:
        meta = replace(ensemble.meta, status=fmt.STATUS_WRITING,
                       created_by={"command": "merge", "version": __version__})
        for m in ensemble.members:  # recorded by 'generate --on-nonfinite record': refused before writing
            if bad := m.meta.created_by.get("nonfinite_sample_ids"):
                raise NonFiniteOutputs(
                    f"{m.path} holds non-finite logits for sample ids {fmt.chunk_list(bad, 5)} (it was generated "
                    "with --on-nonfinite record), so the merged targets would be too; nothing was written: merge "
                    "members generated without them")
        try:
            run_job(StoreProducer(ensemble, meta), config.out, batch_size=ensemble.meta.geometry.unit_samples,
                    overwrite=config.overwrite)
        except NonFiniteOutputs as err:  # the members' values, not a teacher's: say so, and what to do
            raise NonFiniteOutputs(
                f"the merged targets are non-finite (too large for the store dtype) for sample ids "
                f"{fmt.chunk_list(err.sample_ids, 5)}; nothing was marked complete; check the members with "
                "'softlabels inspect --verify', or merge with smaller --weights") from None
        if log:
            log(f"merged {len(config.stores)} stores ({config.mode}, T = {ensemble.how.temperature}) -> "
                f"{config.out}: {ensemble.meta.positions} x {ensemble.meta.layout}, {meta.num_samples} samples")
    return store_location(config.out)


def upgrade(config: UpgradeConfig) -> GenerateResult:
    """Write the complete format-1 store ``config.store`` as the format-2 store ``config.out``, its
    chunking, metadata and non-finite values kept (docs/FORMAT.md, "Appendix: format 1")."""
    if problems := config.problems():
        raise ConfigError(problems)
    with open_store(config.store, allow_partial=True) as old:  # names any damage of the attributes or arrays
        if old.format_version != 1:
            raise UnsupportedFormat(f"{config.store} is already format {old.format_version}; nothing to upgrade "
                                    "(use it as it is)")
        m, created = old.meta, dict(old.meta.created_by)
        if not m.complete:
            raise IncompleteStore(f"{config.store} is incomplete (status {m.status!r}, {len(old.missing_units())} "
                                  f"of {m.num_units} chunks missing); upgrade converts complete stores: finish it "
                                  "with the softlabels release that wrote it, or regenerate it with 'softlabels "
                                  "generate'")
        created["upgraded_from"] = {"store": resolved(config.store), "format_version": 1,
                                    "checksum": m.checksum, "softlabels": created.pop("softlabels", None),
                                    "timings": created.pop("timings", None)}
        shard = m.shard_chunks if Path(config.out).suffix.lower() == ".zarr" else 1  # HDF5 has no shards
        units = -(-m.num_samples // (m.chunk_samples * shard))
        meta = replace(m, shard_chunks=shard, group_units=group_units_for(units),
                       checksum=fmt.NEW_STORE_CHECKSUM, status=fmt.STATUS_WRITING, created_by=created)
        return run_job(StoreProducer(old, meta), config.out, batch_size=m.geometry.unit_samples,
                       overwrite=config.overwrite, on_nonfinite="record")
