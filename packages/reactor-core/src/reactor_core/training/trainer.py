"""`Trainer`: the front door the seed's snippet and jarvis-prime use.

    from reactor_core import Trainer, TrainingConfig
    result = Trainer(TrainingConfig(model_name="smollm2-135m-instruct", use_lora=True,
                                    lora_rank=16, num_epochs=3)).train("./data/train.jsonl")
    result.output_dir, result.model_dir, result.metrics

It picks the recipe `config.method` names (`reactor_core.training.recipes`) and runs
it here (`train`) or in a child process (`train_async`). Code that needs the model,
the optimizer or single steps uses the recipe: `trainer.recipe`, or `build_recipe`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from reactor_core.training import background
from reactor_core.training.config import TrainingConfig
from reactor_core.training.events import EventCallback, TrainResult
from reactor_core.training.recipes import Recipe, build_recipe

if TYPE_CHECKING:
    from reactor_core.gcp.spot import SpotVMCheckpointer


class Trainer:
    def __init__(
        self,
        config: TrainingConfig,
        checkpointer: SpotVMCheckpointer | None = None,
        *,
        on_event: EventCallback | None = None,
        progress: bool = True,
    ) -> None:
        if checkpointer is not None:  # the seed's API: a bundle of checkpoint settings
            config = TrainingConfig.model_validate({**config.to_dict(), **checkpointer.overrides()})
        self.config = config
        self.recipe: Recipe = build_recipe(config, on_event=on_event, progress=progress)

    def train(self, data_path: str | Path | None = None) -> TrainResult:
        """Validate all data, train, evaluate, and write the PRIME model directory.

        Nothing is written to `output_dir` until the data and model have loaded.
        """
        self.recipe.setup(data_path)
        return self.recipe.train()

    async def train_async(self, data_path: str | Path | None = None, on_event: EventCallback | None = None) -> TrainResult:
        """`train()` in a child process; `on_event` (sync or async) runs on the event loop.

        `cancel()` reaches the child and stops it at a step boundary or eval batch; cancelling the
        awaiting task does the same. See `reactor_core.training.background`.
        """
        stop = background.shared_event()
        if self.recipe.stop.is_set():
            stop.set()
        self.recipe.stop = stop  # what `cancel()` sets from now on
        result = await background.run_in_child(self.config, data_path, on_event, stop)
        self.recipe.state = result.state
        return result

    def cancel(self) -> None:
        """Stop at the next step boundary or eval batch (thread-safe); `train` returns cancelled=True."""
        self.recipe.cancel()
