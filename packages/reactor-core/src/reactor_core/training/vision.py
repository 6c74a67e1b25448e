"""Vision-language models: which part is which, and how an image becomes tokens.

A vision-language model is three parts: a vision tower (image encoder), a projector (the
connector that maps its features into the language model's embedding space) and the
language model. Training recipes freeze or train them separately (`train_vision_tower`,
`train_projector`, `freeze_language_model`), LoRA adapts the language model only, and
the loss runs the model's multimodal body (the image features merged in at the image
tokens) before the LM head. `FAMILIES` names the parts per `model_type`: adding a
LLaVA-style family (vision_tower / multi_modal_projector / language_model) is one entry
plus, if its processor expands image tokens differently, its `image_text`.

A model is a vision model when its config.json has `vision_config` (what transformers'
AutoModelForImageTextToText loads); everything else is a text model and takes none of
this path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from reactor_core.data.images import ImagePart
from reactor_core.training.config import ConfigError, TrainingConfig

ImageText = Callable[[Any, ImagePart], str]  # (processor, image) -> the text one image placeholder becomes


def idefics3_image_text(processor: Any, image: ImagePart) -> str:
    """What Idefics3Processor writes for one `<image>`: one block of `image_seq_len` image
    tokens per tile (`<row_R_col_C>` tagged), then the global image. The tile grid comes
    from the image's size alone (`get_number_of_image_patches`, the processor's own
    arithmetic), so tokenizing needs no pixels: the image processor runs in collate only."""
    _, rows, cols = processor.image_processor.get_number_of_image_patches(image.height, image.width)
    return processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)


@dataclass(frozen=True)
class VisionFamily:
    """Where a vision-language architecture keeps its parts (dotted module paths from the
    top-level model) and how its processor expands one image placeholder."""

    vision_tower: str
    projector: str
    language_model: str
    lm_head: str
    image_text: ImageText

    def parts(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Parameters per part: `vision_tower`, `projector`, `language_model` (the LM head included)."""
        found: dict[str, list[nn.Parameter]] = {"vision_tower": [], "projector": [], "language_model": []}
        for name, param in model.named_parameters():
            found[self.part_of(name)].append(param)
        return found

    def part_of(self, name: str) -> str:
        """The part a (possibly peft- or FSDP-prefixed) parameter name belongs to."""
        dotted = f".{name}."
        for part in ("vision_tower", "projector"):
            if f".{getattr(self, part).rsplit('.', 1)[-1]}." in dotted:
                return part
        return "language_model"

    def lora_targets(self, model: nn.Module, requested: list[str] | str, text_defaults: list[str] | str) -> str:
        """A peft regex (full match on module names) for the language model's linear layers
        only: never the vision tower's attention, whose projections share their names."""
        if requested == "all-linear" or (requested == "auto" and text_defaults == "all-linear"):
            lm = self.language_model + "."
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if n.startswith(lm) and isinstance(m, nn.Linear)})
        else:
            names = text_defaults if requested == "auto" else requested
        return rf"{re.escape(self.language_model)}\..*\.({'|'.join(re.escape(n) for n in names)})"


FAMILIES: dict[str, VisionFamily] = {
    # SmolVLM, Idefics3: Idefics3ForConditionalGeneration
    "idefics3": VisionFamily(vision_tower="model.vision_model", projector="model.connector",
                             language_model="model.text_model", lm_head="lm_head", image_text=idefics3_image_text),
}

# The recipe keys that only a vision model takes, with their defaults.
VISION_KEYS: dict[str, Any] = {"train_projector": True, "train_vision_tower": False, "freeze_language_model": False,
                               "projector_learning_rate": None}


def vision_model_type(model_dir: str | Path) -> str | None:
    """The `model_type` of a Hugging Face folder whose config.json has `vision_config`; else None."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    return config.get("model_type", "?") if isinstance(config, dict) and "vision_config" in config else None


def family_for(model_type: str, where: str) -> VisionFamily:
    """The family of a vision `model_type`; ConfigError naming the model when none is known."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(f"{where}: vision model type {model_type!r} is not supported for training yet "
                          f"(known: {', '.join(sorted(FAMILIES))})")
    return family


def check_vision_keys(config: TrainingConfig, vision: bool, where: str) -> None:
    """Refuse the vision keys on a text model, and vision runs the recipe cannot do."""
    if not vision:
        for key, default in VISION_KEYS.items():
            if getattr(config, key) != default:
                raise ConfigError(f"`{key}`: applies to vision models (config.json with `vision_config`); "
                                  f"{where} is a text model")
        return
    if config.packing:
        raise ConfigError("`packing`: not supported with a vision model (images are padded per batch, not "
                          "packed); set `packing: false`")
    if config.method != "sft":
        raise ConfigError(f"`method: {config.method}`: vision models train with `method: sft` only")
    if config.kl_to_base:
        raise ConfigError("`kl_to_base`: not supported with a vision model yet")
    if config.quantize_base:
        raise ConfigError("`quantize_base`: not supported with a vision model yet")


def set_trainable_parts(model: nn.Module, family: VisionFamily, config: TrainingConfig) -> None:
    """Without LoRA: requires_grad per part, exactly as the recipe keys say."""
    train = {"vision_tower": config.train_vision_tower, "projector": config.train_projector,
             "language_model": not config.freeze_language_model}
    for name, param in model.named_parameters():
        param.requires_grad_(train[family.part_of(name)])
    if not any(train.values()):
        raise ConfigError("`train_projector`, `train_vision_tower`, `freeze_language_model`: nothing left to train")


def modules_to_save(family: VisionFamily, config: TrainingConfig) -> list[str]:
    """With LoRA: the parts trained in full, saved with the adapter (peft `modules_to_save`)."""
    return ([family.projector] if config.train_projector else []) + \
           ([family.vision_tower] if config.train_vision_tower else [])
