"""The path to a pretraining run at scale, on paper: memory per GPU, FLOPs, wall-clock, GPU-hours.

Everything derives from the `ModelConfig` (parameter counts, `flops_per_token`) and a GPU's memory
and dense bf16 throughput; the assumptions are the usual FSDP + AdamW ones, stated where they enter.
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


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token (3× forward), averaged over the positions of a sequence.

    Position t attends to t tokens, so the attention term is averaged over t = 1..seq_len exactly.
    Recomputation under activation checkpointing is not counted (it is overhead, not model FLOPs).
    """
    return 3 * sum(config.flops_per_token(c) for c in range(1, seq_len + 1)) / seq_len


def activation_bytes_per_token(config: ModelConfig) -> dict[str, float]:
    """bf16 bytes one token keeps per block for the backward pass, without and with checkpointing.

    A count in the style of Korthikanti et al. (2022) that assumes a fused (flash) attention kernel,
    so nothing grows with the sequence length. Elements per token:
    - two RMSNorms, input and output each: 4h;
    - q, k, v before and after rotary, the attention output and the o_proj output: 3q + 4kv + h;
    - router logits and top-k weights: E + k;
    - each active expert: its gathered input and output (2h), fused gate/up output (2I) and the
      clamped SwiGLU's intermediates (5I).
    Checkpointing a block keeps only its input (h) and recomputes the rest.
    """
    h, i = config.hidden_size, config.intermediate_size
    attention = 4 * h + 3 * config.q_dim + 4 * config.kv_dim + h
    router = config.num_local_experts + config.num_experts_per_tok if config.is_moe else 0
    mlp = config.experts_per_token * (2 * h + 7 * i)
    return {"none": 2.0 * (attention + router + mlp), "checkpointed": 2.0 * h}


def plan_training(
    config: ModelConfig,
    tokens: float,
    gpus: int,
    gpu: str = "h100",
    mfu: float = 0.4,
    seq_len: int = 4096,
    micro_batch: int = 1,
) -> dict:
    """Memory per GPU, checkpointing need, FLOPs, wall-clock and GPU-hours for a pretraining run.

    Memory is for FSDP over all `gpus` (no tensor or expert parallelism); MoE members shard every
    expert's weights, while FLOPs count active parameters only.
    """
    if gpu not in GPUS:
        raise KeyError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must lie in (0, 1], got {mfu}")
    if gpus < 1 or seq_len < 1 or micro_batch < 1:
        raise ValueError("gpus, seq_len and micro_batch must be positive")
    spec = GPUS[gpu]
    gib = 2**30
    total = config.total_params()

    sharded = {
        "weights_fp32": total * WEIGHT_BYTES / gpus,
        "grads_fp32": total * GRAD_BYTES / gpus,
        "optimizer_fp32": total * OPTIMIZER_BYTES / gpus,
    }
    # FSDP gathers one block's bf16 weights at a time, plus the next one prefetched.
    block_params = (total - config.embedding_params() - config.embedding_rows * config.hidden_size) / (
        config.num_hidden_layers
    )
    gathered = 2 * block_params * 2
    # The trainer's fused loss holds one chunk of fp32 logits and the head's fp32 weight gradient,
    # however many tokens are in flight (plain logits would cost 8·vocab bytes per token).
    head = CHUNK_ELEMENTS * 4 + config.embedding_rows * config.hidden_size * 4
    fixed = sum(sharded.values()) + gathered + head + RESERVED_GIB * gib

    # Activation bytes per token in flight: every block's, or, checkpointed, every block's input
    # plus one block's activations while it is recomputed.
    act = activation_bytes_per_token(config)
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
    }
