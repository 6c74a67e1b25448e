"""Read a JSONL data file completely, and say everything wrong with it before training.

A run must not die at step 3,000 on line 91,207. `load_chat_file` therefore reads the
whole file up front, converts every line with `parse_record`, and collects each problem
as a `DataIssue` that prints as `path:line: reason`. What happens next is the caller's
choice, `on_bad_example`:

- "error" (the default): raise one `DataValidationError` listing every problem, so a
  person fixes the file once rather than once per run;
- "skip": drop the bad lines and carry on; the `DataReport` says how many and why.

Blank lines are skipped silently. Exact duplicates (the same messages after conversion,
whatever the source format) are dropped and counted: they would otherwise be seen more
often per epoch and, worse, land on both sides of a train/validation split.

Line numbers are 1-based, as editors show them. An issue about the file as a whole
(nothing usable in it) has line 0.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Hashable, Literal

from reactor_core.data.formats import ChatExample, DataFormatError, parse_chat
from reactor_core.data.images import ImageLimits, ImageReader

OnBadExample = Literal["error", "skip"]
ON_BAD_EXAMPLE: tuple[str, ...] = ("error", "skip")

# Issue kinds raised here (the converters' kinds live in formats.py).
BAD_ENCODING = "bad_encoding"
BAD_JSON = "bad_json"
NO_EXAMPLES = "no_examples"

# How many issues `DataValidationError` prints; all of them stay in `.issues`.
MAX_LISTED_ISSUES = 20


@dataclass(frozen=True)
class DataIssue:
    """One problem at one place: prints as `path:line: reason`.

    `kind` is a short stable name (`bad_json`, `unknown_role`, `too_long`, ...) that
    reports count by; the reason is the sentence a person reads.
    """

    path: str
    line: int
    reason: str
    kind: str = "invalid"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class DataReport:
    """What reading one data file found.

    lines: lines in the file, blank ones included (so every issue's line is <= lines).
    examples: examples kept. images: images in the kept examples. skipped: bad lines
    dropped (only with "skip"). duplicates: exact duplicates dropped. counts: issue
    kind -> number of issues.
    """

    path: str
    lines: int = 0
    examples: int = 0
    images: int = 0
    skipped: int = 0
    duplicates: int = 0
    issues: list[DataIssue] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, issue: DataIssue) -> None:
        self.issues.append(issue)
        self.counts[issue.kind] = self.counts.get(issue.kind, 0) + 1

    def summary(self) -> str:
        """One line for the training log, e.g.
        `train.jsonl: 980 examples from 1000 lines; 12 duplicates dropped; 8 bad lines
        skipped (bad_json: 3, too_long: 5)`."""
        text = f"{self.path}: {self.examples} examples"
        if self.images:
            text += f" with {self.images} images"
        text += f" from {self.lines} lines"
        if self.duplicates:
            text += f"; {self.duplicates} duplicates dropped"
        if self.skipped:
            text += f"; {self.skipped} bad lines skipped ({_format_counts(self.counts)})"
        elif self.issues:
            text += f"; {len(self.issues)} problems ({_format_counts(self.counts)})"
        return text


class DataValidationError(ValueError):
    """Every problem found in the data, raised once, before training starts.

    The message lists the first `MAX_LISTED_ISSUES` issues as `path:line: reason`
    and says how many more there are; `.issues` holds all of them.
    """

    def __init__(self, issues: Sequence[DataIssue], report: DataReport | None = None) -> None:
        self.issues = list(issues)
        if report is None:
            report = DataReport(path=_common_path(self.issues))
            for issue in self.issues:
                report.add(issue)
        self.report = report
        super().__init__(self._message())

    def _message(self) -> str:
        counts = Counter(issue.kind for issue in self.issues)
        head = f"{len(self.issues)} problems in {self.report.path} ({_format_counts(counts)})"
        if NO_EXAMPLES not in counts:
            head += '; fix them, or pass on_bad_example="skip" to drop them'
        lines = [head + ":"]
        lines += [f"  {issue}" for issue in self.issues[:MAX_LISTED_ISSUES]]
        if len(self.issues) > MAX_LISTED_ISSUES:
            lines.append(f"  ... and {len(self.issues) - MAX_LISTED_ISSUES} more")
        return "\n".join(lines)


def load_chat_file(
    path: str | os.PathLike[str],
    *,
    on_bad_example: OnBadExample = "error",
    image_limits: ImageLimits = ImageLimits(),
) -> tuple[list[ChatExample], DataReport]:
    """Read a chat JSONL file (any accepted format) into checked, de-duplicated examples.

    Image parts are read relative to the file's folder and checked against
    `image_limits` (`images.py`); every image is decoded once here, so a bad one is an
    issue at its line like any other. Raises `DataValidationError` when any line is
    bad and `on_bad_example` is "error", and in either mode when no usable example is
    left.
    """
    reader = ImageReader(Path(path).parent.absolute(), image_limits)
    records, report = read_jsonl(path, partial(parse_chat, images=reader), on_bad_example)
    examples = [ChatExample(messages, source, tools) for (messages, tools), source in records]
    report.images = sum(len(example.images) for example in examples)
    return examples, report


def read_jsonl(
    path: str | os.PathLike[str], parse: Callable[[Any], Hashable], on_bad_example: OnBadExample
) -> tuple[list[tuple[Any, str]], DataReport]:
    """(parsed record, "path:line") for every good line of a JSONL file, de-duplicated.

    `parse` turns one JSON value into a hashable record or raises `DataFormatError`;
    chat and preference files share everything else: encoding and JSON errors, blank
    lines, duplicates, counts, and the error/skip policy.
    """
    if on_bad_example not in ON_BAD_EXAMPLE:
        raise ValueError(
            f"`on_bad_example` must be one of {ON_BAD_EXAMPLE}, got {on_bad_example!r}"
        )
    name = os.fspath(path)
    report = DataReport(path=name)
    records: list[tuple[Any, str]] = []
    seen: set[Hashable] = set()

    # Binary mode and a per-line decode: one badly encoded line becomes one issue
    # instead of a UnicodeDecodeError that hides every other problem in the file.
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            report.lines = number
            try:
                record = parse_line(raw, parse, first=number == 1)
            except LineError as err:
                report.add(DataIssue(name, number, err.reason, err.kind))
                continue
            if record is None:  # blank line
                continue
            if record in seen:
                report.duplicates += 1
                continue
            seen.add(record)
            records.append((record, f"{name}:{number}"))

    report.examples = len(records)
    if report.issues and on_bad_example == "error":
        raise DataValidationError(report.issues, report)
    report.skipped = len(report.issues)
    if not records:
        report.add(DataIssue(name, 0, "no usable examples in the file", NO_EXAMPLES))
        raise DataValidationError(report.issues, report)
    return records, report


def split_examples(
    examples: Sequence[ChatExample], *, val_fraction: float, seed: int
) -> tuple[list[ChatExample], list[ChatExample]]:
    """Hold out `round(len * val_fraction)` examples (at least one when the fraction is
    positive) for validation, chosen by a seeded shuffle.

    The same examples, fraction and seed give the same split on any machine, so a
    resumed run validates on the data it validated on before. Both halves keep the
    input order; the trainer shuffles for itself.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction}")
    n = len(examples)
    n_val = round(n * val_fraction)
    if val_fraction > 0:
        if n < 2:
            raise ValueError(f"cannot hold out a validation split from {n} example(s)")
        n_val = min(max(n_val, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_val])
    train = [ex for i, ex in enumerate(examples) if i not in held_out]
    val = [ex for i, ex in enumerate(examples) if i in held_out]
    return train, val


