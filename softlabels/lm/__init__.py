"""Language models: token data, tokenizers, causal-LM specs and next-token metrics.

Token data and models are resolved from specs (:func:`resolve_token_data`,
:func:`resolve_lm`); see docs/TOKENS.md. ``text:`` data needs the ``tokenizers`` library
and ``hf:`` models need ``transformers`` (``pip install 'softlabels[lm]'``); both are
imported only when used.
"""

from __future__ import annotations

from softlabels.lm.metrics import LMEvalAccumulator, next_token_ce, next_token_targets
from softlabels.lm.models import BUILTIN_LMS, GPT, CausalLM, GPTConfig, LMInfo, build_lm, resolve_lm
from softlabels.lm.text import encode_text, load_tokenizer, pydoc_topics, resolve_token_data, train_bpe
from softlabels.lm.tokens import (
    PackedTokens, RaggedTokens, TokenBatch, TokenDataset, offsets_of, open_token_file, pack_stream,
    token_fingerprint,
)

__all__ = [
    "BUILTIN_LMS", "GPT", "CausalLM", "GPTConfig", "LMEvalAccumulator", "LMInfo", "PackedTokens",
    "RaggedTokens", "TokenBatch", "TokenDataset", "build_lm", "encode_text", "load_tokenizer",
    "next_token_ce", "next_token_targets", "offsets_of", "open_token_file", "pack_stream",
    "pydoc_topics", "resolve_lm", "resolve_token_data", "token_fingerprint", "train_bpe",
]
