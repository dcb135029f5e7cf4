"""Tiny tokenizers and records for the document and chat tests, made in code (nothing downloaded).

The tokenizer is a byte-level BPE trained on a few sentences with ChatML's special tokens;
a *tokenizer directory* adds ``tokenizer_config.json`` with a small ChatML template, either
marked with ``{% generation %}`` or plain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world, how are you today? I am fine, thank you.",
    "The assistant answers the user's question in one short sentence.",
    "system user assistant: be brief and kind.",
] * 4

PLAIN = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MARKED = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
          "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
          "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "how are you today?"}],
    [{"role": "system", "content": "be brief and kind."}, {"role": "user", "content": "The quick brown fox?"},
     {"role": "assistant", "content": "jumps over the lazy dog."}, {"role": "user", "content": "thank you"},
     {"role": "assistant", "content": "I am fine, thank you."}],
    [{"role": "user", "content": "one short sentence"}, {"role": "assistant", "content": ""}],
]
DOCUMENTS = ["The quick brown fox jumps over the lazy dog. " * 3, "hello world", "",
             "The assistant answers the user's question in one short sentence."]


def train_tokenizer(*, bos: bool = False) -> Any:
    """A byte-level BPE of ~300 tokens; ``bos``: its post-processor puts ``<|endoftext|>`` before each text."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
            ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    return tok


def tokenizer_dir(path: Path, template: str | None = PLAIN, *, jinja_file: bool = False) -> Path:
    """A Hugging Face tokenizer directory: tokenizer.json, tokenizer_config.json and the chat template
    (in the config, or in chat_template.jinja; none when ``template`` is None)."""
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer().save(str(path / "tokenizer.json"))
    config: dict[str, Any] = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if template is not None and jinja_file:
        (path / "chat_template.jinja").write_text(template)
    elif template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path
