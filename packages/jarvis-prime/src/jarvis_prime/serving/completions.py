"""Answering a completion request: admit it, pin the current model, encode the prompt,
then reply in one piece or as a stream of server-sent events.

Generation runs in the server's thread pool, so the event loop never blocks. Requests
admitted beyond those generating wait; beyond `max_queue` the answer is 429 with
Retry-After, so a burst queues a bounded amount of work instead of timing out.
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


def check_model(requested: str | None, slot: Slot) -> None:
    if requested and requested != slot.name:
        raise APIError(404, f"model {requested!r} is not served here; this server serves {slot.name!r}",
                       param="model", code="model_not_found")


class Completions:
    def __init__(self, config: ServerConfig, host: ModelHost, metrics: Metrics, executor: ThreadPoolExecutor) -> None:
        self.host, self.metrics, self.executor = host, metrics, executor
        self.admission = Admission(config.max_queue, config.retry_after_s, metrics.queue_depth)

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def answer(self, req: SamplingRequest, encode: Callable[[PrimeModel], Prompt], formatter: type[Formatter],
                     prepare: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any] | HeldStream:
        """The ExitStack holds the queue place and the model; a stream hands it to its
        response (HeldStream), which releases both when the stream ends or the client leaves.
        `prepare` (fetching remote images) runs once the request is admitted, so the queue
        bounds it too, and before the model is pinned, so a slow download holds no model."""
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
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        out = formatter(slot, include_usage)
        if req.stream:
            return HeldStream(self._events(Stream(slot, prompt, options, out, held)), held)
        with held:
            result = await self.run(lambda: slot.model.complete(prompt, **options))
        self._count(result.prompt_tokens, result.completion_tokens)
        return out.completion(result)

    async def _events(self, stream: Stream) -> AsyncIterator[str]:
        model, out = stream.slot.model, stream.formatter
        start, pieces, finish = time.perf_counter(), [], "stop"
        try:
            if (opening := out.opening()) is not None:
                yield out.event(opening)
            decode = lambda: model.complete(stream.prompt, stream=True, **stream.options)  # noqa: E731
            async for chunk in iterate_in_thread(decode, self.executor):
                for text, choice in ((chunk.reasoning, out.reasoning_delta), (chunk.text, out.delta)):
                    if text:  # a thinking model's piece may carry the end of its reasoning and the answer's start
                        if not pieces:
                            self.metrics.ttft.observe(time.perf_counter() - start)
                        pieces.append(text)
                        yield out.event(choice(text))
                finish = chunk.finish_reason or finish
            completion_tokens = await self.run(lambda: model.count_tokens("".join(pieces)))
            yield out.event(out.closing(finish))
            self._count(len(stream.prompt.ids), completion_tokens)
            if out.include_usage:
                yield out.event(None, usage(len(stream.prompt.ids), completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            stream.held.close()

    def _count(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.tokens_in.inc(prompt_tokens)
        self.metrics.tokens_out.inc(completion_tokens)
