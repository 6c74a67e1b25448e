"""`method: grpo`: group-relative policy optimisation with verifiable rewards.

Per prompt, the policy samples a group of `num_generations` completions; Python
reward functions (`reward_funcs`, see rewards.py) score them; each completion's
advantage is its reward against its own group's (Shao et al. 2024, DeepSeekMath):

    r_i = Σ_f w_f r_f(i)                       (None counts 0, as TRL's nansum)
    A_i = (r_i - mean_g r) / (std_g r + 1e-4)    (dr_grpo: A_i = r_i - mean_g r)

and every completion token t of completion i is pushed along it, clipped (PPO):

    ρ_t = π(t) / π_old(t)                        (π at the sampling temperature)
    l_t = -min(ρ_t A_i, clip(ρ_t, 1 - ε, 1 + ε_high) A_i) + β KL_t
    KL_t = ρ_t (π_ref(t)/π(t) - log(π_ref(t)/π(t)) - 1)   (k3, importance-corrected; β = 0: none)

One small function per normalisation (`LOSS_NORMS`), the step's mean being the loop's
`loss_sum / batch_weight`:

    dapo     Σ_t l_t / (completion tokens of the step)          (DAPO, Yu et al. 2025; TRL's default)
    grpo     Σ_i (Σ_t l_t / |i|) / (completions of the step)    (the paper's per-sequence mean)
    dr_grpo  Σ_t l_t / (completions x max_completion_length)    (Dr. GRPO, Liu et al. 2025)

The completions are sampled once per step and trained on once (TRL's default
`num_iterations = 1`), so π_old is π itself, detached: ρ = 1 in value, the gradient
is the policy gradient, and the clip fraction stays 0; the clipped form is kept (and
checked against TRL with a π_old that differs) so a later multi-iteration step only
has to pass the old log-probs.

Why transformers' `generate` and not llama.cpp: the policy changes every step, and
sampling must come from the weights being trained. llama.cpp would need the (merged)
weights exported to GGUF and reloaded at each step, seconds to minutes for a real base
against the step itself; `generate` samples from the very modules being trained, LoRA
adapters and FSDP shards included, with nothing to keep in sync. Sampling draws from
torch's RNG on the device, which every checkpoint saves per rank (rng.pt), so a
resumed run samples exactly the completions an uninterrupted one would.

The reference is the model with its LoRA adapters disabled (no second copy), or a
frozen copy for full fine-tuning, and only when `beta` > 0: with `beta: 0` (GRPO's
default) none is loaded or kept.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from reactor_core.data import Batch, TokenizedExample, collate_padded
from reactor_core.data.prompts import TokenizedPrompt, load_prompt_file, tokenize_prompts
from reactor_core.data.tokenize import IGNORE_INDEX
from reactor_core.training import distributed
from reactor_core.training.recipes.base import Recipe
from reactor_core.training.rewards import load_reward, reward_name, score

ADVANTAGE_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets advantage 0, not 0/0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """(B*G,) advantages of (B*G,) rewards, groups of `group_size` consecutive rows:
    the reward minus its group's mean, divided by the group's (unbiased) std + 1e-4
    when `scale` (Dr. GRPO leaves the std out: it favours groups that nearly agree)."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    return advantages.reshape(-1)


@dataclass(frozen=True)
class TokenLoss:
    """Per completion token (N,): the loss, and what is logged about it."""

    loss: torch.Tensor
    kl: torch.Tensor | None  # None without a reference (beta 0)
    clipped: torch.Tensor  # bool: the clipped term was the smaller one


