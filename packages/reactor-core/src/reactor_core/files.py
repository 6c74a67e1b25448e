"""The two file primitives everything durable is built on: sha256 and atomic writes.

Data lineage, checkpoints, their remote mirror and PRIME directories all hash and
write files through these two, so "durable" means the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | BinaryIO, mode: int = 0o644) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder: readers see old or
    new, never half, and a crash after return keeps the new file.

    `data` is bytes, or an open binary file copied in 1 MiB chunks.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            shutil.copyfileobj(data, f, 1 << 20)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    fsync_dir(path.parent)
