"""Where the model comes from, how it is loaded, and how LoRA/QLoRA wrap it.

Model sources, in the order they are tried:
  1. a PRIME model directory (has prime.json): its safetensors, or its GGUF, once every
     file prime.json lists matches its sha256 and no weight file it does not list is there;
  2. a Hugging Face model directory (has config.json);
  3. a .gguf file, dequantized to float32 through transformers' GGUF loader;
  4. a name that an installed plugin resolves (entry point group
     `reactor_core.model_resolvers`; jarvis-prime registers its catalog there, so
     Reactor Core never imports it);
  5. a short name of a common open base (`llama-2-7b`, `qwen2.5-7b-instruct`, ...:
     `hub_names.SHORT_NAMES`), meaning its Hugging Face Hub id;
  6. a Hugging Face Hub id, when online.

A Hub source is downloaded (safetensors only, into the Hugging Face cache) by
`fetch_hub_model` before anything else reads it; offline, or without the token a gated
repository needs, the error says what it would download, how big, under which license.
"""

from __future__ import annotations

import difflib
import json
import logging
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from reactor_core.files import sha256_file
from reactor_core.training import hub_names
from reactor_core.training.config import ConfigError, TrainingConfig
from reactor_core.training.vision import family_for, modules_to_save, set_trainable_parts, vision_model_type

# Libraries' noise a run's user cannot act on, kept off the progress display:
# - bitsandbytes (imported through peft) asks the Hub for an optional CPU 4-bit kernel on
#   AVX512-BF16 CPUs and logs a warning when it cannot have it (offline, or the repository is
#   not on `kernels`' trust list); its own kernel is used instead.
# - transformers 5 deprecates `is_gradient_checkpointing`, which peft still reads.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

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
    known = hub_names.lookup(name)
    if known is not None:
        return ModelSource("hub", known.repo_id, description=f"{name} -> {known.describe()}")
    if "/" in name:
        return ModelSource("hub", name, description="Hugging Face Hub")
    plugins = [p.name for p in entry_points(group=RESOLVER_GROUP)]
    hint = "" if plugins else " (install jarvis-prime to train catalog names)"
    close = difflib.get_close_matches(name.lower(), list(hub_names.SHORT_NAMES), n=3)
    also = f"; short names like {', '.join(close)}" if close else ""
    raise ModelSourceError(f"unknown model {name!r}: not a path, a Hub id, a short name of an open base "
                           f"(reactor_core.training.hub_names){also}, or a name known to {plugins or 'any plugin'}{hint}")


# What a Hub download fetches: config, tokenizer, chat template and safetensors weights;
# never pickled weights (*.bin, *.pt), which would run code when loaded.
HUB_FILES = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja")


def fetch_hub_model(source: ModelSource) -> ModelSource:
    """A Hub source downloaded into the Hugging Face cache (or found there), as the local
    Hugging Face directory it now is; ModelSourceError saying what was asked for (repo,
    size, license; for a gated repository, the token and the license to accept) when it
    cannot be had: offline (`HF_HUB_OFFLINE=1` or no network), no access, no safetensors."""
    if source.kind != "hub":
        return source
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    known = hub_names.BY_REPO.get(source.location)
    what = known.describe() if known else source.location
    gate = (f" It is gated: accept the license at {known.page} with your Hugging Face account and set HF_TOKEN "
            "(or `hf auth login`)." if known and known.gated else "")
    try:
        path = Path(snapshot_download(source.location, allow_patterns=list(HUB_FILES)))
    except GatedRepoError as err:
        raise ModelSourceError(f"{what}: access refused by the Hub ({type(err).__name__}).{gate or ' Set HF_TOKEN.'}") from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"{source.location}: no such model on the Hugging Face Hub (or it is private: set "
                               f"HF_TOKEN)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ModelSourceError(f"{what} is not in the Hugging Face cache and cannot be downloaded now "
                               f"({type(err).__name__}: offline, HF_HUB_OFFLINE=1, or no network). Training it "
                               f"downloads that into the cache ($HF_HOME) once.{gate}") from None
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(f"{source.location}: the repository has no safetensors weights; pickled weights "
                               "(*.bin, *.pt) are refused")
    return ModelSource("hf", str(path), description=f"{source.description} (Hub cache)")


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


DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def base_dtype(config: TrainingConfig, device: torch.device) -> torch.dtype:
    """The dtype the frozen base loads in (`base_dtype`); see TrainingConfig.base_dtype.

    auto follows the autocast dtype: the matmuls run in bf16 under autocast anyway, so a
    bf16 copy of the frozen weights loses nothing the forward kept, and halves memory.
    Trainable weights are never in it (`keep_trainable_float32`).
    """
    if config.base_dtype != "auto":
        return DTYPES[config.base_dtype]
    if not config.use_lora:
        return torch.float32
    return autocast_dtype(config, device) or torch.float32


def check_quantization_support(device: torch.device) -> None:
    """ConfigError unless bitsandbytes can hold a 4-bit base on `device` (CUDA or CPU)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("`quantize_base` (QLoRA) needs bitsandbytes: pip install 'reactor-core[qlora]' "
                          "(or set `quantize_base: false` and `base_dtype: bfloat16` for a half-precision base)")
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"`quantize_base` (QLoRA): bitsandbytes' 4-bit weights run on CUDA and CPU, not "
                          f"{device.type}; set `device: cpu`, or `quantize_base: false` with `base_dtype: bfloat16`")


def load_base_model(source: ModelSource, *, quantize_4bit: bool, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base model in `dtype` (or its linear layers in NF4 for QLoRA, the rest in
    `dtype`), ready to be adapted; a vision model (config.json with `vision_config`)
    through AutoModelForImageTextToText.

    Peak memory stays near the model's own size: transformers 5 always loads
    safetensors straight into the target dtype (no float32 copy first, no
    `low_cpu_mem_usage` needed), and on CUDA `device_map` puts each tensor on the GPU
    as it is read instead of building the model in RAM and moving it after.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        check_quantization_support(device)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    if quantize_4bit or device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": device.type}
    auto = AutoModelForImageTextToText if source.vision_model_type else AutoModelForCausalLM
    model = auto.from_pretrained(**source.load_kwargs(), **kwargs)
    if source.gguf_file:  # weights are plain tensors now; forget the GGUF quantizer
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if "device_map" not in kwargs:
        model.to(device)
    return model


def keep_trainable_float32(model: nn.Module) -> nn.Module:
    """Every trainable parameter in float32 (LoRA adapters, peft `modules_to_save`
    copies of a half-precision base): AdamW's updates on bf16 weights would round away
    (bf16 keeps 8 bits of mantissa), so mixed precision means half-precision frozen
    weights and float32 trained ones, as peft and torchtune do it."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
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
    from peft import LoraConfig, get_peft_model

    # Not peft's prepare_model_for_kbit_training: it casts every frozen non-4-bit weight
    # (embeddings, LM head, norms) to float32, 4.4 GB more for a 7B Qwen's 1.1 B embedding
    # and head parameters; they stay in `base_dtype` (norms compute in float32 inside
    # the model's own RMSNorm). Its other job, inputs that require grad for reentrant
    # checkpointing, is moot: gradient checkpointing here is non-reentrant.
    for param in model.parameters():
        param.requires_grad_(False)
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
    return keep_trainable_float32(get_peft_model(model, lora))  # peft upcasts adapters; modules_to_save copies too


def prepare_trainable(model: nn.Module, config: TrainingConfig) -> nn.Module:
    """LoRA adapters, or for full fine-tuning of a vision model requires_grad per part."""
    if config.use_lora:
        return apply_lora(model, config)
    if is_vision_model(model):
        set_trainable_parts(model, family_for(model.config.model_type, config.model_name), config)
    return keep_trainable_float32(model)
