"""`WebConfig`, and `jarvis serve`'s key rules (prime's, naming JARVIS_API_KEY)."""

from __future__ import annotations

from dataclasses import dataclass, field

from jarvis.chatbots import ChatbotConfig
from jarvis_prime.serving import settings as prime_settings

API_KEY_ENV = "JARVIS_API_KEY"
ADMIN_KEY_ENV = "JARVIS_ADMIN_KEY"
MAX_BODY_BYTES = 16 << 20  # an image question: a base64 photo of up to ~12 MB


@dataclass
class WebConfig:
    chat: ChatbotConfig = field(default_factory=ChatbotConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    admin_key: str | None = None  # turns on POST /api/model (switch models), which then takes this key only
    allow_model_paths: bool = False  # /api/model may load any directory with a prime.json, not only names
    max_body_bytes: int = MAX_BODY_BYTES  # counted as it arrives, before any parsing
    max_queue: int = 16  # replies in progress at once (4 generating, the rest waiting); beyond: 429
    retry_after_s: int = 1


def require_key_for(host: str, api_key: str | None) -> None:
    """A page reachable from other machines must not be open to them."""
    prime_settings.require_key_for(host, api_key, env_var=API_KEY_ENV)
