"""`TrainingConfig`: every knob of a training run, typed and validated when loaded.

A recipe is YAML whose keys are exactly these fields; `reactor train recipe.yaml
key=value ...` overrides them. Unknown keys and bad values fail before anything runs,
with messages that name the key (peft's LoraConfig is the model: a documented,
typed field each).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from reactor_core.data.images import ImageLimits
from reactor_core.data.pipeline_config import PipelineConfig


class ConfigError(ValueError):
    """A recipe or override that does not describe a valid run."""


# The reactor-core release that introduced each TrainingConfig key. A package that passes
# a key must require at least that release (jarvis-prime's `training` extra is checked
# against the keys its recipes pass: packages/jarvis/tests/test_layers.py). A new key
# must be added here with the version that will first ship it (test_training checks).
FIELD_SINCE: dict[str, str] = {
    **dict.fromkeys((
        "model_name", "data_path", "val_data_path", "val_fraction", "on_bad_example", "max_seq_length", "packing",
        "output_dir", "output_name", "output_version", "merge_adapter", "method", "use_lora", "lora_rank",
        "lora_alpha", "lora_dropout", "target_modules", "quantize_base", "num_epochs", "max_steps", "batch_size",
        "gradient_accumulation_steps", "learning_rate", "weight_decay", "lr_scheduler", "warmup_steps",
        "max_grad_norm", "gradient_checkpointing", "mixed_precision", "device", "seed", "eval_every_steps",
        "log_every_steps", "num_samples", "sample_max_new_tokens"), "1.0.0"),
    **dict.fromkeys((  # checkpoints and spot VMs, DPO, the KL term
        "checkpoint_dir", "checkpoint_every_steps", "checkpoint_every_minutes", "keep_last_checkpoints",
        "checkpoint_remote", "spot_defaults", "resume", "force_resume", "watch_gcp_preemption",
        "beta", "loss_type", "label_smoothing", "precompute_ref_logps", "kl_to_base"), "1.1.0"),
    **dict.fromkeys(("kl_anchor_path", "kl_anchor_tokens", "compile"), "1.2.0"),
    "checkpoint_upload_attempts": "1.4.0",
    **dict.fromkeys(("max_images_per_example", "max_image_bytes", "max_image_pixels"), "1.5.0"),  # images
    **dict.fromkeys(("train_projector", "train_vision_tower", "freeze_language_model", "projector_learning_rate"),
                    "1.6.0"),  # vision models
    **dict.fromkeys(("base_dtype", "check_memory"), "1.7.0"),  # big bases: half-precision frozen weights, memory estimate
    **dict.fromkeys(("num_generations", "max_completion_length", "temperature", "top_p", "epsilon", "epsilon_high",
                     "reward_funcs", "reward_weights"), "1.8.0"),  # GRPO
    "data_pipeline": "1.9.0",  # the data pipeline (issue #25)
}

# `loss_type` values per method; GRPO's default is "dapo", as current TRL's
LOSS_TYPES: dict[str, tuple[str, ...]] = {"dpo": ("sigmoid", "ipo"), "grpo": ("dapo", "grpo", "dr_grpo")}


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- what to train, on what ----------------------------------------------------------
    model_name: str = Field(description="HF dir, PRIME dir, .gguf file, hub id, or a jarvis-prime catalog name.")
    data_path: str | None = Field(default=None, description="Training JSONL (messages, ShareGPT or Alpaca).")
    val_data_path: str | None = Field(default=None, description="Validation JSONL; else `val_fraction` of the data.")
    val_fraction: float = Field(default=0.05, ge=0.0, lt=1.0, description="Share of examples held out for validation.")
    on_bad_example: Literal["error", "skip"] = Field(default="error", description="Bad lines stop the run, or are skipped.")
    data_pipeline: PipelineConfig | None = Field(default=None, description=(
        "Clean the data first (reactor data clean: dedup, decontamination, filters, PII scrub) into "
        "<output_dir>/data/; its config and the input files' sha256 go into the lineage. `kind: preference` "
        "for DPO. Bad lines are then the pipeline's to drop, each in the report."))
    max_seq_length: int = Field(default=1024, gt=0, description="Tokens per example (and per packed row).")
    max_images_per_example: int = Field(default=ImageLimits.max_images_per_example, gt=0, description=(
        "Image parts one chat example may hold (user turns only); an example with more is a bad line."))
    max_image_bytes: int = Field(default=ImageLimits.max_bytes, gt=0, description=(
        "Largest image file (or decoded base64) a data line may reference; checked before it is read."))
    max_image_pixels: int = Field(default=ImageLimits.max_pixels, gt=0, description=(
        "Largest width x height, checked before decoding (decompression bombs); default PIL's own "
        "MAX_IMAGE_PIXELS, about 89 M."))
    packing: bool = Field(default=True, description="Pack several examples per row; attention never crosses them.")

    # -- output ----------------------------------------------------------------------------
    output_dir: str = Field(default="./reactor-output", description="Logs, checkpoints and the PRIME model directory.")
    output_name: str | None = Field(default=None, description="PRIME model name; default: <base name>-sft.")
    output_version: str = Field(default="1.0.0", description="PRIME model version.")
    merge_adapter: bool = Field(default=True, description="Also write merged full weights next to adapter/.")

    # -- method ----------------------------------------------------------------------------
    method: Literal["sft", "dpo", "grpo"] = Field(default="sft", description=(
        "sft: chat data; dpo: preference pairs; grpo: prompts, sampled completions and reward functions."))
    beta: float = Field(default=0.1, ge=0, description=(
        "DPO: strength of the pull towards the reference model (> 0). GRPO: weight of the KL to the reference "
        "(default 0 for grpo, as TRL: no reference is loaded or kept)."))
    loss_type: Literal["sigmoid", "ipo", "dapo", "grpo", "dr_grpo"] = Field(default="sigmoid", description=(
        "DPO loss: sigmoid (DPO/cDPO) or ipo. GRPO loss (default dapo): dapo = mean over every completion token "
        "of the step; grpo = mean per completion, then over completions; dr_grpo = sum over tokens / "
        "(completions x max_completion_length), and advantages not divided by the group's std (Dr. GRPO)."))
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5, description="DPO sigmoid: assumed label noise (cDPO).")
    precompute_ref_logps: bool = Field(default=False, description=(
        "DPO: score every pair with the reference model once before training, instead of at every step; "
        "full fine-tuning then keeps no frozen copy in memory."))
    use_lora: bool = Field(default=True, description="Train LoRA adapters (peft) instead of every weight.")
    lora_rank: int = Field(default=16, gt=0, description="LoRA rank r.")
    lora_alpha: float = Field(default=32.0, gt=0, description="LoRA scale numerator: W0 x + (alpha/r) B A x.")
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        default="auto", description="Modules to adapt; auto = attention + MLP projections for the architecture."
    )
    quantize_base: bool = Field(default=False, description=(
        "QLoRA: load the frozen base's linear layers in 4-bit NF4 (bitsandbytes; needs it installed, CUDA or CPU). "
        "The rest of the frozen base stays in `base_dtype`, the adapters in float32."))
    base_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="auto", description=(
        "The dtype the frozen base weights are loaded in (LoRA only; the adapters and anything trained in full stay "
        "float32, as peft and torchtune keep them). auto: the autocast dtype, i.e. bfloat16 where the hardware runs "
        "it natively (CUDA bf16, AVX512-BF16/AMX CPUs) or with `mixed_precision: bf16`, else float32; float32 with "
        "`mixed_precision: fp32` or without LoRA. Half precision halves the base's memory: a 7B base is ~15 GB in "
        "bf16 instead of ~30 GB."))
    check_memory: bool = Field(default=True, description=(
        "Estimate the run's memory from config.json and the safetensors headers before loading, print it, and refuse "
        "a run that cannot fit the free RAM / GPU memory (false: print it, warn, and try anyway)."))
    kl_to_base: float = Field(default=0.0, ge=0.0, description=(
        "SFT with LoRA: weight of a KL(base || model) term on the positions that carry no label (prompt, chat "
        "template; the base is the model with its adapters disabled), or on `kl_anchor_path`'s text when set, "
        "keeping the tune close to its base where the data does not ask for a change. 0 disables it."))
    kl_anchor_path: str | None = Field(default=None, description=(
        "JSONL of {\"text\": ...} lines: plain text on which `kl_to_base` is measured instead (about "
        "`kl_anchor_tokens` of it per micro-batch), e.g. prose the base wrote, to keep general-text perplexity."))
    kl_anchor_tokens: int = Field(default=512, gt=0, description="Anchor-text tokens per micro-batch.")

    # -- GRPO (method: grpo) ---------------------------------------------------------------
    num_generations: int = Field(default=8, ge=2, description=(
        "GRPO: completions sampled per prompt (the group its advantages are normalised in); a micro-batch of "
        "`batch_size` prompts is batch_size x num_generations sequences."))
    max_completion_length: int = Field(default=256, gt=0, description="GRPO: most tokens sampled per completion.")
    temperature: float = Field(default=1.0, gt=0, description=(
        "GRPO: sampling temperature; the log-probs of the loss use the same temperature, as TRL's do."))
    top_p: float = Field(default=1.0, gt=0, le=1.0, description="GRPO: nucleus sampling (1.0: off).")
    epsilon: float = Field(default=0.2, gt=0, lt=1.0, description="GRPO: clip range, ratio kept in [1 - eps, 1 + eps_high].")
    epsilon_high: float | None = Field(default=None, gt=0, description=(
        "GRPO: upper clip (DAPO's clip-higher, e.g. 0.28); null = epsilon."))
    reward_funcs: list[str] = Field(default_factory=list, description=(
        "GRPO: reward functions, each a built-in (exact_answer, think_format, length), 'package.module:function' "
        "or 'path/to/file.py:function', called as f(prompts, completions, **columns) -> list[float | None]."))
    reward_weights: list[float] | None = Field(default=None, description=(
        "GRPO: one weight per reward function (null: all 1.0); the reward is their weighted sum."))

    # -- vision models (config.json with `vision_config`; an error on a text model) ----------
    train_projector: bool = Field(default=True, description=(
        "Vision models: train the projector (the connector from image features to the language model) in "
        "full; with LoRA it is saved with the adapter (peft modules_to_save)."))
    train_vision_tower: bool = Field(default=False, description=(
        "Vision models: train the image encoder too (in full; with LoRA saved with the adapter)."))
    freeze_language_model: bool = Field(default=False, description=(
        "Vision models, without LoRA: keep the language model (and its LM head) frozen, the align stage that "
        "trains the projector (and tower) alone."))
    projector_learning_rate: float | None = Field(default=None, gt=0, description=(
        "Vision models: the projector's learning rate (its own optimizer group); null = learning_rate."))

    # -- optimization ----------------------------------------------------------------------
    num_epochs: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="Optimizer steps; overrides num_epochs when set.")
    batch_size: int = Field(default=4, gt=0, description="Rows (packed) or examples per micro-batch.")
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping; null disables it.")
    gradient_checkpointing: bool = False
    compile: bool = Field(default=False, description=(
        "torch.compile each decoder layer and the LM head + loss (inductor): the same math in fused kernels, "
        "less activation memory, and after a one-time compile (about a minute on a 2-core CPU; cached on disk) "
        "usually faster steps; for long runs. Single-process runs only."))
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 autocast where the hardware has it (CUDA bf16, AVX512-BF16/AMX CPUs)."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: int = 42

    # -- checkpoints and preemption ----------------------------------------------------------
    checkpoint_dir: str | None = Field(default=None, description="Where checkpoints go; default <output_dir>/checkpoints.")
    checkpoint_every_steps: int | None = Field(default=None, gt=0, description="Checkpoint every N optimizer steps.")
    checkpoint_every_minutes: float | None = Field(default=None, gt=0, description="Checkpoint every M minutes.")
    keep_last_checkpoints: int = Field(default=2, gt=0, description="Retention: the last N, plus the best by eval loss.")
    checkpoint_remote: str | None = Field(
        default=None, description="Mirror checkpoints to gs://bucket/prefix (or a directory); resume pulls from it."
    )
    checkpoint_upload_attempts: int = Field(default=5, ge=1, le=10, description=(
        "Tries per file of a checkpoint upload (backoff 0.5 s doubling, jittered: 5 tries wait at most 7.5 s); "
        "when they run out the checkpoint stays local only, with a warning, and training goes on."))
    spot_defaults: bool = Field(
        default=True, description="On a detected GCP spot VM: 5-minute checkpoints and the preemption watcher."
    )
    resume: str = Field(default="auto", description="auto (newest complete checkpoint) | never | a checkpoint path.")
    force_resume: bool = Field(default=False, description="Resume even if the config or data changed since the checkpoint.")
    watch_gcp_preemption: bool = Field(
        default=False, description="Long-poll the GCP metadata server for a spot preemption notice ($GCE_METADATA_HOST)."
    )

    # -- evaluation and logging ------------------------------------------------------------
    eval_every_steps: int | None = Field(default=None, gt=0, description="Validation loss every N steps (and at the end).")
    log_every_steps: int = Field(default=1, gt=0)
    num_samples: int = Field(default=2, ge=0, description="Greedy samples from validation prompts at each eval.")
    sample_max_new_tokens: int = Field(default=32, gt=0)

    @field_validator("output_name", "output_version")
    @classmethod
    def _one_path_component(cls, value: str | None, info) -> str | None:
        # the PRIME directory is <output_dir>/<output_name>-<output_version>/
        if value is not None and (not re.fullmatch(r"[A-Za-z0-9._-]+", value) or value in (".", "..")):
            raise ValueError(f"{value!r} is not a safe name: use only letters, digits, '.', '_' and '-' "
                             "(not '.' or '..', no '/')")
        return value

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, values: Any) -> Any:
        # GRPO's own defaults for the keys it shares with DPO: TRL's loss ("dapo") and no KL
        if isinstance(values, dict) and values.get("method") == "grpo":
            values = {"loss_type": "dapo", "beta": 0.0, **values}
        return values

    @model_validator(mode="after")
    def _check_combinations(self) -> "TrainingConfig":
        owner = next(method for method, types in LOSS_TYPES.items() if self.loss_type in types)
        if self.method != owner and not (self.method == "sft" and self.loss_type == "sigmoid"):  # sft: the default
            takes = f" (`method: {self.method}` takes {', '.join(LOSS_TYPES[self.method])})" if self.method in LOSS_TYPES else ""
            raise ValueError(f"`loss_type: {self.loss_type}` applies to `method: {owner}` only{takes}")
        if self.method == "dpo" and self.beta <= 0:
            raise ValueError(f"`beta` must be > 0 for `method: dpo`, got {self.beta}")
        grpo_keys = [k for k in ("num_generations", "max_completion_length", "temperature", "top_p", "epsilon",
                                 "epsilon_high", "reward_funcs", "reward_weights")
                     if getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True)]
        if self.method != "grpo" and grpo_keys:
            raise ValueError(f"`{grpo_keys[0]}` applies to `method: grpo` only")
        if self.method == "grpo":
            if not self.reward_funcs:
                raise ValueError("`method: grpo` needs `reward_funcs`: at least one (e.g. [exact_answer])")
            if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
                raise ValueError(f"`reward_weights` has {len(self.reward_weights)} weight(s) for "
                                 f"{len(self.reward_funcs)} reward function(s)")
            if self.max_completion_length >= self.max_seq_length:
                raise ValueError(f"`max_completion_length` ({self.max_completion_length}) leaves no room for the "
                                 f"prompt in `max_seq_length` ({self.max_seq_length})")
        if self.data_pipeline is not None:
            kind = {"sft": "chat", "dpo": "preference"}.get(self.method)
            if kind is None:
                raise ValueError(f"`data_pipeline` cleans chat and preference data, not `method: {self.method}`'s prompts")
            if self.data_pipeline.kind != kind:
                raise ValueError(f"`data_pipeline.kind` must be {kind!r} for `method: {self.method}`, "
                                 f"got {self.data_pipeline.kind!r}")
        if self.precompute_ref_logps and self.method != "dpo":
            raise ValueError("`precompute_ref_logps` applies to `method: dpo` only")
        if self.label_smoothing and (self.method != "dpo" or self.loss_type != "sigmoid"):
            raise ValueError("`label_smoothing` applies to `method: dpo` with `loss_type: sigmoid` only")
        if self.kl_to_base and (self.method != "sft" or not self.use_lora):
            raise ValueError("`kl_to_base` applies to `method: sft` with `use_lora: true` (the base is the model "
                             "with its adapters disabled)")
        if self.kl_anchor_path and not self.kl_to_base:
            raise ValueError("`kl_anchor_path` needs `kl_to_base` > 0: the anchor text is where the KL is measured")
        if self.freeze_language_model and self.use_lora:
            raise ValueError("`freeze_language_model` needs `use_lora: false`: LoRA adapts the language model, "
                             "so it would not be frozen (the align stage trains the projector alone)")
        if self.projector_learning_rate is not None and not self.train_projector:
            raise ValueError("`projector_learning_rate` needs `train_projector: true`")
        if self.quantize_base and not self.use_lora:
            raise ValueError("`quantize_base` (QLoRA) needs `use_lora: true`: a 4-bit base cannot be trained directly")
        if self.base_dtype not in ("auto", "float32") and not self.use_lora:
            raise ValueError(f"`base_dtype: {self.base_dtype}` needs `use_lora: true`: it sets the dtype of the frozen "
                             "base, and a full fine-tune trains every weight (kept in float32 for AdamW); use "
                             "`mixed_precision: bf16` for half-precision math")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    # Fields that change where things go or when they are saved, not the math: a run
    # may resume with different values of these.
    RESUME_NEUTRAL: ClassVar[frozenset[str]] = frozenset({
        "data_path", "val_data_path", "kl_anchor_path",  # the data's sha256 is checked on its own
        "data_pipeline",  # so is the cleaned file's: a change that cleans alike may resume
        "output_dir", "checkpoint_dir", "checkpoint_remote", "checkpoint_upload_attempts", "spot_defaults", "checkpoint_every_steps", "checkpoint_every_minutes", "keep_last_checkpoints",
        "resume", "force_resume", "watch_gcp_preemption", "log_every_steps", "num_samples", "sample_max_new_tokens",
        "eval_every_steps", "merge_adapter", "output_name", "output_version", "compile", "check_memory",
    })

    # Keys introduced from this release on count only when set off their default, so an
    # upgrade that adds keys still resumes the checkpoints the previous release wrote.
    HASHED_WHEN_SET_SINCE: ClassVar[str] = "1.5.0"

    def training_hash(self) -> str:
        """sha256 of the fields that decide the trained weights."""
        relevant = {k: v for k, v in sorted(self.to_dict().items())
                    if k not in self.RESUME_NEUTRAL and not self._default_and_new(k, v)}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()

    def _default_and_new(self, key: str, value: Any) -> bool:
        def version(text: str) -> tuple[int, ...]:
            return tuple(int(part) for part in text.split("."))

        new = version(FIELD_SINCE[key]) >= version(self.HASHED_WHEN_SET_SINCE)
        return new and value == type(self).model_fields[key].get_default(call_default_factory=True)


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(recipe)"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, list(TrainingConfig.model_fields), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            lines.append(f"{origin}: unknown key `{key}`{hint}")
        elif not e["loc"]:  # a rule across fields
            lines.append(f"{origin}: {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "missing":
            lines.append(f"{origin}: `{key}` is required")
        else:
            lines.append(f"{origin}: `{key}`: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def build_config(values: dict[str, Any], origin: str = "config") -> TrainingConfig:
    try:
        return TrainingConfig.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are parsed as YAML scalars/lists (`lora_rank=8`, `packing=false`)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: an int over 4,300 digits
            reason = getattr(err, "problem", None) or ("nested too deeply" if isinstance(err, RecursionError) else err)
            raise ConfigError(f"override `{key.strip()}`: invalid YAML value {_clip(raw)}: {reason}") from None
    return parsed


def _clip(raw: str, limit: int = 60) -> str:
    return repr(raw if len(raw) <= limit else raw[:limit] + "...")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainingConfig:
    """A recipe file plus command-line overrides, validated together."""
    values: dict[str, Any] = {}
    origin = "overrides"
    if path is not None:
        origin = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such recipe file") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
        except ValueError as err:  # e.g. an integer over 4,300 digits
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of TrainingConfig keys, got {type(loaded).__name__}")
        values.update(loaded or {})
    values.update(parse_overrides(overrides or []))
    return build_config(values, origin)
