"""Reactor Core: the training engine of the JARVIS ecosystem.

    from reactor_core import Trainer, TrainingConfig

It never imports `jarvis` or `jarvis_prime`; the only thing it hands to them is a
PRIME model directory on disk (docs/architecture.md in the repository). The training API is imported
on first use, so `import reactor_core` (and `reactor env`) stays quick.
"""

from typing import Any

from reactor_core.version import __version__

_LAZY = {
    "Trainer": "reactor_core.training.trainer",
    "TrainResult": "reactor_core.training.events",
    "TrainEvent": "reactor_core.training.events",
    "TrainingConfig": "reactor_core.training.config",
    "load_config": "reactor_core.training.config",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reactor_core' has no attribute {name!r}")
