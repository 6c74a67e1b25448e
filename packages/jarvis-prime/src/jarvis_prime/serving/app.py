"""`create_app`: the routes of `prime serve`, each a few lines over the serving kit; `serve` runs it."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest

from jarvis_prime.models.prime_model import PrimeModel
from jarvis_prime.serving.completions import Completions
from jarvis_prime.errors import ImageInputError, ImageNotSupportedError
from jarvis_prime.serving.errors import APIError, image_error, install_error_handlers
from jarvis_prime.serving.formatters import ChatFormatter, TextFormatter
from jarvis_prime.serving.host import ModelHost
from jarvis_prime.serving.middleware import Guard, GuardRules, Metrics, allowed_hosts
from jarvis_prime.serving.remote_images import FetchPolicy, fetch_remote_images
from jarvis_prime.serving.settings import ServerConfig, require_key_for, require_separate_admin_key
from jarvis_prime.serving.swap import SwapGate
from jarvis_prime.serving.types import ChatCompletionRequest, CompletionRequest, SwapRequest

Loader = Callable[..., PrimeModel]
log = logging.getLogger(__name__)


def capabilities(model) -> list[str]:
    """What the served model does beyond chat, as Ollama names it (`tools`, `vision`,
    `thinking`), in its /v1/models entry: a client (JARVIS's RemoteModel) offers tools only
    to a model made to call them, since a tool list in the prompt of one that was not
    changes its answers and buys nothing."""
    manifest = getattr(model, "manifest", None)
    found = {"tools": getattr(model, "calls_tools", False), "vision": getattr(model, "sees_images", False),
             "thinking": getattr(manifest, "thinking", None) is not None}
    return [name for name, has in found.items() if has]


def load_model(name: str, quantization=None, backend: str = "auto", context_length: int | None = None) -> PrimeModel:
    return PrimeModel.from_pretrained(name, quantization=quantization, backend=backend, context_length=context_length)


def encode_chat(model: PrimeModel, messages: list[dict], tools: list[dict] | None):
    """`model.encode_chat`, with `tools` only when there are some (models served here may
    be stand-ins with the older one-argument signature)."""
    return model.encode_chat(messages, tools=tools) if tools else model.encode_chat(messages)


def fit_context(model: PrimeModel, messages: list[dict], tools: list[dict] | None, req: ChatCompletionRequest):
    """`truncate: true`: the conversation without its oldest non-system turns, as few dropped
    as make the prompt and max_tokens fit the context (at least one token of reply). The
    last message is never dropped: a prompt that still overflows is the usual 400."""
    wanted = req.max_completion_tokens or req.max_tokens or 1
    kept = list(messages)
    while True:
        prompt = encode_chat(model, kept, tools)
        droppable = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
        if len(prompt.ids) + wanted <= model.context_length or not droppable:
            return prompt
        del kept[droppable[0]]
        while droppable[0] < len(kept) - 1 and kept[droppable[0]]["role"] == "tool":
            del kept[droppable[0]]  # a tool result goes with the call it answers


def create_app(config: ServerConfig, loader: Loader = load_model) -> FastAPI:
    host, metrics = ModelHost(), Metrics()
    executor = ThreadPoolExecutor(max_workers=config.max_queue + 2, thread_name_prefix="prime-gen")
    completions = Completions(config, host, metrics, executor)
    swaps = SwapGate(host, allow_paths=config.allow_model_paths)
    fetching = FetchPolicy(max_bytes=config.max_image_bytes, allow_private=config.allow_private_image_hosts,
                           connect_timeout_s=config.image_fetch_timeout_s, read_timeout_s=config.image_fetch_timeout_s,
                           total_timeout_s=config.image_fetch_total_s, max_redirects=config.max_image_redirects)

    def load(name: str, quantization=None, backend: str = "auto") -> PrimeModel:
        model = loader(name, quantization, backend, config.context_length)
        model.enable_batching(config.max_batch, on_batch=metrics.batch_size.observe)
        return model

    async def load_in_background() -> None:
        try:
            model = await completions.run(lambda: swaps.startup(
                lambda: load(config.model, config.quantization, config.backend)))
        except Exception as err:  # noqa: BLE001  (reported by /health, the log and every request's 503)
            host.error = f"{type(err).__name__}: {err}"
            log.error("could not load %s: %s", config.model, host.error)
            return
        host.offer(model, config.served_name or model.name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(load_in_background())
        yield
        task.cancel()
        host.close()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="JARVIS Prime", lifespan=lifespan)
    app.state.host, app.state.metrics = host, metrics
    install_error_handlers(app)
    rules = GuardRules(api_key=config.api_key, max_body_bytes=config.max_body_bytes, hosts=allowed_hosts(config.host),
                       open_path=lambda path: path == "/health", admin_key=config.admin_key,
                       admin_path=lambda path: path.startswith("/admin/"))
    app.add_middleware(Guard, rules=rules, metrics=metrics, routes=app.router.routes)

    @app.get("/health")
    async def health():
        slot = host.current
        if slot is None:
            body = {"status": "error", "error": host.error} if host.error else {"status": "loading"}
            return JSONResponse(body, status_code=503)
        return {"status": "ok", "model": slot.name, "backend": slot.model.runtime.backend}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        with host.use() as slot:
            return {"object": "list", "data": [{"id": slot.name, "object": "model", "created": slot.created,
                                                 "owned_by": "jarvis-prime", "capabilities": capabilities(slot.model)}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        req.check_supported()
        req.check_images(config.max_images, config.max_image_bytes, remote=config.allow_remote_images)
        messages = req.chat_messages()

        async def fetch() -> None:
            nonlocal messages
            messages = await fetch_remote_images(messages, fetching)

        tools, grammar = req.active_tools(), req.grammar()

        def encode(model: PrimeModel):
            try:
                prompt = fit_context(model, messages, tools, req) if req.truncate else encode_chat(model, messages, tools)
            except (ImageInputError, ImageNotSupportedError) as err:
                raise image_error(err) from None
            if prompt.media is not None and model.runtime.backend == "transformers" and req.needs_own_loop(grammar):
                raise APIError(400, "on the transformers backend, penalties, logprobs, tools with tool_choice required "
                               "or named, and response_format json work on text prompts only (this one has images)",
                               param="messages", code="unsupported_parameter")
            return prompt

        return await completions.answer(req, encode, ChatFormatter, prepare=fetch if req.remote_images() else None,
                                        grammar=grammar, tools=tools is not None)

    @app.post("/v1/completions")
    async def text_completions(req: CompletionRequest):
        req.check_supported()
        prompt = req.text()
        return await completions.answer(req, lambda model: model.encode(prompt), TextFormatter)

    @app.post("/admin/models")
    async def swap_model(req: SwapRequest):
        """The admin key only (Guard); a catalog or store name unless --allow-model-paths; one at a time."""
        model = await completions.run(lambda: swaps.swap(
            req.model, lambda target: load(target, req.quantization, req.backend), config.served_name))
        return {"model": model.name, "version": model.version, "runtime": model.runtime.describe()}

    return app


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8001) -> None:
    import uvicorn

    require_key_for(host, config.api_key)
    require_separate_admin_key(config.api_key, config.admin_key)
    config.host = host
    uvicorn.run(create_app(config), host=host, port=port, log_level="info")
