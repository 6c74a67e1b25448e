"""Tools (issue #24): the calculator, schemas from signatures, calls that fail safely, the tool
loop, long-term memory and the store's schema 5 migration.

The tool loop is driven here by `ScriptedModel`, a model that answers from a script: the loop's
faults (a model that asks for tools forever, two calls in one reply, a tool that hangs) are ones
no real model produces on cue. Each scripted answer is a function of the messages the loop
sent, so what the model "says" after a tool depends on what the loop really fed back. The
remote path (the `openai` client against a live OpenAI-compatible server) is in
test_remote_tools.py.
"""

import json
import sqlite3
import threading
from typing import Annotated, Literal

import pytest
from pydantic import Field

from jarvis.chatbots import Chatbot, ChatbotConfig, ToolUse
from jarvis.chatbots.chatbot import MEMORY_HEADER
from jarvis.memory import FEEDBACK_COLUMNS, SCHEMA_VERSION, ConversationStore, PrivateConversationError
from jarvis.tool_loop import run_tool_loop
from jarvis.tools.builtin import ToolContext, builtin_tools, calculator, current_datetime
from jarvis.tools.calculator import CalculatorError, evaluate, format_number
from jarvis.tools.calls import ToolCall, ToolModel, ToolResult
from jarvis.tools.registry import ToolDefinitionError, ToolRegistry, tool, user_tools
from jarvis_prime.models.base import Chunk


class ScriptedModel:
    """A model whose every reply is `script[i](messages)`: a list of `Chunk`s and `ToolCall`s.
    It records the messages and tools each call was sent."""

    name, version, context_length = "scripted", "1", 8192

    def __init__(self, *script):
        self.script = list(script)
        self.calls: list[tuple[list[dict], list[dict]]] = []

    def count_tokens(self, text):
        return len(text) // 4

    def apply_chat_template(self, messages):
        return "".join(str(m.get("content")) for m in messages)

    def encode_chat(self, messages):
        return list(messages)

    def complete(self, messages, stream=True, **options):
        raise AssertionError("a model that can call tools is asked through the tool loop")

    def chat_with_tools(self, messages, tools, **options):
        self.calls.append((json.loads(json.dumps(messages)), tools))
        step = self.script[min(len(self.calls), len(self.script)) - 1]
        yield from step(messages)


def tool_messages(messages):
    return {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}


@pytest.fixture
def store(tmp_path):
    s = ConversationStore(tmp_path / "jarvis.db")
    yield s
    s.close()


# --- the calculator ---------------------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ("12*7", "84"), ("0.1 + 0.2", "0.3"), ("1/3*3", "1"), ("2**100", str(2**100)), ("3/8", "0.375"),
    ("-7 // 2", "-4"), ("7 % 3", "1"), ("10**-3", "0.001"), ("(1+2)*3 - 4/5", "8.2"), ("12 × 7 ÷ 4", "21"),
    ("123456789 * 987654321", "121932631112635269"), ("2/3", "2/3 (\u2248 0.66666666666666666667)"),
])
def test_the_calculator_is_exact(expression, expected):
    assert format_number(evaluate(expression)) == expected


@pytest.mark.parametrize("expression, says", [
    ("__import__('os').system('true')", "Call is not allowed"), ("x + 1", "unknown name 'x'"),
    ("(1).real", "Attribute is not allowed"), ("1/0", "division by zero"), ("5 % 0", "modulo by zero"),
    ("2 ** 0.5", "not a whole number"), ("9 ** 99999", "beyond 10000"), ("99999 ** 9999", "bits"),
    ("'a' * 3", "not allowed"), ("1 +", "not an arithmetic expression"), ("1" + "+1" * 400, "characters"),
    ("1e999", "too large"), ("[1, 2]", "List is not allowed"),
])
def test_the_calculator_refuses_what_is_not_bounded_arithmetic(expression, says):
    with pytest.raises(CalculatorError, match=says.replace("(", r"\(")):
        evaluate(expression)


