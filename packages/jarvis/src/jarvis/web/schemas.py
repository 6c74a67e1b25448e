"""The JSON bodies the page's API accepts (unknown fields are refused), and a stored
message as the API returns it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_MESSAGE_CHARS = 32_000
MAX_IMAGE_BASE64_CHARS = 16 << 20  # the body limit (WebConfig.max_body_bytes) bounds it first


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewConversation(_Strict):
    title: str = Field("", max_length=200)
    private: bool = False


class ConversationPatch(_Strict):
    title: str | None = Field(None, max_length=200)
    private: bool | None = None


class UserMessage(_Strict):
    content: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


class Rating(_Strict):
    rating: Literal[1, -1] | None


class Correction(_Strict):
    content: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


class ModelSwap(_Strict):
    model: str | None = Field(None, min_length=1, max_length=4096,
                              description="PRIME model name (catalog or store; a directory only with "
                                          "--allow-model-paths); default: the configured one")


class ImageQuestion(_Strict):
    image: str = Field(max_length=MAX_IMAGE_BASE64_CHARS, description="base64 of a PNG, JPEG, GIF or WebP file")
    question: str = Field("", max_length=MAX_MESSAGE_CHARS)


def message_json(m) -> dict[str, Any]:
    return {"id": m.id, "role": m.role, "content": m.content, "original": m.original, "rating": m.rating,
            "corrected": m.corrected, "model": m.model}