def clipped_token_loss(
    logps: torch.Tensor,  # (N,) log π(t) at the sampling temperature
    advantages: torch.Tensor,  # (N,) the advantage of each token's completion
    *,
    epsilon: float,
    epsilon_high: float,
    old_logps: torch.Tensor | None = None,  # (N,) log π_old(t); None: on-policy (π detached)
    ref_logps: torch.Tensor | None = None,  # (N,) log π_ref(t); None: no KL term
    beta: float = 0.0,
) -> TokenLoss:
    """l_t = -min(ρ A, clip(ρ, 1-ε, 1+ε_high) A) + β KL_t (the module docstring's formula)."""
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    unclipped, clipped = ratio * advantages, clipped_ratio * advantages
    loss = -torch.min(unclipped, clipped)
    kl = None
    if ref_logps is not None and beta:
        # k3 times the ratio: E_old[ρ k3] estimates KL(π || π_ref) under the policy, not
        # the sampler, and its gradient is the KL's (TRL's default use_bias_correction_kl)
        kl = (torch.exp(ref_logps - logps) - (ref_logps - logps) - 1) * ratio
        loss = loss + beta * kl
    return TokenLoss(loss, kl, clipped < unclipped)


def dapo_sum(loss: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, max_completion_length: int) -> torch.Tensor:
    return loss.sum()


def grpo_sum(loss: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, max_completion_length: int) -> torch.Tensor:
    return (loss / counts[rows].clamp(min=1)).sum()  # each completion's token mean, summed


def dr_grpo_sum(loss: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, max_completion_length: int) -> torch.Tensor:
    return loss.sum() / max_completion_length


# loss_type -> (the micro-batch's loss sum, what the step's mean divides it by: "tokens" or "completions")
LOSS_NORMS = {"dapo": (dapo_sum, "tokens"), "grpo": (grpo_sum, "completions"), "dr_grpo": (dr_grpo_sum, "completions")}


@dataclass(frozen=True)
class RolloutBatch(Batch):
    """The sampled completions of `batch_size` prompts, `num_generations` rows each
    (group by group): prompt + completion per row, labels on the completion only."""

    advantages: torch.Tensor | None = None  # (R,) one per row
    rewards: torch.Tensor | None = None  # (R, F) per reward function, NaN where it returned None
    completion_lengths: torch.Tensor | None = None  # (R,) tokens sampled, EOS included


