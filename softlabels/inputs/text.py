"""Text as token data: ``text:PATH`` (one stream) and documents, the text or chat conversations
of JSON Lines, Parquet and saved ``datasets`` directories (``KIND:PATH?field=NAME`` or
``?messages=NAME``, ``hfds:`` also ``split=S``), each cut into ``seq_len`` windows that never
cross a document; the token data spec resolver, and BPE training (docs/TOKENS.md).

A ``text:`` stream is encoded without special tokens; a document's text with those its
tokenizer's post-processor adds (a Llama BOS); a conversation with the tokenizer directory's
chat template (:mod:`softlabels.inputs.chat`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import DataError, SpecError, one_line
from softlabels.inputs.files import require_regular
from softlabels.inputs.records import LM_EXTRA, RECORD_KINDS, read_column
from softlabels.inputs.tokens import (
    RaggedTokens, TokenDataset, check_seq_len, open_token_file, pack_stream, window_offsets,
)
from softlabels.inputs.vocabulary import TOKENIZER_JSON, open_tokenizer

__all__ = [
    "END_OF_TEXT", "DocumentSpec", "DocumentWindows", "absolute_document_spec",
    "document_spec_path", "encode_text", "is_document_spec", "load_tokenizer", "needs_seq_len",
    "parse_document_spec", "pydoc_topics", "resolve_documents", "resolve_token_data",
    "teacher_tokenizer", "train_bpe", "window_documents",
]

END_OF_TEXT = "<|endoftext|>"
"""The one special token :func:`train_bpe` adds (id 0), for separating documents."""
_OPTIONS = ("field", "messages", "split")


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:
        raise DataError("text data needs the 'tokenizers' library, which is not installed; "
                        f"{LM_EXTRA}") from err
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


# ------------------------------------------------------------------------------------ documents


@dataclass(frozen=True)
class DocumentSpec:
    """A parsed document spec: the record ``kind``, its ``path``, the ``key`` read, whether it is
    chat, and the ``split``."""

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
    """Parse ``KIND:PATH?field=NAME`` or ``?messages=NAME`` (``,split=S`` for ``hfds:``)."""
    kind, _, body = spec.partition(":")
    if kind not in RECORD_KINDS:
        raise SpecError(f"'{spec}' is not a document spec; use jsonl:, parquet: or hfds: followed "
                        "by the path")
    path, sep, text = body.rpartition("?")
    if not sep or not path:
        raise SpecError(f"{kind} data '{spec}' names no {'path' if sep else 'key'}; write "
                        f"{kind}:PATH?field=NAME (text documents) or ?messages=NAME (chat "
                        "conversations)")
    options: dict[str, str] = {}
    for term in text.split(","):
        name, eq, value = term.partition("=")
        if name not in _OPTIONS or not eq or not value or (name == "split" and kind != "hfds"):
            allowed = "field=NAME or messages=NAME" + (", split=NAME" if kind == "hfds" else "")
            raise SpecError(f"unknown option '{term}' in {kind} data '{spec}'; use {allowed}")
        options[name] = value
    if ("field" in options) == ("messages" in options):
        raise SpecError(f"{kind} data '{spec}' needs exactly one of field=NAME (text documents) "
                        "and messages=NAME (chat conversations)")
    chat = "messages" in options
    key = options["messages" if chat else "field"]
    return DocumentSpec(kind, path, key, chat, options.get("split"))


def needs_seq_len(spec: str) -> bool:
    """Whether token data ``spec`` is cut into windows by ``seq_len`` (``text:`` and documents), so
    a consumer re-resolving it must pass the window length it was generated or trained with."""
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
    """``spec`` with its path made absolute (as stores record it); ``spec`` if it does not parse."""
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

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, document_of: np.ndarray,
                 mask: np.ndarray | None, *, source: str, vocab_size: int | None) -> None:
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
        raise DataError(f"{source} holds no tokens (every document is empty); pass documents with "
                        "text")
    if flags and len(flags) != len(ids):
        raise DataError(f"{source}: target flags were given for some documents only; give them for "
                        "all or none")
    sizes = np.array([len(i) for i in ids], dtype=np.int64)
    per = -(-sizes // seq_len)  # windows per document
    return DocumentWindows(np.concatenate(ids), window_offsets(sizes, seq_len),
                           np.repeat(np.array(owners, dtype=np.int64), per),
                           np.concatenate(flags) if flags else None, source=source,
                           vocab_size=vocab_size)


def _texts(column: Any, tokenizer: Any) -> Iterator[tuple[np.ndarray, None]]:
    for i, value in enumerate(column.values):
        if not isinstance(value, str):
            raise DataError(f"{column.where(i)}: '{column.key}' is {json.dumps(value)[:60]}, not "
                            "text; give every record a string there, or name the text key with "
                            "field=NAME")
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
        wanted = "DIR (a tokenizer directory with a chat template)" if s.chat else "tokenizer.json"
        raise DataError(f"{s.kind} data '{spec}' needs a tokenizer and a window length; pass "
                        f"--tokenizer {wanted} and --seq-len N")
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
