"""The data pipeline's settings, typed and checked when loaded (a leaf: no numpy, no torch).

One `PipelineConfig` drives `reactor data clean` and a recipe's `data_pipeline:` block;
its `to_dict()` goes into the model's lineage beside the input files' sha256, so a
model says exactly how its data was cleaned.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DedupConfig(_Strict):
    """Exact and near-duplicate removal. Near duplicates: MinHash over shingles (runs of
    `ngram` words, or of `ngram` bytes with `shingle: byte`), LSH banding, and a check
    that the signatures agree on at least `threshold` of `num_perm` positions (the
    Jaccard estimate)."""

    exact: bool = Field(default=True, description="Drop records whose messages repeat an earlier record's exactly.")
    near: bool = Field(default=True, description="Drop records whose shingle Jaccard to a kept record is >= threshold.")
    threshold: float = Field(default=0.8, gt=0.0, le=1.0, description="Jaccard similarity that makes a near duplicate.")
    num_perm: int = Field(default=128, ge=8, le=1024, description="MinHash permutations (signature length).")
    shingle: Literal["word", "byte"] = Field(default="word", description="Shingles of words, or of UTF-8 bytes.")
    ngram: int = Field(default=3, ge=1, le=64, description="Words (or bytes) per shingle.")
    seed: int = Field(default=1, ge=0, description="Seed of the permutations (datasketch's default is 1).")
    bands: int | None = Field(default=None, gt=0, description="LSH bands; default: chosen from the threshold.")
    rows: int | None = Field(default=None, gt=0, description="Rows per band; default: chosen from the threshold.")
    near_mode: Literal["stream", "cluster"] = Field(default="stream", description=(
        "stream: a record goes when it repeats a KEPT record (bounded memory: kept signatures only); "
        "cluster: connected components of every verified pair, first record of each kept (holds every "
        "signature and the pair list; groups chains A~B~C)."))

    @model_validator(mode="after")
    def _bands_rows(self) -> DedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both `bands` and `rows`, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:  # type: ignore[operator]
            raise ValueError(f"`bands` * `rows` must be <= `num_perm` ({self.num_perm}), got {self.bands} * {self.rows}")
        return self

    @property
    def min_agree(self) -> int:
        """Signature positions that must agree: ceil(threshold * num_perm), in integers
        so both backends decide alike."""
        return math.ceil(self.threshold * self.num_perm - 1e-9)


class DecontamConfig(_Strict):
    """Records sharing an `ngram`-word run with an evaluation set are dropped. An
    evaluation text shorter than `ngram` words (a short prompt) counts as one run, and
    matches a message that says exactly it; texts under `min_words` words are ignored."""

    paths: list[str] = Field(default_factory=list, description="Evaluation files: JSONL, JSON or text.")
    ngram: int = Field(default=8, ge=1, le=64, description="Words per shared run that mark a record contaminated.")
    min_words: int = Field(default=3, ge=1, description="Evaluation strings with fewer words are ignored.")


class FilterConfig(_Strict):
    """Records that would teach the wrong thing: too long, replies too short, replies
    that repeat themselves (a model looping)."""

    min_reply_chars: int = Field(default=1, ge=0, description="Fewest characters across the assistant replies.")
    max_chars: int = Field(default=200_000, gt=0, description="Most characters in a record's messages.")
    max_repetition: float = Field(default=0.5, gt=0.0, le=1.0, description=(
        "Share of a reply's word 3-grams that repeat an earlier one above which the record goes "
        "(replies of 20+ words; 1.0 turns the filter off)."))


class PipelineConfig(_Strict):
    """`reactor data clean`'s settings, and a recipe's `data_pipeline:` block."""

    kind: Literal["chat", "preference"] = Field(default="chat", description="Chat records, or DPO preference pairs.")
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontaminate: DecontamConfig = Field(default_factory=DecontamConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    scrub_pii: bool = Field(default=True, description="Replace e-mail addresses, phone numbers, IPs and card numbers.")
    backend: Literal["auto", "native", "python"] = Field(default="auto", description=(
        "Kernels: MLForge (native) or numpy (python); auto picks MLForge when installed. Same results."))
    batch_size: int = Field(default=2048, gt=0, description="Records per batch (the unit a worker process handles).")
    workers: int = Field(default=1, ge=1, description="Processes that validate, filter and hash batches.")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
