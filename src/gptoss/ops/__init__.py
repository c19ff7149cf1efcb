"""Hot kernels behind one small interface: native CPU code where it is built, PyTorch otherwise.

The PyTorch expressions here are the reference every native kernel is tested against. The native
path serves CPU tensors outside autograd: MXFP4 products for any number of activation rows (the
packed weights are decoded block by block in registers, for decode and prefill alike), bf16 and int8
products up to `MAX_ROWS` rows (decode), on AVX2 CPUs up to `AVX2_DENSE_ROWS` rows; larger dense
products take PyTorch's GEMM, which is the faster choice there. Activations may be float32 or
bfloat16; results come back in their dtype. RMSNorm and attention over a KV cache (decode-sized
queries) are native too: at batch 1 PyTorch spends longer dispatching their small operators than
computing them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

# The reference math is the model file's own functions (functions only: no module class here, so
# the model, the quantized formats and the inference engine all build on this layer, not around it).
from gptoss.model import Visibility, apply_rotary, clamped_swiglu
from gptoss.model import rms_norm as reference_rms_norm
from gptoss.model import sink_attention as reference_sink_attention
from gptoss.ops.formats import unpack

log = logging.getLogger(__name__)

try:
    from gptoss.ops import _native
except ImportError:  # built by `pip install` when a C compiler is present
    _native = None
    log.info("gptoss: native CPU kernels not built; using the PyTorch path (slower decode)")

MAX_ROWS = _native.MAX_ROWS if _native else 0
MAX_MANY = _native.MAX_MANY if _native else 0  # weights one `linears` call fuses
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # the native module's F32 / BF16
INT8_REFERENCE_ROWS = 8192  # output channels the int8 reference path dequantizes at a time


def native_available() -> bool:
    return _native is not None


def set_isa(name: str) -> str:
    """Choose the native instruction set ('best', 'amx', 'avx512bf16', 'avx512', 'avx2', 'c');
    returns the one in use. 'avx512bf16' adds bf16 dot products for bfloat16 activations; 'amx'
    (where Linux grants the tile registers) also runs a prompt's busy experts on AMX tiles."""
    if _native is None:
        raise RuntimeError("the native kernels are not built (reinstall gptoss with a C compiler)")
    return _native.set_isa(name)


def set_num_threads(threads: int) -> None:
    """Threads for PyTorch and the native kernels alike (they share one OpenMP runtime when both
    are loaded, but set both in case they do not)."""
    torch.set_num_threads(threads)
    if _native is not None:
        _native.num_threads(threads)


def _cpu_inference(x: Tensor, *tensors: Tensor | None) -> bool:
    """x on the CPU, and no gradient wanted through x or the tensors."""
    params = [t for t in tensors if t is not None]
    return x.device.type == "cpu" and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
    )


def _native_ok(x: Tensor, *tensors: Tensor | None, max_rows: int | None = None) -> bool:
    return (
        _native is not None
        and x.shape[0] >= 1
        and (max_rows is None or x.shape[0] <= max_rows)
        and _cpu_inference(x, *tensors)
    )


def _native_dtype(t: Tensor) -> Tensor:
    """t detached and contiguous in a dtype the native code reads (bf16 or fp32)."""
    t = t.detach()
    return (t if t.dtype in DTYPE_CODES else t.float()).contiguous()


# Every tensor whose address goes to native code is bound to a local name first, so that it stays
# alive for the whole call (a temporary inside the argument list could be freed before it runs).


