"""Causal language models: a small built-in GPT, ``package.module:factory`` and ``hf:DIR``
(the grammar: docs/TOKENS.md, "Causal language model specs").

Every resolved model is a :class:`CausalLM`: token ids int64 [B, L] → raw logits [B, L, V],
position ``t`` seeing only tokens ``0..t``, so right padding never changes real tokens' logits.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from softlabels.errors import DataError, ModelMismatch, SpecError, one_line
from softlabels.teacher.hf import load_hf, load_hf_init, max_positions
from softlabels.teacher.models import count_parameters
from softlabels.teacher.spec import ModelInfo, _load_weights, factory_module

__all__ = ["GPTConfig", "GPT", "BUILTIN_LMS", "CALL_LOGITS_BYTES", "CausalLM", "LMInfo", "build_lm", "call_tokens",
           "resolve_lm"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT`: vocabulary, context (longest sequence), depth and width."""

    vocab_size: int
    context: int
    n_layer: int
    n_head: int
    d_model: int


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(b, length, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, length, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-2-shaped decoder (learned positions, pre-norm blocks, head tied to the embedding)."""

    def __init__(self, cfg: GPTConfig, *, seed: int = 0) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ModelMismatch(f"d_model {cfg.d_model} is not a multiple of n_head {cfg.n_head}; fix the GPT config")
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):  # the layers' default init must not move the global RNG
            self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos = nn.Embedding(cfg.context, cfg.d_model)
            self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
            self.ln = nn.LayerNorm(cfg.d_model)
        self._init(seed)

    def _init(self, seed: int) -> None:
        """GPT-2's init (N(0, 0.02); residual projections scaled by 1/sqrt(2 n_layer)), from
        its own generator: the same seed gives the same weights whatever the global RNG."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim == 1:  # LayerNorm gains
                nn.init.ones_(p)
            else:
                residual = name.endswith(("proj.weight", "out.weight"))
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if residual else 0.02
                nn.init.normal_(p, 0.0, std, generator=g)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.cfg.context:
            raise ModelMismatch(
                f"sequences of {length} tokens exceed the model's context of {self.cfg.context}; "
                "pass a shorter --seq-len or build the model with a longer context"
            )
        x = self.tok(ids) + self.pos(torch.arange(length, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln(x), self.tok.weight)  # tied head: V x d shared with the embedding


BUILTIN_LMS: dict[str, tuple[int, int, int]] = {
    "gpt-tiny": (1, 2, 32),
    "gpt-small": (2, 4, 64),
    "gpt-medium": (4, 4, 192),
}
"""Built-in GPT sizes by name: ``(n_layer, n_head, d_model)``. ``gpt-tiny`` is student-sized;
``gpt-medium`` has over 10x its parameters at vocabularies up to ~12k (17x at 4,096)."""


def _unknown(spec: str) -> SpecError:
    return SpecError(f"unknown language model '{spec}'; use one of: {', '.join(BUILTIN_LMS)}, "
                     "a package.module:factory or hf:DIR")


def build_lm(name: str, vocab_size: int, context: int, *, seed: int = 0) -> GPT:
    """The built-in GPT ``name`` for ``vocab_size`` tokens and sequences up to ``context``."""
    if name not in BUILTIN_LMS:
        raise _unknown(name)
    if not (vocab_size >= 1 and context >= 1):
        raise ModelMismatch(
            f"cannot build '{name}' for vocabulary {vocab_size} and context {context}; pass both >= 1"
        )
    n_layer, n_head, d_model = BUILTIN_LMS[name]
    return GPT(GPTConfig(vocab_size, context, n_layer, n_head, d_model), seed=seed)


class CausalLM(nn.Module):
    """Any causal LM as ids [B, L] -> logits [B, L, V]: ids outside ``[0, vocab_size)`` refused on
    one line, outputs with a ``.logits`` (Hugging Face) unwrapped."""

    def __init__(self, model: nn.Module, spec: str, vocab_size: int | None = None) -> None:
        super().__init__()
        self.model, self.spec, self.vocab_size = model, spec, vocab_size

    def check_ids(self, ids: torch.Tensor) -> None:
        """Refuse token ids outside ``0..vocab_size - 1`` with one line."""
        if self.vocab_size is not None and ids.numel():
            low, high = torch.stack(torch.aminmax(ids)).tolist()  # one device sync, not two
            if low < 0 or high >= self.vocab_size:
                raise DataError(
                    f"token id {high if high >= self.vocab_size else low} is outside the vocabulary of "
                    f"'{self.spec}' (0..{self.vocab_size - 1}); tokenize with the model's own tokenizer"
                )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.dtype != torch.int64:
            raise DataError(f"token ids have shape {tuple(ids.shape)} and dtype {ids.dtype}; pass int64 [B, L]")
        self.check_ids(ids)
        out = self.model(ids)
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[:2] != ids.shape:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
            raise ModelMismatch(
                f"language model '{self.spec}' returned {got} for ids of shape {tuple(ids.shape)}; "
                "it must return logits [B, L, V] (or an object with .logits)"
            )
        return logits


CALL_LOGITS_BYTES = 256 << 20
"""The float32 logits one teacher call may produce: 256 MiB, about 512 padded tokens at V = 128,256."""


def call_tokens(vocab_size: int) -> int:
    """Padded tokens per teacher call such that its logits [B, L, V] (float32) stay under
    :data:`CALL_LOGITS_BYTES`: what bounds ``generate``'s memory at real vocabularies."""
    return max(1, CALL_LOGITS_BYTES // (4 * max(int(vocab_size), 1)))


@dataclass(frozen=True)
class LMInfo:
    """A resolved language model (in eval mode), its vocabulary and what identifies it."""

    module: CausalLM
    spec: str
    kind: str
    vocab_size: int
    weights_sha256: str | None
    num_parameters: int

    metadata = ModelInfo.metadata  # JSON-serialisable description (everything but the module)


def _probe_vocab(module: nn.Module, spec: str) -> int:
    """The output width V of ``module``, from a forward pass on one token (id 0)."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            logits = CausalLM(module, spec)(torch.zeros((1, 1), dtype=torch.int64, device=device))
    except (ModelMismatch, DataError):
        raise
    except Exception as err:  # user code
        raise ModelMismatch(f"language model '{spec}' failed on token ids [1, 1] ({one_line(err, 300)}); "
                            "fix the model") from err
    return int(logits.shape[-1])


def resolve_lm(spec: str, *, vocab_size: int | None = None, context: int | None = None, seed: int = 0,
               weights: str | os.PathLike[str] | None = None) -> LMInfo:
    """Resolve a causal-LM spec to a model in eval mode. Built-ins are sized by ``vocab_size`` and
    ``context`` (default 1024) and seeded by ``seed``; ``weights`` is a state_dict file or
    ``hf:DIR`` (that checkpoint's weights, same architecture). A given ``vocab_size`` must equal the
    output width (``hf:``: or be less, embeddings padded to a multiple as Qwen2's)."""
    digest: str | None = None
    if spec in BUILTIN_LMS:
        if vocab_size is None:
            raise ModelMismatch(f"built-in '{spec}' is sized by the vocabulary; pass the tokenizer or the vocab size")
        module, kind = build_lm(spec, vocab_size, context or 1024, seed=seed), "builtin"
    elif spec.startswith("hf:"):
        module, digest = load_hf(spec.removeprefix("hf:"))
        kind = "hf"
    elif ":" in spec:
        module, kind = factory_module(spec), "factory"
    else:
        raise _unknown(spec)
    if kind == "hf" and context is not None and context > (most := max_positions(module) or context):
        raise ModelMismatch(f"sequences of {context} tokens exceed the {most} positions of '{spec}' "
                            f"(max_position_embeddings); pass --seq-len {most} or less")
    if isinstance(weights, str) and weights.startswith("hf:"):
        digest = load_hf_init(module, spec, weights.removeprefix("hf:"))
    elif weights is not None:
        digest = _load_weights(module, str(weights), spec, allow_pickle=False)
    module.eval()
    width = _probe_vocab(module, spec)
    if vocab_size is not None and width != vocab_size and not (kind == "hf" and width > vocab_size):
        raise ModelMismatch(
            f"language model '{spec}' outputs {width} logits per token but the vocabulary has {vocab_size}; "
            "use the model's own tokenizer (cross-tokenizer distillation is not supported)"
        )
    return LMInfo(CausalLM(module, spec, width).eval(), spec, kind, width, digest, count_parameters(module))
