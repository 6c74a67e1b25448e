"""Spot VM settings: how often to checkpoint, and the seed's checkpointer bundle."""

from __future__ import annotations

from dataclasses import dataclass

# A preempted spot VM loses at most this much work: the checkpoint clock `reactor env`
# recommends and the recipes' spot defaults turn on.
SPOT_CHECKPOINT_EVERY_MINUTES = 5.0


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
    checkpoint_every_minutes: float | None = SPOT_CHECKPOINT_EVERY_MINUTES
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
