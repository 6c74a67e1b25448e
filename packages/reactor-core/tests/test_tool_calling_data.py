"""OpenAI tool-calling data (issue #24): records with `tools`, assistant `tool_calls` and
`role: "tool"` results, rendered by a tool-aware chat template with the loss on the
assistant turns (calls included) only; bad records and templates that cannot show tools
are refused at their path:line."""

from __future__ import annotations

import json

import pytest

from reactor_core.data import DataValidationError, load_chat_file, tokenize_dataset
from reactor_core.data.tokenize import IGNORE_INDEX, ChatTemplateError, tokenize_chat

# Qwen2.5's way, reduced: the tool list in a system turn, calls as <tool_call> blocks with the
# arguments serialised by `tojson`, results in a user turn.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CALCULATOR = {"type": "function", "function": {"name": "calculator", "description": "Exact arithmetic.",
                                               "parameters": {"type": "object",
                                                              "properties": {"expression": {"type": "string"}},
                                                              "required": ["expression"]}}}


def call(arguments: str = '{"expression": "12 * 7"}', call_id: str = "c1") -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "calculator", "arguments": arguments}}]}


GOOD = {"tools": [CALCULATOR], "messages": [
    {"role": "user", "content": "What is 12 times 7?"}, call(),
    {"role": "tool", "tool_call_id": "c1", "content": "84"},
    {"role": "assistant", "content": "12 * 7 = 84."}]}


class WithTemplate:
    """The tokenizer, rendering with another chat template."""

    def __init__(self, tokenizer, chat_template: str) -> None:
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_a_tool_aware_template_renders_the_tools_and_only_the_assistant_turns_are_learnt(tmp_path, tokenizer):
    examples, _ = load_chat_file(write(tmp_path / "tools.jsonl", [GOOD]))
    [example] = examples
    assert example.tool_list == [CALCULATOR]
    template = WithTemplate(tokenizer, TOOLS_TEMPLATE)
    tokenized = tokenize_chat(example, template)
    text = tokenizer.decode(tokenized.input_ids)
    assert text.startswith("<|im_start|>system\n# Tools\n{") and '"name": "calculator"' in text
    learnt = tokenizer.decode([t for t, l in zip(tokenized.input_ids, tokenized.labels) if l != IGNORE_INDEX])
    assert learnt == ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * 7"}}\n</tool_call>'
                      "<|im_end|>12 * 7 = 84.<|im_end|>")  # the call and the answer; never the result "84"
    assert "<tool_response>\n84" not in learnt


def test_a_template_that_renders_no_tools_is_refused_at_the_line(tmp_path, tokenizer):
    """SmolLM2's ChatML ignores `tools` and writes no calls: training on it would show the
    model neither. The error says how to get out (a tool-aware template, or pre-render)."""
    examples, _ = load_chat_file(write(tmp_path / "tools.jsonl", [GOOD]))
    with pytest.raises(ChatTemplateError, match="renders no tool list.*pre-render"):
        tokenize_chat(examples[0], tokenizer)
    with pytest.raises(DataValidationError) as err:
        tokenize_dataset(examples, tokenizer, max_seq_length=512)
    assert f"{tmp_path / 'tools.jsonl'}:1: chat template: the chat template renders no tool list" in str(err.value)
    no_list = [{"messages": GOOD["messages"]}]  # calls without a tool list: the call is dropped
    examples, _ = load_chat_file(write(tmp_path / "calls.jsonl", no_list))
    with pytest.raises(ChatTemplateError, match="drops the tool call to 'calculator' of message 1"):
        tokenize_chat(examples[0], tokenizer)


BAD = [
    ({"messages": [{"role": "user", "content": "Q"}, call('{"expression": '), {"role": "assistant", "content": "A"}]},
     "messages[1].tool_calls[0].function.arguments: not JSON"),
    ({"messages": [{"role": "user", "content": "Q"}, call('[1, 2]'), {"role": "assistant", "content": "A"}]},
     "messages[1].tool_calls[0].function.arguments: must be a JSON object, got array"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "84"},
                   {"role": "assistant", "content": "A"}]},
     "messages[1]: a tool result with no assistant tool_calls before it"),
    ({"messages": [{"role": "user", "content": "Q"}, call(), {"role": "tool", "tool_call_id": "c9", "content": "84"},
                   {"role": "assistant", "content": "A"}]},
     "messages[2].tool_call_id: 'c9' answers none of the calls of messages[1]"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": [{"x": 1}]}]},
     "messages[1].tool_calls[0]: expected"),
    ({"tools": [{"name": "calculator"}], "messages": GOOD["messages"]}, "tools[0]: expected"),
]


def test_bad_tool_records_are_issues_naming_the_line_and_field(tmp_path):
    path = write(tmp_path / "bad.jsonl", [GOOD] + [record for record, _ in BAD])
    with pytest.raises(DataValidationError) as err:
        load_chat_file(path)
    assert [(i.line, i.kind) for i in err.value.issues] == [(line, "bad_tool_call") for line in range(2, 2 + len(BAD))]
    for line, (_, reason) in enumerate(BAD, start=2):
        assert f"{path}:{line}: {reason}" in str(err.value)
