"""Checkpoints that survive a spot VM vanishing at any instant.

Layout of one checkpoint (weights apart from trainer state, as torchtune does):

    <checkpoint_dir>/step-00000120/
        weights.safetensors    trainable parameters only: the LoRA adapter, or every weight
        optimizer.pt           AdamW state (tensors and numbers; loaded with weights_only=True)
        rng.pt                 Python, NumPy, torch and CUDA RNG states (weights_only)
        trainer_state.json     loop position (step, epoch, position in the epoch's order),
                               scheduler state, config and data hashes, metrics so far
        COMPLETE               {file: sha256} of the files above, written last

A checkpoint is built in a hidden temp folder, every file fsynced, the folder renamed
into place, and only then is COMPLETE written (temp file, fsync, rename). A folder
without COMPLETE, or whose files do not match it, is never loaded: the newest one
that verifies is used instead, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from reactor_core.utils.files import fsync_dir, sha256_file, write_atomic

log = logging.getLogger("reactor_core")

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "trainer_state.json"
COMPLETE = "COMPLETE"
PREFIX = "step-"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    def state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE).read_text())


class CheckpointError(RuntimeError):
    """A checkpoint that must not be resumed from (corrupt, or from another run)."""


def step_dirname(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def verify(path: Path) -> None:
    """Raise CheckpointError unless COMPLETE exists and every file matches its sha256."""
    marker = path / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {COMPLETE} marker (interrupted while saving)")
    try:
        expected = json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}/{COMPLETE}: unreadable ({err})") from None
    for name, digest in expected.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{file}: sha256 does not match {COMPLETE}")


class LocalCheckpointStore:
    """Checkpoints in a local directory; retention keeps the last N plus the best."""

    def __init__(self, root: Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def save(self, step: int, write_files: Callable[[Path], None], metric: float | None = None) -> Checkpoint:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / step_dirname(step)
        tmp = self.root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_files(tmp)
        digests = {}
        for file in sorted(tmp.iterdir()):
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            digests[file.name] = sha256_file(file)
        fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        write_atomic(final / COMPLETE, json.dumps(digests, indent=1).encode())
        if metric is not None:
            write_atomic(final / ".metric", str(metric).encode())  # outside COMPLETE: bookkeeping only
        self._apply_retention()
        return Checkpoint(final, step)

    def candidates(self) -> list[Checkpoint]:
        """Step folders, newest first (complete or not)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if path.is_dir() and path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit():
                found.append(Checkpoint(path, int(path.name[len(PREFIX):])))
        return sorted(found, key=lambda c: -c.step)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; skipped ones are logged as warnings."""
        for checkpoint in self.candidates():
            try:
                verify(checkpoint.path)
                return checkpoint
            except CheckpointError as err:
                log.warning("skipping checkpoint: %s", err)
        return None

    def _metric(self, checkpoint: Checkpoint) -> float | None:
        try:
            return float((checkpoint.path / ".metric").read_text())
        except (OSError, ValueError):
            return None

    def _apply_retention(self) -> None:
        complete = [c for c in self.candidates() if (c.path / COMPLETE).is_file()]
        keep = {c.path for c in complete[: self.keep_last]}
        scored = [(m, c) for c in complete if (m := self._metric(c)) is not None]
        if scored:
            keep.add(min(scored, key=lambda mc: mc[0])[1].path)
        for checkpoint in complete:
            if checkpoint.path not in keep:
                shutil.rmtree(checkpoint.path, ignore_errors=True)
        for stale in self.root.glob(f".{PREFIX}*.tmp-*"):  # left by a killed save
            if not stale.name.endswith(f".tmp-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)
