"""Next-token loss on the labelled (assistant) positions only.

The LM head is the single largest matmul of a small model's step: (tokens, hidden) x
(hidden, vocab). Chat SFT labels only the assistant replies, so the head runs on
those positions alone instead of on every token and then masking: same loss, a
fraction of the FLOPs and of the (tokens, vocab) logits memory.

Vision-language models run their multimodal body instead of the bare decoder (the
image features are computed from `pixel_values` and merged in at the image tokens),
then the same head on the same selected positions; `vision` carries the batch's
`pixel_values` / `pixel_attention_mask` (empty for a batch without images).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from reactor_core.training.attention import decoder_kwargs

IGNORE_INDEX = -100


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _needs_full_logits(model: nn.Module) -> bool:
    # Architectures that post-process logits (Gemma 2 soft-capping, Cohere scaling)
    # must go through their own forward to stay exact.
    config = model.config
    return bool(getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None))


def _hidden_at(
    model: nn.Module,
    input_ids: torch.Tensor,  # (B, T)
    position_ids: torch.Tensor,  # (B, T), restarting per packed example
    attention_mask: torch.Tensor | None,  # (B, T) for padded batches; None when packed
    select: torch.Tensor,  # (B, T-1) bool: the positions whose next-token logits are wanted
    vision: dict[str, Any] | None = None,  # pixel_values, pixel_attention_mask
) -> torch.Tensor:
    """The decoder's last hidden states (N, hidden) at the N selected positions."""
    base = _unwrap(model)
    # a vision model's body (base_model: vision tower, projector, language model) merges the images in
    body = base.base_model if hasattr(base.config, "vision_config") else base.get_decoder()
    hidden = body(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
        **(vision or {}), **decoder_kwargs(base, attention_mask),
    ).last_hidden_state  # (B, T, H)
    return hidden[:, :-1][select]


def _logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    select: torch.Tensor,
) -> torch.Tensor:
    """Next-token logits (N, vocab) at the N selected positions, the LM head run on those only."""
    base = _unwrap(model)
    if _needs_full_logits(base):
        logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
                       **decoder_kwargs(base, attention_mask)).logits
        return logits[:, :-1][select]
    return base.get_output_embeddings()(_hidden_at(model, input_ids, position_ids, attention_mask, select))


def head_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy sum of the LM head's logits for `hidden` (N, H) against `targets` (N,).

    Its own function so `compile: true` can fuse it: eager, the float32 (N, vocab)
    logits are written, read by log_softmax, written again and read back in the
    backward; compiled, the softmax reductions read the head's output once.
    """
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


HeadLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def labelled_logits(
    model: nn.Module,
    input_ids: torch.Tensor,  # (B, T)
    labels: torch.Tensor,  # (B, T), IGNORE_INDEX where no loss
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, vocab), targets (N,), row of each (N,)) for the N labelled positions."""
    targets = labels[:, 1:]  # (B, T-1): token t predicts t+1
    keep = targets != IGNORE_INDEX
    return _logits_at(model, input_ids, position_ids, attention_mask, keep), targets[keep], keep.nonzero()[:, 0]


