"""`reactor train --nproc N`: start torchrun, pass signals on, return the run's exit code.

torchrun reports a worker that exited 75 (preempted, checkpoint written) as a plain
failure (exit code 1), which a supervisor cannot tell from a crash. So rank 0 writes
its own exit code to `REACTOR_EXIT_CODE_FILE`, and the launcher returns that code:
75 still means "checkpointed, restart me" with many processes.

On SIGTERM or SIGINT the launcher passes the signal to torchrun, which passes it to
every worker (then waits up to 30 s, the GCP grace period, before SIGKILL); each
worker finishes its step, they checkpoint together and exit 75.

Two machines (each runs the same command; torchrun's c10d rendezvous joins them):

    torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d \\
             --rdzv_endpoint 10.0.0.2:29400 --rdzv_id my-run -m reactor_core.train recipe.yaml
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

EXIT_CODE_FILE = "REACTOR_EXIT_CODE_FILE"


def torchrun_command(recipe: str, overrides: list[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "reactor_core.train", recipe, *overrides]


def launch_torchrun(recipe: str, overrides: list[str], nproc: int) -> int:
    with tempfile.TemporaryDirectory(prefix="reactor-launch-") as tmp:
        exit_file = Path(tmp) / "exit-code"
        env = {**os.environ, EXIT_CODE_FILE: str(exit_file)}
        child = subprocess.Popen(torchrun_command(recipe, overrides, nproc), env=env)

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
    """Record rank 0's exit code for the launcher (no-op outside `reactor train --nproc`)."""
    path = os.environ.get(EXIT_CODE_FILE)
    if path and os.environ.get("RANK", "0") == "0":
        Path(path).write_text(str(code))
    return code
