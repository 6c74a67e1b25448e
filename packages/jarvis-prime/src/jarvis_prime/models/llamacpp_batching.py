"""Continuous batching on llama.cpp: many requests decoded together in one context.

llama-cpp-python's `Llama` decodes one sequence per context, so `prime serve` on
llama.cpp would answer the eighth client after seven whole replies. `ContinuousBatcher`
opens a second context on the same loaded weights with several sequences (slots), and
one worker thread runs the loop llama.cpp's own server runs:

    every step:  admit waiting requests into free slots (at a token boundary)
                 build ONE llama_batch: each decoding sequence's last sampled token, then
                 prompt chunks of new requests, up to n_batch tokens in all (a long prompt
                 is read over several steps, so the others keep streaming meanwhile)
                 llama_decode -> sample each sequence that has logits, with its own
                 sampler chain (seed, temperature, top-k/p, penalties, grammar)
                 stream what each sequence decoded; finished and abandoned ones leave

A slot keeps its tokens and their KV when its request ends: the next request is put in
the free slot with the longest common prefix (the next turn of the same conversation),
the rest of that slot's KV is removed (`llama_memory_seq_rm`) and only the new tokens are
decoded. A consumer that stops iterating (a client that disconnected) frees its slot at
the next step, so a queued request starts at once.

Each slot has its own KV stream of `n_ctx_per_slot` cells (`kv_unified=False`). With one
shared (unified) cache, the sequences' cells interleave, attention sums the same terms in
another order, and greedy replies drift from the one-at-a-time ones within a few dozen
tokens on the 135M model (measured: 3 of 4 prompts differed by token 32). With a stream
each, every sequence's numbers are those of decoding it alone: greedy tokens are equal.
The price: llama.cpp splits a batch into one ubatch per run of consecutive sequence ids,
so a new request goes to a free slot next to the busy ones (after prefix reuse).

Each step holds the model's lock, so scoring and single-request calls (images) never
run on the weights at the same time.
"""

from __future__ import annotations

import codecs
import ctypes
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import llama_cpp
import numpy as np

from jarvis_prime.models.base import DONE, Chunk, FinishReason, GenerationParams, StopStringFilter, TokenLogprob, drain


@dataclass
class Request:
    """One request as the engine sees it; `stream` reads its chunks from `out`.

    `new_ids` (the sampled tokens, end-of-generation excluded) and `prompt_decoded` (the
    prompt tokens that had to be decoded, the reused prefix excluded) are for callers
    that check what the engine did (tests, metrics)."""

    prompt_ids: list[int]
    params: GenerationParams
    out: "queue.Queue[object]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    new_ids: list[int] = field(default_factory=list)
    prompt_decoded: int = 0

    def chunks(self) -> Iterator[Chunk]:
        """The request's chunks as decoded; closing this iterator abandons the request."""
        return drain(self.out, self.cancelled)


