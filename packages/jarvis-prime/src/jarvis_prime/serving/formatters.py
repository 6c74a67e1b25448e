"""One formatter per response kind: the JSON of a whole answer and of each streamed
event, for /v1/chat/completions (`ChatFormatter`) and /v1/completions (`TextFormatter`).

The two kinds differ only in object names, id prefix and where the text goes in a
choice (a chat's `message` / `delta`, a completion's `text`); the envelope (id,
created, model, system_fingerprint, usage) is the same, so it lives in `Formatter`.

A thinking model's reasoning goes beside the answer as `reasoning_content`, in the
message and in stream deltas, where vLLM and llama.cpp's server put it, so OpenAI
clients that know the field show it and others read `content` as the answer alone.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar

from jarvis_prime.models.base import Generation
from jarvis_prime.serving.host import Slot

Choice = dict[str, Any]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Formatter:
    """The responses to one request, answered by `slot`'s model."""

    object: ClassVar[str]  # of a whole answer
    chunk_object: ClassVar[str]  # of a streamed event
    id_prefix: ClassVar[str]

    def __init__(self, slot: Slot, include_usage: bool = False) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model, self.fingerprint = slot.name, slot.fingerprint()
        self.include_usage = include_usage  # streams: a last event with usage (stream_options.include_usage)

    def completion(self, result: Generation) -> dict[str, Any]:
        choice = self.choice(result.text, result.finish_reason, result.reasoning)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": [choice],
                "usage": usage(result.prompt_tokens, result.completion_tokens)}

    def event(self, choice: Choice | None, usage: dict[str, int] | None = None) -> str:
        """One server-sent event; with include_usage every event has `usage` (null but on the last)."""
        payload = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                   "system_fingerprint": self.fingerprint, "choices": [choice] if choice else []}
        if self.include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def opening(self) -> Choice | None:
        """The choice of the event before any text, if this kind sends one."""
        return None

    def choice(self, text: str, finish_reason: str, reasoning: str | None = None) -> Choice:
        raise NotImplementedError

    def delta(self, text: str) -> Choice:
        raise NotImplementedError

    def reasoning_delta(self, reasoning: str) -> Choice:
        """A streamed piece of a thinking model's reasoning (chat only: raw prompts never think)."""
        raise NotImplementedError

    def closing(self, finish_reason: str) -> Choice:
        """The last event's choice: no text, the finish reason."""
        raise NotImplementedError


class ChatFormatter(Formatter):
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def opening(self) -> Choice:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}

    def choice(self, text: str, finish_reason: str, reasoning: str | None = None) -> Choice:
        message = {"role": "assistant", "content": text}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return {"index": 0, "message": message, "finish_reason": finish_reason}

    def delta(self, text: str) -> Choice:
        return {"index": 0, "delta": {"content": text}, "finish_reason": None}

    def reasoning_delta(self, reasoning: str) -> Choice:
        return {"index": 0, "delta": {"reasoning_content": reasoning}, "finish_reason": None}

    def closing(self, finish_reason: str) -> Choice:
        return {"index": 0, "delta": {}, "finish_reason": finish_reason}


class TextFormatter(Formatter):
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def choice(self, text: str, finish_reason: str | None, reasoning: str | None = None) -> Choice:
        return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}

    def delta(self, text: str) -> Choice:
        return self.choice(text, None)

    def closing(self, finish_reason: str) -> Choice:
        return self.choice("", finish_reason)
