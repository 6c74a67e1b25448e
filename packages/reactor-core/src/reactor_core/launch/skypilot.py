"""SkyPilot, run from its own virtualenv: found, asked to parse a task, and started.

Why not `import sky`: SkyPilot 0.14 pins click<8.2 while huggingface-hub 1.x and later
need a newer click, so the two cannot share a virtualenv (SkyPilot's docs recommend a
separate one anyway). `reactor launch` runs that environment's Python for what needs
SkyPilot's code (parsing the task with `sky.Task.from_yaml`, the price from its
catalog) and its `sky` CLI for the jobs themselves. The environment is `--sky-python`,
else $REACTOR_SKY_PYTHON, else the `sky` on PATH (its interpreter read off its
first line).

Offline: parsing needs nothing but SkyPilot's code (the task schema is checked,
`resourcez:` is an error naming `resources`). The price needs SkyPilot's catalog of
instance prices, which it downloads on first use (then refreshes every few hours):
without the network and without a cached catalog the price is reported as unknown,
with the reason, and the rest of the dry run still stands.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SKY_PYTHON_ENV = "REACTOR_SKY_PYTHON"
INSTALL_HINT = (
    "SkyPilot is not installed. It needs its own virtualenv (its click<8.2 pin clashes with huggingface-hub's):\n"
    "  python3 -m venv ~/.venv-sky && ~/.venv-sky/bin/pip install 'skypilot[gcp]' && ~/.venv-sky/bin/sky check gcp\n"
    f"then pass --sky-python ~/.venv-sky/bin/python (or set {SKY_PYTHON_ENV})."
)
MARK = "REACTOR-SKY "

# Runs in SkyPilot's Python: parse the task as `sky jobs launch` would, report what it
# holds, and (with --price) SkyPilot's own hourly price for its cheapest instance.
_PARSE = r'''
import json, sys
import sky

task = sky.Task.from_yaml(sys.argv[1])
(res,) = list(task.resources)
cloud = str(res.cloud).lower() if res.cloud is not None else None
out = {
    "name": task.name, "num_nodes": task.num_nodes, "cloud": cloud, "region": res.region, "use_spot": res.use_spot,
    "accelerators": res.accelerators, "job_recovery": res.job_recovery, "envs": dict(task.envs),
    "file_mounts": {path: {"source": s.source, "mode": s.mode.value} for path, s in task.storage_mounts.items()},
    "setup": task.setup, "run": task.run,
}
if "--price" in sys.argv and not res.accelerators:
    out["price_error"] = "no GPU asked for (--gpus none): SkyPilot picks the CPU instance at launch"
elif "--price" in sys.argv:
    try:
        from sky import catalog
        (acc, count), = res.accelerators.items()
        types, _ = catalog.get_instance_type_for_accelerator(acc, count, use_spot=res.use_spot, region=res.region,
                                                             clouds=cloud)
        if not types:
            raise ValueError(f"no {cloud} instance type offers {acc}:{count}" + (" as spot" if res.use_spot else ""))
        hourly = res.copy(instance_type=types[0]).get_cost(3600)  # as SkyPilot's optimizer prices it
        out["price"] = {"instance_type": types[0], "hourly_per_node": hourly, "hourly": hourly * task.num_nodes}
    except Exception as err:  # offline without a cached catalog, mostly: said, not fatal
        out["price_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
print("REACTOR-SKY " + json.dumps(out, default=str))
'''


class SkyPilotError(RuntimeError):
    """SkyPilot is missing, or refused the task."""


@dataclass(frozen=True)
class SkyPilot:
    """SkyPilot's virtualenv: its interpreter and its `sky` CLI."""

    python: Path
    sky: Path

    def parse(self, task_yaml: str, price: bool = False, timeout_s: float = 120) -> dict[str, Any]:
        """The task as SkyPilot's own loader reads it; SkyPilotError with its message if invalid."""
        with tempfile.TemporaryDirectory(prefix="reactor-sky-") as tmp:
            path = Path(tmp) / "task.yaml"
            path.write_text(task_yaml, encoding="utf-8")
            run = subprocess.run([str(self.python), "-c", _PARSE, str(path), *(["--price"] if price else [])],
                                 capture_output=True, text=True, timeout=timeout_s)
        for line in run.stdout.splitlines():
            if line.startswith(MARK) and run.returncode == 0:
                return json.loads(line[len(MARK):])
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no output")
        raise SkyPilotError(f"SkyPilot ({self.python}) refused the task: {reason}")

    def command(self, *args: str) -> list[str]:
        return [str(self.sky), *args]


def find_skypilot(sky_python: str | None = None) -> SkyPilot:
    """`sky_python`, else $REACTOR_SKY_PYTHON, else `sky` on PATH; SkyPilotError saying how to install."""
    given = sky_python or os.environ.get(SKY_PYTHON_ENV)
    if given:
        python = Path(given).expanduser()
        sky = python.parent / "sky"
        if not python.is_file():
            raise SkyPilotError(f"{python}: no such Python. {INSTALL_HINT}")
        if not sky.is_file():
            raise SkyPilotError(f"{python}: no `sky` beside it, so SkyPilot is not installed there. {INSTALL_HINT}")
        return SkyPilot(python, sky)
    found = shutil.which("sky")
    if found is None:
        raise SkyPilotError(INSTALL_HINT)
    sky = Path(found)
    first = sky.read_bytes()[:512].split(b"\n", 1)[0].decode(errors="replace")
    if not first.startswith("#!"):
        raise SkyPilotError(f"{sky}: cannot tell its Python (no #! line); pass --sky-python")
    return SkyPilot(Path(first[2:].strip().split()[0]), sky)


def jobs_command(sky: SkyPilot, action: str, args: list[str]) -> list[str]:
    """`reactor launch status|logs|cancel ARGS` as SkyPilot's managed-jobs command."""
    verbs = {"status": ["jobs", "queue"], "logs": ["jobs", "logs"], "cancel": ["jobs", "cancel"]}
    return sky.command(*verbs[action], *args)


# Passed to the VMs as SkyPilot secrets (`--secret KEY` reads this machine's value and
# keeps it out of the task YAML and SkyPilot's logs) when set here: a gated base needs it.
SECRETS = ("HF_TOKEN",)


def launch_command(sky: SkyPilot, task_file: str, name: str, detach: bool = False) -> list[str]:
    """`sky jobs launch`: submitted as a managed job (recovered after preemption), logs streamed."""
    secrets = [arg for key in SECRETS if os.environ.get(key) for arg in ("--secret", key)]
    return sky.command("jobs", "launch", task_file, "--name", name, "--yes", *secrets,
                       *(["--detach-run"] if detach else []))
