"""`jarvis serve`'s guard, the serving kit's Guard: the Host allow-list, the key, JSON-only
writes and the body limit answer before the body is read or routed (driven as ASGI, no socket)."""

from __future__ import annotations

import base64
import json

import pytest
from asgi_driver import call

from jarvis.memory import ConversationStore
from jarvis.web.server import create_app
from jarvis.web.settings import WebConfig
from jarvis_prime.models.base import Chunk

JSON = {"content-type": "application/json"}


class StandIn:
    """What the Chatbot uses of a PrimeModel (this file is about the server, not text)."""

    name, version, context_length = "stand-in", "1.0.0", 4096

    def apply_chat_template(self, messages) -> str:
        return "".join(m["content"] for m in messages)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def encode_chat(self, messages):
        return messages

    def complete(self, prompt, *, stream=False, **options):
        return iter([Chunk("Hello"), Chunk(" there.", "stop")])

    def close(self) -> None:
        pass


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
    out = call(make(api_key="k"), "POST", "/api/conversations/c1/messages", headers=JSON, chunk=b" " * 65536, chunk_count=400)  # 25 MiB
    assert out.status == 401
    assert out.chunks_read <= 2, f"read {out.chunks_read} chunks of an unauthenticated request"


def test_a_body_over_the_limit_is_413_counted_as_it_arrives(make):
    server = make(api_key="k", max_body_bytes=100_000)
    auth = {**JSON, "authorization": "Bearer k"}
    out = call(server, "POST", "/api/conversations/c1/messages", headers=auth, chunk=b" " * 65536,
               chunk_count=400)  # no Content-Length
    assert out.status == 413 and "body" in out.json()["error"]
    assert out.chunks_read <= 100_000 // 65536 + 3
    out = call(server, "POST", "/api/conversations/c1/messages", headers={**auth, "content-length": str(1 << 30)},
               chunk=b" " * 65536, chunk_count=400)
    assert out.status == 413 and out.chunks_read <= 100_000 // 65536 + 3


def test_an_image_is_bounded_and_a_small_body_still_reaches_its_route(make):
    server = make(api_key="k")
    auth = {**JSON, "authorization": "Bearer k"}
    body = json.dumps({"title": "x"}).encode()
    out = call(server, "POST", "/api/conversations", headers=auth, chunks=[body[:5], body[5:]])
    assert out.status == 201 and out.json()["id"]
    url = "data:image/png;base64," + base64.b64encode(b"not an image").decode()[:5] + "!"
    image = json.dumps({"content": [{"type": "image_url", "image_url": {"url": url}}]}).encode()
    out = call(server, "POST", f"/api/conversations/{out.json()['id']}/messages", headers=auth, chunks=[image])
    assert out.status == 400 and out.json()["error"].startswith("content[0]: ")
    # an image over the per-image limit is refused from its base64 length, before decoding
    from jarvis.vision import MAX_IMAGE_BYTES
    from jarvis.web.schemas import UserMessage

    huge = UserMessage(content=[{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (
        MAX_IMAGE_BYTES // 3 * 4 + 8)}}])
    with pytest.raises(Exception, match=r"content\[0\]: the image is \d+ bytes, over"):
        huge.images()


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


def swap(server, model: str, key: str | None = None):
    headers = {**JSON, **({"authorization": f"Bearer {key}"} if key else {})}
    return call(server, "POST", "/api/model", headers=headers, chunks=[json.dumps({"model": model}).encode()])


def test_switching_models_is_off_without_an_admin_key_and_takes_that_key_only(make, model_store):
    """Any page client could switch the model (the API key, or none on loopback, sufficed)."""
    model_store("prime-next")
    for server, key in ((make(), None), (make(api_key="k"), "k")):
        out = swap(server, "prime-next", key)
        assert out.status == 403 and "--admin-key" in out.json()["error"], out.body
    server = make(api_key="k", admin_key="admin")
    assert swap(server, "prime-next").status == 401
    assert swap(server, "prime-next", "wrong").status == 401
    assert swap(server, "prime-next", "k").status == 403
    assert call(server, "GET", "/api/conversations", headers={"authorization": "Bearer admin"}).status == 401


def test_an_unknown_name_is_404_and_a_path_400_unless_allowed(make, model_store, tmp_path):
    """An unknown name was a 400 only by luck of PrimeError; any folder with a prime.json loaded.
    The real loader: nothing is loaded before the name is checked."""
    out = swap(make(admin_key="admin"), "smollm3", "admin")
    assert out.status == 404 and "unknown model 'smollm3'" in out.json()["error"], out.body
    crafted = model_store("crafted", root=tmp_path / "elsewhere")
    out = swap(make(admin_key="admin"), str(crafted), "admin")
    assert out.status == 400 and out.json()["error"].startswith("model:"), out.body
    assert "--allow-model-paths" in out.json()["error"]


def test_jarvis_serve_refuses_an_admin_key_equal_to_the_api_key(monkeypatch):
    """Equal keys would let every page client switch the model too."""
    from typer.testing import CliRunner

    from jarvis.cli import app as cli

    monkeypatch.delenv("JARVIS_API_KEY", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--api-key", "same", "--admin-key", "same"])
    assert result.exit_code == 1 and "must differ from the API key" in result.output, result.output
