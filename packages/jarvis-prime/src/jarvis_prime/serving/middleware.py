"""`Guard` (API key, body size, per-route metrics on every request) and `Metrics`
(the Prometheus registry /metrics serves)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jarvis_prime.serving.errors import APIError
from jarvis_prime.serving.settings import ServerConfig, key_matches


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
        self.batch_size = Histogram("prime_batch_size", "Requests decoded together per batch (transformers backend)",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32))


async def _discard_body(receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class Guard:
    """Auth on every route but /health, the body size limit, and per-route metrics.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware re-wraps streamed
    responses and cost ~17 % of streaming throughput here. Latency is measured to the
    response's last byte, streams included.
    """

    def __init__(self, app, config: ServerConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    def _refusal(self, scope) -> APIError | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] != "/health" and self.config.api_key:
            if not key_matches(headers.get("authorization", ""), self.config.api_key):
                return APIError(401, "missing or invalid API key (Authorization: Bearer ...)", code="invalid_api_key")
        length = headers.get("content-length", "0")
        if not length.isdigit():
            return APIError(400, "invalid Content-Length header", code="invalid_header")
        if int(length) > self.config.max_body_bytes:
            return APIError(413, f"request body over {self.config.max_body_bytes} bytes", code="body_too_large")
        return None

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
            if refusal is not None:
                await _discard_body(receive)  # read (not kept), so the client sees the answer, not a reset
                await refusal.response()(scope, receive, tracked)
            else:
                await self.app(scope, receive, tracked)
        finally:
            route = scope["path"]
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
