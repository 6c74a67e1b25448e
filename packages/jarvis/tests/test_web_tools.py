"""The page with tools, memory and Markdown (issue #24), in headless Chromium.

The model is scripted (see test_tools.ScriptedModel): what is tested is the page and its API,
so each reply is chosen to exercise them: Markdown with a code block and a list, a reply that
tries to inject script, a tool call. The real models' page tests are in test_web.py.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from jarvis.chatbots import ChatbotConfig
from jarvis.memory import ConversationStore
from jarvis.tools.calls import ToolCall
from jarvis.web.server import create_app
from jarvis.web.settings import WebConfig
from jarvis_prime.models.base import Chunk


def _sibling(name: str):
    """A test module beside this one (pytest's importlib mode puts no test folder on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"jarvis_tests_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_tools, _web = _sibling("test_tools"), _sibling("test_web")
ScriptedModel, tool_messages = _tools.ScriptedModel, _tools.tool_messages
Server, chromium_path, events = _web.Server, _web.chromium_path, _web.events

MARKDOWN = "Here it is:\n\n```python\nprint(84)\n```\n\n- first\n- second\n"
INJECTION = ('<script>window.pwned = 1</script>\n\n<img src=x onerror="window.pwned = 2">\n\n'
             'A [click](javascript:window.pwned=3) and **bold**')


def answer(messages):
    """A tool call for arithmetic, then an answer from its result; Markdown or an injection otherwise."""
    asked = [m for m in messages if m["role"] == "user"][-1]["content"]
    if "12 times 7" in asked:
        results = tool_messages(messages)
        if not results:
            return [ToolCall(id="call_1", name="calculator", arguments='{"expression": "12*7"}')]
        return [Chunk(f"It is **{next(iter(results.values()))}**.")]
    return [Chunk(INJECTION if "inject" in asked else MARKDOWN)]


@pytest.fixture
def server(tmp_path):
    store = ConversationStore(tmp_path / "jarvis.db")
    model = ScriptedModel(answer)
    s = Server(create_app(WebConfig(chat=ChatbotConfig(model="scripted")), store=store, model=model))
    s.store = store
    yield s
    s.stop()
    store.close()


def test_api_streams_and_stores_tool_calls_and_lists_and_forgets_memory(server):
    cid = json.loads(server.request("POST", "/api/conversations", {})[1])["id"]
    stream = events(server.request("POST", f"/api/conversations/{cid}/messages", {"content": "What is 12 times 7?"})[1])
    assert stream[0] == {"tool": {"id": "call_1", "name": "calculator", "arguments": '{"expression": "12*7"}',
                                  "result": "84", "error": None}}
    assert "".join(e.get("delta", "") for e in stream) == "It is **84**." and stream[-1]["done"]
    stored = json.loads(server.request("GET", f"/api/conversations/{cid}")[1])["messages"][-1]
    assert stored["tool_calls"] == [stream[0]["tool"]]

    fact, _ = server.store.remember("Likes tea.", conversation_id=cid)
    listed = json.loads(server.request("GET", "/api/memory")[1])
    assert [(f["id"], f["text"], f["conversation_id"]) for f in listed] == [(fact.id, "Likes tea.", cid)]
    assert server.request("DELETE", f"/api/memory/{fact.id}")[0] == 204
    status, body = server.request("DELETE", f"/api/memory/{fact.id}")
    assert status == 404 and f"no remembered fact {fact.id}" in json.loads(body)["error"]


def test_the_page_renders_markdown_safely_and_folds_tool_calls(server, tmp_path):
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("no chromium here (make test installs Debian's on Debian)")
    from playwright.sync_api import expect, sync_playwright

    server.store.remember("The user's sister's birthday is 3 May.")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url)

        def send(text):
            page.get_by_test_id("input").fill(text)
            page.get_by_test_id("send").click()
            reply = page.get_by_test_id("reply").last
            expect(reply.get_by_test_id("thumbs-up")).to_be_visible(timeout=20_000)  # the stream ended
            return reply

        rendered = send("Show me some markdown").get_by_test_id("text")
        expect(rendered.locator("pre > code")).to_have_text("print(84)")
        expect(rendered.locator("ul > li")).to_have_text(["first", "second"])

        injected = send("Now inject something").get_by_test_id("text")
        expect(injected.locator("strong")).to_have_text("bold")  # Markdown still renders
        assert injected.locator("script").count() == 0
        assert injected.locator("img").get_attribute("onerror") is None
        assert injected.locator("a").get_attribute("href") is None  # the javascript: link lost its target
        injected.locator("img").evaluate("img => img.dispatchEvent(new Event('error'))")
        assert page.evaluate("window.pwned") is None

        reply = send("What is 12 times 7?")
        block = reply.get_by_test_id("tool-call")
        expect(block).to_have_count(1)
        expect(block).not_to_have_attribute("open", "")  # folded
        expect(block.locator("summary")).to_have_text('\u2699 calculator(expression="12*7") \u2192 84')
        expect(block.locator("pre")).not_to_be_visible()
        block.locator("summary").click()
        expect(block.locator("pre")).to_contain_text("result: 84")
        expect(reply.get_by_test_id("text").locator("strong")).to_have_text("84")
        page.reload()  # stored with the reply: still there, folded
        expect(page.get_by_test_id("reply").last.get_by_test_id("tool-call")).to_have_count(1)

        page.get_by_test_id("show-memory").click()
        expect(page.get_by_test_id("fact")).to_have_text(["The user's sister's birthday is 3 May.Forget"])
        page.get_by_test_id("forget").click()
        expect(page.get_by_test_id("fact")).to_have_count(0)
        assert server.store.facts() == []
        assert page.evaluate("window.pwned") is None
        page.screenshot(path=str(tmp_path / "tools.png"))
        browser.close()
