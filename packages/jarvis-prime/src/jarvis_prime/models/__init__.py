"""PRIME models: one `PrimeModel` interface over the llama.cpp and transformers backends."""

from jarvis_prime.models.base import Generation, GenerationParams
from jarvis_prime.models.prime_model import PrimeModel
from jarvis_prime.models.selection import Runtime

__all__ = ["Generation", "GenerationParams", "PrimeModel", "Runtime"]
