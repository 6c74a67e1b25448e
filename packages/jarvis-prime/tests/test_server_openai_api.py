"""OpenAI API coverage of `prime serve` (issue #23): tools, response_format, logprobs, n,
penalties, seed, context overflow. Each feature is driven by the official `openai` client
and by `langchain-openai` against a real server on loopback with the real SmolLM2 GGUF."""

from __future__ import annotations

import json

import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ValidationError, create_model

from jarvis_prime.serving.settings import ServerConfig
from test_server import BASE, FRANCE, raw, running

pytestmark = pytest.mark.real_model

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "population": {"type": "integer"}},
        "required": ["city", "population"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def validates(instance: dict, schema: dict) -> None:
    """`instance` matches `schema` (pydantic, from the schema's properties and types)."""
    # bounded strings keep a sampled reply within max_tokens (a grammar cannot make it end sooner)
    types = {"string": str, "integer": int, "number": float, "boolean": bool}
    fields = {k: (types[v["type"]], ...) for k, v in schema["properties"].items()}
    model = create_model("Checked", __config__={"extra": "forbid", "strict": True}, **fields)
    model.model_validate(instance)
    for key, spec in schema["properties"].items():
        if "enum" in spec:
            assert instance[key] in spec["enum"]


@pytest.fixture(scope="module")
def server(pulled_model):
    with running(ServerConfig(model=BASE, backend="llamacpp", context_length=512)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def chat(server):
    return ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model=BASE, temperature=0, max_tokens=48,
                      max_retries=0)


# -- response_format ----------------------------------------------------------------------

def test_json_schema_always_parses_and_validates(client):
    for question in ("What is the capital of France?", "Tell me a joke.", "Name a big city in Japan."):
        reply = client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": question}], max_tokens=80, temperature=0.8, seed=1,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}})
        assert reply.choices[0].finish_reason == "stop", reply
        validates(json.loads(reply.choices[0].message.content), CITY)


def test_json_object_streamed_parses(client):
    stream = client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=64, temperature=0, stream=True,
                                            response_format={"type": "json_object"})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_langchain_structured_output_json_schema(chat):
    class City(BaseModel):
        city: str
        population: int

    answer = chat.with_structured_output(City, method="json_schema").invoke("What is the capital of France?")
    assert isinstance(answer, City)


