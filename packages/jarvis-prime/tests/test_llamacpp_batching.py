"""Continuous batching on llama.cpp (models/llamacpp_batching.py), on the real SmolLM2 Q4_1 GGUF.

The reference everywhere is llama.cpp decoding one sequence alone in the backend's own
context (`greedy_alone`), or the serialised `complete` path the server used before."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from jarvis_prime import PrimeModel
from jarvis_prime.models.base import GenerationParams
from jarvis_prime.models.llamacpp_batching import common_prefix
from jarvis_prime.serving.settings import ServerConfig

pytestmark = pytest.mark.real_model
BASE = "smollm2-135m-instruct"
CONTEXT = 1024
LONG = "Here is a list of things to remember: " + ", ".join(f"item {i} is a {w}" for i, w in
                                                              zip(range(90), ["cat", "boat", "tree", "lamp"] * 30))
QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about the sea, please, and make it a calm and quiet one.",
    "Name three colours.",
    LONG + ". Which item is the first cat?",  # over n_batch (512) tokens: read in two steps
]


@pytest.fixture(scope="module")
def alone(pulled_model):
    """The same GGUF without batching: one request at a time in llama-cpp-python's own context."""
    model = PrimeModel.from_pretrained(BASE, backend="llamacpp", context_length=CONTEXT)
    yield model
    model.close()


@pytest.fixture(scope="module")
def batched(pulled_model):
    model = PrimeModel.from_pretrained(BASE, backend="llamacpp", context_length=CONTEXT)
    sizes: list[int] = []
    assert model.enable_batching(max_batch=4, on_batch=sizes.append)
    model.batch_sizes = sizes  # sequences sampled per step
    yield model
    model.close()


def chat_ids(model: PrimeModel, question: str) -> list[int]:
    return model.encode_chat([{"role": "user", "content": question}]).ids


def greedy_alone(model: PrimeModel, ids: list[int], max_new_tokens: int, reuse: bool = False) -> list[int]:
    """Greedy token ids from llama.cpp decoding this one sequence alone (argmax of the last logits).

    `reuse`: keep the KV of the longest prefix shared with the previous call's tokens and
    decode the rest only, as llama-cpp-python's `Llama.generate` does."""
    import llama_cpp

    llm = model._backend._llm
    keep = 0
    if reuse:
        keep = min(common_prefix(llm._input_ids[: llm.n_tokens].tolist(), ids), len(ids) - 1)
    llm.n_tokens = keep  # eval removes the KV from here on
    llm.eval(ids[keep:])
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        out.append(token)
        llm.eval([token])
    return out


def test_concurrent_greedy_equals_one_at_a_time(alone, batched):
    """Four prompts of different lengths (one over n_batch) decoded together give, token for
    token, what each gives alone: every sequence has its own KV stream."""
    engine = batched._batcher
    prompts = [chat_ids(batched, q) for q in QUESTIONS]
    assert len(prompts[-1]) > engine.n_batch
    expected = [greedy_alone(alone, ids, 24) for ids in prompts]
    before = len(batched.batch_sizes)
    requests = [engine.submit(ids, GenerationParams(max_new_tokens=24)) for ids in prompts]
    texts = ["".join(c.text for c in r.chunks()) for r in requests]
    assert max(batched.batch_sizes[before:]) >= 3, "the requests were decoded together"
    for request, ids, text in zip(requests, expected, texts):
        assert request.new_ids == ids
        assert text == alone._backend._llm.detokenize(ids).decode("utf-8")


