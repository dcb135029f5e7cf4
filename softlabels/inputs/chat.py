"""Chat conversations as token data: rendered with the tokenizer's own chat template, with the
assistant's tokens as the only targets: ``{% generation %}`` markers where the template has them,
else role spans (:meth:`ChatTemplate._role_spans`; docs/TOKENS.md, "Chat conversations").
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import DataError, one_line
from softlabels.inputs.records import LM_EXTRA, optional_module
from softlabels.inputs.vocabulary import tokenizer_file

__all__ = ["ChatTemplate", "check_conversation", "load_chat_template"]

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_DIR_HINT = ("a Hugging Face tokenizer directory (tokenizer.json, and a chat template in tokenizer_config.json's "
             "'chat_template' or in chat_template.jinja)")


def _show(value: Any) -> str:
    """A value as short one-line JSON, for an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_conversation(value: Any, where: str) -> list[dict[str, Any]]:
    """``value`` as a conversation: a non-empty list of messages with a string ``role`` and a string
    ``content``, at least one of them ``assistant``; a one-line DataError naming ``where`` otherwise."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: the conversation is {_show(value)}, not a list of messages; write "
                        '[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]')
    for k, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"]
                and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {k} is {_show(m)}, not {{\"role\": str, \"content\": str}}; give "
                            "every message a role and a string content (ShareGPT's from/value: rename them)")
    roles = [m["role"] for m in value]
    if "assistant" not in roles:
        raise DataError(f"{where}: no message has the role 'assistant' (roles: {', '.join(dict.fromkeys(roles))}); "
                        "name the model's turns 'assistant' (only they are trained)")
    return value


class ChatTemplate:
    """A tokenizer directory's chat template: renders conversations to ``(ids, target flags)``."""

    def __init__(self, tokenizer: Any, directory: str) -> None:
        self.tokenizer, self.directory = tokenizer, directory
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one renders chats
            template = template.get("default")
        if not isinstance(template, str) or not template.strip():
            raise DataError(f"tokenizer '{directory}' has no chat template (no 'chat_template' in "
                            "tokenizer_config.json, no chat_template.jinja); add the model's template to the "
                            "directory, or read plain text with field=NAME")
        self.template = template
        self.marked = bool(_GENERATION.search(template))
        self.vocab_size = len(tokenizer)

    def _render(self, messages: list[dict[str, Any]], prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    def _role_spans(self, messages: list[dict[str, Any]], where: str) -> tuple[list[int], list[int]]:
        """Assistant turn ``i`` spans ``render(messages[:i], add_generation_prompt=True)`` (up to its role
        header) .. ``render(messages[:i + 1])``; a template that rewrites earlier turns is refused."""
        full = self._render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise DataError(f"{where}: the conversation starts with an assistant message, whose role header "
                                f"cannot be told apart without a turn before it; add {{% generation %}} markers to "
                                f"the chat template of '{self.directory}', or start with a user or system turn")
            head, before, turn = self._render(messages[:i], True), self._render(messages[:i], False), \
                self._render(messages[:i + 1], False)
            if head == before:
                raise DataError(f"the chat template of '{self.directory}' ignores add_generation_prompt, so an "
                                "assistant's role header cannot be told from its content; add {% generation %} "
                                "... {% endgeneration %} around the assistant's content and end-of-turn")
            if not (turn.startswith(head) and full.startswith(turn)):
                raise DataError(f"{where}: the chat template of '{self.directory}' renders message {i} differently "
                                "once later messages follow, so its tokens cannot be found by role spans; add "
                                "{% generation %} ... {% endgeneration %} around the assistant's content in the template")
            spans.append((len(head), len(turn)))
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        flags = [int(any(end > a and start < b for a, b in spans)) for start, end in enc["offset_mapping"]]
        return list(enc["input_ids"]), flags

    def encode(self, messages: list[dict[str, Any]], where: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32) of a checked conversation and its target flags (bool): True on assistant tokens."""
        try:
            if self.marked:
                out = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                         return_assistant_tokens_mask=True)
                ids, flags = list(out["input_ids"]), list(out["assistant_masks"])
            else:
                ids, flags = self._role_spans(messages, where)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - the template's own raise_exception, or a Jinja error
            raise DataError(f"{where}: the chat template of '{self.directory}' refused the conversation "
                            f"({one_line(err, 240)}); fix the row, or the template") from None
        return np.asarray(ids, dtype=np.int32), np.asarray(flags, dtype=bool)


def load_chat_template(path: str | os.PathLike[str]) -> ChatTemplate:
    """The chat template of a Hugging Face tokenizer directory, loaded with
    ``AutoTokenizer.from_pretrained(dir, local_files_only=True, trust_remote_code=False)``."""
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"chat data (messages=) is rendered with a chat template, which the tokenizer '{path}' does "
                        f"not hold; pass --tokenizer DIR, {_DIR_HINT}")
    tokenizer_file(directory)  # a fast tokenizer's tokenizer.json: the vocabulary, and never a pickle
    transformers = optional_module("transformers", "chat data (messages=)", LM_EXTRA)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # its advice on tokenizer files is not this command's output
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                         trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; one line says which
        raise DataError(f"cannot load tokenizer directory '{path}' ({one_line(err, 240)}); "
                        f"pass {_DIR_HINT}") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    return ChatTemplate(tok, str(path))
