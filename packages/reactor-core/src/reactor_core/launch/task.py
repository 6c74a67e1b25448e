"""The SkyPilot task `reactor launch` submits as a managed job.

What each part is for:

- `resources`: the cloud, the GPUs, spot or on-demand, and `job_recovery`. SkyPilot
  relaunches a managed job whose VMs were preempted by itself; a job whose program
  *failed* is relaunched only when its exit code is in `recover_on_exit_codes`
  (`sky/jobs/recovery_strategy.py`, `should_restart_on_failure`). `reactor train`
  exits 75 after the checkpoint a SIGTERM or a preemption notice triggers, so 75 is
  listed; `max_restarts_on_errors: 0` keeps every other failure (2: a bad recipe, data
  or checkpoint) final, since running it again would fail again and cost again.
- `file_mounts`: the recipe and its data, staged in the recipe's bucket by
  `bucket.stage_inputs`, copied onto each VM (COPY); the output folder in the same
  bucket, mounted with a local write cache (MOUNT_CACHED) so the finished PRIME
  directory lands in the bucket for `reactor launch` to fetch. Checkpoints do not go
  through a mount: Reactor Core mirrors them to `checkpoint_remote` itself (files
  before their COMPLETE marker, retried), and a recovered job resumes from there.
- `envs`: where the mounts are, the checkpoint bucket, the rendezvous port; the run
  script reads only these and SkyPilot's own variables, so the tests run it on this
  machine with the mounts as plain folders.
- `setup`: installs this machine's reactor-core (every node, every recovery): the wheel
  `source.py` builds and stages with the inputs, or the released version.
- `run`: `RUN_SCRIPT`, the same on every node.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

from reactor_core.gcp.preemption import EXIT_PREEMPTED
from reactor_core.launch.source import vm_requirement

INPUTS_MOUNT = "/reactor/inputs"
OUTPUT_MOUNT = "/reactor/output"
STAGED_RECIPE = "recipe.yaml"
MASTER_PORT = 29500

# SkyPilot sets SKYPILOT_NODE_RANK, SKYPILOT_NUM_NODES, SKYPILOT_NODE_IPS (one per line,
# the head first) and SKYPILOT_NUM_GPUS_PER_NODE on every node. `reactor train` is run
# in the background so that a SIGTERM to this script (SkyPilot cancelling the job)
# reaches it: it checkpoints and exits 75, and the script exits with its code. Only
# the head node (rank 0, which alone writes the PRIME directory) copies it out.
RUN_SCRIPT = """\
set -u
cd "$REACTOR_INPUTS"
work="${REACTOR_WORK:-$HOME/reactor-run}"
rank="${SKYPILOT_NODE_RANK:-0}"
gpus="${SKYPILOT_NUM_GPUS_PER_NODE:-0}"
head_ip="$(printf '%s\\n' "${SKYPILOT_NODE_IPS:-127.0.0.1}" | head -n 1)"
reactor train recipe.yaml "output_dir=$work" "checkpoint_remote=$REACTOR_CHECKPOINTS" \\
  --nproc "$(( gpus > 0 ? gpus : 1 ))" --nnodes "${SKYPILOT_NUM_NODES:-1}" --node-rank "$rank" \\
  --master-addr "$head_ip" --master-port "$REACTOR_MASTER_PORT" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"; code=$?
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; code=$?; done
if [ "$code" -eq 0 ] && [ "$rank" = 0 ]; then
  mkdir -p "$REACTOR_OUTPUT"
  for model in "$work"/*/; do
    if [ -f "$model/prime.json" ]; then cp -r "$model" "$REACTOR_OUTPUT/" && echo "PRIME model: ${model%/}"; fi
  done
fi
exit "$code"
"""


@dataclass(frozen=True)
class Accelerators:
    """`--gpus L4:1`: SkyPilot's accelerator name and the count per node."""

    name: str
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Accelerators:
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]*)(?::([1-9][0-9]*))?", text.strip())
        if match is None:
            raise ValueError(f"--gpus: expected NAME or NAME:COUNT (e.g. L4:1, A100-80GB:8), got {text!r}")
        return cls(match.group(1), int(match.group(2) or 1))

    def __str__(self) -> str:
        return f"{self.name}:{self.count}"


@dataclass(frozen=True)
class LaunchSpec:
    """Where and how the job runs: what `reactor launch`'s options say."""

    name: str
    cloud: str = "gcp"
    gpus: Accelerators | None = Accelerators("L4", 1)
    nodes: int = 1
    spot: bool = True
    region: str | None = None
    install: str = ""  # the pip requirement setup installs (source.vm_requirement: the staged wheel or the release)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name):
            raise ValueError(f"--name must be lowercase letters, digits and '-', starting with a letter, got {self.name!r}")
        if self.nodes < 1:
            raise ValueError(f"--nodes must be at least 1, got {self.nodes}")


@dataclass(frozen=True)
class BucketLayout:
    """Where a launch keeps its files, next to the recipe's checkpoints.

    `checkpoint_remote: gs://b/runs/chat` -> checkpoints in gs://b/runs/chat/step-*/ (as
    `reactor train` has them), the staged recipe and data in .../launch/inputs, the
    finished PRIME directory in .../launch/output. The checkpoint store reads only
    `step-*/COMPLETE` there, so the launch folders never look like checkpoints.
    """

    checkpoints: str

    @property
    def inputs(self) -> str:
        return f"{self.checkpoints.rstrip('/')}/launch/inputs"

    @property
    def output(self) -> str:
        return f"{self.checkpoints.rstrip('/')}/launch/output"


def build_task(spec: LaunchSpec, layout: BucketLayout, version: str) -> dict[str, Any]:
    """The task as SkyPilot's YAML schema has it (`sky.Task.from_yaml_config` parses it)."""
    resources: dict[str, Any] = {
        "infra": spec.cloud if spec.region is None else f"{spec.cloud}/{spec.region}",
        "use_spot": spec.spot,
        "job_recovery": {"max_restarts_on_errors": 0, "recover_on_exit_codes": [EXIT_PREEMPTED]},
    }
    if spec.gpus is not None:
        resources["accelerators"] = str(spec.gpus)
    install = spec.install or vm_requirement(version, INPUTS_MOUNT, source=None)
    return {
        "name": spec.name,
        "resources": resources,
        "num_nodes": spec.nodes,
        "envs": {
            "REACTOR_INPUTS": INPUTS_MOUNT,
            "REACTOR_OUTPUT": OUTPUT_MOUNT,
            "REACTOR_CHECKPOINTS": layout.checkpoints,
            "REACTOR_MASTER_PORT": str(MASTER_PORT),
        },
        "file_mounts": {
            INPUTS_MOUNT: {"source": layout.inputs, "mode": "COPY"},
            OUTPUT_MOUNT: {"source": layout.output, "mode": "MOUNT_CACHED"},
        },
        "setup": f"pip install --upgrade pip && pip install {shlex.quote(install)}\n",
        "run": RUN_SCRIPT,
    }


def task_yaml(task: dict[str, Any]) -> str:
    """The task as YAML, multi-line scripts as literal blocks (readable in --dry-run)."""

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(task, Dumper=Dumper, sort_keys=False, width=120)
