"""Batched decoding of concurrent requests on the transformers backend.

`prime serve` on transformers (CUDA, or CPU with `--backend transformers`) would
otherwise decode one request at a time while the others queue. A `Batcher` runs one
worker thread: whatever requests are waiting when it is free become one batch, their
prompts left-padded into one tensor, and each decode step advances every sequence by
one token in a single forward pass (static batching: a request that arrives while a
batch runs joins the next one). Each request keeps its own sampling settings (greedy
or temperature/top-p/top-k with its own seeded generator), stop strings, max tokens
and finish reason, and streams its own `Chunk`s. A consumer that goes away has its row
finished at the next step; the batch ends when every row has.

On llama.cpp, models/llamacpp_batching.py batches continuously (requests join and leave
at token boundaries); why this one stays static is in the serving README.
Each row also does what OpenAI's extras ask (`GenerationParams`): presence/frequency
penalties over the tokens it generated, a GBNF grammar enforced by llguidance (the
grammar's allowed tokens as a bitmask over the logits each step), and each token's
log-probability with the top alternatives, from the raw logits. The transformers
backend decodes a single request that asks for any of these through `decode_one`, this
same loop with one row, since `model.generate` has no grammar and reports no logprobs.
"""

from __future__ import annotations

import inspect
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from jarvis_prime.models.base import DONE, Chunk, GenerationParams, StopStringFilter, TokenLogprob, drain


