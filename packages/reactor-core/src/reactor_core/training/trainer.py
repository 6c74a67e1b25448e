"""The SFT recipe: one class whose setup, train and save read top to bottom.

    from reactor_core import Trainer, TrainingConfig
    result = Trainer(TrainingConfig(model_name="smollm2-135m-instruct", use_lora=True,
                                    lora_rank=16, num_epochs=3)).train("./data/train.jsonl")
    result.output_dir, result.model_dir, result.metrics

Plain PyTorch, no trainer framework: transformers builds the model, peft wraps it in
LoRA, and the loop below owns everything else (the sampler's position, accumulation,
clipping, the schedule), so checkpoints can capture and restore it exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import math
import multiprocessing
import pickle
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
from rich.console import Console
from torch import nn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from reactor_core import __version__
from reactor_core.data.anchor import AnchorRows, load_text_file
from reactor_core.data import (
    Batch,
    ChatExample,
    TokenizedExample,
    collate_packed,
    collate_padded,
    load_chat_file,
    pack_examples,
    split_examples,
    tokenize_dataset,
)
from reactor_core.files import sha256_file
from reactor_core.training.prime_dir import write_prime_manifest
from reactor_core.training.config import ConfigError, TrainingConfig
from reactor_core.training import distributed
from reactor_core.training.distributed import DistContext
from reactor_core.training.loss import LossModule
from reactor_core.training import attention
from reactor_core.training.metrics import MetricsLogger
from reactor_core.training.model import (
    ModelSource,
    apply_lora,
    autocast_dtype,
    load_base_model,
    load_tokenizer,
    pick_device,
    resolve_model_source,
)
from reactor_core.training.schedule import build_scheduler
from reactor_core.checkpoints.store import (
    COMPLETE,
    LEGACY_OPTIMIZER,
    OPTIMIZER,
    RNG,
    STATE,
    WEIGHTS,
    CheckpointError,
    LocalCheckpointStore,
    join_optimizer_state,
    load_tensors,
    save_tensors,
    split_optimizer_state,
    step_dirname,
    verify,
)
from reactor_core.gcp.preemption import Preempted, PreemptionGuard
from reactor_core.checkpoints.remote import download_newest, open_remote
from reactor_core.gcp.metadata import MetadataClient, detect_gcp
from reactor_core.gcp.spot import SPOT_CHECKPOINT_EVERY_MINUTES
from reactor_core.training.state import EpochSampler, TrainState, restore_rng_tensors, rng_state_tensors, seed_everything

if TYPE_CHECKING:
    from reactor_core.gcp import SpotVMCheckpointer

log = logging.getLogger("reactor_core")


@dataclass(frozen=True)
class TrainEvent:
    """Progress for observers (CLI bar, async consumers)."""

    kind: Literal["step", "eval", "done", "cancelled"]
    step: int
    total_steps: int
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path | None  # the PRIME model directory; None when cancelled
    metrics: dict[str, Any]
    state: TrainState
    cancelled: bool = False


EventCallback = Callable[[TrainEvent], Any]
Item = list[TokenizedExample]  # one packed row, or a single example when not packing


class Trainer:
    def __new__(cls, config: TrainingConfig, *args: Any, **kwargs: Any) -> "Trainer":
        """`Trainer(config)` builds the recipe `config.method` names (sft, dpo)."""
        if cls is Trainer and config.method == "dpo":
            from reactor_core.training.dpo import PreferenceTrainer

            cls = PreferenceTrainer
        return super().__new__(cls)

    def __init__(
        self,
        config: TrainingConfig,
        checkpointer: SpotVMCheckpointer | None = None,
        *,
        on_event: EventCallback | None = None,
        progress: bool = True,
    ) -> None:
        if checkpointer is not None:  # the seed's API: a bundle of checkpoint settings
            config = TrainingConfig.model_validate({**config.to_dict(), **checkpointer.overrides()})
        self.config = config
        self.on_event = on_event
        self.show_progress = progress
        self.state = TrainState()
        self.anchor: AnchorRows | None = None  # kl_anchor_path's text, set up with the data
        self._cancel = threading.Event()

    # -- public API ----------------------------------------------------------------------

    def train(self, data_path: str | Path | None = None) -> TrainResult:
        """Validate all data, train, evaluate, and write the PRIME model directory.

        Nothing is written to `output_dir` until the data and model have loaded.
        """
        self.setup(data_path)
        return self._run()

    def setup(self, data_path: str | Path | None = None) -> None:
        """Load tokenizer, data, model, optimizer and schedule; write nothing."""
        c = self.config
        data_path = Path(data_path or c.data_path or "")
        if not str(data_path) or str(data_path) == ".":
            raise ValueError("no training data: pass a path to train() or set `data_path`")
        seed_everything(c.seed)
        self._setup_model_source()
        self._setup_data(data_path)  # every data problem surfaces here, before any write
        self._setup_model()
        self._setup_optimizer()
        self._setup_scheduler()  # the schedule needs the step count the data implies
        self._setup_checkpointing()  # last: restoring needs the model, optimizer and scheduler

    async def train_async(self, data_path: str | Path | None = None, on_event: EventCallback | None = None) -> TrainResult:
        """`train()` in a child process; `on_event` (sync or async) runs on the event loop.

        A process, not a thread: loading tokenizers and weights holds the GIL for
        hundreds of milliseconds at a time, which would stall every other task of the
        app. Events and the result come back over a queue; `cancel()` reaches the child
        through a shared Event and stops it at a step boundary. Cancelling the awaiting
        task cancels the run the same way.
        """
        ctx = multiprocessing.get_context("spawn")  # fork would copy a live torch runtime
        events = ctx.Queue()
        cancel = ctx.Event()
        if self._cancel.is_set():
            cancel.set()
        self._cancel = cancel
        child = ctx.Process(target=_train_in_child, args=(self.config.to_dict(), data_path, events, cancel), daemon=True)
        child.start()
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    kind, payload = await loop.run_in_executor(None, events.get, True, 0.2)
                except queue.Empty:
                    if child.exitcode is None:
                        continue
                    try:  # the result may have landed just after the timeout
                        kind, payload = events.get(timeout=1.0)
                    except queue.Empty:
                        raise RuntimeError(f"training process exited with code {child.exitcode}") from None
                if kind == "event":
                    if on_event is not None and inspect.isawaitable(outcome := on_event(payload)):
                        await outcome
                elif kind == "error":
                    raise payload
                else:
                    self.state = payload.state
                    return payload
        finally:
            # Whatever ended the wait (done, error, our caller cancelled): the child stops at
            # its next step boundary. Keep draining the queue so its feeder thread can exit.
            cancel.set()
            await loop.run_in_executor(None, _join_draining, child, events, 60.0)

    def cancel(self) -> None:
        """Stop at the next step boundary (thread-safe); `train` returns cancelled=True."""
        self._cancel.set()

    # -- setup ---------------------------------------------------------------------------

    def _setup_model_source(self) -> None:
        self.source: ModelSource = resolve_model_source(self.config.model_name)
        self.device = pick_device(self.config.device)
        self.dist: DistContext = distributed.init_distributed(self.device.type)
        if self.dist.enabled and self.config.quantize_base:
            raise ValueError("quantize_base (QLoRA) runs in one process: FSDP cannot shard bitsandbytes 4-bit weights")
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.tokenizer = load_tokenizer(self.source)

    def _setup_data(self, data_path: Path) -> None:
        c = self.config
        train, report = load_chat_file(data_path, on_bad_example=c.on_bad_example)
        self.data_files = [{"path": str(data_path), "sha256": sha256_file(data_path), "examples": report.examples}]
        if c.val_data_path:
            val, val_report = load_chat_file(c.val_data_path, on_bad_example=c.on_bad_example)
            self.data_files.append({"path": c.val_data_path, "sha256": sha256_file(c.val_data_path), "examples": val_report.examples, "split": "validation"})
        else:
            train, val = split_examples(train, val_fraction=c.val_fraction, seed=c.seed)
        self.data_report = report
        train_tok, _ = tokenize_dataset(train, self.tokenizer, max_seq_length=c.max_seq_length, on_bad_example=c.on_bad_example)
        val_tok, _ = tokenize_dataset(val, self.tokenizer, max_seq_length=c.max_seq_length, on_bad_example=c.on_bad_example)
        if not train_tok:
            raise ValueError(f"{data_path}: no usable training examples")
        self.train_items: list[Item] = pack_examples(train_tok, c.max_seq_length) if c.packing else [[e] for e in train_tok]
        self.val_items: list[Item] = pack_examples(val_tok, c.max_seq_length) if c.packing else [[e] for e in val_tok]
        self.val_examples = val
        if c.kl_anchor_path:
            texts, anchor_report = load_text_file(c.kl_anchor_path, on_bad_example=c.on_bad_example)
            self.anchor = AnchorRows(texts, self.tokenizer, c.kl_anchor_path, seed=c.seed)
            self.data_files.append({"path": c.kl_anchor_path, "sha256": sha256_file(c.kl_anchor_path),
                                    "examples": anchor_report.examples, "split": "kl_anchor"})
        self._setup_sampler()

    def _setup_sampler(self) -> None:
        """The epoch order over `train_items`, and the step count it implies."""
        c = self.config
        self.sampler = EpochSampler(len(self.train_items), seed=c.seed)
        micro_batches = math.ceil(len(self.train_items) / c.batch_size)
        self.steps_per_epoch = math.ceil(micro_batches / c.gradient_accumulation_steps)
        self.total_steps = c.max_steps or self.steps_per_epoch * c.num_epochs
        log.info("%s; %d train items, %d val items, %d steps", self.data_report.summary(), len(self.train_items),
                 len(self.val_items), self.total_steps)

    def _setup_model(self) -> None:
        self.model = self._load_model()
        self.loss_module = self._wrap(self.model)
        self._after_sharding()

    def _load_model(self) -> nn.Module:
        c = self.config
        if c.compile and self.dist.enabled:
            raise ConfigError("`compile`: not supported with --nproc > 1 yet (untested with FSDP2 here)")
        model = load_base_model(self.source, quantize_4bit=c.quantize_base, device=self.device)
        if c.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.autocast = autocast_dtype(c, self.device)
        if c.packing and attention.use_packed_attention(model):
            log.info("packed rows: attention computed example by example (%s)", attention.NAME)
        model = apply_lora(model, c) if c.use_lora else model
        if c.compile:
            # per layer, in place (state-dict keys unchanged): the layers share one graph (two
            # with LoRA: layer 0's input needs no gradient), compiled in about a minute; packed
            # batches keep one shape (`_collate`), padded ones compile a second, dynamic graph
            # for their second length; LossModule compiles the LM head + loss (compile_head)
            for block in distributed.transformer_blocks(model):
                block.compile()
        return model

    def _wrap(self, model: nn.Module) -> LossModule:
        """The module the loop calls; sharded with FSDP2 when the run is distributed."""
        module = LossModule(model, compile_head=self.config.compile)
        if self.dist.enabled:
            distributed.shard_model(module, distributed.transformer_blocks(model), self.device.type)
        return module

    def _after_sharding(self) -> None:
        # Every rank built the same weights from the same seed (FSDP shards each rank's own
        # full copy, so they must agree); from here on, dropout draws differ per rank.
        if self.dist.enabled:
            seed_everything(self.config.seed + self.dist.rank)
        self.trainable = [p for p in self.loss_module.parameters() if p.requires_grad]

    def _setup_optimizer(self) -> None:
        c = self.config
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]  # norms and biases
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=c.learning_rate, betas=(0.9, 0.999), eps=1e-8,
        )

    def _setup_scheduler(self) -> None:
        c = self.config
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=c.warmup_steps, total_steps=self.total_steps, kind=c.lr_scheduler)

    def _apply_spot_defaults(self) -> None:
        """On a GCP spot VM, time-based checkpoints and the preemption watcher are on."""
        c = self.config
        if not c.spot_defaults or (c.checkpoint_every_minutes and c.watch_gcp_preemption):
            return
        if not detect_gcp(MetadataClient.from_env().get).preemptible:
            return
        update = {"watch_gcp_preemption": True}
        if c.checkpoint_every_minutes is None:
            update["checkpoint_every_minutes"] = SPOT_CHECKPOINT_EVERY_MINUTES
        log.warning("GCP spot VM detected: %s", ", ".join(f"{k}={v}" for k, v in update.items()))
        self.config = c.model_copy(update=update)

    def _setup_checkpointing(self) -> None:
        self._apply_spot_defaults()
        c = self.config
        self.metrics: dict[str, Any] = {"train_loss": [], "eval": []}
        self.checkpoints = LocalCheckpointStore(Path(c.checkpoint_dir or Path(c.output_dir) / "checkpoints"),
                                                keep_last=c.keep_last_checkpoints)
        self.remote = open_remote(c.checkpoint_remote) if c.checkpoint_remote else None
        self._uploaded: set[str] = set()
        self.data_hash = hashlib.sha256("".join(f["sha256"] for f in self.data_files).encode()).hexdigest()
        if c.resume == "never":
            return
        # Only rank 0 touches checkpoint storage (the other nodes of a multi-VM run may
        # have empty disks); it picks the checkpoint and the others follow.
        path = distributed.broadcast_object(self._checkpoint_to_resume() if self.dist.is_main else None)
        if path is not None:
            self.load_checkpoint(Path(path))

    def _checkpoint_to_resume(self) -> str | None:
        c = self.config
        if c.resume != "auto":
            verify(Path(c.resume))
            return c.resume
        checkpoint = self.checkpoints.latest()
        local_step = checkpoint.step if checkpoint else -1
        # a fresh VM has an empty disk; a bucket may also hold a newer one
        downloaded = download_newest(self.remote, self.checkpoints.root, local_step) if self.remote else None
        if downloaded is not None:
            return str(downloaded)
        return str(checkpoint.path) if checkpoint is not None else None

    # -- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self, reason: str = "interval") -> Path | None:
        """Trainable weights, optimizer, scheduler, RNG and loop position, atomically.

        Collective in a distributed run: every rank contributes its shards and RNG
        state, rank 0 writes and uploads, and all return together (the path on rank 0,
        None elsewhere).
        """
        weights = _trainable_only(_unprefixed(distributed.model_state(self.loss_module, trainable_only=True)), self.model)
        optimizer = distributed.optimizer_state(self.loss_module, self.optimizer)
        rng = distributed.gather_objects(rng_state_tensors())
        if not self.dist.is_main:
            distributed.barrier()  # rank 0 is writing; leave (or go on) together
            return None

        def write(folder: Path, written: Callable[[str], None]) -> None:
            save_tensors(weights, folder, WEIGHTS, written)
            moments, optimizer_rest = split_optimizer_state(optimizer)
            save_tensors(moments, folder, OPTIMIZER, written)
            torch.save({"ranks": rng}, folder / RNG)
            (folder / STATE).write_text(json.dumps({
                "reason": reason,
                "state": self.state.to_dict(),
                "scheduler": self.scheduler.state_dict(),
                "optimizer": optimizer_rest,
                "config_hash": self.config.training_hash(),
                "data_hash": self.data_hash,
                "metrics": self.metrics,
                "config": self.config.to_dict(),
            }))

        last_eval = self.metrics["eval"][-1]["eval_loss"] if self.metrics["eval"] else None
        if self.remote is None:
            checkpoint = self.checkpoints.save(self.state.step, write, metric=last_eval)
        else:
            # each file starts uploading as soon as it is written; COMPLETE goes last
            with self.remote.start_upload(step_dirname(self.state.step)) as upload:
                checkpoint = self.checkpoints.save(self.state.step, write, metric=last_eval, on_file=upload.send)
                upload.finish(checkpoint.path / COMPLETE)
            self._uploaded.add(checkpoint.path.name)
            kept = {c.path.name for c in self.checkpoints.candidates()}
            self.remote.delete(sorted(self._uploaded - kept))  # never another run's checkpoints
            self._uploaded &= kept
        self._last_checkpoint_time = time.monotonic()
        log.info("checkpoint (%s) at step %d: %s", reason, self.state.step, checkpoint.path)
        distributed.barrier()
        return checkpoint.path

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote; refuse another run's checkpoint.

        Collective in a distributed run: rank 0 reads the files and broadcasts.
        """
        main = self.dist.is_main
        saved = distributed.broadcast_object(json.loads((path / STATE).read_text()) if main else None)
        mismatches = []
        if saved["config_hash"] != self.config.training_hash():
            changed = [k for k, v in saved["config"].items()
                       if k not in TrainingConfig.RESUME_NEUTRAL and self.config.to_dict().get(k) != v]
            mismatches.append(f"the training config changed ({', '.join(changed) or 'fields'})")
        if saved["data_hash"] != self.data_hash:
            mismatches.append("the training data changed (sha256 differs)")
        if mismatches:
            message = f"{path}: not resuming: {'; '.join(mismatches)}"
            if not self.config.force_resume:
                raise CheckpointError(message + ". Set `force_resume: true` to resume anyway, or `resume: never`.")
            log.warning("%s; resuming anyway (force_resume)", message)
        weights = load_tensors(path, WEIGHTS) if main else {}
        missing = distributed.broadcast_object([n for n in _trainable_names(self.model) if n not in weights]
                                               if main else None)
        if missing:
            raise CheckpointError(f"{path}: no saved weights for {missing[:3]}")
        distributed.load_model_state(self.loss_module, {f"model.{n}": t for n, t in weights.items()})
        optimizer = {}
        if main and (path / LEGACY_OPTIMIZER).is_file():
            optimizer = torch.load(path / LEGACY_OPTIMIZER, weights_only=True)
        elif main:
            optimizer = join_optimizer_state(load_tensors(path, OPTIMIZER), saved["optimizer"])
        distributed.load_optimizer_state(self.loss_module, self.optimizer, optimizer)
        self.scheduler.load_state_dict(saved["scheduler"])
        rng = distributed.broadcast_object(torch.load(path / RNG, weights_only=True)["ranks"] if main else None)
        if len(rng) != self.dist.world_size:
            log.warning("%s was saved by %d processes, this run has %d: resuming, but random draws (dropout) "
                        "will differ from an uninterrupted run", path, len(rng), self.dist.world_size)
        restore_rng_tensors(rng[self.dist.rank % len(rng)])
        self.state = TrainState.from_dict(saved["state"])
        self.metrics = saved["metrics"]
        log.warning("resumed from %s (step %d, epoch %d, item %d of the epoch)",
                    path, self.state.step, self.state.epoch, self.state.position)

    def _checkpointing(self) -> bool:
        c = self.config
        return bool(c.checkpoint_every_steps or c.checkpoint_every_minutes or c.checkpoint_remote)

    def _checkpoint_due(self) -> bool:
        c, step = self.config, self.state.step
        if c.checkpoint_every_steps and step % c.checkpoint_every_steps == 0:
            return True
        if c.checkpoint_every_minutes:
            return time.monotonic() - self._last_checkpoint_time >= 60 * c.checkpoint_every_minutes
        return False

    # -- the loop ------------------------------------------------------------------------

    def _collate(self, items: list[Item]) -> Batch:
        c = self.config
        pad_id = self.tokenizer.pad_token_id
        if c.packing:
            # Compiled layers keep a graph per input shape: an epoch's short last batch,
            # filled up with empty rows (all padding, no loss, no gradient), runs the graph
            # already compiled instead of compiling a dynamic one (a minute on 2 cores).
            rows = list(items) + [[]] * (c.batch_size - len(items)) if c.compile else items
            return collate_packed(rows, c.max_seq_length, pad_id)
        return collate_padded([row[0] for row in items], pad_id)

    def _next_micro_batch(self) -> Batch:
        """This rank's `batch_size` items of the next global micro-batch.

        All ranks advance the shared position by the global micro-batch; an epoch's
        tail may be smaller, and a rank left without items runs a loss-free copy of
        another rank's (see `Batch.without_loss`).
        """
        s = self.state
        indices = self.sampler.take(s.epoch, s.position, self.config.batch_size * self.dist.world_size)
        s.position += len(indices)
        return self._rank_batch([self.train_items[i] for i in indices])

    def _rank_batch(self, items: list) -> Batch:
        """This rank's contiguous share of a global micro-batch's items."""
        size = self.config.batch_size
        mine = items[self.dist.rank * size:(self.dist.rank + 1) * size]
        return self._collate(mine) if mine else self._collate(items[:1]).without_loss()

    def _batch_weight(self, batch: Batch) -> int:
        """What the step's loss is a mean over: labelled tokens for SFT."""
        return batch.num_loss_tokens

    def _model_inputs(self, batch: Batch) -> tuple:
        to = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        return to(batch.input_ids), to(batch.labels), to(batch.position_ids), to(batch.attention_mask)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)

    def _forward_loss_sum(self, batch: Batch, kl_weight: float = 0.0, anchor_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The SFT loss sum; training adds the KL-to-base term when configured, eval never does."""
        with self._autocast():
            return self.loss_module(*self._model_inputs(batch), kl_weight=kl_weight,
                                    anchor_ids=None if anchor_ids is None else anchor_ids.to(self.device))

    def _anchor_batch(self) -> torch.Tensor | None:
        """This micro-step's rows of anchor text (a function of the micro-step: resumes exactly)."""
        if self.anchor is None:
            return None
        return self.anchor.batch(self.state.micro_step, self.config.kl_anchor_tokens, self.dist.rank, self.dist.world_size)

    def _train_step(self) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches.

        Each micro-batch's loss *sum* is divided by the loss-token count of the whole
        step, over all ranks, so every labelled token weighs the same however the
        batches split; FSDP then sums (not averages) the ranks' gradients.
        """
        c = self.config
        s = self.state
        if s.position >= self.sampler.num_items:  # epochs turn over between steps, never inside one
            s.epoch, s.position = s.epoch + 1, 0
        batches = []
        while len(batches) < c.gradient_accumulation_steps and s.position < self.sampler.num_items:
            batches.append(self._next_micro_batch())
        weight, tokens = distributed.all_reduce([sum(self._batch_weight(b) for b in batches),
                                                 sum(b.num_tokens for b in batches)])
        self.loss_module.train()
        total = 0.0
        for i, batch in enumerate(batches):
            if self.dist.enabled:  # reduce-scatter once per step, after the last micro-batch
                self.loss_module.set_requires_gradient_sync(i == len(batches) - 1)
            loss = self._forward_loss_sum(batch, kl_weight=c.kl_to_base, anchor_ids=self._anchor_batch()) / max(weight, 1)
            loss.backward()
            total += loss.item()
            self.state.micro_step += 1
        [total] = distributed.all_reduce([total])
        grad_norm = distributed.clip_grad_norm(self.trainable, c.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens_seen += int(tokens)
        return {"loss": total, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "tokens": int(tokens)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-mean validation loss and perplexity over every validation item."""
        if not self.val_items:
            return {}
        self.loss_module.eval()
        loss_sum, tokens = 0.0, 0
        for batch in self._val_batches():
            loss_sum += self._forward_loss_sum(batch).item()
            tokens += batch.num_loss_tokens
        loss_sum, tokens = distributed.all_reduce([loss_sum, tokens])
        loss = loss_sum / max(tokens, 1)
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def _val_batches(self):
        """This rank's share of the validation items, global micro-batch by micro-batch."""
        step = self.config.batch_size * self.dist.world_size
        for start in range(0, len(self.val_items), step):
            yield self._rank_batch(self.val_items[start:start + step])

    @torch.no_grad()
    def samples(self) -> list[dict[str, str]]:
        """Greedy replies to a few validation prompts, to read beside the loss.

        Single-process runs only: generating from FSDP shards would need every rank
        in lockstep through `generate`, for a log line.
        """
        if self.dist.enabled:
            return []
        self.model.eval()
        out = []
        # compiled layers (`compile: true`) would recompile for every decode length: eager here
        with torch.compiler.set_stance("force_eager"):
            for example in self.val_examples[: self.config.num_samples]:
                out.append(self._sample(example))
        return out

    def _sample(self, example: ChatExample) -> dict[str, str]:
        messages = example.to_dicts()
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        inputs = self.tokenizer.apply_chat_template(
            messages[:last], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.device)
        ids = self.model.generate(**inputs, max_new_tokens=self.config.sample_max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        reply = self.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return {"prompt": messages[last - 1]["content"], "reply": reply, "reference": messages[last]["content"]}

    def _emit(self, event: TrainEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _run(self) -> TrainResult:
        c = self.config
        output_dir = Path(c.output_dir)
        main = self.dist.is_main  # rank 0 alone logs, shows progress and writes files
        if main:
            output_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.metrics
        progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            disable=not (self.show_progress and main), console=Console(stderr=True),
        )
        start = time.perf_counter()
        self._last_checkpoint_time = time.monotonic()
        cancelled = False
        preempted_url = MetadataClient.from_env().url("instance/preempted?wait_for_change=true")
        guard = PreemptionGuard(preempted_url if c.watch_gcp_preemption else None)
        with MetricsLogger(output_dir / "logs", enabled=main) as logger, progress, guard:
            task = progress.add_task("train", total=self.total_steps, completed=self.state.step, loss="-", tps="-")
            while self.state.step < self.total_steps:
                if self._cancel.is_set():
                    cancelled = True
                    break
                step_start = time.perf_counter()
                values = self._train_step()
                self.state.train_seconds += time.perf_counter() - step_start
                values["tokens_per_s"] = self.state.tokens_seen / self.state.train_seconds
                step = self.state.step
                metrics["train_loss"].append({"step": step, "loss": values["loss"]})
                if step % c.log_every_steps == 0 or step == self.total_steps:
                    logger.log(step, "train", values)
                progress.update(task, completed=step, loss=f"{values['loss']:.4f}", tps=f"{values['tokens_per_s']:.0f}")
                self._emit(TrainEvent("step", step, self.total_steps, values))
                # every rank stops or checkpoints at the same step, whichever rank saw why
                preempted, due = distributed.all_reduce([guard.triggered.is_set(), self._checkpoint_due()], "max")
                if preempted:  # before eval: the notice gives ~30 s, not an eval's worth
                    path = self.save_checkpoint("preemption")
                    raise Preempted(step, str(path) if path else None, guard.reason or "another rank was preempted")
                if c.eval_every_steps and step % c.eval_every_steps == 0 and step < self.total_steps:
                    self._log_eval(logger, metrics, step)
                if due and step < self.total_steps:
                    self.save_checkpoint("interval")
            if not cancelled:
                if self._checkpointing() and self.state.step > 0:
                    # the finished state: a crash in eval or export, or a re-run of the same
                    # recipe, resumes here instead of retraining the tail
                    self.save_checkpoint("final")
                final = self._log_eval(logger, metrics, self.state.step)
                metrics.update(final)

        metrics.update(steps=self.state.step, train_tokens=self.state.tokens_seen, train_seconds=self.state.train_seconds,
                       tokens_per_s=self.state.tokens_seen / max(self.state.train_seconds, 1e-9),
                       wall_seconds=time.perf_counter() - start)
        if cancelled:
            self._emit(TrainEvent("cancelled", self.state.step, self.total_steps))
            return TrainResult(output_dir, None, metrics, self.state, cancelled=True)
        model_dir = self.save_model(output_dir, metrics)
        self._emit(TrainEvent("done", self.state.step, self.total_steps, {k: v for k, v in metrics.items() if isinstance(v, float)}))
        return TrainResult(output_dir, model_dir, metrics, self.state)

    def _log_eval(self, logger: MetricsLogger, metrics: dict[str, Any], step: int) -> dict[str, float]:
        values = self.evaluate()
        if values:
            logger.log(step, "eval", values)
            metrics["eval"].append({"step": step, **values})
            self._emit(TrainEvent("eval", step, self.total_steps, values))
        for i, sample in enumerate(self.samples()):
            logger.log_text(step, f"sample_{i}", f"{sample['prompt']}\n-> {sample['reply']}")
        return values

    # -- output --------------------------------------------------------------------------

    def output_name(self) -> str:
        if self.config.output_name:
            return self.config.output_name
        stem = Path(self.config.model_name).name.removesuffix(".gguf").lower()
        return f"{stem}-sft"

    def save_model(self, output_dir: Path, metrics: dict[str, Any]) -> Path | None:
        """Write the PRIME model directory: adapter/, merged weights, tokenizer, prime.json.

        Built in a staging folder and renamed into place, so a crash mid-save never
        leaves a directory that looks complete. Collective in a distributed run (rank 0
        writes; the others return None).
        """
        c = self.config
        model = self._exportable_model()
        if model is None:
            return None
        name, version = self.output_name(), c.output_version
        final = output_dir / f"{name}-{version}"
        staging = output_dir / f".{name}-{version}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if c.use_lora:
            model.save_pretrained(staging / "adapter", safe_serialization=True)
            if c.merge_adapter:
                self._merged_model(staging / "adapter").save_pretrained(staging, safe_serialization=True)
        else:
            model.save_pretrained(staging, safe_serialization=True)
        self.tokenizer.save_pretrained(staging)
        base_config = getattr(model, "config", None)
        write_prime_manifest(
            staging,
            name=name,
            version=version,
            base=self.source.location,
            architecture=getattr(base_config, "model_type", None),
            context_length=min(c.max_seq_length, getattr(base_config, "max_position_embeddings", c.max_seq_length)),
            stop=[self.tokenizer.eos_token] if self.tokenizer.eos_token else [],
            lineage={
                "parent": c.model_name,
                "source": {"kind": self.source.kind, "location": self.source.location, "description": self.source.description},
                "data": self.data_files,
                "training_config": c.to_dict(),
                "trainer": f"reactor-core {__version__}",
            },
            metrics={k: v for k, v in metrics.items() if k in ("eval_loss", "perplexity", "steps", "train_tokens", "tokens_per_s")}
            | {"final_train_loss": metrics["train_loss"][-1]["loss"] if metrics["train_loss"] else None},
        )
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        return final

    def _exportable_model(self) -> nn.Module | None:
        """The trained model as one plain module: `self.model` in a single process; in
        a distributed run, the shards gathered into a fresh copy on rank 0 (None elsewhere)."""
        if not self.dist.enabled:
            return self.model
        state = _unprefixed(distributed.model_state(self.loss_module, trainable_only=self.config.use_lora))
        if not self.dist.is_main:
            return None
        model = load_base_model(self.source, quantize_4bit=False, device=torch.device("cpu"))
        if self.config.use_lora:
            model = apply_lora(model, self.config)
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"gathered weights do not fit the model: {unexpected[:3]}")
        return model

    def _merged_model(self, adapter_dir: Path):
        """Base reloaded in float32 + the saved adapter, merged: W = W0 + (alpha/r) B A.

        Merging into a 4-bit QLoRA base would round the update away, so the base is
        always reloaded at full precision first.
        """
        from peft import PeftModel

        base = load_base_model(self.source, quantize_4bit=False, device=torch.device("cpu"))
        return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def _trainable_only(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """What trains, each tensor under one name.

    The distributed state dict lists a tied tensor under both of its names (SmolLM2's LM
    head is its embedding) and its frozen-parameter filter misses the second one, so a
    LoRA checkpoint would carry the whole frozen embedding and a full one would hold a
    shared tensor twice, which safetensors refuses. The model's own parameter list names
    each parameter once; loading that name fills every alias, since they are one tensor.
    """
    trainable = set(_trainable_names(model))
    return {name: tensor for name, tensor in state.items() if name in trainable}


def _trainable_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def _unprefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names of `LossModule`'s state as the wrapped model names them."""
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


def _join_draining(child, events, timeout: float) -> None:
    """Join the child while emptying its queue; a child blocked on a full pipe never exits."""
    deadline = time.monotonic() + timeout
    while child.is_alive() and time.monotonic() < deadline:
        try:
            events.get(timeout=0.1)
        except queue.Empty:
            pass
    if child.is_alive():
        child.kill()  # SIGKILL: SIGTERM would read as a preemption and checkpoint first
    child.join()


def _picklable(err: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else its text in a RuntimeError."""
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def _train_in_child(config: dict[str, Any], data_path: str | Path | None, events, cancel) -> None:
    """Entry point of `Trainer.train_async`'s process."""
    trainer = Trainer(TrainingConfig.model_validate(config), on_event=lambda e: events.put(("event", e)), progress=False)
    trainer._cancel = cancel
    try:
        events.put(("result", trainer.train(data_path)))
    except BaseException as err:
        events.put(("error", _picklable(err)))
