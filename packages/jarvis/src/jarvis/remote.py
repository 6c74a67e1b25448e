"""JARVIS on any OpenAI-compatible endpoint: `jarvis chat --backend-url URL`.

`prime serve`, vLLM, Ollama and llama.cpp's server all speak /v1/chat/completions;
this is how JARVIS scales past one machine. `RemoteModel` offers the part of
`PrimeModel` the `Chatbot` uses, through the official `openai` client (its streaming, its
retries of dropped connections and 5xx, its error types), plus `chat_with_tools`, which the
tool loop drives (`jarvis.tool_loop`). The remote tokenizer is out of reach, so context
trimming counts ~3 characters a token: an over-estimate for English, which keeps the
prompt inside the server's window at the cost of trimming a little early.

A thinking model's reasoning arrives as `reasoning_content` (prime serve, vLLM, llama.cpp's
server), a field outside OpenAI's schema that the client keeps as an extra, and comes out as
`Chunk.reasoning`, apart from the answer, as a local model's does. Tool calls stream as
deltas keyed by `index` (the id and name first, the arguments in pieces); they are assembled
here and come out whole, as `ToolCall`s, once the reply ends. An endpoint that refuses `tools`
by name (400 with `param: "tools"`, as `prime serve` without tool support answers) is then
asked without them, for the rest of the session, and the log says so once.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import openai

from jarvis.tools.calls import ToolCall
from jarvis_prime import PrimeError
from jarvis_prime.models.base import Chunk

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 3
MAX_RETRIES = 2  # the client's: connection errors, 408, 409, 429 and 5xx, with backoff


class _ToolsRefused(Exception):
    """The endpoint answered 400 naming `tools`: it cannot take them."""


@dataclass(frozen=True)
class RemoteRuntime:
    backend: str
    url: str

    def describe(self) -> str:
        return f"OpenAI-compatible endpoint {self.url}"


class RemoteModel:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 context_length: int = 4096, timeout: float = 600) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.context_length = context_length
        self.timeout = timeout
        # the client insists on a key; servers without one ignore the header
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "none", timeout=timeout,
                                    max_retries=MAX_RETRIES)
        self.tools_refused = False  # the endpoint answered 400 to `tools`: chat without them
        self.runtime = RemoteRuntime("remote", self.base_url)
        self.version = "remote"
        self.name = model or self._first_model()

    def _error(self, err: openai.OpenAIError, path: str) -> PrimeError:
        """The client's error as JARVIS's: the URL, the HTTP status and the server's own message."""
        if isinstance(err, openai.APITimeoutError):
            return PrimeError(f"{self.base_url}{path}: no answer within {self.timeout:g} s")
        if isinstance(err, openai.APIConnectionError):
            cause = err.__cause__ or err.__context__
            return PrimeError(f"{self.base_url}: unreachable ({cause or err.message})")
        if isinstance(err, openai.APIStatusError):
            body = err.body
            message = body.get("message") if isinstance(body, dict) else None
            if isinstance(body, dict) and isinstance(body.get("error"), dict):  # not unwrapped by the client
                message = body["error"].get("message")
            return PrimeError(f"{self.base_url}{path}: HTTP {err.status_code}: {message or err.message}")
        return PrimeError(f"{self.base_url}{path}: {err}")

    @functools.cached_property
    def _models(self) -> list:
        """The server's /models entries, asked once (the model's name and its capabilities)."""
        try:
            return list(self.client.models.list())
        except openai.OpenAIError as err:
            raise self._error(err, "/models") from None

    @functools.cached_property
    def calls_tools(self) -> bool:
        """Whether to offer JARVIS's tools (the Chatbot asks, as of a local model): false only
        when the server's /models entry lists `capabilities` without "tools" (`prime serve`
        does, for a model never trained on tools); a server that says nothing (vLLM, llama.cpp)
        is taken at its word that it can."""
        try:
            entry = next((m for m in self._models if m.id == self.name), None)
        except PrimeError:
            return True  # the chat request will say what is wrong
        listed = (entry.model_extra or {}).get("capabilities") if entry is not None else None
        return not isinstance(listed, list) or "tools" in listed

    def _first_model(self) -> str:
        if not self._models:
            raise PrimeError(f"{self.base_url}/models lists no model; pass --model")
        return self._models[0].id

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """A stand-in for sizing only: the server applies the model's real template."""
        return "".join(f"<|{m['role']}|>\n{m.get('content') or ''}\n" for m in messages)

    def count_tokens(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """As `PrimeModel.encode_chat`: what `complete` sends (the server applies the template)."""
        return list(messages)

    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, **options: Any) -> str | Iterator[str]:
        """As `PrimeModel.chat`: the reply (the answer), or with `stream=True` its pieces."""
        pieces = (chunk.text for chunk in self.complete(messages, stream=True, **options) if chunk.text)
        return pieces if stream else "".join(pieces)

    def complete(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = True, **options: Any) -> Iterator[Chunk]:
        """As `PrimeModel.complete(..., stream=True)`: `Chunk`s, a thinking model's reasoning in
        `Chunk.reasoning` (always streamed over HTTP)."""
        if not stream:
            raise ValueError("RemoteModel.complete streams only")
        return (piece for piece in self._stream(messages, None, **options) if isinstance(piece, Chunk))

    def chat_with_tools(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
                        **options: Any) -> Iterator[Chunk | ToolCall]:
        """The reply to `messages` with `tools` offered (OpenAI's `tools=`): text `Chunk`s as they
        come, then the `ToolCall`s the model asked for, each assembled from its deltas."""
        if self.tools_refused:
            return self._stream(messages, None, **options)
        return self._with_tools(messages, list(tools), options)

    def _with_tools(self, messages, tools, options) -> Iterator[Chunk | ToolCall]:
        try:
            first = self._stream(messages, tools, **options)
            yield next(first)  # the request is sent, and refused, before the first piece
        except StopIteration:
            return
        except _ToolsRefused as refused:
            self.tools_refused = True
            log.warning("%s does not take tools (%s): chatting without them", self.base_url, refused)
            yield from self._stream(messages, None, **options)
            return
        yield from first

    def _stream(self, messages: Sequence[Mapping[str, Any]], tools: list[Mapping[str, Any]] | None, *,
                max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                thinking_budget: int | None = None) -> Iterator[Chunk | ToolCall]:
        extra = {"max_thinking_tokens": thinking_budget} if thinking_budget is not None else None
        calls: dict[int, dict[str, str]] = {}  # index -> id, name, arguments (pieces joined)
        try:
            stream = self.client.chat.completions.create(
                model=self.name, messages=list(messages), max_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, stream=True, **({"seed": seed} if seed is not None else {}),
                **({"tools": tools} if tools else {}), **({"extra_body": extra} if extra else {}))
            with stream:
                for event in stream:
                    if not event.choices:
                        continue
                    delta = event.choices[0].delta
                    text = delta.content or ""
                    reasoning = (delta.model_extra or {}).get("reasoning_content") or ""
                    if text or reasoning:
                        yield Chunk(text, reasoning=reasoning)
                    for piece in delta.tool_calls or ():
                        call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                        call["id"] = piece.id or call["id"]
                        if piece.function is not None:
                            call["name"] += piece.function.name or ""
                            call["arguments"] += piece.function.arguments or ""
        except openai.BadRequestError as err:
            if tools and (err.param == "tools" or err.code == "unsupported_parameter"):
                raise _ToolsRefused(err.message) from None
            raise self._error(err, "/chat/completions") from None
        except openai.OpenAIError as err:
            raise self._error(err, "/chat/completions") from None
        for index in sorted(calls):
            call = calls[index]
            yield ToolCall(call["name"], call["arguments"], call["id"] or f"call_{index}")

    def close(self) -> None:
        self.client.close()
