"""`jarvis serve`: the JSON API with a real model, and the page in headless Chromium."""

import base64
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from jarvis.chatbots import ChatbotConfig
from jarvis.memory import ConversationStore
from jarvis.web.server import create_app
from jarvis.web.settings import WebConfig, require_key_for
from jarvis_prime import PrimeModel

pytestmark = pytest.mark.real_model

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


@pytest.fixture(scope="module")
def jarvis_model(chat_model):
    model = PrimeModel.from_pretrained("prime-135m-chat-v1", backend="llamacpp", context_length=2048)
    yield model
    model.close()


class Server:
    """A real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def request(self, method, path, body=None, key=None):
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                raw = response.read().decode()
                return response.status, raw
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def stop(self):
        self.server.should_exit = True


@pytest.fixture
def server(jarvis_model, tmp_path):
    store = ConversationStore(tmp_path / "jarvis.db")
    # image turns go to prime-7b-vision-v1, which is not here (a Hub download)
    config = WebConfig(chat=ChatbotConfig(max_new_tokens=40, vision_model="prime-7b-vision-v1"), admin_key="admin")
    s = Server(create_app(config, store=store, model=jarvis_model))
    s.store = store
    yield s
    s.stop()
    store.close()


def png_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def events(raw: str) -> list[dict]:
    return [json.loads(line[len("data:"):]) for line in raw.splitlines() if line.startswith("data:")]


def test_api_chat_feedback_and_regenerate(server):
    status, body = server.request("POST", "/api/conversations", {})
    assert status == 201
    cid = json.loads(body)["id"]
    status, raw = server.request("POST", f"/api/conversations/{cid}/messages", {"content": "What is the capital of France?"})
    assert status == 200
    stream = events(raw)
    assert len([e for e in stream if "delta" in e]) > 1, "the reply is streamed in pieces"
    assert "Paris" in "".join(e["delta"] for e in stream if "delta" in e)
    reply_id = stream[-1]["reply_id"]
    assert stream[-1]["done"] is True

    assert server.request("POST", f"/api/messages/{reply_id}/rating", {"rating": -1})[0] == 200
    assert server.request("POST", f"/api/messages/{reply_id}/correction", {"content": "Paris, sir."})[0] == 200
    messages = json.loads(server.request("GET", f"/api/conversations/{cid}")[1])["messages"]
    assert messages[-1]["content"] == "Paris, sir." and messages[-1]["rating"] == -1 and messages[-1]["corrected"]

    status, raw = server.request("POST", f"/api/messages/{reply_id}/regenerate")
    new_id = events(raw)[-1]["reply_id"]
    assert status == 200 and new_id != reply_id
    assert [m.id for m in server.store.stored_messages(cid)][-1] == new_id
    assert server.request("POST", f"/api/messages/{reply_id}/regenerate")[0] == 400, "only the last reply"


def test_api_errors_are_clear_4xx(server):
    status, body = server.request("POST", "/api/conversations/nope/messages", {"content": "hi"})
    assert status == 404 and "no conversation 'nope'" in json.loads(body)["error"]
    cid = json.loads(server.request("POST", "/api/conversations", {})[1])["id"]
    status, body = server.request("POST", f"/api/conversations/{cid}/messages", {"text": "hi"})
    assert status == 422 and "content" in json.loads(body)["error"]
    status, body = server.request("POST", f"/api/conversations/{cid}/messages", {"content": "word " * 3000})
    assert status == 400 and "message too long" in json.loads(body)["error"]
    status, body = server.request("POST", "/api/messages/1/rating", {"rating": 7})
    assert status == 422

    def ask(*urls):
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls] + [{"type": "text", "text": "what?"}]
        status, body = server.request("POST", f"/api/conversations/{cid}/messages", {"content": parts})
        return status, json.loads(body)["error"]

    status, error = ask("data:image/png;base64,!!not base64")
    assert status == 400 and error.startswith("content[0]: ") and "base64" in error
    status, error = ask(png_url(PNG_1PX), "data:image/png;base64," + base64.b64encode(b"hello").decode())
    assert status == 400 and error.startswith("content[1]: ") and "not an image" in error
    status, error = ask("https://example.com/cat.png")
    assert status == 400 and error.startswith("content[0]: remote image URLs are not fetched")
    status, error = ask(*[png_url(PNG_1PX)] * 5)
    assert status == 400 and "5 images in one message; at most 4" in error
    status, error = ask(png_url(PNG_1PX))  # a good image, and no vision model here
    assert status == 503 and "prime pull prime-7b-vision-v1" in error
    assert server.store.messages(cid) == [], "nothing was written"


def test_cross_site_writes_and_foreign_hosts_are_refused(server):
    """A page on another site can send a no-cors POST (no JSON content type) or rebind
    its DNS name to 127.0.0.1; neither reaches the API."""
    cid = json.loads(server.request("POST", "/api/conversations", {})[1])["id"]
    form = urllib.request.Request(f"{server.url}/api/conversations/{cid}", data=b'{"private": true}', method="PATCH",
                                  headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(form)
    assert refused.value.code == 415
    rebound = urllib.request.Request(f"{server.url}/api/conversations", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(rebound)
    assert refused.value.code == 400
    assert not server.store.get(cid).private


def test_one_reply_at_a_time_per_conversation(server):
    import concurrent.futures

    cid = json.loads(server.request("POST", "/api/conversations", {})[1])["id"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: server.request("POST", f"/api/conversations/{cid}/messages",
                                                         {"content": "Tell me a story."}), range(2)))
    assert sorted(status for status, _ in answers) == [200, 409]
    assert len(server.store.messages(cid)) == 2, "exactly one exchange was written"


def test_api_key_guards_the_api(jarvis_model, tmp_path):
    store = ConversationStore(tmp_path / "jarvis.db")
    s = Server(create_app(WebConfig(api_key="s3cret"), store=store, model=jarvis_model))
    try:
        assert s.request("GET", "/api/conversations")[0] == 401
        assert s.request("GET", "/api/conversations", key="wrong")[0] == 401
        assert s.request("GET", "/api/conversations", key="s3cret")[0] == 200
        assert s.request("GET", "/api/health")[0] == 200
        assert s.request("GET", "/")[0] == 200, "the page itself is public; it asks for the key"
    finally:
        s.stop()
        store.close()
    with pytest.raises(ValueError, match="without an API key"):
        require_key_for("0.0.0.0", None)
    require_key_for("127.0.0.1", None)
    require_key_for("0.0.0.0", "k")


def chromium_path() -> str | None:
    return os.environ.get("JARVIS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


WATCH_STREAMING = """() => {
  window.seenLengths = [];
  new MutationObserver(() => {
    const text = document.querySelector('[data-testid=streaming-reply] [data-testid=text]');
    if (text && text.textContent) window.seenLengths.push(text.textContent.length);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def test_the_page_in_a_real_browser(server, tmp_path):
    """Send, see the reply stream in, thumbs down, correct it, reload: all persisted."""
    browser_path = chromium_path()
    if browser_path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make test` installs Debian's chromium")
        pytest.skip("no chromium here (make test installs Debian's on Debian)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url)
        expect(page.get_by_test_id("model")).to_contain_text("prime-135m-chat-v1")

        page.get_by_test_id("input").fill("What is the capital of France?")
        page.get_by_test_id("send").click()
        reply = page.get_by_test_id("reply").last
        expect(reply.get_by_test_id("text")).to_contain_text("Paris", timeout=60_000)
        expect(reply.get_by_test_id("thumbs-down")).to_be_visible()  # the stream ended: feedback tools are on
        expect(page.get_by_test_id("conversations").locator("li")).to_have_count(1)

        reply.get_by_test_id("thumbs-down").click()
        expect(page.get_by_test_id("reply").last.get_by_test_id("thumbs-down")).to_have_class("on")
        page.get_by_test_id("reply").last.get_by_test_id("correct").click()
        page.get_by_test_id("correction").fill("The capital of France is Paris, sir.")
        page.get_by_test_id("save-correction").click()
        expect(page.get_by_test_id("reply").last.get_by_test_id("corrected")).to_be_visible()

        page.reload()
        reply = page.get_by_test_id("reply").last
        expect(reply.get_by_test_id("text")).to_have_text("The capital of France is Paris, sir.")
        expect(reply.get_by_test_id("thumbs-down")).to_have_class("on")
        expect(page.get_by_test_id("user-message").get_by_test_id("text")).to_have_text(["What is the capital of France?"])

        # a long reply (40 tokens, ~0.5 s) arrives in many reads: the page shows it growing
        page.evaluate(WATCH_STREAMING)
        page.get_by_test_id("input").fill("Tell me a long story about a robot who learns to paint.")
        page.get_by_test_id("send").click()
        expect(page.get_by_test_id("reply")).to_have_count(2, timeout=60_000)
        expect(page.get_by_test_id("reply").last.get_by_test_id("thumbs-down")).to_be_visible(timeout=60_000)
        lengths = page.evaluate("window.seenLengths")
        assert len(set(lengths)) >= 2, f"the reply grew on screen piece by piece: {lengths}"

        page.get_by_test_id("image").set_input_files({"name": "dot.png", "mimeType": "image/png", "buffer": PNG_1PX})
        expect(page.get_by_test_id("attachment")).to_have_count(1)
        page.get_by_test_id("input").fill("What is this?")
        page.get_by_test_id("send").click()
        expect(page.get_by_test_id("error")).to_contain_text("prime pull prime-7b-vision-v1")
        # nothing was answered: the question and its image are back in the composer, not lost
        expect(page.get_by_test_id("input")).to_have_value("What is this?")
        expect(page.get_by_test_id("attachment")).to_have_count(1)
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()

    (conversation,) = server.store.list()
    stored = server.store.stored_messages(conversation.id)[1]
    assert (stored.rating, stored.corrected, stored.content) == (-1, True, "The capital of France is Paris, sir.")
    assert "Paris" in stored.original


def test_a_running_page_switches_models_without_restarting(server, pulled_model):
    """What `jarvis improve --jarvis-url` does after promoting a version."""
    from jarvis.improve import _hot_swap

    said = []
    assert _hot_swap(server.url + "/api/model", "admin", "smollm2-135m-instruct", said.append)
    assert "smollm2-135m-instruct" in said[-1]
    assert json.loads(server.request("GET", "/api/health")[1])["model"] == "smollm2-135m-instruct"
    cid = json.loads(server.request("POST", "/api/conversations", {})[1])["id"]
    status, raw = server.request("POST", f"/api/conversations/{cid}/messages", {"content": "Hi"})
    assert status == 200 and events(raw)[-1]["done"]
    assert server.store.stored_messages(cid)[-1].model.startswith("smollm2-135m-instruct@")
    status, body = server.request("POST", "/api/model", {"model": "smollm3"}, key="admin")
    assert status == 404 and "unknown model 'smollm3'" in json.loads(body)["error"]
    assert json.loads(server.request("GET", "/api/health")[1])["model"] == "smollm2-135m-instruct", "a failed swap changes nothing"


# -- images (issue #20): the tiny random vision model of jarvis-prime's tests answers image turns ------------------


@pytest.fixture(scope="module")
def tiny_vision_model(tmp_path_factory):
    from tiny_vision import tiny_vision

    model = PrimeModel.from_pretrained(tiny_vision(tmp_path_factory).prime_dir, backend="llamacpp")
    yield model
    model.close()


@pytest.fixture
def vision_server(jarvis_model, tiny_vision_model, tmp_path):
    store = ConversationStore(tmp_path / "jarvis.db")
    config = WebConfig(chat=ChatbotConfig(max_new_tokens=8))
    s = Server(create_app(config, store=store, model=jarvis_model, vision_model=tiny_vision_model))
    s.store = store
    yield s
    s.stop()
    store.close()


def test_api_image_turns_reach_the_vision_model_and_are_stored(vision_server):
    from tiny_vision import png_bytes

    server = vision_server
    cid = json.loads(server.request("POST", "/api/conversations", {})[1])["id"]
    image = png_bytes(11)
    parts = [{"type": "image_url", "image_url": {"url": png_url(image)}}, {"type": "text", "text": "What colour?"}]
    status, raw = server.request("POST", f"/api/conversations/{cid}/messages", {"content": parts})
    assert status == 200 and events(raw)[-1]["done"], raw
    messages = json.loads(server.request("GET", f"/api/conversations/{cid}")[1])["messages"]
    assert messages[0]["content"] == "What colour?" and len(messages[0]["images"]) == 1
    assert messages[1]["model"].startswith("tiny-vision@"), "the chat model cannot see: the vision model answered"
    request = urllib.request.Request(f"{server.url}/api/images/{messages[0]['images'][0]}")
    with urllib.request.urlopen(request) as response:
        assert response.headers["Content-Type"] == "image/png" and response.read() == image
    assert server.request("GET", "/api/images/" + "0" * 64)[0] == 404
    assert server.request("GET", "/api/images/..%2Fjarvis.db")[0] in (404, 422)

    status, raw = server.request("POST", f"/api/conversations/{cid}/messages", {"content": "Hello?"})
    assert status == 200 and server.store.stored_messages(cid)[-1].model.startswith("tiny-vision@"), \
        "the image is still in context: the vision model answers the follow-up"


DROP_FILE = """([selector, event, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], event + ".png", { type: "image/png" }));
  const target = document.querySelector(selector);
  if (event === "paste") target.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true }));
  else for (const kind of ["dragover", "drop"]) target.dispatchEvent(new DragEvent(kind, { dataTransfer: data, bubbles: true, cancelable: true }));
}"""

THUMBNAILS_SHOWN = """(n) => {
  const shown = [...document.querySelectorAll('[data-testid=user-message] [data-testid=thumbnail]')];
  return shown.length === n && shown.every((img) => img.complete && img.naturalWidth > 0);
}"""


def test_the_page_sends_images_by_button_drop_and_paste(vision_server, tmp_path):
    """Attach by the button, by dropping a file on the page and by pasting one; each shows
    as a thumbnail in the user's bubble, the vision model answers, and after a reload the
    thumbnails come back from the stored conversation."""
    browser_path = chromium_path()
    if browser_path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make test` installs Debian's chromium")
        pytest.skip("no chromium here (make test installs Debian's on Debian)")
    from playwright.sync_api import expect, sync_playwright

    from tiny_vision import png_bytes

    images = [png_bytes(21), png_bytes(22), png_bytes(23)]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(vision_server.url)
        expect(page.get_by_test_id("model")).to_contain_text("prime-135m-chat-v1")

        page.get_by_test_id("image").set_input_files({"name": "a.png", "mimeType": "image/png", "buffer": images[0]})
        expect(page.get_by_test_id("attachment")).to_have_count(1)
        page.get_by_test_id("input").fill("What colour?")
        page.get_by_test_id("send").click()
        expect(page.get_by_test_id("reply").last.get_by_test_id("thumbs-down")).to_be_visible(timeout=60_000)
        expect(page.get_by_test_id("attachment")).to_have_count(0)
        expect(page.get_by_test_id("reply").last).to_have_attribute("data-model", re.compile(r"^tiny-vision@"))
        expect(page.get_by_test_id("reply").last.locator(".who")).to_contain_text("tiny-vision@")  # who saw it

        page.evaluate(DROP_FILE, ["main", "drop", base64.b64encode(images[1]).decode()])
        page.evaluate(DROP_FILE, ["#input", "paste", base64.b64encode(images[2]).decode()])
        expect(page.get_by_test_id("attachment")).to_have_count(2)
        page.get_by_test_id("input").fill("And these?")
        page.get_by_test_id("send").click()
        expect(page.get_by_test_id("reply")).to_have_count(2, timeout=60_000)
        expect(page.get_by_test_id("reply").last.get_by_test_id("thumbs-down")).to_be_visible(timeout=60_000)
        page.wait_for_function(THUMBNAILS_SHOWN, arg=3)

        page.reload()
        expect(page.get_by_test_id("user-message")).to_have_count(2)
        page.wait_for_function(THUMBNAILS_SHOWN, arg=3)
        page.screenshot(path=str(tmp_path / "images.png"))
        browser.close()

    (conversation,) = vision_server.store.list()
    first, _, second, reply = vision_server.store.stored_messages(conversation.id)
    stored = [vision_server.store.image(sha).data for m in (first, second) for sha in m.images]
    assert stored == images, "the bytes the browser sent, in order"
    assert reply.model.startswith("tiny-vision@")


def test_the_page_folds_a_thinking_models_thinking_in_a_real_browser(thinking_model, tmp_path):
    """A thinking model's reply: {"thinking"} events before the {"delta"} ones, the thinking stored
    beside the answer, and on the page a closed block above the answer (opens on a click; there
    after a reload)."""
    thinker = PrimeModel.from_pretrained("smollm2-135m-thinking", backend="llamacpp", context_length=1024)
    store = ConversationStore(tmp_path / "jarvis.db")
    server = Server(create_app(WebConfig(chat=ChatbotConfig(max_new_tokens=32, thinking_budget=6)), store=store,
                               model=thinker))
    try:
        status, body = server.request("POST", "/api/conversations", {})
        cid = json.loads(body)["id"]
        stream = events(server.request("POST", f"/api/conversations/{cid}/messages", {"content": "Hi, who are you?"})[1])
        thinking = "".join(e.get("thinking", "") for e in stream)
        answer = "".join(e.get("delta", "") for e in stream)
        assert thinking.strip() and answer.strip() and stream[-1]["done"]
        kinds = [("thinking" if "thinking" in e else "delta") for e in stream if "thinking" in e or "delta" in e]
        assert kinds == sorted(kinds, key=lambda k: k == "delta"), "thinking first, then the answer"
        stored = json.loads(server.request("GET", f"/api/conversations/{cid}")[1])["messages"][-1]
        assert stored["content"] == answer.strip() and stored["thinking"] == thinking.strip()

        browser_path = chromium_path()
        if browser_path is None:
            pytest.skip("no chromium here (make test installs Debian's on Debian)")
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(server.url)
            page.get_by_test_id("input").fill("What is the capital of France?")
            page.get_by_test_id("send").click()
            reply = page.get_by_test_id("reply").last
            expect(reply.get_by_test_id("thumbs-down")).to_be_visible(timeout=60_000)  # the stream ended
            block = reply.get_by_test_id("thinking")
            expect(block).to_have_count(1)
            expect(block).not_to_have_attribute("open", "")  # folded
            expect(block.locator(".thought")).not_to_be_visible()
            saved = store.stored_messages(store.list()[0].id)[-1]
            assert saved.thinking and saved.content
            expect(reply.get_by_test_id("text")).to_have_text(saved.content)  # the answer alone
            block.locator("summary").click()
            expect(block.locator(".thought")).to_be_visible()
            expect(block.locator(".thought")).to_have_text(saved.thinking)
            page.reload()  # stored: still folded above the reply after a reload
            expect(page.get_by_test_id("reply").last.get_by_test_id("thinking")).to_have_count(1)
            page.screenshot(path=str(tmp_path / "thinking.png"))
            browser.close()
    finally:
        server.stop()
        store.close()
        thinker.close()
