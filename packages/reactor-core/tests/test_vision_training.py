"""Multimodal SFT on a vision-language model (a tiny random Idefics3 / SmolVLM, built here):
tokenization through the processor, the loss with the images merged in, which parts train,
the PRIME directory it writes, and an exact resume with images."""

from __future__ import annotations

import copy
import dataclasses
import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reactor_core import Trainer
from reactor_core.checkpoints.store import LocalCheckpointStore
from reactor_core.data import IGNORE_INDEX, load_chat_file
from reactor_core.gcp.preemption import EXIT_PREEMPTED
from reactor_core.training.config import ConfigError

from reactor_testing import (build_idefics3, config_for, logged, model_dir, reactor_train, write_recipe,
                             train_cancelled_at, write_vision_data)


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory, tokenizer) -> Path:
    return build_idefics3(tmp_path_factory.mktemp("tiny-idefics3"), copy.deepcopy(tokenizer))


@pytest.fixture(scope="module")
def vision_file(tmp_path_factory) -> Path:
    return write_vision_data(tmp_path_factory.mktemp("vision-data") / "train.jsonl")


def vision_config(model: Path, out: Path, **overrides):
    values = dict(packing=False, max_seq_length=256, batch_size=3, max_steps=3, num_samples=1, val_fraction=0.2)
    return config_for(model, out, **(values | overrides))


def set_up(config, data: Path):
    recipe = Trainer(config, progress=False).recipe
    recipe.setup(data)
    return recipe


def test_examples_are_tokenized_as_the_processor_does_with_labels_on_replies_only(vision_dir, vision_file, tmp_path):
    recipe = set_up(vision_config(vision_dir, tmp_path, val_fraction=0.0), vision_file)
    processor = recipe.processor
    tokenized = {row[0].source: row[0] for row in recipe.train_items}
    examples, _ = load_chat_file(vision_file)
    assert tokenized.keys() == {e.source for e in examples}
    image_tokens, turns = set(), set()
    for example in examples:
        ours = tokenized[example.source]
        assert ours.images == example.images
        # what the processor itself makes of the rendered conversation and its images
        messages, images = example.processor_inputs()
        text = processor.apply_chat_template(messages, tokenize=False)
        expected = processor(text=text, images=images, add_special_tokens=False)["input_ids"][0]
        assert ours.input_ids == list(expected), example.source
        image_tokens.add(ours.input_ids.count(processor.image_token_id))
        # labelled: exactly the replies and their end-of-turn marker, every turn
        replies = [m.content for m in example.messages if m.role == "assistant"]
        turns.add(len(replies))
        labelled = processor.tokenizer.decode([t for t in ours.labels if t != IGNORE_INDEX])
        assert labelled == "".join(r + "<|im_end|>" for r in replies)
    assert len(image_tokens) > 1  # image sizes differ, so do their tile counts
    assert turns == {1, 2}  # multi-turn examples too


def test_loss_equals_transformers_and_the_images_reach_the_model(vision_dir, vision_file, tmp_path):
    recipe = set_up(vision_config(vision_dir, tmp_path, mixed_precision="fp32"), vision_file)
    batch = recipe.collate(recipe.train_items[:3])
    assert batch.pixel_values is not None and batch.pixel_values.shape[0] == 3
    # tiles padded to the batch's largest count with all-zero tiles
    counts = [(batch.pixel_values[i].flatten(1) != 0).any(1).sum().item() for i in range(3)]
    assert len(set(counts)) > 1 and max(counts) == batch.pixel_values.shape[1]
    with torch.no_grad():
        ours = (recipe.loss_sum(batch) / batch.num_loss_tokens).item()
        reference = recipe.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 pixel_values=batch.pixel_values, pixel_attention_mask=batch.pixel_attention_mask,
                                 labels=batch.labels, use_cache=False).loss.item()
        assert ours == pytest.approx(reference, abs=1e-5)
        # the same tokens with the images mirrored (padding tiles stay all-zero): another loss
        mirrored = dataclasses.replace(batch, pixel_values=batch.pixel_values.flip(-1))
        assert (recipe.loss_sum(mirrored) / batch.num_loss_tokens).item() != pytest.approx(ours, abs=1e-4)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed_parts(recipe, before) -> dict[str, set[bool]]:
    """part -> {whether each of its parameters changed in the step}."""
    parts: dict[str, set[bool]] = {}
    for name, p in recipe.model.named_parameters():
        if ".original_module." in name:  # peft's frozen copy of a modules_to_save part
            continue
        part = "lora" if "lora_" in name else recipe.family.part_of(name)
        parts.setdefault(part, set()).add(not torch.equal(before[name], p.detach()))
    return parts


