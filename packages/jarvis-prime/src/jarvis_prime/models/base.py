"""What every backend shares: generation parameters, results, and the backend protocol."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings, identical in meaning on every backend.

    temperature == 0 is greedy decoding. top_k == 0 and top_p == 1.0 disable those
    filters. `stop` strings end the reply and are not part of it.

    The OpenAI API's extras, as OpenAI defines them: `presence_penalty` subtracts a flat
    amount from the logit of every token already generated, `frequency_penalty` that
    amount times how often it was generated (both over the completion only, -2..2, 0 off).
    `grammar` (GBNF, llama.cpp's grammar language) constrains decoding so the reply always
    matches it (response_format). `logprobs`: None reports none; k >= 0 reports each
    generated token's log-probability and the k most likely alternatives (OpenAI's
    `top_logprobs`, at most 20), from the model's distribution before sampling filters.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: str | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"`temperature` must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0, got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"`stop` must be non-empty strings, got {list(self.stop)}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"`{name}` must be in [-2, 2], got {getattr(self, name)}")
        if self.grammar is not None and not self.grammar.strip():
            raise ValueError("`grammar` must be a non-empty GBNF grammar or None")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"`logprobs` (top alternatives) must be in [0, 20], got {self.logprobs}")

    @property
    def asks_extras(self) -> bool:
        """Whether OpenAI's extras are asked for (penalties, a grammar, logprobs): what
        transformers' `generate` cannot do, so that backend decodes such a request in its
        batcher's loop (models/batching.py), which takes text prompts only."""
        return bool(self.presence_penalty or self.frequency_penalty or self.grammar is not None
                    or self.logprobs is not None)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its
    position (`GenerationParams.logprobs` of them, most likely first), as OpenAI reports them."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_logits(cls, logits: Any, token: int, top: int, piece: Callable[[int], str]) -> "TokenLogprob":
        """From one position's raw logits (a numpy array over the vocabulary, before any
        sampler): the log-softmax at `token` and the `top` most likely tokens, spelt by `piece`.
        Both llama.cpp paths (one request, continuous batching) read their logits this way."""
        import numpy as np

        logits = np.asarray(logits, dtype=np.float64)
        peak = logits.max()
        logz = peak + np.log(np.exp(logits - peak).sum())  # log-softmax: logits - logz
        best = np.argpartition(-logits, top)[:top] if top else np.array([], dtype=int)
        best = best[np.argsort(-logits[best])]
        return cls(piece(token), float(logits[token] - logz), tuple((piece(int(t)), float(logits[t] - logz)) for t in best))


@dataclass(frozen=True)
class Generation:
    """A finished generation, with usage counted in the model's own tokens.

    A thinking model's chat reply (`jarvis_prime.thinking`) comes split: `text` is the
    answer, `reasoning` what the model thought first (None: it did not think). A reply cut
    off while thinking has `reasoning`, an empty `text` and finish_reason "length"."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # when GenerationParams.logprobs asked for them


@dataclass(frozen=True)
class Chunk:
    """One streamed piece; `finish_reason` is set on the last one. A thinking model's
    pieces carry its reasoning in `reasoning` and the answer in `text`, as they come."""

    text: str
    finish_reason: FinishReason | None = None
    reasoning: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens this piece was decoded from, when asked for


def collect(chunks: Sequence[Chunk], logprobs: bool) -> tuple[str, FinishReason, tuple[TokenLogprob, ...] | None]:
    """A whole reply read off its streamed `chunks`: the text, the finish reason (the last
    chunk's), and every token's `TokenLogprob` when they were asked for (else None), for
    a backend that decodes by streaming to answer `generate` with a `Generation`."""
    text = "".join(c.text for c in chunks)
    return text, chunks[-1].finish_reason or "stop", tuple(lp for c in chunks for lp in c.logprobs) if logprobs else None


class Backend(Protocol):
    """A loaded model that turns token ids into text. Not thread-safe: callers hold a lock.

    A backend that sees images also has `sees_images` (True), `image_part` (what an image
    part becomes before the chat template), `tokenize_media(media)`, and takes
    `media=` in `generate` and `stream` (see `models/content.py` and `models/mtmd.py`).
    """

    name: str
    bos_token: str
    eos_token: str

    def tokenize(self, text: str, add_special: bool) -> list[int]: ...

    def generate(self, prompt_ids: Sequence[int], params: GenerationParams) -> Generation: ...

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams) -> Iterator[Chunk]: ...

    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1: what perplexity is made of."""
        ...

    def close(self) -> None: ...


DONE = object()  # what a decoding thread puts on a request's queue after its last chunk


def drain(out: "queue.Queue[object]", cancelled: threading.Event) -> Iterator[Chunk]:
    """A request's chunks as a decoding thread (a batcher's worker) puts them on `out`, up to
    `DONE`; an exception put there is raised in the consumer's thread. Leaving the loop early
    (the consumer stops iterating, a client disconnects) sets `cancelled`, so the worker
    drops the request at its next step instead of decoding for nobody."""
    try:
        while (item := out.get()) is not DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cut = min((i for s in stop if (i := text.find(s)) != -1), default=-1)
    return (text[:cut], True) if cut != -1 else (text, False)


class StopStringFilter:
    """Streams text while holding back what could still become a stop string.

    feed("Hello wor") with stop ["world"] emits "Hello " and keeps "wor" until the next
    piece decides; once a stop string appears everything from it on is dropped.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(stop)
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self._buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self._buffer += piece
        text, self.stopped = cut_at_stop(self._buffer, self.stop)
        if self.stopped:
            self._buffer = ""
            return text
        safe = len(self._buffer) - self._holdback
        out, self._buffer = self._buffer[:max(safe, 0)], self._buffer[max(safe, 0):]
        return out

    def flush(self) -> str:
        out, self._buffer = ("" if self.stopped else self._buffer), ""
        return out