def causal_lm_loss_sum(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    head_loss: HeadLoss = head_loss_sum,
    vision: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Sum (not mean) of token losses, so gradient accumulation can divide by the
    token count of the whole optimizer step and weight every token equally."""
    targets = labels[:, 1:]  # (B, T-1): token t predicts t+1
    keep = targets != IGNORE_INDEX
    base = _unwrap(model)
    if _needs_full_logits(base):
        if vision:
            raise ValueError(f"{base.config.model_type}: logit post-processing with images is not supported")
        logits = _logits_at(model, input_ids, position_ids, attention_mask, keep)
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    hidden = _hidden_at(model, input_ids, position_ids, attention_mask, keep, vision)
    return head_loss(base.get_output_embeddings(), hidden, targets[keep])


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(token) over each row's labelled tokens (B,), their count (B,)).

    DPO's sequence log-probability of a completion given its prompt.
    """
    logits, targets, rows = labelled_logits(model, input_ids, labels, position_ids, attention_mask)
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    batch = input_ids.shape[0]
    sums = torch.zeros(batch, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    counts = torch.bincount(rows, minlength=batch)
    return sums, counts


def token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(token) (N,) of each of the N labelled tokens, in row-major order, its row (N,)).

    GRPO's per-token log-probabilities of sampled completions. The logits are divided
    by the sampling `temperature` first, as TRL does: the ratio and KL then compare the
    distributions the completions were actually drawn from.
    """
    logits, targets, rows = labelled_logits(model, input_ids, labels, position_ids, attention_mask)
    logps = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return logps, rows


def sft_loss_sum_with_kl(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kl_weight: float,
    anchor_ids: torch.Tensor | None = None,  # (R, L) rows of anchor text
) -> torch.Tensor:
    """Cross-entropy sum on the labelled tokens plus `kl_weight` x KL(base || model).

    Where the KL is measured: on `anchor_ids` (plain text, every position) when given;
    otherwise on the batch's real positions that carry no label (the prompt, the chat
    template), leaving the replies it is taught to the cross-entropy alone. It is a
    mean over those positions, scaled by the labelled-token count so the step's usual
    division by that count leaves `kl_weight` x mean KL. The base is the same peft
    model with its adapters disabled: no second copy in memory. Costs one more forward
    without gradients, and the LM head on every position the KL covers.
    """
    if anchor_ids is not None:
        ce = causal_lm_loss_sum(model, input_ids, labels, position_ids, attention_mask)
        labelled = int((labels[:, 1:] != IGNORE_INDEX).sum())
        rows, length = anchor_ids.shape
        positions = torch.arange(length, device=anchor_ids.device).expand(rows, length)
        every = torch.ones(rows, length - 1, dtype=torch.bool, device=anchor_ids.device)
        logp = torch.log_softmax(_logits_at(model, anchor_ids, positions, None, every).float(), dim=-1)
        return ce + kl_weight * _kl_from_base(model, anchor_ids, positions, None, every, logp).mean() * labelled

    targets = labels[:, 1:]
    real = torch.ones_like(targets, dtype=torch.bool)
    if attention_mask is not None:
        real = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    logp = torch.log_softmax(_logits_at(model, input_ids, position_ids, attention_mask, real).float(), dim=-1)
    real_targets = targets[real]
    labelled = real_targets != IGNORE_INDEX
    ce = F.nll_loss(logp[labelled], real_targets[labelled], reduction="sum")
    if labelled.all():
        return ce
    unlabelled = real.clone()
    unlabelled[real] = ~labelled
    kl = _kl_from_base(model, input_ids, position_ids, attention_mask, unlabelled, logp[~labelled])
    return ce + kl_weight * kl.mean() * labelled.sum()


def _kl_from_base(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    select: torch.Tensor,
    logp: torch.Tensor,  # (N, vocab): the tune's log-probs at the N selected positions
) -> torch.Tensor:
    """KL(base || tune) per selected position (N,); the base is the adapters disabled."""
    with torch.no_grad(), model.disable_adapter():
        base_logp = torch.log_softmax(_logits_at(model, input_ids, position_ids, attention_mask, select).float(), dim=-1)
    return (base_logp.exp() * (base_logp - logp)).sum(-1)


class LossModule(nn.Module):
    """The model behind a single forward call that returns what the loop needs.

    The loss path calls the decoder and the LM head separately (see above), which
    would skip the hooks FSDP2 hangs on the model's own forward; wrapping both in
    this module's forward gives FSDP one root to unshard and reduce through. The
    single-process loop calls it the same way, so there is one code path.
    """

    def __init__(self, model: nn.Module, compile_head: bool = False) -> None:
        super().__init__()
        self.model = model
        # N, the labelled-token count, changes every batch: dynamic from the start
        self.head_loss: HeadLoss = torch.compile(head_loss_sum, dynamic=True) if compile_head else head_loss_sum

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        per_sequence: bool = False,
        adapters: bool = True,
        kl_weight: float = 0.0,
        anchor_ids: torch.Tensor | None = None,
        vision: dict[str, torch.Tensor] | None = None,
        temperature: float | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The loss sum, or (sequence log-probs, labelled counts) with `per_sequence`, or
        (token log-probs (N,), their rows (N,)) at `temperature` when it is given (GRPO).

        `adapters=False` runs a peft model with its LoRA adapters disabled: the base
        model, DPO's reference, with no second copy in memory. `kl_weight` adds the
        KL-to-base term of `sft_loss_sum_with_kl` (LoRA only), on `anchor_ids` when given.
        `vision`: a vision model's image inputs (SFT loss only).
        """
        if vision:
            if kl_weight or per_sequence or not adapters:
                raise ValueError("images reach the plain SFT loss only (no KL term, DPO or reference pass)")
            return causal_lm_loss_sum(self.model, input_ids, labels, position_ids, attention_mask,
                                      head_loss=self.head_loss, vision=vision)
        if kl_weight:
            return sft_loss_sum_with_kl(self.model, input_ids, labels, position_ids, attention_mask, kl_weight,
                                        anchor_ids)
        if temperature is not None:
            fn = partial(token_logps, temperature=temperature)
        else:
            fn = sequence_logps if per_sequence else partial(causal_lm_loss_sum, head_loss=self.head_loss)
        if adapters:
            return fn(self.model, input_ids, labels, position_ids, attention_mask)
        with self.model.disable_adapter():
            return fn(self.model, input_ids, labels, position_ids, attention_mask)


def unwrapped_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`LossModule`'s state under the names the wrapped model gives it."""
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}
