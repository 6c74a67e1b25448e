"""Remote homes for checkpoints: `gs://bucket/prefix` or a local directory.

A remote mirrors the local checkpoint store. An `Upload` sends each file of a checkpoint
as soon as the trainer has written it, several in parallel, and the COMPLETE marker
last, so a reader never sees a checkpoint whose marker arrived before its data, and a
preemption's emergency checkpoint is mostly in the bucket by the time the last shard is
on disk. A fresh VM with an empty disk downloads the newest remote checkpoint whose
files match its marker.

gs:// goes through google-cloud-storage; `STORAGE_EMULATOR_HOST` points it at an
emulator, as in the tests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Protocol

from reactor_core.checkpoints.store import COMPLETE, PREFIX, CheckpointError, step_dirname, verify
from reactor_core.files import replace_dir, write_atomic

log = logging.getLogger("reactor_core")


class Upload:
    """One checkpoint on its way to a remote: files in parallel as they are handed over,
    then the COMPLETE marker, only once every file has arrived.

    A file is opened when it is handed over, so the local store may rename its folder
    (temp -> final) while the bytes are still going up. Leaving the `with` block without
    `finish` (an error while writing) cancels what has not started and sends no marker.
    """

    def __init__(self, url: str, send: Callable[[BinaryIO, str], None], workers: int) -> None:
        self.url = url
        self._send = send
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="checkpoint-upload")
        self._sending: list[tuple[Path, BinaryIO, Future[None]]] = []

    def send(self, file: Path) -> None:
        handle = open(file, "rb")
        self._sending.append((file, handle, self._pool.submit(self._send, handle, file.name)))

    def finish(self, marker: Path) -> None:
        for file, _, future in self._sending:
            try:
                future.result()
            except Exception as err:
                raise CheckpointError(f"upload of {file.name} to {self.url} failed: {type(err).__name__}: {err}") from err
        with open(marker, "rb") as handle:
            self._send(handle, marker.name)

    def __enter__(self) -> "Upload":
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for _, handle, _ in self._sending:
            handle.close()


class RemoteStore(Protocol):
    url: str

    def start_upload(self, name: str) -> Upload:
        """An upload of the checkpoint folder called `name` (step-NNNNNNNN)."""
        ...

    def steps(self) -> list[int]:
        """Steps that have a COMPLETE marker remotely, newest first."""
        ...

    def download(self, step: int, local_root: Path) -> Path: ...

    def delete(self, names: list[str]) -> None:
        """Remove these checkpoint folders (retention of what this run uploaded)."""
        ...


def upload_folder(remote: RemoteStore, checkpoint: Path) -> None:
    """Upload a finished local checkpoint folder, COMPLETE last."""
    with remote.start_upload(checkpoint.name) as upload:
        for file in sorted(checkpoint.iterdir()):
            if file.is_file() and file.name != COMPLETE and not file.name.startswith("."):
                upload.send(file)
        upload.finish(checkpoint / COMPLETE)


def _step_of(name: str) -> int | None:
    digits = name[len(PREFIX):]
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


class LocalDirRemote:
    """A directory (an NFS or gcsfuse mount, a second disk) used exactly like a bucket."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def start_upload(self, name: str, workers: int = 4) -> Upload:
        target = self.root / name
        target.mkdir(parents=True, exist_ok=True)

        def send(handle: BinaryIO, filename: str) -> None:
            write_atomic(target / filename, handle)  # the marker, sent last, appears whole

        return Upload(self.url, send, workers)

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = [_step_of(p.name) for p in self.root.iterdir() if (p / COMPLETE).is_file()]
        return sorted((s for s in found if s is not None), reverse=True)

    def download(self, step: int, local_root: Path) -> Path:
        source = self.root / step_dirname(step)
        return _install(local_root, step_dirname(step), lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))

    def delete(self, names: list[str]) -> None:
        for name in names:
            shutil.rmtree(self.root / name, ignore_errors=True)


