"""JARVIS Prime: named, verified, quantized PRIME models on the hardware you have.

`import jarvis_prime` stays light: torch is imported only when the transformers
backend is chosen, and reactor_core only by the training recipes.
"""

from jarvis_prime.errors import (
    BackendUnavailableError,
    InsufficientMemoryError,
    IntegrityError,
    ManifestError,
    ModelNotAvailableError,
    ModelNotFoundError,
    PrimeError,
)
from jarvis_prime.models import Generation, GenerationParams, PrimeModel, Runtime
from jarvis_prime.version import __version__

__all__ = [
    "BackendUnavailableError",
    "Generation",
    "GenerationParams",
    "InsufficientMemoryError",
    "IntegrityError",
    "ManifestError",
    "ModelNotAvailableError",
    "ModelNotFoundError",
    "PrimeError",
    "PrimeModel",
    "Runtime",
    "__version__",
]
