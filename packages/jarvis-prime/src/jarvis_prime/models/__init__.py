"""PRIME models: one `PrimeModel` interface over the llama.cpp and transformers backends."""

from jarvis_prime.models.base import Chunk, Generation, GenerationParams
from jarvis_prime.models.prime_model import PrimeModel, Prompt
from jarvis_prime.models.selection import Runtime

__all__ = ["Chunk", "Generation", "GenerationParams", "PrimeModel", "Prompt", "Runtime"]
