"""The JSON bodies the page's API accepts (unknown fields are refused), and a stored
message as the API returns it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jarvis.vision import MAX_IMAGE_BYTES, MAX_IMAGES_PER_MESSAGE, read_image
from jarvis_prime.serving.errors import APIError
from jarvis_prime.serving.types import ImagePart, Part, TextPart, base64_decoded_size, check_image_part

MAX_MESSAGE_CHARS = 32_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewConversation(_Strict):
    title: str = Field("", max_length=200)
    private: bool = False


class ConversationPatch(_Strict):
    title: str | None = Field(None, max_length=200)
    private: bool | None = None


class UserMessage(_Strict):
    """A message: text, or OpenAI content parts, `{"type": "text", "text"}` and `{"type":
    "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (no remote URLs)."""

    content: str | list[Part] = Field(min_length=1)

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content if isinstance(p, TextPart))
        if len(text) > MAX_MESSAGE_CHARS:
            raise APIError(400, f"content: {len(text)} characters of text; at most {MAX_MESSAGE_CHARS}")
        return text.strip()

    def images(self) -> list[bytes]:
        """The images, each checked before it is decoded (count, data: URL, size), then read;
        a bad one is a 400 naming its part (`content[1]`)."""
        parts = [] if isinstance(self.content, str) else [
            (f"content[{j}]", p) for j, p in enumerate(self.content) if isinstance(p, ImagePart)]
        if len(parts) > MAX_IMAGES_PER_MESSAGE:
            raise APIError(400, f"content: {len(parts)} images in one message; at most {MAX_IMAGES_PER_MESSAGE}")
        images = []
        for where, part in parts:
            size = base64_decoded_size(part.image_url.url.partition(",")[2])
            if size > MAX_IMAGE_BYTES:
                raise APIError(413, f"{where}: the image is {size} bytes, over JARVIS's limit of "
                               f"{MAX_IMAGE_BYTES // (1024 * 1024)} MiB per image")
            check_image_part(part, where, MAX_IMAGE_BYTES)  # a data: URL, never a remote one
            try:
                images.append(read_image(part.image_url.url, where))
            except ValueError as err:
                raise APIError(400, str(err)) from None
        return images


class Rating(_Strict):
    rating: Literal[1, -1] | None


class Correction(_Strict):
    content: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


class ModelSwap(_Strict):
    model: str | None = Field(None, min_length=1, max_length=4096,
                              description="PRIME model name (catalog or store; a directory only with "
                                          "--allow-model-paths); default: the configured one")


def message_json(m) -> dict[str, Any]:
    """A stored message; `images` are sha256s, each served by GET /api/images/{sha256}; `thinking`
    a thinking model's reasoning (the page folds it above the reply); `tool_calls` the tools the
    reply called, {id, name, arguments, result, error} each (folded too)."""
    return {"id": m.id, "role": m.role, "content": m.content, "original": m.original, "rating": m.rating,
            "corrected": m.corrected, "model": m.model, "images": list(m.images), "thinking": m.thinking,
            "tool_calls": list(m.tool_calls)}
