"""The data pipeline: `reactor data inspect` and `reactor data clean`, in Python.

    summary = clean(["feedback.jsonl.gz", "shards/"], "clean.jsonl", PipelineConfig())

Records stream through in input order and in batches; nothing holds the corpus:

    sources.iter_lines --batch--> clean_batch (pure; in `workers` processes) --> Deduplicator
        (one record at a time)     validate (formats.py, as training does)        exact keys,
                                   scrub PII, filters, decontaminate,              LSH index
                                   MinHash signatures                              (input order)
                                                      --> kept lines to OUTPUT, removed records to REPORT

`clean_batch` is a pure function of its lines and the config: the same lines give the
same result in any process, on any machine. That is the seam for a cluster: an engine
that maps batches (HF `datasets.map(batched=True)`, Ray Data, Spark) runs
`clean_batch`, and one pass of `Deduplicator` over the results in order decides the
duplicates (docs/architecture.md, "The data pipeline", has the `datasets.map` example).

The report is JSONL, one removed record per line: `{"source": "path:line", "kind":
..., "reason": ..., "duplicate_of": "path:line" | null}`, so each removed record can be
traced to its line and, for a duplicate, to the kept record it repeats. The summary
(`Summary.to_dict`, written next to it) counts everything and hashes every input.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from reactor_core.data.decontam import CONTAMINATED, decontaminator_for
from reactor_core.data.dedup import Deduplicator, exact_key, signatures
from reactor_core.data.filters import check_record, scrub
from reactor_core.data.formats import DataFormatError, Message, parse_record
from reactor_core.data.images import ImageLimits, ImageReader
from reactor_core.data.native import backend, backend_name
from reactor_core.data.pipeline_config import PipelineConfig
from reactor_core.data.preference import parse_preference
from reactor_core.data.sources import SourceLine, data_files, iter_lines, open_output
from reactor_core.data.validation import LineError, parse_line
from reactor_core.files import sha256_file

T = TypeVar("T")
R = TypeVar("R")

# Words per record, histogram bucket upper bounds (inspect's "token-length" histogram;
# words, so that it needs no tokenizer).
LENGTH_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Problems `Summary` keeps for printing (all of them are in the report).
MAX_EXAMPLES = 20


@dataclass(frozen=True)
class Removed:
    """A record the pipeline dropped, at its `path:line`, with the reason."""

    source: str
    kind: str
    reason: str
    duplicate_of: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "reason": self.reason, "duplicate_of": self.duplicate_of}

    def __str__(self) -> str:
        return f"{self.source}: {self.kind}: {self.reason}"


@dataclass
class BatchResult:
    """What `clean_batch` found in one batch: the candidates that passed everything but
    deduplication (their source, output line, exact key, signature), and the removed."""

    sources: list[str] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    signatures: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.uint32))
    removed: list[Removed] = field(default_factory=list)
    read: int = 0  # records (non-blank lines) read
    roles: Counter[str] = field(default_factory=Counter)
    lengths: Counter[int] = field(default_factory=Counter)  # LENGTH_BUCKETS index -> records
    pii: Counter[str] = field(default_factory=Counter)


@dataclass
class Summary:
    """Everything a run counted; `to_dict()` is the summary file and the lineage entry."""

    config: dict[str, Any]
    backend: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    output: str | None = None
    report: str | None = None
    read: int = 0
    kept: int = 0
    removed: Counter[str] = field(default_factory=Counter)
    roles: Counter[str] = field(default_factory=Counter)
    lengths: Counter[int] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)
    examples: list[Removed] = field(default_factory=list)
    clusters: dict[str, Any] | None = None  # inspect's near-duplicate clusters (`Clusters.to_dict`)
    seconds: float = 0.0

    def add(self, removed: Removed) -> None:
        self.removed[removed.kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(removed)

    def histogram(self) -> dict[str, int]:
        """Records per words-per-record bucket: {"<=16": n, ..., ">4096": n}."""
        labels = [f"<={b}" for b in LENGTH_BUCKETS] + [f">{LENGTH_BUCKETS[-1]}"]
        return {labels[i]: self.lengths.get(i, 0) for i in range(len(labels))}

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs, "output": self.output, "report": self.report, "backend": self.backend,
            "read": self.read, "kept": self.kept, "removed": dict(sorted(self.removed.items())),
            "roles": dict(sorted(self.roles.items())), "words_histogram": self.histogram(),
            "pii_scrubbed": dict(sorted(self.pii.items())), "seconds": round(self.seconds, 3),
            "config": self.config,
        } | ({"near_duplicate_clusters": self.clusters} if self.clusters is not None else {})


# --------------------------------------------------------------------------------------
# One batch: a pure function
# --------------------------------------------------------------------------------------


def clean_batch(lines: Sequence[SourceLine], config: PipelineConfig) -> BatchResult:
    """Validate, scrub, filter, decontaminate and sign one batch (module docstring)."""
    kernels = backend(config.backend)
    decontaminator = decontaminator_for(config.decontaminate, kernels)
    result = BatchResult()
    parsers: dict[str, Callable[[Any], Any]] = {}  # per file: image parts are relative to its folder
    texts: list[list[tuple[str, str]]] = []
    for line in lines:
        parse = parsers.get(line.path)
        if parse is None:
            images = ImageReader(Path(line.path).parent.absolute(), ImageLimits())
            parse = parsers[line.path] = partial(_parse, kind=config.kind, scrub_pii=config.scrub_pii, images=images,
                                                 pii=result.pii)
        try:
            if isinstance(line.raw, bytes):
                parsed = parse_line(line.raw, parse, first=line.line == 1)
            else:
                parsed = _parse_row(line.raw, parse)
        except LineError as err:
            result.read += 1
            result.removed.append(Removed(line.source, err.kind, err.reason))
            continue
        if parsed is None:  # a blank line
            continue
        result.read += 1
        obj, messages = parsed
        result.roles.update(role for role, _ in messages)
        words = sum(len(text.split()) for _, text in messages)
        result.lengths[sum(words > b for b in LENGTH_BUCKETS)] += 1
        failed = check_record(messages, config.filters)
        if failed is not None:
            result.removed.append(Removed(line.source, *failed))
            continue
        result.sources.append(line.source)
        result.lines.append(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
        texts.append(messages)

    if decontaminator is not None and texts:
        reasons = decontaminator.check([[text for _, text in m] for m in texts], kernels)
        keep = [i for i, reason in enumerate(reasons) if reason is None]
        result.removed += [Removed(result.sources[i], CONTAMINATED, reasons[i]) for i in range(len(texts))
                           if reasons[i] is not None]
        result.sources = [result.sources[i] for i in keep]
        result.lines = [result.lines[i] for i in keep]
        texts = [texts[i] for i in keep]

    result.keys = [exact_key(json.dumps(m, ensure_ascii=False)) for m in texts]
    dedup = config.dedup
    if dedup.near and texts:
        # one process: MinHash on every core; worker processes: one thread each
        result.signatures = signatures(["\n".join(text for _, text in m) for m in texts], dedup, kernels,
                                       threads=0 if config.workers == 1 else 1)
    else:
        result.signatures = np.zeros((len(texts), dedup.num_perm), dtype=np.uint32)
    return result


def _parse(obj: Any, *, kind: str, scrub_pii: bool, images: ImageReader, pii: Counter[str]
           ) -> tuple[Any, list[tuple[str, str]]]:
    """JSON value -> (the record to write, its (role, text) messages); DataFormatError
    when validation rejects it. The scrub runs first, so scrubbed copies of a record
    are exact duplicates."""
    if scrub_pii:
        obj = scrub(obj, pii)
    if kind == "preference":
        prompt, chosen, rejected = parse_preference(obj)
        return obj, _texts(prompt) + [("assistant", chosen), ("assistant", rejected)]
    return obj, _texts(parse_record(obj, images=images))


def _parse_row(row: dict[str, Any], parse: Callable[[Any], Any]) -> Any:
    try:
        return parse(row)
    except DataFormatError as err:
        raise LineError(err.reason, err.kind) from None


def _texts(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """(role, text) per message; an image part counts as `<image sha256>`, so the same
    question about two different images is neither an exact nor a near duplicate."""
    return [(m.role, m.content if isinstance(m.content, str) else
             "".join(p if isinstance(p, str) else f" <image {p.sha256}> " for p in m.content)) for m in messages]


# --------------------------------------------------------------------------------------
# A run
# --------------------------------------------------------------------------------------


def clean(inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str] | None,
          config: PipelineConfig = PipelineConfig(), *, report: str | os.PathLike[str] | None = None,
          on_batch: Callable[[Summary], None] | None = None) -> Summary:
    """Clean `inputs` into `output` (JSONL; .gz/.zst compress), the removed records into
    `report` (default: OUTPUT's name + `.report.jsonl`) and the summary beside it
    (OUT.summary.json). With `output=None` nothing is written: `reactor data inspect`,
    whose summary also has the near-duplicate clusters (`Summary.clusters`).

    With `dedup.near_mode: cluster` the near duplicates are known only after the last
    record: the records that pass everything else are spooled to a temporary file beside
    OUTPUT, and copied to it without the clusters' later members, whose report lines come
    last."""
    started = time.perf_counter()
    files = data_files(inputs)  # missing inputs fail here, before any work
    kernels = backend(config.backend)
    summary = Summary(config=config.to_dict(), backend=backend_name(kernels))
    summary.inputs = [{"path": os.fspath(p), "sha256": sha256_file(p)} for p in files]
    decontaminator_for(config.decontaminate, kernels)  # a missing or bad evaluation file fails here, before any work
    deduplicator = Deduplicator(config.dedup, kernels, collect=output is None)
    batches = batched(iter_lines(files), config.batch_size)
    results = _ordered_map(partial(clean_batch, config=config), batches, config.workers)
    if output is None:
        for result in results:
            _account(summary, result, deduplicator, None, None)
            if on_batch:
                on_batch(summary)
        for removed in _near_removed(deduplicator).values():
            summary.kept -= 1
            summary.add(removed)
        clusters = deduplicator.clusters()
        summary.clusters = clusters.to_dict() if clusters is not None else None
    else:
        output = Path(output)
        report = Path(report) if report else report_path(output)
        summary.output, summary.report = os.fspath(output), os.fspath(report)
        with open_output(output) as out, open_output(report) as rep:
            if deduplicator.config.near and deduplicator.config.near_mode == "cluster":
                with tempfile.TemporaryFile(dir=output.parent) as spool:
                    for result in results:
                        _account(summary, result, deduplicator, spool, rep)
                        if on_batch:
                            on_batch(summary)
                    spool.seek(0)
                    _unspool(summary, spool, deduplicator, out, rep)
            else:
                for result in results:
                    _account(summary, result, deduplicator, out, rep)
                    if on_batch:
                        on_batch(summary)
        summary.seconds = time.perf_counter() - started  # the file says how long the run took
        summary_path(report).write_text(json.dumps(summary.to_dict(), indent=1) + "\n")
    summary.seconds = time.perf_counter() - started
    return summary


def report_path(output: Path) -> Path:
    """OUT.jsonl(.gz|.zst) -> OUT.report.jsonl."""
    name = output.name
    for suffix in (".gz", ".zst", ".jsonl"):
        name = name.removesuffix(suffix)
    return output.with_name(name + ".report.jsonl")


def summary_path(report: Path) -> Path:
    """OUT.report.jsonl -> OUT.summary.json."""
    return report.with_name(report.name.removesuffix(".jsonl").removesuffix(".report") + ".summary.json")


def _account(summary: Summary, result: BatchResult, deduplicator: Deduplicator, out: Any, rep: Any) -> None:
    """One batch's verdicts into the summary, the output and the report (input order
    within each: a batch's removals by the pure stage first, then its duplicates)."""
    summary.read += result.read
    summary.roles.update(result.roles)
    summary.lengths.update(result.lengths)
    summary.pii.update(result.pii)
    removed = list(result.removed)
    verdicts = deduplicator.add(result.sources, result.keys, result.signatures)
    for source, line, verdict in zip(result.sources, result.lines, verdicts):
        if verdict is None:
            summary.kept += 1
            if out is not None:
                out.write(line)
        else:
            removed.append(Removed(source, verdict.kind, f"repeats {verdict.duplicate_of}", verdict.duplicate_of))
    for r in removed:
        summary.add(r)
        if rep is not None:
            rep.write(json.dumps(r.to_dict(), ensure_ascii=False).encode("utf-8") + b"\n")


def _unspool(summary: Summary, spool: Any, deduplicator: Deduplicator, out: Any, rep: Any) -> None:
    """Cluster mode's second half: the spooled lines (one per record the index saw, in
    its order) to OUTPUT, except each cluster's later members, which go to the report."""
    near = _near_removed(deduplicator)
    for seq, line in enumerate(spool):
        removed = near.get(seq)
        if removed is None:
            out.write(line)
            continue
        summary.kept -= 1
        summary.add(removed)
        rep.write(json.dumps(removed.to_dict(), ensure_ascii=False).encode("utf-8") + b"\n")


def _near_removed(deduplicator: Deduplicator) -> dict[int, Removed]:
    """Cluster mode: near sequence number -> the record's removal (empty in stream mode)."""
    return {seq: Removed(deduplicator.near_sources[seq], v.kind, f"repeats {v.duplicate_of}", v.duplicate_of)
            for seq, v in deduplicator.near_verdicts().items()}


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`map(fn, items)` in `workers` processes, results in input order, at most
    2 * workers batches in flight (Pool.imap would read the whole input ahead)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: deque[Any] = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
