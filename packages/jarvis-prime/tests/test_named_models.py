"""The seed's named models end to end (issue #21), on tiny random models of their bases'
architectures served under the bases' own repository ids by a loopback Hub
(`loopback_hub.py`): `prime pull` with the shipped catalog entry (a gated answer first),
verify, load with the transformers backend, and `generate(prompt)` answering as a chat
turn.

No Qwen tokenizer is reachable offline, so the tiny models carry SmolLM2's: the same
ChatML turns (`<|im_start|>`, `<|im_end|>`) Qwen2.5 and Qwen3 use. GGUF export of
qwen2 / qwen3 is the exporter's side of #21; these tests run the transformers path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jarvis_prime import ModelNotAvailableError, PrimeModel
from jarvis_prime.catalog import load_catalog
from jarvis_prime.manifest import verify_files
from jarvis_prime.store import models_root, pull
from jarvis_prime.thinking import split_reasoning

from loopback_hub import hub_for_tests

COMMIT = "3" * 40
QUESTION = "What is machine learning?"


def tiny_repo(architecture: str, tokenizer_dir: Path, out: Path) -> dict[str, bytes]:
    """A Hub repository's files: a random `architecture` model (hidden 64, 2 layers) in
    safetensors, its config, SmolLM2's tokenizer and chat template, `<|im_end|>` as EOS."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = AutoConfig.for_model(architecture, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=end_of_turn,
                                  bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = end_of_turn
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.save_pretrained(out)
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with hub_for_tests(monkeypatch, tmp_path) as handler:
        yield handler


@pytest.mark.parametrize("name, architecture", [("prime-7b-chat-v1", "qwen2"), ("prime-13b-reasoning-v1", "qwen3")])
def test_a_named_model_pulls_verifies_loads_and_answers(name, architecture, hub, pulled_model, tmp_path,
                                                        monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = load_catalog().get(name)
    assert entry.architecture == architecture
    hub.repos[entry.base] = {COMMIT: tiny_repo(architecture, pulled_model.path, tmp_path / "repo")}
    target = models_root() / f"{name}-{entry.version}"
    try:
        # a gated answer first (the Hub's 401): the message says what to do, and nothing is installed
        hub.gated = {entry.base}
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(ModelNotAvailableError, match=f"{entry.base}: .*HTTP 401.*{entry.license_url}.*HF_TOKEN"):
            pull(name, source="hub")
        assert not target.exists()
        hub.gated = set()

        local = pull(name, source="hub")
        manifest = local.manifest
        assert (manifest.base, manifest.architecture, manifest.license, manifest.license_url) == (
            entry.base, architecture, "Apache-2.0", entry.license_url)
        assert manifest.lineage.source == {"kind": "hub", "repo_id": entry.base, "revision": COMMIT,
                                           "requested": "main"}
        assert json.loads((local.path / "config.json").read_text())["model_type"] == architecture
        verify_files(local.path, manifest)  # every file as prime.json hashed it

        with PrimeModel.from_pretrained(name, backend="transformers") as model:
            assert (model.runtime.backend, model.runtime.memory.verdict) == ("transformers", "fits")
            assert model.is_chat
            prompt = model.encode_chat([{"role": "user", "content": QUESTION}])
            answer = model.complete(prompt, max_new_tokens=12)
            assert model.generate(QUESTION, max_new_tokens=12) == answer.text
            # what transformers itself makes of the same turn, greedy: the reply is the templated turn's
            tokenizer = AutoTokenizer.from_pretrained(local.path)
            raw = AutoModelForCausalLM.from_pretrained(local.path)
            inputs = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
            assert answer.prompt_tokens == inputs["input_ids"].shape[1]
            out = raw.generate(**inputs, max_new_tokens=12, do_sample=False)
            reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            if prompt.thinking is not None:  # a thinking model (the 14B): its answer is the reply after the reasoning
                reply = split_reasoning(reply, prompt.thinking, prompt.opened).content
            assert answer.text == reply
            assert model.generate(QUESTION, raw=True, max_new_tokens=12) != answer.text  # continuation: other ids
    finally:
        shutil.rmtree(target, ignore_errors=True)
