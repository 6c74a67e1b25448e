"""OpenAI-style content parts in chat messages: text and images, checked in one place.

A message's `content` is a string or a list of parts:

    {"type": "text", "text": "What colour?"}
    {"type": "image", "image": "photo.png" | Path | bytes | PIL.Image.Image}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}   (OpenAI)

`split_images` takes every image out of the messages, in order, as encoded file bytes
(`image_bytes`: the one function that reads every image form), and puts a placeholder
part where each was, so each backend renders the chat template its own way: llama.cpp's
libmtmd wants its media marker in the text, a transformers processor the template's own
image token. Images go in user turns only. Errors name the part (`messages[0].content[1]`), so a client knows what to fix.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from jarvis_prime.errors import ImageInputError

# Encoded formats both backends decode: llama.cpp's stb_image (no WebP) and PIL. Anything
# else PIL can open (WebP, TIFF, ...) is re-encoded as PNG.
_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"GIF87a": "gif", b"GIF89a": "gif", b"BM": "bmp"}


@dataclass(frozen=True)
class EncodedImage:
    """One encoded image and the part it came from (`messages[0].content[1]`), for errors."""

    data: bytes
    where: str


@dataclass(frozen=True)
class Media:
    """A chat prompt with images: the rendered text (a marker where each image goes) and the images."""

    text: str
    images: tuple[EncodedImage, ...]


def image_format(data: bytes) -> str | None:
    """'png', 'jpeg', 'gif' or 'bmp' from the file's first bytes; None for anything else."""
    return next((kind for magic, kind in _MAGIC.items() if data.startswith(magic)), None)


def _is_pil_image(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "save")


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _from_data_url(url: str, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ImageInputError(f"{where}: a data: URL must be data:image/...;base64,<payload>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"{where}: the data: URL's payload is not valid base64") from None


def _read(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageInputError(f"{where}: {path}: no such image file") from None
    except OSError as err:
        raise ImageInputError(f"{where}: {path}: cannot read it ({err.strerror or err})") from None


def image_bytes(value: Any, where: str) -> bytes:
    """The encoded image (PNG, JPEG, GIF or BMP bytes) that `value` is: a path, raw file
    bytes, a PIL image or a `data:` URL. Remote URLs are refused: nothing is downloaded.
    Bytes in another format are re-encoded as PNG when PIL can read them."""
    if _is_pil_image(value):
        return _png(value)
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        raise ImageInputError(f"{where}: remote image URLs are not fetched; send the image as a data: URL or bytes")
    if isinstance(value, str) and value.startswith("data:"):
        data = _from_data_url(value, where)
    elif isinstance(value, (str, Path)):
        data = _read(Path(value), where)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise ImageInputError(f"{where}: an image is a path, bytes, a PIL image or a data: URL, "
                              f"got {type(value).__name__}")
    if image_format(data) is not None:
        return data
    return _reencoded(data, where)


def _reencoded(data: bytes, where: str) -> bytes:
    """`data` as PNG if PIL can read it, else an ImageInputError."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImageInputError(f"{where}: not a PNG, JPEG, GIF or BMP image ({len(data)} bytes)") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _png(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageInputError(f"{where}: not an image (PNG, JPEG, GIF, BMP or what PIL reads; "
                              f"{len(data)} bytes)") from None


def check_image_role(role: Any, where: str) -> None:
    """Images go in user turns: a vision chat template renders them there, and Reactor Core
    refuses them anywhere else in training data, so a model has never seen one elsewhere."""
    if role != "user":
        raise ImageInputError(f"{where}: an image part in a turn of role {role!r}; images go in user turns only")


def _part_image(part: Mapping[str, Any], where: str) -> Any:
    """The image value of an `image` or `image_url` part."""
    if part["type"] == "image":
        value = next((part[k] for k in ("image", "path", "url") if k in part), None)
    else:
        url = part.get("image_url")
        value = url.get("url") if isinstance(url, Mapping) else url
    if value is None:
        raise ImageInputError(f"{where}: an {part['type']} part without its image")
    return value


def split_images(messages: Sequence[Mapping[str, Any]],
                 placeholder: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[EncodedImage]]:
    """(messages for the chat template, the images in order).

    Each image part becomes `placeholder` (e.g. {"type": "text", "text": marker} or
    {"type": "image"}); a message without images gets its text parts joined into one
    string, which every chat template renders. Unknown part types are an error."""
    rendered: list[dict[str, Any]] = []
    images: list[EncodedImage] = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, (list, tuple)):
            rendered.append(dict(message))
            continue
        parts: list[dict[str, Any]] = []
        before = len(images)
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image", "image_url"):
                check_image_role(message.get("role"), where)
                images.append(EncodedImage(image_bytes(_part_image(part, where), where), where))
                parts.append(dict(placeholder))
            else:
                raise ImageInputError(f"{where}: unknown content part {kind!r}; expected text, image or image_url "
                                      "(a text part needs a string `text`)")
        joined = "".join(p["text"] for p in parts) if len(images) == before else None
        rendered.append({**message, "content": joined if joined is not None else parts})
    return rendered, images


def has_images(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any message holds an image or image_url part (nothing is read)."""
    return any(isinstance(m.get("content"), (list, tuple)) and
               any(isinstance(p, Mapping) and p.get("type") in ("image", "image_url") for p in m["content"])
               for m in messages)
