"""`jarvis serve`'s POST /api/model closes the model it replaces, once the replies still
streaming from it have ended, and loads one model at a time (stand-in models named in a
private store: this is about ownership, not text)."""

import json
import socket
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from jarvis.memory import ConversationStore
from jarvis.web.server import create_app
from jarvis.web.settings import WebConfig
from jarvis_prime.manifest import read_manifest
from jarvis_prime.models.base import Chunk

ADMIN = "admin-key"


class StandInModel:
    """What the Chatbot uses of a PrimeModel; `complete(stream=True)` pauses after its first
    piece until `release` is set, so a test can swap models mid-reply."""

    context_length = 4096
    version = "1.0.0"

    def __init__(self, name: str) -> None:
        self.name, self.closed = name, False
        self.streaming, self.release = threading.Event(), threading.Event()
        self.release.set()

    def apply_chat_template(self, messages) -> str:
        return "".join(m["content"] for m in messages)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def encode_chat(self, messages):
        return messages

    def complete(self, prompt, *, stream=False, **options):
        assert stream and not self.closed
        return self._pieces()

    def _pieces(self):
        yield Chunk("Hello")
        self.streaming.set()
        assert self.release.wait(30)
        assert not self.closed, "closed while a reply was streaming from it"
        yield Chunk(" there.", "stop")

    def close(self) -> None:
        self.closed = True


class Loaded(list):
    """The stand-ins loaded, in order. While `hold` is clear a load waits for it (after
    setting `entered`): how a test keeps a load in progress on cue."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.hold = threading.Event(), threading.Event()
        self.hold.set()

    def load(self, chat) -> StandInModel:
        """A stand-in named as the model `chat.model` is (a store folder after a swap)."""
        self.entered.set()
        assert self.hold.wait(30)
        folder = Path(chat.model)
        self.append(StandInModel(read_manifest(folder).name if folder.is_dir() else chat.model))
        return self[-1]


@contextmanager
def serving(tmp_path, config: WebConfig):
    store = ConversationStore(tmp_path / "jarvis.db")
    loaded = Loaded()
    loader = loaded.load

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config, store=store, loader=loader), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not (server.started and request(url, "GET", "/api/health")[0] == 200):
        assert time.monotonic() < deadline, "the stand-in model never loaded"
        time.sleep(0.05)
    try:
        yield url, loaded
    finally:
        loaded.hold.set()
        for model in loaded:
            model.release.set()
        server.should_exit = True
        thread.join(timeout=10)
        store.close()


@pytest.fixture
def running(tmp_path, model_store):
    model_store("prime-next")
    with serving(tmp_path, WebConfig(admin_key=ADMIN)) as served:
        yield served


def request(url, method, path, body=None, key=None):
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_swapping_models_closes_the_old_one(running):
    url, loaded = running
    status, body = request(url, "POST", "/api/model", {"model": "prime-next"}, ADMIN)
    assert status == 200 and json.loads(body)["model"] == "prime-next"
    first, second = loaded
    assert first.closed, "the replaced model was left open"
    assert not second.closed


def test_a_reply_streaming_during_a_swap_finishes_on_the_old_model_then_it_closes(running):
    url, loaded = running
    first = loaded[0]
    first.release.clear()
    cid = json.loads(request(url, "POST", "/api/conversations", {})[1])["id"]
    answer = {}
    sender = threading.Thread(target=lambda: answer.update(
        reply=request(url, "POST", f"/api/conversations/{cid}/messages", {"content": "Hi"})))
    sender.start()
    assert first.streaming.wait(30)
    assert request(url, "POST", "/api/model", {"model": "prime-next"}, ADMIN)[0] == 200
    assert not first.closed, "closed under a streaming reply"
    first.release.set()
    sender.join(30)
    status, raw = answer["reply"]
    events = [json.loads(line[len("data:"):]) for line in raw.splitlines() if line.startswith("data:")]
    assert status == 200 and "".join(e.get("delta", "") for e in events) == "Hello there." and events[-1]["done"]
    assert first.closed, "the old model was never closed"


def test_replies_beyond_max_queue_are_429_with_retry_after(tmp_path):
    """The page streamed on 4 threads with an unbounded wait behind them and never said 429."""
    with serving(tmp_path, WebConfig(max_queue=1)) as (url, loaded):
        model = loaded[0]
        model.release.clear()
        first, second = (json.loads(request(url, "POST", "/api/conversations", {})[1])["id"] for _ in range(2))
        answer = {}
        sender = threading.Thread(target=lambda: answer.update(
            reply=request(url, "POST", f"/api/conversations/{first}/messages", {"content": "Hi"})))
        sender.start()
        assert model.streaming.wait(30)
        busy = urllib.request.Request(f"{url}/api/conversations/{second}/messages", data=b'{"content": "Hi"}',
                                      method="POST", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(busy, timeout=5)
        assert refused.value.code == 429 and refused.value.headers["Retry-After"] == "1"
        assert "busy" in json.loads(refused.value.read())["error"]
        model.release.set()
        sender.join(30)
        assert answer["reply"][0] == 200
        status, raw = request(url, "POST", f"/api/conversations/{second}/messages", {"content": "Hi"})
        assert status == 200 and '"done": true' in raw, "the place was not given back"


def test_one_switch_at_a_time_a_second_is_409_and_loads_nothing(running, model_store):
    """Two switches at once loaded two models. The first load is held open on an Event
    so the second request surely arrives while it runs."""
    url, loaded = running
    model_store("prime-other")
    loaded.hold.clear()
    loaded.entered.clear()
    answers = {}
    first = threading.Thread(target=lambda: answers.update(
        next=request(url, "POST", "/api/model", {"model": "prime-next"}, ADMIN)))
    first.start()
    assert loaded.entered.wait(10)
    status, body = request(url, "POST", "/api/model", {"model": "prime-other"}, ADMIN)
    assert status == 409 and "already loading" in json.loads(body)["error"], body
    loaded.hold.set()
    first.join(30)
    assert answers["next"][0] == 200
    assert [m.name for m in loaded] == ["prime-135m-chat-v1", "prime-next"], "the refused switch loaded a model"
    cid = json.loads(request(url, "POST", "/api/conversations", {})[1])["id"]
    assert json.loads(request(url, "GET", f"/api/conversations/{cid}")[1])["conversation"]["model"] == "prime-next"
    assert request(url, "POST", "/api/model", {"model": "prime-other"}, ADMIN)[0] == 200, "the gate was not given back"


def test_a_directory_loads_only_when_the_operator_allows_paths(tmp_path, model_store):
    crafted = model_store("crafted", root=tmp_path / "elsewhere")
    with serving(tmp_path, WebConfig(admin_key=ADMIN, allow_model_paths=True)) as (url, _):
        status, body = request(url, "POST", "/api/model", {"model": str(crafted)}, ADMIN)
        assert status == 200 and json.loads(body)["model"] == "crafted", body
