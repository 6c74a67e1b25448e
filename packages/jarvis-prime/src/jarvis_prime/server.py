"""`prime serve`: an OpenAI-compatible HTTP server for PRIME models (FastAPI + uvicorn).

    prime serve prime-135m-chat-v1 [--quant 4bit] [--host 127.0.0.1] [--port 8001] [--api-key KEY]

Routes: POST /v1/chat/completions (JSON or SSE stream ending in `data: [DONE]`),
POST /v1/completions, GET /v1/models, GET /health (ready only once a model is
loaded; no auth), GET /metrics (Prometheus text), POST /admin/models (hot-swap).

How requests run: generation runs in a thread pool, so the event loop never blocks.
On the transformers backend, concurrent requests are decoded together (up to
`max_batch` per batch, models/batching.py: whatever is waiting when a batch starts
joins it). On llama.cpp they run one at a time in arrival order: llama-cpp-python's
high-level API decodes one sequence per context (continuous batching needs llama.cpp's
own server or vLLM). Requests admitted beyond those generating wait in a bounded
queue; when it is full the answer is 429 with Retry-After. /metrics has the batch
sizes (prime_batch_size).

Hot-swap: POST /admin/models loads the new model in the background while the old one
keeps serving; then new requests go to the new model, requests already running
finish on the old one, and the old one is closed when the last of them is done.
With `--served-model-name` clients keep one name across swaps; every response's
`system_fingerprint` says which model and version answered.

Errors are OpenAI's JSON shape ({"error": {"message", "type", "param", "code"}});
anything wrong with a request is a 4xx that names the field.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from jarvis_prime.models.prime_model import PrimeModel, iterate_in_thread

API_KEY_ENV = "PRIME_API_KEY"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON is a very long chat
DEFAULT_MAX_TOKENS = 512


# -- errors ------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# -- requests ------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What both endpoints share. Unknown fields are ignored, as OpenAI clients send many."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logprobs: bool | int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop sequences")
        return stops

    def check_supported(self) -> None:
        """Parameters this server cannot honour are refused, never silently ignored."""
        if self.n != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise APIError(400, f"{param} is not supported (PRIME models sample without penalties)", param=param,
                           code="unsupported_parameter")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.response_format is not None and self.response_format.type != "text":
            raise APIError(400, f"response_format {self.response_format.type!r} is not supported: this server does "
                           "not constrain decoding; ask for JSON in the prompt and validate it", param="response_format",
                           code="unsupported_parameter")
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools", code="unsupported_parameter")


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise APIError(400, "exactly one prompt per request", param="prompt")
            return self.prompt[0]
        return self.prompt

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo or self.suffix:
            param = "echo" if self.echo else "suffix"
            raise APIError(400, f"{param} is not supported", param=param, code="unsupported_parameter")


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    quantization: Literal["8bit", "4bit"] | None = None
    backend: Literal["auto", "llamacpp", "transformers"] = "auto"


# -- the model being served, and hot-swapping it --------------------------------------------------


@dataclass
class Slot:
    """One loaded model and how many requests are using it."""

    model: PrimeModel
    name: str
    created: int = field(default_factory=lambda: int(time.time()))
    users: int = 0
    retired: bool = False


class ModelHost:
    """The served model; `swap` replaces it without failing a request."""

    def __init__(self) -> None:
        self._slot: Slot | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._slot is not None

    @property
    def current(self) -> Slot | None:
        return self._slot

    @contextmanager
    def use(self) -> Iterator[Slot]:
        with self._lock:
            slot = self._slot
            if slot is None:
                raise APIError(503, "no model loaded yet", type_="server_error", code="model_not_ready")
            slot.users += 1
        try:
            yield slot
        finally:
            with self._lock:
                slot.users -= 1
                close = slot.retired and slot.users == 0
            if close:
                slot.model.close()

    def swap(self, model: PrimeModel, name: str) -> None:
        with self._lock:
            old, self._slot = self._slot, Slot(model, name)
            close = old is not None and old.users == 0
            if old is not None:
                old.retired = True
        if close:
            old.model.close()

    def close(self) -> None:
        with self._lock:
            slot, self._slot = self._slot, None
        if slot is not None:
            slot.model.close()


# -- metrics --------------------------------------------------------------------------------------


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


# -- the app -------------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    model: str
    quantization: Literal["8bit", "4bit"] | None = None
    backend: Literal["auto", "llamacpp", "transformers"] = "auto"
    api_key: str | None = None
    served_name: str | None = None  # the name clients use; kept across hot-swaps (default: the model's)
    max_queue: int = 16  # requests admitted at once (one generating, the rest waiting)
    max_batch: int = 8  # transformers backend: concurrent requests decoded together
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    context_length: int | None = None
    retry_after_s: int = 1


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_key_for(host: str, api_key: str | None) -> None:
    """A server reachable from other machines must not be open to them."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"refusing to listen on {host} without an API key: pass --api-key or set {API_KEY_ENV} "
                         "(or bind 127.0.0.1)")


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

    def __init__(self, app, config: "ServerConfig", metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    def _refusal(self, scope) -> APIError | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] != "/health" and self.config.api_key:
            if headers.get("authorization", "") != f"Bearer {self.config.api_key}":
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


