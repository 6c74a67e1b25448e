"""`jarvis serve`'s guard, the serving kit's Guard: the Host allow-list, the key, JSON-only
writes and the body limit answer before the body is read or routed (driven as ASGI, no socket)."""

from __future__ import annotations

import asyncio
import gc
import base64
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from jarvis.memory import ConversationStore
from jarvis.web.server import create_app
from jarvis.web.settings import WebConfig

JSON = {"content-type": "application/json"}


class StandIn:
    """What the Chatbot uses of a PrimeModel (this file is about the server, not text)."""

    name, version, context_length = "stand-in", "1.0.0", 4096

    def apply_chat_template(self, messages) -> str:
        return "".join(m["content"] for m in messages)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def chat(self, messages, *, stream=False, **options):
        return iter(["Hello", " there."])

    def close(self) -> None:
        pass


@dataclass
class Exchange:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    chunks_read: int = 0

    def json(self) -> Any:
        return json.loads(self.body)


def call(app, method: str, path: str, *, headers: dict[str, str] | None = None, chunks: list[bytes] | None = None,
         chunk_count: int | None = None, chunk: bytes = b"", host: str = "127.0.0.1:8000", hang_up: bool = False) -> Exchange:
    """One request; its body is `chunks`, or `chunk` sent `chunk_count` times (a bounded
    stand-in for an endless upload), with no Content-Length unless `headers` has one.
    `hang_up`: once the body is sent the client disconnects, before any answer; the
    garbage collector is off meanwhile, so what the request held must be released by
    the server itself (CPython's collector frees cycles late or, under load, much later)."""
    out = Exchange()
    body = list(chunks or ([chunk] * (chunk_count or 0)))

    async def receive():
        if out.chunks_read < len(body):
            out.chunks_read += 1
            return {"type": "http.request", "body": body[out.chunks_read - 1],
                    "more_body": out.chunks_read < len(body)}
        if out.chunks_read == len(body) and not body:
            out.chunks_read += 1
            return {"type": "http.request", "body": b"", "more_body": False}
        if hang_up:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # the client waits for the answer

    async def send(message):
        if message["type"] == "http.response.start":
            out.status = message["status"]
            out.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            out.body += message.get("body", b"")

    raw = [(b"host", host.encode())] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": raw, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    collecting = gc.isenabled()
    gc.disable()
    try:
        asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    finally:
        if collecting:
            gc.enable()
    return out


@pytest.fixture
def make(tmp_path):
    stores = []

    def make(**options):
        stores.append(ConversationStore(tmp_path / f"jarvis{len(stores)}.db"))
        return create_app(WebConfig(**options), store=stores[-1], model=StandIn())

    yield make
    for store in stores:
        store.close()


def test_an_unauthenticated_upload_is_refused_before_it_is_read(make):
    """The key was a route dependency: FastAPI read and decoded the whole body first."""
    out = call(make(api_key="k"), "POST", "/api/images", headers=JSON, chunk=b" " * 65536, chunk_count=400)  # 25 MiB
    assert out.status == 401
    assert out.chunks_read <= 2, f"read {out.chunks_read} chunks of an unauthenticated request"


def test_a_body_over_the_limit_is_413_counted_as_it_arrives(make):
    server = make(api_key="k", max_body_bytes=100_000)
    auth = {**JSON, "authorization": "Bearer k"}
    out = call(server, "POST", "/api/images", headers=auth, chunk=b" " * 65536, chunk_count=400)  # no Content-Length
    assert out.status == 413 and "body" in out.json()["error"]
    assert out.chunks_read <= 100_000 // 65536 + 3
    out = call(server, "POST", "/api/images", headers={**auth, "content-length": str(1 << 30)}, chunk=b" " * 65536,
               chunk_count=400)
    assert out.status == 413 and out.chunks_read <= 100_000 // 65536 + 3


def test_an_image_is_bounded_and_a_small_body_still_reaches_its_route(make):
    from jarvis.web.schemas import ImageQuestion
    assert ImageQuestion.model_fields["image"].metadata, "image has no length limit"
    server = make(api_key="k")
    auth = {**JSON, "authorization": "Bearer k"}
    body = json.dumps({"title": "x"}).encode()
    out = call(server, "POST", "/api/conversations", headers=auth, chunks=[body[:5], body[5:]])
    assert out.status == 201 and out.json()["id"]
    image = json.dumps({"image": base64.b64encode(b"not an image").decode()[:5] + "!", "question": "?"}).encode()
    assert call(server, "POST", "/api/images", headers=auth, chunks=[image]).status == 400


def test_foreign_hosts_and_non_json_writes_are_refused_before_the_key(make):
    server = make()
    assert call(server, "GET", "/api/conversations", host="evil.example:8000").status == 400
    assert call(server, "GET", "/", host="evil.example").status == 400
    assert call(server, "GET", "/api/conversations", host="localhost:8000").status == 200
    assert call(server, "POST", "/api/conversations", headers={"content-type": "text/plain"},
                chunks=[b"{}"]).status == 415


def test_a_client_that_hangs_up_before_the_first_byte_frees_the_conversation(make):
    """Starlette never starts a stream whose client has left; the conversation stayed
    locked (409 until restart) because only the generator released it."""
    server = make()
    cid = call(server, "POST", "/api/conversations", headers=JSON, chunks=[b"{}"]).json()["id"]
    message = json.dumps({"content": "hi"}).encode()
    for _ in range(3):
        call(server, "POST", f"/api/conversations/{cid}/messages", headers=JSON, chunks=[message], hang_up=True)
    out = call(server, "POST", f"/api/conversations/{cid}/messages", headers=JSON, chunks=[message])
    assert out.status == 200, out.body
    assert b'"done": true' in out.body
