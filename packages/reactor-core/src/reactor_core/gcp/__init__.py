"""Running on Google Cloud spot VMs: remote checkpoint storage and the seed's checkpointer."""

from __future__ import annotations

from dataclasses import dataclass

from reactor_core.gcp.storage import GcsRemote, LocalDirRemote, open_remote


@dataclass(frozen=True)
class SpotVMCheckpointer:
    """The seed's API: `Trainer(config, checkpointer=SpotVMCheckpointer(500, "gs://b/run"))`.

    It is a bundle of TrainingConfig settings for a spot VM: checkpoint every
    `checkpoint_interval` steps and every `checkpoint_every_minutes`, mirror to
    `gcs_bucket` (gs://... or a directory), and watch the GCP metadata server for the
    preemption notice. Resuming follows the config's `resume` (auto by default).
    """

    checkpoint_interval: int = 500
    gcs_bucket: str | None = None
    checkpoint_every_minutes: float | None = 5.0
    watch_preemption: bool = True

    def overrides(self) -> dict:
        """The settings it stands for; unset ones leave the config's own value alone."""
        values = {
            "checkpoint_every_steps": self.checkpoint_interval,
            "checkpoint_every_minutes": self.checkpoint_every_minutes,
            "checkpoint_remote": self.gcs_bucket,
            "watch_gcp_preemption": self.watch_preemption,
        }
        return {k: v for k, v in values.items() if v is not None}


__all__ = ["GcsRemote", "LocalDirRemote", "SpotVMCheckpointer", "open_remote"]
