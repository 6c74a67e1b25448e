"""Prompt data for GRPO: one prompt per line, and whatever its reward functions check.

    {"prompt": [{"role": "user", "content": "What is 6 x 7?"}], "answer": "42"}
    {"prompt": "What is 6 x 7?", "answer": "42"}

`prompt` is chat messages ending with a user turn (or a plain string: one user turn).
Every other key is a *column*: the reward functions receive it as a keyword argument,
one value per completion (TRL's convention), so `answer` reaches `exact_answer`. Files
are read and validated like chat and preference files (the same reader, `path:line`
issues, the skip policy); a prompt is tokenized through the chat template with the
generation prompt appended, so the completion the policy samples is the assistant reply.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reactor_core.data.formats import BAD_FORMAT, DataFormatError, Message
from reactor_core.data.preference import prompt_messages
from reactor_core.data.validation import DataIssue, DataReport, DataValidationError, OnBadExample, read_jsonl


@dataclass(frozen=True)
class PromptExample:
    """A prompt, the columns its rewards read (as given: `raw_prompt` is the line's
    `prompt`, string or messages), and where it came from (`path:line`)."""

    prompt: tuple[Message, ...]
    columns: tuple[tuple[str, str], ...]  # (key, JSON of the value), sorted: hashable, so duplicates are found
    source: str

    def column_values(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self.columns}

    @property
    def raw_prompt(self) -> Any:
        return self.column_values().get("prompt")


@dataclass(frozen=True)
class TokenizedPrompt:
    input_ids: list[int]  # the prompt through the chat template, generation prompt included
    example: PromptExample

    def __len__(self) -> int:
        return len(self.input_ids)


def parse_prompt(obj: Any) -> tuple[tuple[Message, ...], tuple[tuple[str, str], ...]]:
    """One JSON value -> (prompt messages, columns), or `DataFormatError`."""
    if not isinstance(obj, Mapping):
        raise DataFormatError("a prompt record is an object with `prompt` (and the keys its rewards read)", BAD_FORMAT)
    if "prompt" not in obj:
        raise DataFormatError("missing field: prompt", BAD_FORMAT)
    bad = [k for k in obj if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise DataFormatError(f"key {bad[0]!r} cannot be passed to a reward function (not an identifier)", BAD_FORMAT)
    reserved = [k for k in obj if k in ("prompts", "completions")]
    if reserved:
        raise DataFormatError(f"key `{reserved[0]}` is reserved: reward functions receive it themselves", BAD_FORMAT)
    prompt = prompt_messages(obj["prompt"])
    # `prompt` stays among the columns only to give rewards the prompt as written
    return prompt, tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in obj.items()))


def load_prompt_file(
    path: str | os.PathLike[str], *, on_bad_example: OnBadExample = "error"
) -> tuple[list[PromptExample], DataReport]:
    records, report = read_jsonl(path, parse_prompt, on_bad_example)
    return [PromptExample(prompt, columns, source) for (prompt, columns), source in records], report


def tokenize_prompts(
    examples: Sequence[PromptExample], tokenizer: Any, *, max_prompt_length: int, on_bad_example: OnBadExample = "error",
) -> tuple[list[TokenizedPrompt], list[DataIssue]]:
    """Each prompt through the chat template; a prompt over `max_prompt_length` tokens
    (max_seq_length - max_completion_length) is an issue at its line."""
    prompts, issues = [], []
    for example in examples:
        path, _, line = example.source.rpartition(":")
        text = tokenizer.apply_chat_template([m.__dict__ for m in example.prompt], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            issues.append(DataIssue(path, int(line), f"prompt is {len(ids)} tokens, more than max_seq_length - "
                                    f"max_completion_length = {max_prompt_length}", "too_long"))
            continue
        prompts.append(TokenizedPrompt(ids, example))
    if issues and on_bad_example == "error":
        raise DataValidationError(issues)
    return prompts, issues
