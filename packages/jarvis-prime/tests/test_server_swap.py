"""`prime serve`'s hot-swap (POST /admin/models): the admin key only, off without one;
catalog or store names only unless --allow-model-paths; one load at a time. The models
are stand-ins found in a private store (`model_store`): this is about what the server
agrees to load, not about text."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from types import SimpleNamespace

import uvicorn
from asgi_driver import call
from typer.testing import CliRunner

from jarvis_prime.cli import app as cli
from jarvis_prime.serving.app import create_app
from jarvis_prime.serving.settings import ServerConfig
from jarvis_prime.store import resolve

JSON = {"content-type": "application/json"}
ADMIN = {**JSON, "authorization": "Bearer admin-key"}


class StandIn:
    """What the server uses of a PrimeModel, named after the model `target` resolves to."""

    def __init__(self, target: str) -> None:
        manifest = resolve(target, auto_pull=False).manifest
        self.name, self.version, self.closed = manifest.name, manifest.version, False
        self.runtime = SimpleNamespace(backend="stand-in", describe=lambda: "stand-in")

    def enable_batching(self, max_batch, on_batch=None) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Loader:
    """Records what the server asked to load. While `hold` is clear a load waits for it
    (after setting `entered`): how a test keeps a load in progress on cue, since a real
    model loads too fast to race reliably."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.models: list[StandIn] = []
        self.entered, self.hold = threading.Event(), threading.Event()
        self.hold.set()

    def __call__(self, target, quantization=None, backend="auto", context_length=None) -> StandIn:
        self.targets.append(str(target))
        self.entered.set()
        assert self.hold.wait(30)
        self.models.append(StandIn(str(target)))
        return self.models[-1]


def app(loader=None, **options):
    return create_app(ServerConfig(model="never-loaded", **options), loader=loader or Loader())


def swap(server, model: str, headers=ADMIN):
    return call(server, "POST", "/admin/models", headers=headers, chunks=[json.dumps({"model": model}).encode()])


def test_swaps_are_off_unless_the_server_has_an_admin_key(model_store):
    """Any client could make the server load any model: the route had no key of its own."""
    model_store("prime-next")
    loader = Loader()
    for options, headers in (({}, JSON), ({"api_key": "k"}, {**JSON, "authorization": "Bearer k"})):
        out = swap(app(loader, **options), "prime-next", headers)
        assert out.status == 403 and out.json()["error"]["code"] == "admin_disabled", out.body
        assert "--admin-key" in out.json()["error"]["message"]
    assert loader.targets == []


def test_the_swap_route_takes_the_admin_key_and_nothing_else(model_store):
    model_store("prime-next")
    loader = Loader()
    server = app(loader, api_key="k", admin_key="admin-key")
    assert swap(server, "prime-next", JSON).status == 401
    assert swap(server, "prime-next", {**JSON, "authorization": "Bearer wrong"}).status == 401
    with_api_key = swap(server, "prime-next", {**JSON, "authorization": "Bearer k"})
    assert with_api_key.status == 403 and with_api_key.json()["error"]["code"] == "admin_key_required"
    upload = call(server, "POST", "/admin/models", headers=JSON, chunk=b" " * 65536, chunk_count=200)
    assert upload.status == 401 and upload.chunks_read <= 2, "an unauthenticated swap body was read"
    assert loader.targets == []
    assert call(server, "GET", "/v1/models", headers={"authorization": "Bearer admin-key"}).status == 401
    out = swap(server, "prime-next")
    assert out.status == 200 and out.json()["model"] == "prime-next", out.body


def test_an_unknown_name_is_a_404_in_openai_shape(model_store):
    """With the real loader: the ModelNotFoundError escaped as a plain-text 500."""
    out = swap(create_app(ServerConfig(model="never-loaded", admin_key="admin-key")), "smollm3")
    assert out.status == 404, out.body
    error = out.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "unknown model 'smollm3'" in error["message"]


