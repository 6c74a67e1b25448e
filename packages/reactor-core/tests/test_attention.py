"""Per-example attention over packed rows (`reactor_sdpa`) is SDPA's packed-mask attention, computed faster."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reactor_core.training import attention
from reactor_core.training.loss import causal_lm_loss_sum

T = 64
PACKINGS = [[5, 17, 30, 12], [40, 20, 4]]  # example lengths per row; the rest of a row is padding


@pytest.fixture(scope="module")
def models():
    """The same tiny Llama (grouped-query heads) on SDPA and on `reactor_sdpa`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    reference = LlamaForCausalLM(config)
    model = copy.deepcopy(reference)
    assert attention.use_packed_attention(model) and model.config._attn_implementation == attention.NAME
    return reference, model


def packed_batch(packings: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids) of rows packed like `collate_packed`: positions restart per example."""
    ids = torch.randint(0, 128, (len(packings), T), generator=torch.Generator().manual_seed(1))
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths + [T - sum(lengths)]]) for lengths in packings])
    return ids, positions


def loss_and_grads(model, ids, positions, attention_mask=None):
    model.zero_grad()
    loss = causal_lm_loss_sum(model, ids, ids.clone(), positions, attention_mask)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture
def segment_calls(monkeypatch) -> list[int]:
    """How many times the per-example op ran (forward and backward each count once a layer)."""
    calls: list[int] = []
    segments = attention._segments
    monkeypatch.setattr(attention, "_segments", lambda positions: calls.append(1) or segments(positions))
    return calls


def test_packed_rows_get_the_packed_mask_attention(models, segment_calls):
    reference, model = models
    ids, positions = packed_batch(PACKINGS)
    expected, expected_grads = loss_and_grads(reference, ids, positions)
    loss, grads = loss_and_grads(model, ids, positions)
    assert len(segment_calls) == 2 * 2, "each layer's forward and backward ran per example"
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    # the examples matter: one causal sequence per row is a different loss
    unpacked, _ = loss_and_grads(model, ids, torch.arange(T).expand(len(PACKINGS), T))
    assert abs(unpacked - loss) > 1e-3


def test_a_padding_mask_keeps_sdpa(models, segment_calls):
    """Left padding must stay masked: with a 2-D mask the model runs transformers' SDPA."""
    reference, model = models
    ids, _ = packed_batch([[T], [T]])
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :20] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected, _ = loss_and_grads(reference, ids, positions, mask)
    loss, _ = loss_and_grads(model, ids, positions, mask)
    assert not segment_calls and loss == pytest.approx(expected.item(), rel=1e-6)


def test_under_bf16_autocast_it_matches_sdpa(models):
    reference, model = models
    ids, positions = packed_batch(PACKINGS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = loss_and_grads(reference, ids, positions)
        loss, grads = loss_and_grads(model, ids, positions)
    assert loss == pytest.approx(expected.item(), rel=1e-3)
    assert all(torch.isfinite(grad).all() for grad in grads.values())


def test_only_plain_causal_cpu_models_switch():
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    assert not attention.use_packed_attention(LlamaForCausalLM(config)), "eager attention was asked for"
    assert attention.decoder_kwargs(LlamaForCausalLM(config), None) == {}
