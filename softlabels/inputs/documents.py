"""Documents as token data: the text or chat conversations of JSON Lines, Parquet and saved
``datasets`` directories (``KIND:PATH?field=NAME`` or ``?messages=NAME``, ``hfds:`` also
``split=S``), cut into ``seq_len`` windows that never cross a document (docs/TOKENS.md).

A text is encoded with the special tokens its tokenizer's post-processor adds (a Llama BOS);
a conversation with the tokenizer directory's chat template (:mod:`softlabels.inputs.chat`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import DataError, SpecError
from softlabels.inputs.records import RECORD_KINDS, read_column
from softlabels.inputs.tokens import RaggedTokens, check_seq_len, window_offsets
from softlabels.inputs.vocabulary import TOKENIZER_JSON, open_tokenizer

__all__ = [
    "DocumentSpec", "DocumentWindows", "absolute_document_spec", "document_spec_path", "is_document_spec",
    "needs_seq_len", "parse_document_spec", "resolve_documents", "teacher_tokenizer", "window_documents",
]

_OPTIONS = ("field", "messages", "split")


@dataclass(frozen=True)
class DocumentSpec:
    """A parsed document spec: the record ``kind``, its ``path``, the ``key`` read, and whether it is chat."""

    kind: str
    path: str
    key: str
    chat: bool
    split: str | None = None

    def options(self) -> str:
        split = "" if self.split is None else f",split={self.split}"
        return f"{'messages' if self.chat else 'field'}={self.key}{split}"


def is_document_spec(spec: str) -> bool:
    """Whether ``spec`` is a ``jsonl:``, ``parquet:`` or ``hfds:`` spec."""
    return spec.partition(":")[0] in RECORD_KINDS and ":" in spec


def parse_document_spec(spec: str) -> DocumentSpec:
    """Parse ``KIND:PATH?field=NAME`` / ``?messages=NAME`` (``,split=S`` for ``hfds:``); SpecError otherwise."""
    kind, _, body = spec.partition(":")
    if kind not in RECORD_KINDS:
        raise SpecError(f"'{spec}' is not a document spec; use jsonl:, parquet: or hfds: followed by the path")
    path, sep, text = body.rpartition("?")
    if not sep or not path:
        raise SpecError(f"{kind} data '{spec}' names no {'path' if sep else 'key'}; write {kind}:PATH?field=NAME "
                        "(text documents) or ?messages=NAME (chat conversations)")
    options: dict[str, str] = {}
    for term in text.split(","):
        name, eq, value = term.partition("=")
        if name not in _OPTIONS or not eq or not value or (name == "split" and kind != "hfds"):
            allowed = "field=NAME or messages=NAME" + (", split=NAME" if kind == "hfds" else "")
            raise SpecError(f"unknown option '{term}' in {kind} data '{spec}'; use {allowed}")
        options[name] = value
    if ("field" in options) == ("messages" in options):
        raise SpecError(f"{kind} data '{spec}' needs exactly one of field=NAME (text documents) and "
                        "messages=NAME (chat conversations)")
    chat = "messages" in options
    return DocumentSpec(kind, path, options["messages" if chat else "field"], chat, options.get("split"))


def needs_seq_len(spec: str) -> bool:
    """Whether token data ``spec`` is cut into windows by ``seq_len`` (``text:`` and document specs), so a
    consumer re-resolving it must pass the window length it was generated or trained with."""
    return spec.startswith("text:") or is_document_spec(spec)


def _parsed(spec: str) -> DocumentSpec | None:
    try:
        return parse_document_spec(spec)
    except SpecError:
        return None


def document_spec_path(spec: str) -> str | None:
    """The file or directory a document spec reads, or None when it does not parse."""
    return getattr(_parsed(spec), "path", None)


def absolute_document_spec(spec: str) -> str:
    """``spec`` with its path made absolute (as stores record it), or ``spec`` itself when it does not parse."""
    s = _parsed(spec)
    return spec if s is None else f"{s.kind}:{os.path.abspath(s.path)}?{s.options()}"


def teacher_tokenizer(teacher: str, data: str | None = None) -> str | None:
    """The tokenizer an ``hf:DIR`` teacher brings, for a job given none: ``DIR`` for chat data (its
    template lives beside the tokenizer), else ``DIR/tokenizer.json``; None for other teachers or
    without a ``tokenizer.json``."""
    if not teacher.startswith("hf:"):
        return None
    directory = Path(teacher.removeprefix("hf:"))
    if not (directory / TOKENIZER_JSON).is_file():
        return None
    chat = data is not None and getattr(_parsed(data), "chat", False)
    return str(directory) if chat else str(directory / TOKENIZER_JSON)


class DocumentWindows(RaggedTokens):
    """Windows of documents: a :class:`RaggedTokens` whose window ``i`` lies inside document
    ``document_of[i]`` (the index among the source's records, empty ones counted)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, document_of: np.ndarray, mask: np.ndarray | None,
                 *, source: str, vocab_size: int | None) -> None:
        super().__init__(tokens, offsets, mask, source=source, vocab_size=vocab_size)
        self.document_of = document_of
        self.document_of.flags.writeable = False


