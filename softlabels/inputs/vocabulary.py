"""Which tokenizer, and its identity: ``--tokenizer`` as a ``tokenizer.json`` or a directory
holding one, and a fingerprint of the vocabulary that a store can record (docs/TOKENS.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from softlabels.errors import DataError, ModelMismatch, one_line
from softlabels.inputs.records import LM_EXTRA, optional_module

__all__ = ["TOKENIZER_JSON", "check_same_tokenizer", "open_tokenizer", "tokenizer_file", "tokenizer_fingerprint"]

TOKENIZER_JSON = "tokenizer.json"


def tokenizer_file(path: str | os.PathLike[str]) -> Path:
    """The ``tokenizer.json`` that ``path`` names: the file itself, or the one inside a directory."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_JSON
        if not p.is_file():
            raise DataError(f"tokenizer directory '{p.parent}' holds no {TOKENIZER_JSON}; pass a directory written "
                            "by a Hugging Face fast tokenizer's save_pretrained, or a tokenizer.json")
    elif not p.is_file():
        what = "does not exist" if not p.exists() else "is not a regular file"
        raise DataError(f"tokenizer '{p}' {what}; pass a tokenizer.json or a directory holding one")
    return p


def open_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` or a directory holding one (JSON only; nothing runs)."""
    tokenizers = optional_module("tokenizers", "token data", LM_EXTRA)
    file = tokenizer_file(path)
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exception subclasses
        raise DataError(f"cannot read tokenizer '{file}' ({one_line(err, typed=False)}); pass a tokenizer.json "
                        "saved by tokenizers.Tokenizer.save or a Hugging Face tokenizer's save_pretrained") from None


def tokenizer_fingerprint(tokenizer: str | os.PathLike[str] | Any) -> str:
    """``"sha256:<hex>"`` over the parsed vocabulary (every token and its id, added tokens included)
    and which ids are special, so re-saving ``tokenizer.json`` keeps it. ``tokenizer``: a file, a
    directory holding one, a ``tokenizers.Tokenizer`` or a transformers fast tokenizer."""
    if isinstance(tokenizer, str | os.PathLike):
        tok = open_tokenizer(tokenizer)
    else:  # a tokenizers.Tokenizer, or a transformers fast tokenizer around one
        tok = getattr(tokenizer, "backend_tokenizer", tokenizer)
    vocab = sorted((int(i), t) for t, i in tok.get_vocab(with_added_tokens=True).items())
    special = sorted(int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special)
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(b"softlabels-tokenizer-fingerprint-v1|")
    digest.update(payload.encode("utf-8"))
    return f"sha256:{digest.hexdigest()}"


def check_same_tokenizer(expected: str | None, tokenizer: str | os.PathLike[str] | None, *, what: str,
                         store: str) -> None:
    """Refuse ``tokenizer`` (a file or directory) unless its fingerprint is ``expected``, the one ``store``
    recorded; nothing is checked when either is unknown (a store of token ids made without a tokenizer)."""
    if expected is None or tokenizer is None:
        return
    got = tokenizer_fingerprint(tokenizer)
    if got != expected:
        raise ModelMismatch(
            f"{what} '{tokenizer}' has another vocabulary than the tokenizer store '{store}' was generated with "
            f"(fingerprint {got.removeprefix('sha256:')[:12]} vs {expected.removeprefix('sha256:')[:12]}); use the "
            "teacher's tokenizer and a student of its vocabulary (cross-tokenizer distillation is not supported)")
