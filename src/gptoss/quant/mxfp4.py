"""MXFP4 expert weights: pack, unpack, and an experts module that keeps them packed.

The format (layout, code table, dequantization) is `gptoss.ops.formats`, which the kernels'
reference reads; it is re-exported here beside `pack`, its inverse.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gptoss import ops
from gptoss.config import MXFP4_BLOCK, ModelConfig
from gptoss.model import Experts
from gptoss.ops.formats import FP4_VALUES, SCALE_BIAS, unpack

__all__ = [
    "FP4_VALUES", "SCALE_BIAS", "MXFP4Experts", "dequantize_experts", "pack", "quantize_experts", "unpack",
]  # fmt: skip


def pack(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize W (..., in, out) to MXFP4 blocks (..., out, in/32, 16) and scales (..., out, in/32).

    Each block of 32 takes the smallest power-of-two scale that fits its largest magnitude under 6,
    then every value rounds to the nearest table entry.
    """
    *lead, n_in, n_out = weight.shape
    if n_in % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {MXFP4_BLOCK}, got {n_in}")
    w = weight.detach().float().transpose(-1, -2).reshape(*lead, n_out, n_in // MXFP4_BLOCK, MXFP4_BLOCK)
    largest = w.abs().amax(dim=-1)
    exponent = torch.ceil(torch.log2(largest / FP4_VALUES[7]))
    exponent = torch.where(largest > 0, exponent, torch.zeros_like(exponent)).clamp(-SCALE_BIAS, 127)
    scaled = torch.ldexp(w, -exponent.to(torch.int32)[..., None])
    magnitudes = torch.tensor(FP4_VALUES[:8], device=w.device)
    codes = (scaled.abs()[..., None] - magnitudes).abs().argmin(dim=-1)
    codes = codes | ((scaled < 0).to(codes.dtype) << 3)
    codes = codes.to(torch.uint8).view(*lead, n_out, n_in // MXFP4_BLOCK, MXFP4_BLOCK // 2, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks, scales


class MXFP4Experts(Experts):
    """Experts whose weight matrices stay packed (4.25 bits each): the native kernels decode them
    block by block in registers, the PyTorch reference dequantizes only an expert a token is routed
    to, so memory holds the packed form alone."""

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size  # noqa: E741
        u8 = torch.uint8
        self.register_buffer("gate_up_proj_blocks", torch.zeros(E, 2 * I, H // MXFP4_BLOCK, 16, dtype=u8))
        self.register_buffer("gate_up_proj_scales", torch.zeros(E, 2 * I, H // MXFP4_BLOCK, dtype=u8))
        self.register_buffer("down_proj_blocks", torch.zeros(E, H, I // MXFP4_BLOCK, 16, dtype=u8))
        self.register_buffer("down_proj_scales", torch.zeros(E, H, I // MXFP4_BLOCK, dtype=u8))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H))
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    def forward(self, x: Tensor, expert_idx: Tensor, expert_weight: Tensor) -> Tensor:
        """x (N, H); expert_idx, expert_weight (N, k) → weighted sum of the chosen experts (N, H),
        straight from the packed bytes: `ops.mxfp4_moe`, one native call for the whole layer (gate_up
        with its bias and clamped SwiGLU fused, then down), for decode and prefill alike."""
        return ops.mxfp4_moe(
            x, expert_idx, expert_weight,
            self.gate_up_proj_blocks, self.gate_up_proj_scales, self.gate_up_proj_bias,
            self.down_proj_blocks, self.down_proj_scales, self.down_proj_bias,
            alpha=self.alpha, limit=self.limit,
        )  # fmt: skip

    @classmethod
    def from_dense(cls, experts: Experts, config: ModelConfig) -> MXFP4Experts:
        """Quantize a dense experts module (the biases stay in their dtype)."""
        packed = cls(config).to(experts.gate_up_proj_bias.device)
        with torch.no_grad():
            packed.gate_up_proj_blocks, packed.gate_up_proj_scales = pack(experts.gate_up_proj)
            packed.down_proj_blocks, packed.down_proj_scales = pack(experts.down_proj)
            packed.gate_up_proj_bias = nn.Parameter(experts.gate_up_proj_bias.detach().clone())
            packed.down_proj_bias = nn.Parameter(experts.down_proj_bias.detach().clone())
        return packed

    def to_dense(self, config: ModelConfig, dtype: torch.dtype) -> Experts:
        dense = Experts(config).to(device=self.gate_up_proj_bias.device, dtype=dtype)
        with torch.no_grad():
            dense.gate_up_proj.copy_(unpack(self.gate_up_proj_blocks, self.gate_up_proj_scales, dtype))
            dense.down_proj.copy_(unpack(self.down_proj_blocks, self.down_proj_scales, dtype))
            dense.gate_up_proj_bias.copy_(self.gate_up_proj_bias)
            dense.down_proj_bias.copy_(self.down_proj_bias)
        return dense


def quantize_experts(model: nn.Module) -> nn.Module:
    """Replace every dense `Experts` module of `model` by its MXFP4 form, in place."""
    for block in model.model.layers:
        experts = getattr(block.mlp, "experts", None)
        if isinstance(experts, Experts) and not isinstance(experts, MXFP4Experts):
            block.mlp.experts = MXFP4Experts.from_dense(block.mlp.experts, model.config)
    return model


def dequantize_experts(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `MXFP4Experts` of `model` by dense experts (for training or comparison), in place."""
    for block in model.model.layers:
        experts = getattr(block.mlp, "experts", None)
        if isinstance(experts, MXFP4Experts):
            block.mlp.experts = experts.to_dense(model.config, dtype or experts.gate_up_proj_bias.dtype)
    return model
