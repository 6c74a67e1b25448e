"""The two file primitives everything durable is built on: sha256 and atomic writes.

Data lineage, checkpoints, their remote mirror and PRIME directories all hash and
write files through these two, so "durable" means the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable


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


def aside_path(final: Path) -> Path:
    """Where `replace_dir` keeps the folder it replaces until its successor is complete."""
    return final.with_name(f".{final.name}.old")


def replace_dir(new: Path, final: Path, finish: Callable[[Path], None] | None = None) -> None:
    """Move the finished folder `new` to `final`, never deleting an existing `final` first.

    The old `final` is renamed aside (`.<name>.old`), `new` renamed into place, `finish(final)`
    run (e.g. writing a COMPLETE marker), and only then is the old one deleted. A crash in
    between leaves the old folder aside; `restore_aside` puts it back (or drops it when the
    new one is complete) on the next start.
    """
    aside = aside_path(final)
    if final.exists():
        if aside.exists():  # left by an earlier crash: `final` was restored or is newer
            shutil.rmtree(aside)
        os.replace(final, aside)
        fsync_dir(final.parent)
    os.replace(new, final)
    fsync_dir(final.parent)
    if finish is not None:
        finish(final)
    if aside.exists():
        shutil.rmtree(aside)


def restore_aside(final: Path, complete: Callable[[Path], bool]) -> bool:
    """Undo a `replace_dir` cut short by a crash: keep `final` if `complete(final)`, else
    put the old folder back in its place. Returns True when the old one was restored."""
    aside = aside_path(final)
    if not aside.is_dir():
        return False
    if final.exists() and complete(final):
        shutil.rmtree(aside)
        return False
    if final.exists():
        shutil.rmtree(final)
    os.replace(aside, final)
    fsync_dir(final.parent)
    return True
