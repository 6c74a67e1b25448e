"""Checkpoints that survive a spot VM vanishing at any instant.

Layout of one checkpoint (weights apart from trainer state, as torchtune does):

    <checkpoint_dir>/step-00000120/
        weights.safetensors    trainable parameters only: the LoRA adapter, or every weight
        optimizer.safetensors  AdamW moments and step counts, keyed "<parameter>/<name>"
        rng.pt                 Python, NumPy, torch and CUDA RNG states (weights_only)
        trainer_state.json     loop position (step, epoch, position in the epoch's order),
                               scheduler state, the optimizer's param groups, config and
                               data hashes, metrics so far
        COMPLETE               {file: sha256} of the files above, written last

Tensor files over SHARD_BYTES are split the way Hugging Face shards a model
(`weights-00001-of-00003.safetensors`): a full fine-tune's 1.6 GB of weights and moments
then uploads as several files in parallel, which is what makes an emergency upload fit
in the preemption notice (a single large object goes up as one sequential stream).

A checkpoint is built in a hidden temp folder, every file fsynced, the folder renamed
into place, and only then is COMPLETE written (temp file, fsync, rename). Re-saving a
step that exists renames the old folder aside (`.step-N.old`) and deletes it only once
the new one is COMPLETE; after a crash in between, the next start puts it back. A folder
without COMPLETE, or whose files do not match it, is never loaded: the newest one
that verifies is used instead, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from reactor_core.files import aside_path, fsync_dir, replace_dir, restore_aside, sha256_file, write_atomic

log = logging.getLogger("reactor_core")

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
LEGACY_OPTIMIZER = "optimizer.pt"  # reactor-core 1.0 pickled it (read with weights_only=True)
RNG = "rng.pt"
STATE = "trainer_state.json"
COMPLETE = "COMPLETE"
PREFIX = "step-"
SHARD_BYTES = 256 * 2**20


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


def save_tensors(tensors: dict[str, torch.Tensor], folder: Path, filename: str,
                 written: Callable[[str], None] = lambda name: None) -> None:
    """Write `tensors` as `filename`, or as numbered shards of it when over SHARD_BYTES;
    `written(name)` is called as each file is finished."""
    from huggingface_hub import split_torch_state_dict_into_shards

    stem = filename.removesuffix(".safetensors")
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=stem + "{suffix}.safetensors",
                                               max_shard_size=SHARD_BYTES)
    for name, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k].detach().to("cpu").contiguous() for k in keys}, folder / name)
        written(name)


def load_tensors(folder: Path, filename: str) -> dict[str, torch.Tensor]:
    """Everything `save_tensors` wrote under `filename`, sharded or not."""
    stem = filename.removesuffix(".safetensors")
    files = [folder / filename] if (folder / filename).is_file() else sorted(folder.glob(f"{stem}-*-of-*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict keyed by parameter name -> (tensors, the JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"state": {}, "param_groups": state.get("param_groups", [])}
    for param, values in state.get("state", {}).items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{key}"] = value
            else:
                rest["state"].setdefault(param, {})[key] = value
    return tensors, rest


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {param: dict(values) for param, values in rest["state"].items()}
    for name, tensor in tensors.items():
        param, _, key = name.rpartition("/")
        state.setdefault(param, {})[key] = tensor
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _seal(file: Path) -> str:
    """fsync one finished file and return its sha256 (both release the GIL)."""
    with open(file, "rb") as f:
        os.fsync(f.fileno())
    return sha256_file(file)


def _verifies(path: Path) -> bool:
    try:
        verify(path)
        return True
    except CheckpointError:
        return False


class LocalCheckpointStore:
    """Checkpoints in a local directory; retention keeps the last N plus the best."""

    def __init__(self, root: Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def save(self, step: int, write_files: Callable[[Path, Callable[[str], None]], None], metric: float | None = None,
             on_file: Callable[[Path], None] | None = None) -> Checkpoint:
        """Build the checkpoint in a temp folder, then rename it into place and mark it COMPLETE.

        `write_files(folder, written)` calls `written(name)` as each file is finished, so
        that file is handed to `on_file` (an upload) and fsynced and hashed while the next
        one is being written; files it did not announce are sealed at the end.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.restore_aside()
        final = self.root / step_dirname(step)
        tmp = self.root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="checkpoint-seal") as pool:
            sealing: dict[str, Future[str]] = {}

            def written(name: str) -> None:
                if on_file is not None:
                    on_file(tmp / name)
                sealing[name] = pool.submit(_seal, tmp / name)

            write_files(tmp, written)
            for file in sorted(tmp.iterdir()):
                if file.name not in sealing:
                    written(file.name)
            digests = {name: sealing[name].result() for name in sorted(sealing)}
        fsync_dir(tmp)

        def finish(folder: Path) -> None:
            write_atomic(folder / COMPLETE, json.dumps(digests, indent=1).encode())
            if metric is not None:
                write_atomic(folder / ".metric", str(metric).encode())  # outside COMPLETE: bookkeeping only

        # a re-save of the same step (e.g. after a resume) sets the old one aside until
        # the new one is COMPLETE: a crash in between never leaves the step without one
        replace_dir(tmp, final, finish)
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

    def restore_aside(self) -> None:
        """Finish what a crash interrupted while a step was re-saved (or re-downloaded):
        the old checkpoint set aside comes back unless its successor verifies."""
        if not self.root.is_dir():
            return
        for aside in self.root.glob(f".{PREFIX}*.old"):
            final = self.root / aside.name[1:].removesuffix(".old")
            if aside_path(final) == aside and restore_aside(final, _verifies):
                log.warning("restored checkpoint %s, set aside by a re-save that did not finish", final)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; skipped ones are logged as warnings."""
        self.restore_aside()
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
