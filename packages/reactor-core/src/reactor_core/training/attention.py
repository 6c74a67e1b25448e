"""Attention over packed rows that only computes each example's own causal triangle.

A packed row of 512 tokens holds several examples; each may attend only to itself.
transformers expresses that as a (rows, 1, 512, 512) block-diagonal mask for SDPA, and
PyTorch's CPU flash-attention kernel then computes every one of the 512 x 512 scores
and masks most away: with examples of ~100 tokens, 10x the work the examples need, and
a quarter of a LoRA step (fp32 on AVX2: 72 ms a layer, forward and backward, against 20
ms for the examples alone; see benchmarks/train_throughput.py).

`reactor_sdpa` is that SDPA with one change: when the decoder is called without a
padding mask (packed rows, or rows with no padding), it runs the same CPU kernel once
per example with `is_causal=True`, the examples found where the position ids stop
counting up by one: the rule transformers itself uses to build the packed mask
(`find_packed_sequence_indices`), so the result is the same attention, not an
approximation. The per-example loop lives in a custom op with its own backward, so a
compiled layer sees one opaque node of fixed shapes and never recompiles for a new
packing. Everything else (a padding mask, a KV cache, dropout, sliding windows,
soft-capping, another device) falls through to transformers' SDPA unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "reactor_sdpa"
# Architectures whose decoder mask is plain causal (plus packing): the per-example
# causal triangle is then their whole attention pattern. Others keep SDPA.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SEGMENTS_KWARG = "segments_from_positions"

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every run of positions counting up by one, row by row."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    width = position_ids.shape[1]
    spans = []
    for row, cols in enumerate(starts.tolist()):
        begins = [col for col, start in enumerate(cols) if start] + [width]
        spans.extend((row, begin, end) for begin, end in zip(begins, begins[1:]))
    return spans


def _empty_outputs(query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's outputs, unfilled; one function so the fake (compile-time) and real ones agree on strides."""
    batch, heads, length, dim = query.shape
    return (query.new_empty(batch, length, heads, dim).transpose(1, 2),
            query.new_empty(batch, heads, length, dtype=torch.float32))


@torch.library.custom_op("reactor::packed_causal_attention", mutates_args=())
def packed_causal_attention(
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, KV, T, D); KV divides H (grouped-query attention)
    value: torch.Tensor,
    position_ids: torch.Tensor,  # (B, T)
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, T, D) laid out as (B, T, H, D), log-sum-exp (B, H, T) float32)."""
    out, lse = _empty_outputs(query)
    for row, begin, end in _segments(position_ids):
        rows, span = slice(row, row + 1), slice(begin, end)
        o, l = _flash(query[rows, :, span], key[rows, :, span], value[rows, :, span], is_causal=True, scale=scale)
        out[rows, :, span] = o
        lse[rows, :, span] = l
    return out, lse


@packed_causal_attention.register_fake
def _(query, key, value, position_ids, scale):
    return _empty_outputs(query)


@torch.library.custom_op("reactor::packed_causal_attention_backward", mutates_args=())
def packed_causal_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    position_ids: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of query, key and value, example by example (every position is in one)."""
    grad_query, grad_key, grad_value = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    for row, begin, end in _segments(position_ids):
        rows, span = slice(row, row + 1), slice(begin, end)
        grads = _flash_backward(grad_out[rows, :, span], query[rows, :, span], key[rows, :, span], value[rows, :, span],
                                out[rows, :, span], lse[rows, :, span], 0.0, True, scale=scale)
        for grad, part in zip((grad_query, grad_key, grad_value), grads):
            grad[rows, :, span] = part
    return grad_query, grad_key, grad_value


@packed_causal_attention_backward.register_fake
def _(grad_out, query, key, value, out, lse, position_ids, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, position_ids, scale = inputs
    ctx.save_for_backward(query, key, value, *output, position_ids)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse, position_ids = ctx.saved_tensors
    grads = packed_causal_attention_backward(grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out,
                                             query, key, value, out, lse, position_ids, ctx.scale)
    return *grads, None, None


packed_causal_attention.register_autograd(_backward, setup_context=_setup_context)


def reactor_sdpa(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns ((B, T, H, D), None) like SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    per_example = (
        kwargs.pop(SEGMENTS_KWARG, False)
        and position_ids is not None
        and query.device.type == "cpu"
        and query.shape[2] == key.shape[2] > 1  # no KV cache
        and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        and not (dropout and module.training)
        and kwargs.get("sliding_window") is None
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
    )
    if not per_example:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # what autocast would do to SDPA's inputs: one dtype for all three
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else value.dtype
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, _ = packed_causal_attention(query.to(dtype), key.to(dtype), value.to(dtype),
                                     position_ids.expand(query.shape[0], -1), scale)
    return out.transpose(1, 2), None


def use_packed_attention(model: nn.Module) -> bool:
    """Switch a CPU model on SDPA to `reactor_sdpa`; False (unchanged) where it does not apply.

    The loss functions then pass `segments_from_positions=True` to the decoder when they
    call it without a padding mask (`decoder_kwargs`). The saved config is unaffected:
    transformers does not write the attention implementation.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    config = model.config
    if config.model_type not in ARCHITECTURES or config._attn_implementation != "sdpa":
        return False
    if next(model.parameters()).device.type != "cpu":
        return False
    AttentionInterface.register(NAME, reactor_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the fallback's masks, as SDPA's
    model.set_attn_implementation(NAME)
    return True


def decoder_kwargs(model: nn.Module, attention_mask: torch.Tensor | None) -> dict:
    """Extra decoder kwargs: per-example attention when there is no padding mask to honour."""
    if attention_mask is None and getattr(model.config, "_attn_implementation", None) == NAME:
        return {SEGMENTS_KWARG: True}
    return {}
