"""Choosing a runtime: which backend, device and weight file serve a request, and why.

A pure function of the model's manifest, the hardware and the installed libraries, so
every cell of the quantization matrix is testable on one machine. A combination that
cannot work is a `BackendUnavailableError` that says what would; nothing falls back
silently to something the user did not ask for.

Memory is part of the choice (`memory.py`): `quantization=None` takes the most precise
of as-shipped, 8bit, 4bit that fits the memory free now, and says which and why; a
request that cannot fit the machine is an `InsufficientMemoryError` before anything
loads, and one that will swap carries a "slow" verdict the loader warns about.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from jarvis_prime.errors import BackendUnavailableError, InsufficientMemoryError
from jarvis_prime.gguf_names import TESTED_ARCHITECTURES, VISION_ARCHITECTURES, gguf_filename
from jarvis_prime.hardware import Hardware, Libraries
from jarvis_prime.manifest import PrimeManifest, matching_gguf, projector_for
from jarvis_prime.models.memory import MemoryFit, estimate, gb, judge

Quantization = Literal["8bit", "4bit"] | None
Device = Literal["auto", "cpu", "cuda", "mps"]
BackendName = Literal["auto", "llamacpp", "transformers"]

QUANTIZATIONS = (None, "8bit", "4bit")
DEVICES = ("auto", "cpu", "cuda", "mps")
BACKENDS = ("auto", "llamacpp", "transformers")
# What llama.cpp serves for each request, exported from safetensors on first use.
GGUF_FOR = {"8bit": "q8_0", "4bit": "q4_k_m"}
DEFAULT_CONTEXT_CAP = 4096  # KV cache memory grows with it; long-context models opt in


@dataclass(frozen=True)
class Runtime:
    """What `from_pretrained` decided: the weights to load, where, and the reason."""

    backend: Literal["llamacpp", "transformers"]
    device: Literal["cpu", "cuda", "mps"]
    quantization: Quantization
    weights: str  # path relative to the model directory
    weights_format: Literal["gguf", "safetensors"]
    reason: str
    export: str | None = None  # a GGUF quantization to export before loading (first use)
    mmproj: str | None = None  # llama.cpp on a vision model: the projector GGUF that encodes images
    memory: MemoryFit | None = None  # what it needs against what the device has; None: size unknown

    def describe(self) -> str:
        asked = self.quantization or "no extra quantization"
        memory = f"; memory: {self.memory.describe()}" if self.memory is not None else ""
        return f"{self.backend} on {self.device}, {self.weights} ({asked}): {self.reason}{memory}"


def _validate(quantization: object, device: object, backend: object) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"`quantization` must be one of None, '8bit', '4bit'; got {quantization!r}")
    if device not in DEVICES:
        raise ValueError(f"`device` must be one of {DEVICES}; got {device!r}")
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}")


def _pick_device(device: Device, hw: Hardware) -> Literal["cpu", "cuda", "mps"]:
    if device == "auto":  # a GPU only when something installed here can drive it
        return "cuda" if hw.cuda_usable else "mps" if hw.apple_silicon else "cpu"
    if device == "cuda" and not hw.nvidia_driver:
        raise BackendUnavailableError("device='cuda' but no NVIDIA driver was found on this machine")
    if device == "mps" and not hw.apple_silicon:
        raise BackendUnavailableError("device='mps' needs Apple Silicon")
    return device


def exportable(manifest: PrimeManifest) -> bool:
    """Whether `prime export` can write GGUF files for this model (see `jarvis_prime.export`)."""
    return (manifest.architecture in TESTED_ARCHITECTURES + VISION_ARCHITECTURES
            and _safetensors(manifest) is not None)


def gguf_choice(manifest: PrimeManifest, quantization: Quantization) -> tuple[str, str | None] | None:
    """(GGUF file, quantization to export first or None) serving `quantization`; None if none can.

    "8bit" is q8_0 and "4bit" q4_k_m, exported from the safetensors when missing; a
    model with no safetensors falls back to any GGUF of the same bits.
    """
    want = GGUF_FOR.get(quantization)
    if want and want not in manifest.quantizations and exportable(manifest):
        return gguf_filename(manifest.name, want), want
    name = matching_gguf(manifest, quantization)
    return (manifest.quantizations[name].file, None) if name is not None else None


def _safetensors(manifest: PrimeManifest) -> str | None:
    return next((q.file for q in manifest.quantizations.values() if q.format == "safetensors"), None)


def _llamacpp(manifest: PrimeManifest, quantization: Quantization, device, libs: Libraries, reason: str) -> Runtime:
    if not libs.llama_cpp:
        raise BackendUnavailableError("backend 'llamacpp' needs llama-cpp-python: pip install llama-cpp-python")
    choice = gguf_choice(manifest, quantization)
    if choice is None:
        have = ", ".join(n for n, q in manifest.quantizations.items() if q.format == "gguf") or "none"
        want = f"{quantization} GGUF" if quantization else "GGUF file"
        raise BackendUnavailableError(
            f"{manifest.name} has no {want} for llama.cpp (GGUF files: {have}); "
            f"export one with `prime export` or use backend='transformers'"
        )
    weights, export = choice
    if export:
        reason += f"; {export} is exported from the safetensors on first use"
    return Runtime("llamacpp", device, quantization, weights, "gguf", reason, export=export,
                   mmproj=projector_for(manifest, weights))


def _transformers(manifest: PrimeManifest, quantization: Quantization, device, libs: Libraries, reason: str) -> Runtime:
    if not libs.transformers:
        raise BackendUnavailableError(
            "backend 'transformers' needs torch and transformers: pip install 'jarvis-prime[transformers]'"
        )
    weights = _safetensors(manifest)
    if weights is None:
        raise BackendUnavailableError(
            f"{manifest.name} has no safetensors weights for transformers; re-pull it with transformers installed"
        )
    if quantization is not None:
        if device == "mps":
            raise BackendUnavailableError(
                f"bitsandbytes {quantization} does not run on Apple MPS; use backend='llamacpp' (GGUF with Metal)"
            )
        if not libs.bitsandbytes:
            raise BackendUnavailableError(
                f"{quantization} with transformers needs bitsandbytes: pip install 'jarvis-prime[bitsandbytes]'"
            )
    return Runtime("transformers", device, quantization, weights, "safetensors", reason)


def plan_runtime(
    manifest: PrimeManifest,
    *,
    quantization: Quantization = None,
    device: Device = "auto",
    backend: BackendName = "auto",
    hardware: Hardware,
    libraries: Libraries,
    model_config: Mapping[str, Any] | None = None,
    n_ctx: int | None = None,
) -> Runtime:
    """Decide backend, device and weight file for `manifest`; explain the choice.

    auto: CUDA -> transformers (+ bitsandbytes for 8/4-bit); CPU and Apple Silicon ->
    llama.cpp on a GGUF matching `quantization` (q8_0 for 8bit, q4_k_m for 4bit,
    exported on first use when the model can be), otherwise transformers.

    Memory: the runtime's need (weights, the KV cache of `n_ctx` tokens from
    `model_config`, the model's config.json) is judged against `hardware`'s memory.
    `quantization=None` picks the most precise of as shipped, "8bit", "4bit" that fits
    what is free (the reason says which and why); nothing fitting free memory, the
    smallest that fits the machine ("slow": swapping); nothing at all, or an explicit
    request larger than the machine: `InsufficientMemoryError`, with the numbers.
    """
    _validate(quantization, device, backend)
    dev = _pick_device(device, hardware)
    n_ctx = n_ctx or min(manifest.context_length, DEFAULT_CONTEXT_CAP)

    def fitted(quant: Quantization) -> Runtime:
        runtime = _plan(manifest, quant, dev, backend, libraries)
        need = estimate(manifest, backend=runtime.backend, device=runtime.device, quantization=runtime.quantization,
                        weights=runtime.weights, export=runtime.export, config=model_config, n_ctx=n_ctx)
        return replace(runtime, memory=None if need is None else judge(need, hardware, runtime.device))

    if quantization is not None:
        runtime = fitted(quantization)
        if runtime.memory is not None and runtime.memory.verdict == "too_big":
            raise InsufficientMemoryError(f"{manifest.name} will not fit at {quantization}: "
                                          f"{runtime.memory.describe()}")
        return runtime
    return _pick_quantization(manifest, fitted)


def _pick_quantization(manifest: PrimeManifest, fitted: Callable[[Quantization], Runtime]) -> Runtime:
    """quantization=None: as shipped if it fits the free memory, else 8bit, else 4bit."""
    shipped = fitted(None)  # what None always meant; a model this cannot plan is an error as before
    if shipped.memory is None or shipped.memory.verdict in ("fits", "unknown"):
        return shipped
    tried = [shipped]
    for quant in ("8bit", "4bit"):
        try:
            runtime = fitted(quant)
        except BackendUnavailableError:  # e.g. no bitsandbytes for transformers: not an option here
            continue
        if runtime.memory is None:
            continue
        if runtime.memory.verdict == "fits":
            return replace(runtime, reason=f"{runtime.reason}; quantization=None picked {quant}: as shipped "
                                           f"({shipped.weights}) it {shipped.memory.describe()}")
        tried.append(runtime)
    smallest = min(tried, key=lambda r: r.memory.need.total)  # as shipped first on a tie: nothing to export
    needs = ", ".join(f"{r.quantization or 'as shipped'} {gb(r.memory.need.total)}" for r in tried)
    if smallest.memory.verdict == "slow":
        return replace(smallest, reason=f"{smallest.reason}; quantization=None picked "
                                        f"{smallest.quantization or 'as shipped'}, the smallest: nothing fits the "
                                        f"free memory (needs: {needs})")
    raise InsufficientMemoryError(f"{manifest.name} fits no quantization here: needs {needs}; "
                                  f"{smallest.memory.describe()}")


def _plan(manifest: PrimeManifest, quantization: Quantization, dev, backend: BackendName,
          libraries: Libraries) -> Runtime:
    if backend == "llamacpp":
        return _llamacpp(manifest, quantization, dev, libraries, "backend='llamacpp' requested")
    if backend == "transformers":
        return _transformers(manifest, quantization, dev, libraries, "backend='transformers' requested")

    if dev == "cuda" and libraries.transformers:
        return _transformers(manifest, quantization, dev, libraries, "CUDA GPU: transformers (+ bitsandbytes)")
    if libraries.llama_cpp and gguf_choice(manifest, quantization) is not None:
        if dev != "cpu" and not libraries.llama_gpu_offload:
            return _llamacpp(manifest, quantization, "cpu", libraries,
                             "llama.cpp on a matching GGUF, on the CPU: this llama-cpp-python has no GPU offload")
        where = "Apple Silicon (Metal)" if dev == "mps" else dev.upper()
        return _llamacpp(manifest, quantization, dev, libraries, f"{where}: llama.cpp on a matching GGUF")
    reason = f"no {quantization or 'unquantized'} GGUF in the model (or no llama-cpp-python); using safetensors"
    return _transformers(manifest, quantization, dev, libraries, reason)
