"""`jarvis chat --backend-url` with tools: the `openai` client against a live server.

The server is a small FastAPI app speaking OpenAI's streamed chat completions, as vLLM or
llama.cpp's server would for a tool-calling model: asked with `tools=`, it streams a tool call
in deltas (id and name first, the arguments cut in two); asked again with the tool's result,
it streams an answer built from that result, with reasoning as `reasoning_content`. It is the
other side of the protocol, so the test exercises the real client, HTTP, SSE and the loop.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from jarvis.chatbots import Chatbot, ChatbotConfig, Thought, ToolUse
from jarvis.memory import ConversationStore
from jarvis.remote import RemoteModel
from jarvis_prime import PrimeError

KEY = "k3y"


def chunk(delta: dict, finish: str | None = None) -> str:
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "fake-tools",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def tool_server() -> tuple[FastAPI, list[dict]]:
    app, seen = FastAPI(), []

    @app.get("/v1/models")
    def models(request: Request):
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "invalid API key", "type": "auth"}}, status_code=401)
        return {"object": "list", "data": [{"id": "fake-tools", "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "invalid API key", "type": "auth"}}, status_code=401)
        body = await request.json()
        seen.append(body)
        if body["model"] == "no-tools" and body.get("tools"):  # as `prime serve` answers without tool support
            return JSONResponse({"error": {"message": "tools are not supported", "type": "invalid_request_error",
                                           "param": "tools", "code": "unsupported_parameter"}}, status_code=400)
        results = [m["content"] for m in body["messages"] if m["role"] == "tool"]
        if results:
            events = [chunk({"role": "assistant", "reasoning_content": "The tool said so."}),
                      chunk({"content": "12 times 7 is "}), chunk({"content": f"{results[0]}."}), chunk({}, "stop")]
        elif body.get("tools"):
            events = [chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                                   "function": {"name": "calculator", "arguments": ""}}]}),
                      chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"expres'}}]}),
                      chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'sion": "12*7"}'}}]}),
                      chunk({}, "tool_calls")]
        else:
            events = [chunk({"content": "no tools offered"}), chunk({}, "stop")]
        return StreamingResponse(iter([*events, "data: [DONE]\n\n"]), media_type="text/event-stream")

    return app, seen


@pytest.fixture(scope="module")
def server():
    import uvicorn

    app, seen = tool_server()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    running = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=running.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not running.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", seen
    running.should_exit = True


def test_a_remote_model_calls_a_tool_and_answers_from_its_result(server, tmp_path):
    url, seen = server
    seen.clear()
    store = ConversationStore(tmp_path / "jarvis.db")
    remote = RemoteModel(url, api_key=KEY)
    try:
        assert remote.name == "fake-tools"  # the first model /v1/models lists
        bot = Chatbot(ChatbotConfig(model="fake-tools"), model=remote, store=store, extra_tools=[])
        pieces = list(bot.stream("What is 12 times 7?"))
    finally:
        remote.close()
    assert [p for p in pieces if isinstance(p, ToolUse)] == ['\u2699 calculator(expression="12*7") \u2192 84']
    assert [p for p in pieces if isinstance(p, Thought)] == ["The tool said so."]
    assert bot.history[-1]["content"] == "12 times 7 is 84."
    first, second = seen
    assert "calculator" in {t["function"]["name"] for t in first["tools"]} and first["stream"] is True
    assert second["messages"][-2:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "84"}]
    reply = store.stored_messages(bot.conversation)[-1]
    assert (reply.content, reply.thinking, reply.tool_calls[0]["result"]) == ("12 times 7 is 84.", "The tool said so.", "84")
    store.close()


def test_an_endpoint_that_refuses_tools_is_asked_without_them(server):
    url, seen = server
    seen.clear()
    remote = RemoteModel(url, model="no-tools", api_key=KEY)
    bot = Chatbot(ChatbotConfig(model="no-tools"), model=remote, extra_tools=[])
    assert bot.ask("What is 12 times 7?") == "no tools offered"
    assert bot.ask("And 6 times 7?") == "no tools offered"
    assert remote.tools_refused and [bool(body.get("tools")) for body in seen] == [True, False, False]


def test_remote_errors_are_jarvis_errors(server):
    url, _ = server
    with pytest.raises(PrimeError, match=r"/models: HTTP 401: invalid API key"):
        RemoteModel(url, api_key="wrong")
    remote = RemoteModel(url, model="fake-tools", api_key="wrong")
    with pytest.raises(PrimeError, match=r"/chat/completions: HTTP 401: invalid API key"):
        list(remote.complete([{"role": "user", "content": "hi"}]))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    nobody = RemoteModel(f"http://127.0.0.1:{closed}/v1", model="x")
    nobody.client = nobody.client.with_options(max_retries=0)  # the client retries twice, with backoff
    with pytest.raises(PrimeError, match=rf"http://127.0.0.1:{closed}/v1: unreachable"):
        list(nobody.complete([{"role": "user", "content": "hi"}]))


def test_the_terminal_shows_each_tool_call_as_one_line(server, tmp_path):
    url, _ = server
    env = {**os.environ, "JARVIS_HOME": str(tmp_path), "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "jarvis.cli", "chat", "--once", "What is 12 times 7?",
                             "--backend-url", url, "--api-key", KEY, "--no-save"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ['\u2699 calculator(expression="12*7") \u2192 84', "12 times 7 is 84."]
    plain = subprocess.run([sys.executable, "-m", "jarvis.cli", "chat", "--once", "What is 12 times 7?", "--no-tools",
                            "--backend-url", url, "--api-key", KEY, "--no-save"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert plain.stdout.strip() == "no tools offered"


def test_remember_in_the_terminal_then_list_and_forget(server, tmp_path):
    """/remember in `jarvis chat`, `jarvis memory list` in a narrow pipe (the fact whole), `forget`."""
    url, _ = server
    env = {**os.environ, "JARVIS_HOME": str(tmp_path), "COLUMNS": "40"}

    def jarvis(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "jarvis.cli", *args], input=stdin, capture_output=True,
                              text=True, timeout=120, env=env)

    fact = "My sister's birthday is 3 May, and she likes orchids and long walks by the sea."
    chat = jarvis("chat", "--backend-url", url, "--api-key", KEY, stdin=f"/remember {fact}\n/remember {fact.upper()}\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    assert "remembered as fact 1" in chat.stdout and "already remembered as fact 1" in chat.stdout
    listed = jarvis("memory", "list")
    assert listed.returncode == 0, listed.stderr
    assert " ".join(w for w in listed.stdout.split() if w != "\u2502").count(fact) == 1  # wrapped, never cut
    assert jarvis("memory", "forget", "1").stdout.strip() == f"forgot 1: {fact}"
    missing = jarvis("memory", "forget", "1")
    assert missing.returncode == 1 and "no remembered fact 1" in missing.stderr
    assert "nothing remembered yet" in jarvis("memory", "list").stdout