class _Slot:
    """One sequence of the context: the tokens whose KV it holds, and the request on it."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.tokens: list[int] = []  # exactly the tokens in this sequence's KV, position = index
        self.request: Request | None = None
        self.pending: list[int] = []  # tokens still to decode: prompt rest, or the last sampled token
        self.sampler = None
        self.stops: StopStringFilter | None = None
        self.utf8 = None
        self.logprobs: list[TokenLogprob] = []  # decoded since the last chunk was sent
        self.last_used = 0
        self.admitted = 0  # admission order: older prompts get the step's budget first


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ContinuousBatcher:
    """`stream(prompt_ids, params)` from any number of threads; decoded together.

    `llm` is the backend's `llama_cpp.Llama` (its weights and vocabulary are shared; its
    own context stays for single calls). `lock` is the model's lock, held per step.
    `on_batch(n)` hears how many sequences each step sampled (nothing is kept here: a
    server runs millions of steps)."""

    def __init__(self, llm, lock: threading.Lock, slots: int = 8, n_ctx_per_slot: int = 4096,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.lock, self.on_batch, self.n_ctx_per_slot = lock, on_batch, n_ctx_per_slot
        self._vocab = llm._model.vocab
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_seq_max = slots
        params.n_ctx = slots * n_ctx_per_slot
        params.kv_unified = False  # a KV stream per sequence: the same numbers as decoding it alone
        self._ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {slots} x {n_ctx_per_slot} tokens")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._slots = [_Slot(i) for i in range(slots)]
        self._waiting: "queue.Queue[Request | None]" = queue.Queue()
        self._releases = 0
        self._order = 0
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="prime-llamacpp-batcher", daemon=True)
        self._worker.start()

    # -- callers' side --------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: GenerationParams) -> Request:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed to decode from")
        if len(prompt_ids) >= self.n_ctx_per_slot:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; a sequence holds at most "
                             f"{self.n_ctx_per_slot} (context_length)")
        request = Request(list(prompt_ids), params)
        llama_cpp.llama_sampler_free(self._sampler(params))  # a bad grammar fails here, in the caller's thread
        self._waiting.put(request)
        return request

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams) -> Iterator[Chunk]:
        return self.submit(prompt_ids, params).chunks()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._waiting.put(None)
        self._worker.join(timeout=60)
        for slot in self._slots:
            self._free_sampler(slot)
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)

    # -- sampling ---------------------------------------------------------------------------

    def _sampler(self, p: GenerationParams):
        """The request's own llama.cpp sampler chain. Order: grammar (what may come next),
        penalties (fed only this request's sampled tokens: the completion, as OpenAI
        counts), then greedy, or top-k, top-p, temperature and a seeded draw."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731 (the chain owns s)
        if p.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, p.grammar.encode("utf-8"), b"root")
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise ValueError("`grammar` is not a valid GBNF grammar with a `root` rule (llama.cpp refused it)")
            add(grammar)
        if p.presence_penalty or p.frequency_penalty:
            last_n = p.max_new_tokens  # every generated token counts
            # llama-cpp-python 0.3.36 declares a leading n_vocab the C function no longer has;
            # passing last_n in both places makes either reading the same
            add(llama_cpp.llama_sampler_init_penalties(last_n, last_n, 1.0, p.frequency_penalty, p.presence_penalty))
        if p.temperature == 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if p.top_k:
                add(llama_cpp.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            add(llama_cpp.llama_sampler_init_temp(p.temperature))
            add(llama_cpp.llama_sampler_init_dist(llama_cpp.LLAMA_DEFAULT_SEED if p.seed is None else p.seed))
        return chain

    @staticmethod
    def _free_sampler(slot: _Slot) -> None:
        if slot.sampler is not None:
            llama_cpp.llama_sampler_free(slot.sampler)
            slot.sampler = None

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        if n < 0:  # longer than the buffer: -n bytes
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def _logprob(self, index: int, token: int, k: int) -> TokenLogprob:
        """`token`'s log-probability under the raw logits of batch row `index` (before any
        sampler), and the `k` most likely tokens."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))
        return TokenLogprob.from_logits(logits, token, k, lambda t: self._piece(t).decode("utf-8", errors="replace"))

    # -- the worker -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            active = [s for s in self._slots if s.request is not None]
            if not self._admit(block=not active):
                return
            active = [s for s in self._slots if s.request is not None]
            for slot in active:
                if slot.request.cancelled.is_set():
                    self._release(slot)
            active = [s for s in self._slots if s.request is not None]
            if not active:
                continue
            try:
                self._step(active)
            except Exception as err:  # noqa: BLE001  (every caller of the step hears it; the worker goes on)
                self._fail([s for s in active if s.request is not None], err)

    def _admit(self, block: bool) -> bool:
        """Move waiting requests into free slots; False once closed."""
        while True:
            free = [s for s in self._slots if s.request is None]
            if not free:
                return True
            try:
                request = self._waiting.get(block=block)
            except queue.Empty:
                return True
            if request is None:
                self._fail_all(RuntimeError("the batcher is closed"))
                return False
            block = False
            if request.cancelled.is_set():
                continue
            self._place(request, free)

    def _place(self, request: Request, free: list[_Slot]) -> None:
        """Put `request` in the free slot sharing its longest prefix (ties: one next to a busy
        slot, so batches stay one run of sequence ids; then the least recently used); drop
        the rest of that slot's KV. The last prompt token is always decoded again, for its logits."""
        busy = {s.seq_id for s in self._slots if s.request is not None}

        def score(s: _Slot) -> tuple[int, bool, int]:
            return common_prefix(s.tokens, request.prompt_ids), bool(busy & {s.seq_id - 1, s.seq_id + 1}), -s.last_used

        slot = max(free, key=score)
        keep = min(common_prefix(slot.tokens, request.prompt_ids), len(request.prompt_ids) - 1)
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1)
        slot.tokens = slot.tokens[:keep]
        slot.pending = request.prompt_ids[keep:]
        request.prompt_decoded = len(slot.pending)
        slot.request = request
        slot.sampler = self._sampler(request.params)
        slot.stops = StopStringFilter(request.params.stop)
        slot.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.logprobs = []
        self._order += 1
        slot.admitted = self._order

    def _step(self, active: list[_Slot]) -> None:
        """One llama_decode over every active sequence, then one sampled token each.

        Budget: n_batch tokens. Every decoding sequence's one token first, then prompt
        chunks, oldest request first. Tokens go into the batch in sequence-id order."""
        budget = self.n_batch - sum(len(s.pending) == 1 for s in active)
        take: dict[int, int] = {}
        for slot in sorted(active, key=lambda s: s.admitted):
            if len(slot.pending) == 1:
                take[slot.seq_id] = 1
            elif budget > 0:
                take[slot.seq_id] = min(len(slot.pending), budget)
                budget -= take[slot.seq_id]
        batch, rows, n = self._batch, [], 0
        for slot in active:  # seq-id order
            count = take.get(slot.seq_id, 0)
            if not count:
                continue
            tokens, slot.pending = slot.pending[:count], slot.pending[count:]
            for j, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = len(slot.tokens) + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = 0
                n += 1
            slot.tokens.extend(tokens)
            if not slot.pending:  # its whole input is in: sample from its last row
                batch.logits[n - 1] = 1
                rows.append((slot, n - 1))
        batch.n_tokens = n
        with self.lock:
            status = llama_cpp.llama_decode(self._ctx, batch)
            if status != 0:
                self._fail(active, RuntimeError(f"llama_decode failed with status {status} on a batch of {n} tokens "
                                                f"({len(active)} sequences; 1 means the KV cache is full)"))
                return
            if self.on_batch is not None and rows:  # sequences sampled in this step (a server's metric)
                self.on_batch(len(rows))
            for slot, index in rows:
                self._advance(slot, index)

    def _advance(self, slot: _Slot, index: int) -> None:
        request, p = slot.request, slot.request.params
        token = llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, index)  # also accepts it
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):  # ends the reply, is not part of it
            self._finish(slot, "stop")
            return
        if p.logprobs is not None:
            slot.logprobs.append(self._logprob(index, token, p.logprobs))
        request.new_ids.append(token)
        out = slot.stops.feed(slot.utf8.decode(self._piece(token)))
        if out:
            request.out.put(Chunk(out, logprobs=tuple(slot.logprobs)))
            slot.logprobs = []
        if slot.stops.stopped:
            self._finish(slot, "stop")
        elif len(request.new_ids) >= p.max_new_tokens or len(slot.tokens) + 1 >= self.n_ctx_per_slot:
            self._finish(slot, "length")
        else:
            slot.pending = [token]

    def _finish(self, slot: _Slot, reason: FinishReason) -> None:
        text = slot.stops.feed(slot.utf8.decode(b"", final=True)) + slot.stops.flush()
        slot.request.out.put(Chunk(text, reason, logprobs=tuple(slot.logprobs)))
        self._release(slot)

    def _release(self, slot: _Slot) -> None:
        """The request leaves; the slot keeps its tokens' KV for a next turn."""
        if slot.request is not None:
            slot.request.out.put(DONE)
        self._free_sampler(slot)
        slot.request, slot.pending, slot.logprobs = None, [], []
        self._releases += 1
        slot.last_used = self._releases

    def _fail(self, slots: list[_Slot], error: BaseException) -> None:
        for slot in slots:
            slot.request.out.put(error)
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            slot.tokens = []
            self._release(slot)

    def _fail_all(self, error: BaseException) -> None:
        self._fail([s for s in self._slots if s.request is not None], error)
        while True:
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.out.put(error)
                request.out.put(DONE)
