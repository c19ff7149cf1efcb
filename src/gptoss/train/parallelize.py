"""Process group, device meshes, and what is applied to the single-device model from outside it.

Launch with `torchrun --nproc_per_node N -m gptoss.cli train ...`: every rank runs the same code;
NCCL on GPUs, gloo on CPU (so the sharded path is tested on a laptop). The model is wrapped the
torchtitan way: tensor parallelism for attention or expert parallelism for the MoE layers
(`gptoss.distributed`), then block by block activation checkpointing, `torch.compile` and FSDP2
`fully_shard`, and once more on the root (embedding, final norm and output head).

Meshes, for N ranks:
- FSDP alone: one dimension of N ranks, each with its own data.
- expert parallel degree P: dense parameters are sharded over all N ranks; experts are split P
  ways by expert and each share sharded by FSDP over the N/P ranks holding the same experts
  (an `("efsdp", "ep")` mesh). Every rank still has its own data; tokens move to their experts.
- tensor parallel degree P: a `("dp", "tp")` mesh. Attention is split by head over "tp", whose P
  ranks see the same data; FSDP shards everything over "dp".
- both, at the same degree P: the same mesh, and the experts split P ways over "tp" as well. Those
  ranks hold the same tokens, so none move: each runs the pairs routed to its experts and one
  all-reduce adds the parts (as in inference); the gradients that the parts send back to the
  tokens and routing weights are summed over "tp" in backward.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from gptoss.distributed import apply_expert_parallel, apply_replicated_expert_parallel, apply_tensor_parallel
from gptoss.model import GptOss, MoE


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among `world_size`, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None = None  # what FSDP shards dense parameters over
    expert_mesh: DeviceMesh | None = None  # ("efsdp", "ep") with expert parallelism
    tp_mesh: DeviceMesh | None = None  # attention heads with tensor parallelism
    tp_experts: bool = False  # experts split over `tp_mesh` too (expert_parallel = tensor_parallel)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def data_ranks(self) -> int:
        """How many different slices of each batch the ranks take (tensor-parallel peers share one)."""
        return self.world_size // (self.tp_mesh.size() if self.tp_mesh is not None else 1)

    @property
    def data_rank(self) -> int:
        """Which slice of each batch this rank takes."""
        return self.rank // (self.tp_mesh.size() if self.tp_mesh is not None else 1)


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank)
    return chosen


def check_degrees(world_size: int, expert_parallel: int, tensor_parallel: int) -> None:
    """Raise a ValueError naming the fix unless the degrees fit `world_size` ranks."""
    for name, degree in (("expert_parallel", expert_parallel), ("tensor_parallel", tensor_parallel)):
        if degree < 1 or world_size % degree:
            raise ValueError(
                f"{name} {degree} must be a positive divisor of the number of processes ({world_size}); "
                f"launch with torchrun --nproc_per_node a multiple of {degree}"
            )
    if 1 < expert_parallel != tensor_parallel > 1:
        raise ValueError(
            f"expert_parallel {expert_parallel} with tensor_parallel {tensor_parallel}: together they "
            "split the same ranks (experts over the ranks that split attention), so they must be equal"
        )


def init_distributed(device: str = "auto", expert_parallel: int = 1, tensor_parallel: int = 1) -> DistInfo:
    """Join the process group torchrun describes in the environment (a no-op for one process) and
    build the meshes the parallel degrees ask for (see the module's docstring)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_degrees(world_size, expert_parallel, tensor_parallel)
    chosen = pick_device(device, local_rank)
    if world_size == 1:
        return DistInfo(0, 1, 0, chosen)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if tensor_parallel > 1:
        grid = init_device_mesh(
            chosen.type, (world_size // tensor_parallel, tensor_parallel), mesh_dim_names=("dp", "tp")
        )
        tp_experts = expert_parallel > 1
        return DistInfo(
            rank, world_size, local_rank, chosen, grid["dp"], tp_mesh=grid["tp"], tp_experts=tp_experts
        )
    mesh = init_device_mesh(chosen.type, (world_size,))
    experts = None
    if expert_parallel > 1:
        experts = init_device_mesh(
            chosen.type, (world_size // expert_parallel, expert_parallel), mesh_dim_names=("efsdp", "ep")
        )
    return DistInfo(rank, world_size, local_rank, chosen, mesh, expert_mesh=experts)


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


def apply_fsdp(
    model: GptOss,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    expert_mesh: DeviceMesh | None = None,
) -> None:
    """Shard every block, then the root, over `mesh` (FSDP2); expert-parallel experts over the
    "efsdp" dimension of `expert_mesh` (the ranks holding the same experts).

    With `param_dtype` (bf16 on GPU) parameters are gathered and computed in that dtype while the
    sharded master copy, gradients' reduction and the optimizer stay in fp32.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.model.layers)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        reshard = i < len(blocks) - 1
        if expert_mesh is not None and isinstance(block.mlp, MoE):
            experts = fully_shard(
                block.mlp.experts, mesh=expert_mesh["efsdp"], mp_policy=policy, reshard_after_forward=reshard
            )
            # An expert's gradient already sums the tokens of all its expert-parallel peers (they
            # came by all-to-all): divide by every rank, as for the dense parameters, not by "efsdp".
            assert isinstance(experts, FSDPModule)
            experts.set_gradient_divide_factor(float(mesh.size()))
            if expert_mesh["efsdp"].size() > 1:
                # A plain sum, then the division (gloo has no pre-multiplied sum). Not on one rank,
                # where nothing is reduced and torch 2.13 would divide twice.
                experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def parallelize(
    model: GptOss,
    info: DistInfo,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
) -> GptOss:
    """Apply tensor or expert parallelism (as `info`'s meshes say), checkpointing, compilation and
    (for several ranks) FSDP2 to `model`, in that order."""
    if info.tp_mesh is not None:
        apply_tensor_parallel(model, info.tp_mesh)
    if (info.expert_mesh is not None or info.tp_experts) and not model.config.is_moe:
        raise ValueError(f"expert_parallel needs an MoE model; {model.config.name} is dense")
    if info.expert_mesh is not None:
        apply_expert_parallel(model, info.expert_mesh["ep"])
    if info.tp_experts:
        assert info.tp_mesh is not None
        apply_replicated_expert_parallel(model, info.tp_mesh, training=True)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if info.sharded:
        assert info.mesh is not None
        apply_fsdp(model, info.mesh, param_dtype, info.expert_mesh)
    return model


@torch.no_grad()
def clip_grad_norm_(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of `model` to a global norm of `max_norm`; return the norm before clipping.

    Under expert or tensor parallelism gradients are DTensors on different meshes, which one
    `torch.nn.utils.clip_grad_norm_` cannot combine: the norm is taken per mesh and placement,
    made whole, and the parts combined.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            key = (id(p.grad.device_mesh), p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    norms = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.nn.utils.get_total_norm(norms)
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
