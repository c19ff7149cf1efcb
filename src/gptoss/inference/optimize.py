"""Decode-time speedups applied to a loaded model from outside (model.py stays the reference math).

The kernels live in `gptoss.ops`; this module decides which layers use them:

- bf16 linear layers (attention projections, routers, output head) go through `ops.linear`, whose
  native matvec serves decode-sized calls (prefill-sized ones stay with PyTorch's GEMM); RMSNorm
  and attention over the KV cache (decode-sized queries) are one native call each instead of a
  dozen small PyTorch operators, and a block's whole decode step is a fixed run of native calls
  (`gptoss.inference.native`). MXFP4 experts already run natively: `MXFP4Experts.forward` is one
  `ops.mxfp4_moe` call per layer, straight from the packed bytes, for decode and prefill alike.
- Weight-only int8 (opt-in) for the attention projections and the output head
  (`gptoss.quant.int8`).

Nothing here copies weights otherwise: memory stays the loaded model's.
"""

from __future__ import annotations

from gptoss.inference.native import use_native_kernels
from gptoss.model import GptOss
from gptoss.quant.int8 import quantize_int8


def prepare_for_inference(model: GptOss, int8: bool = False) -> GptOss:
    """Route linear layers through the native kernels; with `int8`, quantize attention and head.

    In place; returns the model. Without int8 the results equal the unprepared model's up to
    rounding (the native kernels accumulate in fp32).
    """
    if int8:
        quantize_int8(model)
    return use_native_kernels(model)