# --------------------------------------------------------------------------------------
# One line
# --------------------------------------------------------------------------------------


class LineError(Exception):
    """What is wrong with one line (`parse_line`): its reason and issue kind."""

    def __init__(self, reason: str, kind: str) -> None:
        self.reason = reason
        self.kind = kind


def parse_line(raw: bytes, parse: Callable[[Any], Hashable], *, first: bool) -> Hashable | None:
    """Bytes of one line -> its parsed record, None for a blank line, or `LineError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LineError(f"not valid UTF-8 at byte {err.start}", BAD_ENCODING) from None
    if first:
        text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise LineError(f"bad JSON: {err.msg} at column {err.colno}", BAD_JSON) from None
    except RecursionError:
        raise LineError("bad JSON: nested too deeply", BAD_JSON) from None
    except ValueError as err:  # e.g. an integer over sys.get_int_max_str_digits() digits
        raise LineError(f"bad JSON: {err}", BAD_JSON) from None
    try:
        return parse(obj)
    except DataFormatError as err:
        raise LineError(err.reason, err.kind) from None
    except RecursionError:
        raise LineError("record nested too deeply", BAD_JSON) from None


def _format_counts(counts: dict[str, int] | Counter[str]) -> str:
    return ", ".join(f"{kind}: {count}" for kind, count in sorted(counts.items()))


def _common_path(issues: Sequence[DataIssue]) -> str:
    paths = sorted({issue.path for issue in issues})
    return paths[0] if len(paths) == 1 else f"{len(paths)} files"
