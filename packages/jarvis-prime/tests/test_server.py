"""`prime serve` on loopback, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from typer.testing import CliRunner

from jarvis_prime.cli import app as cli
from jarvis_prime.persona import JARVIS_SYSTEM_PROMPT
from jarvis_prime.serving.app import create_app
from jarvis_prime.serving.settings import DEFAULT_MAX_BODY_BYTES, ServerConfig

pytestmark = pytest.mark.real_model
BASE = "smollm2-135m-instruct"
CHAT = "prime-135m-chat-v1"
FRANCE = [{"role": "system", "content": JARVIS_SYSTEM_PROMPT},
          {"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(config: ServerConfig):
    """A real uvicorn server on 127.0.0.1, ready once /health says so."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    else:
        raise TimeoutError("server never became healthy")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def raw(url: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url + path, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read() or b"{}")


def declare_body(url: str, path: str, length: int, sent: int = 128 << 10) -> tuple[int, dict]:
    """A POST that declares `length` bytes and sends `sent` of them (more than the Guard
    reads of a refused body): the answer comes from the declared length, as a client
    uploading 16 MiB sees it without a reset from a server that already refused it."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(length))
        connection.endheaders(b" " * sent)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


@pytest.fixture(scope="module")
def server(pulled_model):
    with running(ServerConfig(model=BASE, backend="llamacpp", context_length=1024)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_chat_completion_with_usage_from_the_tokenizer(client):
    reply = client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=32, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop" and reply.model == BASE
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 32
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_equals_the_non_streamed_reply(client):
    whole = client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == "stop" and usage.completion_tokens == whole.usage.completion_tokens


def test_length_limit_and_stop_sequences(client):
    cut = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Count from 1 to 50."}],
                                         max_tokens=5, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 5
    stopped = client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=32, temperature=0, stop=["Paris"])
    assert stopped.choices[0].finish_reason == "stop" and "Paris" not in stopped.choices[0].message.content


def test_completions_and_models(client):
    text = client.completions.create(model=BASE, prompt="The capital of Germany is", max_tokens=8, temperature=0)
    assert "Berlin" in text.choices[0].text and text.usage.completion_tokens <= 8
    assert [m.id for m in client.models.list().data] == [BASE]


@pytest.mark.parametrize("body, param", [
    ({"messages": FRANCE, "n": 0}, "n"),
    ({"messages": FRANCE, "max_tokens": "many"}, "max_tokens"),
    ({"messages": FRANCE, "max_tokens": 10**9}, "max_tokens"),
    ({"messages": FRANCE, "max_tokens": 5000}, "max_tokens"),  # beyond the context
    ({"messages": FRANCE, "temperature": 7}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"prompt_missing": True}, "messages"),
    ({"messages": FRANCE, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"messages": FRANCE, "tool_choice": "required"}, "tool_choice"),
    ({"messages": FRANCE, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": FRANCE, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_malformed_requests_are_4xx_in_openai_shape(server, body, param):
    status, _, payload = raw(server, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400, payload
    assert payload["error"]["param"] == param and payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"


def test_invalid_json_unknown_model_and_huge_bodies(server, client):
    status, _, payload = raw(server, "/v1/chat/completions", b'{"messages": [')
    assert status == 400 and payload["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-9", messages=FRANCE)
    status, payload = declare_body(server, "/v1/chat/completions", DEFAULT_MAX_BODY_BYTES + 1)
    assert status == 413 and payload["error"]["code"] == "body_too_large"
    assert raw(server, "/v2/nothing")[0] == 404


def test_metrics_count_requests_and_tokens(server, client):
    client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=4, temperature=0)
    with urllib.request.urlopen(f"{server}/metrics") as r:
        text = r.read().decode()
    assert 'prime_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "prime_completion_tokens_total" in text and "prime_request_latency_seconds_bucket" in text
    assert "prime_queue_depth 0.0" in text


def test_api_key_guards_every_route_but_health(pulled_model):
    with running(ServerConfig(model=BASE, backend="llamacpp", api_key="s3cret", context_length=512)) as url:
        assert raw(url, "/health")[0] == 200
        status, _, payload = raw(url, "/v1/models")
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"
        assert raw(url, "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == BASE


def test_non_loopback_bind_without_a_key_is_refused(monkeypatch):
    monkeypatch.delenv("PRIME_API_KEY", raising=False)
    result = CliRunner().invoke(cli, ["serve", BASE, "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "without an API key" in result.output


def test_a_full_queue_answers_429_with_retry_after(pulled_model):
    with running(ServerConfig(model=BASE, backend="llamacpp", max_queue=1, context_length=512)) as url:
        body = json.dumps({"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 200,
                           "temperature": 0}).encode()
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: raw(url, "/v1/chat/completions", body), range(3)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses[0] == 200 and 429 in statuses
    busy = next(r for r in results if r[0] == 429)
    assert busy[1]["retry-after"] == "1" and busy[2]["error"]["code"] == "queue_full"


def test_hot_swap_under_load_fails_no_request(chat_model, pulled_model):
    """Clients keep one name (--served-model-name); the fingerprint shows who answered. Every
    request sent after the swap returned is answered by the new model (requests are compared by
    when they were sent: the order replies are appended in is the threads' scheduling)."""
    config = ServerConfig(model=BASE, backend="llamacpp", context_length=512, max_queue=32, served_name="jarvis",
                          admin_key="admin")
    with running(config) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answered: list[tuple[float, str]] = []
        errors, stop = [], threading.Event()

        def loop() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    reply = client.chat.completions.create(model="jarvis", messages=FRANCE, max_tokens=8, temperature=0)
                    answered.append((sent, reply.system_fingerprint))
                except Exception as err:  # noqa: BLE001  (any failure counts)
                    errors.append(repr(err))

        workers = [threading.Thread(target=loop) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(2)
        status, _, payload = raw(url, "/admin/models", json.dumps({"model": CHAT, "backend": "llamacpp"}).encode(),
                                 {"Authorization": "Bearer admin"})
        swapped = time.monotonic()
        assert status == 200 and payload["model"] == CHAT
        time.sleep(3)
        stop.set()
        for w in workers:
            w.join()
        assert client.models.list().data[0].id == "jarvis"
    assert errors == []
    before = {fingerprint for sent, fingerprint in answered if sent < swapped}
    after = [fingerprint for sent, fingerprint in answered if sent > swapped]
    assert f"{BASE}-{pulled_model.manifest.version}" in before and after
    assert set(after) == {f"{CHAT}-{chat_model.manifest.version}"}  # the version the catalog ships


def test_transformers_backend_batches_concurrent_streams(pulled_model):
    """Four streaming clients at once on transformers: all answered, decoded together."""
    from concurrent.futures import ThreadPoolExecutor

    with running(ServerConfig(model=BASE, backend="transformers", context_length=1024)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        questions = ["What is the capital of France?", "Name a colour.", "What is 2+2?", "Say hello."]

        def ask(question):
            stream = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": question}],
                                                    max_tokens=16, temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, questions))
        assert "Paris" in answers[0] and all(answers)
        with urllib.request.urlopen(f"{url}/metrics") as r:
            text = r.read().decode()
    batches = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("prime_batch_size_count")))
    requests = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("prime_batch_size_sum")))
    assert requests == 4 and batches < 4, f"{requests:.0f} requests in {batches:.0f} batches"
