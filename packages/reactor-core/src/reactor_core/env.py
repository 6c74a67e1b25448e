"""Detect the machine Reactor Core runs on and recommend a training profile.

`detect_environment()` answers "what is this box?" (OS, CPUs, RAM, Apple Silicon/MPS,
CUDA GPUs, GCP VM and whether it is spot) and `recommend_profile()` turns that into the
few settings the training code reads: which device, how much of the model may be
trained, and whether to checkpoint on a clock and resume automatically.

Every probe is a plain callable collected in `Probes`, so tests inject fakes instead of
patching modules, and `torch` is imported only inside the CUDA and MPS probes: asking
about the environment must stay cheap and must work where torch is broken or absent.

Memory is reported in decimal gigabytes (10^9 bytes). Vendors size memory in GiB but
the OS and the driver keep some of it back, so a "24 GB" GPU shows 22.5-23.7 GiB and a
"32 GB" VM about 30.5 GiB; in decimal GB both land at or just above their nominal size,
which is what the thresholds below are written in.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from reactor_core.gcp.metadata import GcpInfo, MetadataClient, MetadataGetter, detect_gcp
from reactor_core.gcp.spot import SPOT_CHECKPOINT_EVERY_MINUTES

GB = 1_000_000_000

# --------------------------------------------------------------------------------------
# What we detect
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as torch sees it."""

    name: str
    memory_gb: float


@dataclass(frozen=True)
class PlatformInfo:
    """What the interpreter knows without asking any device library."""

    os: str
    arch: str
    python: str
    cpu_count: int


@dataclass(frozen=True)
class Environment:
    """A snapshot of the machine, serialisable with `to_dict()`."""

    os: str
    arch: str
    python: str
    torch_version: str | None
    cpu_count: int
    ram_gb: float | None
    apple_silicon: bool
    mps_available: bool
    cuda_gpus: tuple[GpuInfo, ...]
    gcp: GcpInfo

    @property
    def total_gpu_memory_gb(self) -> float:
        return sum(gpu.memory_gb for gpu in self.cuda_gpus)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Local probes
# --------------------------------------------------------------------------------------


def probe_platform() -> PlatformInfo:
    # The CPUs this process may run on, not the host's: containers and taskset pin us.
    if hasattr(os, "sched_getaffinity"):
        cpu_count = len(os.sched_getaffinity(0))
    else:
        cpu_count = os.cpu_count() or 1
    return PlatformInfo(
        os=platform.system(),
        arch=platform.machine(),
        python=platform.python_version(),
        cpu_count=cpu_count,
    )


