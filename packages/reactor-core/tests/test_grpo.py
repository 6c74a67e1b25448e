"""GRPO: config and data validation, rewards and their errors, the loss against TRL's
GRPOTrainer, group-normalised advantages, and training that raises a verifiable reward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reactor_core import Trainer
from reactor_core.checkpoints.store import LocalCheckpointStore
from reactor_core.data import DataValidationError
from reactor_core.data.prompts import load_prompt_file
from reactor_core.training.config import ConfigError, TrainingConfig, build_config
from reactor_core.training.loss import IGNORE_INDEX, token_logps
from reactor_core.training.recipes.grpo import LOSS_NORMS, GRPORecipe, clipped_token_loss, group_advantages
from reactor_core.training.rewards import RewardError, exact_answer, length, load_reward, score, think_format

from reactor_testing import config_for, train_cancelled_at

# -- config and data ---------------------------------------------------------------------------


def test_grpo_config_defaults_and_the_errors_that_name_the_key():
    c = TrainingConfig(model_name="m", method="grpo", reward_funcs=["exact_answer"])
    assert (c.loss_type, c.beta, c.num_generations, c.epsilon, c.epsilon_high) == ("dapo", 0.0, 8, 0.2, None)
    assert TrainingConfig(model_name="m", method="dpo").loss_type == "sigmoid"  # DPO's defaults unchanged
    assert TrainingConfig(model_name="m", method="dpo").beta == 0.1
    bad = [
        (dict(method="grpo"), "needs `reward_funcs`"),
        (dict(method="grpo", reward_funcs=["length"], loss_type="sigmoid"), "`loss_type: sigmoid` applies to `method: dpo`"),
        (dict(method="dpo", loss_type="dapo"), "`loss_type: dapo` applies to `method: grpo`"),
        (dict(method="grpo", reward_funcs=["length"], num_generations=1), "`num_generations`"),
        (dict(method="grpo", reward_funcs=["length", "exact_answer"], reward_weights=[1.0]),
         "`reward_weights` has 1 weight(s) for 2 reward function(s)"),
        (dict(method="sft", reward_funcs=["length"]), "`reward_funcs` applies to `method: grpo` only"),
        (dict(method="dpo", beta=0.0), "`beta` must be > 0 for `method: dpo`"),
        (dict(method="grpo", reward_funcs=["length"], max_seq_length=64, max_completion_length=64),
         "leaves no room for the prompt"),
    ]
    for values, message in bad:
        with pytest.raises(ConfigError) as err:
            build_config({"model_name": "m", **values}, "recipe.yaml")
        assert message in str(err.value) and "recipe.yaml" in str(err.value), (values, str(err.value))


def test_bad_prompt_lines_are_reported_with_their_place(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "What is 6 x 7?", "answer": "42"}),
        "{broken",
        json.dumps({"answer": "1"}),
        json.dumps({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"prompt": "hi", "completions": ["x"]}),
        json.dumps({"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": 2}),
    ]) + "\n")
    with pytest.raises(DataValidationError) as err:
        load_prompt_file(path)
    text = str(err.value)
    for line, reason in [(2, "bad JSON"), (3, "missing field: prompt"), (4, "must end with a user message"),
                         (5, "`completions` is reserved")]:
        assert f"{path}:{line}: " in text and reason in text, (line, reason, text)
    prompts, report = load_prompt_file(path, on_bad_example="skip")
    assert report.skipped == 4 and [p.column_values()["answer"] for p in prompts] == ["42", 2]
    assert prompts[0].prompt[0].role == "user" and prompts[0].raw_prompt == "What is 6 x 7?"


# -- rewards -------------------------------------------------------------------------------------


def test_built_in_rewards():
    completions = ["<think>6 x 7 = 42</think>The answer is 42.", "<think>hmm</think>Answer: 41", "42",
                   "<think>no answer</think>  ", "<think>a</think>1,000", "Answer: 3.50 apples"]
    assert exact_answer([None] * 6, completions, answer=["42", "42", 42, "7", "1000", "3.5"]) == [
        1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert exact_answer([None], ["<think>42</think>41"], answer=["42"]) == [0.0]  # the thinking does not count
    assert exact_answer([None], ["x"], answer=[None]) == [None]
    assert think_format([None] * 6, completions) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert length([None] * 3, ["a" * 10, "a" * 15, "a" * 40], length_target=[10, 10, 10]) == [0.0, -0.5, -1.0]
    assert length([None], ["short"]) == [0.0]


def test_reward_errors_name_the_function_and_the_example(tmp_path):
    module = tmp_path / "my_rewards.py"
    module.write_text(
        "def picky(prompts, completions, **kw):\n"
        "    return [1 / (len(c) - 3) for c in completions]\n"  # ZeroDivisionError on a 3-character completion
        "def wordy(prompts, completions, **kw):\n"
        "    return ['good' if 'x' in c else 0.5 for c in completions]\n"
        "def partial(prompts, completions, **kw):\n"
        "    return [True, 0, None]\n")
    sources = ["data.jsonl:4", "data.jsonl:9", "data.jsonl:12"]
    picky, wordy, ok = (load_reward(f"{module}:{name}") for name in ("picky", "wordy", "partial"))
    with pytest.raises(RewardError, match=r"reward 'picky' raised ZeroDivisionError.* on the completion of data.jsonl:9"):
        score("picky", picky, [None] * 3, ["abcd", "abc", "abcde"], {}, sources)
    with pytest.raises(RewardError, match=r"reward 'wordy' returned 'good' for the completion of data.jsonl:12"):
        score("wordy", wordy, [None] * 3, ["a", "b", "x"], {}, sources)
    with pytest.raises(RewardError, match=r"reward 'short' returned 2 values for 3 completions"):
        score("short", lambda p, c, **k: [0.0, 1.0], [None] * 3, ["a", "b", "c"], {}, sources)
    with pytest.raises(RewardError, match=r"returned nan for the completion of data.jsonl:4"):
        score("nan", lambda p, c, **k: [math.nan, 1.0, 1.0], [None] * 3, ["a", "b", "c"], {}, sources)
    values = score("partial", ok, [None] * 3, ["a", "b", "c"], {}, sources)
    assert values[:2] == [1.0, 0.0] and math.isnan(values[2])  # None: does not apply
    for spec, message in [("nope", "not a built-in"), (f"{tmp_path}/missing.py:f", "no such file"),
                          (f"{module}:absent", "has no function 'absent'"), ("no_such_pkg.mod:f", "cannot import")]:
        with pytest.raises(RewardError, match=message):
            load_reward(spec)
    assert load_reward("json:dumps") is json.dumps  # package.module:function


# -- the loss --------------------------------------------------------------------------------------


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0, 0.0, 2.0, 4.0, 6.0])
    advantages = group_advantages(rewards, 4).view(3, 4)
    assert torch.allclose(advantages.mean(dim=1), torch.zeros(3), atol=1e-6)
    assert torch.equal(advantages[1], torch.zeros(4))  # a group that agrees teaches nothing
    assert torch.allclose(advantages[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (math.sqrt(1 / 3) + 1e-4))
    assert advantages[2].std().item() == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(group_advantages(rewards, 4, scale=False).view(3, 4)[2], torch.tensor([-3.0, -1.0, 1.0, 3.0]))


def _trl_grpo_trainer(policy, tokenizer, tmp_path, **args):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, report_to=[],
                        use_cpu=True, bf16=False, **args)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "Count."}]}] * 4)
    return GRPOTrainer(model=policy, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                       args=config, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("dr_grpo", 0.0), ("dapo", 0.0), ("grpo", 0.1),
                                            ("dr_grpo", 0.1), ("dapo", 0.1)])
def test_loss_agrees_with_trl_on_the_same_model_completions_and_advantages(tiny_llama_dir, tmp_path, loss_type, beta):
    """TRL's own `_compute_loss` and ours on one batch: the same policy, a reference (the
    base weights), old log-probs from a third, drifted model (so ratios differ from 1 and
    both clip bounds bite), the same prompts, completions and advantages. Compared: the
    loss and its gradient on every weight. Equal-length prompts, so TRL's left-padded
    layout and ours (no padding before the completion) give the same positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    old = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy drifted from the reference, and its old self drifted differently
        for p, q in zip(policy.parameters(), old.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
            q.add_(0.05 * torch.randn(q.shape, generator=generator))
    max_completion_length = 6
    trl = _trl_grpo_trainer(policy, tokenizer, tmp_path, beta=beta, loss_type=loss_type, epsilon=0.2,
                            epsilon_high=0.28, max_completion_length=max_completion_length, temperature=0.9)
    trl.current_gradient_accumulation_steps = 1
    policy.train()  # TRL disables dropout; the tiny Llama has none anyway

    prompt_ids = torch.randint(100, 1000, (4, 5), generator=generator)
    completion_ids = torch.randint(100, 1000, (4, max_completion_length), generator=generator)
    completion_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5])
    advantages = torch.tensor([1.3, -0.4, -1.1, 0.2])
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1)
    temperature = 0.9

    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :prompt_ids.shape[1]] = IGNORE_INDEX
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    inputs = (input_ids, labels, positions, attention_mask)
    with torch.no_grad():
        old_logps, rows = token_logps(old, *inputs, temperature=temperature)
        ref_logps = token_logps(trl.ref_model, *inputs, temperature=temperature)[0] if beta else None
    dense = lambda flat: torch.zeros(completion_mask.shape).masked_scatter(completion_mask.bool(), flat)  # noqa: E731
    batch = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
             "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": dense(old_logps),
             "num_items_in_batch": completion_mask.sum()}
    if beta:
        batch["ref_per_token_logps"] = dense(ref_logps)
    trl_loss = trl._compute_loss(policy, batch)
    trl_grads = torch.autograd.grad(trl_loss, list(policy.parameters()))

    logps, rows = token_logps(policy, *inputs, temperature=temperature)
    token = clipped_token_loss(logps, advantages[rows], epsilon=0.2, epsilon_high=0.28, old_logps=old_logps,
                               ref_logps=ref_logps, beta=beta)
    norm, unit = LOSS_NORMS[loss_type]
    weight = int(completion_mask.sum()) if unit == "tokens" else 4  # the loop's batch_weight
    ours = norm(token.loss, rows, torch.bincount(rows, minlength=4), max_completion_length) / weight
    grads = torch.autograd.grad(ours, list(policy.parameters()))

    assert 0 < token.clipped.float().mean() < 1, "some tokens must clip, some not"
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    for ours_grad, trl_grad in zip(grads, trl_grads):
        assert torch.allclose(ours_grad, trl_grad, atol=1e-4), (ours_grad - trl_grad).abs().max()


