"""Anchor text: plain text a KL-regularized tune must keep predicting as its base does.

`kl_to_base` with `kl_anchor_path` measures KL(base || tune) on this text rather than
on the chat batches. A chat fine-tune moves the model's predictions everywhere, not
only on the replies it is taught; holding it to the base on ordinary prose is what
keeps its general-text perplexity where the base had it. The text may be anything
written in the register to protect; the base's own writing works (it is what the base
predicts well).

The file is JSONL, one `{"text": "..."}` per line, checked like the chat files (each
problem as `path:line: reason`, duplicates dropped). The texts are tokenized without
a chat template, joined with the end-of-sequence token, cut into rows of
`ANCHOR_ROW_TOKENS`, and handed out a few rows per micro-batch in a seeded order that
depends only on the micro-step, so a resumed run sees the rows an uninterrupted one
would have seen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from reactor_core.data.formats import DataFormatError
from reactor_core.data.validation import DataReport, DataValidationError, DataIssue, OnBadExample, read_jsonl

ANCHOR_ROW_TOKENS = 128


def parse_text_record(obj: Any) -> str:
    if not isinstance(obj, Mapping) or set(obj) != {"text"}:
        raise DataFormatError('expected an object with exactly one key, "text"')
    text = obj["text"]
    if not isinstance(text, str):
        raise DataFormatError(f'"text" must be a string, got {type(text).__name__}')
    if not text.strip():
        raise DataFormatError('"text" is empty', kind="empty_text")
    return text


def load_text_file(path: str | os.PathLike[str], *, on_bad_example: OnBadExample = "error") -> tuple[list[str], DataReport]:
    records, report = read_jsonl(path, parse_text_record, on_bad_example)
    return [text for text, _ in records], report


class AnchorRows:
    """Anchor text as (rows, ANCHOR_ROW_TOKENS) token ids, dealt out per micro-step."""

    def __init__(self, texts: list[str], tokenizer: Any, path: str, seed: int) -> None:
        separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids: list[int] = []
        for text in texts:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        count = len(ids) // ANCHOR_ROW_TOKENS
        if count == 0:
            issue = DataIssue(path, 0, f"anchor text is {len(ids)} tokens, less than one row of {ANCHOR_ROW_TOKENS}",
                              "too_short")
            raise DataValidationError([issue], DataReport(path=path))
        self.rows = torch.tensor(ids[: count * ANCHOR_ROW_TOKENS]).view(count, ANCHOR_ROW_TOKENS)
        self.order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()

    def batch(self, micro_step: int, tokens: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """About `tokens` tokens of rows for this micro-step (and rank), cycling through the text."""
        per_batch = max(1, math.ceil(tokens / ANCHOR_ROW_TOKENS))
        start = (micro_step * world_size + rank) * per_batch
        picks = [self.order[(start + i) % len(self.order)] for i in range(per_batch)]
        return self.rows[picks]
