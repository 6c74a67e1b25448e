"""Remote homes for checkpoints: `gs://bucket/prefix` or a local directory.

A remote mirrors the local checkpoint store. An `Upload` sends each file of a checkpoint
as soon as the trainer has written it, several in parallel, and the COMPLETE marker
last, so a reader never sees a checkpoint whose marker arrived before its data, and a
preemption's emergency checkpoint is mostly in the bucket by the time the last shard is
on disk. A fresh VM with an empty disk downloads the newest remote checkpoint whose
files match its marker.

A bucket has bad minutes: each file (and the marker) is sent again on any error, a
bounded number of times with exponential backoff and jitter (`Retry`); what still
fails raises `UploadError`, and the trainer keeps the checkpoint on local disk only. A
step uploaded again (a re-run of a finished run re-saves its last step) first loses its
old marker, so the remote never shows a marker over files from two different saves.

gs:// goes through google-cloud-storage; `STORAGE_EMULATOR_HOST` points it at an
emulator, as in the tests.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Protocol

from reactor_core.checkpoints.store import COMPLETE, PREFIX, CheckpointError, step_dirname, verify
from reactor_core.files import fsync_dir, replace_dir, write_atomic

log = logging.getLogger("reactor_core")


class UploadError(CheckpointError):
    """A checkpoint did not reach its remote, retries included; the local copy is intact."""


@dataclass(frozen=True)
class Retry:
    """How many times one file is sent before its upload fails, and the pause between
    tries: doubling from `first_delay_s` up to `max_delay_s`, each drawn between half and
    all of that (jitter: files that failed together do not all retry in the same instant).

    Any error is retried: a permanent one (a 403) then costs a few seconds before the same
    warning, while a transient one taken for permanent would cost the upload. Five tries
    sleep at most 0.5 + 1 + 2 + 4 = 7.5 s, inside GCP's ~30 s preemption notice, which
    google-cloud-storage's own retry (up to 120 s) would overrun; it is turned off.
    """

    attempts: int = 5
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def call(self, action: Callable[[], None], what: str) -> None:
        """Run `action` until it returns; after the last try its error propagates."""
        jitter = random.Random()  # not the global generator: its state is checkpointed for an exact resume
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except Exception as err:
                if attempt == self.attempts:
                    raise
                delay = min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1)) * jitter.uniform(0.5, 1.0)
                log.warning("%s failed (%s: %s); try %d of %d in %.1f s", what, type(err).__name__, err,
                            attempt + 1, self.attempts, delay)
                time.sleep(delay)


class Upload:
    """One checkpoint on its way to a remote: files in parallel as they are handed over,
    then the COMPLETE marker, only once every file has arrived.

    `prepare` (making the folder, removing a previous upload's marker) runs first, and
    no file is sent before it has succeeded. Every send is retried per `retry`. A file is
    opened when it is handed over, so the local store may rename its folder (temp ->
    final) while the bytes are still going up. Leaving the `with` block without `finish`
    (an error while writing) cancels what has not started and sends no marker.
    """

    def __init__(self, url: str, send: Callable[[BinaryIO, str], None], workers: int, retry: Retry = Retry(),
                 prepare: Callable[[], None] | None = None) -> None:
        self.url = url
        self._send = send
        self._retry = retry
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="checkpoint-upload")
        self._prepared = self._pool.submit(retry.call, prepare, f"preparing {url}") if prepare else None
        self._sending: list[tuple[Path, BinaryIO, Future[None]]] = []

    def send(self, file: Path) -> None:
        handle = open(file, "rb")
        self._sending.append((file, handle, self._pool.submit(self._send_file, handle, file.name)))

    def _send_file(self, handle: BinaryIO, name: str) -> None:
        if self._prepared is not None:
            self._prepared.result()  # an old marker must be gone before a new file lands under it

        def send_from_start() -> None:
            handle.seek(0)  # a retry sends the whole file again
            self._send(handle, name)

        self._retry.call(send_from_start, f"upload of {name} to {self.url}")

    def finish(self, marker: Path) -> None:
        """Wait for every file, then send the marker; UploadError says what failed."""
        for file, _, future in self._sending:
            self._check(future, file.name)
        with open(marker, "rb") as handle:
            self._check(self._pool.submit(self._send_file, handle, marker.name), marker.name)

    def _check(self, future: Future[None], name: str) -> None:
        try:
            future.result()
        except Exception as err:
            tries = f"{self._retry.attempts} {'try' if self._retry.attempts == 1 else 'tries'}"
            raise UploadError(f"upload of {name} to {self.url} failed: {type(err).__name__}: {err} "
                              f"(after {tries})") from err

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

    def __init__(self, root: str | Path, retry: Retry = Retry()) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)
        self.retry = retry

    def start_upload(self, name: str, workers: int = 4) -> Upload:
        target = self.root / name

        def prepare() -> None:
            target.mkdir(parents=True, exist_ok=True)
            (target / COMPLETE).unlink(missing_ok=True)  # a re-upload: unmarked until the new marker
            fsync_dir(target)

        def send(handle: BinaryIO, filename: str) -> None:
            write_atomic(target / filename, handle)  # the marker, sent last, appears whole

        return Upload(self.url, send, workers, self.retry, prepare)

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

    def __init__(self, url: str, workers: int = 8, retry: Retry = Retry()) -> None:
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
        self.retry = retry
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            self.client = storage.Client(project="emulator", credentials=AnonymousCredentials())
        else:
            self.client = storage.Client()
        self.bucket = self.client.bucket(bucket)

    def _name(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def start_upload(self, name: str) -> Upload:
        from google.api_core.exceptions import NotFound

        def prepare() -> None:
            try:  # a re-upload: unmarked until the new marker
                self.bucket.blob(self._name(name, COMPLETE)).delete(retry=None)
            except NotFound:
                pass

        def send(handle: BinaryIO, filename: str) -> None:
            blob = self.bucket.blob(self._name(name, filename))
            blob.upload_from_file(handle, size=os.fstat(handle.fileno()).st_size, retry=None)  # Upload retries

        return Upload(self.url, send, self.workers, self.retry, prepare)

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


def open_remote(url: str, retry: Retry = Retry()) -> RemoteStore:
    return GcsRemote(url, retry=retry) if url.startswith("gs://") else LocalDirRemote(url, retry)


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
