"""Images in chat data: find, read and check each one while the data file is validated.

A user turn may hold OpenAI-style content parts; an image part is one of

    {"type": "image", "path": "images/cat.png"}              relative to the JSONL's folder
    {"type": "image", "base64": "iVBORw0KGgo..."}             the file's bytes, base64
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}   OpenAI exports

`ImageReader.read` turns one such part into an `ImagePart` or raises `ImageError` naming
the field. Every image is read and decoded once, up front, like every other line of the
data, so a run never dies on a missing or corrupt picture at step 3,000:

- a path must stay inside the data file's folder: absolute paths, `..` and symlinks
  that resolve outside are refused (a data file must not make the trainer read
  `/etc/shadow` or `~/.ssh/id_rsa` and learn it);
- remote URLs are refused, never fetched (training is offline);
- the bytes are capped (`max_bytes`) before they are read or decoded, the pixels
  (`max_pixels`, default PIL's `Image.MAX_IMAGE_PIXELS`) before the image is decoded:
  a small PNG can claim 50,000 x 50,000 pixels, a decompression bomb; PIL's own hard
  cap (twice MAX_IMAGE_PIXELS, at `Image.open`) stays on too;
- the image is verified (`Image.verify`, which checks PNG chunk CRCs) and then fully
  decoded, because verify alone passes a truncated JPEG.

The part keeps its bytes' sha256 and size, so `open_rgb` can tell a file that changed
since validation, and a later recipe can record exactly which pixels it trained on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from PIL import Image

# Issue kinds raised here (the keys of `DataReport.counts`).
MISSING_IMAGE = "missing_image"  # no such file, or it cannot be read
UNSAFE_IMAGE_PATH = "unsafe_image_path"  # absolute, `..`, or resolving outside the folder
REMOTE_IMAGE = "remote_image"  # an http(s):// or other non-data URL
BAD_IMAGE = "bad_image"  # bad base64, not an image, truncated or corrupt
IMAGE_TOO_LARGE = "image_too_large"  # over max_bytes or max_pixels

# PIL's own decompression-bomb threshold (it warns past it and refuses past twice it).
PIL_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageError(ValueError):
    """An image part that cannot be trained on; `reason` names the field."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class ImageLimits:
    """What one example may carry. The defaults suit photos and screenshots; a
    processor resizes every image anyway, so bigger files only cost memory."""

    max_images_per_example: int = 4
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = PIL_MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("max_images_per_example", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class ImagePart:
    """One checked image: where its bytes are, what they hash to, what they showed.

    Exactly one of `path` (resolved, inside the data file's folder) and `data` (the
    decoded base64) is set. Equal images at the same place compare equal, so the
    validator's duplicate check still works on multimodal lines.
    """

    sha256: str
    size: int  # bytes
    width: int
    height: int
    format: str  # PIL's name: PNG, JPEG, WEBP, ...
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)

    def read_bytes(self) -> bytes:
        """The image's bytes, checked against the sha256 recorded at validation."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        try:
            data = Path(self.path).read_bytes()
        except OSError as err:
            raise ImageError(f"{self.path}: cannot read the image: {err.strerror or err}",
                             MISSING_IMAGE) from None
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise ImageError(f"{self.path}: the image changed since the data was validated",
                             BAD_IMAGE)
        return data


@dataclass(frozen=True)
class ImageReader:
    """Reads the image parts of one data file: paths are relative to `root`, its folder."""

    root: Path
    limits: ImageLimits = ImageLimits()

    def read(self, part: Mapping[str, Any], where: str) -> ImagePart:
        """One `{"type": "image" | "image_url", ...}` part -> a checked `ImagePart`.

        `where` names the part (`messages[0].content[1]`); every reason starts with it
        and the offending key.
        """
        if part["type"] == "image_url":
            return self._from_data_url(part.get("image_url"), f"{where}.image_url")
        sources = [key for key in ("path", "base64") if key in part]
        if len(sources) != 1:
            raise ImageError(f"{where}: an image part needs exactly one of 'path' or 'base64'",
                             BAD_IMAGE)
        (key,) = sources
        value = part[key]
        if not isinstance(value, str) or not value:
            raise ImageError(f"{where}.{key} must be a non-empty string", BAD_IMAGE)
        if key == "path":
            return self._from_path(value, f"{where}.path")
        return self._from_base64(value, f"{where}.base64")

    # -- the three sources -----------------------------------------------------------------

    def _from_path(self, value: str, where: str) -> ImagePart:
        path = self._inside_root(value, where)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise ImageError(f"{where}: {value!r} is not a file", MISSING_IMAGE)
        except FileNotFoundError:
            raise ImageError(f"{where}: image file {value!r} not found in {self.root}",
                             MISSING_IMAGE) from None
        except OSError as err:
            raise ImageError(f"{where}: cannot read image file {value!r}: {err.strerror or err}",
                             MISSING_IMAGE) from None
        self._check_bytes(size, where)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ImageError(f"{where}: cannot read image file {value!r}: {err.strerror or err}",
                             MISSING_IMAGE) from None
        return self._checked(data, where, path=str(path))

    def _from_base64(self, value: str, where: str) -> ImagePart:
        text = "".join(value.split())  # MIME base64 wraps lines; the alphabet has no spaces
        self._check_bytes(len(text) * 3 // 4, where)  # refuse before decoding
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ImageError(f"{where}: not valid base64 ({err})", BAD_IMAGE) from None
        return self._checked(data, where)

    def _from_data_url(self, value: Any, where: str) -> ImagePart:
        url = value.get("url") if isinstance(value, Mapping) else None
        if not isinstance(url, str):
            raise ImageError(f"{where} must be an object with a string 'url'", BAD_IMAGE)
        where = f"{where}.url"
        if not url.startswith("data:"):
            raise ImageError(f"{where}: only data: URLs are read (remote images are never "
                             "fetched for training); save the image and give its 'path'",
                             REMOTE_IMAGE)
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ImageError(f"{where}: expected 'data:<type>;base64,<data>'", BAD_IMAGE)
        return self._from_base64(payload, where)

    # -- checks ----------------------------------------------------------------------------

    def _inside_root(self, value: str, where: str) -> Path:
        """`root / value`, refused when it names a place outside the data file's folder."""
        if "\x00" in value:
            raise ImageError(f"{where}: the path holds a NUL byte", UNSAFE_IMAGE_PATH)
        posix, windows = PurePosixPath(value), PureWindowsPath(value)
        if posix.is_absolute() or windows.is_absolute() or windows.drive:
            raise ImageError(f"{where}: {value!r} is absolute; give a path relative to the "
                             "data file's folder", UNSAFE_IMAGE_PATH)
        if ".." in posix.parts or ".." in windows.parts:
            raise ImageError(f"{where}: {value!r} climbs out with '..'; keep images inside the "
                             "data file's folder", UNSAFE_IMAGE_PATH)
        path = (self.root / posix).resolve()  # absolute: training may run from another cwd
        if not path.is_relative_to(self.root.resolve()):  # a symlink pointing out
            raise ImageError(f"{where}: {value!r} resolves outside the data file's folder",
                             UNSAFE_IMAGE_PATH)
        return path

    def _check_bytes(self, size: int, where: str) -> None:
        if size > self.limits.max_bytes:
            raise ImageError(f"{where}: the image is {size:,} bytes, over max_image_bytes "
                             f"{self.limits.max_bytes:,}", IMAGE_TOO_LARGE)

    def _checked(self, data: bytes, where: str, *, path: str | None = None) -> ImagePart:
        """A part for `data`, read from `path` (kept by path) or decoded from base64 (kept)."""
        self._check_bytes(len(data), where)
        width, height, fmt = decode_checked(data, self.limits.max_pixels, where)
        return ImagePart(sha256=hashlib.sha256(data).hexdigest(), size=len(data), width=width,
                         height=height, format=fmt, path=path, data=None if path else data)


