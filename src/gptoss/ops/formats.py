"""The MXFP4 format as the kernels' reference reads it: the e2m1 code table and the dequantization.

Layout (the released checkpoints'): for a weight used as x @ W with W (in, out), the file stores
`*_blocks` (E, out, in/32, 16) uint8 — two 4-bit codes per byte, low nibble first — and `*_scales`
(E, out, in/32) uint8 exponents biased by 127. value = FP4_VALUES[code] · 2^(scale − 127).
Packing and the packed experts module live in `gptoss.quant.mxfp4`, on top of this.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptoss.config import MXFP4_BLOCK

# The e2m1 code table: codes 0-7 are the magnitudes, bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def unpack(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Dequantize (..., out, in/32, 16) blocks and (..., out, in/32) scales to (..., in, out)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
            f"expected blocks (..., G, {MXFP4_BLOCK // 2}) with scales (..., G)"
        )
    table = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    blocks = blocks.to(torch.int64)
    values = torch.stack((table[blocks & 0x0F], table[blocks >> 4]), dim=-1)  # (..., G, 16, 2)
    values = values.flatten(-3)  # (..., out, in): low nibble first, blocks in order
    exponents = (scales.to(torch.int32) - SCALE_BIAS).repeat_interleave(MXFP4_BLOCK, dim=-1)
    return torch.ldexp(values, exponents).to(dtype).transpose(-1, -2)
