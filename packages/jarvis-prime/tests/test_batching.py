"""Concurrent requests decoded together on the transformers backend (models/batching.py)."""

import json
import threading

import pytest

from jarvis_prime import PrimeModel

pytestmark = pytest.mark.real_model

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea, please, and make it a calm and quiet one.",
    "Name three colours.",
    "How many legs does a spider have?",
]


@pytest.fixture(scope="module")
def batched(pulled_model):
    model = PrimeModel.from_pretrained("smollm2-135m-instruct", backend="transformers")
    sizes = []
    assert model.enable_batching(max_batch=8, on_batch=sizes.append)
    model.batch_sizes = sizes
    yield model
    model.close()


def ask_together(model, prompts, **options):
    """Every prompt from its own thread, released at once, as a server's clients would."""
    answers = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def ask(i):
        start.wait()
        answers[i] = model.complete(model.encode_chat([{"role": "user", "content": prompts[i]}]), **options)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_batched_greedy_equals_one_at_a_time(batched, hf_model):
    """Left padding with the right position ids and mask changes nothing: each reply is
    the one the same model gives alone."""
    alone = [hf_model.complete(hf_model.encode_chat([{"role": "user", "content": p}]), max_new_tokens=24) for p in PROMPTS]
    before = len(batched.batch_sizes)
    together = ask_together(batched, PROMPTS, max_new_tokens=24)
    assert max(batched.batch_sizes[before:]) > 1, "the requests were decoded together"
    for one, many in zip(alone, together):
        assert many.text == one.text
        assert many.finish_reason == one.finish_reason


def test_each_request_keeps_its_own_settings(batched):
    prompts = ["Count from one to twenty in words.", "Count from one to twenty in words.", "Say hello."]
    before = len(batched.batch_sizes)
    answers = [None] * 3
    start = threading.Barrier(3)
    settings = [dict(max_new_tokens=5), dict(max_new_tokens=40, stop=["five"]), dict(max_new_tokens=30, temperature=0.9, seed=7)]

    def ask(i):
        start.wait()
        answers[i] = batched.complete(batched.encode_chat([{"role": "user", "content": prompts[i]}]), **settings[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(batched.batch_sizes[before:]) > 1
    assert answers[0].finish_reason == "length" and answers[0].completion_tokens <= 6
    assert "five" not in answers[1].text.lower() and answers[1].finish_reason == "stop"
    again = batched.complete(batched.encode_chat([{"role": "user", "content": prompts[2]}]), **settings[2])
    assert again.text == answers[2].text, "a seeded sample does not depend on its batch-mates"


def test_grammar_logprobs_and_penalties_hold_inside_a_batch(batched, hf_model):
    """OpenAI's extras per row (models/batching.py): a grammar row, a logprobs row and a
    penalised row decoded together each give what the same request gives alone (the
    unbatched transformers backend runs one row through the same loop: `decode_one`)."""
    from jarvis_prime.models.grammar import json_schema_gbnf

    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}}, "required": ["answer"]}
    settings = [dict(max_new_tokens=40, grammar=json_schema_gbnf(schema)), dict(max_new_tokens=12, logprobs=2),
                dict(max_new_tokens=30, frequency_penalty=2.0, presence_penalty=0.5)]
    prompts = ["What is the capital of France?", "Name three colours.", "Count from one to twenty in words."]
    alone = [hf_model.complete(hf_model.encode_chat([{"role": "user", "content": p}]), **o)
             for p, o in zip(prompts, settings)]
    before = len(batched.batch_sizes)
    answers = [None] * 3
    start = threading.Barrier(3)

    def ask(i):
        start.wait()
        answers[i] = batched.complete(batched.encode_chat([{"role": "user", "content": prompts[i]}]), **settings[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(batched.batch_sizes[before:]) > 1
    assert [a.text for a in answers] == [a.text for a in alone]
    assert json.loads(answers[0].text)["answer"] and answers[0].finish_reason == "stop"
    assert [t.token for t in answers[1].logprobs] == [t.token for t in alone[1].logprobs]
    assert [t.logprob for t in answers[1].logprobs] == pytest.approx([t.logprob for t in alone[1].logprobs], abs=1e-3)
    assert all(len(t.top) == 2 and t.top[0][0] == t.token for t in answers[1].logprobs)
    plain = hf_model.complete(hf_model.encode_chat([{"role": "user", "content": prompts[2]}]), max_new_tokens=30)
    assert answers[2].text != plain.text  # the penalty changed the greedy reply


def test_an_abandoned_stream_frees_its_row(batched):
    stream = batched.chat([{"role": "user", "content": "Tell me a long story."}], stream=True, max_new_tokens=200)
    next(stream)
    stream.close()
    reply = batched.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16)
    assert "Paris" in reply