def test_the_clock_is_time_zone_aware():
    assert "(UTC+09:00), Asia/Tokyo" in current_datetime("Asia/Tokyo")  # Japan keeps no summer time
    assert "UTC" in current_datetime()  # the local zone, named with its offset
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        current_datetime("Mars/Olympus")


# --- tools from signatures, calls that never crash --------------------------------------------

def test_a_typed_function_becomes_an_openai_tool_schema():
    def convert(amount: Annotated[float, Field(description="how much")], unit: Literal["km", "mi"] = "km") -> str:
        """Convert a distance.

        Longer notes the model does not need."""
        return f"{amount} {unit}"

    schema = tool(convert).schema()
    assert schema == {"type": "function", "function": {
        "name": "convert", "description": "Convert a distance.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["amount"], "properties": {
            "amount": {"type": "number", "description": "how much"},
            "unit": {"type": "string", "enum": ["km", "mi"], "default": "km"}}}}}
    assert tool(calculator).schema()["function"]["parameters"]["required"] == ["expression"]

    def untyped(x) -> str:
        """Doc."""
    def undocumented(x: int) -> str:
        return ""
    with pytest.raises(ToolDefinitionError, match="parameter 'x' has no type annotation"):
        tool(untyped)
    with pytest.raises(ToolDefinitionError, match="has no docstring"):
        tool(undocumented)
    with pytest.raises(ToolDefinitionError, match="two tools named 'calculator'"):
        ToolRegistry([calculator, calculator])


def test_a_tool_that_fails_answers_the_model_with_an_error():
    release = threading.Event()

    def hangs() -> str:
        """Never answers in time."""
        release.wait(30)
        return "late"

    def breaks(n: int) -> str:
        """Raises."""
        raise RuntimeError(f"disk on fire at {n}")

    registry = ToolRegistry([calculator, hangs, breaks], timeout=0.3)
    try:
        results = {name: registry.call(ToolCall(id="c", name=name, arguments=arguments)) for name, arguments in [
            ("calculator", '{"expression": "1/0"}'), ("hangs", "{}"), ("breaks", '{"n": 3}'), ("nope", "{}")]}
        results["bad json"] = registry.call(ToolCall(id="c", name="calculator", arguments='{"expression": '))
        results["bad args"] = registry.call(ToolCall(id="c", name="breaks", arguments='{"n": "three", "m": 1}'))
    finally:
        release.set()
    assert {k: r.error for k, r in results.items()} == {
        "calculator": "division by zero",
        "hangs": "no answer within 0.3 s",
        "breaks": "RuntimeError: disk on fire at 3",
        "nope": "no tool named 'nope'; the tools are calculator, hangs, breaks",
        "bad json": results["bad json"].error,
        "bad args": results["bad args"].error,
    }
    assert results["bad json"].error.startswith("the arguments are not JSON")
    assert "n: Input should be a valid integer" in results["bad args"].error
    assert "m: Extra inputs are not permitted" in results["bad args"].error
    assert results["hangs"].output == "error: no answer within 0.3 s"


def test_user_tools_come_from_entry_points_and_the_jarvis_tools_setting(monkeypatch):
    from importlib.metadata import EntryPoint

    import jarvis.tools.registry as registry

    installed = [EntryPoint("sum_up", "jarvis.tools.builtin:calculator", "jarvis.tools")]
    monkeypatch.setattr(registry, "entry_points", lambda group: installed if group == "jarvis.tools" else [])
    monkeypatch.setenv("JARVIS_TOOLS", "jarvis.tools.builtin:current_datetime")
    found = user_tools()
    assert [t.name for t in found] == ["sum_up", "current_datetime"]  # an entry point's name names the tool
    assert ToolRegistry(found).call(ToolCall(id="1", name="sum_up", arguments='{"expression": "2+2"}')).result == "4"
    installed[0] = EntryPoint("broken", "jarvis.tools.nowhere:fn", "jarvis.tools")
    with pytest.raises(ToolDefinitionError, match=r"entry point broken = 'jarvis.tools.nowhere:fn' \(jarvis.tools\)"):
        user_tools()
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    monkeypatch.setenv("JARVIS_TOOLS", "jarvis.tools.builtin:nothing_here")
    with pytest.raises(ToolDefinitionError, match=r"\$JARVIS_TOOLS: cannot load 'jarvis.tools.builtin:nothing_here'"):
        user_tools()
    monkeypatch.setenv("JARVIS_TOOLS", "no_colon")
    with pytest.raises(ToolDefinitionError, match="is not `package.module:function`"):
        user_tools()


