"""Training big bases (issue #21): half-precision frozen weights, 4-bit QLoRA, the memory
estimate that refuses what cannot fit before loading, and short Hub names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reactor_core import Trainer, TrainingConfig
from reactor_core.training.config import ConfigError, build_config
from reactor_core.training import memory
from reactor_core.training.memory import Available, MemoryCheckError, ModelShape
from reactor_core.training.model import ModelSourceError, base_dtype, check_quantization_support, resolve_model_source

from reactor_testing import config_for, write_chat_data, write_recipe

GIB = 1024**3


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data") / "train.jsonl")


# -- half-precision frozen base ---------------------------------------------------------------

def test_bf16_base_trains_with_float32_adapters_like_a_float32_base(tiny_llama_dir, chat_file, tmp_path):
    """The frozen weights sit in bf16 (half the memory), every trainable weight and AdamW
    moment in float32; the losses follow the float32 base's within bf16's rounding of
    the weights (8 mantissa bits: ~0.4 % per weight), math in float32 in both runs."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        trainer = Trainer(config_for(tiny_llama_dir, tmp_path / dtype, max_steps=4, base_dtype=dtype, num_samples=0,
                                     mixed_precision="fp32", merge_adapter=False), progress=False)
        runs[dtype] = (trainer, trainer.train(chat_file))
    trainer, result = runs["bfloat16"]
    model = trainer.recipe.model
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    moments = {v.dtype for state in trainer.recipe.optimizer.state.values() for v in state.values() if v.ndim}
    assert moments == {torch.float32}
    reference = [x["loss"] for x in runs["float32"][1].metrics["train_loss"]]
    losses = [x["loss"] for x in result.metrics["train_loss"]]
    assert losses == pytest.approx(reference, rel=2e-2)
    assert losses != reference, "the base really was bf16"
    saved = json.loads((result.model_dir / "adapter/adapter_config.json").read_text())
    assert saved["r"] == 8


def test_auto_base_dtype_follows_the_autocast_dtype():
    cpu = torch.device("cpu")
    make = lambda **kw: TrainingConfig(model_name="x", **kw)  # noqa: E731
    assert base_dtype(make(mixed_precision="fp32"), cpu) == torch.float32
    assert base_dtype(make(mixed_precision="bf16"), cpu) == torch.bfloat16
    assert base_dtype(make(mixed_precision="bf16", use_lora=False), cpu) == torch.float32  # trained weights: fp32
    assert base_dtype(make(base_dtype="float16", mixed_precision="fp32"), cpu) == torch.float16


def test_half_precision_base_needs_lora_and_names_the_key():
    with pytest.raises(ConfigError, match=r"`base_dtype: bfloat16` needs `use_lora: true`"):
        build_config({"model_name": "x", "use_lora": False, "base_dtype": "bfloat16"}, "recipe.yaml")
    with pytest.raises(ConfigError, match=r"`base_dtype`"):
        build_config({"model_name": "x", "base_dtype": "bf16"}, "recipe.yaml")


def test_qlora_keeps_the_unquantized_frozen_weights_in_base_dtype(tiny_llama_dir, chat_file, tmp_path):
    """peft's prepare_model_for_kbit_training would cast embeddings and norms to float32
    (4.4 GB more on a 7B Qwen); here they stay bf16, linear layers NF4, adapters float32."""
    pytest.importorskip("bitsandbytes")
    trainer = Trainer(config_for(tiny_llama_dir, tmp_path, quantize_base=True, base_dtype="bfloat16", max_steps=2,
                                 merge_adapter=False, num_samples=0), progress=False)
    result = trainer.train(chat_file)
    assert all(x["loss"] > 0 for x in result.metrics["train_loss"])
    model = trainer.recipe.model
    assert "Linear4bit" in {type(m).__name__ for m in model.modules()}
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_qlora_where_bitsandbytes_cannot_run_is_a_config_error():
    with pytest.raises(ConfigError, match=r"`quantize_base`.*not mps"):
        check_quantization_support(torch.device("mps"))


# -- the memory estimate ---------------------------------------------------------------------------

def test_shape_from_the_headers_counts_what_the_model_and_peft_count(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = memory.read_model_shape(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied head: stored once, counted once
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    assert shape.lora_params(8, targets) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size) == (2, 64, 128)


def qwen25_7b_shape() -> ModelShape:
    """Qwen2.5-7B's tensor shapes (its config.json: 28 layers, hidden 3584, 18944 MLP,
    28 heads of 128 with 4 KV heads, vocab 152064, untied head), no weights needed."""
    h, i, kv, v, layers = 3584, 18944, 512, 152064, 28
    tensors: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h),
                                           "model.norm.weight": (h,)}
    for n in range(layers):
        p = f"model.layers.{n}."
        tensors |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                    p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (i, h),
                    p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    return ModelShape("qwen2", layers, h, i, v, tensors)


