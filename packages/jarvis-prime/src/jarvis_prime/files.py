"""Files written whole or not at all, and their sha256.

A model directory, its `prime.json` and a resumable run's state are read again by
other processes, after a crash too: each is written to a temporary file beside the
target, flushed to disk, renamed over it, and the rename itself flushed (the
directory), so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(target: Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside `target` to write; when the block ends without an error
    it becomes `target` (file mode `mode`), else it is removed."""
    target = Path(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes it private; model directories are shared data
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(target: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Replace `target` with `data` (text is written as UTF-8), atomically."""
    with atomic_path(target, mode) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
