"""Process group, device, and what is applied to the single-device model from outside it.

Launch with `torchrun --nproc_per_node N -m gptoss.cli train ...`: every rank runs the same code;
NCCL on GPUs, gloo on CPU (so the sharded path is tested on a laptop). The model is wrapped the
torchtitan way, block by block: activation checkpointing, then `torch.compile`, then FSDP2
`fully_shard` per block and once more on the root (embedding, final norm and output head).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from gptoss.model import GptOss


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among `world_size`, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank)
    return chosen


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (a no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world_size == 1:
        return DistInfo(0, 1, 0, chosen)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    mesh = init_device_mesh(chosen.type, (world_size,))
    return DistInfo(dist.get_rank(), world_size, local_rank, chosen, mesh)


def shutdown(info: DistInfo) -> None:
    if info.sharded and dist.is_initialized():
        # Without the barrier a fast rank tears down gloo while a slow one still talks to it (abort).
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `value` over ranks (unchanged for one process)."""
    if info.sharded:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def apply_activation_checkpointing(model: GptOss) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The block's `forward` is wrapped in place rather than the block in a wrapper module, so parameter
    names (and hence checkpoint keys) stay those of the model.
    """
    for block in model.model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: GptOss) -> None:
    """Compile each block on its own: blocks are identical, so one compiled graph serves them all."""
    for block in model.model.layers:
        block.compile()


def apply_fsdp(model: GptOss, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> None:
    """Shard every block, then the root, over `mesh` (FSDP2).

    With `param_dtype` (bf16 on GPU) parameters are gathered and computed in that dtype while the
    sharded master copy, gradients' reduction and the optimizer stay in fp32.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.model.layers)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def parallelize(
    model: GptOss,
    info: DistInfo,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
) -> GptOss:
    """Apply checkpointing, compilation and (for several ranks) FSDP2 to `model`, in that order."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if info.sharded:
        assert info.mesh is not None
        apply_fsdp(model, info.mesh, param_dtype)
    return model
