"""Helpers shared by Reactor Core's test modules (on pytest's `pythonpath`)."""

from __future__ import annotations

import json
from pathlib import Path

from reactor_core import TrainingConfig

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def write_chat_data(path: Path, n: int = 32) -> Path:
    """Small, learnable chat data: a fixed pattern the model can memorize quickly."""
    with open(path, "w") as f:
        for i in range(n):
            color = COLORS[i % len(COLORS)]
            messages = [
                {"role": "system", "content": "You are JARVIS."},
                {"role": "user", "content": f"Name color number {i}."},
                {"role": "assistant", "content": f"Color {i} is {color}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def config_for(model_dir: Path, out: Path, **overrides) -> TrainingConfig:
    values = dict(
        model_name=str(model_dir), output_dir=str(out), use_lora=True, lora_rank=8, lora_alpha=16, lora_dropout=0.0,
        max_steps=12, batch_size=4, learning_rate=3e-3, warmup_steps=2, max_seq_length=128, val_fraction=0.125,
        num_samples=1, sample_max_new_tokens=8, seed=7,
    )
    values.update(overrides)
    return TrainingConfig(**values)
