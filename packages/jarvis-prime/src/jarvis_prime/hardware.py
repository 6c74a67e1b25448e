"""What this machine can run, found without importing torch where it can be.

`import jarvis_prime` and the llama.cpp backend must not pull torch into the process
(it costs seconds and hundreds of MB), so CUDA is first detected from the driver;
only on a machine with an NVIDIA driver is torch asked whether it can use it (a
CPU-only torch build next to a GPU is common), and only on GPU machines is
llama-cpp-python asked whether it was built with GPU offload.

Memory is read too (psutil: RAM, which on Apple Silicon is the unified memory the GPU
shares; torch for a CUDA GPU's), so a model that will not fit is refused before it
loads (`models/memory.py`). Tests pass simulated profiles: a 16 GB M1, a CPU box, a GPU.
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
    memory_total: int | None = None  # bytes of RAM (unified memory on Apple Silicon); None: unknown
    memory_available: int | None = None  # bytes a new process can take without swapping others out
    gpu_memory_total: int | None = None  # CUDA: bytes on the GPU torch sees first
    gpu_memory_available: int | None = None


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


def _cuda_memory() -> tuple[int | None, int | None]:
    """(total, free) bytes of the first CUDA GPU; called only once torch sees one."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return total, free


def _memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of RAM; (None, None) without psutil."""
    if importlib.util.find_spec("psutil") is None:
        return None, None
    import psutil

    memory = psutil.virtual_memory()
    return memory.total, memory.available


def _apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine().lower() in ("arm64", "aarch64")


def _nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name ("AMD EPYC 9B14", "Apple M1"), which benchmark tables carry:
    speeds here are only comparable on the same CPU, and `platform.processor()` says just
    "x86_64" on Linux."""
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and value.strip():
                return value.strip()
    if platform.system() == "Darwin" and shutil.which("sysctl"):
        import subprocess

        brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if brand.returncode == 0 and brand.stdout.strip():
            return brand.stdout.strip()
    return platform.processor() or platform.machine()


def detect_hardware() -> Hardware:
    nvidia = _nvidia_driver()
    cuda = nvidia and _torch_sees_cuda()
    total, available = _memory()
    gpu_total, gpu_free = _cuda_memory() if cuda else (None, None)
    return Hardware(
        system=platform.system(),
        machine=platform.machine().lower(),
        apple_silicon=_apple_silicon(),
        nvidia_driver=nvidia,
        cuda_usable=cuda,
        memory_total=total,
        memory_available=available,
        gpu_memory_total=gpu_total,
        gpu_memory_available=gpu_free,
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

