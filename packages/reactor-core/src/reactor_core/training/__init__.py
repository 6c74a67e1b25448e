"""Training: config, the SFT recipe, LoRA/QLoRA, loop state, checkpoints.

Names are imported on first use, so submodules such as `training.config` load
without pulling in the whole recipe.
"""

from typing import Any

_LAZY = {
    "ConfigError": "reactor_core.training.config",
    "TrainingConfig": "reactor_core.training.config",
    "load_config": "reactor_core.training.config",
    "TrainEvent": "reactor_core.training.trainer",
    "Trainer": "reactor_core.training.trainer",
    "TrainResult": "reactor_core.training.trainer",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reactor_core.training' has no attribute {name!r}")
