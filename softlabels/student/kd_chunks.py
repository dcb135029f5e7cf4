"""A language model's per-position loss over the vocabulary in chunks of positions, with bounded memory.

At V = 128,256 the student's logits of a batch are large ([P, V] float32: 0.5 GB for 1,024
positions), and autograd would keep several tensors of that size for the loss's backward (the
float32 copy, the log-softmax at T, the teacher's probabilities at T, the hard CE's log-softmax).
:func:`chunked_loss` computes the loss *and its gradient* chunk by chunk in the forward pass
(each chunk of at most :data:`CHUNK_LOGITS` logits runs its own small autograd graph, freed
before the next), keeps only the gradient [P, V] for the backward, and scales it there: the loss's
extra memory is one gradient the size of the logits plus one chunk's intermediates, whatever the
batch. No chunk is computed twice (torchtune's chunked KD loss recomputes nothing either; it
chunks the output projection instead, which a model's own forward does not allow here).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["CHUNK_LOGITS", "chunk_rows", "chunked_loss"]

CHUNK_LOGITS = 1 << 24
"""Logits per chunk: 16 Mi (64 MiB float32), 130 positions at V = 128,256."""

RowsLoss = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``(logits of rows, the rows) -> (weighted total, hard CE, soft loss)``, sums over those rows."""


def chunk_rows(vocab_size: int) -> int:
    """Positions per chunk at this vocabulary."""
    return max(1, CHUNK_LOGITS // max(int(vocab_size), 1))


class _Chunked(torch.autograd.Function):
    """Sums of ``rows_loss`` over chunks of rows; the gradient of the total is computed per chunk up front."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows_loss: RowsLoss, step: int):
        need = bool(ctx.needs_input_grad[0])
        grad = torch.empty_like(logits) if need else None
        sums: list[torch.Tensor] = []
        for a in range(0, logits.shape[0], step):
            rows = slice(a, min(a + step, logits.shape[0]))
            with torch.enable_grad():
                x = logits[rows].detach().requires_grad_(need)
                terms = rows_loss(x, rows)
                if need:
                    (g,) = torch.autograd.grad(terms[0], x, allow_unused=True)
                    grad[rows] = 0 if g is None else g
            terms = [t.detach() for t in terms]
            sums = terms if not sums else [s + t for s, t in zip(sums, terms)]
        ctx.save_for_backward(*([grad] if need else []))
        ctx.mark_non_differentiable(sums[1], sums[2])  # reported, not trained on
        return tuple(sums)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor, *_: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None


def chunked_loss(logits: torch.Tensor, rows_loss: RowsLoss,
                 step: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows_loss`` summed over all rows of ``logits`` [P, V], in chunks of ``step`` rows (default:
    :func:`chunk_rows`); returns (total, with a gradient; hard CE and soft loss, detached)."""
    total, ce, soft = _Chunked.apply(logits, rows_loss, step or chunk_rows(logits.shape[-1]))
    return total, ce, soft
