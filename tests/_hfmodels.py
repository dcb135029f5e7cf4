"""Tiny random Hugging Face causal LMs, written in code (``from_config`` + ``save_pretrained``; nothing downloaded).

A model directory holds ``config.json``, ``model.safetensors`` and the ChatML tokenizer
directory of :mod:`tests._chatdata` (``tokenizer.json``, ``tokenizer_config.json`` with its
chat template), so it is a teacher, a student and a tokenizer at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests._chatdata import PLAIN, tokenizer_dir

SIZES: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64),
    "gpt2": dict(n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0),
    "qwen2": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64),
}


def hf_model_dir(path: Path, arch: str = "llama", *, seed: int = 0, template: str | None = PLAIN,
                 **overrides: Any) -> Path:
    """A tiny random ``arch`` model with the ChatML tokenizer, saved with safetensors into ``path``."""
    import torch
    import transformers

    tokenizer_dir(path, template)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(arch, **{"vocab_size": vocab, **SIZES[arch], **overrides})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    return path
