"""PrimeModel on the real SmolLM2-135M-Instruct, through both backends."""

import asyncio
import re
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


QUESTION = "What is the capital of France? Answer in one word."


def test_generate_on_a_chat_model_answers_the_prompt_as_one_user_turn(model):
    """The seed's `model.generate("What is machine learning?")`: a chat model gets the prompt
    as one user turn through its own template (the ids equal transformers' rendering of
    it, an independent reference) and stops at the end of its turn."""
    from transformers import AutoTokenizer

    turn = [{"role": "user", "content": QUESTION}]
    reference = AutoTokenizer.from_pretrained(model.path).apply_chat_template(turn, add_generation_prompt=True,
                                                                              tokenize=True, return_dict=True)
    assert model.is_chat and model.encode_chat(turn).ids == reference["input_ids"]
    answer = model.complete(model.encode_chat(turn), max_new_tokens=96)
    assert (answer.finish_reason, answer.prompt_tokens) == ("stop", len(reference["input_ids"]))  # ended its turn
    assert model.generate(QUESTION, max_new_tokens=96) == answer.text == model.chat(turn, max_new_tokens=96)
    assert "".join(model.generate(QUESTION, stream=True, max_new_tokens=96)) == answer.text
    assert "Paris" in answer.text and "<|im_end|>" not in answer.text and "<|im_start|>" not in answer.text
    prefix = "The capital of Germany is"  # raw=True: the old meaning, the text continued as written
    continued = model.complete(model.encode(prefix), max_new_tokens=16)
    assert model.generate(prefix, raw=True, max_new_tokens=16) == continued.text
    assert continued.text != model.generate(prefix, max_new_tokens=16)  # as a chat turn: another prompt


def test_a_model_without_a_chat_template_keeps_continuing(pulled_model, tmp_path):
    """A base model (no chat template) has no turns to answer in: `generate` continues it."""
    import shutil

    from jarvis_prime import PrimeModel
    from jarvis_prime.manifest import read_manifest, write_manifest

    base = tmp_path / pulled_model.path.name
    shutil.copytree(pulled_model.path, base)
    (base / "chat_template.jinja").unlink()
    write_manifest(base, read_manifest(base).model_copy(update={"chat_template": None}))
    with PrimeModel.from_pretrained(base, backend="llamacpp") as model:
        assert not model.is_chat
        prompt = "The capital of Germany is"
        assert model.generate(prompt, max_new_tokens=16) == model.complete(model.encode(prompt), max_new_tokens=16).text
        assert model.generate(prompt, max_new_tokens=16) == model.generate(prompt, raw=True, max_new_tokens=16)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streaming_equals_non_streaming(model, prompt):
    assert ("".join(model.generate(prompt, raw=True, stream=True, max_new_tokens=24))
            == model.generate(prompt, raw=True, max_new_tokens=24))
    assert "".join(model.generate(prompt, stream=True, max_new_tokens=24)) == model.generate(prompt, max_new_tokens=24)
    assert "".join(model.chat(FRANCE, stream=True, max_new_tokens=24)) == model.chat(FRANCE, max_new_tokens=24)


def test_stream_yields_several_pieces(model):
    assert len(list(model.generate("Once upon a time", raw=True, stream=True, max_new_tokens=16))) > 3


def test_stop_strings_end_the_reply_in_both_modes(model):
    prompt = "List: one, two, three, four, five, six"
    full = model.generate(prompt, raw=True, max_new_tokens=24)
    assert "," in full, full
    stopped = model.complete(model.encode(prompt), max_new_tokens=24, stop=[","])
    assert stopped.text == full[: full.index(",")]
    assert stopped.finish_reason == "stop"
    assert "".join(model.generate(prompt, raw=True, stream=True, max_new_tokens=24, stop=[","])) == stopped.text


def test_length_limit_reports_length(model):
    result = model.complete(model.encode("Once upon a time"), max_new_tokens=5)
    assert (result.finish_reason, result.completion_tokens) == ("length", 5)
    assert result.prompt_tokens == len(model.encode("Once upon a time").ids)


def test_seeded_sampling_repeats(model):
    kwargs = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    assert model.generate("Once upon a time", raw=True, **kwargs) == model.generate("Once upon a time", raw=True, **kwargs)
    assert model.generate("Tell me a story", **kwargs) == model.generate("Tell me a story", **kwargs)


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


MiB, GiB = 2**20, 2**30


def simulate(monkeypatch, **memory):
    """This machine as a CPU box with `memory` (a simulated profile: the planner reads no other)."""
    from jarvis_prime.hardware import Hardware
    from jarvis_prime.models import prime_model

    monkeypatch.setattr(prime_model, "detect_hardware",
                        lambda: Hardware("Linux", "x86_64", apple_silicon=False, nvidia_driver=False, **memory))


def test_a_model_larger_than_the_machine_is_refused_before_anything_loads(pulled_model, monkeypatch):
    from jarvis_prime import InsufficientMemoryError, PrimeModel
    from jarvis_prime.manifest import hash_files

    before = hash_files(pulled_model.path)
    simulate(monkeypatch, memory_total=256 * MiB, memory_available=200 * MiB)
    with pytest.raises(InsufficientMemoryError,
                       match=r"smollm2-135m-instruct fits no quantization here: needs as shipped 0\.\d GiB, 8bit 0\.\d "
                             r"GiB, 4bit 0\.\d GiB; .*more than this machine's 0\.2 GiB of RAM"):
        PrimeModel.from_pretrained("smollm2-135m-instruct", backend="llamacpp")
    assert hash_files(pulled_model.path) == before  # nothing exported, nothing written


def test_a_model_that_will_swap_loads_with_a_warning_that_says_so(pulled_model, monkeypatch, caplog):
    from jarvis_prime import PrimeModel

    from jarvis_prime.hardware import Libraries
    from jarvis_prime.models import prime_model

    simulate(monkeypatch, memory_total=64 * GiB, memory_available=100 * MiB)  # fits the machine, not what is free
    # without bitsandbytes, as shipped (float32) is the only transformers option: it loads, warned
    monkeypatch.setattr(prime_model, "detect_libraries", lambda: Libraries(True, True, bitsandbytes=False))
    with caplog.at_level("WARNING", logger="jarvis_prime"):
        model = PrimeModel.from_pretrained("smollm2-135m-instruct", backend="transformers")
    with model:
        assert model.runtime.memory.verdict == "slow" and model.runtime.quantization is None
        assert model.generate("Hi", max_new_tokens=2)
    assert any(re.search(r"smollm2-135m-instruct will be slow here at full precision \(model\.safetensors\): "
                         r"needs \d\.\d GiB, 0\.1 GiB free of 64\.0 GiB RAM: it will load but page other memory out \(swap\)",
                         r.getMessage())
               for r in caplog.records), caplog.text
