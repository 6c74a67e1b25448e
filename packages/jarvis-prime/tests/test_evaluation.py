"""`prime eval`: rule grading, perplexity that agrees across backends, results in prime.json."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from jarvis_prime.cli import app
from jarvis_prime.evaluation import grade, load_suite, load_variant, perplexity, suite_messages
from jarvis_prime.manifest import read_manifest


def test_rules_grade_replies():
    assert grade("I am JARVIS, your assistant.", {"contains_any": ["jarvis"], "not_contains": ["SmolLM"]}) == []
    assert grade("I'm SmolLM.", {"contains_any": ["JARVIS"], "not_contains": ["SmolLM"]}) == [
        "mentions none of ['JARVIS']", "mentions 'SmolLM'"]
    assert grade("Cold.", {"contains_any": ["cold"], "max_words": 1}) == []
    assert grade("It is very cold.", {"max_words": 3}) == ["4 words > 3"]
    assert grade("Yes.", {"regex": r"^\W*(yes|no)\b"}) == []
    assert grade("I can't help with that; it is dangerous.", {"refusal": True}) == []
    assert grade("Sure! First, mix the chemicals.", {"refusal": True}) == ["does not decline"]
    assert grade("  ", {}) == ["empty reply"]


def test_suite_is_versioned_and_cases_keep_their_own_system_prompt():
    suite = load_suite()
    assert suite["version"] and {c["category"] for c in suite["cases"]} == {
        "identity", "concise", "system_prompt", "safety"}
    friday = next(c for c in suite["cases"] if c["id"] == "system-1")
    assert suite_messages(friday, None)[0] == {"role": "system", "content": friday["system"]}
    who = next(c for c in suite["cases"] if c["id"] == "identity-1")
    assert suite_messages(who, None) == [{"role": "user", "content": "Who are you?"}]
    assert suite_messages(who, "Be JARVIS.")[0]["content"] == "Be JARVIS."


@pytest.mark.real_model
def test_llama_cpp_f16_and_transformers_f32_score_the_same_perplexity(exported_model):
    values = {}
    for variant in ("f16", "f32"):
        with load_variant(exported_model, variant) as model:
            values[variant] = perplexity(model)
    assert values["f16"]["tokens"] == values["f32"]["tokens"] > 500
    assert values["f16"]["perplexity"] == pytest.approx(values["f32"]["perplexity"], rel=0.005)
    assert 2 < values["f32"]["perplexity"] < 200  # a real language model on plain English


@pytest.mark.real_model
def test_prime_eval_prints_a_table_and_records_the_variant(exported_model):
    result = CliRunner().invoke(app, ["eval", str(exported_model), "--quant", "q4_k_m", "--no-system-prompt"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for row in ("perplexity (general text)", "jarvis-1.0 score (no system prompt)", "identity", "safety",
                "decode tokens/s", "peak RSS"):
        assert row in result.output
    recorded = read_manifest(exported_model).metrics["eval"]["q4_k_m/no-system-prompt"]
    assert recorded["weights"] == "gguf/smollm2-135m-instruct-q4_k_m.gguf" and recorded["backend"] == "llamacpp"
    assert recorded["jarvis"]["suite"] == "jarvis-1.0" and 0 <= recorded["jarvis"]["score"] <= 1
    assert "cases" not in recorded["jarvis"]  # replies are printed (--show-replies), not stored
    assert recorded["speed"]["decode_tokens_per_s"] > 0 and recorded["perplexity"]["perplexity"] > 1
    json.dumps(recorded)


def test_unknown_variant_names_what_exists(pulled_model):
    result = CliRunner().invoke(app, ["eval", "smollm2-135m-instruct", "--quant", "q2_k"])
    assert result.exit_code == 1 and "no 'q2_k' variant (have:" in result.output and "q4_1" in result.output
