"""How much memory a run needs, estimated before a single weight is loaded.

A 7B base that does not fit is otherwise found out minutes into loading, by the OOM
killer (no message) or a CUDA out-of-memory deep in the first step. The estimate reads
only `config.json` and the safetensors headers (tensor names and shapes; `safe_open`
maps the file and parses the header, no tensor is read), so it costs milliseconds on a
15 GB model, and `reactor train` prints it and refuses, with the numbers and what to
change, a run that cannot fit.

What is counted (bytes), per process:

- weights: every tensor at `base_dtype`; with QLoRA the 2-D weights outside the
  embeddings and LM head at NF4 with double-quantized scales (4.5 bits), the rest at
  `base_dtype`. FSDP: a 1/N shard plus two gathered blocks (the one running and the
  one prefetched).
- trainable: parameters x 16 (float32 weight, gradient and AdamW's two moments): the
  LoRA adapters (r x (in + out) per adapted matrix, from the header's shapes), or every
  weight for a full fine-tune (plus DPO's frozen float32 reference unless
  `precompute_ref_logps`); 1/N of it under FSDP.
- activations for one micro-batch of `batch_size` x `max_seq_length` tokens: what
  autograd keeps per token and decoder layer in a Llama-style block (norm inputs and
  outputs, q/k/v, attention output, the MLP's gate, up, activation and product:
  10 x hidden + 4 x intermediate values), at the autocast width; with gradient
  checkpointing one hidden state per layer plus one layer recomputed. Plus the LM
  head's logits, log-softmax and gradient (float32) at most on every position.
- runtime: 1 GiB (CUDA context and allocator slack, or torch and Python on CPU).

On CUDA the device total goes against the GPU's free memory; CPU and Apple Silicon
(unified memory) against the RAM available now. The merged float32 model a LoRA run
writes at the end (`merge_adapter`) is rebuilt in RAM, checked against RAM too. It is
an estimate (attention kernels, fragmentation and the tokenizer are not modelled),
meant to catch the order-of-magnitude mistakes: a float32 7B on a 24 GB GPU, a full
fine-tune where only LoRA fits; `check_memory: false` runs anyway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
NF4_BYTES_PER_PARAM = 4.5 / 8  # 4-bit codes + 8-bit block scales (64 per block) + their float32 scales
RUNTIME_BYTES = 1 * GIB
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
EMBEDDING_MARKERS = ("embed", "lm_head", "wte", "wpe", "output.weight")


class MemoryCheckError(ValueError):
    """The run's estimated memory exceeds what the machine has free."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, from its config.json and safetensors headers."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tensors: dict[str, tuple[int, ...]]  # name -> shape

    @property
    def params(self) -> int:
        return sum(_numel(shape) for shape in self.tensors.values())

    @property
    def quantizable_params(self) -> int:
        """Parameters bitsandbytes stores in 4 bits: 2-D weights outside the embeddings and LM head."""
        return sum(_numel(s) for name, s in self.tensors.items()
                   if len(s) == 2 and not any(m in name for m in EMBEDDING_MARKERS))

    def lora_params(self, rank: int, targets: list[str] | str) -> int:
        """r x (in + out) for every 2-D weight whose module an adapter goes on."""
        total = 0
        for name, shape in self.tensors.items():
            if len(shape) != 2 or not name.endswith(".weight") or any(m in name for m in EMBEDDING_MARKERS):
                continue
            module = name.removesuffix(".weight").rsplit(".", 1)[-1]
            if targets in ("all-linear", "auto") or module in targets:
                total += rank * (shape[0] + shape[1])
        return total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def read_model_shape(model_dir: str | Path) -> ModelShape:
    """`model_dir`'s config.json and the shapes in its safetensors headers (no weights read)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    config: dict[str, Any] = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or config  # a vision model's language model sets the activations
    files = sorted(p for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files to read tensor shapes from")
    tensors: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = tuple(f.get_slice(key).get_shape())
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    return ModelShape(
        model_type=str(config.get("model_type", "")),
        num_layers=int(text.get("num_hidden_layers") or text.get("n_layer") or 0),
        hidden_size=hidden,
        intermediate_size=int(text.get("intermediate_size") or text.get("n_inner") or 4 * hidden),
        vocab_size=int(text.get("vocab_size") or 0),
        tensors=tensors,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process, by part; `device` is where training runs (cuda, cpu, mps)."""

    device: str
    world_size: int
    weights: int
    trainable: int
    activations: int
    runtime: int
    export_ram: int  # the merged float32 model rebuilt in RAM at the end (0 when none is written)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.runtime

    def rows(self) -> list[tuple[str, str]]:
        where = "per GPU" if self.device == "cuda" else "RAM"
        shard = f", per process of {self.world_size}" if self.world_size > 1 else ""
        rows = [(f"weights{shard}", gib(self.weights)), ("trainable + AdamW", gib(self.trainable)),
                ("activations", gib(self.activations)), ("runtime", gib(self.runtime)),
                (f"total ({where})", gib(self.total))]
        if self.export_ram:
            rows.append(("merged export (RAM, at the end)", gib(self.export_ram)))
        return rows


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def estimate_memory(shape: ModelShape, config: Any, *, dtype_name: str, autocast_bytes: int, device: str,
                    world_size: int = 1, lora_targets: list[str] | str = "auto") -> MemoryEstimate:
    """The estimate for training `shape` as `config` (a TrainingConfig) says, in `dtype_name`.

    `autocast_bytes`: the width activations are kept at (2 under bf16 autocast, else 4).
    """
    c = config
    width = DTYPE_BYTES[dtype_name]
    params = shape.params
    if c.quantize_base:
        quantized = shape.quantizable_params
        weights = quantized * NF4_BYTES_PER_PARAM + (params - quantized) * width
    else:
        weights = params * width
    if world_size > 1:
        block = (shape.quantizable_params / max(shape.num_layers, 1)) * width
        weights = weights / world_size + 2 * block
    if c.use_lora:
        trainable = shape.lora_params(c.lora_rank, lora_targets) * 16
    else:
        trainable = params * 16
        if (c.method == "dpo" and not c.precompute_ref_logps) or (c.method == "grpo" and c.beta > 0):
            trainable += params * 4  # the frozen reference copy
    trainable /= world_size
    rows = c.batch_size * (c.num_generations if c.method == "grpo" else 1)  # GRPO: a group per prompt
    tokens = rows * c.max_seq_length
    per_layer = (10 * shape.hidden_size + 4 * shape.intermediate_size) * autocast_bytes * tokens
    if c.gradient_checkpointing:
        activations = shape.num_layers * shape.hidden_size * autocast_bytes * tokens + per_layer
    else:
        activations = shape.num_layers * per_layer
    activations += tokens * shape.vocab_size * (autocast_bytes + 12)  # logits, float32 copy, log-softmax, grad
    export_ram = params * 4 if c.use_lora and c.merge_adapter else 0
    return MemoryEstimate(device=device, world_size=world_size, weights=int(weights), trainable=int(trainable),
                          activations=int(activations), runtime=RUNTIME_BYTES, export_ram=export_ram)


