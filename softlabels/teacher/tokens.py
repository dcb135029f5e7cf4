"""The token producer: a causal-LM teacher over token data, one stored output per token.

:class:`TokenProducer` cuts each span into teacher calls on a grid fixed per write unit, drops
the padding on the device and encodes the real positions there; :func:`token_producer` builds
one from a ``GenerateConfig`` (docs/TOKENS.md, "Generating token stores").
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softlabels._runtime.device import resolve_device
from softlabels.errors import ConfigError
from softlabels.inputs.spec import absolute_data_spec
from softlabels.inputs.text import resolve_token_data, teacher_tokenizer
from softlabels.inputs.tokens import TokenDataset, offsets_of, token_fingerprint
from softlabels.inputs.vocabulary import tokenizer_fingerprint
from softlabels.store import format as fmt
from softlabels.store.layouts import Layout, make_layout, to_numpy
from softlabels.store.positions import TokenPositions, UnitGeometry, group_units_for
from softlabels.store.positions.tokens import default_chunk_positions
from softlabels.store.schema import StoreMetaV2
from softlabels.teacher.config import GenerateConfig
from softlabels.teacher.lm import BUILTIN_LMS, call_tokens, resolve_lm
from softlabels.teacher.producer import AMP_DTYPES, autocast, slice_samples
from softlabels.teacher.runner import sample_ranges

__all__ = ["TokenProducer", "default_chunk_samples", "is_token_job", "token_producer"]

_UNIT_CHUNKS = 16  # token chunks per write unit: a unit's padding is under one chunk, so ~3 %


def default_chunk_samples(lengths: np.ndarray, chunk_positions: int) -> int:
    """Samples per chunk (and unit, unsharded) so that a unit holds ~16 token chunks: a power of two."""
    mean = float(lengths.mean()) if lengths.size else 1.0
    want = max(1, math.ceil(_UNIT_CHUNKS * chunk_positions / max(mean, 1.0)))
    return min(1 << (want - 1).bit_length(), 1 << 20)


@dataclass
class TokenProducer:
    """Teacher logits for every token of ``data``, encoded by ``layout`` on ``device``.

    ``teacher`` maps int64 ids [B, L] to logits [B, L, V] (a :class:`softlabels.teacher.lm.CausalLM`);
    ``teacher_attrs`` and ``source_attrs`` are recorded in the store and compared on resume.
    """

    data: TokenDataset
    teacher: torch.nn.Module
    layout: Layout
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: str = "none"
    batch_size: int = 16
    max_tokens: int | None = None
    chunk_samples: int | None = None
    chunk_positions: int | None = None
    shard_chunks: int = 1
    group_units: int | None = None  # default: group_units_for(units)
    teacher_attrs: dict[str, Any] = field(default_factory=dict)
    source_attrs: dict[str, Any] = field(default_factory=dict)
    created_by: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.amp not in AMP_DTYPES:
            raise ConfigError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        if self.batch_size < 1 or (self.max_tokens is not None and self.max_tokens < 1):
            raise ConfigError("batch_size and max_tokens must be >= 1")
        self._lengths = np.asarray(self.data.lengths(), dtype=np.int64)
        self._cum = offsets_of(self._lengths)  # the first position of every sample, and the total
        if self.chunk_positions is None:
            self.chunk_positions = default_chunk_positions(self.layout.bytes_per_position)
        if self.chunk_samples is None:
            self.chunk_samples = default_chunk_samples(self._lengths, self.chunk_positions)
        n = int(self._lengths.size)
        units = math.ceil(n / (self.chunk_samples * self.shard_chunks))
        geometry = UnitGeometry(n, self.chunk_samples, self.shard_chunks, self.group_units or group_units_for(units))
        self._positions = TokenPositions(geometry, self._lengths, self.chunk_positions)

    # -- the Producer protocol ------------------------------------------------------------------
    def meta(self) -> StoreMetaV2:
        g = self._positions.geometry
        return StoreMetaV2(
            positions="tokens", layout=self.layout.name, num_samples=g.num_samples,
            num_classes=self.layout.num_classes, logits_dtype=self.layout.logits_dtype,
            chunk_samples=g.chunk_samples, shard_chunks=g.shard_chunks, group_units=g.group_units,
            layout_params=self.layout.params(), tokens=self._positions.to_attrs()["tokens"],
            teacher=dict(self.teacher_attrs), source=dict(self.source_attrs), created_by=dict(self.created_by),
        )

    def lengths(self) -> np.ndarray:
        return self._lengths

    def batches(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Pieces in span order; a teacher call may cover the end of one span and the start of the next
        (its arrays are then split at the span boundary), so calls follow :meth:`calls`, not the spans."""
        spans = [(int(lo), int(hi)) for lo, hi in spans if hi > lo]
        cuts = {lo for lo, _ in spans} | {hi for _, hi in spans}
        for lo, hi in sample_ranges(range(len(spans)), spans.__getitem__):  # adjacent spans joined
            for start, stop in self.calls(lo, hi):
                arrays = self.encode(start, stop)
                inner = sorted(c for c in cuts if start < c < stop)
                per_position = [k for k in arrays if k not in (fmt.LABELS, fmt.SAMPLE_IDS)]
                for a, b in zip([start, *inner], [*inner, stop]):
                    yield a, (slice_samples(arrays, per_position, start, a, b, self._cum) if inner
                              else arrays)

    # -- the work -------------------------------------------------------------------------------
    def calls(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """The teacher calls over samples [lo, hi): each write unit cut from its first sample into
        calls of ``batch_size`` sequences (and ``max_tokens`` padded cells), clipped to [lo, hi);
        the grid makes a resume bit-identical (docs/TOKENS.md, "Calls")."""
        unit = self._positions.geometry.unit_samples
        pos = lo
        while pos < hi:
            u0 = pos // unit * unit
            u1 = min(u0 + unit, len(self._lengths))
            start = u0
            while start < u1:
                stop = min(u1, start + self.batch_size)
                if self.max_tokens is not None:  # the longest sequence so far times the rows must fit
                    longest = np.maximum.accumulate(self._lengths[start:stop])
                    fits = longest * np.arange(1, stop - start + 1) <= self.max_tokens  # True, then False
                    stop = start + max(1, int(fits.sum()))
                if stop > pos and start < hi:
                    yield max(start, pos), min(stop, hi)
                start = stop
            pos = u1

    def encode(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Everything :meth:`UnitWriter.write` takes for samples [start, stop): the teacher's logits
        at their real positions (empty samples take no part in the call), encoded on the device."""
        index = np.arange(start, stop, dtype=np.int64)[self._lengths[start:stop] > 0]
        logits = torch.empty((0, self.layout.num_classes), device=self.device)
        sample = token = torch.empty(0, dtype=torch.int64, device=self.device)
        if index.size:
            batch = self.data.get_batch(index)
            ids = batch.ids.to(self.device, non_blocking=True)
            with torch.inference_mode(), autocast(self.device, self.amp):
                out = self.teacher(ids)
            b, length, _ = out.shape
            token = torch.arange(length, device=self.device).expand(b, length)
            sample = torch.from_numpy(index).to(self.device)[:, None].expand(b, length)
            lengths = batch.lengths.to(self.device)
            if bool((lengths == length).all()):  # no padding: a view, no copy of [B, L, V]
                logits, sample, token = out.flatten(0, 1), sample.flatten(), token.flatten()
            else:  # the row-major True cells: the samples' tokens, concatenated
                valid = token < lengths[:, None]
                logits, sample, token = out[valid], sample[valid], token[valid]
        with torch.inference_mode():
            encoded = self.layout.encode(logits, sample_ids=sample, positions=token)
        arrays = {k: to_numpy(t.cpu()) for k, t in encoded.items()}
        arrays[fmt.LABELS] = np.full(stop - start, -1, dtype=np.int64)  # a sequence has no class label
        arrays[fmt.SAMPLE_IDS] = np.arange(start, stop, dtype=np.int64)
        return arrays


def is_token_job(config: GenerateConfig) -> bool:
    """Whether ``generate`` runs a causal-LM teacher over token data for these options.

    Yes for ``text:`` data, ``--tokenizer`` or ``--seq-len``, a built-in LM or ``hf:`` teacher,
    or a ``.npz``/HDF5/Zarr file holding a ``tokens`` array. An integer ``.npy`` with a
    ``module:factory`` teacher stays classifier input (pass ``--seq-len`` or use ``.npz``).
    """
    spec = config.data
    if spec.startswith("text:") or config.tokenizer is not None or config.seq_len is not None:
        return True
    if config.teacher in BUILTIN_LMS or config.teacher.startswith("hf:"):
        return True
    path = Path(spec.rstrip("/"))
    kind = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5", ".zarr": "zarr"}.get(path.suffix.lower())
    if kind is None or not (path.is_dir() if kind == "zarr" else path.is_file()):
        return False  # not a regular file (a FIFO would block this peek): the classifier's reader says why
    from softlabels.inputs.array_files import _array_names

    try:
        if kind == "npz":
            with np.load(path, allow_pickle=False) as npz:
                return "tokens" in npz.files
        return "tokens" in _array_names(str(path), kind)
    except (OSError, ValueError):  # unreadable: the classifier's reader says why, on one line
        return False


def _check_vocab(data: Any, info: Any, block: int = 1024) -> None:
    """Every token id of ``data`` in the teacher's vocabulary (the teacher's own check, on the whole data)."""
    for lo in range(0, len(data), block):
        batch = data.get_batch(np.arange(lo, min(lo + block, len(data))))
        info.module.check_ids(batch.ids.masked_fill(~batch.valid, 0))


def token_producer(config: GenerateConfig, device: torch.device | None = None, *,
                   geometry: dict[str, int] | None = None) -> TokenProducer:
    """The producer of ``generate`` for token data (``is_token_job``); ``geometry``: the chunking
    adopted from the store resumed (docs/TOKENS.md, "Generating token stores")."""
    if config.teacher in BUILTIN_LMS and config.weights is None and not config.random_teacher:
        raise ConfigError(f"--teacher {config.teacher} is an architecture without --weights, so it would label "
                          "the tokens with random weights; pass --weights FILE, or --random-teacher (for tests)")
    device = device or resolve_device(config.device)
    geometry = geometry or {}
    tokenizer = config.tokenizer or teacher_tokenizer(config.teacher, config.data)  # hf:DIR brings its own
    data = resolve_token_data(config.data, tokenizer=tokenizer, seq_len=config.seq_len)
    lengths = data.lengths()
    info = resolve_lm(config.teacher, vocab_size=config.num_classes or data.vocab_size,
                      context=max(1, int(lengths.max(initial=1))), seed=config.seed, weights=config.weights)
    layout = make_layout(config.layout or "dense", num_classes=info.vocab_size, logits_dtype=config.dtype,
                         **config.layout_params())
    if info.vocab_size is not None:  # before the store exists: bad ids must not leave a half-made one
        _check_vocab(data, info)
    source = {"spec": absolute_data_spec(config.data), "kind": "tokens", "num_samples": int(lengths.size),
              "num_tokens": int(lengths.sum()), "has_mask": bool(data.has_mask),
              "fingerprint": token_fingerprint(data), "vocab_size": data.vocab_size,
              "tokenizer": None if tokenizer is None else str(Path(tokenizer).resolve()),
              "tokenizer_fingerprint": None if tokenizer is None else tokenizer_fingerprint(tokenizer),
              "seq_len": config.seq_len}
    teacher = {**info.metadata(), "amp": config.amp, "device": device.type}
    if info.kind == "builtin":
        teacher["seed"] = config.seed
    settings = {"batch_size": config.batch_size, "layout": config.layout, "logits_dtype": config.dtype,
                "amp": config.amp, "seed": config.seed, "random_teacher": config.random_teacher}
    return TokenProducer(data, info.module.to(device), layout, device=device, amp=config.amp,
                         batch_size=config.batch_size, max_tokens=call_tokens(info.vocab_size),
                         chunk_samples=config.chunk_rows or geometry.get("chunk_rows"),
                         shard_chunks=config.shard_chunks or geometry.get("shard_chunks") or 1,
                         group_units=geometry.get("group_units"), teacher_attrs=teacher, source_attrs=source,
                         created_by={"settings": settings})
