"""Reactor Core: the training engine of the JARVIS ecosystem.

It never imports `jarvis` or `jarvis_prime`; the only thing it hands to them is a
PRIME model directory on disk (see ARCHITECTURE.md).
"""

__version__ = "1.0.0"
