"""`jarvis serve`: the chat page and its JSON API (FastAPI).

The page (`static/index.html`, plain JavaScript, no build step) talks only to the
JSON API below, so scripts can too:

    GET    /api/health                         model loaded?
    GET    /api/conversations                  list, newest first
    POST   /api/conversations                  {"title"?, "private"?} -> {"id"}
    GET    /api/conversations/{id}             messages with ids and feedback
    PATCH  /api/conversations/{id}             {"title"?, "private"?}
    DELETE /api/conversations/{id}
    POST   /api/conversations/{id}/messages    {"content"} -> a stream (below)
    POST   /api/messages/{id}/rating           {"rating": 1 | -1 | null}
    POST   /api/messages/{id}/correction       {"content"}
    POST   /api/messages/{id}/regenerate       -> a stream
    POST   /api/images                         {"image": base64, "question"} (vision model)
    POST   /api/model                          {"model"?} reload (e.g. a version `jarvis improve` promoted)

Streams are server-sent events, one JSON object per `data:` line: {"delta": text}
pieces, then {"done": true, "reply_id": N} (or {"error": message}). Generation runs
in a worker thread so the event loop never blocks; the model serialises requests
itself. Every /api route but /api/health needs `Authorization: Bearer KEY` when the
server has a key, and the server refuses to listen beyond loopback without one.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, AsyncIterator, Callable, Iterator, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from starlette.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from jarvis.chatbots import Chatbot, ChatbotConfig
from jarvis.memory import ConflictError, ConversationStore, NotFoundError
from jarvis.vision import VisionUnavailableError, ask_about_image
from jarvis_prime import PrimeError, PrimeModel
from jarvis_prime.models.prime_model import iterate_in_thread
from jarvis_prime.serving.settings import is_loopback

log = logging.getLogger(__name__)

API_KEY_ENV = "JARVIS_API_KEY"
MAX_MESSAGE_CHARS = 32_000


@dataclass
class WebConfig:
    chat: ChatbotConfig = field(default_factory=ChatbotConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None


def require_key_for(host: str, api_key: str | None) -> None:
    """A page reachable from other machines must not be open to them."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"refusing to listen on {host} without an API key: pass --api-key or set {API_KEY_ENV} "
                         "(or bind 127.0.0.1)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewConversation(_Strict):
    title: str = Field("", max_length=200)
    private: bool = False


class ConversationPatch(_Strict):
    title: str | None = Field(None, max_length=200)
    private: bool | None = None


class UserMessage(_Strict):
    content: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


class Rating(_Strict):
    rating: Literal[1, -1] | None


class Correction(_Strict):
    content: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


class ModelSwap(_Strict):
    model: str | None = Field(None, description="PRIME model name or directory; default: the configured one")


class ImageQuestion(_Strict):
    image: str = Field(description="base64 of a PNG, JPEG, GIF or WebP file")
    question: str = Field("", max_length=MAX_MESSAGE_CHARS)


def _message_json(m) -> dict[str, Any]:
    return {"id": m.id, "role": m.role, "content": m.content, "original": m.original, "rating": m.rating,
            "corrected": m.corrected, "model": m.model}


