"""Write the PRIME model directory (docs/architecture.md): what a finished run hands over.

Reactor Core may not import jarvis_prime, so the contract is shared on disk, not in
code: the field names below are the ones docs/architecture.md fixes, and jarvis-prime's
tests load what this writes.

    <name>-<version>/
        prime.json                       this manifest: files with sha256, lineage, metrics
        config.json  model.safetensors   merged full weights (Hugging Face format)
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        adapter/adapter_config.json  adapter/adapter_model.safetensors   (LoRA runs)
        preprocessor_config.json  processor_config.json   (vision models: their processor)

A vision model's directory holds the merged weights of all three parts (vision tower,
projector, language model) and its processor's files, and says `task: vision`; its LoRA
adapter folder carries the fully trained parts (peft `modules_to_save`).
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reactor_core.version import __version__
from reactor_core.files import replace_dir, restore_aside, sha256_file, write_atomic
from reactor_core.training import distributed
from reactor_core.training.config import TrainingConfig
from reactor_core.training.distributed import DistContext
from reactor_core.training.loss import unwrapped_state
from reactor_core.training.model import ModelSource, load_base_model, prepare_trainable

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


def output_name(config: TrainingConfig) -> str:
    """`output_name`, else the base model's name + "-sft"."""
    if config.output_name:
        return config.output_name
    stem = Path(config.model_name).name.removesuffix(".gguf").lower()
    return f"{stem}-sft"


def write_model_dir(
    output_dir: Path,
    model: nn.Module,
    *,
    tokenizer: Any,
    source: ModelSource,
    config: TrainingConfig,
    data_files: list[dict[str, Any]],
    metrics: dict[str, Any],
    processor: Any = None,
) -> Path:
    """Write the PRIME model directory: adapter/, merged weights, tokenizer (a vision
    model's whole `processor` when given), prime.json.

    Built in a staging folder and renamed into place, so a crash mid-save never
    leaves a directory that looks complete.
    """
    c = config
    name, version = output_name(c), c.output_version
    final = output_dir / f"{name}-{version}"
    restore_aside(final, lambda path: (path / "prime.json").is_file())  # a crash during the last write
    staging = output_dir / f".{name}-{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if c.use_lora:
        model.save_pretrained(staging / "adapter", safe_serialization=True)
        if c.merge_adapter:
            merged_model(source, staging / "adapter").save_pretrained(staging, safe_serialization=True)
    else:
        model.save_pretrained(staging, safe_serialization=True)
    (processor or tokenizer).save_pretrained(staging)
    if processor is not None:
        # transformers 5 nests the image processor in processor_config.json; llama.cpp's
        # converter (the mmproj GGUF) and older transformers read preprocessor_config.json
        processor.image_processor.save_pretrained(staging)
    base_config = getattr(model, "config", None)
    text_config = base_config.get_text_config() if base_config is not None else None
    write_prime_manifest(
        staging,
        name=name,
        version=version,
        base=source.location,
        architecture=getattr(base_config, "model_type", None),
        task="vision" if processor is not None else "chat",
        context_length=min(c.max_seq_length, getattr(text_config, "max_position_embeddings", c.max_seq_length)),
        stop=[tokenizer.eos_token] if tokenizer.eos_token else [],
        lineage={
            "parent": c.model_name,
            "source": {"kind": source.kind, "location": source.location, "description": source.description,
                       **base_identity(source, adapter_only=c.use_lora and not c.merge_adapter)},
            "data": data_files,
            "training_config": c.to_dict(),
            "trainer": f"reactor-core {__version__}",
        },
        metrics={k: v for k, v in metrics.items() if k in ("eval_loss", "perplexity", "steps", "train_tokens", "tokens_per_s")}
        | {"final_train_loss": metrics["train_loss"][-1]["loss"] if metrics["train_loss"] else None},
    )
    replace_dir(staging, final)  # an existing directory is set aside, and deleted only after this one is in place
    return final


def base_identity(source: ModelSource, adapter_only: bool) -> dict[str, Any]:
    """What finds and checks the base again when an adapter-only directory (`merge_adapter:
    false`) is merged elsewhere, where `location` (a path on the machine that trained, e.g.
    a launched VM's staged folder or Hub cache) means nothing: a PRIME base's name, version
    and safetensors sha256, from its prime.json (verified when training loaded it); a
    Hugging Face folder's safetensors sha256, hashed here for an adapter-only run (the
    only one that needs them). Empty for a GGUF base."""
    folder = Path(source.location)
    if source.kind == "prime":
        manifest = json.loads((folder / "prime.json").read_text(encoding="utf-8"))
        weights = {rel: entry["sha256"] for rel, entry in manifest.get("files", {}).items()
                   if rel.endswith(".safetensors") and "/" not in rel}
        return {"name": manifest.get("name"), "version": manifest.get("version"), "weights_sha256": weights}
    if source.kind == "hf" and adapter_only:
        return {"weights_sha256": {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}}
    return {}


def exportable_model(model: nn.Module, loss_module: nn.Module, dist: DistContext, source: ModelSource,
                     config: TrainingConfig) -> nn.Module | None:
    """The trained model as one plain module: `model` in a single process; in a
    distributed run, the shards gathered into a fresh copy on rank 0 (None elsewhere).

    Collective in a distributed run: every rank must call it.
    """
    if not dist.enabled:
        return model
    state = unwrapped_state(distributed.model_state(loss_module, trainable_only=config.use_lora))
    if not dist.is_main:
        return None
    model = prepare_trainable(load_base_model(source, quantize_4bit=False, device=torch.device("cpu")), config)
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"gathered weights do not fit the model: {unexpected[:3]}")
    return model


def merged_model(source: ModelSource, adapter_dir: Path) -> nn.Module:
    """Base reloaded in float32 + the saved adapter, merged: W = W0 + (alpha/r) B A.

    Merging into a 4-bit QLoRA base would round the update away, so the base is
    always reloaded at full precision first.
    """
    from peft import PeftModel

    base = load_base_model(source, quantize_4bit=False, device=torch.device("cpu"))
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