@pytest.mark.parametrize("keys, trained", [
    (dict(use_lora=False, freeze_language_model=True), {"projector"}),  # align stage
    (dict(use_lora=False, freeze_language_model=True, train_vision_tower=True), {"projector", "vision_tower"}),
    (dict(use_lora=False, train_projector=False), {"language_model"}),
    (dict(use_lora=True), {"lora", "projector"}),  # instruct stage: LoRA + projector (modules_to_save)
    (dict(use_lora=True, train_projector=False, train_vision_tower=True), {"lora", "vision_tower"}),
])
def test_the_vision_keys_train_exactly_the_parts_they_name(vision_dir, vision_file, tmp_path, keys, trained):
    recipe = set_up(vision_config(vision_dir, tmp_path, learning_rate=1e-2, max_grad_norm=None, **keys), vision_file)
    before = snapshot(recipe.model)
    recipe.train_step()
    parts = changed_parts(recipe, before)
    for part, changed in parts.items():
        if part == "lora":  # B starts at zero, so A gets no gradient in the first step: B moves
            assert True in changed
        else:
            assert changed == ({True} if part in trained else {False}), (part, changed)
    assert trained <= parts.keys()


def test_projector_learning_rate_is_a_group_of_its_own(vision_dir, vision_file, tmp_path):
    recipe = set_up(vision_config(vision_dir, tmp_path, projector_learning_rate=5e-3, learning_rate=1e-4), vision_file)
    projector = {id(p) for n, p in recipe.model.named_parameters()
                 if p.requires_grad and recipe.family.part_of(n) == "projector"}
    by_lr = {}
    for group in recipe.optimizer.param_groups:
        for p in group["params"]:
            by_lr[id(p)] = group["initial_lr"]  # before warmup scales it
    assert projector and {by_lr[i] for i in projector} == {5e-3}
    assert {lr for i, lr in by_lr.items() if i not in projector} == {1e-4}


def test_config_errors_name_the_key(vision_dir, tiny_llama_dir, vision_file, tmp_path):
    with pytest.raises(ConfigError, match="`packing`"):
        set_up(vision_config(vision_dir, tmp_path, packing=True), vision_file)
    for key, value in (("train_vision_tower", True), ("freeze_language_model", True), ("train_projector", False),
                       ("projector_learning_rate", 1e-3)):
        extra = {"use_lora": False} if key == "freeze_language_model" else {}
        with pytest.raises(ConfigError, match=f"`{key}`.*text model"):
            Trainer(config_for(tiny_llama_dir, tmp_path, **{key: value}, **extra), progress=False).recipe.setup(
                vision_file)
    with pytest.raises(ValueError, match="`freeze_language_model` needs `use_lora: false`"):
        vision_config(vision_dir, tmp_path, freeze_language_model=True)


def test_max_seq_length_overflow_names_the_line(vision_dir, vision_file, tmp_path):
    from reactor_core.data import DataValidationError

    with pytest.raises(DataValidationError, match=r"train\.jsonl:\d+: example is \d+ tokens, longer than"):
        set_up(vision_config(vision_dir, tmp_path, max_seq_length=40), vision_file)


def test_lora_run_writes_a_vision_prime_directory(vision_dir, vision_file, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    result = Trainer(vision_config(vision_dir, tmp_path, max_steps=2), progress=False).train(vision_file)
    out = result.model_dir
    manifest = json.loads((out / "prime.json").read_text())
    assert manifest["task"] == "vision"
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "processor_config.json",
                 "tokenizer.json", "chat_template.jinja", "adapter/adapter_model.safetensors"):
        assert name in manifest["files"], name
    adapter = load_file(out / "adapter/adapter_model.safetensors")
    assert any("connector" in k for k in adapter) and not any("vision_model" in k for k in adapter)
    assert all("text_model" in k for k in adapter if "lora_" in k)
    merged = load_file(out / "model.safetensors")
    assert any(k.startswith("model.vision_model.") for k in merged) and any("connector" in k for k in merged)
    # the merged projector is the trained one
    trained = {k: v for k, v in adapter.items() if "connector" in k}
    base = load_file(vision_dir / "model.safetensors")
    key = next(k for k in merged if "connector" in k)
    assert not torch.equal(merged[key], base[key])
    assert any(torch.equal(merged[key], v) for v in trained.values())
    # transformers loads it back, processor included
    AutoProcessor.from_pretrained(out)
    AutoModelForImageTextToText.from_pretrained(out)
    assert result.metrics["eval_loss"] > 0


