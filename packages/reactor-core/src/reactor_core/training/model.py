"""Where the model comes from, how it is loaded, and how LoRA/QLoRA wrap it.

Model sources, in the order they are tried:
  1. a PRIME model directory (has prime.json): its safetensors, or its GGUF, once every
     file prime.json lists matches its sha256 and no weight file it does not list is there;
  2. a Hugging Face model directory (has config.json);
  3. a .gguf file, dequantized to float32 through transformers' GGUF loader;
  4. a name that an installed plugin resolves (entry point group
     `reactor_core.model_resolvers`; jarvis-prime registers its catalog there, so
     Reactor Core never imports it);
  5. a Hugging Face Hub id, when online.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from reactor_core.files import sha256_file
from reactor_core.training.config import TrainingConfig
from reactor_core.training.vision import family_for, modules_to_save, set_trainable_parts, vision_model_type

RESOLVER_GROUP = "reactor_core.model_resolvers"

# Attention and MLP projections: adapting all of them is what QLoRA found matches full
# fine-tuning quality; attention-only (peft's default for llama) trails it.
TARGET_MODULES: dict[str, list[str]] = {
    arch: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for arch in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite")
} | {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}


class ModelSourceError(ValueError):
    """A model name that no source can provide."""


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["prime", "hf", "gguf", "hub"]
    location: str  # directory, file or hub id
    gguf_file: str | None = None  # set when weights come from a GGUF
    description: str = ""

    @property
    def vision_model_type(self) -> str | None:
        """The model_type when the weights are a vision-language model (config.json has
        `vision_config`); None for text models and GGUF files (their text model only)."""
        return None if self.gguf_file or self.kind == "hub" else vision_model_type(self.location)

    def load_kwargs(self) -> dict[str, Any]:
        if self.gguf_file:
            return {"pretrained_model_name_or_path": str(Path(self.gguf_file).parent), "gguf_file": Path(self.gguf_file).name}
        return {"pretrained_model_name_or_path": self.location}


# What transformers (or a converter) could take weights from; the same list as
# jarvis_prime.manifest.WEIGHT_SUFFIXES (the PRIME contract is shared on disk, not in code).
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npz", ".h5",
                   ".msgpack", ".onnx")


def verified_prime_manifest(path: Path) -> dict[str, Any]:
    """`path/prime.json`, once every file it lists has its size and sha256 and no weight
    file it does not list is present; else ModelSourceError naming the file.

    Training reads the base's weights, config and tokenizer by name from the folder, so
    a tampered, truncated or dropped-in file would quietly become the base of the run.
    Hidden paths (writers' temporary files and staging folders) are not weights.
    """
    manifest_path = path / "prime.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelSourceError(f"{manifest_path}: not valid JSON ({err}); not a PRIME model directory") from err
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict):
        raise ModelSourceError(f"{manifest_path}: no `files` table; cannot verify the model's files")
    for rel, entry in listed.items():
        _check_listed_file(path, rel, entry)
    unlisted = [rel for rel in _weight_files(path) if rel not in listed]
    if unlisted:
        raise ModelSourceError(f"{path}: weight files not listed in prime.json: {', '.join(unlisted)}; "
                               "refusing to train from it (remove them)")
    return manifest


def _weight_files(model_dir: Path) -> list[str]:
    """Relative paths of the files under `model_dir` a loader could take weights from."""
    found = []
    for file in sorted(model_dir.rglob("*")):
        rel = file.relative_to(model_dir)
        hidden = any(part.startswith(".") for part in rel.parts)
        if file.is_file() and not hidden and rel.name.lower().removesuffix(".index.json").endswith(WEIGHT_SUFFIXES):
            found.append(rel.as_posix())
    return found


def _check_listed_file(model_dir: Path, rel: str, entry: Any) -> None:
    file = model_dir / rel
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ModelSourceError(f"{model_dir / 'prime.json'}: files.{rel}: needs a sha256")
    if not file.is_file():
        raise ModelSourceError(f"{file}: listed in prime.json but missing")
    if entry.get("bytes") is not None and file.stat().st_size != entry["bytes"]:
        raise ModelSourceError(f"{file}: size {file.stat().st_size} bytes, prime.json says {entry['bytes']}")
    actual = sha256_file(file)
    if actual != entry["sha256"]:
        raise ModelSourceError(f"{file}: sha256 {actual} does not match prime.json {entry['sha256']}; "
                               "refusing to train from it")


def _from_directory(path: Path) -> ModelSource | None:
    if (path / "prime.json").is_file():
        manifest = verified_prime_manifest(path)
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return ModelSource("prime", str(path), description=f"PRIME model {manifest.get('name')} {manifest.get('version')}")
        ggufs = [q["file"] for q in manifest.get("quantizations", {}).values() if q.get("format") == "gguf"]
        if ggufs:
            return ModelSource("prime", str(path), gguf_file=str(path / ggufs[0]), description=f"PRIME model {manifest.get('name')} (GGUF)")
        raise ModelSourceError(f"{path}: PRIME model directory with neither safetensors nor GGUF weights")
    if (path / "config.json").is_file():
        return ModelSource("hf", str(path), description="Hugging Face directory")
    return None


def resolve_model_source(name: str) -> ModelSource:
    path = Path(name).expanduser()
    if path.is_dir():
        source = _from_directory(path)
        if source is None:
            raise ModelSourceError(f"{path}: neither a PRIME model directory (prime.json) nor a Hugging Face one (config.json)")
        return source
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"{path}: a model file must be .gguf")
        return ModelSource("gguf", str(path), gguf_file=str(path), description="GGUF file (dequantized)")
    for plugin in entry_points(group=RESOLVER_GROUP):
        resolved = plugin.load()(name)
        if resolved is not None:
            source = _from_directory(Path(resolved))
            if source is not None:
                return ModelSource(source.kind, source.location, source.gguf_file, f"{plugin.name}: {name} -> {resolved}")
    if "/" in name:
        return ModelSource("hub", name, description="Hugging Face Hub")
    plugins = [p.name for p in entry_points(group=RESOLVER_GROUP)]
    hint = "" if plugins else " (install jarvis-prime to train catalog names)"
    raise ModelSourceError(f"unknown model {name!r}: not a path, a Hub id, or a name known to {plugins or 'any plugin'}{hint}")


def pick_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs where bf16 autocast is faster, not slower, than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast_dtype(config: TrainingConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it natively; None means plain float32."""
    if config.mixed_precision == "fp32":
        return None
    native = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (device.type == "cpu" and cpu_has_bf16())
    if config.mixed_precision == "bf16" or native:
        return torch.bfloat16
    return None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(**source.load_kwargs())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelSourceError(f"{source.location}: the tokenizer has no chat template; chat SFT needs one")
    return tokenizer


def load_processor(source: ModelSource):
    """A vision model's processor (image processor, tokenizer, chat template: AutoProcessor
    reads processor_config.json / preprocessor_config.json and the template in the folder)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(**source.load_kwargs())
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(processor, "chat_template", None):
        raise ModelSourceError(f"{source.location}: the processor has no chat template; chat SFT needs one")
    return processor


def load_base_model(source: ModelSource, *, quantize_4bit: bool, device: torch.device) -> nn.Module:
    """The base model in float32 (or NF4 for QLoRA), ready to be adapted; a vision model
    (config.json with `vision_config`) through AutoModelForImageTextToText."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": device.type}
    auto = AutoModelForImageTextToText if source.vision_model_type else AutoModelForCausalLM
    model = auto.from_pretrained(**source.load_kwargs(), **kwargs)
    if source.gguf_file:  # weights are plain float32 now; forget the GGUF quantizer
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if not quantize_4bit:
        model.to(device)
    return model