# --- the tool loop ----------------------------------------------------------------------------

def test_the_loop_runs_parallel_calls_feeds_results_back_and_stores_them(store):
    """Two calls in one reply, one of which fails: both answered under their ids, then the model answers."""
    model = ScriptedModel(
        lambda m: [Chunk("Let me check. "), ToolCall(id="a", name="calculator", arguments='{"expression": "12*7"}'),
                   ToolCall(id="b", name="current_datetime", arguments='{"timezone": "Mars/Olympus"}')],
        lambda m: [Chunk(f"12 times 7 is {tool_messages(m)['a']}.")],
    )
    assert isinstance(model, ToolModel)
    bot = Chatbot(ChatbotConfig(model="scripted"), model=model, store=store, extra_tools=[])
    pieces = list(bot.stream("What is 12 times 7?"))
    uses = [p for p in pieces if isinstance(p, ToolUse)]
    assert uses == ['\u2699 calculator(expression="12*7") \u2192 84',
                    "\u2699 current_datetime(timezone=\"Mars/Olympus\") \u2192 error: unknown time zone 'Mars/Olympus': "
                    "give an IANA name such as Europe/Paris or America/New_York"]
    assert "".join(p for p in pieces if not isinstance(p, ToolUse)) == "Let me check. 12 times 7 is 84."
    (_, tools), (second, _) = model.calls
    assert {t["function"]["name"] for t in tools} == {"calculator", "current_datetime", "search_conversations",
                                                       "remember", "recall"}
    assert second[-3] == {"role": "assistant", "content": "Let me check. ", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}},
        {"id": "b", "type": "function", "function": {"name": "current_datetime",
                                                     "arguments": '{"timezone": "Mars/Olympus"}'}}]}
    assert [m["role"] for m in second[-2:]] == ["tool", "tool"] and tool_messages(second)["a"] == "84"
    assert tool_messages(second)["b"].startswith("error: unknown time zone")
    reply = store.stored_messages(bot.conversation)[-1]
    assert reply.content == "Let me check. 12 times 7 is 84."
    assert [(t["name"], t["result"], t["error"] is not None) for t in reply.tool_calls] == [
        ("calculator", "84", False), ("current_datetime", None, True)]
    assert bot.history[-1] == {"role": "assistant", "content": reply.content}  # the answer alone goes on


def test_a_model_that_keeps_asking_for_tools_is_stopped(store):
    forever = ScriptedModel(lambda m: [ToolCall(id=f"c{len(m)}", name="calculator", arguments='{"expression": "1+1"}')])
    bot = Chatbot(ChatbotConfig(model="scripted", max_tool_steps=3), model=forever, store=store, extra_tools=[])
    reply = bot.ask("loop")
    assert len(forever.calls) == 4  # three rounds of calls run, the fourth request refused
    assert "stopped here: the model asked for tools again after 3 rounds" in reply
    stored = store.stored_messages(bot.conversation)[-1]
    assert stored.content == reply.strip() and len(stored.tool_calls) == 3


def test_tools_stay_off_when_configured_or_for_a_model_without_them():
    class Plain(ScriptedModel):
        chat_with_tools = None

        def complete(self, messages, stream=True, **options):
            yield Chunk("plain answer")

    assert not isinstance(Plain(), ToolModel)
    assert Chatbot(ChatbotConfig(model="plain"), model=Plain()).ask("hi") == "plain answer"
    model = ScriptedModel(lambda m: [Chunk("x")])
    model.complete = lambda messages, stream=True, **o: iter([Chunk("tools off")])
    assert Chatbot(ChatbotConfig(model="s", tools=False), model=model).ask("hi") == "tools off"
    assert model.calls == []
    with pytest.raises(ValueError, match="`max_tool_steps` must be >= 1, got 0"):
        ChatbotConfig(max_tool_steps=0)
    with pytest.raises(ValueError, match="`max_steps` must be >= 1"):
        list(run_tool_loop(model, [], ToolRegistry([]), max_steps=0))


