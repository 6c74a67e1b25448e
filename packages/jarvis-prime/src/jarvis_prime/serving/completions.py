"""Answering a completion request: admit it, pin the current model, encode the prompt,
then reply in one piece or as a stream of server-sent events.

Generation runs in the server's thread pool, so the event loop never blocks. Requests
admitted beyond those generating wait; beyond `max_queue` the answer is 429 with
Retry-After, so a burst queues a bounded amount of work instead of timing out.

`n` > 1 choices are decoded one after the other from the same prompt (each with seed + i
when a seed is given, so each is reproducible and they differ); a stream sends choice 0's
events, then choice 1's, each event naming its choice's index.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

from fastapi.responses import StreamingResponse

from jarvis_prime.models.prime_model import PrimeModel, Prompt, iterate_in_thread
from jarvis_prime.models.tools import ToolCallStream
from jarvis_prime.serving.errors import APIError
from jarvis_prime.serving.formatters import Formatter, usage
from jarvis_prime.serving.host import ModelHost, Slot
from jarvis_prime.serving.middleware import Metrics
from jarvis_prime.serving.settings import ServerConfig
from jarvis_prime.serving.types import SamplingRequest


class Admission:
    """How many generation requests are in (running or waiting), bounded: past `limit`,
    429 with Retry-After (both servers: `prime serve`'s completions, `jarvis serve`'s replies)."""

    def __init__(self, limit: int, retry_after_s: int = 1, depth: Any = None) -> None:
        """`depth`: a gauge set to the count (prime's /metrics), if any."""
        self.limit, self.retry_after_s, self.depth = limit, retry_after_s, depth
        self.admitted = 0
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self.admitted >= self.limit:
                raise APIError(429, f"server busy: {self.admitted} requests queued; retry shortly",
                               type_="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(self.retry_after_s)})
            self.admitted += 1
            self._show()
        try:
            yield
        finally:
            with self._lock:
                self.admitted -= 1
                self._show()

    def _show(self) -> None:
        if self.depth is not None:
            self.depth.set(self.admitted)


class HeldStream(StreamingResponse):
    """A stream that releases what it holds (queue place, pinned model, a conversation)
    however the response ends: the last event sent, an error, or a client that left,
    even before the first byte, when Starlette never starts the generator (so the
    generator's own `finally` never runs)."""

    def __init__(self, content: AsyncIterator[str], held: ExitStack, **options: Any) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}, **options)
        self.held = held

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # an unstarted or suspended generator: its finally runs now
            finally:
                self.held.close()  # idempotent: the generator may have closed it already


@dataclass
class Stream:
    """One streamed answer: the pinned model, what to decode, and how to write it.
    `held` keeps the queue place and the model until the last event is sent."""

    slot: Slot
    prompt: Prompt
    options: dict[str, Any]
    formatter: Formatter
    held: ExitStack
    n: int = 1


def check_model(requested: str | None, slot: Slot) -> None:
    if requested and requested != slot.name:
        raise APIError(404, f"model {requested!r} is not served here; this server serves {slot.name!r}",
                       param="model", code="model_not_found")


def choice_options(options: dict[str, Any], index: int) -> dict[str, Any]:
    """Choice `index`'s options: its own seed (seed + index) when the request has one."""
    seed = options.get("seed")
    return options if seed is None or index == 0 else {**options, "seed": seed + index}


class Completions:
    def __init__(self, config: ServerConfig, host: ModelHost, metrics: Metrics, executor: ThreadPoolExecutor) -> None:
        self.host, self.metrics, self.executor = host, metrics, executor
        self.admission = Admission(config.max_queue, config.retry_after_s, metrics.queue_depth)

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def answer(self, req: SamplingRequest, encode: Callable[[PrimeModel], Prompt], formatter: type[Formatter],
                     prepare: Callable[[], Awaitable[None]] | None = None, grammar: str | None = None,
                     tools: bool = False) -> dict[str, Any] | HeldStream:
        """The ExitStack holds the queue place and the model; a stream hands it to its
        response (HeldStream), which releases both when the stream ends or the client leaves.
        `prepare` (fetching remote images) runs once the request is admitted, so the queue
        bounds it too, and before the model is pinned, so a slow download holds no model.
        `grammar` (GBNF) constrains the reply; `tools`: read it for tool calls."""
        held = ExitStack()
        try:
            held.enter_context(self.admission())
            if prepare is not None:
                await prepare()
            slot = held.enter_context(self.host.use())
            check_model(req.model, slot)
            prompt = await self.run(lambda: encode(slot.model))
            options = req.sampling_options(len(prompt.ids), slot.model.context_length)
        except BaseException:
            held.close()
            raise
        if grammar is not None:
            options["grammar"] = grammar
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        out = formatter(slot, include_usage, tools=tools)
        if req.stream:
            return HeldStream(self._events(Stream(slot, prompt, options, out, held, req.n)), held)
        results = []
        with held:
            for index in range(req.n):
                decode = lambda: slot.model.complete(prompt, **choice_options(options, index))  # noqa: E731
                results.append(await self.run(decode))
        self._count(results[0].prompt_tokens, sum(r.completion_tokens for r in results))
        return out.completion(results)

    async def _events(self, stream: Stream) -> AsyncIterator[str]:
        start, completion_tokens = time.perf_counter(), 0
        first: list[float] = []  # when the first piece came: one TTFT per request
        try:
            for index in range(stream.n):
                async for event, tokens in self._choice_events(stream, index, start, first):
                    if event:
                        yield event
                    completion_tokens += tokens
            self._count(len(stream.prompt.ids), completion_tokens)
            if stream.formatter.include_usage:
                yield stream.formatter.event(None, usage(len(stream.prompt.ids), completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            stream.held.close()

    async def _choice_events(self, stream: Stream, index: int, start: float,
                             first: list[float]) -> AsyncIterator[tuple[str, int]]:
        """One choice's events, and at the end its completion tokens (counted by the tokenizer)."""
        model, out = stream.slot.model, stream.formatter
        pieces, finish = [], "stop"
        calls = ToolCallStream() if out.tools else None
        if (opening := out.opening(index)) is not None:
            yield out.event(opening), 0
        decode = lambda: model.complete(stream.prompt, stream=True, **choice_options(stream.options, index))  # noqa: E731
        async for chunk in iterate_in_thread(decode, self.executor):
            if (chunk.reasoning or chunk.text) and not first:
                first.append(time.perf_counter())
                self.metrics.ttft.observe(first[0] - start)
            pieces.append(chunk.reasoning + chunk.text)  # usage counts the reasoning too
            if chunk.reasoning:  # a thinking model's piece may carry the end of its reasoning and the answer's start
                yield out.event(out.reasoning_delta(chunk.reasoning, index)), 0
            text = calls.feed(chunk.text) if calls is not None else chunk.text
            if text or chunk.logprobs:
                yield out.event(out.delta(text, index, chunk.logprobs)), 0
            finish = chunk.finish_reason or finish
        if calls is not None:
            rest, found = calls.finish()
            if rest:
                yield out.event(out.delta(rest, index)), 0
            for choice in out.tool_call_deltas(found, index):
                yield out.event(choice), 0
            finish = "tool_calls" if found and finish == "stop" else finish
        tokens = await self.run(lambda: model.count_tokens("".join(pieces)))
        yield out.event(out.closing(finish, index)), tokens

    def _count(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.tokens_in.inc(prompt_tokens)
        self.metrics.tokens_out.inc(completion_tokens)
