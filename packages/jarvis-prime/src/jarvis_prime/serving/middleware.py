"""`Guard` (Host allow-list, API key, admin key, JSON-only writes, body size limit,
per-route metrics, before any routing) and `Metrics` (the Prometheus registry /metrics serves).
Both servers put `Guard` in front of their routes: `prime serve` and `jarvis serve`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import Match

from jarvis_prime.serving.errors import OPENAI, APIError, ErrorShape
from jarvis_prime.serving.settings import key_matches

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")
JSON_WRITES = ("POST", "PUT", "PATCH")
DISCARD_BYTES = 64 << 10  # read, not kept, of a refused request's body
CLIENT_CLOSED = 499  # nginx's status for a client that closed the request before the answer


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("prime_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.tokens_in = Counter("prime_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.tokens_out = Counter("prime_completion_tokens", "Completion tokens generated", registry=self.registry)
        self.latency = Histogram("prime_request_latency_seconds", "Request latency (to the last byte)", ["route"],
                                 registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.ttft = Histogram("prime_time_to_first_token_seconds", "Streaming time to first token",
                              registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.queue_depth = Gauge("prime_queue_depth", "Generation requests admitted (running or waiting)",
                                 registry=self.registry)
        self.batch_size = Histogram("prime_batch_size", "Requests decoded together per batch (llama.cpp: per decoding step)",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32))


def allowed_hosts(bind_host: str) -> list[str]:
    """The Host header values a server bound to `bind_host` answers: its loopback names
    and the address it listens on; any name when it listens on every interface (it
    then has an API key: `require_key_for`). A page on another site that resolves its
    own name to 127.0.0.1 (DNS rebinding) sends its own name, and is refused."""
    if bind_host in ("0.0.0.0", "::", ""):
        return ["*"]
    return list(dict.fromkeys([*LOOPBACK_NAMES, bind_host.lower()]))


def host_name(header: str) -> str:
    """The name in a Host header, without the port ("[::1]:8000" -> "[::1]")."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[:end + 1] if end >= 0 else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@dataclass
class GuardRules:
    """What `Guard` checks. `open_path` says which paths need no key (health checks, the page);
    `admin_path` which need the admin key instead of the API key (hot-swap): with no
    admin key they are off (403), so a server loads only what its operator started it with."""

    api_key: str | None = None
    admin_key: str | None = None
    admin_path: Callable[[str], bool] = lambda path: False
    max_body_bytes: int = 1 << 20
    hosts: Sequence[str] = field(default_factory=lambda: list(LOOPBACK_NAMES))
    open_path: Callable[[str], bool] = lambda path: False
    shape: ErrorShape = OPENAI


class _TooLarge(Exception):
    pass


class Guard:
    """Every request, before routing and before its body is read: the Host allow-list
    (400), the API key, or on admin routes the admin key (401; 403 when admin routes are
    off or the API key is sent instead), JSON-only writes (415: a cross-site form or no-cors fetch
    cannot send `Content-Type: application/json` without a CORS preflight, which is never
    granted), then the body, counted as it arrives whatever Content-Length says, 413 past
    the limit. Only then does the app see the request (its body replayed from memory).
    Metrics, when given, are labelled by the matched route template ("other" otherwise),
    so clients cannot create series.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware re-wraps streamed
    responses and cost ~17 % of streaming throughput here. Latency is measured to the
    response's last byte, streams included.
    """

    def __init__(self, app, rules: GuardRules, metrics: Metrics | None = None,
                 routes: Sequence[Any] | None = None) -> None:
        self.app, self.rules, self.metrics, self.routes = app, rules, metrics, routes

    def _refusal(self, scope) -> APIError | None:
        rules = self.rules
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if "*" not in rules.hosts and host_name(headers.get("host", "")) not in rules.hosts:
            return APIError(400, "invalid Host header", code="invalid_host")
        authorization = headers.get("authorization", "")
        if rules.admin_path(scope["path"]):
            if (refusal := self._admin_refusal(authorization)) is not None:
                return refusal
        elif rules.api_key and not rules.open_path(scope["path"]):
            if not key_matches(authorization, rules.api_key):
                return APIError(401, "missing or invalid API key (Authorization: Bearer ...)", code="invalid_api_key")
        if scope["method"] in JSON_WRITES:
            if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                return APIError(415, "send JSON (Content-Type: application/json)", code="unsupported_media_type")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return APIError(400, "invalid Content-Length header", code="invalid_header")
        if length is not None and int(length) > rules.max_body_bytes:
            return self._too_large()
        return None

    def _admin_refusal(self, authorization: str) -> APIError | None:
        """Admin routes take the admin key only: a key that may chat may not change the model."""
        rules = self.rules
        if not rules.admin_key:
            return APIError(403, "model swaps are off on this server (its operator turns them on with --admin-key)",
                            code="admin_disabled")
        if key_matches(authorization, rules.admin_key):
            return None
        if rules.api_key and key_matches(authorization, rules.api_key):
            return APIError(403, "the API key may not swap models; send the admin key (Authorization: Bearer ...)",
                            code="admin_key_required")
        return APIError(401, "missing or invalid admin key (Authorization: Bearer ...)", code="invalid_admin_key")

    def _too_large(self) -> APIError:
        return APIError(413, f"request body over {self.rules.max_body_bytes} bytes", code="body_too_large")

    async def _read_body(self, receive) -> bytes:
        """The whole body, counted as it arrives; _TooLarge past the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ConnectionResetError("client disconnected")
            body = message.get("body", b"")
            size += len(body)
            if size > self.rules.max_body_bytes:
                raise _TooLarge()
            chunks.append(body)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _discard(self, receive) -> None:
        """Read (not keep) a little more, so a client that sent a small body sees the
        answer rather than a reset; a larger upload is cut off unread."""
        seen = 0
        while seen <= min(self.rules.max_body_bytes, DISCARD_BYTES):
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return
            seen += len(message.get("body", b""))

    def _route(self, scope) -> str:
        for route in self.routes or ():
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return getattr(route, "path", "other")
        return "other"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def tracked(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            body = b""
            if refusal is None:
                try:
                    body = await self._read_body(receive)
                except _TooLarge:
                    refusal = self._too_large()
                except ConnectionResetError:
                    status = CLIENT_CLOSED  # the client left mid-body: not the server's failure
                    return
            if refusal is not None:
                await self._discard(receive)
                await refusal.response(self.rules.shape)(scope, receive, tracked)
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, tracked)
        finally:
            if self.metrics is not None:
                route = self._route(scope)
                self.metrics.requests.labels(route, str(status)).inc()
                self.metrics.latency.labels(route).observe(time.perf_counter() - start)
