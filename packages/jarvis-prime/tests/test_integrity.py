"""Loading a PRIME model refuses weight files its `prime.json` does not list (#19 item
14), naming them, on both backends and in `prime eval`'s `load_variant`: a file dropped
beside the listed ones could otherwise be what runs."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from jarvis_prime import IntegrityError, PrimeModel
from jarvis_prime.cli import app
from jarvis_prime.evaluation import load_variant
from jarvis_prime.manifest import read_manifest, verify_files
from jarvis_prime.store import import_path


def test_an_unlisted_gguf_is_refused_by_llama_cpp_and_load_variant_and_flagged_by_info(pulled_model, tmp_path):
    copy = tmp_path / "model"  # without its 540 MB safetensors (llama.cpp does not read it)
    shutil.copytree(pulled_model.path, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    gguf = pulled_model.manifest.quantizations["q4_1"].file
    shutil.copyfile(copy / gguf, copy / "gguf/dropped-in.gguf")
    with pytest.raises(IntegrityError, match=r"weight files not listed in prime.json: gguf/dropped-in.gguf;"):
        PrimeModel.from_pretrained(copy, backend="llamacpp")
    with pytest.raises(IntegrityError, match="gguf/dropped-in.gguf"):
        load_variant(copy, "q4_1")
    info = CliRunner().invoke(app, ["info", str(copy)], env={"COLUMNS": "200"})
    assert info.exit_code == 1 and "NOT LISTED" in info.output
    assert "weight files not listed in prime.json: gguf/dropped-in.gguf" in " ".join(info.output.split())
    (copy / "gguf/dropped-in.gguf").unlink()
    with load_variant(copy, "q4_1") as model:  # the listed files alone load
        assert model.runtime.weights == gguf


def test_an_unlisted_model_safetensors_beside_a_listed_sharded_checkpoint_is_refused(pulled_model, tmp_path):
    """transformers prefers `model.safetensors` to a sharded checkpoint's index: a file
    dropped there would be the weights that run, though prime.json lists the shards."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(pulled_model.path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    source = tmp_path / "sharded"
    LlamaForCausalLM(config).save_pretrained(source, max_shard_size="2MB")
    tokenizer.save_pretrained(source)
    local = import_path(source, name="tiny-sharded", version="0.1.0")
    try:
        assert "model.safetensors.index.json" in local.manifest.files and "model.safetensors" not in local.manifest.files
        model = PrimeModel.from_pretrained(local.path, backend="transformers")  # as listed: loads
        assert model.runtime.backend == "transformers"
        torch.manual_seed(1)
        LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
        shutil.copyfile(tmp_path / "other/model.safetensors", local.path / "model.safetensors")
        with pytest.raises(IntegrityError, match="weight files not listed in prime.json: model.safetensors;"):
            PrimeModel.from_pretrained(local.path, backend="transformers")
        assert read_manifest(local.path).files == local.manifest.files
    finally:
        shutil.rmtree(local.path, ignore_errors=True)


def test_recording_eval_metrics_does_not_vouch_for_a_tampered_or_unlisted_file(pulled_model, tmp_path):
    """`prime eval` rewrote prime.json by hashing the whole folder again, so a tampered
    file got its new hash recorded and a dropped-in one got listed: both then loaded."""
    from jarvis_prime.evaluation import record

    copy = tmp_path / "model"
    shutil.copytree(pulled_model.path, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    before = read_manifest(copy).files
    (copy / "tokenizer.json").write_text("{}")
    shutil.copyfile(copy / pulled_model.manifest.quantizations["q4_1"].file, copy / "gguf/dropped-in.gguf")
    record(copy, "q4_1", {"perplexity": 9.9})
    after = read_manifest(copy)
    assert after.metrics["eval"]["q4_1"]["perplexity"] == 9.9
    assert after.files == before
    with pytest.raises(IntegrityError, match="tokenizer.json: size"):
        verify_files(copy, after, ["tokenizer.json"])
    with pytest.raises(IntegrityError, match="gguf/dropped-in.gguf"):
        load_variant(copy, "q4_1")
