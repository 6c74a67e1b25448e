"""JARVIS: the personal assistant runtime, on PRIME models through jarvis_prime.

This package never imports torch, transformers, peft or reactor_core (a test enforces
it): models arrive through `jarvis_prime.PrimeModel` only.
"""

from jarvis.chatbots import Chatbot, ChatbotConfig
from jarvis.version import __version__

__all__ = ["Chatbot", "ChatbotConfig", "__version__"]
