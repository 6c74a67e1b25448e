"""Decontamination: drop training records that share text with an evaluation set.

A model trained on its test questions scores well and knows nothing more. The check is
the one GPT-3 and most since use, on words: a record is contaminated when one of its
messages shares a run of `ngram` words (8 by default) with an evaluation text. An
evaluation text shorter than that (a short prompt such as "Who are you?") is one run
of all its words, and matches a message that says exactly it (after lower-casing;
punctuation and spacing never count).

Evaluation files are read whatever their shape, by collecting their strings: JSONL
(every string of every line), JSON (every string in the document: a suite's prompts,
a held-out set's questions) and plain text (every paragraph). Strings under
`min_words` words (ids, categories) are left out. Reactor Core knows no evaluation set
of its own; callers name the files (jarvis_prime's recipes pass their `eval_data`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from reactor_core.data.dedup import pack_texts
from reactor_core.data.pipeline_config import DecontamConfig
from reactor_core.data.sources import open_binary

CONTAMINATED = "contaminated"


class Decontaminator:
    """The n-gram table of some evaluation files, and the check of a batch against it
    (`decontaminator_for` caches one per process)."""

    def __init__(self, config: DecontamConfig, kernels: ModuleType) -> None:
        self.config = config
        self.files = [os.fspath(p) for p in config.paths]
        grams: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        for i, path in enumerate(self.files):
            texts = [t for t in eval_strings(Path(path)) if len(t.split()) >= config.min_words]
            g = self.grams(texts, kernels)[0]
            grams.append(g)
            owners.append(np.full(len(g), i, dtype=np.int32))
        table = np.concatenate(grams) if grams else np.zeros(0, dtype=np.uint64)
        owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int32)
        order = np.argsort(table, kind="stable")
        self.table, self.owner = np.ascontiguousarray(table[order]), owner[order]

    def grams(self, texts: Sequence[str], kernels: ModuleType) -> tuple[np.ndarray, np.ndarray]:
        data, offsets = pack_texts(texts)
        tokens, token_offsets = kernels.token_hashes(data, offsets, "word")
        return kernels.ngram_hashes(tokens, token_offsets, self.config.ngram)

    def check(self, messages: Sequence[Sequence[str]], kernels: ModuleType) -> list[str | None]:
        """Per record (its messages' texts): None when clean, else the reason naming the
        evaluation file it shares text with."""
        out: list[str | None] = [None] * len(messages)
        if len(self.table) == 0:
            return out
        flat = [text for texts in messages for text in texts]
        record_of = np.repeat(np.arange(len(messages)), [len(texts) for texts in messages])
        grams, offsets = self.grams(flat, kernels)
        hits = kernels.first_hit(grams, offsets, self.table)
        for m in np.flatnonzero(hits >= 0):
            r = int(record_of[m])
            if out[r] is None:
                gram = grams[offsets[m] + hits[m]]
                owner = self.owner[np.searchsorted(self.table, gram)]
                out[r] = (f"message shares text with {self.files[owner]} (a {self.config.ngram}-word run, "
                          "or all of a shorter evaluation text)")
        return out


def decontaminator_for(config: DecontamConfig, kernels: ModuleType) -> Decontaminator | None:
    """The Decontaminator of `config` (None without paths), built once per process: a
    worker running many batches reads the evaluation files once."""
    if not config.paths:
        return None
    return _built(tuple(config.paths), config.ngram, config.min_words, kernels)


@lru_cache(maxsize=4)
def _built(paths: tuple[str, ...], ngram: int, min_words: int, kernels: ModuleType) -> Decontaminator:
    return Decontaminator(DecontamConfig(paths=list(paths), ngram=ngram, min_words=min_words), kernels)


def eval_strings(path: Path) -> Iterator[str]:
    """Every string an evaluation file holds (see the module docstring)."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        with open_binary(path) as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield from _strings(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{number}: bad JSON in an evaluation file: {err.msg}") from None
    elif name.endswith(".json"):
        try:
            yield from _strings(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: bad JSON in an evaluation file: {err.msg}") from None
    else:
        for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
            if paragraph.strip():
                yield paragraph


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
