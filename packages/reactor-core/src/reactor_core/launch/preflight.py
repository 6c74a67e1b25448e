"""The recipe checked on this machine before a VM is paid for.

A spot VM costs from the minute it boots, and setup (pip, the base model download)
takes several; a typo in a data file found there costs all of that. So `reactor launch`
runs here what `reactor train` would find first: the recipe's keys (`load_config`),
every data line (the method's own validating reader, images decoded), the model name
(resolved as the trainer resolves it), and the memory estimate of `training/memory.py`
against the GPU asked for instead of this machine's.

The estimate needs the base's config.json and safetensors headers: a local folder, or a
Hub model already in the Hugging Face cache. A Hub model not cached here is not
downloaded for a check; the preflight says the estimate was skipped and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from reactor_core.launch.task import Accelerators

# GPU memory (GiB) and bf16 support of the accelerators SkyPilot names on GCP (and the
# common others); an unknown name skips the estimate rather than guessing.
GPUS: dict[str, tuple[float, bool]] = {
    "T4": (16, False), "P4": (8, False), "P100": (16, False), "V100": (16, False), "V100-32GB": (32, False),
    "L4": (24, True), "A10G": (24, True), "A10": (24, True), "L40S": (48, True), "A100": (40, True),
    "A100-80GB": (80, True), "H100": (80, True), "H100-MEGA": (80, True), "H200": (141, True), "B200": (180, True),
}


class PreflightError(ValueError):
    """The recipe would fail on the VM: the message says where and why."""


@dataclass
class Preflight:
    """What the checks found, for the launch summary."""

    config: Any  # TrainingConfig
    data: list[str] = field(default_factory=list)  # one summary per data file
    images: dict[str, bool] = field(default_factory=dict)  # data file -> holds images
    model: str = ""
    # the folder a name resolved to through a plugin here (jarvis-prime's catalog): the VMs
    # install reactor-core alone, so the folder travels with the inputs instead of the name
    local_model: str | None = None
    memory_rows: list[tuple[str, str]] = field(default_factory=list)
    memory_note: str = ""


def run_preflight(recipe: str, overrides: list[str], gpus: Accelerators | None, nodes: int) -> Preflight:
    """Every check; PreflightError with the first problem (file:line for data)."""
    from reactor_core.data import DataValidationError
    from reactor_core.training import ConfigError, load_config
    from reactor_core.training.model import ModelSourceError, resolve_model_source
    from reactor_core.training.rewards import RewardError, load_reward

    try:
        config = load_config(recipe, overrides)
    except (ConfigError, ValueError) as err:
        raise PreflightError(str(err)) from None
    if not (config.checkpoint_remote or "").startswith("gs://"):
        raise PreflightError(f"{recipe}: `checkpoint_remote` must be a gs:// bucket (got "
                             f"{config.checkpoint_remote!r}): the job's checkpoints, inputs and model live there, "
                             "and a recovered VM resumes from it")
    if config.data_path is None:
        raise PreflightError(f"{recipe}: `data_path` is required to launch")
    processes = (gpus.count if gpus else 1) * nodes
    if processes > 1 and config.quantize_base:
        raise PreflightError(f"{recipe}: `quantize_base` (QLoRA) runs in one process, and {gpus or 'CPU'} x {nodes} "
                             "node(s) is several: FSDP cannot shard bitsandbytes 4-bit weights")
    if processes > 1 and config.compile:
        raise PreflightError(f"{recipe}: `compile` is not supported with several processes yet")
    result = Preflight(config)
    try:
        for key in ("data_path", "val_data_path"):
            path = getattr(config, key)
            if path:
                report = _read_data(config, path)
                result.data.append(f"{key}: {report.summary()}")
                result.images[str(Path(path).expanduser().resolve())] = bool(getattr(report, "images", 0))
        if config.kl_anchor_path:
            from reactor_core.data.anchor import load_text_file

            load_text_file(config.kl_anchor_path, on_bad_example=config.on_bad_example)
        if config.method == "grpo":  # a typo in a reward's name fails here, not on the VM
            for spec in config.reward_funcs:
                load_reward(spec)
        source = resolve_model_source(config.model_name)
    except DataValidationError as err:
        raise PreflightError(str(err)) from None
    except (ModelSourceError, FileNotFoundError, RewardError) as err:
        raise PreflightError(f"{recipe}: {err}") from None
    result.model = source.description or source.location
    if source.kind != "hub" and not Path(config.model_name).expanduser().exists():
        result.local_model = source.location
    _estimate(result, source, gpus, nodes)
    return result


def _read_data(config: Any, path: str):
    """The method's validating reader, as its recipe calls it; the report."""
    from reactor_core.data import ImageLimits, load_chat_file
    from reactor_core.data.preference import load_preference_file
    from reactor_core.data.prompts import load_prompt_file

    readers = {
        "sft": partial(load_chat_file, image_limits=ImageLimits(config.max_images_per_example, config.max_image_bytes,
                                                                config.max_image_pixels)),
        "dpo": load_preference_file,
        "grpo": load_prompt_file,
    }
    _, report = readers[config.method](path, on_bad_example=config.on_bad_example)
    return report


def _model_folder(source: Any) -> Path | None:
    """A folder with config.json and safetensors for the estimate, or None."""
    if source.gguf_file:
        return None
    if source.kind != "hub":
        return Path(source.location)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.location, local_files_only=True))
    except Exception:  # not cached here (huggingface_hub raises several kinds): no estimate, said so
        return None


def _estimate(result: Preflight, source: Any, gpus: Accelerators | None, nodes: int) -> None:
    from reactor_core.training import memory
    from reactor_core.training.model import TARGET_MODULES

    c = result.config
    if gpus is None:
        result.memory_note = "no GPU asked for (--gpus): no memory estimate"
        return
    if gpus.name not in GPUS:
        result.memory_note = f"{gpus.name}: memory not known here ({', '.join(GPUS)}): no estimate"
        return
    folder = _model_folder(source)
    if folder is None or not list(folder.glob("*.safetensors")):
        result.memory_note = (f"{c.model_name}: no local config.json and safetensors to estimate from "
                              "(a Hub model not in this machine's cache, or a GGUF): no estimate")
        return
    gib, bf16 = GPUS[gpus.name]
    if c.base_dtype != "auto":
        dtype = c.base_dtype
    else:
        dtype = "bfloat16" if c.use_lora and bf16 and c.mixed_precision != "fp32" else "float32"
    autocast = 2 if c.mixed_precision == "bf16" or (bf16 and c.mixed_precision != "fp32") else 4
    shape = memory.read_model_shape(folder)
    targets = c.target_modules if c.target_modules != "auto" else TARGET_MODULES.get(shape.model_type, "all-linear")
    estimate = memory.estimate_memory(shape, c, dtype_name=dtype, autocast_bytes=autocast, device="cuda",
                                      world_size=gpus.count * nodes, lora_targets=targets)
    result.memory_rows = estimate.rows()
    problem = memory.check_fits(estimate, memory.Available(device=int(gib * memory.GIB), ram=None), c)
    if problem is not None:
        if c.check_memory:
            raise PreflightError(f"{c.model_name} on {gpus}: {problem}")
        result.memory_note = f"does not fit ({problem}); check_memory: false, launching anyway"
    else:
        result.memory_note = f"fits one {gpus.name} ({gib:g} GiB) per process, {gpus.count * nodes} processes"
