"""`reactor data pack`: chat records -> tokenized, pre-packed rows on disk.

Packing at training time (`packing.py`) happens in every run; a large corpus packed once
is read straight into batches. Memory stays bounded: records stream in, and `window`
tokenized examples at a time are packed first-fit decreasing (`pack_examples`, the
data kernels' `ffd_pack`), which costs almost nothing in fill against packing all of
them at once when windows hold thousands of examples.

Each output line is one row, its examples one after the other, unpadded:

    {"input_ids": [...], "labels": [...], "position_ids": [0, 1, ..., 0, 1, ...],
     "sources": ["data.jsonl:12", ...]}

`position_ids` restart at 0 for each example: the packed-row contract of `packing.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from reactor_core.data.formats import ChatExample, parse_record
from reactor_core.data.images import ImageLimits, ImageReader
from reactor_core.data.packing import pack_examples
from reactor_core.data.pipeline import batched
from reactor_core.data.sources import iter_lines, open_output
from reactor_core.data.tokenize import ChatTemplateError, TokenizedExample, tokenize_chat
from reactor_core.data.validation import LineError, parse_line


def prepack(inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], tokenizer: Any, *,
            max_seq_length: int, window: int = 65536) -> dict[str, Any]:
    """Write packed rows of `inputs` to `output`; returns {examples, rows, skipped, fill}.

    `tokenizer` is a Hugging Face tokenizer with a chat template, or a model folder's path.
    Records that are bad, too long or hold images are skipped and counted (clean the data
    first: `reactor data clean` reports each one).
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    stats = {"examples": 0, "rows": 0, "skipped": 0, "tokens": 0}
    with open_output(output) as out:
        for batch in batched(_tokenized(inputs, tokenizer, max_seq_length, stats), window):
            for row in pack_examples(batch, max_seq_length):
                out.write(json.dumps(_row(row)).encode("utf-8") + b"\n")
                stats["rows"] += 1
    stats["fill"] = stats["tokens"] / (stats["rows"] * max_seq_length) if stats["rows"] else 0.0
    return stats


def token_histogram(inputs: Sequence[str | os.PathLike[str]], tokenizer: Any) -> dict[str, int]:
    """Records per tokens-per-record bucket (`pipeline.LENGTH_BUCKETS`), through the chat
    template as training tokenizes them; streaming. `tokenizer`: as for `prepack`."""
    from reactor_core.data.pipeline import LENGTH_BUCKETS

    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    labels = [f"<={b}" for b in LENGTH_BUCKETS] + [f">{LENGTH_BUCKETS[-1]}"]
    counts = dict.fromkeys(labels, 0)
    stats: dict[str, Any] = {"examples": 0, "skipped": 0, "tokens": 0}
    for example in _tokenized(inputs, tokenizer, 1 << 62, stats):
        counts[labels[sum(len(example) > b for b in LENGTH_BUCKETS)]] += 1
    return counts


def _tokenized(inputs: Sequence[str | os.PathLike[str]], tokenizer: Any, max_seq_length: int,
               stats: dict[str, Any]) -> Iterator[TokenizedExample]:
    for line in iter_lines(inputs):
        parse = partial(parse_record, images=ImageReader(Path(line.path).parent.absolute(), ImageLimits()))
        try:
            messages = parse_line(line.raw, parse, first=line.line == 1) if isinstance(line.raw, bytes) \
                else parse(line.raw)
        except (LineError, ValueError):
            stats["skipped"] += 1
            continue
        if messages is None:
            continue
        example = ChatExample(messages, line.source)
        try:
            tokenized = tokenize_chat(example, tokenizer)
        except (ChatTemplateError, ValueError):  # images, or a template that cannot be labelled
            stats["skipped"] += 1
            continue
        if len(tokenized) > max_seq_length:
            stats["skipped"] += 1
            continue
        stats["examples"] += 1
        stats["tokens"] += len(tokenized)
        yield tokenized


def _row(examples: list[TokenizedExample]) -> dict[str, Any]:
    return {
        "input_ids": [t for e in examples for t in e.input_ids],
        "labels": [t for e in examples for t in e.labels],
        "position_ids": [p for e in examples for p in range(len(e))],
        "sources": [e.source for e in examples],
    }