def test_the_tools_schemas_count_against_the_context_window(store):
    """A model that calls tools is sent their schemas with the prompt: an old exchange that fits
    beside the message alone is dropped when the schemas would push the prompt past the window."""
    model = ScriptedModel(lambda m: [Chunk("ok")])
    model.context_length = 600  # 500 tokens for the prompt once 100 are kept for the reply
    schemas = len(json.dumps(ToolRegistry(builtin_tools(ToolContext(store, lambda: None))).schemas())) // 4
    assert 250 < schemas < 490, "the exchange below must fit without the schemas and not with them"
    old = [{"role": "user", "content": "u" * 400}, {"role": "assistant", "content": "a" * 400}]
    for tools, kept in [(False, old), (True, [])]:
        bot = Chatbot(ChatbotConfig(model="s", max_new_tokens=100, tools=tools), model=model, store=store,
                      extra_tools=[])
        bot.history = list(old)
        assert bot._fit_context({"role": "user", "content": "hi"})[0] == kept


# --- long-term memory -------------------------------------------------------------------------

FACT = "The user's sister's birthday is 3 May."


def test_the_model_remembers_a_fact_and_a_later_conversation_is_given_it(store):
    said = ScriptedModel(lambda m: [ToolCall(id="r", name="remember", arguments=json.dumps({"fact": FACT}))],
                         lambda m: [Chunk(f"I'll remember that ({tool_messages(m)['r']}).")])
    bot = Chatbot(ChatbotConfig(model="s"), model=said, store=store, extra_tools=[])
    assert bot.ask("My sister's birthday is 3 May, remember it.") == "I'll remember that (saved)."
    (fact,) = store.facts()
    user_message = store.stored_messages(bot.conversation)[0]
    assert (fact.text, fact.source, fact.conversation_id, fact.message_id) == (FACT, "model", bot.conversation,
                                                                               user_message.id)
    # the same fact again (other case and spacing): not stored twice, and the model is told
    again = ScriptedModel(lambda m: [ToolCall(id="r", name="remember", arguments='{"fact": "the user\'s sister\'s  birthday is 3 may"}')],
                          lambda m: [Chunk(tool_messages(m)["r"])])
    assert Chatbot(ChatbotConfig(model="s"), model=again, store=store, extra_tools=[]).ask("again") == \
        "already remembered"
    assert len(store.facts()) == 1

    store.remember("The user's favourite colour is green.", source="user")
    later = ScriptedModel(lambda m: [Chunk("3 May")])
    asked = Chatbot(ChatbotConfig(model="s", system_prompt="You are JARVIS."), model=later, store=store, extra_tools=[])
    asked.ask("When is my sister's birthday?")
    system = later.calls[0][0][0]
    assert system == {"role": "system", "content": f"You are JARVIS.\n\n{MEMORY_HEADER}\n- {FACT}"}
    assert [f.text for f in asked.last_facts] == [FACT]  # the colour does not match the question


def test_private_conversations_never_feed_memory(store):
    cid = store.create(private=True)
    model = ScriptedModel(lambda m: [ToolCall(id="r", name="remember", arguments=json.dumps({"fact": FACT}))],
                          lambda m: [Chunk(tool_messages(m)["r"])])
    bot = Chatbot(ChatbotConfig(model="s"), model=model, store=store, conversation=cid, extra_tools=[])
    assert bot.ask("Remember my sister's birthday is 3 May.") == \
        "not saved: this conversation is private, and private conversations never feed memory"
    with pytest.raises(PrivateConversationError, match="private conversations never feed memory"):
        bot.remember(FACT)
    assert store.facts() == []


