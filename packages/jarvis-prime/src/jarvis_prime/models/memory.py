"""Whether a planned runtime fits this machine's memory, decided before anything loads.

A 14B model in fp16 on a 16 GB Mac does not fail cleanly: it swaps until the machine is
unusable, or Metal refuses it halfway through loading. So the planner estimates what a
runtime needs (weights + KV cache + a fixed allowance for the runtime itself) from the
files in `prime.json` (or, for a GGUF still to be exported, the parameter count its
safetensors imply) and compares it with what the device offers:

- fits: within the memory available now (on Apple Silicon also within Metal's working
  set, ~70 % of unified memory: `catalog.APPLE_SILICON_GPU_FRACTION`);
- slow: more than that but within the machine's total memory: it loads, but pages other
  programs out (or, on a Mac, runs past what the GPU can wire); a warning;
- too big: more than the machine has (or a CUDA GPU's free memory): refused with numbers.

Estimates, not measurements: good to the tens of percent, which is what the choice needs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jarvis_prime.catalog import APPLE_SILICON_GPU_FRACTION
from jarvis_prime.hardware import Hardware
from jarvis_prime.manifest import PrimeManifest

GiB = 2**30  # what a "16 GB" Mac has 16 of, and what Activity Monitor and `free -g` count in
RUNTIME_ALLOWANCE = int(0.3 * GiB)  # compute buffers, tokenizer, the interpreter's own share
# Bits a weight takes in each llama.cpp file type (block scales included): a GGUF not yet
# exported is estimated with these; one on disk is its file size.
GGUF_BITS_PER_WEIGHT = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.69,
                        "q4_k_m": 4.85, "q4_k_s": 4.58, "q4_1": 5.0, "q4_0": 4.5}
# transformers: bytes a weight takes once loaded (CPU float32, MPS float16, CUDA bf16;
# bitsandbytes int8, and nf4 with double quantization plus the layers it keeps in 16 bits).
TRANSFORMERS_BYTES = {"cpu": 4.0, "mps": 2.0, "cuda": 2.0, "8bit": 1.05, "4bit": 0.6}

Verdict = Literal["fits", "slow", "too_big", "unknown"]


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a runtime needs, by part."""

    weights: int
    kv_cache: int
    allowance: int = RUNTIME_ALLOWANCE

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.allowance


@dataclass(frozen=True)
class MemoryFit:
    """A need set against a device's memory, and what that means."""

    verdict: Verdict
    need: MemoryNeed
    where: str  # "unified memory", "RAM", "GPU memory"
    available: int | None = None
    total: int | None = None
    fast_limit: int | None = None  # above this it is slow (available, and Metal's working set on a Mac)

    def describe(self) -> str:
        need = f"needs {gb(self.need.total)}"
        if self.verdict == "unknown":
            return f"{need}; this machine's free memory is unknown (install psutil), so it was not checked"
        have = f"{gb(self.available)} free of {gb(self.total)} {self.where}"
        if self.verdict == "fits":
            return f"{need}, {have}"
        if self.verdict == "slow":
            limit = "" if self.fast_limit == self.available else f" (Metal wires at most {gb(self.fast_limit)})"
            return f"{need}, {have}{limit}: it will load but page other memory out (swap) and run slowly"
        if self.where == "GPU memory":
            return f"{need}, more than the {have}"
        return f"{need}, more than this machine's {gb(self.total)} of {self.where} ({gb(self.available)} free)"


def gb(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GiB"


def parameter_count(manifest: PrimeManifest) -> int | None:
    """Weights in the model, from its full-precision safetensors (bytes / bytes per weight),
    else its most precise GGUF; None when prime.json lists neither's size."""
    safetensors = next((q for q in manifest.quantizations.values() if q.format == "safetensors"), None)
    if safetensors is not None:
        size = sum(entry.bytes for rel, entry in manifest.files.items()
                   if "/" not in rel and rel.endswith(".safetensors"))
        if size:
            return int(size / (safetensors.bits / 8))
    ggufs = sorted(((name, q) for name, q in manifest.quantizations.items() if q.format == "gguf"),
                   key=lambda item: -item[1].bits)
    for name, q in ggufs:
        if q.file in manifest.files:
            return int(manifest.files[q.file].bytes * 8 / GGUF_BITS_PER_WEIGHT.get(name, q.bits))
    return None


def read_config(model_dir: Path) -> dict[str, Any] | None:
    """A model directory's config.json (the KV cache's shape), if it has a readable one."""
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None  # the estimate goes without the KV cache; loading reports the broken config


def kv_cache_bytes(config: Mapping[str, Any] | None, n_ctx: int, bytes_per_value: float = 2) -> int:
    """Keys and values for `n_ctx` tokens, from a Hugging Face config.json (0 without one)."""
    config = (config or {}).get("text_config") or config or {}
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    if not layers or not heads:
        return 0
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    return int(2 * layers * kv_heads * head_dim * n_ctx * bytes_per_value)


def estimate(manifest: PrimeManifest, *, backend: str, device: str, quantization: str | None, weights: str,
             export: str | None, config: Mapping[str, Any] | None, n_ctx: int) -> MemoryNeed | None:
    """What a runtime (`selection.Runtime`'s fields) needs; None when nothing says the model's size."""
    if backend == "llamacpp":
        if export is None and weights in manifest.files:
            size = manifest.files[weights].bytes
        else:
            params = parameter_count(manifest)
            if params is None:
                return None
            size = int(params * GGUF_BITS_PER_WEIGHT.get(export or "f16", 16.0) / 8)
        return MemoryNeed(size, kv_cache_bytes(config, n_ctx))
    params = parameter_count(manifest)
    if params is None:
        return None
    per_weight = TRANSFORMERS_BYTES[quantization or device]
    kv_bytes = 4 if device == "cpu" and quantization is None else 2
    return MemoryNeed(int(params * per_weight), kv_cache_bytes(config, n_ctx, kv_bytes))


def kv_slots(fit: MemoryFit | None, wanted: int) -> int:
    """How many sequences of full context (continuous batching on llama.cpp: a KV cache
    each) fit beside the loaded model: `wanted`, or fewer when the memory left after the
    planned runtime (which counts one KV cache) holds fewer; never fewer than 1. Without a
    memory reading (unknown), `wanted`."""
    if fit is None or fit.fast_limit is None or fit.need.kv_cache <= 0:
        return wanted
    extra = max(fit.fast_limit - fit.need.total, 0) // fit.need.kv_cache
    return max(1, min(wanted, 1 + extra))


def judge(need: MemoryNeed, hardware: Hardware, device: str) -> MemoryFit:
    """Set `need` against the memory `device` draws on."""
    if device == "cuda":
        total, available = hardware.gpu_memory_total, hardware.gpu_memory_available
        if available is None:
            return MemoryFit("unknown", need, "GPU memory")
        verdict = "fits" if need.total <= available else "too_big"
        return MemoryFit(verdict, need, "GPU memory", available, total, available)
    where = "unified memory" if hardware.apple_silicon else "RAM"
    total, available = hardware.memory_total, hardware.memory_available
    if total is None or available is None:
        return MemoryFit("unknown", need, where)
    fast = available
    if hardware.apple_silicon and device == "mps":  # what Metal lets the GPU wire
        fast = min(available, int(total * APPLE_SILICON_GPU_FRACTION))
    verdict = "fits" if need.total <= fast else "slow" if need.total <= total else "too_big"
    return MemoryFit(verdict, need, where, available, total, fast)