# -- training ----------------------------------------------------------------------------------------

STARTS_WITH = (
    "def starts_with(prompts, completions, targets, **columns):\n"
    "    return [float(c.startswith(tuple(t))) for c, t in zip(completions, targets)]\n"
)


PROMPT = "Say something."
TEMPERATURE = 0.3  # a random model spreads its probability thinly; sampling cooler gives the reward a start


def write_prompts(path: Path, targets: list[str], n: int = 12) -> Path:
    """The same prompt on every line (an `id` column keeps the lines apart), so the
    reward's starting rate is the one the fixture measured."""
    rows = [{"prompt": [{"role": "user", "content": PROMPT}], "targets": targets, "id": i} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grpo_config(model_dir: Path, out: Path, reward_file: Path, **overrides) -> TrainingConfig:
    values = dict(method="grpo", reward_funcs=[f"{reward_file}:starts_with"], num_generations=8,
                  max_completion_length=3, batch_size=2, val_fraction=0.0, num_samples=0, merge_adapter=False,
                  learning_rate=1e-2, warmup_steps=0, lr_scheduler="constant", mixed_precision="fp32",
                  temperature=TEMPERATURE)
    return config_for(model_dir, out, **(values | overrides))


@pytest.fixture(scope="module")
def reward_task(tiny_llama_dir, tokenizer, tmp_path_factory):
    """Prompts whose reward is "the completion starts with X", X the tiny model's second
    likeliest first token at the sampling temperature (so the reward starts well above 0
    and well below 1), and the probability it starts with."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("grpo")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        probs = (model(ids).logits[0, -1] / TEMPERATURE).softmax(-1)
    plain = [i for i in probs.argsort(descending=True).tolist()[:20]
             if i not in tokenizer.all_special_ids and tokenizer.decode([i]).strip()]
    target = plain[1]
    reward_file = folder / "rewards.py"
    reward_file.write_text(STARTS_WITH)
    return write_prompts(folder / "prompts.jsonl", [tokenizer.decode([target])]), reward_file, probs[target].item()


def train_records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "logs/metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"]


def test_lora_grpo_raises_a_verifiable_reward(tiny_llama_dir, reward_task, tmp_path):
    data, reward_file, start = reward_task
    assert 0.05 < start < 0.5
    config = grpo_config(tiny_llama_dir, tmp_path / "out", reward_file, max_steps=12)
    recipe = Trainer(config, progress=False).recipe
    assert isinstance(recipe, GRPORecipe)
    recipe.setup(data)
    result = recipe.train()
    train = train_records(tmp_path / "out")
    rewards = [r["reward_starts_with"] for r in train]
    assert len(rewards) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3, rewards
    for key in ("reward", "reward_std", "reward_starts_with_std", "completion_length", "clip_ratio", "loss"):
        assert key in train[-1], key
    assert "kl" not in train[-1] and recipe.reference is None  # beta 0: no reference at all
    assert 1 <= train[-1]["completion_length"] <= 3
    assert (result.model_dir / "adapter/adapter_model.safetensors").is_file()


def test_lora_with_kl_uses_the_adapters_disabled_reference(tiny_llama_dir, reward_task, tmp_path):
    data, reward_file, _ = reward_task
    config = grpo_config(tiny_llama_dir, tmp_path / "out", reward_file, max_steps=2, beta=0.05, loss_type="grpo",
                         val_fraction=0.25, num_generations=4)
    recipe = Trainer(config, progress=False).recipe
    recipe.setup(data)
    result = recipe.train()
    assert recipe.reference is None  # the reference is the same weights with adapters off
    base = sum(p.numel() for p in recipe.model.get_base_model().parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in recipe.model.parameters() if p.requires_grad)
    held = {id(p): p.numel() for value in vars(recipe).values() if isinstance(value, torch.nn.Module)
            for p in value.parameters()}
    assert sum(held.values()) == base + lora  # every parameter the recipe holds, counted once
    train = train_records(tmp_path / "out")
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1 samples from the reference itself
    assert train[-1]["kl"] > 0  # the adapters have moved the policy since
    assert result.metrics["eval_loss"] == -result.metrics["eval_reward"]  # eval: rewards on the held-out prompts


def test_full_fine_tune_with_kl_keeps_a_frozen_reference(tiny_llama_dir, reward_task, tmp_path):
    data, reward_file, _ = reward_task
    config = grpo_config(tiny_llama_dir, tmp_path / "out", reward_file, max_steps=1, use_lora=False, beta=0.1,
                         learning_rate=1e-3, num_generations=4)
    recipe = Trainer(config, progress=False).recipe
    recipe.setup(data)
    frozen = {n: p.clone() for n, p in recipe.reference.model.named_parameters()}
    before = {n: p.clone() for n, p in recipe.model.named_parameters()}
    result = recipe.train()
    assert result.state.step == 1
    assert all(torch.equal(p, frozen[n]) for n, p in recipe.reference.model.named_parameters())
    assert not all(torch.equal(p, before[n]) for n, p in recipe.model.named_parameters())
    assert (result.model_dir / "model.safetensors").is_file()


def test_in_process_resume_is_bitwise_identical(tiny_llama_dir, reward_task, tmp_path):
    """Cancelled after step 3, resumed from the step-2 checkpoint: the resumed run samples
    the same completions (the sampling RNG is in the checkpoint), so its rewards, losses
    and weights are the uninterrupted run's, bit for bit."""
    data, reward_file, _ = reward_task
    config = grpo_config(tiny_llama_dir, tmp_path / "straight", reward_file, max_steps=4, gradient_accumulation_steps=2,
                         checkpoint_every_steps=2, beta=0.05, lora_dropout=0.1, num_generations=4)
    straight = Trainer(config, progress=False).train(data)

    resumed_config = config.model_copy(update={"output_dir": str(tmp_path / "resumed")})
    train_cancelled_at(resumed_config, data, step=3)
    assert LocalCheckpointStore(tmp_path / "resumed/checkpoints").latest().step == 2
    resumed = Trainer(resumed_config, progress=False).train(data)

    def logged(out: Path) -> list[dict]:
        records = [json.loads(line) for line in (out / "logs/metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in records
                if r["split"] == "train"]

    assert resumed.metrics["train_loss"] == straight.metrics["train_loss"]
    straight_log, resumed_log = logged(tmp_path / "straight"), logged(tmp_path / "resumed")
    by_step = {r["step"]: r for r in resumed_log}  # steps 1-3, then 3-4 again after the resume
    assert [by_step[r["step"]] for r in straight_log] == straight_log
    assert len({r["reward"] for r in straight_log}) > 1  # rewards vary: the sampled completions matter
    a = load_file(straight.model_dir / "adapter/adapter_model.safetensors")
    b = load_file(resumed.model_dir / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_reward_that_fails_in_training_names_the_function_and_the_line(tiny_llama_dir, tmp_path):
    data = write_prompts(tmp_path / "prompts.jsonl", ["x"], n=4)
    rewards = tmp_path / "bad.py"
    rewards.write_text("def starts_with(prompts, completions, targets, **kw):\n    return ['yes'] * len(completions)\n")
    recipe = Trainer(grpo_config(tiny_llama_dir, tmp_path / "out", rewards, max_steps=1), progress=False).recipe
    recipe.setup(data)
    with pytest.raises(RewardError, match=rf"reward 'starts_with' returned 'yes' for the completion of {data}:\d"):
        recipe.train()