def create_app(config: WebConfig, *, store: ConversationStore | None = None,
               model: PrimeModel | Any | None = None,
               loader: Callable[[ChatbotConfig], Any] | None = None) -> FastAPI:
    """The app. `model` skips loading (tests, an already-loaded model); otherwise the
    configured model loads in the background and /api/health says when it is ready."""
    store = store or ConversationStore()
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="jarvis-web")
    state: dict[str, Any] = {"model": model, "error": None}
    make_model = loader or (lambda chat: Chatbot(chat).model)

    def load() -> None:
        try:
            loaded_model = make_model(config.chat)
            if state["model"] is None:  # a POST /api/model that finished first wins
                state["model"] = loaded_model
        except Exception as err:  # noqa: BLE001  (reported by /api/health and every chat request)
            state["error"] = str(err)
            log.error("could not load %s: %s", config.chat.model, err)

    app = FastAPI(title="JARVIS", version="2", docs_url=None, redoc_url=None)
    # DNS rebinding: a page on another site that resolves its name to 127.0.0.1 must not
    # reach the API, so only our own host names are served.
    hosts = ["127.0.0.1", "localhost", "[::1]", "::1"] + ([config.host] if config.host not in ("0.0.0.0", "::") else ["*"])
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    writing: set[str] = set()  # conversations with a reply being written
    writing_lock = threading.Lock()
    if model is None:
        threading.Thread(target=load, daemon=True, name="jarvis-load").start()

    def authorised(request: Request) -> None:
        # Writes must say they are JSON: a cross-site form or no-cors fetch cannot send
        # that header without a CORS preflight, which this server never grants.
        if request.method in ("POST", "PATCH", "PUT"):
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                raise HTTPException(415, "send JSON (Content-Type: application/json)")
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer ...)")

    def loaded() -> Any:
        if state["model"] is None:
            raise HTTPException(503, f"model not loaded: {state['error']}" if state["error"] else "model still loading")
        return state["model"]

    def bot(cid: str | None) -> Chatbot:
        return Chatbot(config.chat, model=loaded(), store=store, conversation=cid)

    @app.exception_handler(NotFoundError)
    async def not_found(_request, err: NotFoundError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=404)

    @app.exception_handler(ConflictError)
    async def conflict(_request, err: ConflictError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=409)

    @app.exception_handler(ValueError)
    async def bad_value(_request, err: ValueError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": err.detail}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("jarvis.web").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/api/health")
    def health() -> JSONResponse:
        m = state["model"]
        if m is None:
            body = {"status": "error" if state["error"] else "loading", "error": state["error"]}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "model": m.name, "version": m.version})

    api = [Depends(authorised)]

    @app.get("/api/conversations", dependencies=api)
    def conversations() -> list[dict[str, Any]]:
        return [c.__dict__ for c in store.list()]

    @app.post("/api/conversations", dependencies=api, status_code=201)
    def new_conversation(body: NewConversation) -> dict[str, str]:
        return {"id": store.create(title=body.title, model=config.chat.model,
                                   system_prompt=config.chat.system_prompt, private=body.private)}

    @app.get("/api/conversations/{cid}", dependencies=api)
    def conversation(cid: str) -> dict[str, Any]:
        info = store.get(cid)
        return {"conversation": info.__dict__, "messages": [_message_json(m) for m in store.stored_messages(cid)]}

    @app.patch("/api/conversations/{cid}", dependencies=api)
    def patch_conversation(cid: str, body: ConversationPatch) -> dict[str, Any]:
        store.update(cid, title=body.title, private=body.private)
        return store.get(cid).__dict__

    @app.delete("/api/conversations/{cid}", dependencies=api, status_code=204)
    def delete_conversation(cid: str) -> None:
        store.get(cid)
        store.delete(cid)

    def stream(cid: str, make: Callable[[], tuple[Chatbot, Iterator[str]]]) -> StreamingResponse:
        """One reply at a time per conversation (a second tab gets 409, not a tangle)."""
        with writing_lock:
            if cid in writing:
                raise HTTPException(409, f"a reply is already being written in conversation {cid}")
            writing.add(cid)
        try:
            chatbot, generated = make()  # errors before the first byte (unknown id, too long) are plain 4xx
        except BaseException:
            writing.discard(cid)
            raise

        def pieces() -> Iterator[str]:
            try:
                yield from generated
            finally:
                writing.discard(cid)

        async def events() -> AsyncIterator[str]:
            try:
                async for piece in iterate_in_thread(pieces, executor):
                    yield f"data: {json.dumps({'delta': piece})}\n\n"
                yield f"data: {json.dumps({'done': True, 'reply_id': chatbot.last_reply_id, 'conversation': chatbot.conversation})}\n\n"
            except (PrimeError, ValueError) as err:
                yield f"data: {json.dumps({'error': str(err)})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/api/conversations/{cid}/messages", dependencies=api)
    def send(cid: str, body: UserMessage) -> StreamingResponse:
        def make():
            chatbot = bot(cid)
            text = body.content.strip()
            if not text:
                raise ValueError("message is empty")
            chatbot._fit_context({"role": "user", "content": text})  # too long: 400 now, not mid-stream
            return chatbot, chatbot.stream(text)

        return stream(cid, make)

    @app.post("/api/messages/{mid}/regenerate", dependencies=api)
    def regenerate(mid: int) -> StreamingResponse:
        message = store.message(mid)

        def make():
            chatbot = bot(message.conversation_id)
            if chatbot.last_reply_id != mid:
                raise ValueError(f"message {mid} is not the conversation's last reply; only that one can be regenerated")
            return chatbot, chatbot.regenerate()

        return stream(message.conversation_id, make)

    @app.post("/api/messages/{mid}/rating", dependencies=api)
    def rate(mid: int, body: Rating) -> dict[str, Any]:
        store.rate(mid, body.rating)
        return _message_json(store.message(mid))

    @app.post("/api/messages/{mid}/correction", dependencies=api)
    def correct(mid: int, body: Correction) -> dict[str, Any]:
        store.correct(mid, body.content)
        return _message_json(store.message(mid))

    @app.post("/api/model", dependencies=api)
    def swap_model(body: ModelSwap) -> dict[str, str]:
        """Load a model (by name: its newest local version) and switch to it. Replies
        being streamed finish on the model they started with; new ones use the new one."""
        chat = config.chat if body.model is None else replace(config.chat, model=body.model)
        try:
            new = make_model(chat)
        except PrimeError as err:
            raise HTTPException(400, str(err)) from None
        state["model"], state["error"] = new, None
        config.chat = chat
        return {"model": new.name, "version": new.version}

    @app.post("/api/images", dependencies=api)
    def image(body: ImageQuestion) -> JSONResponse:
        try:
            data = base64.b64decode(body.image, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, "image: not valid base64") from None
        try:
            return JSONResponse({"answer": ask_about_image(data, body.question)})
        except VisionUnavailableError as err:
            return JSONResponse({"error": str(err)}, status_code=503)

    return app


def serve(config: WebConfig, *, store: ConversationStore | None = None) -> None:
    import uvicorn

    require_key_for(config.host, config.api_key)
    app = create_app(config, store=store)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
