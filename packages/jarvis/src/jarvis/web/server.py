"""`jarvis serve`: the chat page and its JSON API (FastAPI).

The page (`static/index.html`, plain JavaScript, no build step) talks only to the
JSON API below, so scripts can too:

    GET    /api/health                         model loaded?
    GET    /api/conversations                  list, newest first
    POST   /api/conversations                  {"title"?, "private"?} -> {"id"}
    GET    /api/conversations/{id}             messages with ids and feedback
    PATCH  /api/conversations/{id}             {"title"?, "private"?}
    DELETE /api/conversations/{id}
    POST   /api/conversations/{id}/messages    {"content": text | [parts]} -> a stream (below); parts are
                                               {"type": "text", "text"} and {"type": "image_url",
                                               "image_url": {"url": "data:image/png;base64,..."}}
    POST   /api/messages/{id}/rating           {"rating": 1 | -1 | null}
    POST   /api/messages/{id}/correction       {"content"}
    POST   /api/messages/{id}/regenerate       -> a stream
    GET    /api/images/{sha256}                a stored image (messages list their images' sha256)
    POST   /api/model                          {"model"?} reload (e.g. a version `jarvis improve` promoted):
                                               admin key only, off without one (below)
    GET    /api/memory                         the facts JARVIS remembers, newest first (issue #24)
    DELETE /api/memory/{id}                    forget one
    GET    /static/{file}                      the page's vendored scripts (marked, DOMPurify: static/VENDORED.md)

Streams are server-sent events, one JSON object per `data:` line: {"delta": text}
pieces, a {"tool": {id, name, arguments, result, error}} per tool call, then {"done": true,
"reply_id": N} (or {"error": message}). The page renders a reply as Markdown (marked) and
sanitizes the HTML (DOMPurify) before showing it: never raw HTML from the model. Generation runs
in a worker thread so the event loop never blocks; the model serialises requests
itself. Every /api route but /api/health needs `Authorization: Bearer KEY` when the
server has a key, and the server refuses to listen beyond loopback without one.
POST /api/model takes the admin key instead (`--admin-key`, JARVIS_ADMIN_KEY; without
one it is 403), a catalog or store name (a directory only with `--allow-model-paths`),
and one switch at a time (409 while a model loads): the serving kit's `SwapGate`.
Errors are {"error": message} with a 4xx/5xx status.

Images: at most 4 per message, each a `data:` URL (remote URLs are never fetched) of at
most 20 MiB, checked before it is decoded; a bad one is 400 naming its part
(`content[1]: ...`). A turn with images goes to the chat model if it sees them, else to
the vision model (`jarvis.vision`), loaded on the first image turn (`VisionHost`); with
no vision model here the turn is 503 saying what to `prime pull`.

The model is held by jarvis_prime's serving kit (`ModelHost`): a swap closes the old
model once the replies still streaming from it end. The bodies are in `schemas`, the
reply streams in `replies`, the routes (one router per job) in `routes`, the config
and key rule in `settings`.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from jarvis.chatbots import Chatbot, ChatbotConfig
from jarvis.memory import ConflictError, ConversationStore, NotFoundError
from jarvis.web.replies import Replies
from jarvis.web.routes import conversation_routes, memory_routes, model_routes, reply_routes
from jarvis.vision import VisionUnavailableError
from jarvis.web.settings import WebConfig, require_key_for
from jarvis.web.vision_host import VisionHost
from jarvis_prime import PrimeError, PrimeModel
from jarvis_prime.errors import ImageInputError, ImageNotSupportedError
from jarvis_prime.serving.completions import Admission
from jarvis_prime.serving.errors import PLAIN, install_error_handlers
from jarvis_prime.serving.host import ModelHost
from jarvis_prime.serving.middleware import Guard, GuardRules, allowed_hosts
from jarvis_prime.serving.settings import require_separate_admin_key
from jarvis_prime.serving.swap import SwapGate

log = logging.getLogger(__name__)


def _load_in_background(swaps: SwapGate, make_model: Callable[[ChatbotConfig], Any], chat: ChatbotConfig) -> None:
    def load() -> None:
        try:
            model = swaps.startup(lambda: make_model(chat))  # a POST /api/model meanwhile is 409
        except Exception as err:  # noqa: BLE001  (reported by /api/health and every chat request)
            swaps.host.error = str(err)
            log.error("could not load %s: %s", chat.model, err)
            return
        swaps.host.offer(model, model.name)

    threading.Thread(target=load, daemon=True, name="jarvis-load").start()


def _open_path(path: str) -> bool:
    """The page and /api/health need no key; the rest of /api does."""
    return not path.startswith("/api/") or path == "/api/health"


def create_app(config: WebConfig, *, store: ConversationStore | None = None,
               model: PrimeModel | Any | None = None,
               loader: Callable[[ChatbotConfig], Any] | None = None,
               vision_model: PrimeModel | Any | None = None) -> FastAPI:
    """The app. `model` skips loading (tests, an already-loaded model: the caller's to
    close); otherwise the configured model loads in the background and /api/health says
    when it is ready. `loader` makes a model from a ChatbotConfig (default: the Chatbot's).
    `vision_model`: the model for image turns, already loaded (the caller's to close);
    default: `Chatbot.vision_model`'s choice, loaded on the first image turn."""
    store = store or ConversationStore()
    host, executor = ModelHost(), ThreadPoolExecutor(max_workers=4, thread_name_prefix="jarvis-web")
    swaps = SwapGate(host, allow_paths=config.allow_model_paths)
    make_model = loader or (lambda chat: Chatbot(chat).model)
    vision = VisionHost(lambda: Chatbot(config.chat).vision_model, vision_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        host.close()
        vision.close()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="JARVIS", version="2", docs_url=None, redoc_url=None, lifespan=lifespan)
    # Before routing and before the body is read: the Host allow-list (DNS rebinding),
    # the keys, JSON-only writes (cross-site forms), the body limit (the serving kit's Guard).
    app.add_middleware(Guard, rules=GuardRules(api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                                               hosts=allowed_hosts(config.host), open_path=_open_path, shape=PLAIN,
                                               admin_key=config.admin_key, admin_path=lambda path: path == "/api/model"))
    # a bad image or one sent where no model sees it: 400; no vision model here (or it failed to load): 503
    install_error_handlers(app, PLAIN, {NotFoundError: 404, ConflictError: 409, ImageInputError: 400,
                                        ImageNotSupportedError: 400, VisionUnavailableError: 503, PrimeError: 503,
                                        ValueError: 400})
    if model is not None:
        host.swap(model, model.name, owned=False)
    else:
        _load_in_background(swaps, make_model, config.chat)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("jarvis.web").joinpath("static/index.html").read_text(encoding="utf-8")

    app.include_router(model_routes(config, swaps, make_model))
    app.mount("/static", StaticFiles(packages=[("jarvis.web", "static")]), name="static")
    app.include_router(conversation_routes(config, store))
    app.include_router(memory_routes(store))
    app.include_router(reply_routes(config, store, Replies(host, executor, Admission(config.max_queue, config.retry_after_s)),
                                 vision))
    return app


def serve(config: WebConfig, *, store: ConversationStore | None = None) -> None:
    import uvicorn

    require_key_for(config.host, config.api_key)
    require_separate_admin_key(config.api_key, config.admin_key)
    app = create_app(config, store=store)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
