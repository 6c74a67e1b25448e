"""Image questions: which model sees them, and images as JARVIS keeps them.

A user turn may carry images. The chat model answers it when it sees images itself
(`PrimeModel.sees_images`); otherwise the turn goes to a vision model: the one the user
configured (`--vision-model`, $JARVIS_VISION_MODEL), else the first `task: vision`
catalog model this machine has or can build offline, preferring the small offline
`prime-135m-vision-v1`, else a vision model imported into the store. When none is
here, `VisionUnavailableError` says what to `prime pull`; a text model never gets the
image (it would only pretend to see).

Images are checked before anything decodes them: a file's size on disk before it is
read, then the bytes' format from their first bytes (`jarvis_prime.models.content`
reads every image form, re-encoding what llama.cpp cannot decode as PNG).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from jarvis_prime import PrimeError
from jarvis_prime.catalog import load_catalog
from jarvis_prime.models.content import has_images, image_bytes, image_format
from jarvis_prime.store import find_local, list_local

PREFERRED_VISION_MODEL = "prime-135m-vision-v1"  # small, offline, shipped with jarvis-prime
VISION_MODEL_ENV = "JARVIS_VISION_MODEL"
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # one image, as stored
MAX_IMAGES_PER_MESSAGE = 4  # what reactor-core trains on by default (max_images_per_example)

Message = dict[str, Any]

__all__ = ["MAX_IMAGES_PER_MESSAGE", "MAX_IMAGE_BYTES", "PREFERRED_VISION_MODEL", "VisionUnavailableError",
           "has_images", "message_images", "message_text", "pick_vision_model", "read_image", "user_message"]


class VisionUnavailableError(PrimeError):
    """No vision model can answer here; the message says what to pull."""


def _check_size(size: int, where: str) -> None:
    if size > MAX_IMAGE_BYTES:
        raise ValueError(f"{where}: the image is {size} bytes, over JARVIS's limit of "
                         f"{MAX_IMAGE_BYTES // (1024 * 1024)} MiB per image")


def read_image(value: str | os.PathLike | bytes, where: str = "image") -> bytes:
    """The encoded image (PNG, JPEG, GIF or BMP bytes) at a path, in bytes or in a `data:`
    URL, or a ValueError naming `where`. A file's size is checked before it is read."""
    if isinstance(value, os.PathLike) or (isinstance(value, str) and not value.startswith("data:")):
        path = Path(value)
        if path.is_dir():
            raise ValueError(f"{where}: {path} is a directory, not an image")
        if path.is_file():
            _check_size(path.stat().st_size, where)
    elif isinstance(value, (bytes, bytearray)):
        _check_size(len(value), where)
    data = image_bytes(value, where)  # ImageInputError (a ValueError) names `where`
    _check_size(len(data), where)
    if image_format(data) is None:  # image_bytes re-encodes anything else; a guard, not a path
        raise ValueError(f"{where}: not a PNG, JPEG, GIF or BMP image")
    return data


def user_message(text: str, images: Sequence[bytes] = ()) -> Message:
    """A user turn: plain text, or the images (in order) then the text as content parts."""
    if not images:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [{"type": "image", "image": data} for data in images]
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def message_text(message: Mapping[str, Any]) -> str:
    """A message's text, whether its content is a string or parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content or () if p.get("type") == "text")


def message_images(message: Mapping[str, Any]) -> list[bytes]:
    """The image bytes a message carries (those `user_message` put there), in order."""
    content = message.get("content")
    if isinstance(content, str):
        return []
    return [p["image"] for p in content or () if p.get("type") == "image"]


def _buildable(name: str) -> bool:
    """In the store already, or built from files installed here (no download)."""
    if find_local(name) is not None:
        return True
    entry = load_catalog().find(name)
    return entry is not None and entry.offline_source() is not None


def pick_vision_model(configured: str | None = None) -> str:
    """The model for image turns: `configured` (a name or directory), else $JARVIS_VISION_MODEL,
    else the preferred catalog vision model that is here, else another catalog one, else one
    in the store; none -> VisionUnavailableError naming what to pull."""
    chosen = configured or os.environ.get(VISION_MODEL_ENV)
    if chosen:
        return chosen
    catalog = [m for m in load_catalog().models if m.task == "vision"]
    names = sorted((m.name for m in catalog), key=lambda name: name != PREFERRED_VISION_MODEL)
    for name in names:
        if _buildable(name):
            return name
    stored = [m.manifest.name for m in list_local() if m.manifest.task == "vision"]
    if stored:
        return stored[0]
    if not catalog:
        raise VisionUnavailableError("image questions need a vision model (task 'vision'), and the model catalog "
                                     "lists none; import one with `prime import` or pass --vision-model")
    pulls = []
    for entry in sorted(catalog, key=lambda m: m.name != PREFERRED_VISION_MODEL):
        need = entry.ram_gb.get("4bit") or min(entry.ram_gb.values())
        pulls.append(f"`prime pull {entry.name}` ({entry.description.rstrip('.')}; about {need:g} GB of RAM at 4-bit)")
    raise VisionUnavailableError(
        "image questions go to a vision model, and none is on this machine. Pull one: " + ", or ".join(pulls)
        + "; or name one with --vision-model / $JARVIS_VISION_MODEL."
    )
