"""The Idefics3 / SmolVLM models this project builds: shape, processor, assembly, rebuild.

One architecture for every PRIME vision model (SmolVLM-256M is SmolLM2-135M + a SigLIP
encoder + a pixel-shuffle connector; the 7B-class catalog entry is the same family):
transformers runs it as Idefics3ForConditionalGeneration, llama.cpp's converter writes its
projector as an IDEFICS3 mmproj and libmtmd runs that. This module holds what both the
training recipe (`recipes/vision_model.py`), the store (rebuilding the shipped small
model on `prime pull`) and models/mtmd.py need, below all of them (a leaf): torch and transformers are imported
inside the functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# SmolVLM's image tokens: libmtmd brackets each tile with them, so a text model's vocabulary
# must hold them (models/mtmd.py checks).
IDEFICS3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<fake_token_around_image>", "<image>", "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)

# ChatML like SmolLM2's, without its default system prompt (every token is a position the
# 135M model pays for), and content either a string or OpenAI-style parts; each image
# part becomes the processor's <image>, which it expands into the tiles' tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ENCODER_FILE = "encoder.safetensors"  # the shipped encoder, beside the LoRA adapter


@dataclass(frozen=True)
class EncoderShape:
    """The vision encoder (SigLIP as transformers' Idefics3 builds it) and the tiling it sees.

    96 px tiles of 16 px patches, pixel-shuffled by 2: 9 LM tokens per tile; images up to
    192 px on their longest side: 2 x 2 tiles plus the overview, 45 tokens for a square
    image. Small on purpose: every image token costs a position in the 135M LM's forward
    and backward pass, the recipe's bottleneck.
    """

    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 6
    num_heads: int = 2
    tile: int = 96
    patch: int = 16
    longest_edge: int = 192
    scale_factor: int = 2

    @property
    def patches_per_side(self) -> int:
        return self.tile // self.patch

    @property
    def tokens_per_tile(self) -> int:
        return (self.patches_per_side // self.scale_factor) ** 2

    def vision_config(self) -> dict[str, Any]:
        return dict(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                    image_size=self.tile, patch_size=self.patch)


def processor_for(tokenizer, shape: EncoderShape):
    """The Idefics3 processor for `shape`: the longest edge to `longest_edge`, tiles of
    `tile` plus the overview (what llama.cpp's libmtmd does for every image, so both
    backends see the same tiles and tokens), Lanczos resampling as libmtmd's."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    images = Idefics3ImageProcessor(size={"longest_edge": shape.longest_edge},
                                    max_image_size={"longest_edge": shape.tile}, do_image_splitting=True,
                                    resample=1, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=shape.tokens_per_tile,
                             chat_template=CHAT_TEMPLATE)


def assemble_vision_model(base_dir: Path, encoder_state: dict[str, Any], shape: EncoderShape,
                          *, connector: Any = None, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) of an Idefics3 model, in memory: the base LM (float32 safetensors
    in `base_dir`), `encoder_state` as its vision model, the connector's projection
    `connector` (a (text hidden, vision hidden * scale^2) tensor) or a fresh one (seeded),
    SmolVLM's image tokens added to the tokenizer (their embeddings start at the mean of
    the base's). `save_vision_model` writes them as a Hugging Face directory."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
    )

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IDEFICS3_SPECIAL_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = processor_for(tokenizer, shape)  # first: it adds <end_of_utterance> to the tokenizer
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    text_config = base.config.to_dict()
    text_config.update(vocab_size=len(tokenizer), architectures=["VLlama3ForCausalLM"])  # what SmolVLM's says
    config = Idefics3Config(text_config=text_config, vision_config=shape.vision_config(),
                            scale_factor=shape.scale_factor, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            tie_word_embeddings=base.config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    text_state = base.model.state_dict()
    embeddings = text_state["embed_tokens.weight"]
    added = len(tokenizer) - embeddings.shape[0]
    text_state["embed_tokens.weight"] = torch.cat([embeddings, embeddings.mean(0, keepdim=True).expand(added, -1)])
    model.model.text_model.load_state_dict(text_state, strict=True)
    model.model.vision_model.load_state_dict(encoder_state, strict=True)
    if connector is not None:
        model.model.connector.modality_projection.proj.weight.data.copy_(connector)
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model, processor


def save_vision_model(model, processor, out: Path) -> Path:
    """A Hugging Face directory: the safetensors weights, the processor (tokenizer,
    processor_config.json) plus preprocessor_config.json (transformers 5 keeps the image
    settings inside processor_config.json, llama.cpp's converter reads them from
    preprocessor_config.json) and the chat template."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out


def image_processor_config(folder: Path) -> dict[str, Any]:
    """The image processor's settings: inside processor_config.json (transformers 5 writes
    them there) or, from older writers, preprocessor_config.json."""
    if (folder / "processor_config.json").is_file():
        config = json.loads((folder / "processor_config.json").read_text())
        if "image_processor" in config:
            return config["image_processor"]
    return json.loads((folder / "preprocessor_config.json").read_text())


def build_from_shipped(base_dir: Path, shipped: Path, out: Path) -> Path:
    """The trained model as a Hugging Face directory, rebuilt from the package's files on the
    base: assemble with the shipped encoder, then merge the LoRA (and load the connector),
    all in memory: one directory written."""
    from peft import PeftModel
    from safetensors.torch import load_file

    config = json.loads((shipped / "config.json").read_text())
    vision = config["vision_config"]
    shape = EncoderShape(hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                         num_layers=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
                         tile=vision["image_size"], patch=vision["patch_size"], scale_factor=config["scale_factor"],
                         longest_edge=image_processor_config(shipped)["size"]["longest_edge"])
    encoder = {k: v.float() for k, v in load_file(shipped / ENCODER_FILE).items()}
    model, processor = assemble_vision_model(base_dir, encoder, shape)
    merged = PeftModel.from_pretrained(model, shipped).merge_and_unload()
    return save_vision_model(merged, processor, out)
