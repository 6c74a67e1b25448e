"""Training recipes for PRIME models, run by Reactor Core.

Reactor Core (and with it torch, peft and friends) is an optional extra: this is the
only place jarvis_prime touches it, and only when a recipe runs, so an inference-only
install never needs it.
"""

from __future__ import annotations

from types import ModuleType

from jarvis_prime.errors import PrimeError


def require_reactor_core() -> ModuleType:
    """Import reactor_core for a training run, or explain how to install it."""
    try:
        import reactor_core
    except ImportError as err:
        raise PrimeError(
            "training PRIME models needs Reactor Core: pip install 'jarvis-prime[training]'"
        ) from err
    return reactor_core
