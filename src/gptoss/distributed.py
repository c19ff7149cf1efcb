"""Expert and tensor parallelism on PyTorch's own distributed engine, applied to a built model.

The modules of `model.py` are swapped for subclasses that hold the same parameters (the same
objects, the same names, so checkpoints keep their keys) and differ only in how they move data:

- `ExpertParallelMoE` (training): every rank routes its own tokens, sends each (token, expert) pair
  to the rank holding that expert with `all_to_all_single` (uneven splits: a rank may send an
  expert thousands of rows or none), the experts run on what arrived, and a second all-to-all
  brings the rows home, where they are weighted and summed exactly as `Experts.forward` does.
- `ShardedExperts`: experts whose stacked tensors (`gate_up_proj` with its interleaved gate/linear
  columns, `down_proj` and both biases) are DTensors sharded by expert (`Shard(0)`); the math runs
  on the rank's shard. DTensors keep the global shape, so DCP checkpoints do not depend on the layout.
- `ReplicatedTokensMoE` (inference, and training where experts split the tensor-parallel ranks):
  every rank holds the same tokens (the decode batch, or the tensor-parallel group's batch), so no
  tokens move: each rank runs the pairs routed to its own experts (dense or MXFP4, kept packed)
  and the partial sums are added across ranks (a DTensor `Partial` made `Replicate`: one all-reduce).
- `HeadParallelAttention`: attention with q/k/v sharded by head (`ColwiseParallel`), `o_proj` by its
  input (`RowwiseParallel`, one all-reduce) and the sinks split with their heads.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from gptoss.model import Attention, Experts, GptOss, MoE, Visibility, grouped_matmul, sink_attention
from gptoss.swap import rebuilt


def local(tensor: Tensor) -> Tensor:
    """This rank's part of a DTensor (a plain tensor is its own part); differentiable."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_divides(what: str, count: int, degree: int, option: str) -> None:
    if count % degree:
        raise ValueError(
            f"{option} {degree} must divide the model's {count} {what}; choose a divisor of {count}"
        )


# ---------------------------------------------------------------------- experts
class ShardedExperts(Experts):
    """`Experts` whose tensors are DTensors sharded by expert: rows arrive with local expert indices
    and run through this rank's shard (`Experts.forward`, unchanged, on plain local tensors)."""

    def project(self, name: str, x: Tensor, expert_of: Tensor, ends: Tensor) -> Tensor:
        weight, bias = local(getattr(self, name)), local(getattr(self, f"{name}_bias"))
        # `Experts.forward` counts rows per expert over the global expert count; local indices
        # only reach the shard's first entries, the rest hold the total and are dropped.
        return grouped_matmul(x, weight, ends[: weight.shape[0]]) + bias[expert_of]