class GcsRemote:
    """gs://bucket/prefix through google-cloud-storage."""

    def __init__(self, url: str, workers: int = 8) -> None:
        try:
            from google.cloud import storage
        except ImportError as err:
            raise ValueError("gs:// checkpoints need google-cloud-storage: pip install 'reactor-core[gcp]'") from err

        bucket, _, prefix = url.removeprefix("gs://").partition("/")
        if not bucket:
            raise ValueError(f"`checkpoint_remote`: no bucket in {url!r}")
        self.url = url
        self.prefix = prefix.strip("/")
        self.workers = workers
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            self.client = storage.Client(project="emulator", credentials=AnonymousCredentials())
        else:
            self.client = storage.Client()
        self.bucket = self.client.bucket(bucket)

    def _name(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def start_upload(self, name: str) -> Upload:
        def send(handle: BinaryIO, filename: str) -> None:
            blob = self.bucket.blob(self._name(name, filename))
            blob.upload_from_file(handle, size=os.fstat(handle.fileno()).st_size)

        return Upload(self.url, send, self.workers)

    def steps(self) -> list[int]:
        found = set()
        for blob in self.client.list_blobs(self.bucket, prefix=self._name() + "/" if self.prefix else None):
            parts = blob.name.removeprefix(self._name() + "/" if self.prefix else "").split("/")
            if len(parts) == 2 and parts[1] == COMPLETE and (step := _step_of(parts[0])) is not None:
                found.add(step)
        return sorted(found, reverse=True)

    def download(self, step: int, local_root: Path) -> Path:
        name = step_dirname(step)

        def fetch(tmp: Path) -> None:
            marker = _read_marker(self.bucket.blob(self._name(name, COMPLETE)).download_as_bytes())
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="checkpoint-download") as pool:
                list(pool.map(lambda file: self.bucket.blob(self._name(name, file)).download_to_filename(str(tmp / file)),
                              marker))
            (tmp / COMPLETE).write_text(json.dumps(marker))

        return _install(local_root, name, fetch)

    def delete(self, names: list[str]) -> None:
        for name in names:
            for blob in list(self.client.list_blobs(self.bucket, prefix=self._name(name) + "/")):
                blob.delete()


def _install(local_root: Path, name: str, fetch) -> Path:
    """Download into a temp folder, verify against COMPLETE, then rename into place."""
    local_root.mkdir(parents=True, exist_ok=True)
    tmp = local_root / f".{name}.download-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fetch(tmp)
        verify(tmp)
        final = local_root / name
        replace_dir(tmp, final)  # an existing local copy is set aside, not deleted, until this one is in place
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_marker(raw: bytes) -> dict[str, str]:
    """A COMPLETE marker from elsewhere: plain file names only, never a path."""
    try:
        marker = json.loads(raw)
    except ValueError as err:
        raise CheckpointError(f"unreadable {COMPLETE} marker: {err}") from None
    if not isinstance(marker, dict) or any("/" in n or "\\" in n or n.startswith(".") for n in marker):
        raise CheckpointError(f"{COMPLETE} marker lists unsafe file names: {list(marker)[:5]}")
    return marker


def open_remote(url: str) -> RemoteStore:
    return GcsRemote(url) if url.startswith("gs://") else LocalDirRemote(url)


def download_newest(remote: RemoteStore, local_root: Path, newer_than: int = -1) -> Path | None:
    """The newest remote checkpoint past `newer_than` that verifies; others are skipped with a warning."""
    try:
        steps = remote.steps()
    except Exception as err:
        log.warning("cannot list %s (%s: %s); using local checkpoints only", remote.url, type(err).__name__, err)
        return None
    for step in steps:
        if step <= newer_than:
            return None
        try:
            path = remote.download(step, local_root)
            log.warning("downloaded checkpoint step %d from %s", step, remote.url)
            return path
        except Exception as err:  # corrupt, unsafe, or the network failed: try the next one
            log.warning("skipping remote checkpoint step %d: %s: %s", step, type(err).__name__, err)
    return None
