"""The loop every recipe shares: setup, train, evaluate, checkpoint, save.

    recipe = build_recipe(config)        # reactor_core.training.recipes
    recipe.setup("./data/train.jsonl")   # load and validate everything; write nothing
    result = recipe.train()              # the loop, then the PRIME model directory

Plain PyTorch, no trainer framework: transformers builds the model, peft wraps it in
LoRA, and the loop below owns everything else (the sampler's position, accumulation,
clipping, the schedule), so checkpoints can capture and restore it exactly.

A method (SFT, DPO, ...) is a subclass that says what its items are and what its
loss is: `setup_data`, `collate`, `batch_weight`, `loss_sum` and `evaluate`, plus
`setup_model` when it needs more than the policy (DPO's reference).

A cancel or a preemption is heard at each step boundary and also between eval batches
(`eval_batches`) and generated samples: GCP's notice gives ~30 s, less than a long eval.
The cut-short eval logs nothing and runs again first thing on resume (`eval_missed`),
so a resumed run's metrics are the uninterrupted run's.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Protocol

import torch
from rich.console import Console
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from reactor_core.data import Batch, split_examples
from reactor_core.data.pipeline import clean as run_pipeline
from reactor_core.files import sha256_file
from reactor_core.gcp.preemption import Preempted, PreemptionGuard, preemption_guard
from reactor_core.training import attention, distributed, memory
from reactor_core.training.checkpointing import Checkpointer, with_spot_defaults
from reactor_core.training.config import ConfigError, TrainingConfig
from reactor_core.training.distributed import DistContext
from reactor_core.training.events import EventCallback, TrainEvent, TrainResult
from reactor_core.training.loss import LossModule
from reactor_core.training.memory import MemoryEstimate
from reactor_core.training.metrics import MetricsLogger
from reactor_core.training.model import (
    TARGET_MODULES,
    ModelSource,
    autocast_dtype,
    base_dtype,
    fetch_hub_model,
    load_base_model,
    load_processor,
    load_tokenizer,
    pick_device,
    prepare_trainable,
    resolve_model_source,
)
from reactor_core.training.prime_dir import exportable_model, write_model_dir
from reactor_core.training.schedule import build_scheduler
from reactor_core.training.state import EpochSampler, TrainState, seed_everything
from reactor_core.training.vision import VisionFamily, check_vision_keys, family_for

log = logging.getLogger("reactor_core")


class StopFlag(Protocol):
    """A stop request the loop polls: a threading.Event, a multiprocessing Event
    (train_async's child), or the preemption guard's flag."""

    def is_set(self) -> bool: ...

    def set(self) -> None: ...


class Interrupted(Exception):
    """An eval or sample loop left early: the run was cancelled or preempted meanwhile."""


class Recipe(ABC):
    """One training method on the shared loop; `setup(data_path)` then `train()`."""

    def __init__(
        self,
        config: TrainingConfig,
        *,
        on_event: EventCallback | None = None,
        progress: bool = True,
        stop: StopFlag | None = None,
    ) -> None:
        """`stop`: set it (from any thread, or another process for a multiprocessing
        Event) and the loop stops at the next step boundary or eval batch; see `cancel`."""
        self.config = config
        self.on_event = on_event
        self.show_progress = progress
        self.stop: StopFlag = stop if stop is not None else threading.Event()
        self.preemption: StopFlag = threading.Event()  # the guard's flag while `train` runs
        self.state = TrainState()

    # -- what a method defines -------------------------------------------------------------

    @abstractmethod
    def setup_data(self, data_path: Path) -> None:
        """Set `train_items`, `val_items`, `data_report` and `data_files` (lineage, with
        sha256); raise on any data problem, before anything is written."""

    @abstractmethod
    def collate(self, items: list) -> Batch:
        """One micro-batch from `batch_size` items."""

    @abstractmethod
    def batch_weight(self, batch: Batch) -> int:
        """What the step's loss is a mean over (labelled tokens, pairs, ...)."""

    @abstractmethod
    def loss_sum(self, batch: Batch, training: bool = False) -> torch.Tensor:
        """The batch's loss summed over its `batch_weight` units; `training` adds what
        only training adds (SFT's KL-to-base term)."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Validation metrics over every validation item (`{}` without any), batch by
        batch from `eval_batches`, which raises Interrupted when the run must stop."""

    def samples(self) -> list[dict[str, str]]:
        """Generated replies to log beside the eval loss ({prompt, reply, reference});
        call `check_interrupted` before each one."""
        return []

    # -- setup -------------------------------------------------------------------------------

    def setup(self, data_path: str | Path | None = None) -> None:
        """Load tokenizer, data, model, optimizer and schedule, and resume; write nothing."""
        c = self.config
        data_path = Path(data_path or c.data_path or "")
        if not str(data_path) or str(data_path) == ".":
            raise ValueError("no training data: pass a path to train() or set `data_path`")
        seed_everything(c.seed)
        self.setup_model_source()
        self.setup_data(data_path)  # every data problem surfaces here, before any write
        self.setup_sampler()
        self.setup_model()
        self.setup_optimizer()
        self.setup_scheduler()  # the schedule needs the step count the data implies
        self.setup_checkpointing()  # last: restoring needs the model, optimizer and scheduler

    def setup_model_source(self) -> None:
        # a Hub source (an id or a short name such as llama-2-7b) is downloaded here, safetensors only
        self.source: ModelSource = fetch_hub_model(resolve_model_source(self.config.model_name))
        self.device = pick_device(self.config.device)
        self.dist: DistContext = distributed.init_distributed(self.device.type)
        if self.dist.enabled and self.config.quantize_base:
            raise ValueError("quantize_base (QLoRA) runs in one process: FSDP cannot shard bitsandbytes 4-bit weights")
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        # a vision model (config.json with `vision_config`) comes with its processor, whose
        # chat template and tokenizer are the ones used; the vision keys are refused elsewhere
        vision_type = self.source.vision_model_type
        check_vision_keys(self.config, vision_type is not None, self.config.model_name)
        self.family: VisionFamily | None = family_for(vision_type, self.config.model_name) if vision_type else None
        self.processor = load_processor(self.source) if self.family else None
        self.tokenizer = self.processor.tokenizer if self.processor else load_tokenizer(self.source)

    def read_splits(self, data_path: Path, read: Callable[[str | Path], tuple[list[Any], Any]]) -> tuple[list[Any], list[Any]]:
        """Training and validation examples of any method: `data_path` and `val_data_path`
        (else a seeded `val_fraction` split of the training file), each read by `read` (the
        method's validating reader: path -> (examples, report)); every file with its sha256
        goes into the lineage (`data_files`), the training file's report into `data_report`."""
        c = self.config
        train_path, cleaned = self.clean_data(data_path, "train")
        train, report = read(train_path)
        self.data_files = [{"path": str(train_path), "sha256": sha256_file(train_path), "examples": report.examples}
                           | cleaned]
        if c.val_data_path:
            val_path, cleaned = self.clean_data(Path(c.val_data_path), "validation")
            val, val_report = read(val_path)
            self.data_files.append({"path": str(val_path), "sha256": sha256_file(val_path),
                                    "examples": val_report.examples, "split": "validation"} | cleaned)
        else:
            train, val = split_examples(train, val_fraction=c.val_fraction, seed=c.seed)
        self.data_report = report
        return train, val

    def clean_data(self, path: Path, split: str) -> tuple[Path, dict[str, Any]]:
        """`path` through the recipe's `data_pipeline` into `<output_dir>/data/<split>.clean.jsonl`
        (a vision model's into `reactor-<split>.clean.jsonl` beside `path`; the path itself when
        it names none), and what the lineage records of it: the pipeline's config, every
        input's sha256 and what was removed, by reason."""
        pipeline = self.config.data_pipeline
        if pipeline is None:
            return path, {}
        if self.family is not None:
            # a vision model's records name their images relative to their file, and an image
            # path may not leave that folder (data/images.py): the cleaned file goes beside it
            out = path.parent / f"reactor-{split}.clean.jsonl"
        else:
            out = Path(self.config.output_dir) / "data" / f"{split}.clean.jsonl"
        summary = run_pipeline([path], out, pipeline)
        log.info("data pipeline (%s): %s -> %s, %d of %d records kept; removed %s; report %s", summary.backend, path,
                 out, summary.kept, summary.read, dict(summary.removed) or "none", summary.report)
        return out, {"pipeline": {"config": summary.config, "inputs": summary.inputs, "read": summary.read,
                                  "kept": summary.kept, "removed": dict(summary.removed), "report": summary.report}}

    def setup_sampler(self) -> None:
        """The epoch order over `train_items`, and the step count it implies."""
        c = self.config
        self.sampler = EpochSampler(len(self.train_items), seed=c.seed)
        micro_batches = math.ceil(len(self.train_items) / c.batch_size)
        self.steps_per_epoch = math.ceil(micro_batches / c.gradient_accumulation_steps)
        self.total_steps = c.max_steps or self.steps_per_epoch * c.num_epochs
        log.info("%s; %d train items, %d val items, %d steps", self.data_report.summary(), len(self.train_items),
                 len(self.val_items), self.total_steps)

    def setup_model(self) -> None:
        self.model = self.load_model()
        self.loss_module = self.wrap(self.model)
        self.after_sharding()

    def load_model(self) -> nn.Module:
        c = self.config
        if c.compile and self.dist.enabled:
            raise ConfigError("`compile`: not supported with --nproc > 1 yet (untested with FSDP2 here)")
        self.base_dtype = base_dtype(c, self.device)
        self.autocast = autocast_dtype(c, self.device)
        self.check_memory()
        model = load_base_model(self.source, quantize_4bit=c.quantize_base, device=self.device, dtype=self.base_dtype)
        if c.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if c.packing and attention.use_packed_attention(model):
            log.info("packed rows: attention computed example by example (%s)", attention.NAME)
        model = prepare_trainable(model, c)  # LoRA, or a vision model's parts frozen as the keys say
        if c.compile:
            # per layer, in place (state-dict keys unchanged): the layers share one graph (two
            # with LoRA: layer 0's input needs no gradient), compiled in about a minute; packed
            # batches keep one shape (`collate`), padded ones compile a second, dynamic graph
            # for their second length; LossModule compiles the LM head + loss (compile_head)
            for block in distributed.transformer_blocks(model):
                block.compile()
        return model

    def check_memory(self) -> None:
        """Estimate the run's memory from config.json and the safetensors headers, print it,
        and refuse (MemoryCheckError, naming needed vs free and what to change) a run that
        cannot fit; with `check_memory: false` a warning instead. Before any weight loads."""
        c = self.config
        self.memory_estimate: MemoryEstimate | None = None
        if self.source.gguf_file:
            log.info("no memory estimate for a GGUF source (its tensors are dequantized on load)")
            return
        shape = memory.read_model_shape(self.source.location)
        targets = c.target_modules if c.target_modules != "auto" else TARGET_MODULES.get(shape.model_type, "all-linear")
        estimate = memory.estimate_memory(
            shape, c, dtype_name=str(self.base_dtype).removeprefix("torch."), device=self.device.type,
            autocast_bytes=2 if self.autocast is not None else 4, world_size=self.dist.world_size, lora_targets=targets)
        self.memory_estimate = estimate
        if self.dist.is_main:
            title = (f"memory estimate: {shape.params / 1e9:.2f} B parameters, base in {self.base_dtype}"
                     f"{' (linear layers NF4)' if c.quantize_base else ''}, {c.batch_size} x {c.max_seq_length} tokens")
            log.info("%s: %s", title, ", ".join(f"{k} {v}" for k, v in estimate.rows()))
            if self.show_progress:
                table = Table(title=title, title_justify="left", show_header=False)
                table.add_column("part", no_wrap=True)
                table.add_column("bytes", justify="right", no_wrap=True)
                for row in estimate.rows():
                    table.add_row(*row)
                Console(stderr=True).print(table)
        problem = memory.check_fits(estimate, self.available_memory(), c)
        if problem is None:
            return
        if c.check_memory:
            raise memory.MemoryCheckError(f"{c.model_name}: {problem}")
        log.warning("%s: %s (check_memory: false, trying anyway)", c.model_name, problem)

    def available_memory(self) -> memory.Available:
        """Free memory where the run goes (the GPU's, or RAM) and free RAM."""
        return memory.available_memory(self.device)

    def wrap(self, model: nn.Module) -> LossModule:
        """The module the loop calls; sharded with FSDP2 when the run is distributed."""
        module = LossModule(model, compile_head=self.config.compile)
        if self.dist.enabled:
            distributed.shard_model(module, distributed.transformer_blocks(model), self.device.type)
        return module

    def after_sharding(self) -> None:
        # Every rank built the same weights from the same seed (FSDP shards each rank's own
        # full copy, so they must agree); from here on, dropout draws differ per rank.
        if self.dist.enabled:
            seed_everything(self.config.seed + self.dist.rank)
        self.trainable = [p for p in self.loss_module.parameters() if p.requires_grad]

    def setup_optimizer(self) -> None:
        """AdamW; a vision model's projector in groups of its own at `projector_learning_rate`."""
        c = self.config
        projector: set[int] = set()
        if self.family is not None and c.projector_learning_rate is not None:
            projector = {id(p) for name, p in self.loss_module.named_parameters()
                         if p.requires_grad and self.family.part_of(name) == "projector"}
        groups = []
        for i, (lr, params) in enumerate(((c.learning_rate, [p for p in self.trainable if id(p) not in projector]),
                                          (c.projector_learning_rate, [p for p in self.trainable if id(p) in projector]))):
            if i == 0 or params:
                groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": c.weight_decay, "lr": lr},
                           {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]  # norms, biases
        self.optimizer = torch.optim.AdamW(groups, lr=c.learning_rate, betas=(0.9, 0.999), eps=1e-8)

    def setup_scheduler(self) -> None:
        c = self.config
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=c.warmup_steps, total_steps=self.total_steps, kind=c.lr_scheduler)

    def setup_checkpointing(self) -> None:
        self.config = with_spot_defaults(self.config)
        self.metrics: dict[str, Any] = {"train_loss": [], "eval": []}
        self.checkpointer = Checkpointer(self.config, self.dist, self.data_files)
        path = self.checkpointer.to_resume()
        if path is not None:
            self.load_checkpoint(path)

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Train from where `setup` left off, evaluate, and write the PRIME model directory."""
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
        self.checkpointer.last_save = time.monotonic()
        cancelled = False
        guard = preemption_guard(c.watch_gcp_preemption)
        self.preemption = guard.triggered
        with MetricsLogger(output_dir / "logs", enabled=main) as logger, progress, guard:
            task = progress.add_task("train", total=self.total_steps, completed=self.state.step, loss="-", tps="-")
            if self.eval_missed():
                self.eval_or_preempt(logger, self.state.step, guard)
            while self.state.step < self.total_steps:
                if self.stop.is_set():
                    cancelled = True
                    break
                step_start = time.perf_counter()
                values = self.train_step()
                self.state.train_seconds += time.perf_counter() - step_start
                values["tokens_per_s"] = self.state.tokens_seen / self.state.train_seconds
                step = self.state.step
                metrics["train_loss"].append({"step": step, "loss": values["loss"]})
                if step % c.log_every_steps == 0 or step == self.total_steps:
                    logger.log(step, "train", values)
                progress.update(task, completed=step, loss=f"{values['loss']:.4f}", tps=f"{values['tokens_per_s']:.0f}")
                self.emit(TrainEvent("step", step, self.total_steps, values))
                # every rank stops or checkpoints at the same step, whichever rank saw why
                preempted, due = distributed.all_reduce([guard.triggered.is_set(), self.checkpointer.due(step)], "max")
                if preempted:  # before eval: the notice gives ~30 s, not an eval's worth
                    self.raise_preempted(guard, self.save_checkpoint("preemption"))
                if self.eval_due(step):
                    self.eval_or_preempt(logger, step, guard)
                if due and step < self.total_steps:
                    self.save_checkpoint("interval")
            if not cancelled:
                # the finished state: a crash in eval or export, or a re-run of the same
                # recipe, resumes here instead of retraining the tail
                saved = self.checkpointer.enabled and self.state.step > 0
                final_checkpoint = self.save_checkpoint("final") if saved else None
                final = self.log_eval(logger, self.state.step)
                if final is None and self.preempted_anywhere():  # the final checkpoint holds this state
                    self.raise_preempted(guard, final_checkpoint if saved else self.save_checkpoint("preemption"))
                cancelled = final is None
                metrics.update(final or {})

        metrics.update(steps=self.state.step, train_tokens=self.state.tokens_seen, train_seconds=self.state.train_seconds,
                       tokens_per_s=self.state.tokens_seen / max(self.state.train_seconds, 1e-9),
                       wall_seconds=time.perf_counter() - start)
        if cancelled:
            self.emit(TrainEvent("cancelled", self.state.step, self.total_steps))
            return TrainResult(output_dir, None, metrics, self.state, cancelled=True)
        model_dir = self.save_model(output_dir, metrics)
        self.emit(TrainEvent("done", self.state.step, self.total_steps, {k: v for k, v in metrics.items() if isinstance(v, float)}))
        return TrainResult(output_dir, model_dir, metrics, self.state)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches.

        Each micro-batch's loss *sum* is divided by the `batch_weight` of the whole
        step, over all ranks, so every labelled token (or pair) weighs the same however
        the batches split; FSDP then sums (not averages) the ranks' gradients.
        """
        c = self.config
        s = self.state
        if s.position >= self.sampler.num_items:  # epochs turn over between steps, never inside one
            s.epoch, s.position = s.epoch + 1, 0
        batches = []
        while len(batches) < c.gradient_accumulation_steps and s.position < self.sampler.num_items:
            batches.append(self.next_micro_batch())
        weight, tokens = distributed.all_reduce([sum(self.batch_weight(b) for b in batches),
                                                 sum(b.num_tokens for b in batches)])
        self.loss_module.train()
        total = 0.0
        for i, batch in enumerate(batches):
            if self.dist.enabled:  # reduce-scatter once per step, after the last micro-batch
                self.loss_module.set_requires_gradient_sync(i == len(batches) - 1)
            loss = self.loss_sum(batch, training=True) / max(weight, 1)
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

    def next_micro_batch(self) -> Batch:
        """This rank's `batch_size` items of the next global micro-batch.

        All ranks advance the shared position by the global micro-batch; an epoch's
        tail may be smaller, and a rank left without items runs a loss-free copy of
        another rank's (see `Batch.without_loss`).
        """
        s = self.state
        indices = self.sampler.take(s.epoch, s.position, self.config.batch_size * self.dist.world_size)
        s.position += len(indices)
        return self.rank_batch([self.train_items[i] for i in indices])

    def rank_batch(self, items: list) -> Batch:
        """This rank's contiguous share of a global micro-batch's items."""
        size = self.config.batch_size
        mine = items[self.dist.rank * size:(self.dist.rank + 1) * size]
        return self.collate(mine) if mine else self.collate(items[:1]).without_loss()

    def val_batches(self) -> Iterator[Batch]:
        """This rank's share of the validation items, global micro-batch by micro-batch."""
        step = self.config.batch_size * self.dist.world_size
        for start in range(0, len(self.val_items), step):
            yield self.rank_batch(self.val_items[start:start + step])

    def eval_batches(self) -> Iterator[Batch]:
        """`val_batches`, asking before each one whether the run must stop (Interrupted)."""
        for batch in self.val_batches():
            self.check_interrupted()
            yield batch

    def check_interrupted(self) -> None:
        """Raise Interrupted when the run is cancelled or preempted on any rank (collective:
        every rank calls it at the same point, so all leave the eval together)."""
        if max(distributed.all_reduce([self.stop.is_set(), self.preemption.is_set()], "max")):
            raise Interrupted

    def preempted_anywhere(self) -> bool:
        """Whether any rank heard a preemption notice (collective)."""
        return bool(distributed.all_reduce([self.preemption.is_set()], "max")[0])

    def model_inputs(self, batch: Batch) -> tuple:
        to = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        return to(batch.input_ids), to(batch.labels), to(batch.position_ids), to(batch.attention_mask)

    def autocast_context(self):
        return torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)

    def eval_due(self, step: int) -> bool:
        """Whether `eval_every_steps` evaluates after `step` (the last step always does, apart)."""
        every = self.config.eval_every_steps
        return bool(every) and step % every == 0 and 0 < step < self.total_steps

    def eval_missed(self) -> bool:
        """Whether the run this one resumes stopped before or during the eval due after its
        last step: that eval runs first, as the uninterrupted run would have."""
        step = self.state.step
        return self.eval_due(step) and all(e["step"] != step for e in self.metrics["eval"])

    def log_eval(self, logger: MetricsLogger, step: int) -> dict[str, float] | None:
        """Evaluate and generate samples, then log both; None, with nothing logged, when a
        cancel or preemption cut it short (`eval_missed` redoes it after a resume)."""
        try:
            values = self.evaluate()
            samples = self.samples()
        except Interrupted:
            log.warning("eval after step %d cut short: the run is stopping", step)
            return None
        if values:
            logger.log(step, "eval", values)
            self.metrics["eval"].append({"step": step, **values})
            self.emit(TrainEvent("eval", step, self.total_steps, values))
        for i, sample in enumerate(samples):
            logger.log_text(step, f"sample_{i}", f"{sample['prompt']}\n-> {sample['reply']}")
        return values

    def eval_or_preempt(self, logger: MetricsLogger, step: int, guard: PreemptionGuard) -> None:
        """The eval due after `step`; a preemption meanwhile writes the emergency checkpoint
        and raises Preempted (a cancel returns, and the loop stops at its next check)."""
        if self.log_eval(logger, step) is None and self.preempted_anywhere():
            self.raise_preempted(guard, self.save_checkpoint("preemption"))

    def raise_preempted(self, guard: PreemptionGuard, checkpoint: Path | None) -> NoReturn:
        """Stop for a preemption, once `checkpoint` (the emergency one) is written."""
        raise Preempted(self.state.step, str(checkpoint) if checkpoint else None,
                        guard.reason or "another rank was preempted")

    def emit(self, event: TrainEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def cancel(self) -> None:
        """Stop at the next step boundary or eval batch (thread-safe); `train` returns cancelled=True."""
        self.stop.set()

    # -- checkpoints and output -------------------------------------------------------------

    def save_checkpoint(self, reason: str = "interval") -> Path | None:
        """Everything an exact resume needs (collective; the path on rank 0, else None)."""
        return self.checkpointer.save(reason, state=self.state, metrics=self.metrics, loss_module=self.loss_module,
                                      model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)

    def load_checkpoint(self, path: Path) -> None:
        """Restore what `save_checkpoint` wrote; refuse another run's checkpoint (collective)."""
        self.state, self.metrics = self.checkpointer.load(path, loss_module=self.loss_module, model=self.model,
                                                          optimizer=self.optimizer, scheduler=self.scheduler)

    def save_model(self, output_dir: Path, metrics: dict[str, Any]) -> Path | None:
        """The PRIME model directory (collective: rank 0 writes, the others return None)."""
        model = exportable_model(self.model, self.loss_module, self.dist, self.source, self.config)
        if model is None:
            return None
        return write_model_dir(output_dir, model, tokenizer=self.tokenizer, source=self.source, config=self.config,
                               data_files=self.data_files, metrics=metrics, processor=self.processor)
