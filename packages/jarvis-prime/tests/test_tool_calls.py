"""Tool calls without a model (models/tools.py, models/grammar.py): the Hermes prompt
format, reading calls from replies and streams, the grammars that force them."""

from __future__ import annotations

import json

import pytest

from jarvis_prime.models.chat_template import ChatTemplate, ChatTemplateError
from jarvis_prime.models.grammar import flatten_repetitions, json_schema_gbnf
from jarvis_prime.models.tools import ToolCallStream, call_grammar, hermes_messages, parse_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A template that knows tools, as Qwen2.5's does (reduced): the list in the system turn, role tool kept.
TOOLS_TEMPLATE = ("{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t['function']['name'] }}"
                  "{% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                  "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c['function']['name'] }}{% endfor %}"
                  "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}")


def test_calls_are_read_from_blocks_and_text_before_them_is_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                    ("get_time", {})]
    assert calls[0].id != calls[1].id
    unclosed = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}')  # cut before </tool_call>
    assert unclosed[1][0].name == "f"


@pytest.mark.parametrize("text", ["<tool_call>{not json}</tool_call>", '<tool_call>["f"]</tool_call>',
                                  "no call here"])
def test_a_reply_without_valid_calls_is_all_content(text):
    assert parse_tool_calls(text) == (text, [])


def test_the_stream_holds_back_what_may_open_a_call():
    stream = ToolCallStream()
    sent = [stream.feed(p) for p in ["Sure", ", <tool", "_ca", 'll>{"name": "get_weather", ', '"arguments": {}}',
                                     "</tool_call>"]]
    assert "".join(sent) == "Sure, " and sent[1] == ", "
    rest, calls = stream.finish()
    assert rest == "" and calls[0].name == "get_weather"
    plain = ToolCallStream()
    assert plain.feed("a <to") == "a " and plain.finish() == ("<to", [])  # never a call: everything is sent


def test_hermes_format_for_a_template_without_tools():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "c2", "content": "windy"}]
    plain = hermes_messages(messages, [WEATHER])
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0]["content"].startswith("Be brief.\n\n") and '"name": "get_weather"' in plain[0]["content"]
    assert plain[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    assert plain[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwindy\n</tool_response>"
    assert hermes_messages([{"role": "user", "content": "hi"}], [WEATHER])[0]["role"] == "system"
    with pytest.raises(ChatTemplateError, match="messages\\[2\\].role"):
        ChatTemplate(CHATML, {}).render(messages[:2] + messages[3:])  # a template without tools never sees role tool


def test_a_template_that_knows_tools_renders_them_itself():
    template = ChatTemplate(TOOLS_TEMPLATE, {})
    assert template.knows_tools and not ChatTemplate(CHATML, {}).knows_tools
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    text = template.render([{"role": "user", "content": "Weather?"},
                            {"role": "assistant", "content": None, "tool_calls": [call]},
                            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], tools=[WEATHER])
    assert "TOOLS: get_weather" in text and "CALL get_weather" in text and "<|im_start|>tool\nsunny" in text


def test_forced_call_grammar_names_the_function_and_embeds_its_schema():
    grammar = call_grammar([WEATHER])
    assert grammar.startswith('root ::= "<tool_call>\\n" tool-call-json "\\n</tool_call>"')
    assert '"\\"get_weather\\""' in grammar and "tool-call-json ::=" in grammar
    assert grammar.count("root ::=") == 1
    with pytest.raises(ValueError, match="no tool named 'other'"):
        call_grammar([WEATHER], "other")


def test_bounded_repetitions_become_the_repetition_operator():
    assert flatten_repetitions("x ::= (a (a (a)?)?)?") == "x ::= (a){0,3}"
    assert flatten_repetitions('t ::= ("," s ("," s)?)?') == 't ::= ("," s){0,2}'
    assert flatten_repetitions("x ::= (a (b)?)?") == "x ::= (a (b)?)?"  # different items: left alone
    grammar = json_schema_gbnf({"type": "object", "properties": {"s": {"type": "string", "maxLength": 30}}})
    assert "(char){0,30}" in grammar and "(char (char" not in grammar
