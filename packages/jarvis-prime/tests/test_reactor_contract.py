"""The PRIME model directory contract across packages: what Reactor Core writes, JARVIS
Prime reads (its manifest model, sha256 checks and backends)."""

import json

import pytest

from jarvis_prime import PrimeModel
from jarvis_prime.manifest import read_manifest, verify_files


@pytest.fixture(scope="module")
def trained_dir(pulled_model, tmp_path_factory):
    reactor_core = pytest.importorskip("reactor_core")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("contract")
    tokenizer = AutoTokenizer.from_pretrained(pulled_model.path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                     {"role": "assistant", "content": f"{i}."}]}) + "\n" for i in range(12)))
    config = reactor_core.TrainingConfig(model_name=str(tmp / "base"), output_dir=str(tmp / "out"), output_name="contract",
                                         max_steps=2, batch_size=2, max_seq_length=64, num_samples=0)
    return reactor_core.Trainer(config, progress=False).train(data).model_dir


def test_manifest_written_by_reactor_core_validates_and_verifies(trained_dir):
    manifest = read_manifest(trained_dir)
    assert (manifest.name, manifest.version, manifest.task) == ("contract", "1.0.0", "chat")
    assert manifest.quantizations["f32"].file == "model.safetensors"
    assert {"adapter/adapter_model.safetensors", "model.safetensors", "chat_template.jinja"} <= set(manifest.files)
    assert manifest.lineage.data[0]["sha256"] and manifest.lineage.training_config["max_steps"] == 2
    verify_files(trained_dir, manifest)


def test_prime_model_loads_a_reactor_trained_directory(trained_dir):
    model = PrimeModel.from_pretrained(trained_dir)
    assert model.runtime.backend == "transformers"  # no GGUF yet: auto says why and uses safetensors
    reply = model.complete(model.encode_chat([{"role": "user", "content": "Say 3."}]), max_new_tokens=4)
    assert reply.completion_tokens > 0 and reply.prompt_tokens > 0
    model.close()