def probe_torch_version() -> str | None:
    """Read torch's version from its installed metadata, without importing it."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_ram_bytes() -> int | None:
    """Physical memory available to this process, or None when we cannot tell."""
    if sys.platform.startswith("linux"):
        ram = _linux_ram_bytes()
    elif sys.platform == "darwin":
        ram = _macos_ram_bytes()
    else:
        ram = None
    return ram if ram is not None else _sysconf_ram_bytes()


def _linux_ram_bytes(
    meminfo: Path = Path("/proc/meminfo"),
    cgroup_limits: tuple[Path, ...] = (
        Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
        Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
    ),
) -> int | None:
    """MemTotal, lowered to the container's memory limit when there is one.

    A training run inside a container with an 8 GB limit is OOM-killed at 8 GB however
    large the host is, so the limit is the number that matters.
    """
    total = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024  # reported in kB
                break
    except (OSError, ValueError, IndexError):
        return None
    if total is None:
        return None
    for path in cgroup_limits:
        try:
            limit = int(path.read_text().strip())  # "max" (no limit) raises ValueError
        except (OSError, ValueError):
            continue
        total = min(total, limit)  # v1 reports "no limit" as a huge number
    return total


def _macos_ram_bytes() -> int | None:
    try:
        out = subprocess.run(
            ["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5, check=True
        )
        return int(out.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _sysconf_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def probe_cuda_gpus() -> tuple[GpuInfo, ...]:
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    return tuple(
        GpuInfo(name=props.name, memory_gb=round(props.total_memory / GB, 1))
        for props in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))
    )


def probe_mps_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


@dataclass
class Probes:
    """The questions `detect_environment` asks, each replaceable by a fake in tests."""

    platform: Callable[[], PlatformInfo] = probe_platform
    ram_bytes: Callable[[], int | None] = probe_ram_bytes
    torch_version: Callable[[], str | None] = probe_torch_version
    cuda_gpus: Callable[[], tuple[GpuInfo, ...]] = probe_cuda_gpus
    mps_available: Callable[[], bool] = probe_mps_available
    # Built when Probes is, so `GCE_METADATA_HOST` is read then, not at import.
    metadata_get: MetadataGetter = field(default_factory=lambda: MetadataClient.from_env().get)


def detect_environment(probes: Probes | None = None) -> Environment:
    probes = probes or Probes()
    plat = probes.platform()
    ram = probes.ram_bytes()
    return Environment(
        os=plat.os,
        arch=plat.arch,
        python=plat.python,
        torch_version=probes.torch_version(),
        cpu_count=plat.cpu_count,
        ram_gb=round(ram / GB, 1) if ram is not None else None,
        apple_silicon=plat.os == "Darwin" and plat.arch == "arm64",
        mps_available=probes.mps_available(),
        cuda_gpus=tuple(probes.cuda_gpus()),
        gcp=detect_gcp(probes.metadata_get),
    )


# --------------------------------------------------------------------------------------
# What we recommend
# --------------------------------------------------------------------------------------

Device = Literal["cuda", "mps", "cpu"]
Trainable = Literal["inference", "lora", "full"]

FULL_TRAINING_GPU_GB = 24.0
APPLE_SILICON_LORA_RAM_GB = 16.0
GCP_FULL_TRAINING_RAM_GB = 32.0


@dataclass(frozen=True)
class Profile:
    """Defaults the training code starts from on this machine.

    Attributes:
        name: short identifier shown by `reactor env`, e.g. "cuda-full" or "gcp-full-spot".
        reason: one line saying which facts about the machine led here.
        device: where tensors go by default.
        max_trainable: the most this machine should attempt: "inference" (no training),
            "lora" (adapters only, QLoRA for bigger bases) or "full" (all weights).
        auto_resume: resume from the newest checkpoint when a run starts again; on for
            spot VMs, which are reclaimed and restarted under us.
        checkpoint_every_minutes: also checkpoint on a wall-clock timer, so a preempted
            run loses at most this much work; None means step-based checkpoints only.
    """

    name: str
    reason: str
    device: Device
    max_trainable: Trainable
    auto_resume: bool = False
    checkpoint_every_minutes: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def recommend_profile(env: Environment) -> Profile:
    """Pick the training profile for `env`. The first matching rule sets the base:

    1. CUDA GPU(s): full training when their total memory is >= 24 GB, else LoRA
       (QLoRA for larger bases). GPU memory, not RAM, bounds training, so this rule
       wins on a GCP VM with GPUs too.
    2. Apple Silicon: inference + small LoRA with >= 16 GB unified memory, inference
       only below.
    3. GCP VM with >= 32 GB RAM: full training (on CPU).
    4. Anything else: CPU, LoRA on small models.

    Then, on top of any base: a spot/preemptible GCP VM turns on auto-resume and a
    checkpoint every 5 minutes, and gets "-spot" appended to the name.
    """
    ram_gb = env.ram_gb or 0.0
    gpu_gb = env.total_gpu_memory_gb

    if env.cuda_gpus:
        gpus = f"{len(env.cuda_gpus)} CUDA GPU(s) with {gpu_gb:.0f} GB"
        if gpu_gb >= FULL_TRAINING_GPU_GB:
            profile = Profile(
                name="cuda-full",
                reason=f"{gpus}: full fine-tuning fits",
                device="cuda",
                max_trainable="full",
            )
        else:
            profile = Profile(
                name="cuda-lora",
                reason=f"{gpus} (< {FULL_TRAINING_GPU_GB:.0f} GB): LoRA, QLoRA for larger models",
                device="cuda",
                max_trainable="lora",
            )
    elif env.apple_silicon:
        device: Device = "mps" if env.mps_available else "cpu"
        if ram_gb >= APPLE_SILICON_LORA_RAM_GB:
            profile = Profile(
                name="apple-silicon-lora",
                reason=f"Apple Silicon with {ram_gb:.0f} GB unified memory: inference + small LoRA",
                device=device,
                max_trainable="lora",
            )
        else:
            profile = Profile(
                name="apple-silicon-inference",
                reason=(
                    f"Apple Silicon with {ram_gb:.0f} GB unified memory "
                    f"(< {APPLE_SILICON_LORA_RAM_GB:.0f} GB): inference only"
                ),
                device=device,
                max_trainable="inference",
            )
    elif env.gcp.on_gcp and ram_gb >= GCP_FULL_TRAINING_RAM_GB:
        profile = Profile(
            name="gcp-full",
            reason=f"GCP VM {env.gcp.machine_type} with {ram_gb:.0f} GB RAM: full training",
            device="cpu",
            max_trainable="full",
        )
    else:
        profile = Profile(
            name="cpu-lora",
            reason=f"CPU only, {ram_gb:.0f} GB RAM: LoRA on small models",
            device="cpu",
            max_trainable="lora",
        )

    if env.gcp.preemptible:
        profile = dataclasses.replace(
            profile,
            name=f"{profile.name}-spot",
            reason=(
                f"{profile.reason}; spot VM: auto-resume on, "
                f"checkpoint every {SPOT_CHECKPOINT_EVERY_MINUTES:g} min"
            ),
            auto_resume=True,
            checkpoint_every_minutes=SPOT_CHECKPOINT_EVERY_MINUTES,
        )
    return profile
