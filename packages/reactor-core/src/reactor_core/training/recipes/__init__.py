"""One recipe per training method, chosen by `config.method`.

    base.py  Recipe: setup, the loop, evaluation, checkpoints and the model directory
    sft.py   SFTRecipe: chat data, assistant-token cross-entropy (+ KL to the base)
    dpo.py   DPORecipe: preference pairs, the DPO/IPO loss against a reference
    grpo.py  GRPORecipe: prompts, sampled groups, verifiable rewards, the clipped GRPO loss

A new method is a `Recipe` subclass in its own module and one line in
`RECIPES`; its name must also be a `method` that `TrainingConfig` accepts.
"""

from __future__ import annotations

import threading

from reactor_core.training.config import TrainingConfig
from reactor_core.training.events import EventCallback
from reactor_core.training.recipes.base import Recipe
from reactor_core.training.recipes.dpo import DPORecipe
from reactor_core.training.recipes.grpo import GRPORecipe
from reactor_core.training.recipes.sft import SFTRecipe

RECIPES: dict[str, type[Recipe]] = {
    "sft": SFTRecipe,
    "dpo": DPORecipe,
    "grpo": GRPORecipe,
}


def build_recipe(
    config: TrainingConfig,
    *,
    on_event: EventCallback | None = None,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> Recipe:
    """The recipe `config.method` names, ready for `setup(data_path)` and `train()`."""
    return RECIPES[config.method](config, on_event=on_event, progress=progress, stop=stop)


__all__ = ["RECIPES", "DPORecipe", "GRPORecipe", "Recipe", "SFTRecipe", "build_recipe"]