def window_documents(documents: Iterable[tuple[np.ndarray, np.ndarray | None]], seq_len: int, *,
                     source: str = "documents", vocab_size: int | None = None) -> DocumentWindows:
    """Cut each document's ``(ids, target flags or None)`` into ``seq_len`` windows, never across
    documents: ``ceil(L / seq_len)`` windows of a document of ``L`` tokens, the last holding the
    remainder. Pass flags for every document or for none."""
    seq_len = check_seq_len(seq_len)
    ids, flags, owners = [], [], []
    for d, (doc_ids, doc_flags) in enumerate(documents):
        if len(doc_ids) == 0:
            continue
        owners.append(d)
        ids.append(np.asarray(doc_ids))
        if doc_flags is not None:
            flags.append(np.asarray(doc_flags, dtype=bool))
    if not ids:
        raise DataError(f"{source} holds no tokens (every document is empty); pass documents with text")
    if flags and len(flags) != len(ids):
        raise DataError(f"{source}: target flags were given for some documents only; give them for all or none")
    sizes = np.array([len(i) for i in ids], dtype=np.int64)
    per = -(-sizes // seq_len)  # windows per document
    return DocumentWindows(np.concatenate(ids), window_offsets(sizes, seq_len),
                           np.repeat(np.array(owners, dtype=np.int64), per),
                           np.concatenate(flags) if flags else None, source=source, vocab_size=vocab_size)


def _texts(column: Any, tokenizer: Any) -> Iterator[tuple[np.ndarray, None]]:
    for i, value in enumerate(column.values):
        if not isinstance(value, str):
            raise DataError(f"{column.where(i)}: '{column.key}' is {json.dumps(value)[:60]}, not text; "
                            "give every record a string there, or name the text key with field=NAME")
        # one text at a time: encode_batch would start the tokenizers thread pool before a fork
        yield np.asarray(tokenizer.encode(value, add_special_tokens=True).ids, dtype=np.int32), None


def resolve_documents(spec: str, *, tokenizer: str | os.PathLike[str] | None = None,
                      seq_len: int | None = None) -> DocumentWindows:
    """Resolve a document spec to its ``seq_len`` windows; ``tokenizer``: a ``tokenizer.json`` (or a
    directory holding one) for text, a tokenizer directory with a chat template for ``messages=``.
    """
    from softlabels.inputs.chat import check_conversation, load_chat_template

    s = parse_document_spec(spec)
    if tokenizer is None or seq_len is None:
        raise DataError(f"{s.kind} data '{spec}' needs a tokenizer and a window length; pass --tokenizer "
                        f"{'DIR (a tokenizer directory with a chat template)' if s.chat else 'tokenizer.json'} "
                        "and --seq-len N")
    seq_len = check_seq_len(seq_len)
    if s.chat:
        template = load_chat_template(tokenizer)
        column = read_column(s.kind, s.path, s.key, text=False, split=s.split)
        docs: Iterable[tuple[np.ndarray, np.ndarray | None]] = (
            template.encode(check_conversation(v, column.where(i)), column.where(i))
            for i, v in enumerate(column.values))
        vocab = template.vocab_size
    else:
        tok = open_tokenizer(tokenizer)
        column = read_column(s.kind, s.path, s.key, text=True, split=s.split)
        docs, vocab = _texts(column, tok), tok.get_vocab_size()
    return window_documents(docs, seq_len, source=spec, vocab_size=vocab)
