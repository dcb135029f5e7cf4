"""Tiny token stores for the language-model tests, written with UnitWriter from a fixed teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from softlabels.inputs.tokens import (
    RaggedTokens,
    TokenDataset,
    offsets_of,
    token_fingerprint,
)
from softlabels.store.positions import TokenPositions, UnitGeometry
from softlabels.store.schema import StoreMetaV2
from softlabels.store.writer import UnitWriter
from softlabels.teacher.lm import GPT, GPTConfig

PARAMS = {"dense": {}, "topk": {"k": 4}, "sampled": {"samples": 12, "seed": 3}}


def ragged_data(path: Path, lengths, vocab: int, seed: int = 0, mask: bool = False) -> tuple[str, TokenDataset]:
    """An .npz of ragged sequences with these lengths (and optionally a random loss mask)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int64)
    arrays = {"tokens": rng.integers(0, vocab, int(lengths.sum())).astype(np.int64), "offsets": offsets_of(lengths)}
    if mask:
        arrays["mask"] = rng.random(int(lengths.sum())) < 0.7
    np.savez(path, **arrays)
    return str(path), RaggedTokens(arrays["tokens"], arrays["offsets"], arrays.get("mask"), source=str(path))


def tiny_teacher(vocab: int, context: int, seed: int = 1) -> GPT:
    return GPT(GPTConfig(vocab, context, 1, 2, 16), seed=seed).eval()


def teacher_logits(teacher, data: TokenDataset, i: int) -> torch.Tensor:
    with torch.no_grad():
        return teacher(data.get_batch(np.array([i])).ids)[0].float()


def write_token_store(path: Path, teacher, data: TokenDataset, layout: str, *, spec: str | None = None,
                      chunk_samples: int = 2, chunk_positions: int = 8, logits_dtype: str = "float32",
                      params: dict | None = None) -> str:
    """One teacher forward per sequence, encoded by the layout, written sample by sample."""
    lengths = data.lengths()
    n = len(lengths)
    vocab = teacher.cfg.vocab_size if hasattr(teacher, "cfg") else int(teacher_logits(teacher, data, 0).shape[-1])
    g = UnitGeometry(n, chunk_samples)
    tokens = TokenPositions(g, lengths, chunk_positions).to_attrs()["tokens"]
    source = {"spec": spec, "fingerprint": token_fingerprint(data)} if spec else {}
    meta = StoreMetaV2(positions="tokens", layout=layout, num_samples=n, num_classes=vocab,
                       logits_dtype=logits_dtype, chunk_samples=chunk_samples,
                       layout_params=PARAMS[layout] if params is None else params, tokens=tokens, source=source,
                       teacher={"spec": "tiny-gpt"})
    lay = meta.layout_obj()
    with UnitWriter.create(path, meta, lengths=lengths) as w:
        for i in range(n):
            logits = teacher_logits(teacher, data, i)
            arrays = lay.encode(logits, sample_ids=torch.full((len(logits),), i), positions=torch.arange(len(logits)))
            w.write(i, **{k: v.numpy() if v.dtype != torch.bfloat16 else v.view(torch.int16).numpy().view(np.uint16)
                          for k, v in arrays.items()},
                    labels=np.array([-1]), sample_ids=np.array([i]))
        w.finish()
    return str(path)
