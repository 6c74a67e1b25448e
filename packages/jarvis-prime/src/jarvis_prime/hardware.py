"""What this machine can run, found without importing torch where it can be.

`import jarvis_prime` and the llama.cpp backend must not pull torch into the process
(it costs seconds and hundreds of MB), so CUDA is first detected from the driver;
only on a machine with an NVIDIA driver is torch asked whether it can use it (a
CPU-only torch build next to a GPU is common), and only on GPU machines is
llama-cpp-python asked whether it was built with GPU offload.
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
    cuda_usable: bool = False  # driver present and the installed torch can use it


@dataclass(frozen=True)
class Libraries:
    llama_cpp: bool
    transformers: bool  # torch and transformers both installed
    bitsandbytes: bool
    llama_gpu_offload: bool = False  # llama-cpp-python built with Metal/CUDA


def _torch_sees_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine().lower() in ("arm64", "aarch64")


def _nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def detect_hardware() -> Hardware:
    nvidia = _nvidia_driver()
    return Hardware(
        system=platform.system(),
        machine=platform.machine().lower(),
        apple_silicon=_apple_silicon(),
        nvidia_driver=nvidia,
        cuda_usable=nvidia and _torch_sees_cuda(),
    )


def detect_libraries() -> Libraries:
    def installed(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    llama = installed("llama_cpp")
    offload = False
    if llama and (_apple_silicon() or _nvidia_driver()):
        import llama_cpp

        offload = bool(llama_cpp.llama_supports_gpu_offload())
    return Libraries(
        llama_cpp=llama,
        transformers=installed("torch") and installed("transformers"),
        bitsandbytes=installed("bitsandbytes"),
        llama_gpu_offload=offload,
    )

