"""What a tool-calling model and JARVIS's tool loop exchange (a leaf: no other jarvis import).

The loop (`jarvis.tool_loop`) needs one thing from a model, `chat_with_tools(messages, tools,
**options)`: the reply as it streams, `Chunk`s of text (and a thinking model's reasoning) and,
once assembled, the `ToolCall`s it asks for (jarvis-prime's, `jarvis_prime.models.tools`).
`RemoteModel` has it (OpenAI's protocol through the `openai` client), and so does a local
`PrimeModel` (its chat template's tools, or the Hermes format); JARVIS offers tools to a local
model only when it was made to call them (`PrimeModel.calls_tools`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from jarvis_prime.models.base import Chunk
from jarvis_prime.models.tools import ToolCall  # jarvis-prime reads calls out of a local model's reply


@dataclass(frozen=True)
class ToolResult:
    """A call and what JARVIS answered (`result`, or `error` when the tool failed, timed out or
    was asked wrongly: either way the text goes back to the model). Stored with the reply."""

    call: ToolCall
    result: str | None = None
    error: str | None = None

    @property
    def output(self) -> str:
        """What the model is told (`role: tool`)."""
        return self.result if self.error is None else f"error: {self.error}"

    def line(self) -> str:
        """One line for the terminal: `⚙ calculator(expression="12*7") → 84`."""
        try:
            args = json.loads(self.call.arguments or "{}")
            shown = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items()) \
                if isinstance(args, dict) else self.call.arguments
        except ValueError:
            shown = self.call.arguments
        return f"\u2699 {self.call.name}({shown}) \u2192 {self.output}"

    def as_json(self) -> dict[str, Any]:
        return {"id": self.call.id, "name": self.call.name, "arguments": self.call.arguments,
                "result": self.result, "error": self.error}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ToolResult":
        return cls(ToolCall(data["name"], data["arguments"], data["id"]), data.get("result"), data.get("error"))


@runtime_checkable
class ToolModel(Protocol):
    """A model the tool loop can drive."""

    def chat_with_tools(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
                        **options: Any) -> Iterator[Chunk | ToolCall]: ...
