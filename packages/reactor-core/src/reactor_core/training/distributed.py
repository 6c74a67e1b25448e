"""Multi-process training: FSDP2 sharding, the collectives the loop needs, full state dicts.

A run is distributed when torchrun started it (WORLD_SIZE > 1 in the environment):

    reactor train recipe.yaml --nproc 2                      # one machine, 2 processes
    torchrun --nproc_per_node 2 -m reactor_core.train recipe.yaml

Every rank walks the same global sample order (`EpochSampler` is seeded, not random
per rank) and takes its own contiguous slice of each global micro-batch, so the
loop's position (step, epoch, item) is the same number on every rank and a
checkpoint holds it once. `batch_size` is per process; the global batch is
batch_size x world_size x gradient_accumulation_steps.

Checkpoints use `torch.distributed.checkpoint.state_dict` to gather *full* state
dicts (model and optimizer, keyed by parameter name) onto rank 0, which alone
reads and writes checkpoint storage. The files are those of a single-process run,
so a run preempted on N processes resumes on M (a spot VM pool that came back
smaller). The cost is rank 0 holding a full copy of the trainable state in CPU
memory while saving: fine up to the 7-8B models LoRA targets here; sharded DCP
files would be the next step beyond that.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistContext:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    context = DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(context.local_rank)
        backend = "nccl" if device_type == "cuda" else "gloo"
        # Long enough for rank 0 to write (and upload) a full checkpoint while the others wait.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return context


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(root: nn.Module, blocks: list[nn.Module], mesh_device: str) -> None:
    """FSDP2: each transformer block is one shard group, the rest (embeddings, final
    norm, LM head, tied or not) belongs to `root`, whose forward must be the one the
    loop calls.

    Gradients are *summed* across ranks, not averaged: the loop already divides each
    rank's loss by the global token count of the step.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(mesh_device, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    for module in [*blocks, root]:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (peft-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__}: no `layers` in its decoder; FSDP needs the transformer blocks")
    return list(layers)


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum or max of a few numbers over ranks (float64: token counts stay exact)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _options(**kwargs: Any):
    """Full tensors gathered to rank 0 (and broadcast back on load) when distributed;
    the live tensors of a single process otherwise (gathering needs a process group)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if not dist.is_initialized():
        kwargs.pop("broadcast_from_rank0", None)
        return StateDictOptions(**kwargs)
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def model_state(module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights keyed by parameter name; {} on ranks other than 0. Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(ignore_frozen_params=trainable_only))


def load_model_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load rank 0's full weights into every rank's shards (others pass {}). Collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options(broadcast_from_rank0=True, strict=False))


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (not position), full on rank 0."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options())


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_options(broadcast_from_rank0=True))


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ that also works on FSDP2's sharded (DTensor) gradients: the
    norm is reduced over all shards before clipping, as torchtitan does."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):  # a DTensor: partial norms of each rank's shard
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return float(total)