def test_a_7b_lora_fits_a_24gb_gpu_in_bf16_or_4bit_but_not_in_float32():
    shape = qwen25_7b_shape()
    assert shape.params == pytest.approx(7.62e9, rel=0.01)  # the model card's 7.61 B
    gpu = Available(device=22 * GIB, ram=64 * GIB)  # a 24 GB card as torch reports it free
    common = dict(model_name="qwen2.5-7b", batch_size=1, max_seq_length=1024, gradient_checkpointing=True)

    def check(dtype: str, **kw) -> str | None:
        config = TrainingConfig(**common, **kw)
        estimate = memory.estimate_memory(shape, config, dtype_name=dtype, autocast_bytes=2, device="cuda")
        return memory.check_fits(estimate, gpu, config)

    problem = check("float32", base_dtype="float32")
    assert problem is not None and "needs about" in problem and "22.0 GiB is free" in problem
    assert "`quantize_base: true`" in problem and "`base_dtype: bfloat16`" in problem
    assert check("bfloat16") is None
    assert check("bfloat16", quantize_base=True) is None
    full = check("bfloat16", use_lora=False, base_dtype="auto")
    assert full is not None and "`use_lora: true`" in full
    # 8 processes shard a full fine-tune's 16 bytes a parameter: about 15 GiB each
    config = TrainingConfig(**common, use_lora=False)
    sharded = memory.estimate_memory(shape, config, dtype_name="float32", autocast_bytes=2, device="cuda", world_size=8)
    assert memory.check_fits(sharded, Available(device=78 * GIB, ram=200 * GIB), config) is None
    assert sharded.trainable == pytest.approx(shape.params * 16 / 8, rel=1e-6)


def test_reactor_train_refuses_what_cannot_fit_before_loading(tiny_llama_dir, chat_file, tmp_path, monkeypatch):
    """A machine with little free memory cannot be had on cue, so the free memory is what
    the probe is told (the estimate itself is the real one, from the tiny model's files)."""
    from reactor_core.training.recipes.base import Recipe

    monkeypatch.setattr(Recipe, "available_memory", lambda self: Available(device=64 * 1024**2, ram=64 * 1024**2))
    loaded = []
    import reactor_core.training.recipes.base as base_module

    real_load = base_module.load_base_model
    monkeypatch.setattr(base_module, "load_base_model", lambda *a, **kw: loaded.append(1) or real_load(*a, **kw))
    out = tmp_path / "out"
    trainer = Trainer(config_for(tiny_llama_dir, out, num_samples=0), progress=False)
    with pytest.raises(MemoryCheckError) as err:
        trainer.train(chat_file)
    message = str(err.value)
    assert str(tiny_llama_dir) in message and "needs about" in message and "0.1 GiB is free" in message
    assert "`gradient_checkpointing: true`" in message and "`batch_size`" in message
    assert not loaded and not out.exists()
    estimate = trainer.recipe.memory_estimate
    assert estimate.total > 64 * 1024**2 and estimate.runtime == memory.RUNTIME_BYTES

    # check_memory: false warns and trains anyway
    trainer = Trainer(config_for(tiny_llama_dir, out, num_samples=0, max_steps=1, check_memory=False,
                                 merge_adapter=False), progress=False)
    assert trainer.train(chat_file).state.step == 1


def test_available_ram_reads_memavailable_within_the_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    limit, used = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("max\n")
    used.write_text("1000\n")
    assert memory.available_ram_bytes(meminfo, (limit, used)) == 20000000 * 1024
    limit.write_text(str(8 * GIB))
    used.write_text(str(3 * GIB))
    assert memory.available_ram_bytes(meminfo, (limit, used)) == 5 * GIB


# -- short names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, repo", [
    ("llama-2-7b", "meta-llama/Llama-2-7b-hf"), ("Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-chat-hf"),
    ("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct"), ("mistral-7b", "mistralai/Mistral-7B-v0.3"),
    ("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct"), ("qwen3-14b", "Qwen/Qwen3-14B"),
    ("gemma-2-9b", "google/gemma-2-9b"), ("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct"),
    ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M"),
])
def test_short_names_resolve_to_the_hub_model_they_mean(name, repo):
    source = resolve_model_source(name)
    assert (source.kind, source.location) == ("hub", repo)


def test_an_unknown_short_name_suggests_the_close_ones():
    with pytest.raises(ModelSourceError, match=r"llama-2-7b"):
        resolve_model_source("llama2-7b")


def test_offline_the_error_says_what_it_would_download(tiny_llama_dir, chat_file, tmp_path):
    """`reactor train` with model_name=llama-2-7b on a machine with no copy and no network
    (HF_HUB_OFFLINE=1, an empty cache): exit 2 and a message with the repository, size,
    license and, the repository being gated, the token and license page."""
    recipe = write_recipe(tmp_path / "r.yaml", {"model_name": "llama-2-7b", "data_path": str(chat_file),
                                                "output_dir": str(tmp_path / "out")})
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_TOKEN", None)
    run = subprocess.run([sys.executable, "-m", "reactor_core.cli", "train", str(recipe)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    err = " ".join(run.stderr.split())
    for part in ("meta-llama/Llama-2-7b-hf", "6.74 B parameters", "13.5 GB", "license llama2", "HF_TOKEN",
                 "https://huggingface.co/meta-llama/Llama-2-7b-hf", "HF_HUB_OFFLINE"):
        assert part in err, (part, err)
    assert not (tmp_path / "out").exists()