def test_a_path_is_a_400_unless_the_operator_allows_paths(model_store, tmp_path):
    """Any folder holding a prime.json was loaded: a crafted model is crafted files for the backends."""
    crafted = model_store("crafted", root=tmp_path / "elsewhere")
    loader = Loader()
    for path in (str(crafted), "../elsewhere/crafted-1.0.0", "~/crafted"):
        out = swap(app(loader, admin_key="admin-key"), path)
        assert out.status == 400, (path, out.body)
        error = out.json()["error"]
        assert error["param"] == "model" and "--allow-model-paths" in error["message"]
    assert loader.targets == []
    out = swap(app(loader, admin_key="admin-key", allow_model_paths=True), str(crafted))
    assert out.status == 200 and out.json()["model"] == "crafted" and loader.targets == [str(crafted)]


def test_a_name_loads_its_folder_in_the_store_not_a_folder_of_that_name_here(model_store, tmp_path, monkeypatch):
    """The name went to the loader as is, and a folder of that name in the working directory won."""
    stored = model_store("prime-next")
    model_store("prime-next", version="9.9.9", root=tmp_path / "cwd")  # named like the model, and newer
    (tmp_path / "cwd" / "prime-next-9.9.9").rename(tmp_path / "cwd" / "prime-next")
    monkeypatch.chdir(tmp_path / "cwd")
    loader = Loader()
    out = swap(app(loader, admin_key="admin-key"), "prime-next")
    assert out.status == 200 and out.json()["version"] == "1.0.0", out.body
    assert loader.targets == [str(stored)]


def test_a_failed_swap_is_json_and_keeps_nothing_locked(model_store):
    """A loader that fails (the backend's own error) answers JSON, and the next swap still runs."""
    model_store("prime-next")
    calls = []

    def flaky(target, *args):
        calls.append(target)
        if len(calls) == 1:
            raise RuntimeError("llama.cpp could not map the file")
        return StandIn(target)

    server = app(flaky, admin_key="admin-key")
    out = swap(server, "prime-next")
    assert out.status == 500 and "could not map the file" in out.json()["error"]["message"]
    assert swap(server, "prime-next").status == 200


@contextmanager
def running(config: ServerConfig, loader: Loader):
    """A real uvicorn server on 127.0.0.1, started (its model may still be loading)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config, loader), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loader.hold.set()
        server.should_exit = True
        thread.join(timeout=30)


def health(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def post_swap(url: str, model: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/admin/models", data=json.dumps({"model": model}).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer admin-key"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_one_load_at_a_time_a_second_swap_is_409_and_loads_nothing(model_store):
    """N swaps at once loaded N models (gigabytes each). The first load is held open on
    an Event so the second request surely arrives while it runs."""
    for name in ("first", "second", "third"):
        model_store(name)
    loader = Loader()
    loader.hold.clear()  # the server's own first model is still loading
    with running(ServerConfig(model="first", admin_key="admin-key"), loader) as url:
        assert loader.entered.wait(10)
        status, body = post_swap(url, "second")
        assert status == 409 and body["error"]["code"] == "swap_in_progress", body
        loader.hold.set()
        deadline = time.monotonic() + 10
        while health(url) != 200:
            assert time.monotonic() < deadline, "the first model never came up"
            time.sleep(0.02)

        loader.hold.clear()
        loader.entered.clear()
        answers: dict[str, tuple[int, dict]] = {}
        first_swap = threading.Thread(target=lambda: answers.update(second=post_swap(url, "second")))
        first_swap.start()
        assert loader.entered.wait(10)
        status, body = post_swap(url, "third")
        assert status == 409 and "already loading" in body["error"]["message"], body
        loader.hold.set()
        first_swap.join(30)
        assert answers["second"][0] == 200 and answers["second"][1]["model"] == "second"
        assert [m.name for m in loader.models] == ["first", "second"], "the refused swap loaded a model"
        assert loader.models[0].closed, "the replaced model was left open"

        assert post_swap(url, "third")[0] == 200, "the gate was not given back"


def test_prime_serve_refuses_an_admin_key_equal_to_the_api_key(monkeypatch):
    """Equal keys would let every client that may chat swap the model too."""
    monkeypatch.delenv("PRIME_API_KEY", raising=False)
    monkeypatch.setenv("PRIME_ADMIN_KEY", "same")
    result = CliRunner().invoke(cli, ["serve", "never-loaded", "--api-key", "same"])
    assert result.exit_code == 2 and "must differ from the API key" in result.output, result.output
    helped = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--admin-key" in helped and "--allow-model-paths" in helped
