"""`prime serve` with images (issue #20): OpenAI `image_url` parts with data: URLs reach the
tiny vision model (tiny_vision.py) through a real uvicorn server; limits, bad images and
images sent to a model that cannot see are 4xx in OpenAI's shape, naming the field."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import openai
import pytest

from test_server import raw, running
from tiny_vision import image_url, png_bytes, tiny_vision

from jarvis_prime.serving.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMAGE_BYTES, ServerConfig

MAX_IMAGE_BYTES = 100_000  # the test server's limit: the 128x96 test PNGs fit, a 400x300 one does not
QUESTION = {"type": "text", "text": "What colour?"}


def ask(*urls: str) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u, "detail": "auto"}}
                                           for u in urls), QUESTION]}]


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vision(tmp_path_factory).prime_dir


@pytest.fixture(scope="module")
def server(vision_dir: Path):
    config = ServerConfig(model=str(vision_dir), backend="llamacpp", max_images=2, max_image_bytes=MAX_IMAGE_BYTES)
    with running(config) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(vision_dir: Path):
    from jarvis_prime import PrimeModel

    with PrimeModel.from_pretrained(vision_dir, backend="llamacpp", device="cpu") as loaded:
        yield loaded


def post(server: str, messages: list[dict], **extra) -> tuple[int, dict]:
    status, _, payload = raw(server, "/v1/chat/completions",
                             json.dumps({"messages": messages, "max_tokens": 4, **extra}).encode())
    return status, payload


def test_an_image_question_is_answered_as_the_model_answers_it_and_counts_the_image(client, model):
    reply = client.chat.completions.create(model=model.name, messages=ask(image_url(0)), max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == model.chat(ask(image_url(0)), max_new_tokens=6, temperature=0.0)
    assert reply.usage.completion_tokens > 0
    # the image's embeddings are part of the prompt, as the model counts them
    assert reply.usage.prompt_tokens == len(model.encode_chat(ask(image_url(0))).ids)
    text_only = client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": [QUESTION]}],
                                               max_tokens=1, temperature=0)
    assert reply.usage.prompt_tokens >= text_only.usage.prompt_tokens + 5 * 4  # 2x2 tiles + overview, 4 tokens each


def test_streaming_an_image_answer_equals_the_whole_answer(client, model):
    whole = client.chat.completions.create(model=model.name, messages=ask(image_url(1)), max_tokens=6, temperature=0)
    stream = client.chat.completions.create(model=model.name, messages=ask(image_url(1)), max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage.prompt_tokens == whole.usage.prompt_tokens


NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"plain text, not pixels").decode()


@pytest.mark.parametrize("messages, status, param, code, words", [
    (ask("data:image/png;base64,@@not base64@@"), 400, "messages[0].content[0]", "invalid_image", "base64"),
    (ask(image_url(0), "data:image/png;base64,abc"), 400, "messages[0].content[1]", "invalid_image", "base64"),
    (ask(NOT_AN_IMAGE), 400, "messages[0].content[0]", "invalid_image", "not an image"),
    (ask(image_url(0), image_url(1), image_url(2)), 400, "messages", "too_many_images", "at most 2"),
    (ask("data:image/png;base64," + base64.b64encode(png_bytes(0, (400, 300))).decode()), 413,
     "messages[0].content[0]", "image_too_large", "--max-image-bytes"),
    (ask("https://example.com/cat.png"), 400, "messages[0].content[0]", "remote_image_url", "not fetched"),
    (ask("/etc/passwd"), 400, "messages[0].content[0]", "invalid_image_url", "data: URL"),  # never read as a path
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], 400,
     "messages.0.content.0.image_url.image_url.url", "invalid_value", "required"),
    ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], 400, "messages.0.content.0", "invalid_value",
     "'video'"),
    # images go in user turns only (refused before any image is read)
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [QUESTION, *ask(image_url(0))[0]["content"]]}],
     400, "messages[1].content[1]", "invalid_image", "role 'assistant'; images go in user turns only"),
    ([{"role": "system", "content": ask("https://example.com/cat.png")[0]["content"]}, *ask(image_url(0))], 400,
     "messages[0].content[0]", "invalid_image", "role 'system'"),
])
def test_bad_images_are_4xx_naming_the_field(server, messages, status, param, code, words):
    for stream in (False, True):
        got, payload = post(server, messages, stream=stream)
        assert got == status, payload
        error = payload["error"]
        assert error["code"] == code and words in error["message"] and error["type"] == "invalid_request_error"
        assert error["param"] == param


def test_the_default_body_limit_lets_an_image_at_the_default_image_limit_through():
    assert DEFAULT_MAX_BODY_BYTES > DEFAULT_MAX_IMAGE_BYTES * 4 / 3 + 64 * 1024  # base64 + a chat around it


def test_an_image_to_a_model_that_cannot_see_is_a_400_never_an_answer(vision_dir, tmp_path):
    """The same weights as a text (chat) model: it has no projector, so an image is refused, text still answered."""
    folder = tmp_path / "text"
    shutil.copytree(vision_dir, folder)
    manifest = json.loads((folder / "prime.json").read_text())
    manifest["task"], manifest["quantizations"]["f16"]["mmproj"] = "chat", None
    (folder / "prime.json").write_text(json.dumps(manifest))
    with running(ServerConfig(model=str(folder), backend="llamacpp")) as url:
        for stream in (False, True):
            status, payload = post(url, ask(image_url(0)), stream=stream)
            assert status == 400, payload
            assert payload["error"]["code"] == "images_not_supported"
            assert "cannot see images" in payload["error"]["message"]
        status, payload = post(url, [{"role": "user", "content": [QUESTION]}])
        assert status == 200 and payload["choices"][0]["message"]["content"] is not None
