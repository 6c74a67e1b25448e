"""Tool calling for models whatever their chat template: the prompt format, the grammar
that forces a call, and reading calls out of a reply.

A chat template that knows tools (it reads a `tools` variable, as Qwen2.5's and Llama
3.1's do) renders the tool list and the `tool_calls` / `role: tool` messages itself. A
template that does not (SmolLM2's ChatML) gets the Hermes format, the one Qwen2.5 and
Hermes 2 Pro were trained on, written into plain messages first:

- the tool list goes at the end of the system message (one is added if there is none):
  the `TOOLS_PROMPT` text, then one JSON object per tool between `<tools>` tags;
- an assistant turn that called tools is its text followed by one
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` block per call;
- tool results become a user turn of `<tool_response>\\n...\\n</tool_response>` blocks
  (consecutive results share one turn), as templates with no `tool` role need.

The reply is read the same way on every model: each `<tool_call>` block holding a JSON
object with a `name` and `arguments` is a call, the text before the first block is the
content. A call forced by `tool_choice` (required, or a named function) is decoded under
`call_grammar`, so it is one such block whose arguments match the function's schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from jarvis_prime.models.grammar import json_schema_gbnf, rename_root

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOLS_PROMPT = ("You may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
                "For each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call read from a reply: the function's name and its arguments as a JSON string."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def message(self) -> dict[str, Any]:
        """As an assistant message's `tool_calls` entry (OpenAI's shape)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def function_of(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The `function` of an OpenAI tool ({"type": "function", "function": {...}})."""
    return tool.get("function", tool)


def tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    return TOOLS_PROMPT.format(tools="\n".join(json.dumps(dict(t), ensure_ascii=False) for t in tools))


def call_block(name: str, arguments: str | Mapping[str, Any]) -> str:
    args = json.loads(arguments) if isinstance(arguments, str) else dict(arguments)
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def hermes_messages(messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """`messages` (OpenAI's, tool calls and results included) as plain system / user /
    assistant turns in the Hermes format, for a template that knows no tools."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [call_block(c["function"]["name"], c["function"].get("arguments") or "{}")
                     for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + calls)})
        elif role == "tool":
            block = f"<tool_response>\n{content if isinstance(content, str) else json.dumps(content)}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        else:
            out.append({"role": role, "content": content})
    for message in out:
        message.pop("tool_results", None)
    if tools:
        prompt = tool_prompt(tools)
        if out and out[0]["role"] == "system" and isinstance(out[0]["content"], str):
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The content before the first `<tool_call>` block, and the calls the blocks hold.

    A block that is not a JSON object with a string `name` is not a call: the reply is
    then returned whole as content, so nothing the model wrote is lost."""
    start = text.find(OPEN)
    if start == -1:
        return text, []
    calls = []
    for match in _BLOCK.finditer(text, start):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append(ToolCall(call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
    return text[:start].rstrip(), calls


def call_grammar(tools: Sequence[Mapping[str, Any]], name: str | None = None) -> str:
    """GBNF for one `<tool_call>` block calling one of `tools` (or the one named), its
    arguments valid against that function's `parameters` schema."""
    functions = [function_of(t) for t in tools if name is None or function_of(t).get("name") == name]
    if not functions:
        raise ValueError(f"no tool named {name!r} among {[function_of(t).get('name') for t in tools]}")
    schema = {"anyOf": [{"type": "object", "properties": {
        "name": {"const": f["name"]},
        "arguments": f.get("parameters") or {"type": "object", "properties": {}}},
        "required": ["name", "arguments"]} for f in functions]}
    call = rename_root(json_schema_gbnf(schema), "tool-call-json")
    return f'root ::= "{OPEN}\\n" tool-call-json "\\n{CLOSE}"\n{call}'


class ToolCallStream:
    """Streams a reply's content while holding back what may be the start of a
    `<tool_call>` block; from the first block on, nothing more is content (the calls are
    read from the whole reply at the end, `parse_tool_calls`)."""

    def __init__(self) -> None:
        self.raw, self._sent, self.calling = "", 0, False

    def feed(self, piece: str) -> str:
        self.raw += piece
        if not self.calling and (at := self.raw.find(OPEN, self._sent)) != -1:
            self.calling = True
            return self._emit(at)
        if self.calling:
            return ""
        safe = len(self.raw)
        for keep in range(min(len(OPEN) - 1, len(self.raw)), 0, -1):  # a tail that may become OPEN
            if OPEN.startswith(self.raw[-keep:]):
                safe -= keep
                break
        return self._emit(safe)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What content is left to send, and the calls. A reply whose blocks do not parse
        sends everything held back as content."""
        content, calls = parse_tool_calls(self.raw)
        return self._emit(len(content) if calls else len(self.raw)), calls

    def _emit(self, upto: int) -> str:
        out, self._sent = self.raw[self._sent:upto], max(self._sent, upto)
        return out
