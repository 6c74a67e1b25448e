"""Training: the config, the recipes and their loop, and the components they share.

    config.py         TrainingConfig: every recipe key, validated
    trainer.py        Trainer: picks the recipe for `config.method`, runs it here or async
    recipes/          base.py (setup + the loop), sft.py, dpo.py, grpo.py, and the registry
    rewards.py        GRPO's reward functions: built-ins, loading, scoring
    background.py     train_async's child process
    checkpointing.py  what a checkpoint holds, when one is due, which to resume, spot defaults
    prime_dir.py      the PRIME model directory: weights, merge, tokenizer, prime.json
    model.py          model sources, device, LoRA/QLoRA;  loss.py, attention.py: the forward
    distributed.py    FSDP2 and collectives;  state.py: loop position, sampler, RNG
    metrics.py, schedule.py, events.py, launch.py (`reactor train --nproc`)

Names are imported on first use, so submodules such as `training.config` load
without pulling in torch and the recipes.
"""

from typing import Any

_LAZY = {
    "ConfigError": "reactor_core.training.config",
    "TrainingConfig": "reactor_core.training.config",
    "load_config": "reactor_core.training.config",
    "TrainEvent": "reactor_core.training.events",
    "Trainer": "reactor_core.training.trainer",
    "TrainResult": "reactor_core.training.events",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reactor_core.training' has no attribute {name!r}")
