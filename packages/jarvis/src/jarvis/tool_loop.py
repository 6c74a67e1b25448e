"""The tool loop on OpenAI's tool-calling protocol: the model asks, JARVIS runs, the model answers.

    reply = model.chat_with_tools(messages, tools)      # text, and maybe tool_calls
    while reply asks for tools:
        messages += [assistant message with `tool_calls`, one `role: tool` message per call]
        reply = model.chat_with_tools(messages, tools)  # the model reads the results

The same messages go to a local PRIME model, `prime serve` or any OpenAI-compatible server, so
the loop runs the same on each (`jarvis.tools.calls.ToolModel`). Calls the model asks for in
one reply ("parallel" calls) run one after another, in order, each answered under its own
`tool_call_id`. A tool's failure or timeout is a result like any other (`ToolRegistry.call`):
the model reads the error and carries on. After `max_steps` rounds of tool calls, a model that
asks for more is stopped: the reply ends with a note saying so, and no further call is made.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

from jarvis.tools.calls import ToolCall, ToolModel, ToolResult
from jarvis.tools.registry import ToolRegistry
from jarvis_prime.models.base import Chunk

DEFAULT_MAX_STEPS = 4


def step_limit_note(max_steps: int) -> str:
    return (f"\n(JARVIS stopped here: the model asked for tools again after {max_steps} rounds of tool calls, "
            f"the limit for one reply)")


def run_tool_loop(model: ToolModel, messages: Sequence[Mapping[str, Any]], registry: ToolRegistry, *,
                  max_steps: int = DEFAULT_MAX_STEPS, **options: Any) -> Iterator[Chunk | ToolResult]:
    """The reply to `messages` with `registry`'s tools: text `Chunk`s as the model writes them,
    and a `ToolResult` for each call as it is answered. `options` go to every model call."""
    if max_steps < 1:
        raise ValueError(f"`max_steps` must be >= 1, got {max_steps}")
    sent = list(messages)
    tools = registry.schemas()
    for step in range(max_steps + 1):
        text: list[str] = []
        calls: list[ToolCall] = []
        for piece in model.chat_with_tools(sent, tools, **options):
            if isinstance(piece, ToolCall):
                calls.append(piece)
            else:
                text.append(piece.text)
                yield piece
        if not calls:
            return
        if step == max_steps:
            yield Chunk(step_limit_note(max_steps))
            return
        sent.append({"role": "assistant", "content": "".join(text), "tool_calls": [c.message() for c in calls]})
        for call in calls:
            result = registry.call(call)
            yield result
            sent.append({"role": "tool", "tool_call_id": call.id, "content": result.output})