def test_a_request_joins_a_running_one_at_a_token_boundary(alone, batched):
    """The second request arrives while the first is mid-reply (the test holds the model's
    lock, which every step takes, so the first cannot run ahead meanwhile); both are then
    decoded in the same steps, and neither reply changes."""
    engine = batched._batcher
    first_ids, second_ids = chat_ids(batched, "Write a long story about a dragon."), chat_ids(batched, "Say hello.")
    expected = greedy_alone(alone, first_ids, 60)
    assert len(expected) == 60, "the reference reply runs to its limit"
    first = engine.submit(first_ids, GenerationParams(max_new_tokens=60))
    chunks = first.chunks()
    head = next(chunks).text
    with batched._lock:
        assert 0 < len(first.new_ids) < 60
        before = len(batched.batch_sizes)
        second = engine.submit(second_ids, GenerationParams(max_new_tokens=12))
    second_text = "".join(c.text for c in second.chunks())
    rest = "".join(c.text for c in chunks)
    assert 2 in batched.batch_sizes[before:], "the two were decoded in the same steps"
    assert first.new_ids == expected
    assert second.new_ids == greedy_alone(alone, second_ids, 12)
    assert head + rest == alone._backend._llm.detokenize(expected).decode("utf-8")
    assert second_text == alone._backend._llm.detokenize(second.new_ids).decode("utf-8")


def test_a_cancelled_stream_frees_its_slot_for_the_next_request(batched):
    """One slot: a request waits behind a long one, and starts once its consumer closes the
    stream (a client that hung up), long before the long one's 300 tokens."""
    engine = batched._backend.batcher(batched._lock, 1, CONTEXT)
    try:
        long = engine.submit(chat_ids(batched, "Write a long story about a dragon."), GenerationParams(max_new_tokens=300))
        chunks = long.chunks()
        next(chunks)
        waiting = engine.submit(chat_ids(batched, "Say hello."), GenerationParams(max_new_tokens=8))
        assert waiting.new_ids == [], "one slot: the second request waits"
        chunks.close()
        answer = list(waiting.chunks())
        assert answer[-1].finish_reason in ("stop", "length") and waiting.new_ids
        assert len(long.new_ids) < 300, f"the abandoned request went on for {len(long.new_ids)} tokens"
    finally:
        engine.close()


def test_an_error_in_a_step_reaches_its_callers_and_the_engine_goes_on(batched, monkeypatch):
    engine = batched._backend.batcher(batched._lock, 2, CONTEXT)
    try:
        advance = engine._advance

        def broken(slot, index):
            raise RuntimeError("sampling broke")

        monkeypatch.setattr(engine, "_advance", broken)
        with pytest.raises(RuntimeError, match="sampling broke"):
            list(engine.stream(chat_ids(batched, "Say hello."), GenerationParams(max_new_tokens=4)))
        monkeypatch.setattr(engine, "_advance", advance)
        after = engine.submit(chat_ids(batched, "Say hello."), GenerationParams(max_new_tokens=4))
        assert list(after.chunks())[-1].finish_reason in ("stop", "length") and after.new_ids
    finally:
        engine.close()


def test_the_next_turn_decodes_only_its_new_tokens(alone, batched):
    """A conversation's second turn lands in the slot that holds the first, whose KV is reused:
    only the tokens after the common prefix are decoded."""
    engine = batched._batcher
    turn = [{"role": "user", "content": "What is the capital of France?"}]
    greedy_alone(alone, batched.encode_chat(turn).ids, 16)
    first = engine.submit(batched.encode_chat(turn).ids, GenerationParams(max_new_tokens=16))
    chunks = list(first.chunks())
    reply, finish = "".join(c.text for c in chunks), chunks[-1].finish_reason
    second_ids = batched.encode_chat(turn + [{"role": "assistant", "content": reply},
                                             {"role": "user", "content": "And of Spain?"}]).ids
    second = engine.submit(second_ids, GenerationParams(max_new_tokens=16))
    list(second.chunks())
    # the slot's KV: the prompt and the reply, but for a last token sampled at the length limit
    in_kv = first.prompt_ids + (first.new_ids[:-1] if finish == "length" else first.new_ids)
    shared = common_prefix(in_kv, second_ids)
    assert shared > len(first.prompt_ids), "the reply's tokens are part of the reused prefix"
    assert second.prompt_decoded == len(second_ids) - shared
    # a reused prefix was decoded token by token when it was generated: the reply is the one
    # llama.cpp gives with the same KV (its own prefix reuse), not a cold read of the whole prompt
    assert second.new_ids == greedy_alone(alone, second_ids, 16, reuse=True)


