"""Spot-VM-proof training: atomic checkpoints, exact resume, preemption signals."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reactor_core import Trainer
from reactor_core.checkpoints.store import COMPLETE, WEIGHTS, CheckpointError, LocalCheckpointStore
from reactor_core.gcp.preemption import EXIT_PREEMPTED, Preempted

from reactor_testing import (PreemptionNoticeServer, config_for, logged, model_dir, reactor_train,
                             train_cancelled_at, write_chat_data, write_recipe)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data") / "train.jsonl")


def recipe(path: Path, model_dir: Path, data: Path, **extra) -> Path:
    values = dict(model_name=str(model_dir), data_path=str(data), max_steps=120, batch_size=2,
                  gradient_accumulation_steps=2, lora_rank=4, lora_dropout=0.1, learning_rate=3e-3,
                  max_seq_length=64, eval_every_steps=40, num_samples=0, merge_adapter=False, seed=3)
    return write_recipe(path, values | extra)


def train_losses(output_dir: Path) -> list[tuple[int, float]]:
    return logged(output_dir, "train", "loss")


def adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir(output_dir) / "adapter/adapter_model.safetensors")


def test_sigterm_then_resume_is_bitwise_identical(tiny_llama_dir, chat_file, tmp_path):
    path = recipe(tmp_path / "recipe.yaml", tiny_llama_dir, chat_file)
    straight = reactor_train(path, f"output_dir={tmp_path / 'straight'}")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    interrupted = tmp_path / "interrupted"
    run = reactor_train(path, f"output_dir={interrupted}")
    log_file = interrupted / "logs/metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until it is well into training, mid-epoch
        if log_file.is_file() and len(log_file.read_text().splitlines()) >= 17:
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == EXIT_PREEMPTED, run.stderr.read()
    stopped_at = max(step for step, _ in train_losses(interrupted))
    assert 15 <= stopped_at < 120
    checkpoints = LocalCheckpointStore(interrupted / "checkpoints")
    assert checkpoints.latest().step == stopped_at

    resumed = reactor_train(path, f"output_dir={interrupted}")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert "resumed from" in resumed.stderr.read()

    assert train_losses(interrupted) == train_losses(tmp_path / "straight")
    a, b = adapter(tmp_path / "straight"), adapter(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("method", ["full", "lora-kl-anchor", "lora-bf16-base"])
def test_in_process_resume_is_bitwise_identical(tiny_llama_dir, chat_file, tmp_path, monkeypatch, method):
    """full: every weight trains (the tiny Llama ties its LM head to the embedding, as
    SmolLM2 does), shards forced small so weights and AdamW moments span several files.
    lora-kl-anchor: the KL-to-base term on anchor text, whose rows follow the micro-step.
    lora-bf16-base: the frozen base in bfloat16, the adapters and AdamW state float32."""
    import reactor_core.checkpoints.store as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "SHARD_BYTES", 2**20)
    if method == "full":
        extra = dict(use_lora=False, learning_rate=1e-3)
    elif method == "lora-bf16-base":
        extra = dict(base_dtype="bfloat16", merge_adapter=True)
    else:
        anchor = tmp_path / "anchor.jsonl"
        anchor.write_text("".join(json.dumps({"text": f"Paragraph {i}: the tide came in over the grey sand, and the "
                                                      f"gulls rose from the rocks as the boats returned."}) + "\n"
                                  for i in range(40)))
        extra = dict(kl_to_base=1.0, kl_anchor_path=str(anchor), kl_anchor_tokens=256, merge_adapter=True)
    config = config_for(tiny_llama_dir, tmp_path / "straight", max_steps=6, gradient_accumulation_steps=2,
                        checkpoint_every_steps=3, num_samples=0, **extra)
    straight = Trainer(config, progress=False).train(chat_file)

    resumed_config = config.model_copy(update={"output_dir": str(tmp_path / "resumed")})
    train_cancelled_at(resumed_config, chat_file, step=4)
    saved = LocalCheckpointStore(tmp_path / "resumed/checkpoints").latest()
    assert saved.step == 3
    names = sorted(p.name for p in saved.path.iterdir())
    if method == "full":
        assert len([n for n in names if n.startswith("weights-")]) > 1, names
        assert len([n for n in names if n.startswith("optimizer-")]) > 1, names
    resumed = Trainer(resumed_config, progress=False).train(chat_file)

    assert resumed.metrics["train_loss"] == straight.metrics["train_loss"]
    a = load_file(straight.model_dir / "model.safetensors")
    b = load_file(resumed.model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_incomplete_or_corrupt_checkpoints_are_skipped(tiny_llama_dir, chat_file, tmp_path, caplog):
    config = config_for(tiny_llama_dir, tmp_path, max_steps=6, checkpoint_every_steps=2, keep_last_checkpoints=3,
                        num_samples=0, merge_adapter=False)
    Trainer(config, progress=False).train(chat_file)
    store = LocalCheckpointStore(tmp_path / "checkpoints")
    assert [c.step for c in store.candidates()] == [6, 4, 2]  # every 2 steps, and the finished state

    killed = tmp_path / "checkpoints/step-00000008"  # SIGKILL mid-save: files but no COMPLETE
    killed.mkdir()
    (killed / WEIGHTS).write_bytes(b"partial")
    weights = tmp_path / "checkpoints/step-00000006" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # newest complete one corrupted: one flipped byte
    weights.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, logger="reactor_core")
    trainer = Trainer(config, progress=False).recipe
    trainer.setup(chat_file)
    assert trainer.state.step == 4
    assert "step-00000008: no COMPLETE marker" in caplog.text
    assert "step-00000006/weights.safetensors: sha256 does not match COMPLETE" in caplog.text


def test_rerunning_a_finished_run_does_not_retrain(tiny_llama_dir, chat_file, tmp_path):
    config = config_for(tiny_llama_dir, tmp_path, max_steps=4, checkpoint_every_steps=3, num_samples=0,
                        merge_adapter=False)
    first = Trainer(config, progress=False).train(chat_file)
    again = Trainer(config, progress=False).train(chat_file)
    assert again.state.step == 4 and again.metrics["train_loss"] == first.metrics["train_loss"]
    assert again.model_dir.is_dir()


def test_resume_refuses_another_config_or_data_unless_forced(tiny_llama_dir, chat_file, tmp_path):
    config = config_for(tiny_llama_dir, tmp_path, max_steps=4, checkpoint_every_steps=2, num_samples=0,
                        merge_adapter=False)
    Trainer(config, progress=False).train(chat_file)
    changed = config.model_copy(update={"lora_rank": 4})
    with pytest.raises(CheckpointError, match=r"the training config changed \(lora_rank\)"):
        Trainer(changed, progress=False).recipe.setup(chat_file)
    other_data = write_chat_data(tmp_path / "other.jsonl", n=40)
    with pytest.raises(CheckpointError, match="the training data changed"):
        Trainer(config, progress=False).recipe.setup(other_data)
    forced = Trainer(config.model_copy(update={"force_resume": True}), progress=False).recipe
    forced.setup(other_data)
    assert forced.state.step == 4  # the finished state was checkpointed
    fresh = Trainer(config.model_copy(update={"resume": "never"}), progress=False).recipe
    fresh.setup(chat_file)
    assert fresh.state.step == 0


def test_retention_keeps_last_n_plus_best(tmp_path):
    store = LocalCheckpointStore(tmp_path, keep_last=2)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.2)]:
        store.save(step, lambda folder, written: (folder / "x.bin").write_bytes(bytes([step])), metric=loss)
    assert [c.step for c in store.candidates()] == [5, 4, 2]  # last two, and the best (loss 1.0)
    assert (tmp_path / "step-00000005" / COMPLETE).is_file()


def test_gcp_preemption_notice_checkpoints_and_stops(tiny_llama_dir, chat_file, tmp_path, monkeypatch):
    server = PreemptionNoticeServer.start()
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{server.server_address[1]}")
    config = config_for(tiny_llama_dir, tmp_path, max_steps=100_000, watch_gcp_preemption=True, num_samples=0)
    trainer = Trainer(config, on_event=lambda e: e.step == 3 and PreemptionNoticeServer.posted.set(), progress=False)
    try:
        with pytest.raises(Preempted) as err:
            trainer.train(chat_file)
    finally:
        server.shutdown()
    assert err.value.reason == "GCP preemption notice"
    checkpoint = LocalCheckpointStore(tmp_path / "checkpoints").latest()
    assert checkpoint is not None and checkpoint.step == err.value.step >= 3
    assert checkpoint.state()["reason"] == "preemption"


def test_drill_with_sigterm_and_sigkill_ends_bitwise_identical(tiny_llama_dir, chat_file, tmp_path):
    """`reactor drill`: seed 2 kills once with SIGTERM, then once with SIGKILL."""
    from typer.testing import CliRunner

    from reactor_core.cli import app

    path = recipe(tmp_path / "recipe.yaml", tiny_llama_dir, chat_file, max_steps=100, eval_every_steps=None)
    result = CliRunner().invoke(app, ["drill", str(path), "--kills", "2", "--seed", "2", "--checkpoint-every", "4",
                                      "--work-dir", str(tmp_path / "drill")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "SIGTERM" in result.output and "SIGKILL" in result.output
    assert "PASS: weights bitwise identical: True" in result.output


class _Crash(Exception):
    """Stands in for the VM vanishing at one precise instant (injected, not real)."""


@pytest.mark.parametrize("crash_at", ["rename", "marker"])
def test_resaving_a_step_never_leaves_it_without_a_checkpoint(tmp_path, monkeypatch, crash_at):
    """Re-saving step 5 with keep_last=1, crashing between removing/setting aside the old
    checkpoint and the new one being COMPLETE. The crash is injected: `rename` fails the
    rename of the temp folder into place, `marker` fails writing COMPLETE after it. A fresh
    store (the next start) must still resume from the old, complete step 5."""
    import reactor_core.checkpoints.store as store_module

    store = LocalCheckpointStore(tmp_path, keep_last=1)
    store.save(5, lambda folder, written: (folder / WEIGHTS).write_bytes(b"old"))
    real_replace, real_write = os.replace, store_module.write_atomic

    def replace(src, dst):
        if Path(src).name.startswith(".step-00000005.tmp-"):
            raise _Crash
        return real_replace(src, dst)

    def write_atomic(path, data, *args):
        if Path(path).name == COMPLETE:
            raise _Crash
        return real_write(path, data, *args)

    if crash_at == "rename":
        monkeypatch.setattr(os, "replace", replace)
    else:
        monkeypatch.setattr(store_module, "write_atomic", write_atomic)
    with pytest.raises(_Crash):
        store.save(5, lambda folder, written: (folder / WEIGHTS).write_bytes(b"new"))
    monkeypatch.undo()

    restarted = LocalCheckpointStore(tmp_path, keep_last=1)
    latest = restarted.latest()
    assert latest is not None and latest.step == 5
    assert (latest.path / WEIGHTS).read_bytes() == b"old"
    assert not list(tmp_path.glob(".step-*.old"))
    # the next save of that step replaces it and leaves nothing aside
    restarted.save(5, lambda folder, written: (folder / WEIGHTS).write_bytes(b"new"))
    assert (restarted.latest().path / WEIGHTS).read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005"]


def test_rewriting_a_model_directory_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """Writing <name>-<version>/ where one already exists, crashing (injected: the rename
    of the finished staging folder into place fails): the next write finds the old,
    complete directory again rather than nothing."""
    from reactor_core.training.config import TrainingConfig
    from reactor_core.training.model import ModelSource
    from reactor_core.training.prime_dir import write_model_dir

    class Fake:
        eos_token = "</s>"

        def __init__(self, payload: bytes) -> None:
            self.payload = payload

        def save_pretrained(self, folder, **kwargs) -> None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "model.safetensors").write_bytes(self.payload)

    config = TrainingConfig(model_name="tiny", output_name="m", use_lora=False)
    source = ModelSource(kind="hf", location="tiny")

    def write(payload: bytes) -> Path:
        return write_model_dir(tmp_path, Fake(payload), tokenizer=Fake(payload), source=source, config=config,
                               data_files=[], metrics={"train_loss": []})

    final = write(b"old")
    real_replace = os.replace

    def crash(src, dst):
        if Path(src).name.endswith(".partial"):
            raise _Crash
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(Path, "rename", lambda self, dst: crash(self, dst) or Path(dst))
    with pytest.raises(_Crash):
        write(b"new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if (p / "model.safetensors").read_bytes() == b"old"]  # not deleted
    from reactor_core.files import restore_aside

    restore_aside(final, lambda path: (path / "prime.json").is_file())  # what the next start does
    assert (final / "model.safetensors").read_bytes() == b"old" and (final / "prime.json").is_file()
    assert (write(b"new") / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-1.0.0"]


@pytest.mark.parametrize("during", ["eval", "samples"])
def test_a_preemption_during_eval_checkpoints_within_one_batch_and_resumes_exactly(tiny_llama_dir, chat_file,
                                                                                   tmp_path, during):
    """SIGTERM (the real signal, sent to this process) while the eval after step 4 runs:
    after its first of four validation batches, or inside its first of two samples. The
    loop used to hear it only after step 5, a whole eval (and step) later than GCP's
    ~30 s notice allows; now it leaves the eval at once, writes the emergency checkpoint
    at step 4 and raises Preempted (what `reactor train` turns into exit 75). The resumed
    run redoes that eval and ends exactly where an uninterrupted one does."""
    config = config_for(tiny_llama_dir, tmp_path / "straight", max_steps=6, eval_every_steps=2, packing=False,
                        batch_size=2, val_fraction=0.25, num_samples=2 if during == "samples" else 0,
                        merge_adapter=False)
    straight = Trainer(config, progress=False).train(chat_file)

    interrupted = config.model_copy(update={"output_dir": str(tmp_path / "interrupted")})
    recipe = Trainer(interrupted, progress=False).recipe
    calls: list[int] = []  # the step of each eval batch (or sample) that ran
    real_loss_sum, real_sample = recipe.loss_sum, recipe._sample

    def count_then_preempt() -> None:
        calls.append(recipe.state.step)
        if recipe.state.step == 4 and calls.count(4) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def loss_sum(batch, training=False):
        if not training and during == "eval":
            count_then_preempt()
        return real_loss_sum(batch, training)

    def sample(example):
        count_then_preempt()
        return real_sample(example)

    recipe.loss_sum, recipe._sample = loss_sum, sample
    recipe.setup(chat_file)
    assert len(list(recipe.val_batches())) == 4
    with pytest.raises(Preempted) as err:
        recipe.train()
    assert calls.count(4) == 1  # nothing more of that eval ran
    assert err.value.step == 4 and err.value.reason == "SIGTERM"
    checkpoint = LocalCheckpointStore(tmp_path / "interrupted/checkpoints").latest()
    assert checkpoint is not None and checkpoint.step == 4 and err.value.checkpoint == str(checkpoint.path)
    assert checkpoint.state()["reason"] == "preemption"

    resumed = Trainer(interrupted, progress=False).train(chat_file)
    assert resumed.metrics["train_loss"] == straight.metrics["train_loss"]
    assert resumed.metrics["eval"] == straight.metrics["eval"]
    assert [e["step"] for e in resumed.metrics["eval"]] == [2, 4, 6]
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "interrupted")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
