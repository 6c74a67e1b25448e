"""Turning trained weights into what serving engines load: PRIME model directories."""

from reactor_core.serving.prime_dir import write_prime_manifest

__all__ = ["write_prime_manifest"]
