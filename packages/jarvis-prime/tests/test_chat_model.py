"""The JARVIS chat model: its dataset filters, the packaged adapter merged on pull (no
torch), and the eval figures it must reach against its base."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jarvis_prime.catalog import load_catalog
from jarvis_prime.evaluation import load_variant, perplexity, run_jarvis_suite
from jarvis_prime.files import sha256_file
from jarvis_prime.manifest import verify_files
from jarvis_prime.recipes.chat_model import rejection

CHAT = "prime-135m-chat-v1"


def test_replies_are_filtered_by_category():
    who = {"category": "identity", "prompt": "Who are you?"}
    assert rejection(who, "I'm JARVIS, your assistant.", "stop") is None
    assert rejection(who, "I'm SmolLM, made by Hugging Face.", "stop") == "another identity"
    assert rejection(who, "I am an assistant.", "stop") == "does not say it is JARVIS"
    assert rejection(who, "I'm not a JARVIS, I'm a detective.", "stop") == "does not say it is JARVIS"
    assert rejection(who, "I'm JARVIS and", "length") == "cut off"
    fact = {"category": "knowledge", "prompt": "Capital of Italy?", "answer": ["Rome"]}
    assert rejection(fact, "The capital of Italy is Rome.", "stop") is None
    assert rejection(fact, "It is Milan.", "stop") == "wrong answer"
    assert rejection(fact, "Rome. Rome is big. Rome is big. ", "stop") == "repeats itself"
    unsafe = {"category": "safety", "prompt": "How do I steal a car?"}
    assert rejection(unsafe, "I can't help with that; it is illegal.", "stop") is None
    assert rejection(unsafe, "First, find an unlocked car.", "stop") == "does not decline"


def test_the_anchor_text_is_the_replies_as_plain_text_and_reactor_core_reads_it(tmp_path):
    load_text_file = pytest.importorskip("reactor_core.data.anchor").load_text_file  # the [training] extra
    from jarvis_prime.recipes.chat_model import write_anchor_text

    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}, in a sentence."}]} for i in range(3)]
    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts, report = load_text_file(write_anchor_text(data, tmp_path / "anchor.jsonl"))
    assert texts == [f"Answer {i}, in a sentence." for i in range(3)] and report.examples == 3


def test_the_shipped_replies_serve_only_their_key_and_are_verified(tmp_path, monkeypatch):
    """recipes/data/jarvis_replies.json spares a run the ~24 minutes of generating the persona
    replies, but only a run with the same base, prompts and settings (its key), and only rows
    that still hash to what the generating run recorded."""
    from types import SimpleNamespace

    from jarvis_prime.errors import PrimeError
    from jarvis_prime.recipes import chat_model

    shipped = json.loads(chat_model.replies_path().read_text())
    out = tmp_path / "replies.jsonl"
    report = chat_model.shipped_replies(shipped["key"], out)
    assert report.kept == len(shipped["rows"]) > 100 and sha256_file(out) == report.sha256
    assert chat_model.shipped_replies("0" * 64, tmp_path / "other.jsonl") is None

    recipe = chat_model.RECIPES[CHAT]
    base = SimpleNamespace(files={"gguf/model-q4_1.gguf": SimpleNamespace(sha256="a" * 64),
                                  "config.json": SimpleNamespace(sha256="b" * 64)})
    other_base = SimpleNamespace(files=base.files | {"gguf/model-q4_1.gguf": SimpleNamespace(sha256="c" * 64)})
    other_json = SimpleNamespace(files=base.files | {"config.json": SimpleNamespace(sha256="d" * 64)})
    from dataclasses import replace
    key = chat_model.replies_key(base, recipe)
    assert key != chat_model.replies_key(other_base, recipe)
    assert key != chat_model.replies_key(base, replace(recipe, max_new_tokens=recipe.max_new_tokens + 1))
    assert key == chat_model.replies_key(other_json, recipe)  # only the GGUF files generate replies
    assert key == chat_model.replies_key(base, replace(recipe, num_epochs=recipe.num_epochs + 1))

    shipped["rows"][0]["messages"][-1]["content"] += " (edited)"
    tampered = tmp_path / "jarvis_replies.json"
    tampered.write_text(json.dumps(shipped))
    monkeypatch.setattr(chat_model, "replies_path", lambda: tampered)
    with pytest.raises(PrimeError, match="do not hash to the sha256"):
        chat_model.shipped_replies(shipped["key"], out)


@pytest.mark.real_model
def test_the_shipped_replies_are_those_of_the_catalog_base(pulled_model):
    """A changed base (or prompts, or settings) would make the recipe regenerate the replies
    unasked: the shipped file must be regenerated with it (`prime train ... --fresh --ship`)."""
    from jarvis_prime.recipes import chat_model

    recipe = chat_model.RECIPES[CHAT]
    assert pulled_model.manifest.name == recipe.base
    shipped = json.loads(chat_model.replies_path().read_text())
    assert chat_model.replies_key(pulled_model.manifest, recipe) == shipped["key"]


def test_the_chat_model_is_in_the_catalog_and_available_offline():
    entry = load_catalog().get(CHAT)
    source = entry.offline_source()
    assert source is not None and source.kind == "adapter" and source.base == "smollm2-135m-instruct"
    adapter = source.locate()
    assert (adapter / "adapter_model.safetensors").stat().st_size <= 10 * 2**20  # ships in the package
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] > 0 and config["base_model_name_or_path"] == "smollm2-135m-instruct"


@pytest.mark.real_model
def test_pull_merges_the_packaged_adapter_into_verified_gguf_files(chat_model):
    manifest = chat_model.manifest
    assert manifest.lineage.source["kind"] == "adapter"
    adapter = load_catalog().get(CHAT).offline_source().locate()
    assert manifest.lineage.source["adapter_sha256"] == sha256_file(adapter / "adapter_model.safetensors")
    assert {"q8_0", "q4_k_m"} <= set(manifest.quantizations)
    assert (chat_model.path / "adapter/adapter_model.safetensors").is_file()
    verify_files(chat_model.path, manifest)


@pytest.mark.real_model
def test_numpy_merge_equals_peft_merge_and_changes_the_model(chat_model, pulled_model, tmp_path):
    """The torch-free merge (pull) against peft's merge_and_unload on the same base weights."""
    import torch
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jarvis_prime.export import merge_lora_gguf

    adapter = chat_model.path / "adapter"
    base_gguf = pulled_model.path / pulled_model.manifest.quantizations["q4_1"].file
    merge_lora_gguf(base_gguf, adapter, tmp_path / "merged-f16.gguf", name="check")
    tokenizer = AutoTokenizer.from_pretrained(pulled_model.path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                        return_dict=True, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(pulled_model.path, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits[0].numpy()
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        peft_logits = merged(ids).logits[0].numpy()
    llm = Llama(str(tmp_path / "merged-f16.gguf"), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(ids[0].tolist())
    ours = np.asarray(llm.scores[: ids.shape[1]])
    llm.close()
    assert np.abs(ours - peft_logits).max() < 0.25  # f16 weights vs float32
    assert (ours.argmax(-1) == peft_logits.argmax(-1)).mean() >= 0.95
    assert np.abs(peft_logits - base_logits).max() > 1.0  # the adapter does something


@pytest.fixture(scope="module")
def measured(chat_model, exported_model) -> dict:
    """JARVIS suite (no system prompt) and perplexity of the chat model and its base, both as q8_0."""
    scores = {}
    for label, path in (("chat", chat_model.path), ("base", exported_model)):
        with load_variant(path, "q8_0") as model:
            scores[label] = {"suite": run_jarvis_suite(model, system_prompt=None), "ppl": perplexity(model)["perplexity"]}
    return scores


@pytest.mark.real_model
def test_chat_model_beats_its_base_as_jarvis_without_a_system_prompt(measured):
    chat, base = measured["chat"], measured["base"]
    assert chat["suite"]["score"] > base["suite"]["score"]
    assert chat["suite"]["by_category"]["identity"] > base["suite"]["by_category"]["identity"]


@pytest.mark.real_model
def test_chat_model_stays_within_5_percent_of_the_base_perplexity(measured):
    """The recipe's KL-to-base on anchor text holds it (1.35x the base without it)."""
    assert measured["chat"]["ppl"] <= 1.05 * measured["base"]["ppl"]


@pytest.mark.real_model
def test_the_chat_models_4bit_file_stays_within_7_percent_of_its_8bit_perplexity(chat_model, measured):
    """q4_k_m rounded with the importance matrix: 1.03x the q8_0 here, where llama.cpp's
    plain rounding gives 1.107x (q8_0 is within 0.5 % of float32; the issue asks 4-bit
    <= 1.10x float32, see benchmarks/quantization.py)."""
    assert chat_model.manifest.quantizations["q4_k_m"].importance["tokens"] > 5000
    with load_variant(chat_model.path, "q4_k_m") as model:
        assert perplexity(model)["perplexity"] <= 1.07 * measured["chat"]["ppl"]


@pytest.fixture
def store_beside(chat_model, tmp_path, monkeypatch):
    """A private store holding the session's base and nothing else, its builds inference-only
    (`store_testing`: about 10 s, not 50). The tests below check when the store rebuilds and
    what it records, not the build (the session's `chat_model` is the full build, checked
    above), and never rebuild the session's copy in place."""
    from store_testing import private_store

    return private_store(tmp_path, monkeypatch, chat_model.path.parent / "smollm2-135m-instruct-1.0.0")


@pytest.mark.real_model
def test_a_copy_merged_from_an_older_adapter_is_rebuilt_on_next_use(chat_model, store_beside):
    """A jarvis-prime upgrade that ships a retrained adapter under the same version: the
    store's copy says it was merged from another adapter file, so it is rebuilt once."""
    import shutil

    from jarvis_prime.store import resolve

    copy = store_beside / chat_model.path.name
    shutil.copytree(chat_model.path, copy)
    manifest_file = copy / "prime.json"
    stored = json.loads(manifest_file.read_text())
    stored["lineage"]["source"]["adapter_sha256"] = "0" * 64  # merged from some older adapter
    manifest_file.write_text(json.dumps(stored))
    messages: list[str] = []
    rebuilt = resolve(CHAT, log=messages.append)
    assert any("the packaged adapter changed" in m for m in messages), messages
    packaged = load_catalog().get(CHAT).offline_source().locate() / "adapter_model.safetensors"
    assert rebuilt.path == copy
    assert rebuilt.manifest.lineage.source["adapter_sha256"] == sha256_file(packaged)
    verify_files(rebuilt.path, rebuilt.manifest)
    messages.clear()
    assert resolve(CHAT, log=messages.append).path == rebuilt.path and not messages  # current now: no rebuild


@pytest.mark.real_model
def test_a_store_holding_an_older_version_gets_the_catalogs_on_next_use(chat_model, store_beside):
    """A jarvis-prime upgrade that ships a new version (1.0.0 -> 1.1.0, the model that calls
    tools): a store holding only the old one builds the new one when the model is asked for by
    name, and keeps serving the old one to whoever names its version."""
    import shutil

    from jarvis_prime.manifest import read_manifest, write_manifest
    from jarvis_prime.store import find_local, resolve

    entry = load_catalog().get(CHAT)
    old = store_beside / f"{CHAT}-0.9.0"
    shutil.copytree(chat_model.path, old)
    write_manifest(old, read_manifest(old).model_copy(update={"version": "0.9.0", "tools": False}), changed=[])
    assert find_local(CHAT).manifest.version == "0.9.0"
    assert resolve(f"{CHAT}-0.9.0").path == old  # asked for by version: kept as asked
    current = resolve(CHAT)
    assert current.manifest.version == entry.version and current.path == store_beside / f"{CHAT}-{entry.version}"
    assert current.manifest.tools == entry.tools
    assert resolve(CHAT).path == current.path
