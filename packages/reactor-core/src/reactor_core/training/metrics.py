"""Metrics to `metrics.jsonl` (one object a line) and TensorBoard event files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """`enabled=False` (ranks other than 0 of a distributed run) writes nothing."""

    def __init__(self, log_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(log_dir / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional; the JSONL always exists
            self._tb = None

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "step": step, "split": split, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{split}/{key}", value, step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"time": round(time.time(), 3), "step": step, "split": "samples", tag: text}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