def test_a_bad_schema_is_a_400_naming_it(server):
    body = {"messages": FRANCE, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}
    status, _, payload = raw(server, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and payload["error"]["param"] == "response_format.json_schema.schema", payload


# -- tools ---------------------------------------------------------------------------------

def test_required_tool_call_parses_and_validates(client):
    reply = client.chat.completions.create(model=BASE, messages=ASK_WEATHER, tools=[WEATHER, TIME], max_tokens=80,
                                           temperature=0, tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
    if call.function.name == "get_weather":
        validates(json.loads(call.function.arguments), schema)


def test_named_tool_call_streams_in_openai_delta_format(client):
    stream = client.chat.completions.create(
        model=BASE, messages=ASK_WEATHER, tools=[WEATHER, TIME], max_tokens=80, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    heads, arguments, finish = [], "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            assert piece.index == 0
            if piece.id:
                heads.append((piece.id, piece.function.name, piece.function.arguments))
            arguments += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert len(heads) == 1 and heads[0][1] == "get_weather" and heads[0][2] == ""
    assert finish == "tool_calls"
    validates(json.loads(arguments), WEATHER["function"]["parameters"])


def test_prime_model_chat_with_tools_is_what_serve_answers(pulled_model, client):
    """The Python API JARVIS's tool loop drives: a forced call comes out as one ToolCall whose
    arguments validate, the same call `prime serve` streams for the same request; "none"
    hides the tools (text only). SmolLM2 was never trained on tools: `calls_tools` is False,
    so JARVIS does not offer it its own."""
    from jarvis_prime import PrimeModel
    from jarvis_prime.models.base import Chunk
    from jarvis_prime.models.tools import ToolCall

    named = {"type": "function", "function": {"name": "get_weather"}}
    with PrimeModel.from_pretrained(pulled_model.path) as model:
        assert model.calls_tools is False
        pieces = list(model.chat_with_tools(ASK_WEATHER, [WEATHER, TIME], tool_choice=named,
                                            max_new_tokens=80, temperature=0.0))
        calls = [p for p in pieces if isinstance(p, ToolCall)]
        assert len(calls) == 1 and calls[0].name == "get_weather" and pieces[-1] is calls[0]
        validates(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])
        hidden = list(model.chat_with_tools(FRANCE, [WEATHER], tool_choice="none", max_new_tokens=16))
        assert hidden and all(isinstance(p, Chunk) for p in hidden) and "".join(p.text for p in hidden).strip()
    served = client.chat.completions.create(model=BASE, messages=ASK_WEATHER, tools=[WEATHER, TIME], max_tokens=80,
                                            temperature=0, tool_choice=named)
    assert json.loads(served.choices[0].message.tool_calls[0].function.arguments) == json.loads(calls[0].arguments)


def test_tool_choice_none_answers_in_text(client):
    reply = client.chat.completions.create(model=BASE, messages=FRANCE, tools=[WEATHER], tool_choice="none",
                                           max_tokens=24, temperature=0)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content


def test_tool_results_are_fed_back(client):
    """A call, its result as `role: tool`, then the model's answer from it (the Hermes
    format for SmolLM2's template: the result reaches the prompt, so usage grows by it)."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
    messages = ASK_WEATHER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                              {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 31 degrees"}]
    reply = client.chat.completions.create(model=BASE, messages=messages, tools=[WEATHER], max_tokens=40, temperature=0)
    shorter = client.chat.completions.create(model=BASE, messages=messages[:-1] + [
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}], tools=[WEATHER], max_tokens=1, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "tool_calls", "length")
    assert reply.usage.prompt_tokens > shorter.usage.prompt_tokens


def test_langchain_bind_tools(chat):
    forced = chat.bind_tools([WEATHER], tool_choice="get_weather")
    message = forced.invoke("What is the weather in Rome?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    validates(message.tool_calls[0]["args"], WEATHER["function"]["parameters"])


# -- logprobs, n, seed, penalties ------------------------------------------------------------

def test_logprobs_and_top_logprobs(client):
    reply = client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=12, temperature=0, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(reply.choices[0].message.content)
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and bytes(t.bytes).decode() == t.token
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob


def test_logprobs_in_stream_and_langchain(client, chat):
    stream = client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=8, temperature=0, logprobs=True,
                                            stream=True)
    tokens = [t.token for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    whole = client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=8, temperature=0, logprobs=True)
    assert tokens == [t.token for t in whole.choices[0].logprobs.content] and len(tokens) >= 5
    message = ChatOpenAI(base_url=chat.openai_api_base, api_key="unused", model=BASE, temperature=0, max_tokens=8,
                         logprobs=True).invoke(FRANCE)
    assert [t["token"] for t in message.response_metadata["logprobs"]["content"]] == tokens


def test_n_choices_with_seeds(client):
    ask = dict(model=BASE, messages=[{"role": "user", "content": "Say something surprising."}], max_tokens=16,
               temperature=1.0, seed=7)
    first = client.chat.completions.create(n=3, **ask)
    again = client.chat.completions.create(n=3, **ask)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]  # seed + i per choice: reproducible
    assert len(set(texts)) > 1  # and the choices differ
    one = client.chat.completions.create(n=1, **{**ask, "seed": 8})
    assert one.choices[0].message.content == texts[1]
    assert first.usage.completion_tokens > 16  # summed over the choices
    stream = client.chat.completions.create(n=2, stream=True, **ask)
    streamed = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[0], streamed[1]] == texts[:2]


def test_langchain_n(server):
    result = ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model=BASE, temperature=1.0, max_tokens=8,
                        n=2, seed=3).generate([[HumanMessage("Hello!")]])
    assert len(result.generations[0]) == 2


def test_penalties_cut_repetition(client):
    """Greedy decoding of a list repeats itself; a frequency penalty repeats fewer tokens."""
    ask = dict(model=BASE, messages=[{"role": "user", "content": "List the numbers from one to fifty in words."}],
               max_tokens=60, temperature=0, logprobs=True)
    plain = client.chat.completions.create(**ask)
    penalised = client.chat.completions.create(frequency_penalty=2.0, presence_penalty=1.0, **ask)

    def repeats(reply):
        tokens = [t.token for t in reply.choices[0].logprobs.content]
        return len(tokens) - len(set(tokens))

    assert repeats(penalised) < repeats(plain)


# -- the context --------------------------------------------------------------------------

def test_overflow_is_a_400_naming_the_numbers_or_truncated_on_request(server):
    long_turns = [{"role": "system", "content": "You are terse."}]
    for i in range(12):
        long_turns += [{"role": "user", "content": f"Question {i}: " + "tell me about the sea " * 6},
                       {"role": "assistant", "content": "The sea is large and deep. " * 4}]
    long_turns.append({"role": "user", "content": "What is the capital of France?"})
    body = {"messages": long_turns, "max_tokens": 32, "temperature": 0}
    status, _, payload = raw(server, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"
    message = payload["error"]["message"]
    prompt_tokens = int(message.split("prompt (")[1].split(" tokens")[0])
    assert prompt_tokens > 512 - 32 and "(512)" in message and "max_tokens (32)" in message
    status, _, payload = raw(server, "/v1/chat/completions", json.dumps({**body, "truncate": True}).encode())
    assert status == 200, payload
    assert payload["usage"]["prompt_tokens"] + 32 <= 512 and payload["usage"]["prompt_tokens"] > 256


def test_truncation_keeps_the_system_prompt(client):
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=600)
    reply = client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=16, temperature=0,
                                           extra_body={"truncate": True})
    plain = client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=16, temperature=0)
    assert reply.usage.prompt_tokens == plain.usage.prompt_tokens  # nothing to drop when it fits
    assert reply.choices[0].message.content == plain.choices[0].message.content


def test_completions_endpoint_logprobs_and_n(client):
    reply = client.completions.create(model=BASE, prompt="The capital of France is", max_tokens=5, temperature=0,
                                      logprobs=2, n=2)
    assert [c.index for c in reply.choices] == [0, 1] and reply.choices[0].text == reply.choices[1].text
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == 5 and "".join(logprobs.tokens) == reply.choices[0].text
    assert all(len(top) <= 2 for top in logprobs.top_logprobs) and logprobs.text_offset[0] == 0


def test_validates_helper_rejects_wrong_types():
    with pytest.raises(ValidationError):
        validates({"city": "Paris", "population": "many"}, CITY)


# -- the transformers backend (the same loop as its batcher: models/batching.py) -------------

@pytest.fixture(scope="module")
def torch_server(pulled_model):
    with running(ServerConfig(model=BASE, backend="transformers", context_length=512, max_batch=4)) as url:
        yield url


def test_transformers_backend_json_schema_tools_and_logprobs(torch_server):
    client = openai.OpenAI(base_url=f"{torch_server}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Name a big city in Japan."}], max_tokens=80,
        temperature=0.8, seed=2, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}})
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        validates(json.loads(choice.message.content), CITY)
    stream = client.chat.completions.create(
        model=BASE, messages=ASK_WEATHER, tools=[WEATHER, TIME], max_tokens=80, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    arguments = "".join(p.function.arguments or "" for c in stream if c.choices for p in c.choices[0].delta.tool_calls or [])
    validates(json.loads(arguments), WEATHER["function"]["parameters"])
    greedy = client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=10, temperature=0, logprobs=True,
                                            top_logprobs=2)
    content = greedy.choices[0].logprobs.content
    assert "".join(t.token for t in content).startswith(greedy.choices[0].message.content)
    assert all(t.top_logprobs[0].token == t.token and t.logprob <= 0 for t in content)
    plain = client.chat.completions.create(model=BASE, messages=FRANCE, max_tokens=10, temperature=0)
    assert plain.choices[0].message.content == greedy.choices[0].message.content  # logprobs change no token


def test_transformers_backend_penalties_and_langchain(torch_server):
    chat = ChatOpenAI(base_url=f"{torch_server}/v1", api_key="unused", model=BASE, temperature=0, max_tokens=60,
                      max_retries=0, logprobs=True)
    ask = [HumanMessage("List the numbers from one to fifty in words.")]

    def repeats(message):
        tokens = [t["token"] for t in message.response_metadata["logprobs"]["content"]]
        return len(tokens) - len(set(tokens))

    plain, penalised = chat.invoke(ask), chat.bind(frequency_penalty=2.0, presence_penalty=1.0).invoke(ask)
    assert repeats(penalised) < repeats(plain)
    forced = ChatOpenAI(base_url=f"{torch_server}/v1", api_key="unused", model=BASE, temperature=0, max_tokens=80,
                        max_retries=0).bind_tools([WEATHER], tool_choice="required").invoke("Weather in Oslo?")
    assert forced.tool_calls[0]["name"] == "get_weather"
    validates(forced.tool_calls[0]["args"], WEATHER["function"]["parameters"])


def test_usage_is_the_model_s_own_token_count(client, llama_model):
    """prompt_tokens is the prompt as the model tokenizes it (tools included); a stream
    reports the same usage as the whole answer."""
    reply = client.chat.completions.create(model=BASE, messages=ASK_WEATHER, tools=[WEATHER], max_tokens=20,
                                           temperature=0)
    assert reply.usage.prompt_tokens == len(llama_model.encode_chat(ASK_WEATHER, tools=[WEATHER]).ids)
    stream = client.chat.completions.create(model=BASE, messages=ASK_WEATHER, tools=[WEATHER], max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage][-1]
    assert (usage.prompt_tokens, usage.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
