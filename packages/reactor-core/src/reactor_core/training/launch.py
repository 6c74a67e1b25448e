"""`reactor train --nproc N`: start torchrun, pass signals on, return the run's exit code.

torchrun reports a worker that exited 75 (preempted, checkpoint written) as a plain
failure (exit code 1), which a supervisor cannot tell from a crash. So rank 0 writes
its own exit code to `REACTOR_EXIT_CODE_FILE`, and the launcher returns that code:
75 still means "checkpointed, restart me" with many processes.

On SIGTERM or SIGINT the launcher passes the signal to torchrun, which passes it to
every worker (then waits up to 30 s, the GCP grace period, before SIGKILL); each
worker finishes its step, they checkpoint together and exit 75.

Several machines: each runs the same command with its own `--node-rank`, all naming
the first machine's address (`Nodes`); torchrun's static rendezvous joins them there.
This is what `reactor launch --nodes N` runs on each SkyPilot node:

    reactor train recipe.yaml --nproc 1 --nnodes 2 --node-rank 0 --master-addr 10.0.0.2

Each machine's rank with LOCAL_RANK 0 writes the exit code file there, so every
machine's launcher returns 75 on a preemption (rank 0 alone lives on the first).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

EXIT_CODE_FILE = "REACTOR_EXIT_CODE_FILE"


@dataclass(frozen=True)
class Nodes:
    """The machines of a run: how many, which one this is, and where the first listens."""

    count: int = 1
    rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.count:
            raise ValueError(f"--node-rank must be in [0, {self.count}), got {self.rank}")


def torchrun_command(recipe: str, overrides: list[str], nproc: int, nodes: Nodes = Nodes()) -> list[str]:
    if nodes.count == 1:
        where = ["--standalone"]
    else:
        where = [f"--nnodes={nodes.count}", f"--node_rank={nodes.rank}", f"--master_addr={nodes.master_addr}",
                 f"--master_port={nodes.master_port}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}",
            "-m", "reactor_core.train", recipe, *overrides]


def launch_torchrun(recipe: str, overrides: list[str], nproc: int, nodes: Nodes = Nodes()) -> int:
    with tempfile.TemporaryDirectory(prefix="reactor-launch-") as tmp:
        exit_file = Path(tmp) / "exit-code"
        env = {**os.environ, EXIT_CODE_FILE: str(exit_file)}
        child = subprocess.Popen(torchrun_command(recipe, overrides, nproc, nodes), env=env)

        def forward(signum: int, _frame: object) -> None:
            child.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            returncode = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if exit_file.is_file():
            return int(exit_file.read_text())
        return returncode if returncode >= 0 else 128 - returncode


def report_exit_code(code: int) -> int:
    """Record the exit code of this machine's first rank for its launcher (no-op outside
    `reactor train --nproc`); every rank checkpoints and exits together, so one speaks for all."""
    path = os.environ.get(EXIT_CODE_FILE)
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        Path(path).write_text(str(code))
    return code
