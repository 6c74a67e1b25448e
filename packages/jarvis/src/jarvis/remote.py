"""JARVIS on any OpenAI-compatible endpoint: `jarvis chat --backend-url URL`.

`prime serve`, vLLM, Ollama and llama.cpp's server all speak /v1/chat/completions;
this is how JARVIS scales past one machine. `RemoteModel` offers the part of
`PrimeModel` the `Chatbot` uses, over HTTP with the standard library (streamed
replies are server-sent events). The remote tokenizer is out of reach, so context
trimming counts ~3 characters a token: an over-estimate for English, which keeps the
prompt inside the server's window at the cost of trimming a little early.

A thinking model's reasoning arrives as `reasoning_content` (prime serve, vLLM, llama.cpp's
server) and comes out as `Chunk.reasoning`, apart from the answer, as a local model's does.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from jarvis_prime import PrimeError
from jarvis_prime.models.base import Chunk

CHARS_PER_TOKEN = 3


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
        self.runtime = RemoteRuntime("remote", self.base_url)
        self.version = "remote"
        self.name = model or self._first_model()

    def _request(self, path: str, body: dict[str, Any] | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers,
                                         method="POST" if data is not None else "GET")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read())["error"]["message"]
            except Exception:  # noqa: BLE001  (not OpenAI-shaped: say what we got)
                message = err.reason
            raise PrimeError(f"{self.base_url}{path}: HTTP {err.code}: {message}") from None
        except urllib.error.URLError as err:
            raise PrimeError(f"{self.base_url}: unreachable ({err.reason})") from None

    def _first_model(self) -> str:
        with self._request("/models") as response:
            models = json.loads(response.read())["data"]
        if not models:
            raise PrimeError(f"{self.base_url}/models lists no model; pass --model")
        return models[0]["id"]

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """A stand-in for sizing only: the server applies the model's real template."""
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)

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
        return self._stream(messages, **options)

    def _stream(self, messages: Sequence[Mapping[str, Any]], *, max_new_tokens: int = 256,
                temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                thinking_budget: int | None = None) -> Iterator[Chunk]:
        body = {"model": self.name, "messages": list(messages), "max_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "stream": True}
        if seed is not None:
            body["seed"] = seed
        if thinking_budget is not None:
            body["max_thinking_tokens"] = thinking_budget
        with self._request("/chat/completions", body) as response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    return
                choices = json.loads(payload).get("choices") or []
                delta = choices[0].get("delta") or {} if choices else {}
                text, reasoning = delta.get("content") or "", delta.get("reasoning_content") or ""
                if text or reasoning:
                    yield Chunk(text, reasoning=reasoning)

    def close(self) -> None:
        pass
