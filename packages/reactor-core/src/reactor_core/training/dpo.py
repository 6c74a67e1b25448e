"""Preference tuning (DPO family) on the SFT recipe's loop.

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

import torch
import torch.nn.functional as F

from reactor_core.data import Batch, collate_padded, file_sha256
from reactor_core.data.preference import TokenizedPair, load_preference_file, split_preferences, tokenize_preferences
from reactor_core.training.loss import sequence_logps
from reactor_core.training.trainer import Trainer


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


class PreferenceTrainer(Trainer):
    """`method: dpo`: the SFT recipe with pairs as items and the preference loss."""

    def _setup_data(self, data_path) -> None:
        c = self.config
        examples, report = load_preference_file(data_path, on_bad_example=c.on_bad_example)
        self.data_files = [{"path": str(data_path), "sha256": file_sha256(data_path), "examples": report.examples}]
        if c.val_data_path:
            val, val_report = load_preference_file(c.val_data_path, on_bad_example=c.on_bad_example)
            self.data_files.append({"path": c.val_data_path, "sha256": file_sha256(c.val_data_path),
                                    "examples": val_report.examples, "split": "validation"})
            train = examples
        else:
            train, val = split_preferences(examples, val_fraction=c.val_fraction, seed=c.seed)
        self.data_report = report
        self.train_items, _ = tokenize_preferences(train, self.tokenizer, max_seq_length=c.max_seq_length,
                                                   on_bad_example=c.on_bad_example)
        self.val_items, _ = tokenize_preferences(val, self.tokenizer, max_seq_length=c.max_seq_length,
                                                 on_bad_example=c.on_bad_example)
        if not self.train_items:
            raise ValueError(f"{data_path}: no usable preference pairs")
        self.val_examples = []  # greedy samples are an SFT habit; DPO logs rewards instead
        self._setup_sampler()

    def _setup_model(self) -> None:
        super()._setup_model()
        # LoRA: the reference is the model with adapters off. Full fine-tuning: a frozen copy.
        self.reference = None if self.config.use_lora else copy.deepcopy(self.model).eval().requires_grad_(False)
        self._stats: list[torch.Tensor] = []

    def _collate(self, items: list[TokenizedPair]) -> Batch:
        """Chosen rows first, then rejected: rows i and i + B are one pair."""
        return collate_padded([p.chosen for p in items] + [p.rejected for p in items], self.tokenizer.pad_token_id)

    def _batch_weight(self, batch: Batch) -> int:
        return batch.input_ids.shape[0] // 2  # the loss is a mean over pairs

    def _reference_logps(self, inputs: tuple) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return sequence_logps(self.reference, *inputs)[0]
            with self.model.disable_adapter():
                return sequence_logps(self.model, *inputs)[0]

    def _forward_loss_sum(self, batch: Batch) -> torch.Tensor:
        c = self.config
        to = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        inputs = (to(batch.input_ids), to(batch.labels), to(batch.position_ids), to(batch.attention_mask))
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            policy, counts = sequence_logps(self.model, *inputs)
            reference = self._reference_logps(inputs)
        pairs = policy.shape[0] // 2
        losses, chosen_reward, rejected_reward = preference_loss(
            policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], counts[:pairs], counts[pairs:],
            loss_type=c.loss_type, beta=c.beta, label_smoothing=c.label_smoothing,
        )
        self._stats.append(torch.stack([chosen_reward, rejected_reward], dim=1))
        return losses.sum()

    def _take_stats(self) -> dict[str, float]:
        if not self._stats:
            return {}
        rewards = torch.cat(self._stats)  # (pairs, 2)
        self._stats = []
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        return {"reward_chosen": chosen.mean().item(), "reward_rejected": rejected.mean().item(),
                "reward_margin": (chosen - rejected).mean().item(),
                "reward_accuracy": (chosen > rejected).float().mean().item()}

    def _train_step(self) -> dict[str, float]:
        values = super()._train_step()
        return values | self._take_stats()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.val_items:
            return {}
        self.model.eval()
        self._stats = []
        loss_sum, pairs = 0.0, 0
        for start in range(0, len(self.val_items), self.config.batch_size):
            batch = self._collate(self.val_items[start:start + self.config.batch_size])
            loss_sum += self._forward_loss_sum(batch).item()
            pairs += self._batch_weight(batch)
        return {"eval_loss": loss_sum / pairs} | {f"eval_{k}": v for k, v in self._take_stats().items()}
