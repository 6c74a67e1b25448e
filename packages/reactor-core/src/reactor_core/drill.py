"""The preemption drill: prove a recipe survives being killed, bitwise.

    reactor drill recipe.yaml --kills 3

1. Train the recipe once, uninterrupted.
2. Train it again, killing the process K times at random moments (SIGTERM and SIGKILL
   mixed, seeded) and restarting it each time, as a supervisor would.
3. Compare the final trainable weights and the per-step losses of the two runs.

SIGTERM exercises the graceful path (emergency checkpoint, exit 75); SIGKILL the
brutal one (no warning: resume from the last periodic checkpoint, possibly
interrupted mid-save).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass
class DrillReport:
    kills: list[dict] = field(default_factory=list)
    identical_weights: bool = False
    identical_losses: bool = False
    max_abs_weight_diff: float = 0.0
    straight_seconds: float = 0.0
    drilled_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.identical_weights and self.identical_losses


def _command(recipe: Path, output_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "reactor_core.cli", "train", str(recipe), *overrides, f"output_dir={output_dir}"]


def _losses(output_dir: Path) -> dict[int, float]:
    """Last logged loss of each step (steps redone after a SIGKILL log twice, identically)."""
    losses = {}
    for line in (output_dir / "logs/metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            losses[record["step"]] = record["loss"]
    return losses


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    (model_dir,) = [p for p in output_dir.iterdir() if (p / "prime.json").is_file()]
    adapter = model_dir / "adapter" / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else model_dir / "model.safetensors")


def run_drill(recipe: Path, work_dir: Path, kills: int, *, seed: int = 0, checkpoint_every_steps: int = 5,
              overrides: list[str] | None = None, log=print) -> DrillReport:
    if work_dir.exists() and any(work_dir.iterdir()):
        # old checkpoints there would be resumed and make the comparison meaningless
        raise ValueError(f"{work_dir}: not empty; the drill needs a fresh work directory")
    rng = random.Random(seed)
    overrides = [*(overrides or []), f"checkpoint_every_steps={checkpoint_every_steps}", "resume=auto"]
    report = DrillReport()
    straight, drilled = work_dir / "uninterrupted", work_dir / "drilled"

    log(f"uninterrupted run -> {straight}")
    start = time.monotonic()
    subprocess.run(_command(recipe, straight, overrides), check=True, capture_output=True, text=True)
    report.straight_seconds = time.monotonic() - start

    start = time.monotonic()
    for i in range(kills):
        sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
        delay = rng.uniform(0.3, 0.9) * report.straight_seconds
        process = subprocess.Popen(_command(recipe, drilled, overrides), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=delay)  # finished before the kill: nothing to interrupt
        except subprocess.TimeoutExpired:
            process.send_signal(sig)
        code = process.wait()
        steps = max(_losses(drilled), default=0) if (drilled / "logs/metrics.jsonl").is_file() else 0
        report.kills.append({"kill": i + 1, "signal": sig.name, "after_s": round(delay, 2), "exit_code": code,
                             "last_logged_step": steps})
        log(f"kill {i + 1}/{kills}: {sig.name} after {delay:.1f}s -> exit {code}, logged up to step {steps}")
    subprocess.run(_command(recipe, drilled, overrides), check=True, capture_output=True, text=True)
    report.drilled_seconds = time.monotonic() - start

    a, b = _final_weights(straight), _final_weights(drilled)
    report.identical_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report.max_abs_weight_diff = max(((a[k].float() - b[k].float()).abs().max().item() for k in a if k in b), default=0.0)
    report.identical_losses = _losses(straight) == _losses(drilled)
    return report