def test_search_conversations_leaves_out_private_ones_and_the_current_one(store):
    public = store.create(title="trip")
    store.add_exchange(public, "We fly to Lisbon on Friday.", "Have a good flight!")
    secret = store.create(title="secret", private=True)
    store.add_exchange(secret, "The Lisbon surprise party is a secret.", "My lips are sealed.")
    context = ToolContext(store, lambda: public)
    search = {f.__name__: f for f in builtin_tools(context)}["search_conversations"]
    assert "nothing about" in search("Lisbon")  # only the asking conversation and a private one mention it
    context.conversation = lambda: None
    found = search("flights to lisbon")
    assert '"trip", user: We fly to [Lisbon] on Friday.' in found and "secret" not in found


def test_memory_facts_are_listed_deduplicated_and_forgotten(store):
    first, new = store.remember("  Likes   tea. ")
    assert new and first.text == "Likes tea."
    assert store.remember("likes tea")[1] is False
    second, _ = store.remember("Works in Oslo")
    assert [f.id for f in store.facts()] == [second.id, first.id]
    assert store.recall("Where do I work?") == [second]
    store.forget(first.id)
    assert store.facts() == [second] and store.recall("tea") == []
    with pytest.raises(KeyError, match=f"no remembered fact {first.id}"):
        store.forget(first.id)
    with pytest.raises(ValueError, match="at most 500 characters"):
        store.remember("x" * 501)


def test_a_version_4_database_migrates_keeping_its_conversations(tmp_path):
    """A jarvis.db written before schema 5: messages kept, searchable, tool calls and facts storable."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL, model TEXT, system_prompt TEXT,
            private INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL
            REFERENCES conversations(id) ON DELETE CASCADE, role TEXT NOT NULL CHECK (role IN ('system', 'user',
            'assistant')), content TEXT NOT NULL, created REAL NOT NULL);
    """)
    for column, kind in FEEDBACK_COLUMNS.items():
        if column != "tool_calls":
            db.execute(f"ALTER TABLE messages ADD COLUMN {column} {kind}")
    db.execute("INSERT INTO conversations VALUES ('old1', 'pets', NULL, NULL, 0, 1.0, 2.0)")
    db.execute("INSERT INTO messages (conversation_id, role, content, created, group_id, thinking, rating) "
               "VALUES ('old1', 'user', 'My cat is called Miso.', 1.0, 1, NULL, NULL), "
               "('old1', 'assistant', 'Lovely name!', 2.0, 2, 'thought', 1)")
    db.execute("PRAGMA user_version = 4")
    db.commit()
    db.close()

    store = ConversationStore(path)
    try:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        user, reply = store.stored_messages("old1")
        assert (user.content, reply.content, reply.thinking, reply.rating) == (
            "My cat is called Miso.", "Lovely name!", "thought", 1)
        assert reply.tool_calls == ()
        assert [h.message_id for h in store.search_messages("tell me about my cats")] == [user.id]
        fact, _ = store.remember("The cat is called Miso.", conversation_id="old1", message_id=user.id)
        assert store.recall("cat") == [fact]
    finally:
        store.close()


def test_the_chat_recipe_trains_on_the_tools_jarvis_offers(store):
    """jarvis_prime's chat recipe keeps a copy of the built-in schemas and the memory header
    (recipes/data/jarvis_tools.json: it cannot import jarvis) and writes the results JARVIS's
    tools return; if a built-in changes, this fails until the copy (and the model) follow."""
    import re
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from jarvis_prime.recipes.tool_data import clock_line, draw_case, jarvis_tools

    copy = jarvis_tools()
    assert ToolRegistry(builtin_tools(ToolContext(store, lambda: None))).schemas() == copy["tools"]
    assert [s["function"]["name"] for s in ToolRegistry(builtin_tools(None)).schemas()] == copy["without_store"]
    assert copy["memory_header"] == MEMORY_HEADER
    for i in range(100):
        case = draw_case(0, "train", i, "arithmetic")
        assert calculator(case["arguments"]["expression"]) == case["result"]
    shape = lambda line: re.sub(r"[A-Za-z]+|\d+", "w", line)  # noqa: E731
    zone = "Asia/Tokyo"
    assert shape(current_datetime(zone)) == shape(clock_line(datetime.now(ZoneInfo(zone)), zone))