@dataclass
class _Request:
    prompt_ids: list[int]
    params: GenerationParams
    out: "queue.Queue[object]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """Streams for many callers, decoded together. `lock` is the model's own lock: a batch
    holds it, so scoring or a single-request call never runs on the model concurrently."""

    def __init__(self, backend, lock: threading.Lock, max_batch: int = 8,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.backend, self.lock, self.max_batch, self.on_batch = backend, lock, max_batch, on_batch
        self._pending: "queue.Queue[_Request]" = queue.Queue()
        self.batch_sizes: list[int] = []  # every batch's size, for metrics and tests
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="prime-batcher", daemon=True)
        self._worker.start()

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams) -> Iterator[Chunk]:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        request = _Request(list(prompt_ids), params)
        self._pending.put(request)
        yield from drain(request.out, request.cancelled)

    def close(self) -> None:
        self._closed = True
        self._pending.put(None)  # type: ignore[arg-type]
        self._worker.join(timeout=60)

    def _run(self) -> None:
        while True:
            first = self._pending.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    more = self._pending.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._pending.put(None)  # type: ignore[arg-type]
                    break
                batch.append(more)
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                with self.lock:
                    decode_batch(self.backend, batch)
            except BaseException as err:  # every caller in the batch hears about it
                for request in batch:
                    request.out.put(err)
            for request in batch:
                request.out.put(DONE)


def decode_one(backend, prompt_ids: Sequence[int], params: GenerationParams) -> Iterator[Chunk]:
    """One request through `decode_batch`, in a worker thread, its chunks as they come.
    Closing the iterator early finishes the row at the next step."""
    request = _Request(list(prompt_ids), params)

    def work() -> None:
        try:
            decode_batch(backend, [request])
        except BaseException as err:  # re-raised in the consumer's thread
            request.out.put(err)
        request.out.put(DONE)

    worker = threading.Thread(target=work, name="prime-decode-one", daemon=True)
    worker.start()
    try:
        yield from drain(request.out, request.cancelled)
    finally:
        worker.join()


def grammar_matcher(backend, gbnf: str):
    """An llguidance matcher for `gbnf` over the backend's tokenizer (converted once, ~1 s)."""
    import llguidance
    import llguidance.hf

    if getattr(backend, "_ll_tokenizer", None) is None:
        vocab = backend.model.get_output_embeddings().weight.shape[0]
        backend._ll_tokenizer = llguidance.hf.from_tokenizer(backend.tokenizer, n_vocab=vocab,
                                                             eos_token=sorted(backend.eos_ids))
    try:
        grammar = llguidance.grammar_from("gbnf", gbnf)
    except ValueError as err:
        raise ValueError(f"grammar: {err}") from err
    matcher = llguidance.LLMatcher(backend._ll_tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(f"grammar: {matcher.get_error()}")
    return matcher


def allowed_tokens(matcher, size: int, device) -> torch.Tensor:
    """The matcher's bitmask (32 tokens per int32, lowest bit first) as a bool mask of `size`."""
    import numpy as np

    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    mask = torch.zeros(size, dtype=torch.bool)
    n = min(size, bits.size)
    mask[:n] = torch.from_numpy(bits[:n].astype(bool))
    return mask.to(device)


@torch.inference_mode()
def decode_batch(backend, requests: list[_Request]) -> None:
    """Decode `requests` together until each is finished; chunks go to each request's queue."""
    model, tokenizer = backend.model, backend.tokenizer
    device = model.device
    pad, eos_ids = backend.pad_id, backend.eos_ids
    width = max(len(r.prompt_ids) for r in requests)
    input_ids = torch.full((len(requests), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(requests), width), dtype=torch.long, device=device)
    for row, request in enumerate(requests):  # left padding: every prompt ends at the same column
        input_ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids, device=device)
        mask[row, width - len(request.prompt_ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    rows = [_Row(request, tokenizer, device,
                 grammar_matcher(backend, request.params.grammar) if request.params.grammar else None)
            for request in requests]
    # transformers 5.x renamed past_key_values to cache (argument and output)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = None
    while True:
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_arg: past})
        past = getattr(out, cache_arg)
        logits = out.logits[:, -1, :].float()
        next_ids = torch.full((len(rows),), pad, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            if row.finished:
                continue
            token = row.pick(logits[i])
            next_ids[i] = token
            row.advance(token, eos_ids)
        if all(row.finished for row in rows):
            return
        alive = torch.tensor([0 if row.finished else 1 for row in rows], dtype=torch.long, device=device)
        mask = torch.cat([mask, alive[:, None]], dim=1)
        positions = positions[:, -1:] + 1
        input_ids = next_ids[:, None]


class _Row:
    """One request's decoding state inside a batch."""

    def __init__(self, request: _Request, tokenizer, device, matcher=None) -> None:
        self.request, self.tokenizer, self.params = request, tokenizer, request.params
        self.new_ids: list[int] = []
        self.counts: dict[int, int] = {}  # generated token -> how often (the penalties)
        self.matcher = matcher
        self.raw: torch.Tensor | None = None  # this step's logits before anything changed them (logprobs)
        self.text = ""
        self.stops = StopStringFilter(self.params.stop)
        self.finished = False
        self.generator = None
        if self.params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()

    def shape(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits sampling sees: penalties subtracted (OpenAI: presence once per token
        seen, frequency per time seen), then what the grammar forbids at -inf."""
        p = self.params
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(self.counts), device=logits.device)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits = logits.clone()
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        if self.matcher is not None:
            logits = logits.masked_fill(~allowed_tokens(self.matcher, logits.numel(), logits.device), float("-inf"))
        return logits

    def pick(self, logits: torch.Tensor) -> int:
        p = self.params
        self.raw = logits if p.logprobs is not None else None
        logits = self.shape(logits)
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < p.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def logprob(self, token: int) -> TokenLogprob:
        logprobs = torch.log_softmax(self.raw, dim=-1)
        top = torch.topk(logprobs, self.params.logprobs) if self.params.logprobs else None
        piece = lambda i: self.tokenizer.decode([i])  # noqa: E731
        alternatives = tuple((piece(int(i)), float(v)) for v, i in zip(top.values, top.indices)) if top else ()
        return TokenLogprob(piece(token), float(logprobs[token]), alternatives)

    def advance(self, token: int, eos_ids: set[int]) -> None:
        if self.request.cancelled.is_set():
            self.finished = True
            return
        if token in eos_ids:
            self._finish("stop")
            return
        self.new_ids.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        logprobs = (self.logprob(token),) if self.raw is not None else ()
        if self.matcher is not None:
            self.matcher.consume_token(token)
        text = self.tokenizer.decode(self.new_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            piece = ""
        else:
            piece, self.text = text[len(self.text):], text
        out = self.stops.feed(piece) if piece else ""
        if self.stops.stopped:
            self._finish("stop", out, logprobs)
        elif self.matcher is not None and self.matcher.is_stopped():  # the grammar is complete
            self._finish("stop", out, logprobs)
        elif len(self.new_ids) >= self.params.max_new_tokens:
            self._finish("length", out, logprobs)
        elif out or logprobs:
            self.request.out.put(Chunk(out, logprobs=logprobs))

    def _finish(self, reason: str, text: str = "", logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        self.finished = True
        self.request.out.put(Chunk(text + self.stops.flush(), reason, logprobs=logprobs))  # type: ignore[arg-type]
