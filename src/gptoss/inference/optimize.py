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

from pathlib import Path

import torch

from gptoss.checkpoint import load_model
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


def load_for_inference(
    model: str | Path,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    int8: bool = False,
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
) -> GptOss:
    """Load a checkpoint directory, GGUF file or preset for generation: prepared as above in one
    process; with `tensor_parallel` or `expert_parallel` above 1 (under torchrun), split over the
    processes instead (`gptoss.distributed.parallelize_for_inference`), each on its own GPU."""
    if tensor_parallel == expert_parallel == 1:
        return prepare_for_inference(load_model(model, device=device, dtype=dtype), int8=int8)
    from gptoss.distributed import check_inference_degrees, parallelize_for_inference, rank_device

    if int8:
        raise ValueError("--int8 does not combine with --tp/--ep; drop one of them")
    check_inference_degrees(tensor_parallel, expert_parallel)  # before the minutes of loading
    loaded = load_model(model, device=rank_device(device), dtype=dtype)
    return parallelize_for_inference(loaded, tensor_parallel=tensor_parallel, expert_parallel=expert_parallel)
