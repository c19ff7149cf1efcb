"""A block's decode step as a short fixed run of native calls, over tensors only.

At batch 1 a 20b token spends ~68 ms in this package on a 2-core machine, of which ~9 ms went to
Python and small PyTorch operators between the kernels (module calls, wrappers checking and
converting their arguments, views, allocations): 24 layers x ~40 operators. A decode step (one new
token for each of up to `STEP_ROWS` sequences, over a KV cache, outside autograd) always takes the
same path, so it is resolved once: a block's weights, as the kernels read them (`BlockWeights`), are
gathered into a `DecodePlan`; a step is then seven native calls and a handful of operators (the
router's top-k and softmax, the residual adds), the rotary embedding, the cache write and the
attention being one call that reads and writes the cache's blocks through their addresses (the
cache's `decode_view`), else nine and the cache's own writes (its `update`).

The kernels, their inputs and their order are those of the general path (`Block.forward` through
`ops.linears`, `ops.rotary_`, `ops.sink_attention`, `ops.mxfp4_moe`), so the results are the same
numbers, bit for bit (tests/test_ops_decode.py). Which modules a block holds, and when a plan is
stale, is `gptoss.inference.native`'s business: this file knows tensors, not modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from gptoss.model import Visibility
from gptoss.ops import DTYPE_CODES, DenseWeights, _native, _native_attention, native_sight

_DENSE_KIND = {False: 1, True: 2}  # int8 or not → the native module's BF16W / INT8W

# The most rows (sequences) a step takes: the server's default batch. The kernels take any number
# (matmul_many runs a weight tile against every chunk of MAX_ROWS rows while the tile is in cache);
# up to here that measured no slower than PyTorch's GEMM for the dense products, and the step saves
# the general path's operators between them (benchmarks/NOTES.md). Wider batches were not measured.
STEP_ROWS = 32


class CacheView(Protocol):
    """Where a one-token pass's layer reads and writes (`gptoss.inference.cache.DecodeView`)."""

    keys: Tensor  # (B, blocks) int64 byte addresses of each row's key blocks (KVH, block_size, D)
    values: Tensor  # the same for values
    block_size: int
    kv_heads: int
    slots: Tensor  # (B,) int64: the position each row's new token goes to
    attended: int  # positions the queries attend over
    visible: Visibility  # which of them each query sees


# the cache's update of one layer: new keys and values (B, KVH, 1, D) → keys, values and which of
# them each query sees
CacheUpdate = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Visibility]]


@dataclass(frozen=True)
class BlockWeights:
    """One MoE block's tensors, as its decode step reads them."""

    norms: tuple[tuple[Tensor, float], tuple[Tensor, float]]  # (weight, eps): input, post-attention
    qkv: tuple[DenseWeights, DenseWeights, DenseWeights]
    o: DenseWeights
    router: DenseWeights
    top_k: int
    heads: int
    kv_heads: int
    head_dim: int
    sinks: Tensor  # (heads,)
    # MXFP4 experts: gate_up blocks, scales, bias, down blocks, scales, bias (as `ops.mxfp4_moe`)
    experts: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
    alpha: float
    limit: float


@dataclass
class _Dense:
    """Weights of one native matmul_many call: its kind and each weight's (address, int8 scales or
    0, rows, bias or 0, bias dtype code) — the items without their output address."""

    kind: int
    items: list[tuple[int, int, int, int, int]]


class _Tensors:
    """The tensors a plan's addresses point into: kept alive, checked for a moved storage, and the
    fp32 copies the kernels read refreshed from their sources before every step (so an in-place
    change of a source, e.g. an optimizer step, is seen without a version counter)."""

    def __init__(self) -> None:
        self.sources: list[Tensor] = []
        self.addresses: list[int] = []
        self.copies: list[tuple[Tensor, Tensor]] = []  # (source, fp32 copy)

    def read(self, t: Tensor) -> int:
        self.sources.append(t)
        self.addresses.append(t.data_ptr())
        return t.data_ptr()

    def fp32(self, t: Tensor) -> Tensor:
        """t as contiguous fp32: t itself if it is, else a copy refreshed every step."""
        self.read(t)
        converted = t.detach().float().contiguous()
        if converted.data_ptr() != t.data_ptr():
            self.copies.append((t, converted))
        return converted


