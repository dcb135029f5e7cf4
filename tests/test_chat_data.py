"""Chat conversations as token data (softlabels.inputs.chat): the tokenizer's own template, and
targets on the assistant's tokens only.

Checked three ways: the ids equal transformers' ``apply_chat_template`` ids; a template marked
with ``{% generation %}`` (transformers' own mask) and the same template unmarked (role spans)
flag the same tokens; and the flagged tokens decode to exactly each assistant turn's content
and end-of-turn text, never its role header.
"""

from __future__ import annotations

import numpy as np
import pytest

from softlabels.errors import DataError
from softlabels.inputs.chat import load_chat_template
from softlabels.inputs.text import resolve_documents, resolve_token_data
from softlabels.student.lm_metrics import next_token_targets
from tests._chatdata import (
    CONVERSATIONS,
    MARKED,
    PLAIN,
    tokenizer_dir,
    write_jsonl,
    write_parquet,
)

transformers = pytest.importorskip("transformers")
END = "<|im_end|>\n"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {"plain": tokenizer_dir(root / "plain", PLAIN), "marked": tokenizer_dir(root / "marked", MARKED),
            "jinja": tokenizer_dir(root / "jinja", PLAIN, jinja_file=True), "root": root}


def chat_file(root, conversations=CONVERSATIONS, name="chat.jsonl"):
    return write_jsonl(root / name, [{"id": i, "messages": c} for i, c in enumerate(conversations)])


def whole(ds):
    """Each conversation's ids and flags, from windows of any length (one window per conversation at 4096)."""
    batch = ds.get_batch(np.arange(len(ds)))
    return [(batch.ids[i, :n].tolist(), batch.mask[i, :n].tolist()) for i, n in enumerate(batch.lengths.tolist())]


def runs(ids, flags, decode):
    """The text of each maximal run of flagged tokens."""
    out, cur = [], []
    for i, f in zip(ids, flags):
        if f:
            cur.append(i)
        elif cur:
            out.append(decode(cur))
            cur = []
    return out + ([decode(cur)] if cur else [])


@pytest.mark.parametrize("kind", ["plain", "marked", "jinja"])
def test_ids_are_the_templates_and_targets_are_the_assistants_turns(dirs, kind):
    ds = resolve_token_data(f"jsonl:{chat_file(dirs['root'])}?messages=messages", tokenizer=dirs[kind], seq_len=4096)
    hf = transformers.AutoTokenizer.from_pretrained(str(dirs[kind]))

    def decode(ids):
        return hf.decode(ids, skip_special_tokens=False)

    assert ds.has_mask and ds.vocab_size == len(hf)
    for (ids, flags), conv in zip(whole(ds), CONVERSATIONS):
        assert ids == list(hf.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
        turns = [m["content"] + END for m in conv if m["role"] == "assistant"]
        assert runs(ids, flags, decode) == turns  # content and end-of-turn; the header is no target
        assert "<|im_start|>assistant\n" not in "".join(runs(ids, flags, decode))


def test_the_generation_mask_and_role_spans_agree(dirs):
    data = chat_file(dirs["root"])
    marked = whole(resolve_documents(f"jsonl:{data}?messages=messages", tokenizer=dirs["marked"], seq_len=4096))
    plain = whole(resolve_documents(f"jsonl:{data}?messages=messages", tokenizer=dirs["plain"], seq_len=4096))
    assert marked == plain
    template = load_chat_template(dirs["marked"])
    assert template.marked and not load_chat_template(dirs["plain"]).marked
    out = template.tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
    assert marked[1][1] == [bool(f) for f in out["assistant_masks"]]  # transformers' own mask, unchanged


def test_the_loss_counts_exactly_the_predictions_of_assistant_tokens(dirs):
    """mask[t] flags token t as a target: position t - 1 predicts it (docs/TOKENS.md, "Masks")."""
    ds = resolve_documents(f"jsonl:{chat_file(dirs['root'])}?messages=messages", tokenizer=dirs["plain"], seq_len=4096)
    batch = ds.get_batch(np.arange(len(ds)))
    targets, valid = next_token_targets(batch.ids, batch.mask, batch.lengths)
    hf = transformers.AutoTokenizer.from_pretrained(str(dirs["plain"]))
    for i, conv in enumerate(CONVERSATIONS):
        n = int(batch.lengths[i])
        assert valid[i, :n - 1].tolist() == batch.mask[i, 1:n].tolist()
        predicted = hf.decode(targets[i][valid[i]].tolist(), skip_special_tokens=False)
        assert predicted == "".join(m["content"] + END for m in conv if m["role"] == "assistant")


def test_long_conversations_are_cut_with_their_targets(dirs):
    data = chat_file(dirs["root"])
    full = whole(resolve_documents(f"jsonl:{data}?messages=messages", tokenizer=dirs["plain"], seq_len=4096))
    ds = resolve_documents(f"jsonl:{data}?messages=messages", tokenizer=dirs["plain"], seq_len=7)
    batch = ds.get_batch(np.arange(len(ds)))
    rebuilt = {d: ([], []) for d in range(len(CONVERSATIONS))}
    for i, d in enumerate(ds.document_of.tolist()):
        n = int(batch.lengths[i])
        assert n <= 7
        rebuilt[d][0].extend(batch.ids[i, :n].tolist())
        rebuilt[d][1].extend(batch.mask[i, :n].tolist())
    assert [rebuilt[d] for d in range(len(CONVERSATIONS))] == [(ids, flags) for ids, flags in full]


def test_conversations_in_parquet(dirs):
    pytest.importorskip("pyarrow")
    path = write_parquet(dirs["root"] / "chat.parquet", {"messages": CONVERSATIONS})
    ds = resolve_documents(f"parquet:{path}?messages=messages", tokenizer=dirs["marked"], seq_len=4096)
    ref = resolve_documents(f"jsonl:{chat_file(dirs['root'])}?messages=messages", tokenizer=dirs["marked"],
                            seq_len=4096)
    assert whole(ds) == whole(ref)


REWRITES = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_PROMPT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
STRICT = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns here') }}"
          "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


@pytest.mark.parametrize(("template", "conversation", "needle"), [
    (REWRITES, CONVERSATIONS[0], "line 1 of '.*': the chat template of '.*' renders message 1 differently"),
    (NO_PROMPT, CONVERSATIONS[0], "ignores add_generation_prompt"),
    (PLAIN, [{"role": "assistant", "content": "hi"}], "line 1 of '.*': the conversation starts with an assistant"),
    (STRICT, CONVERSATIONS[1], ("line 1 of '.*': the chat template of '.*' refused the conversation "
                                r"\(TemplateError: no system turns here\)")),
])
def test_templates_that_cannot_be_read_exactly_are_refused(tmp_path, template, conversation, needle):
    tok = tokenizer_dir(tmp_path / "tok", template)
    data = chat_file(tmp_path, [conversation])
    with pytest.raises(DataError, match=needle):
        resolve_documents(f"jsonl:{data}?messages=messages", tokenizer=tok, seq_len=16)


def test_a_marked_template_takes_a_conversation_that_starts_with_the_assistant(tmp_path):
    tok = tokenizer_dir(tmp_path / "tok", MARKED)
    data = chat_file(tmp_path, [[{"role": "assistant", "content": "hello world"}]])
    (ids, flags), = whole(resolve_documents(f"jsonl:{data}?messages=messages", tokenizer=tok, seq_len=64))
    hf = transformers.AutoTokenizer.from_pretrained(str(tok))
    assert runs(ids, flags, lambda i: hf.decode(i, skip_special_tokens=False)) == ["hello world" + END]
