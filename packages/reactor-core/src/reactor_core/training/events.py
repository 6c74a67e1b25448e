"""What a run reports: progress events while it trains, and the result at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from reactor_core.training.state import TrainState


@dataclass(frozen=True)
class TrainEvent:
    """Progress for observers (CLI bar, async consumers)."""

    kind: Literal["step", "eval", "done", "cancelled"]
    step: int
    total_steps: int
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path | None  # the PRIME model directory; None when cancelled
    metrics: dict[str, Any]
    state: TrainState
    cancelled: bool = False


EventCallback = Callable[[TrainEvent], Any]