def mxfp4_linear(x: Tensor, blocks: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (N, in) @ W + bias for W packed as MXFP4 blocks (out, in/32, 16) and scales (out, in/32).

    Returns (N, out) in x's dtype. The native kernel streams the packed bytes once per chunk of
    `MAX_ROWS` rows (on AVX2, once per pass of up to 48 rows); the reference dequantizes, then
    multiplies. One bf16 row on an AVX2 CPU is first rounded to 16-bit block floats (each value
    within 2^-15 of its group of 32's largest; exact within 2^7 of it) for integer dot products:
    native/avx2.c, mxfp4_i16_avx2.
    """
    if _native_ok(x, bias):
        xa, b = _native_dtype(x), None if bias is None else _native_dtype(bias)
        blocks, scales = blocks.contiguous(), scales.contiguous()
        y = torch.empty(x.shape[0], blocks.shape[0], dtype=xa.dtype)
        _native.mxfp4_matmul(
            xa.data_ptr(), DTYPE_CODES[xa.dtype], x.shape[0], x.shape[1],
            blocks.data_ptr(), scales.data_ptr(), blocks.shape[0],
            _ptr(b), _code(b), y.data_ptr(), DTYPE_CODES[y.dtype],
        )  # fmt: skip
        return y.to(x.dtype)
    y = x @ unpack(blocks, scales, x.dtype)
    return y if bias is None else y + bias


def mxfp4_expert(
    x: Tensor,
    gate_up_blocks: Tensor,
    gate_up_scales: Tensor,
    gate_up_bias: Tensor,
    down_blocks: Tensor,
    down_scales: Tensor,
    down_bias: Tensor,
    alpha: float,
    limit: float,
) -> Tensor:
    """One clamped-SwiGLU expert on tokens x (N, H) with MXFP4 weights: gate_up (2I, H/32, 16)
    with interleaved gate / linear rows, down (H, I/32, 16); biases (2I,) and (H,).

    The reference is `mxfp4_linear` → `clamped_swiglu` → `mxfp4_linear`. Natively it is
    `mxfp4_moe` with one expert: the SwiGLU is applied to the fp32 sums as the kernel makes them,
    and the hidden activations (N, I) are stored once, in x's dtype, as the reference rounds them.
    """
    if _native_ok(x, gate_up_bias, down_bias) and x.dtype in DTYPE_CODES:
        route = torch.zeros(x.shape[0], 1, dtype=torch.int64), torch.ones(x.shape[0], 1)
        stacks = (gate_up_blocks, gate_up_scales, gate_up_bias, down_blocks, down_scales, down_bias)
        return mxfp4_moe(x, *route, *(t[None] for t in stacks), alpha=alpha, limit=limit)
    h = clamped_swiglu(mxfp4_linear(x, gate_up_blocks, gate_up_scales, gate_up_bias), alpha, limit)
    return mxfp4_linear(h, down_blocks, down_scales, down_bias)


def mxfp4_moe(
    x: Tensor,
    expert_idx: Tensor,
    expert_weight: Tensor,
    gate_up_blocks: Tensor,
    gate_up_scales: Tensor,
    gate_up_bias: Tensor,
    down_blocks: Tensor,
    down_scales: Tensor,
    down_bias: Tensor,
    alpha: float,
    limit: float,
) -> Tensor:
    """Σ_j expert_weight[t, j] · expert_{expert_idx[t, j]}(x[t]) for tokens x (N, H): the routed
    experts of an MoE layer, from the stacked MXFP4 tensors (E, ...) as `MXFP4Experts` holds them.

    Natively one call: tokens are grouped by expert, every chosen expert runs `mxfp4_expert`'s
    fused kernels, and the weighted outputs are summed in fp32, rounded once to x's dtype. The
    reference groups tokens the same way (fp32 sum too) and calls `mxfp4_expert` per expert.
    """
    if _native_ok(x, expert_weight, gate_up_bias, down_bias) and x.dtype in DTYPE_CODES:
        xa, idx = x.detach().contiguous(), expert_idx.to(torch.int64).contiguous()
        weight = _native_dtype(expert_weight)
        gb, db = _native_dtype(gate_up_bias), _native_dtype(down_bias)
        db = db.to(gb.dtype)
        gate_up_blocks, gate_up_scales = gate_up_blocks.contiguous(), gate_up_scales.contiguous()
        down_blocks, down_scales = down_blocks.contiguous(), down_scales.contiguous()
        experts, hidden = down_blocks.shape[0], down_blocks.shape[1]
        inter = down_blocks.shape[2] * down_blocks.shape[3] * 2
        y = torch.empty(x.shape[0], hidden, dtype=x.dtype)
        _native.mxfp4_moe(
            xa.data_ptr(), DTYPE_CODES[x.dtype], x.shape[0], idx.shape[1],
            idx.data_ptr(), weight.data_ptr(), DTYPE_CODES[weight.dtype],
            experts, hidden, inter,
            gate_up_blocks.data_ptr(), gate_up_scales.data_ptr(), gb.data_ptr(),
            down_blocks.data_ptr(), down_scales.data_ptr(), db.data_ptr(), DTYPE_CODES[gb.dtype],
            alpha, limit, y.data_ptr(),
        )  # fmt: skip
        return y
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(expert_idx).tolist():
        token, slot = torch.nonzero(expert_idx == e, as_tuple=True)
        stacks = (gate_up_blocks, gate_up_scales, gate_up_bias, down_blocks, down_scales, down_bias)
        y = mxfp4_expert(x[token], *(t[e] for t in stacks), alpha=alpha, limit=limit)
        out = out.index_add(0, token, y.float() * expert_weight[token, slot, None].float())
    return out.to(x.dtype)


DenseWeights = tuple[Tensor, Tensor | None, Tensor | None]  # weight, int8 row scales or None, bias


def _native_dense(x: Tensor, rows: Tensor, layers: list[DenseWeights]) -> list[Tensor]:
    """rows (N, in) through the native bf16 (scales None) or int8 matvec of every layer, in one
    call; each result shaped like x with the layer's output width, in x's dtype."""
    xa = _native_dtype(rows)
    code = DTYPE_CODES[xa.dtype]
    alive, items, outs = [], [], []
    for weight, scale, bias in layers:
        w = weight.contiguous()
        s32 = None if scale is None else scale.detach().float().contiguous()
        b = None if bias is None else _native_dtype(bias)
        y = torch.empty(rows.shape[0], w.shape[0], dtype=xa.dtype)
        alive += [w, s32, b]
        outs.append(y)
        items.append((w.data_ptr(), _ptr(s32), w.shape[0], _ptr(b), _code(b), y.data_ptr()))
    kind = 1 if layers[0][1] is None else 2  # the native module's BF16W / INT8W
    _native.matmul_many(kind, xa.data_ptr(), code, rows.shape[0], rows.shape[1], items, code)
    return [y.to(x.dtype).view(*x.shape[:-1], y.shape[1]) for y in outs]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, with the native bf16 kernels for decode-sized calls on bf16 CPU weights (and on
    AVX2 up to `AVX2_DENSE_ROWS` rows), larger bf16 calls through the fp32 GEMM where the CPU has no
    bf16 dot products (`fp32_gemm_linear`)."""
    rows = x.reshape(-1, x.shape[-1])
    limit = _dense_native_rows(bf16=x.dtype == torch.bfloat16)
    if weight.dtype == torch.bfloat16 and _native_ok(rows, weight, bias, max_rows=limit):
        return _native_dense(x, rows, [(weight, None, bias)])[0]
    if weight.dtype == torch.bfloat16 and _fp32_gemm_wanted(rows, weight, bias):
        return fp32_gemm_linear(x, weight, bias)
    return F.linear(x, weight, bias)


# PyTorch's bf16 GEMM is fast where the CPU multiplies bf16 itself (AVX-512 BF16, AMX). Elsewhere
# its fp32 GEMM is faster even counting the conversion: on this project's 2-core AVX2 machines a
# (rows, 2880) @ (2880, 4096) product ran at 19 GFLOP/s in bf16 against 38 in fp32 at 128 rows and
# 19 against 83 at 512.
BF16_GEMM_IN_HARDWARE = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
FP32_GEMM_BLOCK = 1 << 24  # weight values converted to fp32 at a time (64 MiB)


def _fp32_gemm_wanted(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether a bf16 product of x with a weight too large for the native kernels goes through
    `fp32_gemm_linear`: bf16 x on a CPU without bf16 dot products, outside autograd."""
    return not BF16_GEMM_IN_HARDWARE and x.dtype == torch.bfloat16 and _cpu_inference(x, *tensors)


def fp32_gemm_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None
) -> Tensor:
    """F.linear(x, weight · scale, bias) through PyTorch's fp32 GEMM, a block of output channels at
    a time (no fp32 copy of a whole large matrix), rounded once to x's dtype; `scale` (out,) is an
    int8 weight's per-channel scale. bf16 products are exact in fp32 and both GEMMs sum in fp32, so
    only the order of the sums differs from the bf16 GEMM."""
    xf = x.float()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    step = max(1, FP32_GEMM_BLOCK // weight.shape[1])
    for start in range(0, weight.shape[0], step):
        block = slice(start, start + step)
        w = weight[block].float()
        if scale is not None:
            w *= scale[block].float()[:, None]
        out[..., block] = F.linear(xf, w, None if bias is None else bias[block].float())
    return out


# On AVX2 (no bf16 dot products), a call of more than MAX_ROWS rows takes the native prompt kernel
# (native/avx2.c, avx2_gemm: a tile of bf16 or int8 weight rows decoded a column chunk at a time, once
# per pass of up to 48 rows). On this project's 2-core Zen 3, six 4096x2880 bf16 weights (the 20b
# shape's projections), one thread: 55-66 GFLOP/s from 64 to 256 rows against 20-45 for the fp32
# GEMM, 50 against 54 at 512, 42 against 61 at 1024 (two threads: 92 against 90 at 256, 89 against
# 108 at 1024), so the GEMM takes over beyond 256.
AVX2_DENSE_ROWS = 256


# bf16 activations against bf16 weights where the CPU has bf16 dot products but no AMX tiles: the
# native kernel (four weight rows by six activation rows a block) measured faster than PyTorch's
# bf16 GEMM up to a decode batch's rows on the 20b's shapes (the output head at 16 rows: 136 against
# 165 ms on one thread; benchmarks/NOTES.md, issue 32), so the decode step's output head stays native.
BF16_DENSE_ROWS = 32


def _dense_native_rows(bf16: bool = False) -> int:
    """The most activation rows a bf16 or int8 product takes natively on this CPU (bf16: bf16
    activations against bf16 weights)."""
    isa = _native.isa() if _native is not None else None
    if isa == "avx2" and not BF16_GEMM_IN_HARDWARE:
        return AVX2_DENSE_ROWS
    against_bf16_gemm = bf16 and isa == "avx512bf16" and BF16_GEMM_IN_HARDWARE
    return BF16_DENSE_ROWS if against_bf16_gemm else MAX_ROWS


def linears(x: Tensor, layers: list[DenseWeights]) -> list[Tensor]:
    """[`linear`(x, W, bias) or `int8_linear`(x, W, scale, bias) for each layer], the layers all bf16
    or all int8 (scale given) and of x's width: natively one call for decode-sized x, which lays
    the activations out once and spreads the tiles of every weight over one pass of the threads
    (a layer's q, k and v projections: one fork and join instead of three)."""
    rows = x.reshape(-1, x.shape[-1])
    int8 = layers[0][1] is not None
    same_kind = all(
        (scale is not None) == int8 and (int8 or w.dtype == torch.bfloat16) for w, scale, _ in layers
    )
    tensors = [t for w, _, bias in layers for t in (w, bias)]
    limit = _dense_native_rows(bf16=not int8 and x.dtype == torch.bfloat16)
    if same_kind and len(layers) <= MAX_MANY and _native_ok(rows, *tensors, max_rows=limit):
        return _native_dense(x, rows, layers)
    return [linear(x, w, b) if scale is None else int8_linear(x, w, scale, b) for w, scale, b in layers]


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ (weight (out, in) int8 · scale (out,))ᵀ + bias: weight-only int8, one scale per output row."""
    rows = x.reshape(-1, x.shape[-1])
    if _native_ok(rows, bias, max_rows=_dense_native_rows()):
        return _native_dense(x, rows, [(weight, scale, bias)])[0]
    if _fp32_gemm_wanted(rows, bias):
        return fp32_gemm_linear(x, weight, bias, scale)
    # dequantized a block of output channels at a time: no full-size copy of a large matrix (the
    # 1.1 GiB head would need two)
    parts = []
    for start in range(0, weight.shape[0], INT8_REFERENCE_ROWS):
        block = slice(start, start + INT8_REFERENCE_ROWS)
        dequantized = weight[block].to(x.dtype) * scale[block].to(x.dtype)[:, None]
        parts.append(F.linear(x, dequantized, None if bias is None else bias[block]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _code(t: Tensor | None) -> int:
    return 0 if t is None else DTYPE_CODES[t.dtype]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`gptoss.model.rms_norm`: one native call instead of its handful of operators."""
    if _native_ok(x, weight) and x.dtype in DTYPE_CODES:
        xa, w = x.detach().contiguous(), _native_dtype(weight)
        y = torch.empty_like(xa)
        rows, dim = xa.numel() // xa.shape[-1], xa.shape[-1]
        code = DTYPE_CODES[xa.dtype]
        _native.rms_norm(xa.data_ptr(), code, rows, dim, w.data_ptr(), _code(w), eps, y.data_ptr())
        return y
    return reference_rms_norm(x, weight, eps)


def rotary_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """`gptoss.model.apply_rotary` of queries and keys (B, T, heads, D), in place; returns (q, k).
    Natively: the same fp32 products and sums, without the dozen operators and fp32 copies per call
    (a 20b prompt chunk's rotary took ~6-10% of its prefill through them)."""
    B, T = q.shape[:2]
    if (
        _native_ok(q, k)
        and q.dtype in DTYPE_CODES
        and k.dtype == q.dtype
        and q.is_contiguous()
        and k.is_contiguous()
    ):
        c, s = cos.detach().float().contiguous(), sin.detach().float().contiguous()
        for t in (q, k):
            code, heads, dim = DTYPE_CODES[t.dtype], t.shape[2], t.shape[3]
            _native.rotary(t.data_ptr(), code, B * T, heads, dim, c.data_ptr(), s.data_ptr())
        return q, k
    with torch.no_grad():
        q.copy_(apply_rotary(q, cos, sin))
        k.copy_(apply_rotary(k, cos, sin))
    return q, k


def _keys_layout(t: Tensor) -> Tensor:
    """t (B, KVH, S, D) with each head's (S, D) rows contiguous, as the native kernel reads them."""
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def _native_prompt_attention() -> bool:
    """Whether prompt-sized queries take the native sink attention too: with AVX-512, where it
    measured 3-6x PyTorch's on this project's 2-core Xeon (a 20b layer, 128 queries over 256 cache
    slots: 3.3 against 9.8 ms; 1024 over 1024: 137 against 532), needing no (T, S) scores in
    memory; not on AVX2, where it measured ~6x slower than the fp32-GEMM path below."""
    return _native is not None and _native.isa() in ("avx512", "avx512bf16", "amx")


def prompt_attention_in_place(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `sink_attention` of prompt-sized queries in `dtype` on `device` runs natively (outside
    autograd), holding a few rows of scores at a time rather than the (T, S) scores PyTorch's path
    makes: what lets a prefill keep its chunks long at long contexts."""
    return device.type == "cpu" and dtype in DTYPE_CODES and _native_prompt_attention()


def sink_attention(q: Tensor, k: Tensor, v: Tensor, visible: Visibility, sinks: Tensor) -> Tensor:
    """`gptoss.model.sink_attention`; natively for decode-sized queries (up to `MAX_ROWS` tokens),
    and with AVX-512 for longer ones too, straight from the cache's memory. Softmax in fp32,
    probabilities rounded to the values' dtype and the weighted sum accumulated in fp32, as the
    reference does. Longer bf16 queries on a CPU without bf16 dot products weight fp32 copies of
    the values by the rounded probabilities: the same products and fp32 sums as PyTorch's bf16
    matmul, which ran ~27x slower there (a 20b layer's 128-token prefill: 45 against 1.6 ms).
    The native kernels read which keys a query sees from the positions in `visible`; only PyTorch's
    attention builds its (T, S) mask, when it runs."""
    B, H, T, D = q.shape
    if (
        _native_ok(q, k, v, sinks, max_rows=MAX_ROWS)
        and (T <= MAX_ROWS or _native_prompt_attention())
        and q.dtype in DTYPE_CODES
        and k.dtype == v.dtype
        and k.dtype in DTYPE_CODES
    ):
        qa, s32 = q.detach().contiguous(), sinks.detach().float().contiguous()
        out = torch.empty(B, H, T, D, dtype=v.dtype)
        _native_attention(qa, k.detach(), v.detach(), visible, s32.data_ptr(), out)
        return out
    if _fp32_gemm_wanted(v, q, k, sinks):
        return reference_sink_attention(q, k, v.float(), visible, sinks, probs_dtype=v.dtype).to(v.dtype)
    return reference_sink_attention(q, k, v, visible, sinks)


NO_WINDOW = 2**63 - 1  # the native kernels' window where a layer has none


def native_sight(
    visible: Visibility, batch: int, tokens: int, keys: int
) -> tuple[Tensor, Tensor | None, int]:
    """What the native kernels read of `visible` for `batch` rows of `tokens` queries over `keys`
    keys: the query positions (batch, tokens) and key positions (batch, keys) or None, contiguous
    int64, and the window."""
    queries = _int64_rows(visible.queries, batch, tokens)
    positions = None if visible.keys is None else _int64_rows(visible.keys, batch, keys)
    return queries, positions, NO_WINDOW if visible.window is None else visible.window


def _int64_rows(t: Tensor, batch: int, n: int) -> Tensor:
    """t (batch or 1, n) as contiguous int64 (batch, n): itself when it is (a cache's positions, for
    every layer of a pass)."""
    if t.shape == (batch, n) and t.dtype == torch.int64 and t.is_contiguous():
        return t
    return t.to(torch.int64).expand(batch, n).contiguous()


def _native_attention(q: Tensor, k: Tensor, v: Tensor, visible: Visibility, sinks: int, out: Tensor) -> None:
    """The native sink attention of contiguous queries q (B, H, T, D) into out, over k and v as
    `sink_attention` takes them; `sinks`: the address of the heads' fp32 sink logits."""
    B, H, T, D = q.shape
    ka, va = _keys_layout(k), _keys_layout(v)
    if ka.stride()[:2] != va.stride()[:2]:
        ka, va = ka.contiguous(), va.contiguous()
    queries, keys, window = native_sight(visible, B, T, k.shape[2])
    _native.sink_attention(
        q.data_ptr(), DTYPE_CODES[q.dtype], B, H, T, D,
        ka.data_ptr(), va.data_ptr(), DTYPE_CODES[va.dtype], k.shape[1], k.shape[2],
        ka.stride(0), ka.stride(1), queries.data_ptr(), 0 if keys is None else keys.data_ptr(), window,
        sinks, out.data_ptr(),
    )  # fmt: skip