class GRPORecipe(Recipe):
    """Prompts as items; each micro-batch samples, scores and trains on their groups."""

    def setup_data(self, data_path: Path) -> None:
        c = self.config
        # reward functions first: a typo in a name fails before the data is read or a model loads
        self.reward_funcs = [load_reward(spec) for spec in c.reward_funcs]
        self.reward_names = [reward_name(spec) for spec in c.reward_funcs]
        self.reward_weights = torch.tensor(c.reward_weights or [1.0] * len(c.reward_funcs))
        train, val = self.read_splits(data_path, partial(load_prompt_file, on_bad_example=c.on_bad_example))
        limit = c.max_seq_length - c.max_completion_length
        self.train_items, _ = tokenize_prompts(train, self.tokenizer, max_prompt_length=limit,
                                               on_bad_example=c.on_bad_example)
        self.val_items, _ = tokenize_prompts(val, self.tokenizer, max_prompt_length=limit,
                                             on_bad_example=c.on_bad_example)
        if not self.train_items:
            raise ValueError(f"{data_path}: no usable prompts")

    def setup_model(self) -> None:
        self.model = self.load_model()
        c = self.config
        # the KL's reference, only with beta > 0: LoRA's is the adapters disabled; a full
        # fine-tune's a frozen copy (taken before sharding: FSDP shards it like the policy)
        frozen = copy.deepcopy(self.model).eval().requires_grad_(False) if c.beta > 0 and not c.use_lora else None
        self.loss_module = self.wrap(self.model)
        self.reference = self.wrap(frozen) if frozen is not None else None
        self.after_sharding()
        self._stats: list[dict[str, torch.Tensor]] = []

    # -- sampling and scoring ---------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[TokenizedPrompt]) -> list[list[int]]:
        """`num_generations` sampled completions per prompt (group by group), each cut
        after its first EOS (kept: the model learns to stop), in one batched `generate`."""
        from transformers import GenerationConfig

        c = self.config
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = [p.input_ids for p in prompts for _ in range(c.num_generations)]
        width = max(len(r) for r in rows)
        # left padding: every row's next token is sampled at the same column
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        # the tokenizer's EOS and the model's own stop tokens (an instruct model's end-of-turn)
        own = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stops = [tokenizer.eos_token_id, *(own if isinstance(own, list) else [own])]
        stops = list(dict.fromkeys(t for t in stops if t is not None))
        generation = GenerationConfig(
            do_sample=True, temperature=c.temperature, top_p=c.top_p, top_k=0, max_new_tokens=c.max_completion_length,
            pad_token_id=pad, eos_token_id=stops, use_cache=True)
        was_training = self.loss_module.training
        self.loss_module.eval()
        root_unsharded = self.dist.enabled
        if root_unsharded:  # FSDP2: generate bypasses the root's forward, so gather its own weights here
            self.loss_module.unshard()
        try:
            with self.autocast_context():
                # synced_gpus: with FSDP every rank runs as many forwards as the longest, for the all-gathers
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                          generation_config=generation, synced_gpus=self.dist.enabled)
        finally:
            if root_unsharded:
                self.loss_module.reshard()
            self.loss_module.train(was_training)
        completions = []
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), None)
            completions.append(row if end is None else row[:end + 1])
        return completions

    def rewards(self, prompts: list[TokenizedPrompt], texts: list[str]) -> torch.Tensor:
        """(R, F) rewards of the R completions (group by group) from each of the F functions."""
        g = self.config.num_generations
        examples = [p.example for p in prompts for _ in range(g)]
        columns: dict[str, list[Any]] = {}
        for example in examples:
            for key, value in example.column_values().items():
                if key != "prompt":
                    columns.setdefault(key, [])
        for example in examples:
            values = example.column_values()
            for key in columns:
                columns[key].append(values.get(key))
        raw = [e.raw_prompt for e in examples]
        sources = [e.source for e in examples]
        per_func = [score(name, func, raw, texts, columns, sources)
                    for name, func in zip(self.reward_names, self.reward_funcs)]
        return torch.tensor(per_func, dtype=torch.float32).T.reshape(len(texts), len(per_func))

    def collate(self, items: list[TokenizedPrompt]) -> RolloutBatch:
        """Sample the groups, score them, and lay each row out as prompt + completion
        (right-padded, positions from 0: no left padding reaches the loss)."""
        c = self.config
        completions = self.generate(items)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewards = self.rewards(items, texts)  # (R, F)
        total = (rewards * self.reward_weights).nansum(dim=1)  # (R,)
        advantages = group_advantages(total, c.num_generations, scale=c.loss_type != "dr_grpo")
        prompts = [p for p in items for _ in range(c.num_generations)]
        rows = [TokenizedExample(p.input_ids + ids, [IGNORE_INDEX] * len(p) + ids, p.example.source)
                for p, ids in zip(prompts, completions)]
        batch = collate_padded(rows, self.tokenizer.pad_token_id)
        return RolloutBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)},
                            advantages=advantages, rewards=rewards,
                            completion_lengths=torch.tensor([len(ids) for ids in completions]))

    # -- the loss ------------------------------------------------------------------------------

    def batch_weight(self, batch: Batch) -> int:
        """Completion tokens (dapo) or completions (grpo, dr_grpo); 0 for a loss-free filler."""
        if not batch.num_loss_tokens:
            return 0
        return batch.num_loss_tokens if LOSS_NORMS[self.config.loss_type][1] == "tokens" else batch.input_ids.shape[0]

    def _reference_logps(self, inputs: tuple) -> torch.Tensor | None:
        c = self.config
        if not c.beta:
            return None
        with torch.no_grad():
            if self.reference is not None:
                return self.reference(*inputs, temperature=c.temperature)[0]
            return self.loss_module(*inputs, temperature=c.temperature, adapters=False)[0]

    def loss_sum(self, batch: Batch, training: bool = False) -> torch.Tensor:
        assert isinstance(batch, RolloutBatch)
        c = self.config
        inputs = self.model_inputs(batch)
        with self.autocast_context():
            logps, rows = self.loss_module(*inputs, temperature=c.temperature)  # (N,), (N,)
            ref = self._reference_logps(inputs)
        advantages = batch.advantages.to(self.device)
        token = clipped_token_loss(logps, advantages[rows], epsilon=c.epsilon, epsilon_high=c.epsilon_high or c.epsilon,
                                   ref_logps=ref, beta=c.beta)
        counts = torch.bincount(rows, minlength=batch.input_ids.shape[0])
        norm, _ = LOSS_NORMS[c.loss_type]
        loss = norm(token.loss, rows, counts, c.max_completion_length)
        if not batch.num_loss_tokens:
            return loss * 0.0  # keeps the graph (and FSDP's reduce) without a contribution
        self._stats.append({"rewards": batch.rewards, "lengths": batch.completion_lengths.float(),
                            "kl": (token.kl.detach().float().sum().cpu() if token.kl is not None else torch.tensor(0.0)),
                            "clipped": token.clipped.float().sum().cpu(), "tokens": torch.tensor(float(len(rows)))})
        return loss

    # -- metrics ---------------------------------------------------------------------------------

    def _take_stats(self, prefix: str = "") -> dict[str, float]:
        """Reward mean/std per function and in total, completion length, KL and clip
        fraction over the completions every rank sampled since the last call."""
        stats, self._stats = self._stats, []
        names = self.reward_names
        rewards = torch.cat([s["rewards"] for s in stats]) if stats else torch.zeros(0, len(names))  # (R, F)
        total = (rewards * self.reward_weights).nansum(dim=1) if len(rewards) else torch.zeros(0)
        columns = [rewards[:, f] for f in range(len(names))] + [total]
        sums: list[float] = []
        for column in columns:  # count, sum, sum of squares of the non-None values
            present = column[~column.isnan()]
            sums += [float(len(present)), present.sum().item(), (present ** 2).sum().item()]
        lengths = torch.cat([s["lengths"] for s in stats]) if stats else torch.zeros(0)
        sums += [float(len(lengths)), lengths.sum().item()]
        sums += [sum(s[k].item() for s in stats) for k in ("kl", "clipped", "tokens")]
        sums = distributed.all_reduce(sums)
        values: dict[str, float] = {}
        for i, name in enumerate([f"reward_{n}" for n in names] + ["reward"]):
            n, total_sum, squares = sums[3 * i:3 * i + 3]
            if not n:
                continue
            mean = total_sum / n
            values[f"{prefix}{name}"] = mean
            values[f"{prefix}{name}_std"] = math.sqrt(max(squares - n * mean * mean, 0.0) / (n - 1)) if n > 1 else 0.0
        completions, length_sum, kl, clipped, tokens = sums[3 * len(columns):]
        if completions:
            values[f"{prefix}completion_length"] = length_sum / completions
        if tokens:
            values[f"{prefix}clip_ratio"] = clipped / tokens
            if self.config.beta:
                values[f"{prefix}kl"] = kl / tokens
        return values

    def train_step(self) -> dict[str, float]:
        values = super().train_step()
        return values | self._take_stats()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Rewards of completions sampled for the validation prompts; `eval_loss` is the
        negated mean total reward, so "best checkpoint" retention keeps the best-rewarded."""
        if not self.val_items:
            return {}
        self.loss_module.eval()
        self._stats = []
        for batch in self.eval_batches():
            if batch.num_loss_tokens:
                self._stats.append({"rewards": batch.rewards, "lengths": batch.completion_lengths.float(),
                                    "kl": torch.tensor(0.0), "clipped": torch.tensor(0.0), "tokens": torch.tensor(0.0)})
        values = self._take_stats("eval_")
        return {"eval_loss": -values["eval_reward"]} | values