def load_model(name: str, quantization=None, backend: str = "auto", context_length: int | None = None) -> PrimeModel:
    return PrimeModel.from_pretrained(name, quantization=quantization, backend=backend, context_length=context_length)


def create_app(config: ServerConfig, loader: Callable[..., PrimeModel] = load_model) -> FastAPI:
    host = ModelHost()
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=config.max_queue + 2, thread_name_prefix="prime-gen")
    admitted = 0
    admitted_lock = threading.Lock()

    def batched(model: PrimeModel) -> PrimeModel:
        model.enable_batching(config.max_batch, on_batch=metrics.batch_size.observe)
        return model

    async def load_in_background() -> None:
        model = await asyncio.get_running_loop().run_in_executor(
            executor, lambda: loader(config.model, config.quantization, config.backend, config.context_length))
        host.swap(batched(model), config.served_name or model.name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(load_in_background())
        yield
        task.cancel()
        host.close()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="JARVIS Prime", lifespan=lifespan)
    app.state.host, app.state.metrics = host, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        if first.get("type") == "json_invalid":
            return APIError(400, f"invalid JSON: {first.get('msg')}", param=None, code="invalid_json").response()
        return APIError(400, f"{where}: {first['msg']}", param=where, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return APIError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None).response()

    app.add_middleware(Guard, config=config, metrics=metrics)

    @contextmanager
    def admission() -> Iterator[None]:
        nonlocal admitted
        with admitted_lock:
            if admitted >= config.max_queue:
                raise APIError(429, f"server busy: {admitted} requests queued; retry shortly", type_="rate_limit_error",
                               code="queue_full", headers={"Retry-After": str(config.retry_after_s)})
            admitted += 1
            metrics.queue_depth.set(admitted)
        try:
            yield
        finally:
            with admitted_lock:
                admitted -= 1
                metrics.queue_depth.set(admitted)

    def check_model(requested: str | None, slot: Slot) -> None:
        if requested and requested != slot.name:
            raise APIError(404, f"model {requested!r} is not served here; this server serves {slot.name!r}",
                           param="model", code="model_not_found")

    def sampling(req: SamplingRequest, prompt_tokens: int, context: int) -> dict[str, Any]:
        room = context - prompt_tokens
        wanted = req.max_completion_tokens or req.max_tokens
        if room < 1 or (wanted is not None and wanted > room):
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({wanted}) exceeds the context "
                           f"length ({context})", param="max_tokens" if room >= 1 else "messages",
                           code="context_length_exceeded")
        return {"max_new_tokens": wanted or min(DEFAULT_MAX_TOKENS, room), "temperature": req.temperature,
                "top_p": req.top_p, "stop": req.stop or None, "seed": req.seed}

    def fingerprint(slot: Slot) -> str:
        """Which model and version answered (the served name may stay the same across swaps)."""
        return f"{slot.model.name}-{slot.model.version}"

    async def run(fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn)

    # -- routes --

    @app.get("/health")
    async def health():
        slot = host.current
        if slot is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": slot.name, "backend": slot.model.runtime.backend}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        with host.use() as slot:
            return {"object": "list", "data": [{"id": slot.name, "object": "model", "created": slot.created,
                                                 "owned_by": "jarvis-prime"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        req.check_supported()
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        return await generate(req, "chat.completion", lambda model: model.encode_chat(messages).ids,
                              lambda model, opts: model.complete(model.encode_chat(messages), **opts),
                              lambda model, opts: model.complete(model.encode_chat(messages), stream=True, **opts))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        req.check_supported()
        prompt = req.text()
        return await generate(req, "text_completion", lambda model: model.encode(prompt).ids,
                              lambda model, opts: model.complete(model.encode(prompt), **opts),
                              lambda model, opts: model.complete(model.encode(prompt), stream=True, **opts))

    async def generate(req: SamplingRequest, kind: str, ids, complete, chunks):
        """Admit the request, pin the current model, then answer in one piece or stream.

        The ExitStack holds the queue place and the model; a stream hands it to its
        generator, which releases both when the last event is sent or the client leaves.
        """
        stack = ExitStack()
        try:
            stack.enter_context(admission())
            slot = stack.enter_context(host.use())
            check_model(req.model, slot)
            prompt_tokens = len(await run(lambda: ids(slot.model)))
            options = sampling(req, prompt_tokens, slot.model.context_length)
        except BaseException:
            stack.close()
            raise
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(kind, rid, created, slot, options, chunks, prompt_tokens, include_usage, stack),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        with stack:
            result = await run(lambda: complete(slot.model, options))
        metrics.tokens_in.inc(result.prompt_tokens)
        metrics.tokens_out.inc(result.completion_tokens)
        choice = ({"index": 0, "message": {"role": "assistant", "content": result.text},
                   "finish_reason": result.finish_reason} if kind == "chat.completion"
                  else {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None})
        return {"id": rid, "object": kind, "created": created, "model": slot.name,
                "system_fingerprint": fingerprint(slot), "choices": [choice],
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                          "total_tokens": result.prompt_tokens + result.completion_tokens}}

    async def sse(kind, rid, created, slot: Slot, options, chunks, prompt_tokens, include_usage,
                  stack: ExitStack) -> AsyncIterator[str]:
        start = time.perf_counter()
        text_parts: list[str] = []
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

        def event(choice: dict[str, Any], usage: dict | None = None) -> str:
            payload = {"id": rid, "object": chunk_kind, "created": created, "model": slot.name,
                       "system_fingerprint": fingerprint(slot), "choices": [choice] if choice else []}
            if include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if kind == "chat.completion":
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            finish = "stop"
            first = True
            async for chunk in iterate_in_thread(lambda: chunks(slot.model, options), executor):
                if chunk.text:
                    if first:
                        metrics.ttft.observe(time.perf_counter() - start)
                        first = False
                    text_parts.append(chunk.text)
                    yield event({"index": 0, "delta": {"content": chunk.text}, "finish_reason": None}
                                if kind == "chat.completion" else
                                {"index": 0, "text": chunk.text, "finish_reason": None, "logprobs": None})
                if chunk.finish_reason:
                    finish = chunk.finish_reason
            completion_tokens = await run(lambda: slot.model.count_tokens("".join(text_parts)))
            yield event({"index": 0, "delta": {}, "finish_reason": finish} if kind == "chat.completion"
                        else {"index": 0, "text": "", "finish_reason": finish, "logprobs": None})
            metrics.tokens_in.inc(prompt_tokens)
            metrics.tokens_out.inc(completion_tokens)
            if include_usage:
                yield event({}, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens})
            yield "data: [DONE]\n\n"
        finally:
            stack.close()

    @app.post("/admin/models")
    async def swap_model(req: SwapRequest):
        model = await run(lambda: batched(loader(req.model, req.quantization, req.backend, config.context_length)))
        host.swap(model, config.served_name or model.name)
        return {"model": model.name, "version": model.version, "runtime": model.runtime.describe()}

    return app


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8001) -> None:
    import uvicorn

    require_key_for(host, config.api_key)
    uvicorn.run(create_app(config), host=host, port=port, log_level="info")


def api_key_from_env(flag: str | None) -> str | None:
    return flag or os.environ.get(API_KEY_ENV) or None
