"""Plain text as token data (a ``tokenizer.json`` for the ``tokenizers`` library), BPE training,
and the token data spec resolver (token files, ``text:PATH`` and document specs; the grammar is
in docs/TOKENS.md).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import DataError, SpecError, one_line
from softlabels.inputs.files import require_regular
from softlabels.inputs.documents import is_document_spec, resolve_documents
from softlabels.inputs.tokens import TokenDataset, open_token_file, pack_stream

__all__ = ["load_tokenizer", "encode_text", "resolve_token_data", "train_bpe", "pydoc_topics"]

_INSTALL = "pip install 'softlabels[lm]'"
END_OF_TEXT = "<|endoftext|>"
"""The one special token :func:`train_bpe` adds (id 0), for separating documents."""


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:
        raise DataError(f"text data needs the 'tokenizers' library, which is not installed; {_INSTALL}") from err
    return tokenizers


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file (JSON only; nothing is executed)."""
    tokenizers = _tokenizers()
    if not Path(path).exists():
        raise DataError(f"tokenizer file '{path}' does not exist; pass a tokenizer.json saved by 'tokenizers'")
    require_regular(path)
    return _rust_call(lambda reason: f"cannot read tokenizer '{path}' ({reason}); pass a tokenizer.json saved by "
                      "tokenizers.Tokenizer.save (for Hugging Face models, the tokenizer.json beside the weights)",
                      tokenizers.Tokenizer.from_file, str(path))


def encode_text(text: str, tokenizer: Any, *, tokenizer_path: str | os.PathLike[str] | None = None,
                source: str = "the text") -> np.ndarray:
    """Token ids of ``text`` (int64), encoded in one piece without special tokens (the text is one
    stream, cut into windows afterwards); a tokenizer that cannot encode it raises
    :class:`DataError` naming ``tokenizer_path`` and ``source``."""
    name = "the tokenizer" if tokenizer_path is None else f"tokenizer '{tokenizer_path}'"
    encoding = _rust_call(lambda reason: f"{name} cannot encode {source} ({reason}); fix the tokenizer.json (a "
                          "WordLevel vocabulary needs its unknown token; a normalizer or pre-tokenizer regex must not "
                          "backtrack without end), or pass another tokenizer",
                          tokenizer.encode, text, add_special_tokens=False)
    return np.asarray(encoding.ids, dtype=np.int64)


def _rust_call(refusal: Callable[[str], str], fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` into the ``tokenizers`` bindings, a failure raised as
    ``DataError(refusal(its reason))``. A Rust panic prints to fd 2 before it becomes an exception,
    so fd 2 is held back while it runs: dropped on a failure (the one line says it), passed on
    otherwise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            result = fn(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # Exception subclasses, and pyo3's PanicException (a BaseException)
            raise DataError(refusal(one_line(err, typed=False))) from err
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        text = memoryview(held.read())
        while text:
            text = text[os.write(2, text):]
    return result


def _read_text(path: str) -> str:
    if not Path(path).exists():
        raise DataError(f"text file '{path}' does not exist; check the path in text:FILE")
    require_regular(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"text file '{path}' is not UTF-8 ({err.reason} at byte {err.start}); convert it to UTF-8") from err


def resolve_token_data(
    spec: str, *, tokenizer: str | os.PathLike[str] | None = None, seq_len: int | None = None
) -> TokenDataset:
    """Resolve a token data spec (grammar in docs/TOKENS.md) to a :class:`TokenDataset`.

    ``tokenizer`` (a tokenizer.json) is needed by ``text:`` specs and sets any data's
    ``vocab_size``; ``seq_len`` cuts a text, a stream or each sequence into windows (none crossing
    two sequences).
    """
    if is_document_spec(spec):
        return resolve_documents(spec, tokenizer=tokenizer, seq_len=seq_len)
    if spec.startswith("text:"):
        path = spec.removeprefix("text:")
        if tokenizer is None or seq_len is None:
            raise DataError(f"text data '{spec}' needs a tokenizer and a window length; "
                            "pass --tokenizer tokenizer.json and --seq-len N")
        text = _read_text(path)
        tok = load_tokenizer(tokenizer)
        ids = encode_text(text, tok, tokenizer_path=tokenizer, source=f"text file '{path}'")
        if ids.size == 0:
            raise DataError(f"text file '{path}' holds no tokens; pass a non-empty text")
        return pack_stream(ids, seq_len, source=spec, vocab_size=tok.get_vocab_size())
    if Path(spec.rstrip("/")).suffix.lower() in (".npy", ".npz", ".h5", ".hdf5", ".zarr"):
        ds = open_token_file(spec, seq_len=seq_len)
        if tokenizer is not None:
            ds.vocab_size = load_tokenizer(tokenizer).get_vocab_size()
        return ds
    raise SpecError(f"unknown token data '{spec}'; use a .npy/.npz/.h5/.zarr file of token ids, text:FILE, "
                    "jsonl:FILE?field=NAME, parquet:FILE?field=NAME or hfds:DIR?field=NAME with --tokenizer")


def train_bpe(texts: str | Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2 style: any text encodes, no unknown token).

    ``END_OF_TEXT`` is id 0. Training is deterministic for the same texts and settings.
    """
    tokenizers = _tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([texts] if isinstance(texts, str) else texts, trainer=trainer)
    return tok


def pydoc_topics() -> dict[str, str]:
    """CPython's own English help texts (``pydoc_data.topics``, ~465,000 characters), by topic.

    Real prose and code shipped with every Python, so the language-model demo needs no download.
    """
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))
