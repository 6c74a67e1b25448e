"""What a recipe puts in a checkpoint, when, and which one it resumes from.

The on-disk format and the remote mirror are `reactor_core.checkpoints`; this module
is the recipe's side: the trainable weights, optimizer, scheduler, RNG and loop
position that make a resume bitwise exact, the step/clock cadence, the choice between
local and remote checkpoints on a restart, and the spot-VM defaults.

An upload that fails (after `checkpoint_upload_attempts` tries) costs the mirror one
checkpoint, never the run: the local checkpoint is complete, a warning names the step
and the remote, training goes on, and a preemption still exits 75.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from reactor_core.checkpoints.remote import Retry, UploadError, download_newest, open_remote
from reactor_core.checkpoints.store import (
    COMPLETE,
    Checkpoint,
    LEGACY_OPTIMIZER,
    OPTIMIZER,
    RNG,
    STATE,
    WEIGHTS,
    CheckpointError,
    LocalCheckpointStore,
    join_optimizer_state,
    load_tensors,
    save_tensors,
    split_optimizer_state,
    step_dirname,
    verify,
)
from reactor_core.gcp.metadata import MetadataClient, detect_gcp
from reactor_core.gcp.spot import SPOT_CHECKPOINT_EVERY_MINUTES
from reactor_core.training import distributed
from reactor_core.training.config import TrainingConfig
from reactor_core.training.distributed import DistContext
from reactor_core.training.loss import unwrapped_state
from reactor_core.training.state import TrainState, restore_rng_tensors, rng_state_tensors

log = logging.getLogger("reactor_core")


def with_spot_defaults(config: TrainingConfig) -> TrainingConfig:
    """On a GCP spot VM, time-based checkpoints and the preemption watcher are on."""
    c = config
    if not c.spot_defaults or (c.checkpoint_every_minutes and c.watch_gcp_preemption):
        return c
    if not detect_gcp(MetadataClient.from_env().get).preemptible:
        return c
    update: dict[str, Any] = {"watch_gcp_preemption": True}
    if c.checkpoint_every_minutes is None:
        update["checkpoint_every_minutes"] = SPOT_CHECKPOINT_EVERY_MINUTES
    log.warning("GCP spot VM detected: %s", ", ".join(f"{k}={v}" for k, v in update.items()))
    return c.model_copy(update=update)


class Checkpointer:
    """One run's checkpoints: the local store, its remote mirror, cadence and resume.

    `data_files` are the run's lineage entries (each with its sha256): a checkpoint
    taken on other data is refused on resume, as is one from another training config.
    """

    def __init__(self, config: TrainingConfig, dist: DistContext, data_files: list[dict[str, Any]]) -> None:
        c = self.config = config
        self.dist = dist
        self.store = LocalCheckpointStore(Path(c.checkpoint_dir or Path(c.output_dir) / "checkpoints"),
                                          keep_last=c.keep_last_checkpoints)
        retry = Retry(attempts=c.checkpoint_upload_attempts)
        self.remote = open_remote(c.checkpoint_remote, retry) if c.checkpoint_remote else None
        self.data_hash = hashlib.sha256("".join(f["sha256"] for f in data_files).encode()).hexdigest()
        self.last_save = time.monotonic()
        self._uploaded: set[str] = set()

    # -- when ----------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        c = self.config
        return bool(c.checkpoint_every_steps or c.checkpoint_every_minutes or c.checkpoint_remote)

    def due(self, step: int) -> bool:
        c = self.config
        if c.checkpoint_every_steps and step % c.checkpoint_every_steps == 0:
            return True
        if c.checkpoint_every_minutes:
            return time.monotonic() - self.last_save >= 60 * c.checkpoint_every_minutes
        return False

    # -- which -------------------------------------------------------------------------------

    def to_resume(self) -> Path | None:
        """The checkpoint this run starts from, per `resume` (collective).

        Only rank 0 touches checkpoint storage (the other nodes of a multi-VM run may
        have empty disks); it picks the checkpoint and the others follow.
        """
        if self.config.resume == "never":
            return None
        path = distributed.broadcast_object(self._pick() if self.dist.is_main else None)
        return Path(path) if path is not None else None

    def _pick(self) -> str | None:
        c = self.config
        if c.resume != "auto":
            verify(Path(c.resume))
            return c.resume
        checkpoint = self.store.latest()
        local_step = checkpoint.step if checkpoint else -1
        # a fresh VM has an empty disk; a bucket may also hold a newer one
        downloaded = download_newest(self.remote, self.store.root, local_step) if self.remote else None
        if downloaded is not None:
            return str(downloaded)
        return str(checkpoint.path) if checkpoint is not None else None

    # -- save and load ---------------------------------------------------------------------

    def save(self, reason: str, *, state: TrainState, metrics: dict[str, Any], loss_module: nn.Module,
             model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> Path | None:
        """Trainable weights, optimizer, scheduler, RNG and loop position, atomically.

        Collective in a distributed run: every rank contributes its shards and RNG
        state, rank 0 writes and uploads, and all return together (the path on rank 0,
        None elsewhere).
        """
        weights = _trainable_only(unwrapped_state(distributed.model_state(loss_module, trainable_only=True)), model)
        optimizer_state = distributed.optimizer_state(loss_module, optimizer)
        rng = distributed.gather_objects(rng_state_tensors())
        if not self.dist.is_main:
            distributed.barrier()  # rank 0 is writing; leave (or go on) together
            return None

        def write(folder: Path, written: Callable[[str], None]) -> None:
            save_tensors(weights, folder, WEIGHTS, written)
            moments, optimizer_rest = split_optimizer_state(optimizer_state)
            save_tensors(moments, folder, OPTIMIZER, written)
            torch.save({"ranks": rng}, folder / RNG)
            (folder / STATE).write_text(json.dumps({
                "reason": reason,
                "state": state.to_dict(),
                "scheduler": scheduler.state_dict(),
                "optimizer": optimizer_rest,
                "config_hash": self.config.training_hash(),
                "data_hash": self.data_hash,
                "metrics": metrics,
                "config": self.config.to_dict(),
            }))

        last_eval = metrics["eval"][-1]["eval_loss"] if metrics["eval"] else None
        if self.remote is None:
            checkpoint = self.store.save(state.step, write, metric=last_eval)
        else:
            checkpoint = self._save_and_upload(state.step, write, last_eval)
        self.last_save = time.monotonic()
        log.info("checkpoint (%s) at step %d: %s", reason, state.step, checkpoint.path)
        distributed.barrier()
        return checkpoint.path

    def _save_and_upload(self, step: int, write: Callable[[Path, Callable[[str], None]], None],
                         metric: float | None) -> Checkpoint:
        """Save locally while each file uploads as soon as it is written, COMPLETE last.

        A failed upload is a warning, not an error: the local checkpoint is complete
        and resumable, and the next checkpoint uploads again.
        """
        assert self.remote is not None
        with self.remote.start_upload(step_dirname(step)) as upload:
            checkpoint = self.store.save(step, write, metric=metric, on_file=upload.send)
            try:
                upload.finish(checkpoint.path / COMPLETE)
            except UploadError as err:
                log.warning("checkpoint step %d is on local disk only (%s), not in %s: %s",
                            step, checkpoint.path, self.remote.url, err)
        self._uploaded.add(checkpoint.path.name)  # a partial upload too: retention removes it
        self._delete_remote_beyond_retention()
        return checkpoint

    def _delete_remote_beyond_retention(self) -> None:
        """Remove from the remote what this run uploaded and local retention dropped
        (never another run's checkpoints); what cannot be removed now is tried next time."""
        assert self.remote is not None
        kept = {c.path.name for c in self.store.candidates()}
        try:
            self.remote.delete(sorted(self._uploaded - kept))
        except Exception as err:
            log.warning("could not delete old checkpoints from %s (%s: %s); trying again after the next one",
                        self.remote.url, type(err).__name__, err)
            return
        self._uploaded &= kept

    def load(self, path: Path, *, loss_module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any) -> tuple[TrainState, dict[str, Any]]:
        """Restore everything `save` wrote; refuse another run's checkpoint. Returns the
        loop state and the metrics so far.

        Collective in a distributed run: rank 0 reads the files and broadcasts.
        """
        main = self.dist.is_main
        saved = distributed.broadcast_object(json.loads((path / STATE).read_text()) if main else None)
        self._check_same_run(path, saved)
        weights = load_tensors(path, WEIGHTS) if main else {}
        missing = distributed.broadcast_object([n for n in _trainable_names(model) if n not in weights]
                                               if main else None)
        if missing:
            raise CheckpointError(f"{path}: no saved weights for {missing[:3]}")
        distributed.load_model_state(loss_module, {f"model.{n}": t for n, t in weights.items()})
        optimizer_state = {}
        if main and (path / LEGACY_OPTIMIZER).is_file():
            optimizer_state = torch.load(path / LEGACY_OPTIMIZER, weights_only=True)
        elif main:
            optimizer_state = join_optimizer_state(load_tensors(path, OPTIMIZER), saved["optimizer"])
        distributed.load_optimizer_state(loss_module, optimizer, optimizer_state)
        scheduler.load_state_dict(saved["scheduler"])
        rng = distributed.broadcast_object(torch.load(path / RNG, weights_only=True)["ranks"] if main else None)
        if len(rng) != self.dist.world_size:
            log.warning("%s was saved by %d processes, this run has %d: resuming, but random draws (dropout) "
                        "will differ from an uninterrupted run", path, len(rng), self.dist.world_size)
        restore_rng_tensors(rng[self.dist.rank % len(rng)])
        state = TrainState.from_dict(saved["state"])
        log.warning("resumed from %s (step %d, epoch %d, item %d of the epoch)",
                    path, state.step, state.epoch, state.position)
        return state, saved["metrics"]

    def _check_same_run(self, path: Path, saved: dict[str, Any]) -> None:
        """Raise CheckpointError when the config or data changed, unless `force_resume`."""
        mismatches = []
        if saved["config_hash"] != self.config.training_hash():
            changed = [k for k, v in saved["config"].items()
                       if k not in TrainingConfig.RESUME_NEUTRAL and self.config.to_dict().get(k) != v]
            mismatches.append(f"the training config changed ({', '.join(changed) or 'fields'})")
        if saved["data_hash"] != self.data_hash:
            mismatches.append("the training data changed (sha256 differs)")
        if mismatches:
            message = f"{path}: not resuming: {'; '.join(mismatches)}"
            if not self.config.force_resume:
                raise CheckpointError(message + ". Set `force_resume: true` to resume anyway, or `resume: never`.")
            log.warning("%s; resuming anyway (force_resume)", message)


def _trainable_only(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """What trains, each tensor under one name.

    The distributed state dict lists a tied tensor under both of its names (SmolLM2's LM
    head is its embedding) and its frozen-parameter filter misses the second one, so a
    LoRA checkpoint would carry the whole frozen embedding and a full one would hold a
    shared tensor twice, which safetensors refuses. The model's own parameter list names
    each parameter once; loading that name fills every alias, since they are one tensor.
    """
    trainable = set(_trainable_names(model))
    return {name: tensor for name, tensor in state.items() if name in trainable}


def _trainable_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]
