"""What this machine can run, found without importing torch.

`import jarvis_prime` and the llama.cpp backend must not pull torch into the process
(it costs seconds and hundreds of MB), so CUDA is detected from the driver, and each
optional library only by whether it is installed.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Hardware:
    system: str
    machine: str
    apple_silicon: bool
    nvidia_driver: bool


@dataclass(frozen=True)
class Libraries:
    llama_cpp: bool
    transformers: bool  # torch and transformers both installed
    bitsandbytes: bool


def detect_hardware() -> Hardware:
    system, machine = platform.system(), platform.machine().lower()
    return Hardware(
        system=system,
        machine=machine,
        apple_silicon=sys.platform == "darwin" and machine in ("arm64", "aarch64"),
        nvidia_driver=Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None,
    )


def detect_libraries() -> Libraries:
    def installed(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    return Libraries(
        llama_cpp=installed("llama_cpp"),
        transformers=installed("torch") and installed("transformers"),
        bitsandbytes=installed("bitsandbytes"),
    )