def test_resume_with_images_is_exact(vision_dir, vision_file, tmp_path):
    config = vision_config(vision_dir, tmp_path / "straight", max_steps=4, checkpoint_every_steps=2, num_samples=0,
                           batch_size=2, gradient_accumulation_steps=2)
    straight = Trainer(config, progress=False).train(vision_file)
    resumed_config = config.model_copy(update={"output_dir": str(tmp_path / "resumed")})
    train_cancelled_at(resumed_config, vision_file, step=3)
    assert LocalCheckpointStore(tmp_path / "resumed/checkpoints").latest().step == 2
    resumed = Trainer(resumed_config, progress=False).train(vision_file)
    assert resumed.metrics["train_loss"] == straight.metrics["train_loss"]
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(straight.model_dir / name), load_file(resumed.model_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_sigterm_exits_75_and_resumes_with_images(vision_dir, vision_file, tmp_path):
    values = dict(model_name=str(vision_dir), data_path=str(vision_file), packing=False, max_steps=12, batch_size=2,
                  lora_rank=4, learning_rate=3e-3, max_seq_length=256, num_samples=0, merge_adapter=False, seed=3)
    path = write_recipe(tmp_path / "recipe.yaml", values)
    straight = reactor_train(path, f"output_dir={tmp_path / 'straight'}")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    interrupted = tmp_path / "interrupted"
    run = reactor_train(path, f"output_dir={interrupted}")
    log_file = interrupted / "logs/metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if log_file.is_file() and len(log_file.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=300) == EXIT_PREEMPTED, run.stderr.read()
    resumed = reactor_train(path, f"output_dir={interrupted}")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert logged(interrupted, "train", "loss") == logged(tmp_path / "straight", "train", "loss")
    a = load_file(model_dir(tmp_path / "straight") / "adapter/adapter_model.safetensors")
    b = load_file(model_dir(interrupted) / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["vision-align.yaml", "vision-instruct.yaml"])
def test_the_two_stage_example_recipes_are_valid(name):
    from reactor_core.training.config import load_config

    config = load_config(Path(__file__).parents[1] / "examples" / name)
    assert not config.packing and config.train_projector
    if name == "vision-align.yaml":
        assert config.freeze_language_model and not config.use_lora
    else:
        assert config.use_lora and "vision-align" in config.model_name


async def test_train_async_with_images_delivers_events_and_the_model(vision_dir, vision_file, tmp_path):
    trainer = Trainer(vision_config(vision_dir, tmp_path, max_steps=2, num_samples=0), progress=False)
    events = []

    async def on_event(event):
        events.append(event)

    result = await trainer.train_async(vision_file, on_event=on_event)
    assert not result.cancelled
    assert [e.step for e in events if e.kind == "step"] == [1, 2] and events[-1].kind == "done"
    assert json.loads((result.model_dir / "prime.json").read_text())["task"] == "vision"


def test_vision_keys_count_in_the_training_hash_only_when_set():
    """At their defaults the 1.6.0 keys leave the hash as 1.4.0 / 1.5.0 computed it (the
    literal of test_training), so older checkpoints still resume; set, they count."""
    from reactor_core import TrainingConfig
    from reactor_core.training.config import FIELD_SINCE

    assert TrainingConfig(model_name="m").training_hash() == (
        "701ef70530c3c39a6f94c45974726ddf56d9e6c5b40b95dfc5986aafe74ab202")
    for key, value in (("train_projector", False), ("train_vision_tower", True), ("projector_learning_rate", 1e-3)):
        assert FIELD_SINCE[key] == "1.6.0"
        assert TrainingConfig(model_name="m", **{key: value}).training_hash() != (
            "701ef70530c3c39a6f94c45974726ddf56d9e6c5b40b95dfc5986aafe74ab202"), key
    assert FIELD_SINCE["freeze_language_model"] == "1.6.0"
