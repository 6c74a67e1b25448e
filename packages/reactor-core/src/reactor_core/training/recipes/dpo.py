"""`method: dpo`: preference tuning (DPO family) on the shared loop.

One small function per loss, as torchtune's `rlhf/loss/dpo.py` does, not a chain of
string cases:

  sigmoid (DPO, Rafailov et al. 2023), with label smoothing (cDPO):
      Δ = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))
      loss = -(1 - ε) log σ(β Δ) - ε log σ(-β Δ)
  ipo (Azar et al. 2023), length-normalized as TRL does (confirmed with the authors):
      Δ = (log π(c) - log π_ref(c)) / |c| - (log π(r) - log π_ref(r)) / |r|
      loss = (Δ - 1/(2β))²

log π sums over the completion tokens only (the prompt is masked). The reference is
the same model with its LoRA adapters disabled when training LoRA (no second copy in
memory), and a frozen copy for full fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from reactor_core.data import Batch, collate_padded
from reactor_core.data.preference import TokenizedPair, load_preference_file, tokenize_preferences
from reactor_core.training import distributed
from reactor_core.training.recipes.base import Recipe


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def ipo_loss(delta_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    return (delta_per_token - 1 / (2 * beta)) ** 2


def preference_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *, loss_type: str, beta: float, label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward); rewards are β (log π - log π_ref), detached."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = ipo_loss(delta, beta)
    else:
        losses = sigmoid_loss(chosen_ratio - rejected_ratio, beta, label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@dataclass(frozen=True)
class PairBatch(Batch):
    """Chosen rows, then rejected rows; with their reference log-probs when precomputed."""

    reference_logps: torch.Tensor | None = None  # (B,)


class DPORecipe(Recipe):
    """Pairs as items, the preference loss, and a reference model to measure against."""

    def setup_data(self, data_path: Path) -> None:
        c = self.config
        train, val = self.read_splits(data_path, partial(load_preference_file, on_bad_example=c.on_bad_example))
        self.train_items, _ = tokenize_preferences(train, self.tokenizer, max_seq_length=c.max_seq_length,
                                                   on_bad_example=c.on_bad_example)
        self.val_items, _ = tokenize_preferences(val, self.tokenizer, max_seq_length=c.max_seq_length,
                                                 on_bad_example=c.on_bad_example)
        if not self.train_items:
            raise ValueError(f"{data_path}: no usable preference pairs")
        # no greedy samples (`samples`): an SFT habit; DPO logs rewards instead

    def setup_model(self) -> None:
        self.model = self.load_model()
        # LoRA: the reference is the model with adapters off. Full fine-tuning: a frozen copy
        # (taken before sharding: FSDP shards it like the policy).
        c = self.config
        needs_copy = not c.use_lora and not c.precompute_ref_logps
        frozen = copy.deepcopy(self.model).eval().requires_grad_(False) if needs_copy else None
        self.loss_module = self.wrap(self.model)
        self.reference = self.wrap(frozen) if frozen is not None else None
        self.after_sharding()
        self._stats: list[torch.Tensor] = []
        if c.precompute_ref_logps:  # before any checkpoint is restored: the weights are the reference
            self.train_items = self._with_reference(self.train_items)
            self.val_items = self._with_reference(self.val_items)

    @torch.no_grad()
    def _with_reference(self, pairs: list[TokenizedPair]) -> list[TokenizedPair]:
        """The pairs with the reference model's log-probs attached, batch by batch.

        Every rank scores every pair in the same order (FSDP's collectives need the same
        forwards on all ranks); it happens once per (re)start.
        """
        self.loss_module.eval()
        out: list[TokenizedPair] = []
        size = self.config.batch_size
        for start in range(0, len(pairs), size):
            chunk = pairs[start:start + size]
            batch = self.collate(chunk)
            with self.autocast_context():
                logps = self.loss_module(*self.model_inputs(batch), per_sequence=True,
                                         adapters=not self.config.use_lora)[0].float().cpu()
            n = len(chunk)
            out += [dataclasses.replace(p, reference=(logps[i].item(), logps[n + i].item())) for i, p in enumerate(chunk)]
        return out

    def collate(self, items: list[TokenizedPair]) -> PairBatch:
        """Chosen rows first, then rejected: rows i and i + B are one pair."""
        batch = collate_padded([p.chosen for p in items] + [p.rejected for p in items], self.tokenizer.pad_token_id)
        reference = None
        if all(p.reference is not None for p in items):
            reference = torch.tensor([p.reference[0] for p in items] + [p.reference[1] for p in items])
        return PairBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}, reference_logps=reference)

    def batch_weight(self, batch: Batch) -> int:
        """Pairs: the loss is a mean over pairs; a loss-free filler batch (distributed tail) has none."""
        return batch.input_ids.shape[0] // 2 if batch.num_loss_tokens else 0

    def _reference_logps(self, inputs: tuple, batch: PairBatch) -> torch.Tensor:
        if batch.reference_logps is not None:
            return batch.reference_logps.to(self.device)
        with torch.no_grad():
            if self.reference is not None:
                return self.reference(*inputs, per_sequence=True)[0]
            return self.loss_module(*inputs, per_sequence=True, adapters=False)[0]

    def loss_sum(self, batch: Batch, training: bool = False) -> torch.Tensor:
        # DPO's own pull towards the reference is `beta`; the config refuses `kl_to_base` here
        c = self.config
        inputs = self.model_inputs(batch)
        with self.autocast_context():
            policy, counts = self.loss_module(*inputs, per_sequence=True)
            reference = self._reference_logps(inputs, batch)
        pairs = policy.shape[0] // 2
        losses, chosen_reward, rejected_reward = preference_loss(
            policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], counts[:pairs], counts[pairs:],
            loss_type=c.loss_type, beta=c.beta, label_smoothing=c.label_smoothing,
        )
        if not batch.num_loss_tokens:
            return losses.sum() * 0.0  # keeps the graph (and FSDP's reduce) without a contribution
        self._stats.append(torch.stack([chosen_reward, rejected_reward], dim=1))
        return losses.sum()

    def _take_stats(self) -> dict[str, float]:
        """Reward means and preference accuracy over the pairs every rank saw."""
        rewards = torch.cat(self._stats) if self._stats else torch.zeros(0, 2)  # (pairs, 2)
        self._stats = []
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        sums = distributed.all_reduce([chosen.sum().item(), rejected.sum().item(),
                                       (chosen > rejected).sum().item(), float(len(rewards))])
        n = sums[3]
        if not n:
            return {}
        return {"reward_chosen": sums[0] / n, "reward_rejected": sums[1] / n, "reward_margin": (sums[0] - sums[1]) / n,
                "reward_accuracy": sums[2] / n}

    def train_step(self) -> dict[str, float]:
        values = super().train_step()
        return values | self._take_stats()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.val_items:
            return {}
        self.loss_module.eval()
        self._stats = []
        loss_sum, pairs = 0.0, 0
        for batch in self.eval_batches():
            loss_sum += self.loss_sum(batch).item()
            pairs += self.batch_weight(batch)
        loss_sum, pairs = distributed.all_reduce([loss_sum, pairs])
        return {"eval_loss": loss_sum / pairs} | {f"eval_{k}": v for k, v in self._take_stats().items()}
