"""Training: config, the SFT recipe, LoRA/QLoRA, loop state."""

from reactor_core.training.config import ConfigError, TrainingConfig, load_config
from reactor_core.training.trainer import TrainEvent, Trainer, TrainResult

__all__ = ["ConfigError", "TrainEvent", "Trainer", "TrainResult", "TrainingConfig", "load_config"]
