"""One formatter per response kind: the JSON of a whole answer and of each streamed
event, for /v1/chat/completions (`ChatFormatter`) and /v1/completions (`TextFormatter`).

The two kinds differ only in object names, id prefix and where the text goes in a
choice (a chat's `message` / `delta`, a completion's `text`); the envelope (id,
created, model, system_fingerprint, usage) is the same, so it lives in `Formatter`.

A thinking model's reasoning goes beside the answer as `reasoning_content`, in the
message and in stream deltas, where vLLM and llama.cpp's server put it, so OpenAI
clients that know the field show it and others read `content` as the answer alone.

A request with tools (`tools=True`) has its reply read for `<tool_call>` blocks
(`models/tools.py`): calls go in the message's `tool_calls` with finish_reason
"tool_calls"; a stream sends the content before the first block as it comes, then each
call as OpenAI streams them (a delta naming index, id and function name with empty
arguments, then the arguments). `n` choices carry their index; token log-probabilities
go where OpenAI puts them (chat: `logprobs.content[]`; completions: the legacy lists).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Sequence

from jarvis_prime.models.base import Generation, TokenLogprob
from jarvis_prime.models.tools import ToolCall, parse_tool_calls
from jarvis_prime.serving.host import Slot

Choice = dict[str, Any]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    return {"content": [{**_entry(t.token, t.logprob), "top_logprobs": [_entry(a, lp) for a, lp in t.top]}
                        for t in tokens], "refusal": None}


def text_logprobs(tokens: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The completions endpoint's legacy shape: parallel lists, top_logprobs as {token: logprob}."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


class Formatter:
    """The responses to one request, answered by `slot`'s model."""

    object: ClassVar[str]  # of a whole answer
    chunk_object: ClassVar[str]  # of a streamed event
    id_prefix: ClassVar[str]

    def __init__(self, slot: Slot, include_usage: bool = False, tools: bool = False) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model, self.fingerprint = slot.name, slot.fingerprint()
        self.include_usage = include_usage  # streams: a last event with usage (stream_options.include_usage)
        self.tools = tools  # read the reply for tool calls (chat only)

    def completion(self, results: Sequence[Generation]) -> dict[str, Any]:
        """The whole answer: one choice per result (`n`), usage over all of them."""
        choices = [self.choice(r, i) for i, r in enumerate(results)]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices,
                "usage": usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))}

    def event(self, choice: Choice | None, usage: dict[str, int] | None = None) -> str:
        """One server-sent event; with include_usage every event has `usage` (null but on the last)."""
        payload = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                   "system_fingerprint": self.fingerprint, "choices": [choice] if choice else []}
        if self.include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def opening(self, index: int = 0) -> Choice | None:
        """The choice of the event before any text, if this kind sends one."""
        return None

    def choice(self, result: Generation, index: int = 0) -> Choice:
        raise NotImplementedError

    def delta(self, text: str, index: int = 0, logprobs: Sequence[TokenLogprob] = ()) -> Choice:
        raise NotImplementedError

    def reasoning_delta(self, reasoning: str, index: int = 0) -> Choice:
        """A streamed piece of a thinking model's reasoning (chat only: raw prompts never think)."""
        raise NotImplementedError

    def tool_call_deltas(self, calls: Sequence[ToolCall], index: int = 0) -> list[Choice]:
        """A stream's tool calls (chat only)."""
        raise NotImplementedError

    def closing(self, finish_reason: str, index: int = 0) -> Choice:
        """The last event's choice: no text, the finish reason."""
        raise NotImplementedError


class ChatFormatter(Formatter):
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def opening(self, index: int = 0) -> Choice:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}

    def choice(self, result: Generation, index: int = 0) -> Choice:
        content, calls = parse_tool_calls(result.text) if self.tools else (result.text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else content)}
        if result.reasoning is not None:
            message["reasoning_content"] = result.reasoning
        if calls:
            message["tool_calls"] = [c.message() for c in calls]
        finish = "tool_calls" if calls and result.finish_reason == "stop" else result.finish_reason
        logprobs = chat_logprobs(result.logprobs) if result.logprobs is not None else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, text: str, index: int = 0, logprobs: Sequence[TokenLogprob] = ()) -> Choice:
        choice: Choice = {"index": index, "delta": {"content": text}, "finish_reason": None}
        if logprobs:
            choice["logprobs"] = chat_logprobs(logprobs)
        return choice

    def reasoning_delta(self, reasoning: str, index: int = 0) -> Choice:
        return {"index": index, "delta": {"reasoning_content": reasoning}, "finish_reason": None}

    def tool_call_deltas(self, calls: Sequence[ToolCall], index: int = 0) -> list[Choice]:
        """Each call as OpenAI streams it: its index, id, type and name with empty arguments
        first, then the arguments (in pieces, as clients must join them anyway)."""
        out: list[Choice] = []
        for i, call in enumerate(calls):
            head = {"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            out.append({"index": index, "delta": {"tool_calls": [head]}, "finish_reason": None})
            for at in range(0, len(call.arguments), 16):
                piece = {"index": i, "function": {"arguments": call.arguments[at:at + 16]}}
                out.append({"index": index, "delta": {"tool_calls": [piece]}, "finish_reason": None})
        return out

    def closing(self, finish_reason: str, index: int = 0) -> Choice:
        return {"index": index, "delta": {}, "finish_reason": finish_reason}


class TextFormatter(Formatter):
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def choice(self, result: Generation, index: int = 0) -> Choice:
        logprobs = text_logprobs(result.logprobs) if result.logprobs is not None else None
        return {"index": index, "text": result.text, "finish_reason": result.finish_reason, "logprobs": logprobs}

    def delta(self, text: str, index: int = 0, logprobs: Sequence[TokenLogprob] = ()) -> Choice:
        return {"index": index, "text": text, "finish_reason": None,
                "logprobs": text_logprobs(logprobs) if logprobs else None}

    def closing(self, finish_reason: str, index: int = 0) -> Choice:
        return {"index": index, "text": "", "finish_reason": finish_reason, "logprobs": None}
