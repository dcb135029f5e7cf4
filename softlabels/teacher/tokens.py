"""The token producer: a causal-LM teacher over token data, one stored output per token.

:class:`TokenProducer` implements :class:`softlabels.teacher.producer.Producer` for a
``tokens`` store. Each span of samples is cut into teacher calls of at most
``batch_size`` sequences (and ``max_tokens`` padded cells), right-padded to the call's
longest sequence; the teacher's logits [B, L, V] are computed under the chosen
autocast, the padding is dropped on the device, and the real positions are encoded by
the store's layout there (top-k, sampling) before the copy to host. The pieces come
out in sample order, exactly as :meth:`UnitWriter.write` takes them.

Sampled draws hash (seed, sample id, token index, draw), so they do not depend on how
samples are grouped into calls: a resume or another rank draws the same ids from the
same logits. Whether the *logits* are bit-identical across groupings is the teacher's
property (see docs/TOKENS.md, "Generating token stores").

:func:`token_producer` builds one from a :class:`~softlabels.teacher.config.GenerateConfig`;
:func:`is_token_job` tells ``generate`` which jobs it serves.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softlabels.errors import ConfigError
from softlabels.inputs.tokens import TokenDataset, offsets_of
from softlabels.store import format as fmt
from softlabels.store.layouts import Layout, make_layout, to_numpy
from softlabels.store.positions import TokenPositions, UnitGeometry, group_units_for
from softlabels.store.positions.tokens import default_chunk_positions
from softlabels.store.schema import StoreMetaV2
from softlabels.teacher.config import GenerateConfig
from softlabels.teacher.pipeline import AMP_DTYPES
from softlabels.teacher.runner import sample_ranges

__all__ = ["TokenProducer", "default_chunk_samples", "is_token_job", "token_producer"]

_UNIT_CHUNKS = 16
"""Token chunks per write unit aimed at by :func:`default_chunk_samples`: a unit's padding is under one
chunk, so ~16 chunks per unit keep the padding near 3 % of the token axis."""


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
            raise ConfigError(f"--amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.batch_size < 1 or (self.max_tokens is not None and self.max_tokens < 1):
            raise ConfigError("batch_size and max_tokens must be >= 1")
        self._lengths = np.asarray(self.data.lengths(), dtype=np.int64)
        if self.chunk_positions is None:
            self.chunk_positions = default_chunk_positions(self.layout.bytes_per_position)
        if self.chunk_samples is None:
            self.chunk_samples = default_chunk_samples(self._lengths, self.chunk_positions)
        n = int(self._lengths.size)
        units = math.ceil(n / (self.chunk_samples * self.shard_chunks))
        geometry = UnitGeometry(n, self.chunk_samples, self.shard_chunks, self.group_units or group_units_for(units))
        self._positions = TokenPositions(geometry, self._lengths, self.chunk_positions)
        amp_dtype = AMP_DTYPES[self.amp]
        self._autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if amp_dtype else nullcontext

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
                if not inner:
                    yield start, arrays
                    continue
                rows = offsets_of(self._lengths[start:stop])  # per-position rows before each sample
                for a, b in zip([start, *inner], [*inner, stop]):
                    yield a, {k: v[a - start:b - start] if k in _PER_SAMPLE else v[rows[a - start]:rows[b - start]]
                              for k, v in arrays.items()}

    # -- the work -------------------------------------------------------------------------------
    def calls(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """The teacher calls over samples [lo, hi): a grid fixed per write unit, so a sample's call does
        not depend on which units are missing (a resume, another rank) and the logits, not only the
        draws, come out bit-identical even from a teacher whose rounding depends on the batch.

        Each unit is cut from its first sample into calls of ``batch_size`` sequences (fewer when
        ``max_tokens`` padded cells would be exceeded); calls are then clipped to [lo, hi).
        """
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

    def logits(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's logits of samples [start, stop) at their real positions, on the device.

        Returns (logits [P, V] in sample order, sample id [P], token index [P]); P = sum of lengths.
        Empty samples take no part in the call.
        """
        index = np.arange(start, stop, dtype=np.int64)
        index = index[self._lengths[start:stop] > 0]
        if index.size == 0:
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            return torch.empty((0, self.layout.num_classes), device=self.device), empty, empty
        batch = self.data.get_batch(index)
        ids = batch.ids.to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            out = self.teacher(ids)
        b, length, v = out.shape
        token = torch.arange(length, device=self.device).expand(b, length)
        sample = torch.from_numpy(index).to(self.device)[:, None].expand(b, length)
        lengths = batch.lengths.to(self.device)
        if bool((lengths == length).all()):  # no padding: a view, no copy of [B, L, V]
            return out.reshape(b * length, v), sample.reshape(-1), token.reshape(-1)
        valid = token < lengths[:, None]  # row-major True cells: the samples' tokens, concatenated
        return out[valid], sample[valid], token[valid]

    def encode(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Everything :meth:`UnitWriter.write` takes for samples [start, stop)."""
        logits, sample, token = self.logits(start, stop)
        with torch.inference_mode():
            encoded = self.layout.encode(logits, sample_ids=sample, positions=token)
        arrays = {k: to_numpy(t.cpu()) for k, t in encoded.items()}
        arrays[fmt.LABELS] = np.full(stop - start, -1, dtype=np.int64)  # a sequence has no class label
        arrays[fmt.SAMPLE_IDS] = np.arange(start, stop, dtype=np.int64)
        return arrays


_PER_SAMPLE = (fmt.LABELS, fmt.SAMPLE_IDS)


def is_token_job(config: GenerateConfig) -> bool:
    """Whether ``generate`` runs a causal-LM teacher over token data for these options.

    Yes for ``text:`` data, ``--tokenizer`` or ``--seq-len``, a built-in LM or ``hf:`` teacher,
    or a ``.npz``/HDF5/Zarr file holding a ``tokens`` array. An integer ``.npy`` with a
    ``module:factory`` teacher stays classifier input (pass ``--seq-len`` or use ``.npz``).
    """
    from softlabels.teacher.lm import BUILTIN_LMS

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
    """The producer of ``softlabels generate`` for token data (``is_token_job(config)``).

    A built-in teacher (``gpt-*``) is sized by ``--num-classes`` or the data's tokenizer
    and built for the data's longest sequence; ``--batch-size`` counts sequences per call.
    ``geometry``: the chunking adopted from the store resumed.
    """
    from softlabels._runtime.device import resolve_device
    from softlabels.inputs.spec import absolute_data_spec
    from softlabels.inputs.text import resolve_token_data, teacher_tokenizer
    from softlabels.inputs.tokens import token_fingerprint
    from softlabels.inputs.vocabulary import tokenizer_fingerprint
    from softlabels.teacher.lm import BUILTIN_LMS, call_tokens, resolve_lm

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
