"""Images through llama.cpp (libmtmd) with a tiny random Idefics3 / SmolVLM model (issue #20).

The model and its GGUFs come from tiny_vision.py (built and converted once per session).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from tiny_vision import TinyVision, image_url, tiny_vision


@pytest.fixture(scope="module")
def idefics3_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[Path, Path]]:
    """{image_tokens: (text GGUF, mmproj GGUF)}: the tiny model converted with SmolVLM's image
    tokens in its tokenizer and with SmolLM2's plain tokenizer (the same weights; the
    converter pads the vocabulary with [PAD] tokens where the image tokens were)."""
    built: TinyVision = tiny_vision(tmp_path_factory)
    return {True: (built.text_gguf, built.mmproj), False: (built.plain_text_gguf, built.mmproj)}


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


# -- PrimeModel on a PRIME vision directory ------------------------------------------------

QUESTION = {"type": "text", "text": "What colour?"}


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vision(tmp_path_factory).prime_dir


@pytest.fixture(scope="module")
def vision_model(vision_dir: Path):
    from jarvis_prime import PrimeModel

    model = PrimeModel.from_pretrained(vision_dir, backend="llamacpp", device="cpu")
    yield model
    model.close()


def ask(image, kind: str = "image") -> list[dict]:
    part = {"type": "image", "image": image} if kind == "image" else {"type": "image_url", "image_url": {"url": image}}
    return [{"role": "user", "content": [part, QUESTION]}]


def first_logits(model, messages) -> np.ndarray:
    """The logits of the first reply token, from the prompt PrimeModel decodes (llama.cpp's own buffer)."""
    import llama_cpp

    from jarvis_prime.models.mtmd import evaluate_media

    backend, media = model._backend, model.encode_chat(messages).media
    evaluate_media(backend._vision, backend._llm, media.text, media.images)
    pointer = llama_cpp.llama_get_logits_ith(backend._llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(backend._llm.n_vocab(),)).copy()


def test_prime_vision_directory_records_its_projector_and_loads_it(vision_model, vision_dir):
    from jarvis_prime.manifest import read_manifest

    manifest = read_manifest(vision_dir)
    assert manifest.task == "vision"
    assert manifest.quantizations["f16"].mmproj == "gguf/mmproj-tiny-vision-f16.gguf"
    assert manifest.quantizations["f16"].mmproj in manifest.files  # hashed like every weight file
    assert vision_model.runtime.mmproj == "gguf/mmproj-tiny-vision-f16.gguf"
    assert vision_model.sees_images


def test_every_image_form_gives_the_same_greedy_answer(vision_model, tmp_path):
    """Path, bytes, PIL image, an OpenAI data: URL and lossless WebP bytes are one image: one
    prompt, one answer."""
    from PIL import Image

    from tiny_vision import png_bytes

    data = png_bytes(0)
    (tmp_path / "img.png").write_bytes(data)
    webp = io.BytesIO()  # a format llama.cpp's stb_image cannot read: re-encoded as PNG on the way
    Image.open(tmp_path / "img.png").save(webp, format="WEBP", lossless=True)
    forms = [ask(tmp_path / "img.png"), ask(str(tmp_path / "img.png")), ask(data),
             ask(Image.open(tmp_path / "img.png")), ask(image_url(0), kind="image_url"), ask(webp.getvalue())]
    prompts = [vision_model.encode_chat(m) for m in forms]
    answers = [vision_model.chat(m, max_new_tokens=6) for m in forms]
    assert answers[0] and set(answers) == {answers[0]}, answers
    assert all(p.ids == prompts[0].ids for p in prompts)
    assert vision_model.chat(forms[0], max_new_tokens=6) == answers[0]  # greedy repeats


def test_image_prompt_counts_its_image_embeddings(vision_model):
    from jarvis_prime.models.mtmd import IMAGE_POSITION

    with_image = vision_model.encode_chat(ask(image_url(0), kind="image_url"))
    text_only = vision_model.encode_chat([{"role": "user", "content": [QUESTION]}])
    assert with_image.ids.count(IMAGE_POSITION) >= 5 * 4  # 2x2 tiles + overview, 4 tokens each
    assert text_only.media is None and IMAGE_POSITION not in text_only.ids
    # text parts alone are joined: the prompt a plain string makes, for any chat template
    assert text_only.ids == vision_model.encode_chat([{"role": "user", "content": QUESTION["text"]}]).ids
    reply = vision_model.complete(with_image, max_new_tokens=3)
    assert reply.prompt_tokens == len(with_image.ids) and reply.completion_tokens >= 1


def test_a_different_image_changes_the_first_token_distribution(vision_model):
    same_a = first_logits(vision_model, ask(image_url(0), kind="image_url"))
    same_b = first_logits(vision_model, ask(image_url(0), kind="image_url"))
    other = first_logits(vision_model, ask(image_url(1), kind="image_url"))
    np.testing.assert_allclose(same_a, same_b, rtol=1e-5, atol=1e-5)
    assert np.abs(same_a - other).max() > 1e-3


def test_streaming_an_image_answer_equals_the_whole_answer(vision_model, capfd):
    messages = ask(image_url(2), kind="image_url")
    pieces = list(vision_model.chat(messages, stream=True, max_new_tokens=6))
    assert pieces and "".join(pieces) == vision_model.chat(messages, max_new_tokens=6)
    out, err = capfd.readouterr()
    assert "image" not in out + err  # libmtmd's per-image log lines stay quiet (route_mtmd_logs)


def last_logits(model) -> np.ndarray:
    """The logits llama.cpp computed last (after a 1-token completion: the prompt's last position)."""
    import llama_cpp

    llm = model._backend._llm
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()


def test_text_prompt_is_never_answered_from_an_image_in_the_cache(vision_model):
    """llama-cpp-python reuses the cached prefix of a prompt whose ids match what it last
    decoded. MTMDChatHandler leaves image positions holding the previous prompt's ids, so a
    text prompt spelling out the image prompt around them would be answered from the image's
    embeddings; with IMAGE_POSITION there, it is decoded afresh."""
    from jarvis_prime.models.mtmd import IMAGE_POSITION
    from jarvis_prime.models.prime_model import Prompt

    image_prompt = vision_model.encode_chat(ask(image_url(3), kind="image_url"))
    filler = vision_model.tokenize(" a")[0]
    text_prompt = Prompt([filler if t == IMAGE_POSITION else t for t in image_prompt.ids])
    vision_model.complete(text_prompt, max_new_tokens=1)
    before = last_logits(vision_model)
    vision_model.complete(image_prompt, max_new_tokens=1)
    seen = last_logits(vision_model)
    vision_model.complete(text_prompt, max_new_tokens=1)
    np.testing.assert_allclose(last_logits(vision_model), before, rtol=1e-4, atol=1e-4)
    assert np.abs(seen - before).max() > 1e-3  # the image did change them: the check above can fail


def test_bad_images_and_parts_are_errors_naming_the_part(vision_model, tmp_path):
    from jarvis_prime.errors import ImageInputError

    cases = [
        (ask(b"\x89PNG\r\n\x1a\n" + b"\0" * 64), r"messages\[0\]\.content\[0\]: llama.cpp cannot decode"),
        (ask(b"not an image at all"), r"messages\[0\]\.content\[0\]: not an image"),
        (ask(tmp_path / "missing.png"), r"messages\[0\]\.content\[0\]: .*missing\.png: no such image file"),
        (ask("data:image/png;base64,@@@", kind="image_url"), r"content\[0\]: .*not valid base64"),
        (ask("https://example.com/a.png", kind="image_url"), r"content\[0\]: remote image URLs are not fetched"),
        ([{"role": "user", "content": [QUESTION, {"type": "audio", "audio": "x"}]}],
         r"messages\[0\]\.content\[1\]: unknown content part 'audio'"),
        ([*ask(image_url(0), kind="image_url"), {"role": "assistant", "content": ask(image_url(1))[0]["content"]}],
         r"messages\[1\]\.content\[0\]: an image part in a turn of role 'assistant'; images go in user turns only"),
    ]
    for messages, pattern in cases:
        with pytest.raises(ImageInputError, match=pattern):
            vision_model.chat(messages, max_new_tokens=2)
    assert vision_model.chat(ask(image_url(0), kind="image_url"), max_new_tokens=2)  # still answers


def test_prime_eval_variants_of_a_vision_gguf_see_through_its_projector(vision_dir, vision_model):
    """`prime eval --quant f16` (load_variant) loads the mmproj recorded with the GGUF and
    answers an image as from_pretrained's model does."""
    from jarvis_prime.evaluation import load_variant

    with load_variant(vision_dir, "f16") as model:
        assert model.sees_images and model.runtime.mmproj
        assert model.chat(ask(image_url(0)), max_new_tokens=4) == vision_model.chat(ask(image_url(0)), max_new_tokens=4)


def _variant(vision_dir: Path, folder: Path, **changes) -> Path:
    """A copy of the PRIME directory with its f16 quantization / manifest changed (no rehash)."""
    import json
    import shutil

    shutil.copytree(vision_dir, folder)
    manifest = json.loads((folder / "prime.json").read_text())
    for key, value in changes.items():
        if key == "mmproj":
            manifest["quantizations"]["f16"]["mmproj"] = value
        elif key == "unlist":
            del manifest["files"][value]
        else:
            manifest[key] = value
    (folder / "prime.json").write_text(json.dumps(manifest))
    return folder


def test_an_image_to_a_model_that_cannot_see_is_refused_not_dropped(vision_dir, tmp_path):
    from jarvis_prime import PrimeModel
    from jarvis_prime.errors import ImageNotSupportedError

    image = ask(image_url(0), kind="image_url")
    no_projector = _variant(vision_dir, tmp_path / "no-projector", mmproj=None)
    text_model = _variant(vision_dir, tmp_path / "text", mmproj=None, task="chat")
    for folder, why in [(no_projector, "has no projector"), (text_model, "is a chat model and cannot see images")]:
        with PrimeModel.from_pretrained(folder, backend="llamacpp", device="cpu") as model:
            assert not model.sees_images
            with pytest.raises(ImageNotSupportedError, match=why):
                model.chat(image, max_new_tokens=2)
            with pytest.raises(ImageNotSupportedError):
                list(model.chat(image, stream=True, max_new_tokens=2))
            assert model.chat([{"role": "user", "content": [QUESTION]}], max_new_tokens=2)  # text still works


def test_the_projector_is_loaded_only_when_listed_and_intact(vision_dir, tmp_path):
    from jarvis_prime import PrimeModel
    from jarvis_prime.errors import IntegrityError

    unlisted = _variant(vision_dir, tmp_path / "unlisted", unlist="gguf/mmproj-tiny-vision-f16.gguf")
    with pytest.raises(IntegrityError, match="weight files not listed.*gguf/mmproj-tiny-vision-f16.gguf"):
        PrimeModel.from_pretrained(unlisted, backend="llamacpp", device="cpu")
    missing = _variant(vision_dir, tmp_path / "missing")
    (missing / "gguf/mmproj-tiny-vision-f16.gguf").unlink()
    with pytest.raises(IntegrityError, match="mmproj-tiny-vision-f16.gguf: listed in prime.json but missing"):
        PrimeModel.from_pretrained(missing, backend="llamacpp", device="cpu")
    tampered = _variant(vision_dir, tmp_path / "tampered")
    with open(tampered / "gguf/mmproj-tiny-vision-f16.gguf", "r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\xff" * 8)
    with pytest.raises(IntegrityError, match="mmproj-tiny-vision-f16.gguf: sha256"):
        PrimeModel.from_pretrained(tampered, backend="llamacpp", device="cpu")


@pytest.mark.parametrize("quant, message", [
    ({"file": "model.safetensors", "format": "safetensors", "bits": 32, "mmproj": "gguf/m.gguf"},
     "goes with a gguf quantization"),
    ({"file": "gguf/t.gguf", "format": "gguf", "bits": 16, "mmproj": "../m.gguf"}, "relative path to a .gguf"),
    ({"file": "gguf/t.gguf", "format": "gguf", "bits": 16, "mmproj": "gguf/m.bin"}, "relative path to a .gguf"),
])
def test_manifest_refuses_a_misplaced_projector(tmp_path, quant, message):
    import json

    from jarvis_prime.errors import ManifestError
    from jarvis_prime.manifest import read_manifest

    (tmp_path / "prime.json").write_text(json.dumps({
        "name": "v", "version": "1", "task": "vision", "base": "b", "context_length": 64,
        "quantizations": {"q": quant}}))
    with pytest.raises(ManifestError, match=f"field quantizations.q.*{message}"):
        read_manifest(tmp_path)


# -- the transformers backend on the same PRIME directory ---------------------------------

@pytest.fixture(scope="module")
def hf_vision_model(vision_dir: Path):
    pytest.importorskip("transformers")
    from jarvis_prime import PrimeModel

    model = PrimeModel.from_pretrained(vision_dir, backend="transformers", device="cpu")
    yield model
    model.close()


def test_transformers_backend_answers_the_same_image_call(hf_vision_model, vision_model, tmp_path):
    """AutoModelForImageTextToText + AutoProcessor from the PRIME directory take the same
    content parts. Greedy answers are compared with llama.cpp but not required to agree:
    the two preprocess images differently (see the report in the test's output)."""
    from tiny_vision import png_bytes

    assert hf_vision_model.runtime.backend == "transformers" and hf_vision_model.sees_images
    (tmp_path / "img.png").write_bytes(png_bytes(0))
    messages = ask(tmp_path / "img.png")
    answer = hf_vision_model.chat(messages, max_new_tokens=6)
    assert answer and hf_vision_model.chat(ask(image_url(0), kind="image_url"), max_new_tokens=6) == answer
    assert "".join(hf_vision_model.chat(messages, stream=True, max_new_tokens=6)) == answer
    prompt = hf_vision_model.encode_chat(messages)
    image_token = hf_vision_model._backend.tokenizer.convert_tokens_to_ids("<image>")
    assert prompt.ids.count(image_token) >= 5 * 4  # the processor expanded the image: tiles + overview
    reply = hf_vision_model.complete(prompt, max_new_tokens=3)
    assert reply.prompt_tokens == len(prompt.ids)
    other = hf_vision_model.complete(hf_vision_model.encode_chat(ask(png_bytes(1))), max_new_tokens=6)
    assert other.text != answer  # it sees the image
    assert len(prompt.ids) == len(vision_model.encode_chat(messages).ids)  # same tiles, same image tokens
    print(f"\ngreedy answers, same image: transformers {answer!r}, llama.cpp "
          f"{vision_model.chat(messages, max_new_tokens=6)!r}; other image on transformers {other.text!r}; "
          f"prompt tokens transformers {len(prompt.ids)}, llama.cpp {len(vision_model.encode_chat(messages).ids)}")


def test_a_vision_directory_whose_vocabulary_lacks_the_image_tokens_fails_at_load(tmp_path_factory, tmp_path):
    """The projector is opened, and the text vocabulary checked, when the model loads: not on
    the first image question (issue #20's llama_decode -1)."""
    import shutil

    from jarvis_prime import PrimeModel
    from jarvis_prime.manifest import read_manifest, write_manifest
    from jarvis_prime.models.mtmd import MediaTokenError

    built = tiny_vision(tmp_path_factory)
    folder = tmp_path / "plain-vocab"
    shutil.copytree(built.prime_dir, folder)
    shutil.copy(built.plain_text_gguf, folder / "gguf/tiny-vision-f16.gguf")
    write_manifest(folder, read_manifest(folder), changed=["gguf/tiny-vision-f16.gguf"])
    with pytest.raises(MediaTokenError, match="<fake_token_around_image>.*<global-img>"):
        PrimeModel.from_pretrained(folder, backend="llamacpp", device="cpu")
