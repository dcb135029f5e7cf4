"""Build the language-model demo's data: a BPE tokenizer and train / held-out token files.

The text is CPython's own English help (``pydoc_data.topics``, ~465,000 characters,
shipped with every Python: nothing is downloaded). Each topic is cut at blank lines into
documents of about ``--block-chars`` characters (each paragraph kept once: topics repeat
whole sections) and every ``--held-out-every``-th document
is held out (~10%), so held-out text is never seen in training. The tokenizer is trained
on the training documents only. Writes into ``--out``:

  tokenizer.json               byte-level BPE (``<|endoftext|>`` = id 0), for ``--tokenizer``
  train.txt, heldout.txt       the texts (documents joined by blank lines), for ``text:FILE``
  train.npz, heldout.npz       ``tokens`` + ``offsets``: documents encoded one by one, joined by
                               ``<|endoftext|>``, cut into ``--seq-len`` windows (last one shorter)
  lm_data.json                 what was built: characters, tokens, windows, vocabulary

    python tools/lm_data.py --out DIR [--vocab-size 4096] [--seq-len 128] [--held-out-every 10]
                            [--block-chars 4000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from softlabels.inputs.text import END_OF_TEXT, encode_text, pydoc_topics, train_bpe
from softlabels.inputs.tokens import pack_stream


def blocks(text: str, size: int) -> list[str]:
    """``text`` cut at blank lines into pieces of at least ``size`` characters (the last may be shorter)."""
    out, current = [], ""
    for paragraph in text.split("\n\n"):
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= size:
            out.append(current)
            current = ""
    return out + ([current] if current else [])


def split_documents(every: int, block_chars: int) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts): each topic (in sorted order) is cut into blocks of about
    ``block_chars`` characters at blank lines, and every ``every``-th block is held out, so
    ~1/every of the text is held out and none of it is seen in training."""
    seen: set[str] = set()
    docs = []
    for text in pydoc_topics().values():
        # Topics repeat whole sections (~19% of the characters): keep each paragraph once,
        # or held-out text would also be training text.
        fresh = [p for p in text.split("\n\n") if not (p in seen or seen.add(p))]
        docs += blocks("\n\n".join(fresh), block_chars) if fresh else []
    return ([d for i, d in enumerate(docs) if i % every != every - 1],
            [d for i, d in enumerate(docs) if i % every == every - 1])


def encode_documents(texts: list[str], tokenizer) -> np.ndarray:
    """One stream: each text's ids followed by ``<|endoftext|>`` (documents never merge)."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    parts = [np.append(encode_text(t, tokenizer), eot) for t in texts]
    return np.concatenate(parts).astype(np.int32 if tokenizer.get_vocab_size() < 2**31 else np.int64)


def build(out: Path, *, vocab_size: int, seq_len: int, held_out_every: int, block_chars: int = 4000) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = split_documents(held_out_every, block_chars)
    tokenizer = train_bpe(train, vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    summary: dict = {"source": "pydoc_data.topics", "vocab_size": tokenizer.get_vocab_size(), "seq_len": seq_len,
                     "held_out_every": held_out_every, "block_chars": block_chars}
    for name, texts in (("train", train), ("heldout", heldout)):
        (out / f"{name}.txt").write_text("\n\n".join(texts), encoding="utf-8")
        stream = encode_documents(texts, tokenizer)
        ds = pack_stream(stream, seq_len)
        offsets = np.concatenate([[0], np.cumsum(ds.lengths())])
        np.savez(out / f"{name}.npz", tokens=stream, offsets=offsets)
        summary[name] = {"documents": len(texts), "characters": sum(map(len, texts)), "tokens": int(stream.size),
                         "windows": len(ds), "chars_per_token": round(sum(map(len, texts)) / stream.size, 3)}
    (out / "lm_data.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--held-out-every", type=int, default=10)
    p.add_argument("--block-chars", type=int, default=4000)
    args = p.parse_args()
    summary = build(args.out, vocab_size=args.vocab_size, seq_len=args.seq_len, held_out_every=args.held_out_every,
                    block_chars=args.block_chars)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
