"""Weight-only int8: per-output-channel symmetric scales, multiplied by `ops.int8_linear`.

Half the bytes of bf16 for the layers it takes, at a small cost in accuracy that
benchmarks/decode.py reports as a KL divergence. Quantizing goes a few thousand rows at a time, so
it needs no fp32 copy of a whole layer (the head is 1.1 GiB).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gptoss import ops
from gptoss.model import GptOss
from gptoss.ops.pages import use_huge_pages

QUANTIZE_ROWS = 1024  # rows quantized at a time: the fp32 working copies stay ~12 MB for a 2880-wide head


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with one scale per output channel (weight-only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        quantized = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        use_huge_pages([quantized])  # read every token, as the loader's weights (ops/pages.py)
        scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        for start in range(0, weight.shape[0], QUANTIZE_ROWS):
            rows = weight[start : start + QUANTIZE_ROWS].to(torch.float32, copy=True)  # divided in place
            row_scale = rows.abs().amax(dim=1).clamp(min=1e-12) / 127  # the row's largest → ±127
            quantized[start : start + len(rows)] = rows.div_(row_scale[:, None]).round_().to(torch.int8)
            scale[start : start + len(rows)] = row_scale
        self.register_buffer("weight", quantized)
        self.register_buffer("scale", scale.to(weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        return ops.int8_linear(x, self.weight, self.scale, self.bias)


def quantize_int8(model: GptOss, attention: bool = True, head: bool = True) -> GptOss:
    """Attention projections and/or the output head to weight-only int8, in place."""
    if attention:
        for block in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                layer = getattr(block.self_attn, name)
                if isinstance(layer, nn.Linear):
                    setattr(block.self_attn, name, Int8Linear(layer))
    if head and isinstance(model.lm_head, nn.Linear):
        model.lm_head = Int8Linear(model.lm_head)
    return model