@dataclass(frozen=True)
class Available:
    """Free memory now: `device` bytes where training runs (the GPU's, or RAM), and RAM."""

    device: int | None
    ram: int | None


def available_memory(device: Any) -> Available:
    """Free GPU memory (`torch.cuda.mem_get_info`) on CUDA; RAM available now elsewhere
    (Linux MemAvailable, lowered to what the cgroup limit leaves; Apple Silicon shares it)."""
    ram = available_ram_bytes()
    if getattr(device, "type", device) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return Available(device=int(free), ram=ram)
    return Available(device=ram, ram=ram)


def available_ram_bytes(meminfo: Path = Path("/proc/meminfo"),
                        cgroup: tuple[Path, Path] = (Path("/sys/fs/cgroup/memory.max"),
                                                     Path("/sys/fs/cgroup/memory.current"))) -> int | None:
    """RAM a new allocation can get now: MemAvailable (Linux), within the cgroup's limit
    minus its usage; elsewhere the physical RAM (`reactor_core.env`), or None."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        from reactor_core.env import probe_ram_bytes

        return probe_ram_bytes()
    try:
        limit, used = (int(p.read_text().strip()) for p in cgroup)  # "max" (no limit) raises ValueError
        free = min(free, limit - used)
    except (OSError, ValueError):
        pass
    return free


def check_fits(estimate: MemoryEstimate, available: Available, config: Any) -> str | None:
    """None when the run fits; else what is needed, what is free, and what to change."""
    problems = []
    where = "GPU memory" if estimate.device == "cuda" else "RAM"
    if available.device is not None and estimate.total > available.device:
        problems.append(f"needs about {gib(estimate.total)} of {where}, {gib(available.device)} is free")
    if estimate.export_ram and available.ram is not None:
        # the merged model is rebuilt in RAM while the trained one is still there (in RAM off CUDA)
        held = estimate.weights + estimate.trainable if estimate.device != "cuda" else 0
        if estimate.export_ram + held > available.ram:
            problems.append(f"writing the merged float32 model at the end needs about "
                            f"{gib(estimate.export_ram + held)} of RAM, {gib(available.ram)} is free "
                            "(`merge_adapter: false` writes the adapter only)")
    if not problems:
        return None
    return "; ".join(problems) + ". " + remedies(estimate, config)


def remedies(estimate: MemoryEstimate, config: Any) -> str:
    """What would shrink the biggest parts, in the order they usually pay."""
    c = config
    tips = []
    if estimate.weights >= estimate.activations:
        if not c.use_lora:
            tips.append("`use_lora: true` (adapters instead of every weight: no gradients or AdamW state for the base)")
        elif not c.quantize_base:
            tips.append("`quantize_base: true` (QLoRA: the base in 4 bits, about a quarter of bf16)")
        if c.use_lora and c.base_dtype in ("auto", "float32"):
            tips.append("`base_dtype: bfloat16` (half of float32)")
    if not c.gradient_checkpointing:
        tips.append("`gradient_checkpointing: true` (one hidden state per layer kept instead of all activations)")
    if c.batch_size > 1:
        tips.append(f"a smaller `batch_size` (now {c.batch_size}; raise `gradient_accumulation_steps` to keep "
                    "the effective batch)")
    tips.append(f"a shorter `max_seq_length` (now {c.max_seq_length})")
    if estimate.world_size == 1:
        tips.append("FSDP over more GPUs or machines (`reactor train --nproc N`) to shard weights and optimizer state")
    tips.append("or `check_memory: false` to try anyway")
    return "Try: " + "; ".join(tips) + "."
