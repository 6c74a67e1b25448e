"""`prime train prime-7b-chat-v1` (issue #21): the plan per machine, and the whole recipe end
to end on CPU on a tiny random Qwen2 (the 7B base's architecture) with JARVIS conversations
as `jarvis export-data` writes them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from jarvis_prime.recipes.big_chat_model import BIG_RECIPES, plan_run, train_big_chat_model


@pytest.mark.parametrize("profile, gpu_gb, nproc, mode, keys", [
    ("cuda-full", 24.0, None, "qlora", {"quantize_base": True, "base_dtype": "bfloat16"}),
    ("cuda-full-spot", 80.0, None, "lora-bf16", {"base_dtype": "bfloat16"}),
    ("gcp-full-spot", 0.0, None, "fsdp", {"base_dtype": "bfloat16", "checkpoint_every_minutes": 5.0,
                                          "watch_gcp_preemption": True}),
    ("gcp-full", 0.0, 4, "fsdp", {"base_dtype": "bfloat16"}),
    ("cpu-lora", 0.0, None, "lora", {}),
])
def test_the_plan_follows_the_machine(profile, gpu_gb, nproc, mode, keys):
    plan = plan_run(profile, gpu_gb, nproc)
    assert plan.mode == mode
    assert keys.items() <= plan.keys.items()
    assert plan.keys["gradient_checkpointing"] is True
    assert plan.nproc == (nproc or (2 if profile.startswith("gcp-full") else 1))
    assert "quantize_base" not in plan.keys or plan.nproc == 1  # FSDP cannot shard 4-bit weights


@pytest.fixture(scope="module")
def tiny_qwen2(pulled_model, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = AutoTokenizer.from_pretrained(pulled_model.path)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_prime_train_7b_chat_end_to_end_on_a_tiny_qwen2(tiny_qwen2, tmp_path, monkeypatch):
    pytest.importorskip("reactor_core")
    monkeypatch.setenv("JARVIS_PRIME_HOME", str(tmp_path / "store"))  # the session store keeps no 7B model
    exported = tmp_path / "feedback-sft.jsonl"  # as `jarvis export-data` writes thumbs-up replies
    exported.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Remind me about task {i}."},
        {"role": "assistant", "content": f"Of course. Task {i} is on your list for today."}]}) + "\n" for i in range(12)))
    from jarvis_prime.errors import ExportError
    from jarvis_prime.export.converter import find_converter

    try:
        find_converter()
        quants: tuple[str, ...] = ("q8_0", "q4_k_m")
    except ExportError:  # without `make llama-cpp-converter` the recipe still trains; the GGUF step is checked where it exists
        quants = ()
    recipe = replace(BIG_RECIPES["prime-7b-chat-v1"], base=str(tiny_qwen2), max_steps=2, candidates=1,
                     max_new_tokens=8, max_prompts=16, generation_batch=8, batch_size=2, gradient_accumulation_steps=1,
                     max_seq_length=128, quants=quants, tokenizer_pre="smollm")  # llama.cpp's
    # converter does not recognise SmolLM2's tokenizer saved with a Qwen2 config, so the test names it
    lines = []
    summary = train_big_chat_model("prime-7b-chat-v1", tmp_path / "work", data=[exported], recipe=recipe,
                                   log=lines.append, progress=False)

    assert summary["persona"]["prompts"] == 16  # the first 16 shipped prompts were put to the base, 2 batches
    assert sum(n for _, n in summary["persona"]["by_category"].values()) == 16
    assert summary["plan"]["mode"] == "lora" and any(line.startswith("plan: ") for line in lines)
    persona = (tmp_path / "work/jarvis-persona.jsonl").read_text().splitlines()
    assert summary["conversations"] == len(persona) + 12
    trained_on = (tmp_path / "work/train.jsonl").read_text()
    assert "Task 11 is on your list" in trained_on
    model_dir = Path(summary["model_dir"])
    assert model_dir.parent == tmp_path / "store/models" and model_dir.name == "prime-7b-chat-v1-1.0.0"
    manifest = json.loads((model_dir / "prime.json").read_text())
    assert manifest["architecture"] == "qwen2" and manifest["name"] == "prime-7b-chat-v1"
    assert summary["train_metrics"]["steps"] == 2
    cleaned = manifest["lineage"]["data"][0]["pipeline"]  # through Reactor Core's data pipeline, decontaminated
    assert any(p.endswith("eval_data/jarvis_suite.json") for p in cleaned["config"]["decontaminate"]["paths"])
    assert cleaned["inputs"][0]["path"] == str(tmp_path / "work/train.jsonl") and cleaned["read"] == len(persona) + 12
    config = manifest["lineage"]["training_config"]
    assert config["gradient_checkpointing"] is True and config["lora_rank"] == 16 and config["target_modules"] == "auto"
    assert (model_dir / "adapter/adapter_model.safetensors").is_file() and (model_dir / "model.safetensors").is_file()
    assert manifest["license"] is None  # a base other than the catalog's: its license is not guessed

    if not quants:
        return
    manifest = json.loads((model_dir / "prime.json").read_text())
    assert {"q8_0", "q4_k_m"} <= set(manifest["quantizations"])  # what "8bit" / "4bit" load on a Mac or CPU
    from jarvis_prime import PrimeModel

    for quantization in ("8bit", "4bit"):
        with PrimeModel.from_pretrained(str(model_dir), backend="llamacpp", quantization=quantization) as model:
            assert model.runtime.backend == "llamacpp"
            reply = model.generate("Remind me about task 3.", max_new_tokens=4)
            assert isinstance(reply, str)


def test_the_7b_recipe_records_the_catalog_license_of_its_base(tiny_qwen2, tmp_path, monkeypatch):
    """The import the recipe ends with, for the catalog's own base: a plain Hugging Face
    folder (Reactor Core's output records no license) gets the catalog's, which prime.json,
    the card and `prime info` show."""
    from jarvis_prime.catalog import load_catalog
    from jarvis_prime.store import import_path

    monkeypatch.setenv("JARVIS_PRIME_HOME", str(tmp_path / "store"))
    entry = load_catalog().get("prime-7b-chat-v1")
    unlabelled = import_path(tiny_qwen2, name="tiny-unlabelled")
    assert unlabelled.manifest.license is None
    local = import_path(tiny_qwen2, name="prime-7b-chat-v1", base=entry.base, license=entry.license,
                        license_url=entry.license_url)
    manifest = json.loads((local.path / "prime.json").read_text())
    assert (manifest["license"], manifest["license_url"]) == ("Apache-2.0", entry.license_url)
