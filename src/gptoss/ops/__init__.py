"""Hot kernels behind one small interface: native CPU code where it is built, PyTorch otherwise.

The PyTorch expressions here are the reference every native kernel is tested against. The native
path serves decode-sized calls (up to `MAX_ROWS` activation rows) on CPU tensors outside autograd;
anything else (prefill, training, GPU) takes the PyTorch path, where a GEMM over a dequantized
weight is the faster choice anyway.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

try:
    from gptoss.ops import _native
except ImportError:  # built by `pip install` when a C compiler is present
    _native = None
    log.info("gptoss: native CPU kernels not built; using the PyTorch path (slower decode)")

MAX_ROWS = _native.MAX_ROWS if _native else 0


def native_available() -> bool:
    return _native is not None


def set_isa(name: str) -> str:
    """Choose the native instruction set ('best', 'avx512', 'avx2', 'c'); returns the one in use."""
    if _native is None:
        raise RuntimeError("the native kernels are not built (reinstall gptoss with a C compiler)")
    return _native.set_isa(name)


def _native_ok(x: Tensor, *tensors: Tensor) -> bool:
    return (
        _native is not None
        and x.device.type == "cpu"
        and 1 <= x.shape[0] <= MAX_ROWS
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)))
    )


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


# Every tensor whose address goes to native code is bound to a local name first, so that it stays
# alive for the whole call (a temporary inside the argument list could be freed before it runs).


def mxfp4_linear(x: Tensor, blocks: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (N, in) @ W + bias for W packed as MXFP4 blocks (out, in/32, 16) and scales (out, in/32).

    Returns (N, out) in x's dtype. Few rows: the native kernel streams the packed bytes once.
    Many rows: dequantize once, then one GEMM.
    """
    if _native_ok(x, *([bias] if bias is not None else [])):
        n, out_dim = x.shape[0], blocks.shape[0]
        x32, b32 = _f32(x), _f32(bias)
        blocks, scales = blocks.contiguous(), scales.contiguous()
        y = torch.empty(n, out_dim, dtype=torch.float32)
        _native.mxfp4_matmul(
            x32.data_ptr(),
            n,
            x.shape[1],
            blocks.data_ptr(),
            scales.data_ptr(),
            out_dim,
            _ptr(b32),
            y.data_ptr(),
        )
        return y.to(x.dtype)
    from gptoss.mxfp4 import unpack  # here: gptoss.mxfp4 itself imports this module

    y = x @ unpack(blocks, scales, x.dtype)
    return y if bias is None else y + bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, with the native bf16 matvec for decode-sized calls on bf16 CPU weights."""
    rows = x.reshape(-1, x.shape[-1])
    if weight.dtype == torch.bfloat16 and _native_ok(rows, weight):
        n, out_dim = rows.shape[0], weight.shape[0]
        x32, b32, w = _f32(rows), _f32(bias), weight.contiguous()
        y = torch.empty(n, out_dim, dtype=torch.float32)
        _native.bf16_matmul(x32.data_ptr(), n, rows.shape[1], w.data_ptr(), out_dim, _ptr(b32), y.data_ptr())
        return y.to(x.dtype).view(*x.shape[:-1], out_dim)
    return F.linear(x, weight, bias)


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ (weight (out, in) int8 · scale (out,))ᵀ + bias: weight-only int8, one scale per output row."""
    rows = x.reshape(-1, x.shape[-1])
    if _native_ok(rows):
        n, out_dim = rows.shape[0], weight.shape[0]
        x32, b32, s32, w = _f32(rows), _f32(bias), _f32(scale), weight.contiguous()
        y = torch.empty(n, out_dim, dtype=torch.float32)
        _native.int8_matmul(
            x32.data_ptr(), n, rows.shape[1], w.data_ptr(), s32.data_ptr(), out_dim, _ptr(b32), y.data_ptr()
        )
        return y.to(x.dtype).view(*x.shape[:-1], out_dim)
    return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None], bias)


class NativeLinear(nn.Linear):
    """nn.Linear whose forward goes through `ops.linear`; same parameters, same state_dict."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_native_linears(model: nn.Module) -> nn.Module:
    """Route every nn.Linear of `model` through `ops.linear`, in place.

    Changing the class keeps the parameter objects (and any tying) untouched; the model file stays
    plain nn.Linear, as DESIGN.md asks: kernels are applied from outside.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = NativeLinear
    return model
