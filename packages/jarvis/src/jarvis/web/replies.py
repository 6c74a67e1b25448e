"""Reply streams: server-sent events, one JSON object per `data:` line ({"delta": text}
pieces, then {"done": true, "reply_id": N, "conversation": id} or {"error": message}).
A thinking model's reasoning comes first as {"thinking": text} pieces (the page folds them), and
each tool call as {"tool": {id, name, arguments, result, error}} when it is answered.

One reply at a time per conversation (a second tab gets 409, not a tangle), and at
most `max_queue` replies in progress (streaming or waiting for a worker thread) in all:
past that, 429 with Retry-After (prime's `Admission`). Each
reply keeps the model it started on until it ends, so a model swap never cuts one
off, and the old model is closed only after its last reply.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any, AsyncIterator, Callable, Iterator


from jarvis.chatbots import Chatbot, Thought, ToolUse
from jarvis_prime import PrimeError
from jarvis_prime.models.prime_model import iterate_in_thread
from jarvis_prime.serving.completions import Admission, HeldStream
from jarvis_prime.serving.errors import APIError
from jarvis_prime.serving.host import ModelHost

Start = Callable[[Any], tuple[Chatbot, Iterator[str]]]  # the model -> the chatbot and its reply's pieces


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class Replies:
    def __init__(self, host: ModelHost, executor: ThreadPoolExecutor, admission: Admission) -> None:
        self.host, self.executor, self.admission = host, executor, admission
        self._writing: set[str] = set()  # conversations with a reply being written
        self._lock = threading.Lock()

    @contextmanager
    def _writing_in(self, cid: str) -> Iterator[None]:
        with self._lock:
            if cid in self._writing:
                raise APIError(409, f"a reply is already being written in conversation {cid}")
            self._writing.add(cid)
        try:
            yield
        finally:
            self._writing.discard(cid)

    def stream(self, cid: str, start: Start) -> HeldStream:
        """Errors before the first byte (unknown id, too long, no model) are plain 4xx/5xx."""
        held = ExitStack()
        try:
            held.enter_context(self.admission())  # beyond max_queue replies in progress: 429, Retry-After
            held.enter_context(self._writing_in(cid))
            slot = held.enter_context(self.host.use())
            chatbot, pieces = start(slot.model)
        except BaseException:
            held.close()
            raise
        return HeldStream(self._events(chatbot, pieces, held), held)  # released even if the client leaves first

    async def _events(self, chatbot: Chatbot, pieces: Iterator[str], held: ExitStack) -> AsyncIterator[str]:
        try:
            try:
                async for piece in iterate_in_thread(lambda: pieces, self.executor):
                    if isinstance(piece, ToolUse):
                        yield _event({"tool": piece.result.as_json()})
                    else:
                        yield _event({"thinking": piece} if isinstance(piece, Thought) else {"delta": piece})
            finally:
                held.close()  # before the last event: a client that reads it may send the next message at once
            yield _event({"done": True, "reply_id": chatbot.last_reply_id, "conversation": chatbot.conversation})
        except (PrimeError, ValueError) as err:
            yield _event({"error": str(err)})
