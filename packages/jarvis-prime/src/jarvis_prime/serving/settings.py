"""What a server is told: `ServerConfig`, the API and admin keys, and the rules that a
server reachable from other machines must have an API key and that the admin key
(hot-swap) is not the API key (shared with `jarvis serve`)."""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass
from typing import Literal

API_KEY_ENV = "PRIME_API_KEY"
ADMIN_KEY_ENV = "PRIME_ADMIN_KEY"
ALLOW_REMOTE_IMAGES_ENV = "PRIME_ALLOW_REMOTE_IMAGES"
ALLOW_PRIVATE_IMAGE_HOSTS_ENV = "PRIME_ALLOW_PRIVATE_IMAGE_HOSTS"
DEFAULT_MAX_IMAGES = 4  # image parts per chat request
DEFAULT_MAX_IMAGE_BYTES = 10 << 20  # one decoded image: a large photo
# The body holds images as base64 (4/3 of their bytes): one image at the limit, and a long chat, fit.
DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_MAX_TOKENS = 512


@dataclass
class ServerConfig:
    model: str
    quantization: Literal["8bit", "4bit"] | None = None
    backend: Literal["auto", "llamacpp", "transformers"] = "auto"
    api_key: str | None = None
    admin_key: str | None = None  # turns on POST /admin/models (hot-swap), which then takes this key only
    allow_model_paths: bool = False  # a swap may load any directory with a prime.json, not only catalog/store names
    served_name: str | None = None  # the name clients use; kept across hot-swaps (default: the model's)
    max_queue: int = 16  # requests admitted at once (one generating, the rest waiting)
    max_batch: int = 8  # concurrent requests decoded together (llama.cpp: slots, each with its own KV; transformers: batch rows)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_images: int = DEFAULT_MAX_IMAGES  # image parts per chat request, more is a 400
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # decoded bytes per image, more is a 413
    # Remote images (serving/remote_images.py): off, http(s) image_url parts are a 400; on, fetched within these bounds.
    allow_remote_images: bool = False
    allow_private_image_hosts: bool = False  # loopback and private addresses too (a LAN's images); never link-local
    image_fetch_timeout_s: float = 10.0  # connecting, and each read
    image_fetch_total_s: float = 30.0  # one whole download, redirects included
    max_image_redirects: int = 3
    context_length: int | None = None
    retry_after_s: int = 1
    host: str = "127.0.0.1"  # the address it listens on: its Host header is served (loopback names always)


def api_key_from_env(flag: str | None, env_var: str = API_KEY_ENV) -> str | None:
    return flag or os.environ.get(env_var) or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_key_for(host: str, api_key: str | None, env_var: str = API_KEY_ENV) -> None:
    """A server reachable from other machines must not be open to them."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"refusing to listen on {host} without an API key: pass --api-key or set {env_var} "
                         "(or bind 127.0.0.1)")


def require_separate_admin_key(api_key: str | None, admin_key: str | None) -> None:
    """An admin key equal to the API key would let every client swap the model."""
    if admin_key and admin_key == api_key:
        raise ValueError("the admin key must differ from the API key: every client has the API key")


def key_matches(authorization: str, api_key: str) -> bool:
    """Whether an Authorization header carries `api_key`, compared in constant time so
    the answer's timing does not leak how much of a guess was right."""
    return secrets.compare_digest(authorization.encode(), f"Bearer {api_key}".encode())