def shard_experts(experts: Experts, mesh: DeviceMesh) -> ShardedExperts:
    """Make `experts`' tensors DTensors sharded by expert over 1-D `mesh` (no communication: every
    rank holds the full tensors already, or the meta device does)."""
    check_divides("experts", experts.gate_up_proj.shape[0], mesh.size(), "expert parallel degree")
    for name, param in list(experts.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.data, mesh, [Shard(0)], src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    return rebuilt(experts, ShardedExperts)


def keep_experts(experts: nn.Module, start: int, stop: int) -> None:
    """Keep only experts start..stop-1 of a dense or MXFP4 experts module (every tensor of the module
    is stacked by expert), as plain tensors: MXFP4 blocks stay packed."""
    for name, param in list(experts.named_parameters(recurse=False)):
        experts.register_parameter(name, nn.Parameter(param.data[start:stop].clone(), requires_grad=False))
    for name, buffer in list(experts.named_buffers(recurse=False)):
        experts.register_buffer(name, buffer[start:stop].clone())


# ---------------------------------------------------------------------- MoE: tokens move
class ExpertParallelMoE(MoE):
    """An MoE whose experts are spread over the ranks of `ep_mesh`, each rank with its own tokens.

    Set by `apply_expert_parallel`: `ep_mesh` (1-D), `num_experts` (global)."""

    ep_mesh: DeviceMesh
    num_experts: int

    def forward(self, x: Tensor) -> Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        _, expert_idx, expert_weight = self.router(flat)
        ranks = self.ep_mesh.size()
        per_rank = self.num_experts // ranks
        group = self.ep_mesh.get_group()

        # The (token, expert) pairs sorted by expert are also sorted by the rank that holds it.
        k = expert_idx.shape[1]
        flat_expert = expert_idx.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // k
        counts = torch.bincount(flat_expert, minlength=self.num_experts)  # (E,) rows per expert
        # Row counts first (E/ranks per peer), so that every rank knows what it will receive.
        received = torch.empty_like(counts)  # (ranks · E/ranks,)
        dist.all_to_all_single(received, counts, group=group)
        send = counts.view(ranks, per_rank).sum(1).tolist()  # rows to each rank
        recv = received.view(ranks, per_rank).sum(1).tolist()  # rows from each rank
        rows = all_to_all_single_autograd(flat[token_of], recv, send, group)  # (M, H)
        # Arrived rows come by source rank, then by local expert within each source.
        local_expert = torch.arange(per_rank, device=x.device).repeat(ranks)
        row_expert = torch.repeat_interleave(local_expert, received)
        out = self.experts(rows, row_expert[:, None], rows.new_ones(rows.shape[0], 1))
        back = all_to_all_single_autograd(out, send, recv, group)  # (N·k, H) in `order`
        weight_sorted = expert_weight.reshape(-1)[order]
        combined = torch.zeros_like(flat).index_add_(0, token_of, back * weight_sorted[:, None])
        return combined.view(B, T, H)


def apply_expert_parallel(model: GptOss, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts by expert over `ep_mesh`; tokens travel by all-to-all."""
    for block in model.model.layers:
        if isinstance(block.mlp, MoE):
            block.mlp.experts = shard_experts(block.mlp.experts, ep_mesh)
            block.mlp = rebuilt(block.mlp, ExpertParallelMoE)
            block.mlp.ep_mesh, block.mlp.num_experts = ep_mesh, model.config.num_local_experts


# ---------------------------------------------------------------------- MoE: tokens replicated
class ReplicatedTokensMoE(MoE):
    """An MoE whose experts are spread over `ep_mesh` while every rank holds the same tokens: each
    rank runs the pairs routed to its experts (`first` .. `first + count - 1`) and the partial sums
    are reduced over the ranks. Set by `apply_replicated_expert_parallel`."""

    ep_mesh: DeviceMesh
    first: int
    count: int

    def forward(self, x: Tensor) -> Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        _, expert_idx, expert_weight = self.router(flat)
        mine = (expert_idx >= self.first) & (expert_idx < self.first + self.count)
        token_of, slot = mine.nonzero(as_tuple=True)
        # In training, each rank's experts see a part of the pairs, so the gradients they send to
        # the tokens and to the routing weights are parts too: summed over the ranks in backward.
        rows = self.experts(
            summed_in_backward(flat, self.ep_mesh)[token_of],
            (expert_idx[token_of, slot] - self.first)[:, None],
            summed_in_backward(expert_weight, self.ep_mesh)[token_of, slot, None],
        )
        partial = torch.zeros_like(flat).index_add_(0, token_of, rows)
        summed = DTensor.from_local(partial, self.ep_mesh, [Partial()]).redistribute(placements=[Replicate()])
        return summed.to_local().view(B, T, H)


def summed_in_backward(tensor: Tensor, mesh: DeviceMesh) -> Tensor:
    """`tensor`, whose gradient is summed over `mesh` in backward (the same tensor on every rank,
    each rank's use of it giving part of its gradient); as it is without autograd."""
    if not torch.is_grad_enabled() or not tensor.requires_grad:
        return tensor
    replicated = DTensor.from_local(tensor, mesh, [Replicate()], run_check=False)
    return replicated.to_local(grad_placements=[Partial()])


def apply_replicated_expert_parallel(model: GptOss, mesh: DeviceMesh, training: bool = False) -> None:
    """Split every MoE layer's experts over the ranks of `mesh`, which hold the same tokens. For
    inference each rank keeps only its share (plain tensors, MXFP4 blocks packed); for `training`
    the experts become DTensors sharded by expert (`ShardedExperts`: checkpoints keep whole shapes)."""
    experts = model.config.num_local_experts
    check_divides("experts", experts, mesh.size(), "expert parallel degree")
    count = experts // mesh.size()
    first = mesh.get_local_rank() * count
    for block in model.model.layers:
        if isinstance(block.mlp, MoE):
            if training:
                block.mlp.experts = shard_experts(block.mlp.experts, mesh)
            else:
                keep_experts(block.mlp.experts, first, first + count)
            block.mlp = rebuilt(block.mlp, ReplicatedTokensMoE)
            block.mlp.ep_mesh, block.mlp.first, block.mlp.count = mesh, first, count


# ---------------------------------------------------------------------- attention
class HeadParallelAttention(Attention):
    """Attention over this rank's heads: q/k/v projections are column-sharded DTensors whose local
    output holds the rank's heads, and the sinks a DTensor sharded with them."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, visible: Visibility) -> Tensor:
        return sink_attention(q, k, v, visible, local(self.sinks))


def apply_tensor_parallel(model: GptOss, tp_mesh: DeviceMesh) -> None:
    """Shard every attention layer by head over 1-D `tp_mesh` (grouped-query heads stay with their
    key/value head: both are split in contiguous, aligned runs)."""
    config = model.config
    degree = tp_mesh.size()
    check_divides("key/value heads", config.num_key_value_heads, degree, "tensor parallel degree")
    plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel()}
    plan["o_proj"] = RowwiseParallel()
    for block in model.model.layers:
        attn = block.self_attn
        parallelize_module(attn, tp_mesh, plan)
        sinks = distribute_tensor(attn.sinks.data, tp_mesh, [Shard(0)], src_data_rank=None)
        attn.register_parameter("sinks", nn.Parameter(sinks, requires_grad=attn.sinks.requires_grad))
        sharded = rebuilt(attn, HeadParallelAttention)
        sharded.num_heads, sharded.num_kv_heads = attn.num_heads // degree, attn.num_kv_heads // degree
        block.self_attn = sharded


# ---------------------------------------------------------------------- inference under torchrun
def check_inference_degrees(tensor_parallel: int, expert_parallel: int) -> int:
    """The number of processes torchrun started, once both degrees are 1 or that number."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name, degree in (("--tp", tensor_parallel), ("--ep", expert_parallel)):
        if degree not in (1, world):
            raise ValueError(
                f"{name} {degree} must equal the number of processes ({world}) or be 1; "
                f"launch with torchrun --nproc_per_node {degree}"
            )
    return world


def rank_device(device: str) -> str:
    """`device` for this rank: "cuda" without an index means the rank's own GPU (LOCAL_RANK)."""
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if chosen.index is None:
            chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(chosen)  # NCCL's collectives use the current device
    return str(chosen)


def shared_seed() -> int:
    """A sampling seed drawn on rank 0, the same on every rank. Every rank of a split model samples
    from the same logits; with different seeds their tokens, and then their forward passes, part."""
    box = [int(torch.randint(0, 2**62, ()).item())]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def parallelize_for_inference(model: GptOss, tensor_parallel: int = 1, expert_parallel: int = 1) -> GptOss:
    """Split `model` over the processes torchrun started: attention by head (`tensor_parallel`) and
    MoE experts by expert (`expert_parallel`), each 1 or the number of processes. In place.

    Every rank then runs the same engine on the same tokens and gets the same logits; the rank's
    `model.config` describes the attention it holds (its heads), which sizes its KV cache.
    """
    world = check_inference_degrees(tensor_parallel, expert_parallel)
    if world == 1:
        return model
    if expert_parallel > 1 and not model.config.is_moe:
        raise ValueError(f"--ep needs an MoE model; {model.config.name} is dense")
    device = next(model.parameters()).device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (world,))
    if tensor_parallel > 1:
        apply_tensor_parallel(model, mesh)
        config = model.config
        model.config = config.replace(
            num_attention_heads=config.num_attention_heads // world,
            num_key_value_heads=config.num_key_value_heads // world,
        )
    if expert_parallel > 1:
        apply_replicated_expert_parallel(model, mesh)
    return model