def target_modules_for(model: nn.Module, requested: list[str] | str) -> list[str] | str:
    if requested != "auto":
        return requested
    return TARGET_MODULES.get(getattr(model.config, "model_type", ""), "all-linear")


def is_vision_model(model: nn.Module) -> bool:
    return hasattr(model.config, "vision_config")


def apply_lora(model: nn.Module, config: TrainingConfig) -> nn.Module:
    """Wrap `model` with LoRA adapters (peft); for QLoRA, prepare the 4-bit base first.

    A vision model gets adapters in its language model only, and the parts the recipe
    trains in full (`train_projector`, `train_vision_tower`) as peft `modules_to_save`,
    so the adapter folder holds them too and merging puts them in place.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.quantize_base:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    targets, extra = target_modules_for(model, config.target_modules), None
    if is_vision_model(model):
        family = family_for(model.config.model_type, config.model_name)
        text_type = getattr(model.config.get_text_config(), "model_type", "")
        targets = family.lora_targets(model, config.target_modules, TARGET_MODULES.get(text_type, "all-linear"))
        extra = modules_to_save(family, config) or None
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        modules_to_save=extra,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def prepare_trainable(model: nn.Module, config: TrainingConfig) -> nn.Module:
    """LoRA adapters, or for full fine-tuning of a vision model requires_grad per part."""
    if config.use_lora:
        return apply_lora(model, config)
    if is_vision_model(model):
        set_trainable_parts(model, family_for(model.config.model_type, config.model_name), config)
    return model