class DecodePlan:
    """A block's decode step resolved: the addresses and sizes of every native call."""

    def __init__(
        self, weights: BlockWeights, tensors: _Tensors, qkv: _Dense, o: _Dense, router: _Dense, sinks: Tensor,
        moe: tuple, attention: object | None,
    ) -> None:  # fmt: skip
        self.weights = weights
        self._tensors = tensors
        self.norms = tuple((tensors.read(w), DTYPE_CODES[w.dtype], eps) for w, eps in weights.norms)
        self.qkv, self.o, self.router = qkv, o, router
        self.sinks = sinks.data_ptr()
        self.moe = moe  # mxfp4_moe's arguments from `experts` to `bias dtype`, then alpha, limit
        self.attention = attention  # the native attention_plan, for attention_step, when it fits

    def current(self) -> bool:
        """Whether every tensor still lies where the plan read it (`param.data = ...`, `.to()`)."""
        t = self._tensors
        return all(s.data_ptr() == a for s, a in zip(t.sources, t.addresses, strict=True))

    def refresh(self) -> None:
        for source, copy in self._tensors.copies:
            copy.copy_(source)


def plan(weights: BlockWeights) -> DecodePlan | None:
    """The decode plan of a block's weights, or None where the native step cannot take them (no
    native build, weights not bf16 / int8 where the kernels want them, not contiguous)."""
    if _native is None:
        return None
    w = weights
    if not all(_ready(norm) for norm, _ in w.norms):
        return None
    gate_up_blocks, gate_up_scales, gate_up_bias, down_blocks, down_scales, down_bias = w.experts
    packed = (gate_up_blocks, gate_up_scales, down_blocks, down_scales)
    if not (_ready(gate_up_bias) and down_bias.dtype == gate_up_bias.dtype and down_bias.is_contiguous()):
        return None
    if not all(t.is_contiguous() for t in packed):
        return None
    tensors = _Tensors()
    qkv, o, route = _dense(list(w.qkv), tensors), _dense([w.o], tensors), _dense([w.router], tensors)
    if qkv is None or o is None or route is None:
        return None
    sinks = tensors.fp32(w.sinks)
    moe = (
        down_blocks.shape[0], down_blocks.shape[1], down_blocks.shape[2] * down_blocks.shape[3] * 2,
        tensors.read(gate_up_blocks), tensors.read(gate_up_scales), tensors.read(gate_up_bias),
        tensors.read(down_blocks), tensors.read(down_scales), tensors.read(down_bias),
        DTYPE_CODES[gate_up_bias.dtype], w.alpha, w.limit,
    )  # fmt: skip
    result = DecodePlan(w, tensors, qkv, o, route, sinks, moe, None)
    if qkv.kind == o.kind:  # (one step takes one kind: bf16 or int8 attention)
        hidden = w.norms[0][0].shape[0]
        result.attention = _native.attention_plan(
            hidden, w.heads, w.kv_heads, w.head_dim, *result.norms,
            qkv.kind, tuple(qkv.items), o.items[0], route.items[0], result.sinks,
        )  # fmt: skip
    return result


def _dense(weights: list[DenseWeights], tensors: _Tensors) -> _Dense | None:
    """The matmul_many weights of `weights` (all bf16 or all int8, native-ready), else None."""
    if len({scale is None for _, scale, _ in weights}) != 1:
        return None
    items = []
    for weight, scale, bias in weights:
        kind_dtype = torch.bfloat16 if scale is None else torch.int8
        if (
            weight.dtype != kind_dtype
            or not weight.is_contiguous()
            or (bias is not None and not _ready(bias))
        ):
            return None
        scales = 0 if scale is None else tensors.fp32(scale).data_ptr()
        bias_at = 0 if bias is None else tensors.read(bias)
        bias_code = 0 if bias is None else DTYPE_CODES[bias.dtype]
        items.append((tensors.read(weight), scales, weight.shape[0], bias_at, bias_code))
    return _Dense(_DENSE_KIND[weights[0][1] is not None], items)


def _ready(t: Tensor) -> bool:
    """Whether the native code can read t where it lies."""
    return t.dtype in DTYPE_CODES and t.is_contiguous()


def _matmul(dense: _Dense, x: Tensor, code: int) -> list[Tensor]:
    """x (n, in) through the plan's weights: one output (n, rows) each, in x's dtype."""
    outs = [torch.empty(x.shape[0], rows, dtype=x.dtype) for _, _, rows, _, _ in dense.items]
    items = [
        (w, s, rows, b, bc, y.data_ptr()) for (w, s, rows, b, bc), y in zip(dense.items, outs, strict=True)
    ]
    _native.matmul_many(dense.kind, x.data_ptr(), code, x.shape[0], x.shape[1], items, code)
    return outs


