"""The errors jarvis-prime raises on purpose, each with a message a user can act on."""

from __future__ import annotations


class PrimeError(Exception):
    """Base class: every deliberate jarvis-prime failure is one of these."""


class ModelNotFoundError(PrimeError, LookupError):
    """A model name that is neither in the catalog nor in the local store."""

    def __init__(self, name: str, suggestions: list[str] | None = None, hint: str = "") -> None:
        self.name = name
        self.suggestions = list(suggestions or [])
        message = f"unknown model {name!r}"
        if self.suggestions:
            message += f"; did you mean: {', '.join(self.suggestions)}?"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class ModelNotAvailableError(PrimeError):
    """A known model whose files are not on this machine and cannot be had offline."""


class IntegrityError(PrimeError):
    """A model file whose sha256 or size differs from its `prime.json` manifest."""


class ManifestError(PrimeError):
    """A missing or malformed `prime.json`."""


class UnsafeNameError(PrimeError, ValueError):
    """A model name or version that would not be one plain path component (`../x`, `a/b`)."""


class BackendUnavailableError(PrimeError):
    """A backend/quantization/device combination that cannot work here, and why."""


class InsufficientMemoryError(PrimeError):
    """A model (at the quantization asked for, or at every one) larger than this machine's
    memory, refused before loading: what it needs and what there is, in GB."""


class ExportError(PrimeError):
    """A model the GGUF exporter cannot turn into GGUF, with what it does support."""


class ImageInputError(PrimeError, ValueError):
    """An image part a model cannot take: unreadable bytes, an unknown part type, a remote URL."""


class ImageNotSupportedError(PrimeError, ValueError):
    """Images sent to a model (or a weight file) that cannot see: refused, never silently dropped."""
