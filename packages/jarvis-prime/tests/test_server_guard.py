"""`prime serve`'s Guard, before any model is loaded: the Host allow-list, the key, JSON-only
writes and the body limit all answer before the body is read or routed (no model, no socket)."""

from __future__ import annotations

import json
import time

from asgi_driver import call
from jarvis_prime.models.base import Chunk
from jarvis_prime.models.prime_model import Prompt
from jarvis_prime.serving.app import create_app
from jarvis_prime.serving.settings import ServerConfig

JSON = {"content-type": "application/json"}
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


def app(**options):
    return create_app(ServerConfig(model="never-loaded", **options), loader=lambda *a: None)


def test_a_chunked_body_over_the_limit_is_413_though_it_declares_no_length():
    # 4 x 600 bytes with no Content-Length passed the old check as 0 bytes
    out = call(app(max_body_bytes=1024), "POST", "/v1/chat/completions", headers=JSON, chunk=b" " * 600, chunk_count=4)
    assert out.status == 413, out.body
    assert out.json()["error"]["code"] == "body_too_large"


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read():
    out = call(app(max_body_bytes=1024), "POST", "/v1/completions", headers={**JSON, "content-length": "5000000"},
               chunk=b" " * 65536, chunk_count=100)
    assert out.status == 413
    assert out.chunks_read <= 1024 // 65536 + 2


def test_an_unauthenticated_upload_is_refused_without_reading_it():
    out = call(app(api_key="sekrit"), "POST", "/v1/chat/completions", headers=JSON, chunk=b" " * 65536,
               chunk_count=200)  # 12.5 MiB, no Content-Length
    assert out.status == 401
    assert out.chunks_read <= (1 << 20) // 65536 + 2, f"read {out.chunks_read} chunks before refusing"


def test_a_body_within_the_limit_reaches_the_route():
    out = call(app(), "POST", "/v1/chat/completions", headers=JSON, chunks=[CHAT[:10], CHAT[10:]])
    assert out.status == 503 and out.json()["error"]["code"] == "model_not_ready"  # routed, parsed: no model yet


def test_foreign_host_names_are_refused():
    """DNS rebinding: a page on evil.example that resolves its name to 127.0.0.1 sends Host: evil.example."""
    for host in ("evil.example", "evil.example:8001", "127.0.0.1.evil.example"):
        assert call(app(), "GET", "/v1/models", host=host).status == 400, host
    for host in ("127.0.0.1:8001", "localhost:8001", "[::1]:8001", "localhost"):
        assert call(app(), "GET", "/v1/models", host=host).status == 503, host  # allowed: no model yet
    assert call(app(host="10.0.0.5", api_key="k"), "GET", "/health", host="10.0.0.5:8001").status == 503
    assert call(app(host="0.0.0.0", api_key="k"), "GET", "/health", host="prime.lan:8001").status == 503


def test_writes_must_be_json():
    """A cross-site form or no-cors fetch cannot send Content-Type: application/json."""
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": content_type} if content_type else {}
        for path in ("/v1/chat/completions", "/v1/completions", "/admin/models"):
            out = call(app(admin_key="a"), "POST", path, headers={**headers, "authorization": "Bearer a"}, chunks=[CHAT])
            assert out.status == 415, (path, content_type, out.body)
    assert call(app(), "POST", "/v1/chat/completions", headers={"content-type": "application/json; charset=utf-8"},
                chunks=[CHAT]).status == 503


def test_metrics_are_labelled_by_route_template_not_by_the_raw_path():
    server = app(api_key="k")
    for i in range(5):
        call(server, "GET", f"/no/such/path/{i}")
        call(server, "POST", f"/v1/chat/completions/{i}", headers=JSON, chunks=[CHAT])
    call(server, "GET", "/v1/models")
    call(server, "GET", "/health")
    routes = {sample.labels["route"] for metric in server.state.metrics.requests.collect()
              for sample in metric.samples}
    assert routes == {"other", "/v1/models", "/health"}, routes


class StandInModel:
    """What the serving kit uses of a PrimeModel (this file is about the server, not text)."""

    name, version, context_length = "stand-in", "1.0.0", 4096

    def __init__(self) -> None:
        self.closed = False

    def encode_chat(self, messages) -> Prompt:
        return Prompt(ids=[1, 2, 3])

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def complete(self, prompt, *, stream=False, **options):
        assert stream and not self.closed
        return iter([Chunk("Hello", None), Chunk(" there.", "stop")])

    def close(self) -> None:
        self.closed = True


def test_a_client_that_hangs_up_before_the_first_byte_releases_its_queue_place_and_model():
    """Starlette never starts a stream whose client has left: the queue place and the
    model pin leaked (429s for ever once max_queue had leaked; a swapped-out model never closed)."""
    server, model = app(max_queue=2), StandInModel()
    server.state.host.swap(model, "stand-in")
    stream = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    for _ in range(3):
        call(server, "POST", "/v1/chat/completions", headers=JSON, chunks=[stream], hang_up=True)
    assert server.state.host.current.users == 0
    out = call(server, "POST", "/v1/chat/completions", headers=JSON, chunks=[stream])
    assert out.status == 200 and out.body.endswith(b"data: [DONE]\n\n"), out.body
    server.state.host.swap(StandInModel(), "stand-in")
    assert model.closed, "the swapped-out model is still pinned"


def test_a_model_that_fails_to_load_says_so_on_health_and_in_the_log(caplog):
    """`prime serve no-such-model` said "loading" for ever."""
    from starlette.testclient import TestClient

    def loader(name, *args):
        raise FileNotFoundError(f"no model {name!r} here; prime pull it first")

    server = create_app(ServerConfig(model="no-such-model"), loader=loader)
    with caplog.at_level("ERROR"), TestClient(server, base_url="http://127.0.0.1") as client:
        for _ in range(100):
            health = client.get("/health")
            if health.json()["status"] != "loading":
                break
            time.sleep(0.05)
        assert health.status_code == 503
        assert health.json() == {"status": "error", "error": "FileNotFoundError: no model 'no-such-model' here; "
                                                              "prime pull it first"}
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503 and "no-such-model" in chat.json()["error"]["message"]
    assert any("no-such-model" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_a_client_that_leaves_mid_body_is_counted_499_not_500():
    """The Guard counted every request it did not answer as a server error."""
    server = app()
    call(server, "POST", "/v1/chat/completions", headers=JSON, chunks=[b'{"messages": ['], cut_off=True)
    statuses = {sample.labels["status"] for metric in server.state.metrics.requests.collect()
                for sample in metric.samples if sample.name == "prime_requests_total"}
    assert statuses == {"499"}, statuses