def _rms_norm(norm: tuple[int, int, float], x: Tensor, code: int) -> Tensor:
    y = torch.empty_like(x)
    _native.rms_norm(x.data_ptr(), code, x.shape[0], x.shape[1], norm[0], norm[1], norm[2], y.data_ptr())
    return y


def step(
    plan: DecodePlan, x: Tensor, cos: Tensor, sin: Tensor, view: CacheView | None, update: CacheUpdate
) -> Tensor:
    """The block's output for one new token per row, x (B, 1, H) in bf16 or fp32 (the cache's
    dtype), cos and sin (B, 1, D/2) fp32: through the cache's decode `view` (a `DecodeView`) when it
    offers one, else through its `update`."""
    plan.refresh()
    B, H = x.shape[0], x.shape[2]
    code = DTYPE_CODES[x.dtype]
    rows = x.detach().reshape(B, H).contiguous()
    c, s = cos.contiguous(), sin.contiguous()
    if view is not None and plan.attention is not None:  # the usual step: one call to the experts
        h, logits = torch.empty_like(rows), torch.empty(B, plan.router.items[0][2], dtype=x.dtype)
        residual = torch.empty_like(rows)
        queries, keys, window = native_sight(view.visible, B, 1, view.attended)
        _native.attention_step(
            plan.attention, rows.data_ptr(), code, B, c.data_ptr(), s.data_ptr(), view.keys.data_ptr(),
            view.values.data_ptr(), view.keys.shape[1], view.block_size, view.slots.data_ptr(),
            view.attended, queries.data_ptr(), 0 if keys is None else keys.data_ptr(), window,
            residual.data_ptr(), h.data_ptr(), logits.data_ptr(),
        )  # fmt: skip
    else:
        residual = rows + _matmul(plan.o, _attention(plan, rows, c, s, update, code), code)[0]
        h = _rms_norm(plan.norms[1], residual, code)
        (logits,) = _matmul(plan.router, h, code)
    top_logits, expert_idx = torch.topk(logits, plan.weights.top_k, dim=-1)
    expert_weight = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)
    y = torch.empty_like(residual)
    _native.mxfp4_moe(
        h.data_ptr(), code, B, plan.weights.top_k, expert_idx.data_ptr(), expert_weight.data_ptr(), code,
        *plan.moe, y.data_ptr(),
    )  # fmt: skip
    return (residual + y).view(B, 1, H)


def _attention(
    plan: DecodePlan, rows: Tensor, c: Tensor, s: Tensor, update: CacheUpdate, code: int
) -> Tensor:
    """The attention of a step that attention_step does not take, call by call, before o_proj."""
    w = plan.weights
    B, heads, kv_heads, dim = rows.shape[0], w.heads, w.kv_heads, w.head_dim
    q, k, v = _matmul(plan.qkv, _rms_norm(plan.norms[0], rows, code), code)
    _native.rotary(q.data_ptr(), code, B, heads, dim, c.data_ptr(), s.data_ptr())
    _native.rotary(k.data_ptr(), code, B, kv_heads, dim, c.data_ptr(), s.data_ptr())
    keys, values, visible = update(
        k.view(B, 1, kv_heads, dim).transpose(1, 2), v.view(B, 1, kv_heads, dim).transpose(1, 2)
    )
    out = torch.empty(B, heads * dim, dtype=rows.dtype)  # (B, heads, 1, dim) as o_proj reads it
    _native_attention(q.view(B, heads, 1, dim), keys, values, visible, plan.sinks, out)
    return out


def paged_attention(q: Tensor, view: CacheView, sinks: Tensor) -> Tensor:
    """`ops.sink_attention` of queries q (B, H, T, D) in the cache's dtype (a decode step's one token
    a row, or a prompt chunk's), over the blocks of a cache's `view` (whose new keys and values are
    already written), natively and for any number of rows: (B, H, T, D). The same kernel as over a
    contiguous cache, so the same bits."""
    B, H, T, D = q.shape
    qa, s32 = q.detach().contiguous(), sinks.detach().float().contiguous()
    out = torch.empty(B, H, T, D, dtype=q.dtype)
    code = DTYPE_CODES[q.dtype]
    queries, keys, window = native_sight(view.visible, B, T, view.attended)
    _native.paged_attention(
        qa.data_ptr(), code, B, H, T, D, view.keys.data_ptr(), view.values.data_ptr(), view.keys.shape[1],
        view.block_size, code, view.kv_heads, view.attended, queries.data_ptr(),
        0 if keys is None else keys.data_ptr(), window, s32.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    return out
