"""The page's JSON API, one router per job: the model (health, swap), the
conversations and their stored messages and images, long-term memory, and the replies that stream.
`server.create_app` puts them together behind the kit's Guard (host, key, JSON, body size)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jarvis.chatbots import Chatbot, ChatbotConfig
from jarvis.memory import ConversationStore
from jarvis.web.replies import Replies
from jarvis.web.schemas import ConversationPatch, Correction, ModelSwap, NewConversation, Rating, UserMessage, message_json
from jarvis.web.settings import WebConfig
from jarvis.web.vision_host import VisionHost
from jarvis_prime.serving.swap import SwapGate


def model_routes(config: WebConfig, swaps: SwapGate, make_model: Callable[[ChatbotConfig], Any]) -> APIRouter:
    router = APIRouter()
    host = swaps.host

    @router.get("/api/health")
    def health() -> JSONResponse:
        slot = host.current
        if slot is None:
            body = {"status": "error" if host.error else "loading", "error": host.error}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "model": slot.model.name, "version": slot.model.version})

    @router.post("/api/model")
    def swap_model(body: ModelSwap) -> dict[str, str]:
        """Load a model (by name: its newest local version) and switch to it. Replies
        being streamed finish on the model they started with, which is closed after them.
        The admin key only (Guard); names only unless --allow-model-paths; one at a time."""
        new = swaps.swap(body.model, lambda target: make_model(
            config.chat if target is None else replace(config.chat, model=target)))
        if body.model is not None:
            config.chat = replace(config.chat, model=body.model)  # new conversations record the name
        return {"model": new.name, "version": new.version}

    return router


def conversation_routes(config: WebConfig, store: ConversationStore) -> APIRouter:
    router = APIRouter()

    @router.get("/api/conversations")
    def conversations() -> list[dict[str, Any]]:
        return [c.__dict__ for c in store.list()]

    @router.post("/api/conversations", status_code=201)
    def new_conversation(body: NewConversation) -> dict[str, str]:
        return {"id": store.create(title=body.title, model=config.chat.model,
                                   system_prompt=config.chat.system_prompt, private=body.private)}

    @router.get("/api/conversations/{cid}")
    def conversation(cid: str) -> dict[str, Any]:
        info = store.get(cid)
        return {"conversation": info.__dict__, "messages": [message_json(m) for m in store.stored_messages(cid)]}

    @router.patch("/api/conversations/{cid}")
    def patch_conversation(cid: str, body: ConversationPatch) -> dict[str, Any]:
        store.update(cid, title=body.title, private=body.private)
        return store.get(cid).__dict__

    @router.delete("/api/conversations/{cid}", status_code=204)
    def delete_conversation(cid: str) -> None:
        store.get(cid)
        store.delete(cid)

    @router.get("/api/images/{sha256}")
    def image(sha256: str = Path(pattern="^[0-9a-f]{64}$")) -> Response:
        """A stored image's bytes, as sent (the page fetches it with its key, then shows it)."""
        found = store.image(sha256)
        return Response(found.data, media_type=f"image/{found.format}",
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=86400"})

    @router.post("/api/messages/{mid}/rating")
    def rate(mid: int, body: Rating) -> dict[str, Any]:
        store.rate(mid, body.rating)
        return message_json(store.message(mid))

    @router.post("/api/messages/{mid}/correction")
    def correct(mid: int, body: Correction) -> dict[str, Any]:
        store.correct(mid, body.content)
        return message_json(store.message(mid))

    return router


def memory_routes(store: ConversationStore) -> APIRouter:
    """What JARVIS remembers (`ConversationStore.facts`), for the page to list and forget."""
    router = APIRouter()

    @router.get("/api/memory")
    def facts() -> list[dict[str, Any]]:
        return [f.__dict__ for f in store.facts()]

    @router.delete("/api/memory/{fact_id}", status_code=204)
    def forget(fact_id: int) -> None:
        store.forget(fact_id)

    return router


def reply_routes(config: WebConfig, store: ConversationStore, replies: Replies, vision: VisionHost) -> APIRouter:
    router = APIRouter()

    def bot(cid: str, model: Any) -> Chatbot:
        return Chatbot(config.chat, model=model, store=store, conversation=cid, vision=vision.get)

    @router.post("/api/conversations/{cid}/messages")
    def send(cid: str, body: UserMessage) -> StreamingResponse:
        text, images = body.text(), body.images()  # bad images: 400 naming the part, before any model work

        def start(model):
            chatbot = bot(cid, model)
            # too long, or an image and no vision model here: 4xx now, not mid-stream
            chatbot._fit_context(chatbot.user_turn(text, images))
            return chatbot, chatbot.stream(text, images)

        return replies.stream(cid, start)

    @router.post("/api/messages/{mid}/regenerate")
    def regenerate(mid: int) -> StreamingResponse:
        message = store.message(mid)

        def start(model):
            chatbot = bot(message.conversation_id, model)
            if chatbot.last_reply_id != mid:
                raise ValueError(f"message {mid} is not the conversation's last reply; only that one can be regenerated")
            return chatbot, chatbot.regenerate()

        return replies.stream(message.conversation_id, start)

    return router
