"""Preference data for DPO: a prompt, a chosen reply and a rejected one.

    {"prompt": "What is 2+2?" | [messages...], "chosen": "4", "rejected": "5"}

`chosen`/`rejected` may also be TRL's conversational form, a one-message list
`[{"role": "assistant", "content": ...}]`. Files are validated like chat files (same
reader, same `path:line` issues and skip policy); each side is tokenized through the
chat template as prompt + reply, with labels only on the final reply, so the DPO log-
probabilities sum over completion tokens alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from reactor_core.data.formats import (
    BAD_FORMAT,
    EMPTY_ASSISTANT,
    NON_STRING_CONTENT,
    ROLES,
    UNKNOWN_ROLE,
    ChatExample,
    DataFormatError,
    Message,
)
from reactor_core.data.tokenize import IGNORE_INDEX, ChatTemplateError, TokenizedExample, tokenize_chat
from reactor_core.data.validation import (
    DataIssue,
    DataReport,
    DataValidationError,
    OnBadExample,
    read_jsonl,
)

SAME_REPLIES = "same_replies"


@dataclass(frozen=True)
class PreferenceExample:
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    source: str

    def conversation(self, side: Literal["chosen", "rejected"]) -> ChatExample:
        reply = self.chosen if side == "chosen" else self.rejected
        return ChatExample(self.prompt + (Message("assistant", reply),), self.source)


@dataclass(frozen=True)
class TokenizedPair:
    chosen: TokenizedExample
    rejected: TokenizedExample
    source: str
    reference: tuple[float, float] | None = None  # precomputed reference log-probs (chosen, rejected)


def prompt_messages(value: Any) -> tuple[Message, ...]:
    if isinstance(value, str):
        if not value.strip():
            raise DataFormatError("`prompt` is empty")
        return (Message("user", value),)
    if not isinstance(value, list) or not value:
        raise DataFormatError("`prompt` must be a string or a non-empty list of messages")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise DataFormatError(f"prompt[{i}] must be an object with role and content")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise DataFormatError(f"prompt[{i}].role: unknown role {role!r}", UNKNOWN_ROLE)
        if not isinstance(content, str):
            raise DataFormatError(f"prompt[{i}].content must be a string", NON_STRING_CONTENT)
        messages.append(Message(role, content))
    if messages[-1].role != "user":
        raise DataFormatError("`prompt` must end with a user message: the replies answer it")
    return tuple(messages)


def _reply(record: Mapping[str, Any], field: str) -> str:
    value = record.get(field)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], Mapping):
        if value[0].get("role") != "assistant":
            raise DataFormatError(f"`{field}`[0].role must be assistant", UNKNOWN_ROLE)
        value = value[0].get("content")
    if not isinstance(value, str):
        raise DataFormatError(f"`{field}` must be a string (or one assistant message)", NON_STRING_CONTENT)
    if not value.strip():
        raise DataFormatError(f"`{field}` is empty", EMPTY_ASSISTANT)
    return value


def parse_preference(obj: Any) -> tuple[tuple[Message, ...], str, str]:
    """One JSON value -> (prompt messages, chosen, rejected), or `DataFormatError`."""
    if not isinstance(obj, Mapping):
        raise DataFormatError("a preference record is an object with prompt, chosen and rejected", BAD_FORMAT)
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise DataFormatError(f"missing field(s): {', '.join(missing)}", BAD_FORMAT)
    prompt, chosen, rejected = prompt_messages(obj["prompt"]), _reply(obj, "chosen"), _reply(obj, "rejected")
    if chosen.strip() == rejected.strip():
        raise DataFormatError("`chosen` and `rejected` are the same reply: nothing to prefer", SAME_REPLIES)
    return prompt, chosen, rejected


def load_preference_file(
    path: str | os.PathLike[str], *, on_bad_example: OnBadExample = "error"
) -> tuple[list[PreferenceExample], DataReport]:
    records, report = read_jsonl(path, parse_preference, on_bad_example)
    return [PreferenceExample(prompt, chosen, rejected, source) for (prompt, chosen, rejected), source in records], report


def _completion_only(tokenized: TokenizedExample, prompt_tokens: int) -> TokenizedExample:
    labels = [IGNORE_INDEX] * prompt_tokens + tokenized.labels[prompt_tokens:]
    return TokenizedExample(tokenized.input_ids, labels, tokenized.source)


def tokenize_preference(example: PreferenceExample, tokenizer: Any) -> TokenizedPair:
    """Both sides through the chat template; labels on the final reply only."""
    prompt_text = tokenizer.apply_chat_template(
        [m.__dict__ for m in example.prompt], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    prompt_tokens = len(prompt_ids)
    sides = []
    for side in ("chosen", "rejected"):
        tokenized = tokenize_chat(example.conversation(side), tokenizer)
        if tokenized.input_ids[:prompt_tokens] != prompt_ids:
            raise ChatTemplateError(f"{example.source}: the prompt does not tokenize as a prefix of the {side} side")
        sides.append(_completion_only(tokenized, prompt_tokens))
    return TokenizedPair(sides[0], sides[1], example.source)


def tokenize_preferences(
    examples: Sequence[PreferenceExample], tokenizer: Any, *, max_seq_length: int,
    on_bad_example: OnBadExample = "error",
) -> tuple[list[TokenizedPair], list[DataIssue]]:
    pairs, issues = [], []
    for example in examples:
        path, _, line = example.source.rpartition(":")
        try:
            pair = tokenize_preference(example, tokenizer)
        except ChatTemplateError as err:
            issues.append(DataIssue(path, int(line), f"chat template: {err}", "template_mismatch"))
            continue
        longest = max(len(pair.chosen), len(pair.rejected))
        if longest > max_seq_length:
            issues.append(DataIssue(path, int(line), f"pair is {longest} tokens, longer than max_seq_length {max_seq_length}", "too_long"))
            continue
        pairs.append(pair)
    if issues and on_bad_example == "error":
        raise DataValidationError(issues)
    return pairs, issues