def decode_checked(data: bytes, max_pixels: int, where: str) -> tuple[int, int, str]:
    """(width, height, format) of the image in `data`, once it is known to decode fully.

    The header's size is checked before any pixel is decoded. Decoding untrusted bytes
    makes PIL raise many exception types (OSError, SyntaxError, struct.error,
    IndexError, ...); any of them means the same thing here: not a usable image.
    """
    with warnings.catch_warnings():
        # PIL warns past MAX_IMAGE_PIXELS; `max_pixels` decides here, checked just below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height, fmt = image.width, image.height, image.format or "unknown"
                _check_pixels(width, height, max_pixels, where)
                image.verify()  # structure and checksums (PNG CRCs), without decoding
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # every pixel: a truncated JPEG passes verify() but not this
        except ImageError:
            raise
        except Image.DecompressionBombError as err:  # past PIL's hard cap, at open
            raise ImageError(f"{where}: too many pixels, a possible decompression bomb ({err})",
                             IMAGE_TOO_LARGE) from None
        except Image.UnidentifiedImageError:
            raise ImageError(f"{where}: not an image PIL can read", BAD_IMAGE) from None
        except Exception as err:  # noqa: BLE001 - see the docstring
            raise ImageError(f"{where}: corrupt or truncated image ({err})", BAD_IMAGE) from None
    return width, height, fmt


def _check_pixels(width: int, height: int, max_pixels: int, where: str) -> None:
    if width * height > max_pixels:
        raise ImageError(f"{where}: the image is {width} x {height} = {width * height:,} pixels, "
                         f"over max_image_pixels {max_pixels:,}", IMAGE_TOO_LARGE)


def open_rgb(part: ImagePart) -> Image.Image:
    """The image as an RGB PIL image, as a Hugging Face image processor expects it.

    Transparent pixels are laid on white, the way transformers' `convert_to_rgb` does,
    so a transparent PNG looks the same here and at inference (a plain `convert("RGB")`
    would turn them black or whatever colour the hidden pixels hold).
    """
    with Image.open(io.BytesIO(part.read_bytes())) as image:
        image.load()
        if image.mode == "RGB":
            return image.copy()
        if "A" not in image.getbands() and "transparency" not in image.info:
            return image.convert("RGB")
        rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    return white.convert("RGB")
