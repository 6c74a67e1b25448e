"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Factor on the peak LR at optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine to 0


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, kind: str) -> LambdaLR:
    return LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind)
    )
