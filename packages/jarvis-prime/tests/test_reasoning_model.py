"""The reasoning model's recipe end to end on a tiny random Llama (data -> Reactor Core SFT
-> store with its thinking tags -> GGUF -> the held-out score through llama.cpp beside a
comparison model), its catalog entry, and (real model) the shipped adapter's answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jarvis_prime.answers import extract_answer
from jarvis_prime.catalog import load_catalog
from jarvis_prime.errors import PrimeError
from jarvis_prime.recipes.reasoning_model import (
    RECIPES,
    load_problem_file,
    question_messages,
    score_problems,
    small_recipe,
)

NAME = "prime-135m-reasoning-v1"


class Scripted:
    """A chat model that answers from a table (what score_problems sees of a PrimeModel)."""

    def __init__(self, replies: dict[str, str]):
        self.replies, self.asked = replies, []

    def chat(self, messages, **options):
        self.asked.append((messages, options))
        return self.replies[messages[-1]["content"].split("\n\n")[0]]


def test_score_problems_reads_every_reply_the_same_way_and_counts_by_structure():
    problems = [{"question": "A?", "answer": "12", "template": "each/0"},
                {"question": "B?", "answer": "7", "template": "left/1"},
                {"question": "C?", "answer": "5", "template": "left/2"}]
    model = Scripted({"A?": "<think>\n3 * 4 = 12\n</think>\nThe answer is 12.",
                      "B?": "<think>\nthe answer is 7\n</think>\nThe answer is 8.",  # only after </think> counts
                      "C?": "Answer: 5"})
    scores = score_problems(model, problems, "step-by-step", max_new_tokens=20)
    assert scores["correct"] == 2 and scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["by_structure"] == {"each": 1.0, "left": 0.5}
    messages, options = model.asked[0]
    assert "step by step" in messages[0]["content"] and options == {"max_new_tokens": 20, "temperature": 0.0}
    assert question_messages("Q?", "direct") == [{"role": "user", "content": "Q?"}]


def test_a_problem_file_written_by_someone_else_is_read_or_refused_by_entry(tmp_path):
    good = tmp_path / "problems.json"
    good.write_text(json.dumps({"problems": [{"question": "1 + 1?", "answer": "2", "kind": "arithmetic"}]}))
    assert load_problem_file(good)[0]["answer"] == "2"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"problems": [{"question": "1 + 1?", "answer": 2}]}))
    with pytest.raises(PrimeError, match=r"bad.json: problems\[0\]"):
        load_problem_file(bad)


def test_the_reasoning_model_is_in_the_catalog_with_its_thinking_tags():
    entry = load_catalog().get(NAME)
    assert entry.task == "reasoning" and entry.thinking.start == "<think>" and entry.thinking.end == "</think>"
    source = entry.sources[0]
    assert source.kind == "adapter" and source.base == RECIPES[NAME].base == "smollm2-135m-instruct"
    assert source.path == f"adapters/{NAME}"
    assert entry.version == RECIPES[NAME].version  # a retrain that ships bumps both, or `prime pull` keeps the old one


@pytest.fixture(scope="module")
def tiny_llama(pulled_model, tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, in Hugging Face form."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(pulled_model.path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_prime_train_reasoning_end_to_end_on_a_tiny_llama(tiny_llama, pulled_model, tmp_path, monkeypatch):
    pytest.importorskip("reactor_core")
    from jarvis_prime.export import ExportError, export_gguf
    from jarvis_prime.export.converter import find_converter
    from jarvis_prime.recipes.reasoning_model import train_reasoning_model
    from jarvis_prime.store import import_path

    try:
        find_converter()
    except ExportError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("JARVIS_PRIME_HOME", str(tmp_path / "store"))  # the session store keeps the real model's name
    export_gguf(import_path(tiny_llama, name="tiny-llama", base="tiny", force=True).path, ["q8_0"], progress=False)
    recipe = small_recipe(RECIPES[NAME], base="tiny-llama", train_examples=40, heldout_examples=6, grpo_prompts=5,
                          max_steps=2, batch_size=2, max_seq_length=256, warmup_steps=0,
                          compare_with=("tiny-llama",), compare_prompting=("direct",),
                          heldout_limit=3, max_new_tokens=8)
    extra = tmp_path / "someone-elses.json"
    extra.write_text(json.dumps({"problems": [{"question": "Sam has 3 boxes with 4 pencils in each box. "
                                                           "How many pencils does Sam have?", "answer": "12"}]}))
    lines: list[str] = []
    summary = train_reasoning_model(NAME, tmp_path / "work", recipe=recipe, log=lines.append, progress=False,
                                    also_score=extra)

    data = tmp_path / "work/data"
    assert summary["dataset"]["train"]["examples"] == 40 and (data / "grpo.jsonl").is_file()
    assert summary["train_metrics"]["sft"]["steps"] == 2
    model_dir = Path(summary["model_dir"])
    manifest = json.loads((model_dir / "prime.json").read_text())
    assert manifest["task"] == "reasoning" and manifest["thinking"] == {"start": "<think>", "end": "</think>"}
    assert {"q8_0", "q4_k_m"} <= set(manifest["quantizations"])
    config = manifest["lineage"]["training_config"]
    assert config["method"] == "sft" and config["packing"] is True and "down_proj" in config["target_modules"]
    cleaned = manifest["lineage"]["data"][0]["pipeline"]  # through Reactor Core's data pipeline (issue #25)
    assert cleaned["inputs"] == [{"path": str(data / "train.jsonl"), "sha256": summary["dataset"]["train"]["sha256"]}]
    assert str(data / "scored-questions.json") in cleaned["config"]["decontaminate"]["paths"]
    assert json.loads((data / "scored-questions.json").read_text())[-1].startswith("Sam has 3 boxes")  # --problems too
    assert cleaned["read"] == 40 and cleaned["kept"] == 40 - sum(cleaned["removed"].values())
    rows = {(r["model"], r["prompting"]): r for r in summary["heldout"]["rows"]}
    assert set(rows) == {(NAME, "direct"), ("tiny-llama", "direct")}  # the base it was trained from, same problems
    for row in rows.values():
        assert row["heldout"]["problems"] == 3 and row["extra"]["problems"] == 1
        assert row["weights"].endswith(".gguf")  # the default llama.cpp file
    assert any(line.startswith("5/5") for line in lines)
    assert model_dir.parent == tmp_path / "store/models"


@pytest.mark.real_model
def test_the_shipped_adapter_answers_a_heldout_problem_in_its_format(pulled_model, tmp_path, monkeypatch):
    """The packaged adapter (sha256 recorded at pull) through the default llama.cpp backend
    (its q8_0 file, which an inference-only build writes alike: `store_testing`)."""
    from store_testing import private_store

    from jarvis_prime import PrimeModel
    from jarvis_prime.files import sha256_file
    from jarvis_prime.manifest import verify_files
    from jarvis_prime.recipes.reasoning_data import draw_problem
    from jarvis_prime.store import pull

    entry = load_catalog().get(NAME)
    if entry.offline_source() is None:
        pytest.skip(f"{NAME}'s adapter is not shipped in this checkout")
    private_store(tmp_path, monkeypatch, pulled_model.path)
    local = pull(NAME)
    adapter = entry.offline_source().locate()
    assert local.manifest.lineage.source["adapter_sha256"] == sha256_file(adapter / "adapter_model.safetensors")
    assert local.manifest.thinking is not None and local.manifest.task == "reasoning"
    verify_files(local.path, local.manifest)
    training = json.loads((adapter / "training.json").read_text())
    ours = next(r for r in training["heldout"]["rows"] if r["model"] == NAME)
    assert ours["heldout"]["problems"] >= 100  # the recorded figure is measured, on the whole held-out set
    problem = draw_problem(0, "heldout", 0)
    messages = [{"role": "user", "content": problem["question"]}]
    with PrimeModel.from_pretrained(NAME, backend="llamacpp") as model:
        assert Path(str(model.runtime.weights)).name.endswith("q8_0.gguf")  # the file a full build writes alike
        result = model.complete(model.encode_chat(messages), max_new_tokens=160, temperature=0.0)
        answer = model.chat(messages, max_new_tokens=160, temperature=0.0)
    # it thought in <think> (prime.json's markers split it off) and then answered in the trained form
    assert result.reasoning and " = " in result.reasoning and "<think>" not in result.text, result
    assert result.text.startswith("The answer is") and extract_answer(result.text) is not None, result
    assert answer == result.text  # chat() is the answer alone
