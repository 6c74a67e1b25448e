"""PrimeModel on the real SmolLM2-135M-Instruct, through both backends."""

import asyncio
import time

import pytest

from jarvis_prime import GenerationParams
from jarvis_prime.models.prime_model import iterate_in_thread

pytestmark = pytest.mark.real_model

PERSONA = "You are JARVIS, a helpful AI assistant. Answer concisely."
FRANCE = [{"role": "system", "content": PERSONA}, {"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The capital of Germany is", "def fibonacci(n):", "Three primary colors are"]


@pytest.fixture(params=["llamacpp", "transformers"])
def model(request):
    return request.getfixturevalue({"llamacpp": "llama_model", "transformers": "hf_model"}[request.param])


def test_backends_are_what_was_asked(llama_model, hf_model):
    assert (llama_model.runtime.backend, llama_model.runtime.weights_format) == ("llamacpp", "gguf")
    assert (hf_model.runtime.backend, hf_model.runtime.weights) == ("transformers", "model.safetensors")


def test_greedy_chat_answers_paris(model):
    reply = model.complete(model.encode_chat(FRANCE), max_new_tokens=32)
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop" and "<|im_end|>" not in reply.text


def test_both_backends_build_the_same_prompt_tokens(llama_model, hf_model):
    assert llama_model.encode_chat(FRANCE).ids == hf_model.encode_chat(FRANCE).ids
    assert llama_model.count_tokens("Hello there, JARVIS") == hf_model.count_tokens("Hello there, JARVIS")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streaming_equals_non_streaming(model, prompt):
    assert "".join(model.generate(prompt, stream=True, max_new_tokens=24)) == model.generate(prompt, max_new_tokens=24)
    assert "".join(model.chat(FRANCE, stream=True, max_new_tokens=24)) == model.chat(FRANCE, max_new_tokens=24)


def test_stream_yields_several_pieces(model):
    assert len(list(model.generate("Once upon a time", stream=True, max_new_tokens=16))) > 3


def test_stop_strings_end_the_reply_in_both_modes(model):
    prompt = "List: one, two, three, four, five, six"
    full = model.generate(prompt, max_new_tokens=24)
    assert "," in full, full
    stopped = model.complete(model.encode(prompt), max_new_tokens=24, stop=[","])
    assert stopped.text == full[: full.index(",")]
    assert stopped.finish_reason == "stop"
    assert "".join(model.generate(prompt, stream=True, max_new_tokens=24, stop=[","])) == stopped.text


def test_length_limit_reports_length(model):
    result = model.complete(model.encode("Once upon a time"), max_new_tokens=5)
    assert (result.finish_reason, result.completion_tokens) == ("length", 5)
    assert result.prompt_tokens == len(model.encode("Once upon a time").ids)


def test_seeded_sampling_repeats(model):
    kwargs = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    assert model.generate("Once upon a time", **kwargs) == model.generate("Once upon a time", **kwargs)


def test_transformers_backend_equals_raw_generate(hf_model):
    """Our path adds nothing to transformers' own greedy decoding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_model.path)
    raw = AutoModelForCausalLM.from_pretrained(hf_model.path, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = raw.generate(**inputs, max_new_tokens=32, do_sample=False)
    expected = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert hf_model.chat(FRANCE, max_new_tokens=32) == expected


def test_llamacpp_backend_equals_raw_llama_cpp(llama_model):
    from jarvis_prime.models.llamacpp import open_llama  # llama_cpp.Llama, safe on AMX CPUs

    raw = open_llama(llama_model.path / llama_model.runtime.weights, n_ctx=512, verbose=False)
    prompt = llama_model.apply_chat_template(FRANCE)
    out = raw.create_completion(raw.tokenize(prompt.encode(), add_bos=False, special=True), max_tokens=32,
                                temperature=0.0, repeat_penalty=1.0)
    assert llama_model.chat(FRANCE, max_new_tokens=32) == out["choices"][0]["text"]
    raw.close()


async def test_async_calls_do_not_block_the_event_loop(model):
    gaps: list[float] = []

    async def ticker():
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    reply = await asyncio.to_thread(model.chat, FRANCE, max_new_tokens=48)
    pieces = [p async for p in iterate_in_thread(lambda: model.chat(FRANCE, stream=True, max_new_tokens=48))]
    tick.cancel()
    assert reply == "".join(pieces) == model.chat(FRANCE, max_new_tokens=48)
    assert len(gaps) > 5, "the loop kept running while the model generated"


def test_generation_params_are_validated():
    for kwargs, field in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                          ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"), ({"stop": ("",)}, "stop")]:
        with pytest.raises(ValueError, match=f"`{field}`"):
            GenerationParams(**kwargs)


def test_generating_while_this_thread_holds_an_open_stream_is_an_error_not_a_deadlock(llama_model):
    stream = llama_model.generate("Once upon a time", stream=True, max_new_tokens=8)
    next(stream)
    with pytest.raises(RuntimeError, match="still open in this thread"):
        llama_model.generate("Hello", max_new_tokens=2)
    stream.close()
    assert llama_model.generate("Hello", max_new_tokens=2)  # usable again once closed
