"""Image questions: they go to the catalog's vision model.

The catalog names one (`task: vision`, SmolVLM-Instruct today). It comes from the
Hugging Face Hub, so on an offline machine it is absent; then JARVIS says which model
to pull and what it needs, instead of pretending to see. A pulled one is reported as
not yet wired to JARVIS.
"""

from __future__ import annotations

from pathlib import Path

from jarvis_prime import PrimeError
from jarvis_prime.catalog import CatalogEntry, load_catalog
from jarvis_prime.store import find_local

IMAGE_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"RIFF": "webp",
}
MAX_IMAGE_BYTES = 20 * 1024 * 1024


class VisionUnavailableError(PrimeError):
    """No vision model can answer here; the message says what to pull."""


def image_kind(data: bytes) -> str:
    """png/jpeg/gif/webp from the file's first bytes, or a ValueError."""
    for signature, kind in IMAGE_SIGNATURES.items():
        if data.startswith(signature) and (kind != "webp" or data[8:12] == b"WEBP"):
            return kind
    raise ValueError("not an image JARVIS reads (PNG, JPEG, GIF or WebP)")


def vision_entry() -> CatalogEntry:
    entries = [m for m in load_catalog().models if m.task == "vision"]
    if not entries:
        raise VisionUnavailableError("the model catalog lists no vision model")
    return entries[0]


def ask_about_image(image: Path | bytes, question: str) -> str:
    """Answer `question` about `image` with the catalog's vision model.

    Checks the image first (a clear error for a missing or non-image file), then the
    model: absent -> which model to pull; present -> not runnable by PRIME's backends yet.
    """
    data = image if isinstance(image, bytes) else _read(Path(image))
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image over {MAX_IMAGE_BYTES // (1024 * 1024)} MB")
    image_kind(data)
    entry = vision_entry()
    need = entry.ram_gb.get("4bit") or min(entry.ram_gb.values())
    if find_local(entry.name) is None:
        raise VisionUnavailableError(
            f"image questions go to the vision model {entry.name} ({entry.description.rstrip('.')}), "
            f"which is not on this machine. Pull it where the Hugging Face Hub is reachable: "
            f"`prime pull {entry.name}` (about {need:g} GB of RAM at 4-bit)."
        )
    raise VisionUnavailableError(
        f"{entry.name} is pulled, but PRIME's backends do not run the {entry.architecture} architecture yet; "
        "image questions need a vision backend in jarvis-prime"
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not an image") from None
