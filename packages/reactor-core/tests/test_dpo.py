"""Preference tuning: data validation, completion-only log-probs, agreement with TRL,
and training that raises held-out preference accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from reactor_core import Trainer
from reactor_core.data import DataValidationError
from reactor_core.data.preference import load_preference_file, tokenize_preference
from reactor_core.training.recipes.dpo import DPORecipe, preference_loss
from reactor_core.training.loss import IGNORE_INDEX, sequence_logps

from reactor_testing import COLORS, config_for, write_preferences


def test_bad_preference_lines_are_reported_with_their_place(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}),
        "{broken",
        json.dumps({"prompt": "hi", "chosen": "same", "rejected": "same"}),
        json.dumps({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    "chosen": "x", "rejected": "y"}),
        json.dumps({"prompt": "hi", "chosen": "ok"}),
        json.dumps({"prompt": "hi", "chosen": [{"role": "assistant", "content": "ok"}], "rejected": 3}),
    ]) + "\n")
    with pytest.raises(DataValidationError) as err:
        load_preference_file(path)
    text = str(err.value)
    for line, reason in [(2, "bad JSON"), (3, "same reply"), (4, "must end with a user message"),
                         (5, "missing field(s): rejected"), (6, "`rejected` must be a string")]:
        assert f"{path}:{line}: " in text and reason in text, (line, reason, text)
    pairs, report = load_preference_file(path, on_bad_example="skip")
    assert len(pairs) == 1 and report.skipped == 5


def test_only_the_final_reply_carries_log_probs(tokenizer, tmp_path):
    pairs, _ = load_preference_file(write_preferences(tmp_path / "p.jsonl", n=2))
    pair = tokenize_preference(pairs[0], tokenizer)
    for side, reply in ((pair.chosen, pairs[0].chosen), (pair.rejected, pairs[0].rejected)):
        labelled = [t for t, label in zip(side.input_ids, side.labels) if label != IGNORE_INDEX]
        assert tokenizer.decode(labelled) == reply + "<|im_end|>"


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_agrees_with_trl_on_the_same_model_batch_and_beta(tiny_llama_dir, loss_type, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy that has drifted from its reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    rows = [{"prompt": [{"role": "user", "content": f"Name color {i}."}],
             "chosen": [{"role": "assistant", "content": f"Color {i} is {COLORS[i]}."}],
             "rejected": [{"role": "assistant", "content": f"I do not know color {i}, sorry."}]} for i in range(4)]
    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, loss_type=[loss_type], per_device_train_batch_size=4,
                     report_to=[], use_cpu=True, max_length=128, bf16=False)  # both sides in float32
    trl = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                     processing_class=tokenizer)
    batch = trl.data_collator([trl.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        trl_loss = trl._compute_loss(policy, batch, return_outputs=False).item()

        # the same batch through our code: completion tokens labelled, prompt masked
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
        positions = torch.arange(labels.shape[1]).expand_as(labels)
        inputs = (batch["input_ids"], labels, positions, batch["attention_mask"])
        pol, counts = sequence_logps(policy, *inputs)
        ref, _ = sequence_logps(reference, *inputs)
        losses, _, _ = preference_loss(pol[:4], pol[4:], ref[:4], ref[4:], counts[:4], counts[4:],
                                       loss_type=loss_type, beta=0.1, label_smoothing=0.0)
    assert abs(trl_loss - 0.6931) > 1e-3 or loss_type == "ipo", "policy and reference must differ"
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-4)


def test_dpo_with_lora_raises_held_out_preference_accuracy(tiny_llama_dir, tmp_path):
    data = write_preferences(tmp_path / "prefs.jsonl")
    config = config_for(tiny_llama_dir, tmp_path / "out", method="dpo", beta=0.1, max_steps=24, batch_size=4,
                        learning_rate=1e-2, val_fraction=0.2, num_samples=0, merge_adapter=False)
    trainer = Trainer(config, progress=False).recipe
    assert isinstance(trainer, DPORecipe)
    trainer.setup(data)
    before = trainer.evaluate()
    result = trainer.train()
    after = result.metrics["eval"][-1]
    assert before["eval_reward_accuracy"] == 0.0  # policy == reference: no preference yet
    assert after["eval_reward_accuracy"] >= 0.8 and after["eval_reward_margin"] > before["eval_reward_margin"]
    assert after["eval_loss"] < before["eval_loss"]
    # no second model in memory: the reference is the same weights with adapters off
    assert trainer.reference is None
    base = sum(p.numel() for p in trainer.model.get_base_model().parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    held = {id(p): p.numel() for value in vars(trainer).values() if isinstance(value, torch.nn.Module)
            for p in value.parameters()}
    assert sum(held.values()) == base + lora  # every parameter the trainer holds, counted once
    assert (result.model_dir / "adapter/adapter_model.safetensors").is_file()


def test_full_fine_tune_dpo_keeps_a_frozen_reference(tiny_llama_dir, tmp_path):
    data = write_preferences(tmp_path / "prefs.jsonl", n=16)
    trainer = Trainer(config_for(tiny_llama_dir, tmp_path / "out", method="dpo", use_lora=False, max_steps=3,
                                 learning_rate=1e-3, num_samples=0), progress=False).recipe
    trainer.setup(data)
    frozen = {n: p.clone() for n, p in trainer.reference.model.named_parameters()}
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.reference.model.named_parameters())
    assert not all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters())


def test_precomputed_reference_log_probs_train_the_same_without_a_frozen_copy(tiny_llama_dir, tmp_path):
    data = write_preferences(tmp_path / "prefs.jsonl", n=16)
    runs = {}
    for precompute in (False, True):
        config = config_for(tiny_llama_dir, tmp_path / f"out-{precompute}", method="dpo", use_lora=False, max_steps=3,
                            batch_size=4, learning_rate=1e-3, num_samples=0, mixed_precision="fp32",
                            precompute_ref_logps=precompute)
        trainer = Trainer(config, progress=False).recipe
        trainer.setup(data)
        runs[precompute] = (trainer, trainer.train())
    on_the_fly, precomputed = runs[False], runs[True]
    assert on_the_fly[0].reference is not None and precomputed[0].reference is None  # no frozen copy
    assert all(p.reference is not None for p in precomputed[0].train_items)
    for a, b in zip(on_the_fly[1].metrics["train_loss"], precomputed[1].metrics["train_loss"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert on_the_fly[1].metrics["eval_loss"] == pytest.approx(precomputed[1].metrics["eval_loss"], abs=1e-5)
