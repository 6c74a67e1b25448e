"""A thinking model on both backends: `PrimeModel.complete` gives reasoning and answer apart,
and a thinking budget caps the reasoning, then makes the model answer; `prime serve` returns
the reasoning as `reasoning_content` in messages and stream deltas."""

from __future__ import annotations

import json
import urllib.request

import pytest

from jarvis_prime import PrimeModel
from jarvis_prime.serving.settings import ServerConfig

pytestmark = pytest.mark.real_model
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NAME = "smollm2-135m-thinking"


@pytest.fixture(scope="module", params=["llamacpp", "transformers"])
def thinker(request, thinking_model):
    model = PrimeModel.from_pretrained(NAME, backend=request.param, context_length=512)
    yield model
    model.close()


def test_a_budget_caps_the_reasoning_then_the_model_answers(thinker):
    prompt = thinker.encode_chat(QUESTION)
    assert prompt.thinking is not None and prompt.opened, "the template opened <think> in the prompt"
    result = thinker.complete(prompt, max_new_tokens=40, temperature=0.0, thinking_budget=8)
    assert result.reasoning and 0 < thinker.count_tokens(result.reasoning) <= 8
    assert result.text.strip(), "after the budget the model was made to answer"
    assert "<think>" not in result.text + result.reasoning and "</think>" not in result.text + result.reasoning
    assert result.completion_tokens <= 40 + 2  # the reply's tokens, re-counted from its two parts
    streamed = list(thinker.complete(prompt, stream=True, max_new_tokens=40, temperature=0.0, thinking_budget=8))
    assert "".join(c.reasoning for c in streamed) == result.reasoning
    assert "".join(c.text for c in streamed) == result.text
    first_answer = next(i for i, c in enumerate(streamed) if c.text)
    assert not any(c.reasoning for c in streamed[first_answer + 1:]), "reasoning first, then the answer"


def test_without_a_budget_a_reply_cut_off_while_thinking_has_no_answer(thinker):
    result = thinker.complete(thinker.encode_chat(QUESTION), max_new_tokens=6, temperature=0.0)
    assert result.finish_reason == "length" and result.text == "" and result.reasoning
    assert thinker.chat(QUESTION, max_new_tokens=6) == "", "chat() is the answer alone: none yet"


def test_budget_zero_answers_without_thinking(thinker):
    result = thinker.complete(thinker.encode_chat(QUESTION), max_new_tokens=16, temperature=0.0, thinking_budget=0)
    assert result.reasoning == "" and result.text.strip()
    with pytest.raises(ValueError, match="thinking_budget"):
        thinker.complete(thinker.encode_chat(QUESTION), thinking_budget=-1)


def post(url: str, body: dict) -> bytes:
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


def test_serve_returns_reasoning_content_beside_content(thinking_model, llama_model):
    from test_server import raw as raw_request, running

    with running(ServerConfig(model=NAME, backend="llamacpp", context_length=512)) as url:
        body = {"messages": QUESTION, "max_tokens": 40, "temperature": 0, "max_thinking_tokens": 8}
        whole = json.loads(post(url, body))["choices"][0]
        message = whole["message"]
        assert message["reasoning_content"] and message["content"].strip()
        assert llama_model.count_tokens(message["reasoning_content"]) <= 8  # the same tokenizer
        assert "</think>" not in message["content"]

        # llama.cpp server's name for the budget, streamed: reasoning_content deltas, then content
        raw = post(url, {**body, "max_thinking_tokens": None, "reasoning_budget": 8, "stream": True}).decode()
        deltas = [json.loads(line[5:])["choices"] for line in raw.split("\n\n") if line.startswith("data: {")]
        deltas = [c[0]["delta"] for c in deltas if c]
        kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
        assert kinds[0] == "reasoning_content" and kinds[-1] == "content"
        assert kinds == sorted(kinds, key=lambda k: k == "content"), "no reasoning after the answer began"
        assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
        assert "".join(d.get("content", "") for d in deltas) == message["content"]

        cut = json.loads(post(url, {"messages": QUESTION, "max_tokens": 6, "temperature": 0}))["choices"][0]
        assert cut["finish_reason"] == "length" and cut["message"]["content"] == ""
        assert cut["message"]["reasoning_content"], "cut off while thinking: all reasoning, no answer"

        status, _, error = raw_request(url, "/v1/chat/completions",
                                       json.dumps({**body, "reasoning_budget": 5}).encode())
        assert status == 400 and error["error"]["param"] == "reasoning_budget", "two budgets that disagree"