def test_a_seeded_sample_does_not_depend_on_its_batch_mates(batched):
    engine = batched._batcher
    ids = chat_ids(batched, "Tell me a fact about the moon.")
    sampled = GenerationParams(max_new_tokens=20, temperature=0.9, top_p=0.95, top_k=40, seed=7)
    solo = engine.submit(ids, sampled)
    list(solo.chunks())
    others = [engine.submit(chat_ids(batched, q), GenerationParams(max_new_tokens=20)) for q in QUESTIONS[:2]]
    again = engine.submit(ids, sampled)
    other_seed = engine.submit(ids, GenerationParams(max_new_tokens=20, temperature=0.9, top_p=0.95, top_k=40, seed=8))
    for request in [*others, again, other_seed]:
        list(request.chunks())
    assert again.new_ids == solo.new_ids
    assert other_seed.new_ids != solo.new_ids


def test_grammar_penalties_and_logprobs_per_request(batched):
    engine = batched._batcher
    ids = chat_ids(batched, "Is the sky blue? Answer yes or no.")
    constrained = engine.submit(ids, GenerationParams(max_new_tokens=10, grammar='root ::= "yes" | "no"'))
    assert "".join(c.text for c in constrained.chunks()) in ("yes", "no")

    repeat = chat_ids(batched, "Repeat the word hello twenty times.")
    plain = engine.submit(repeat, GenerationParams(max_new_tokens=30))
    penalised = engine.submit(repeat, GenerationParams(max_new_tokens=30, frequency_penalty=2.0, presence_penalty=1.0))
    list(plain.chunks()), list(penalised.chunks())
    # over the completion only: the prompt's own "hello" is not penalised, so the first token is the same
    assert penalised.new_ids[0] == plain.new_ids[0]
    assert max(Counter(penalised.new_ids).values()) < max(Counter(plain.new_ids).values())

    scored = engine.submit(chat_ids(batched, "Name a colour."), GenerationParams(max_new_tokens=8, logprobs=3))
    chunks = list(scored.chunks())
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token for lp in logprobs] == [
        batched._backend._llm.detokenize([t]).decode("utf-8", errors="replace") for t in scored.new_ids]
    for lp in logprobs:
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.token == lp.top[0][0]  # greedy: the most likely
        assert sum(np.exp(p) for _, p in lp.top) <= 1.0 + 1e-9


def test_a_bad_grammar_or_prompt_is_refused_in_the_callers_thread(batched):
    engine = batched._batcher
    with pytest.raises(ValueError, match="grammar"):
        engine.submit([1, 2, 3], GenerationParams(grammar="root ::= (("))
    with pytest.raises(ValueError, match=f"at most {CONTEXT}"):
        engine.submit([1] * CONTEXT, GenerationParams())
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], GenerationParams())


def test_prime_serve_streams_concurrent_openai_clients_on_llamacpp(alone, pulled_model):
    """Four streaming clients of the official openai client against `prime serve` on llama.cpp:
    each gets the reply the model gives alone, decoded together."""
    from test_server import running

    questions = QUESTIONS[:3] + ["How many legs does a spider have?"]
    expected = []
    for question in questions:  # each read cold: llama-cpp-python would reuse the previous prompt's KV
        alone._backend._llm.reset()
        expected.append(alone.chat([{"role": "user", "content": question}], max_new_tokens=16))
    with running(ServerConfig(model=BASE, backend="llamacpp", context_length=CONTEXT)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        start = threading.Barrier(len(questions))

        def ask(question: str) -> str:
            start.wait()
            stream = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": question}],
                                                    max_tokens=16, temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with ThreadPoolExecutor(len(questions)) as pool:
            answers = list(pool.map(ask, questions))
        import urllib.request

        with urllib.request.urlopen(f"{url}/metrics") as r:
            metrics = r.read().decode()
    assert answers == expected
    steps = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("prime_batch_size_count")))
    tokens = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("prime_batch_size_sum")))
    assert tokens > steps, f"{tokens:.0f} sampled tokens in {steps:.0f} steps: never more than one per step"
