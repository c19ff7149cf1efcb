"""The path to a pretraining run at scale, on paper: memory per GPU, FLOPs, communication,
wall-clock, GPU-hours, for a layout of FSDP with expert or tensor parallelism.

Everything derives from the `ModelConfig` (parameter counts, `flops_per_token`) and a GPU's memory,
dense bf16 throughput and links; the assumptions are the usual FSDP + AdamW ones, stated where they
enter. The layouts are those `train/parallelize.py` builds: expert parallel degree P splits the
experts P ways (FSDP shards each share over the other GPUs/P), tensor parallel degree P splits
attention by head (P GPUs share data, FSDP over GPUs/P).
"""

from __future__ import annotations

from dataclasses import dataclass

from gptoss.config import ModelConfig
from gptoss.train.loss import CHUNK_ELEMENTS


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float  # usable HBM
    bf16_tflops: float  # dense (no 2:4 sparsity), as the vendor states it


GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec("A100 80GB SXM", 80, 312),
    "h100": GpuSpec("H100 SXM", 80, 989),
    "h200": GpuSpec("H200 SXM", 141, 989),
    "b200": GpuSpec("B200", 180, 2250),
}

# Bytes per parameter held under FSDP with mixed precision, each sharded over all GPUs: fp32 master
# weights (4), fp32 gradients (4), AdamW's two fp32 moments (8).
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 4, 4, 8
# Memory the framework, NCCL buffers and allocator fragmentation take that no formula sees.
RESERVED_GIB = 6.0
# Links, per GPU and direction: NVLink inside an 8-GPU node (H100/H200/B200 class), one 400 Gb/s
# NIC per GPU between nodes. Expert- and tensor-parallel groups of up to 8 stay inside a node.
GPUS_PER_NODE = 8
NODE_LINK_GBPS = 450.0
NETWORK_GBPS = 50.0
ACTIVATION_BYTES = 2  # bf16 activations travel


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token (3× forward), averaged over the positions of a sequence.

    Position t attends to t tokens, so the attention term is averaged over t = 1..seq_len exactly.
    Recomputation under activation checkpointing is not counted (it is overhead, not model FLOPs).
    """
    return 3 * sum(config.flops_per_token(c) for c in range(1, seq_len + 1)) / seq_len


def activation_bytes_per_token(config: ModelConfig, tp: int = 1, ep: int = 1) -> dict[str, float]:
    """bf16 bytes one token keeps per block for the backward pass, without and with checkpointing.

    A count in the style of Korthikanti et al. (2022) that assumes a fused (flash) attention kernel,
    so nothing grows with the sequence length. Elements per token:
    - two RMSNorms, input and output each: 4h;
    - q, k, v before and after rotary, the attention output and the o_proj output: 3q + 4kv + h;
    - router logits and top-k weights: E + k;
    - each active expert: its gathered input and output (2h), fused gate/up output (2I) and the
      clamped SwiGLU's intermediates (5I).
    Checkpointing a block keeps only its input (h) and recomputes the rest. Under tensor parallelism
    a GPU holds the q/k/v terms of its heads only, and with the experts split over the same GPUs
    (ep = tp) the pairs of its experts only (1/ep of them with uniform routing).
    """
    h, i = config.hidden_size, config.intermediate_size
    attention = 4 * h + (3 * config.q_dim + 4 * config.kv_dim) / tp + h
    router = config.num_local_experts + config.num_experts_per_tok if config.is_moe else 0
    mlp = config.experts_per_token * (2 * h + 7 * i) / (ep if ep == tp else 1)
    return {"none": 2.0 * (attention + router + mlp), "checkpointed": 2.0 * h}


def check_layout(config: ModelConfig, gpus: int, ep: int, tp: int) -> None:
    """Raise a ValueError naming the fix unless `ep` × FSDP or `tp` × FSDP fits `config` on `gpus`."""
    if ep < 1 or tp < 1 or gpus % ep or gpus % tp:
        raise ValueError(f"ep ({ep}) and tp ({tp}) must be positive divisors of the GPU count ({gpus})")
    if 1 < ep != tp > 1:
        raise ValueError(f"ep {ep} with tp {tp}: together they split the same GPUs, so they must be equal")
    if ep > 1 and (not config.is_moe or config.num_local_experts % ep):
        raise ValueError(f"ep {ep} must divide the experts of {config.name} ({config.num_local_experts})")
    if config.num_key_value_heads % tp:
        raise ValueError(
            f"tp {tp} must divide the key/value heads of {config.name} ({config.num_key_value_heads})"
        )


def communication_per_micro_batch(
    config: ModelConfig,
    gpus: int,
    tokens: int,
    ep: int,
    tp: int,
    checkpointing: bool,
    activation_bytes: int = ACTIVATION_BYTES,
) -> dict[str, float]:
    """Bytes one GPU sends per forward + backward of its micro-batch (`tokens` tokens), by kind.

    - all-to-all (expert parallel): each (token, expert) pair goes to its expert and comes back,
      (ep-1)/ep of them to another GPU with uniform routing; backward sends the gradients the same
      two ways; a checkpointed block's recomputed forward sends both again.
    - FSDP: bf16 parameters all-gathered for the forward and again for the backward, fp32 gradients
      reduce-scattered, each (n-1)/n of the GPU's share of its group's parameters; experts over
      gpus/ep GPUs, the rest over gpus/tp.
    - tensor parallel: attention's output all-reduced in the forward (and in a recomputed one), the
      input gradients of the q, k and v projections in the backward, one each (three separate
      projections); a ring all-reduce sends 2(tp-1)/tp of the tensor.
    - both (ep = tp, the same GPUs): no all-to-all (those GPUs hold the same tokens); per MoE layer
      the experts' partial sums are all-reduced in each forward, and in the backward the gradients
      they send to the tokens (h per token) and to the routing weights (k per token).
    """
    h, k = config.hidden_size, config.experts_per_token
    moe_layers = config.num_hidden_layers if config.is_moe else 0
    passes = 3 if checkpointing else 2
    shared = ep == tp > 1  # experts split over the tensor-parallel GPUs: tokens stay
    a2a = 0.0 if shared else 2 * passes * moe_layers * tokens * k * h * activation_bytes * (ep - 1) / ep
    experts = config.num_local_experts * config.expert_params() * moe_layers if config.is_moe else 0
    attention = config.attention_params() * config.num_hidden_layers
    rest = config.total_params() - experts - attention
    dense_group, expert_group = gpus // tp, gpus // ep

    def fsdp(params: float, group: int) -> float:
        return (2 * 2 + 4) * params * (group - 1) / group  # 2 gathers in bf16, 1 reduce-scatter in fp32

    fsdp_bytes = fsdp(experts / ep, expert_group) + fsdp(attention / tp + rest, dense_group)
    all_reduces = ((passes - 1) + 3) * config.num_hidden_layers  # forwards, then q, k, v in the backward
    if shared:
        all_reduces += ((passes - 1) + 1 + k / h) * moe_layers
    tp_bytes = all_reduces * tokens * h * activation_bytes * 2 * (tp - 1) / tp
    return {"all_to_all": a2a, "fsdp": fsdp_bytes, "tensor_parallel": tp_bytes}


def link_gbps(group: int) -> float:
    """The per-GPU bandwidth a group of `group` GPUs talks over: NVLink inside a node, else the NIC."""
    return NODE_LINK_GBPS if group <= GPUS_PER_NODE else NETWORK_GBPS


def plan_training(
    config: ModelConfig,
    tokens: float,
    gpus: int,
    gpu: str = "h100",
    mfu: float = 0.4,
    seq_len: int = 4096,
    micro_batch: int = 1,
    ep: int = 1,
    tp: int = 1,
) -> dict:
    """Memory per GPU, checkpointing need, communication, FLOPs, wall-clock and GPU-hours for a
    pretraining run with expert parallel degree `ep` or tensor parallel degree `tp` beside FSDP, or
    both at the same degree (the same GPUs split attention and experts).

    Weights, gradients and optimizer state are sharded over all `gpus` in every layout; what a GPU
    gathers is its experts (all of them without expert parallelism) and its heads. FLOPs count
    active parameters only. The step time is an estimate: FSDP's traffic overlaps the compute,
    all-to-all and tensor-parallel all-reduces sit on the critical path.
    """
    if gpu not in GPUS:
        raise KeyError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must lie in (0, 1], got {mfu}")
    if gpus < 1 or seq_len < 1 or micro_batch < 1:
        raise ValueError("gpus, seq_len and micro_batch must be positive")
    check_layout(config, gpus, ep, tp)
    spec = GPUS[gpu]
    gib = 2**30
    total = config.total_params()

    sharded = {
        "weights_fp32": total * WEIGHT_BYTES / gpus,
        "grads_fp32": total * GRAD_BYTES / gpus,
        "optimizer_fp32": total * OPTIMIZER_BYTES / gpus,
    }
    # FSDP gathers one block's bf16 weights at a time, plus the next one prefetched: the GPU's
    # share of the experts and of the attention heads, and the rest whole.
    block_params = (total - config.embedding_params() - config.embedding_rows * config.hidden_size) / (
        config.num_hidden_layers
    )
    expert_block = config.num_local_experts * config.expert_params() if config.is_moe else 0
    attention_block = config.attention_params()
    local_block = expert_block / ep + attention_block / tp + (block_params - expert_block - attention_block)
    gathered = 2 * local_block * 2
    # The trainer's fused loss holds one chunk of fp32 logits and the head's fp32 weight gradient,
    # however many tokens are in flight (plain logits would cost 8·vocab bytes per token).
    head = CHUNK_ELEMENTS * 4 + config.embedding_rows * config.hidden_size * 4
    fixed = sum(sharded.values()) + gathered + head + RESERVED_GIB * gib

    # Activation bytes per token in flight: every block's, or, checkpointed, every block's input
    # plus one block's activations while it is recomputed.
    act = activation_bytes_per_token(config, tp, ep)
    layers = config.num_hidden_layers
    activations = {"none": act["none"] * layers, "per block": act["checkpointed"] * layers + act["none"]}
    budget = spec.memory_gib * gib
    in_flight = micro_batch * seq_len
    totals = {name: fixed + a * in_flight for name, a in activations.items()}
    needed = next((name for name, t in totals.items() if t <= budget), "does not fit")
    max_seq = {name: max(int((budget - fixed) / a / micro_batch), 0) for name, a in activations.items()}

    per_token = train_flops_per_token(config, seq_len)
    flops = per_token * tokens
    seconds = flops / (gpus * spec.bf16_tflops * 1e12 * mfu)

    checkpointing = needed == "per block"
    sent = communication_per_micro_batch(config, gpus, in_flight, ep, tp, checkpointing)
    # Recomputing checkpointed blocks adds a forward (a third of the model FLOPs) of work.
    compute_s = per_token * in_flight / (spec.bf16_tflops * 1e12 * mfu) * (4 / 3 if checkpointing else 1)
    times = {
        "compute": compute_s,
        "all_to_all": sent["all_to_all"] / (link_gbps(ep) * 1e9),
        "fsdp": sent["fsdp"] / (NETWORK_GBPS * 1e9 if gpus > GPUS_PER_NODE else NODE_LINK_GBPS * 1e9),
        "tensor_parallel": sent["tensor_parallel"] / (link_gbps(tp) * 1e9),
    }
    step_s = max(times["compute"], times["fsdp"]) + times["all_to_all"] + times["tensor_parallel"]
    return {
        "model": config.name,
        "kind": "moe" if config.is_moe else "dense",
        "total_params": total,
        "active_params": config.active_params(),
        "tokens": tokens,
        "gpus": gpus,
        "gpu": spec.name,
        "gpu_memory_gib": spec.memory_gib,
        "mfu": mfu,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "layout": {"ep": ep, "tp": tp, "fsdp_experts": gpus // ep, "fsdp_dense": gpus // tp},
        "memory_gib": {name: b / gib for name, b in sharded.items()}
        | {
            "gathered_blocks_bf16": gathered / gib,
            "output_head_loss": head / gib,
            "reserved": RESERVED_GIB,
            "activations_no_checkpointing": activations["none"] * in_flight / gib,
            "activations_per_block_checkpointing": activations["per block"] * in_flight / gib,
            "total_no_checkpointing": totals["none"] / gib,
            "total_per_block_checkpointing": totals["per block"] / gib,
        },
        "activation_checkpointing": needed,
        "max_seq_len_no_checkpointing": max_seq["none"],
        "max_seq_len_per_block_checkpointing": max_seq["per block"],
        "train_flops_per_token": per_token,
        "total_flops": flops,
        "wall_clock_days": seconds / 86400,
        "gpu_hours": seconds * gpus / 3600,
        "bytes_per_micro_batch": sent,
        "seconds_per_micro_batch": times | {"step": step_s},
    }


def layouts(config: ModelConfig, gpus: int) -> list[tuple[int, int]]:
    """(ep, tp) pairs to consider: FSDP alone, expert parallel degrees up to a node's 8 GPUs and
    beyond (dividing the experts), tensor parallel degrees within a node (dividing the KV heads),
    and both at once on the same GPUs where the degree divides both."""
    found = [(1, 1)]
    for degree in (2, 4, 8, 16, 32, 64):
        if gpus % degree:
            continue
        if config.is_moe and config.num_local_experts % degree == 0:
            found.append((degree, 1))
        if degree <= GPUS_PER_NODE and config.num_key_value_heads % degree == 0:
            found.append((1, degree))
            if config.is_moe and config.num_local_experts % degree == 0:
                found.append((degree, degree))
    return found


# A layout must shorten the estimated step by more than this over a simpler one (a smaller degree)
# to be recommended: the estimate leaves out what smaller shards cost in kernel efficiency.
RECOMMEND_MARGIN = 0.15


def recommend_layout(config: ModelConfig, tokens: float, gpus: int, **options: object) -> dict:
    """The plan of every layout of `layouts`, and the recommended one: among those that fit, the
    shortest estimated step, a larger degree winning only by more than `RECOMMEND_MARGIN`."""
    plans = [plan_training(config, tokens, gpus, ep=ep, tp=tp, **options) for ep, tp in layouts(config, gpus)]  # type: ignore[arg-type]
    fitting = [p for p in plans if p["activation_checkpointing"] != "does not fit"] or plans
    best = fitting[0]
    for plan in sorted(fitting, key=lambda p: p["layout"]["ep"] * p["layout"]["tp"]):
        if plan["seconds_per_micro_batch"]["step"] < best["seconds_per_micro_batch"]["step"] * (
            1 - RECOMMEND_MARGIN
        ):
            best = plan
    return {"model": config.name, "recommended": best["layout"], "layouts": plans}
