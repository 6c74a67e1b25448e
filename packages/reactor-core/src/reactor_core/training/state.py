"""The training loop's position, kept explicit so a checkpoint can restore it exactly.

Everything that decides "which sample comes next, with which random numbers" lives
here: the step counters, the epoch's shuffled order and how far into it the loop has
got, and the RNG states. Saving this plus the weights and optimizer is a full resume.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


class EpochSampler:
    """A seeded permutation per epoch, consumed from an explicit position.

    The order of epoch e depends only on (seed, e), so a resumed run that restores
    (epoch, position) sees exactly the items an uninterrupted run would have seen.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True) -> None:
        if num_items < 1:
            raise ValueError("no training items")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=generator).tolist()

    def take(self, epoch: int, position: int, count: int) -> list[int]:
        """Up to `count` item indices of `epoch` from `position` on."""
        return self.order(epoch)[position:position + count]


@dataclass
class TrainState:
    """Where the loop is. `micro_step` counts micro-batches; `step` optimizer steps."""

    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    position: int = 0  # items of the current epoch already consumed
    tokens_seen: int = 0
    train_seconds: float = 0.0  # time in optimizer steps, across resumes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        return cls(**data)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state_tensors() -> dict[str, Any]:
    """RNG states as tensors and numbers only, so they load with torch.load(weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_tensors(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) != torch.cuda.device_count():
            raise RuntimeError(f"checkpoint has RNG states for {len(cuda)} GPUs, this machine has "
                               f"{torch.cuda.device_count()}: an exact resume needs the same GPU count")
        torch.cuda.set_rng_state_all(cuda)
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
