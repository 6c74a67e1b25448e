"""Where data comes from, one record at a time: JSONL (plain, .gz, .zst), folders of
shards, and Hugging Face `datasets` / Arrow files.

The data pipeline (`pipeline.py`) never holds a corpus: `iter_lines` yields one
`SourceLine` at a time, each knowing the `path:line` a person would open (1-based; for
Arrow, the row number within the file), and the kept records stream out through
`open_output`. Readers are plain generators, so memory stays at one record plus one
decompression buffer, whatever the size of the input.

    inputs                          read as
    data.jsonl / .jsonl.gz / .zst   lines of JSON (binary; decoding and JSON errors are the
                                    validator's, so a bad line is an issue at its line)
    a folder                        every data file inside (sorted, recursively): shards
    a `datasets.save_to_disk` folder, or *.arrow
                                    Arrow record batches, each row a record (dict)
    *.parquet                       Parquet row groups, each row a record
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".jsonl.zst")
ARROW_SUFFIXES: tuple[str, ...] = (".arrow", ".parquet")


@dataclass(frozen=True)
class SourceLine:
    """One record as read: `raw` is a JSONL line's bytes, or an Arrow row's dict."""

    path: str
    line: int
    raw: bytes | dict[str, Any]

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"


def data_files(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every data file the inputs name, in order: files as given, folders expanded to
    their data files (sorted). Raises FileNotFoundError naming a missing input, and
    ValueError for a file no reader knows."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _known(p))
            if not found:
                raise ValueError(f"{path}: no data files inside (expected {', '.join(JSONL_SUFFIXES + ARROW_SUFFIXES)})")
            files += found
        elif path.is_file():
            if not _known(path):
                raise ValueError(f"{path}: unknown data file type (expected {', '.join(JSONL_SUFFIXES + ARROW_SUFFIXES)})")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files


def iter_lines(inputs: Iterable[str | os.PathLike[str]]) -> Iterator[SourceLine]:
    """Every record of every input, one at a time (see the module docstring)."""
    for path in data_files(inputs):
        name = os.fspath(path)
        if name.endswith(".arrow"):
            yield from _arrow_rows(path)
        elif name.endswith(".parquet"):
            yield from _parquet_rows(path)
        else:
            with open_binary(path) as f:
                for number, raw in enumerate(f, start=1):
                    yield SourceLine(name, number, raw)


@contextmanager
def open_binary(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A data file's bytes, decompressed as they are read (.gz, .zst)."""
    name = os.fspath(path)
    if name.endswith(".gz"):
        with gzip.open(name, "rb") as f:
            yield f
    elif name.endswith(".zst"):
        import zstandard  # only for .zst files

        with open(name, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            yield io.BufferedReader(reader)  # lines, read a buffer at a time
    else:
        with open(name, "rb") as f:
            yield f


@contextmanager
def open_output(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A file to write JSONL bytes to, compressed by its suffix (.gz, .zst); written to a
    temporary name and renamed when complete, so a crash never leaves half a file under
    the real name."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        if final.name.endswith(".gz"):
            with gzip.open(tmp, "wb") as f:
                yield f
        elif final.name.endswith(".zst"):
            import zstandard

            with open(tmp, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as f:
                yield f
        else:
            with open(tmp, "wb") as f:
                yield f
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _known(path: Path) -> bool:
    return path.name.endswith(JSONL_SUFFIXES + ARROW_SUFFIXES)


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError(f"{path}: reading Arrow and Parquet files needs pyarrow (pip install pyarrow)") from None
    return pyarrow


def _arrow_rows(path: Path) -> Iterator[SourceLine]:
    """Rows of an Arrow file, a batch at a time (`datasets` writes the streaming format;
    the random-access file format is read too)."""
    pa = _pyarrow(path)

    name = os.fspath(path)
    with pa.memory_map(name) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            batches: Iterable[Any] = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        else:
            batches = reader
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield SourceLine(name, row, record)


def _parquet_rows(path: Path) -> Iterator[SourceLine]:
    name = os.fspath(path)
    row = 0
    for batch in _pyarrow(path).parquet.ParquetFile(name).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield SourceLine(name, row, record)
