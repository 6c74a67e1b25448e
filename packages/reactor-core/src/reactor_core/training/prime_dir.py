"""Write the PRIME model directory contract (ARCHITECTURE.md) from the training side.

Reactor Core may not import jarvis_prime, so the contract is shared on disk, not in
code: the field names below are the ones ARCHITECTURE.md fixes, and jarvis-prime's
tests load what this writes.

    <name>-<version>/
        prime.json                       this manifest: files with sha256, lineage, metrics
        config.json  model.safetensors   merged full weights (Hugging Face format)
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        adapter/adapter_config.json  adapter/adapter_model.safetensors   (LoRA runs)
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from reactor_core import __version__
from reactor_core.files import sha256_file, write_atomic

PRIME_FORMAT_VERSION = 1


def write_prime_manifest(
    model_dir: Path,
    *,
    name: str,
    version: str,
    base: str,
    context_length: int,
    stop: list[str],
    lineage: dict[str, Any],
    metrics: dict[str, Any],
    architecture: str | None,
    task: str = "chat",
) -> dict[str, Any]:
    """Hash every file in `model_dir` and write prime.json atomically."""
    files = {
        p.relative_to(model_dir).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p.name != "prime.json"
    }
    quantizations = {}
    if "model.safetensors" in files or "model.safetensors.index.json" in files:
        main = "model.safetensors" if "model.safetensors" in files else "model.safetensors.index.json"
        quantizations["f32"] = {"file": main, "format": "safetensors", "bits": 32, "quality_delta": None}
    manifest = {
        "format_version": PRIME_FORMAT_VERSION,
        "name": name,
        "version": version,
        "task": task,
        "base": base,
        "architecture": architecture,
        "lineage": lineage,
        "chat_template": "chat_template.jinja" if "chat_template.jinja" in files else None,
        "stop": stop,
        "context_length": context_length,
        "files": files,
        "quantizations": quantizations,
        "metrics": metrics,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "producer": f"reactor-core {__version__}",
    }
    write_atomic(model_dir / "prime.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
