"""A block's decode step as a short fixed run of native calls (`NativeBlock`).

At batch 1 a 20b token spends ~68 ms in this package on a 2-core machine, of which ~9 ms went to
Python and small PyTorch operators between the kernels (module calls, wrappers checking and
converting their arguments, views, allocations): 24 layers x ~40 operators. A decode step (one new
token for each of up to `MAX_ROWS` sequences, over a KV cache, outside autograd) always takes the
same path, so `NativeBlock` resolves it once: the block's weights, as the kernels read them, are
gathered into a `_Plan` kept until one of them changes; a step is then seven native calls and a
handful of operators (the router's top-k and softmax, the residual adds), the rotary embedding, the
cache write and the attention being one call when every row of the cache takes its token at one
length (`KVCache.shared_slot`), else nine and the cache's own writes (`KVCache.update`).

The kernels, their inputs and their order are those of the general path (`Block.forward` through
`NativeAttention`, `NativeRouter`, `ops.mxfp4_moe`), so the results are the same numbers, bit for
bit (tested). Anything else (prefill, autograd, LoRA-wrapped projections, dense MLPs, experts not
in MXFP4, a cache in another dtype) takes the general path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gptoss.model import Block, KVCache
from gptoss.ops import (
    _DTYPE_CODES,
    MAX_ROWS,
    DenseWeights,
    NativeAttention,
    NativeRMSNorm,
    NativeRouter,
    _dense_weights,
    _native,
    _native_attention,
)

_DENSE_KIND = {False: 1, True: 2}  # int8 or not → the native module's BF16W / INT8W


@dataclass
class _Dense:
    """Weights of one native matmul_many call: its kind and each weight's (address, int8 scales or
    0, rows, bias or 0, bias dtype code) — the items without their output address."""

    kind: int
    items: list[tuple[int, int, int, int, int]]


@dataclass
class _Plan:
    tensors: list[Tensor]  # everything the addresses below point into, kept alive
    norms: tuple[tuple[int, int, float], tuple[int, int, float]]  # (weight, dtype code, eps) x 2
    qkv: _Dense
    o: _Dense
    router: _Dense
    top_k: int
    sinks: int  # fp32 copy
    moe: tuple  # mxfp4_moe's arguments from `experts` to `bias dtype`, then alpha, limit
    attention: object | None  # the native attention_plan: the above for attention_step, when it fits


def _dense(weights: list[DenseWeights | None], tensors: list[Tensor]) -> _Dense | None:
    """The matmul_many weights of `weights` (all bf16 or all int8, native-ready), else None."""
    if any(w is None for w in weights) or len({scale is None for _, scale, _ in weights}) != 1:
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
        s32 = None if scale is None else scale.detach().float().contiguous()
        tensors += [t for t in (weight, s32, bias) if t is not None]
        items.append(
            (
                weight.data_ptr(),
                0 if s32 is None else s32.data_ptr(),
                weight.shape[0],
                0 if bias is None else bias.data_ptr(),
                0 if bias is None else _DTYPE_CODES[bias.dtype],
            )
        )
    return _Dense(_DENSE_KIND[weights[0][1] is not None], items)


def _ready(t: Tensor) -> bool:
    """Whether the native code can read t where it lies."""
    return t.dtype in _DTYPE_CODES and t.is_contiguous()


def _parts(block: Block) -> list[nn.Module | None]:
    # From the _modules dicts: nn.Module.__getattr__ costs ~0.5 µs a call, and the plan key that
    # needs these runs for every block of every decode step.
    modules = block._modules
    attn, mlp = modules["self_attn"], modules["mlp"]
    attn_parts = attn._modules
    return [
        modules["input_layernorm"], modules["post_attention_layernorm"], attn,
        attn_parts["q_proj"], attn_parts["k_proj"], attn_parts["v_proj"], attn_parts["o_proj"],
        mlp._modules.get("router"), mlp._modules.get("experts"),
    ]  # fmt: skip


def _plan_key(block: Block) -> tuple:
    """Identity, storage and version of every tensor the plan reads: any replacement or in-place
    change (load_state_dict, an optimizer step) makes a new plan."""
    return tuple(
        (id(t), t.data_ptr(), t._version)
        for part in _parts(block)
        if part is not None
        for t in (*part._parameters.values(), *part._buffers.values())
        if t is not None
    )


def _build_plan(block: Block) -> _Plan | None:
    from gptoss.mxfp4 import MXFP4Experts  # (gptoss.mxfp4 imports gptoss.ops)

    attn, mlp = block.self_attn, block.mlp
    norms = (block.input_layernorm, block.post_attention_layernorm)
    router, experts = getattr(mlp, "router", None), getattr(mlp, "experts", None)
    if not (
        type(attn) is NativeAttention
        and all(type(n) is NativeRMSNorm and _ready(n.weight) for n in norms)
        and type(router) is NativeRouter
        and type(experts) is MXFP4Experts
    ):
        return None
    gate_up_bias, down_bias = experts.gate_up_proj_bias, experts.down_proj_bias
    packed = (
        experts.gate_up_proj_blocks, experts.gate_up_proj_scales,
        experts.down_proj_blocks, experts.down_proj_scales,
    )  # fmt: skip
    if not (_ready(gate_up_bias) and down_bias.dtype == gate_up_bias.dtype and down_bias.is_contiguous()):
        return None
    if not all(t.is_contiguous() for t in packed):
        return None
    tensors: list[Tensor] = [n.weight for n in norms]
    qkv = _dense([_dense_weights(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)], tensors)
    o = _dense([_dense_weights(attn.o_proj)], tensors)
    route = _dense([(router.weight, None, router.bias)], tensors)
    if qkv is None or o is None or route is None:
        return None
    sinks = attn.sinks.detach().float().contiguous()
    tensors += [sinks, *packed, gate_up_bias, down_bias]
    gate_up_blocks, gate_up_scales, down_blocks, down_scales = packed
    moe = (
        down_blocks.shape[0], down_blocks.shape[1], down_blocks.shape[2] * down_blocks.shape[3] * 2,
        gate_up_blocks.data_ptr(), gate_up_scales.data_ptr(), gate_up_bias.data_ptr(),
        down_blocks.data_ptr(), down_scales.data_ptr(), down_bias.data_ptr(),
        _DTYPE_CODES[gate_up_bias.dtype], experts.alpha, experts.limit,
    )  # fmt: skip
    norm_args = tuple((n.weight.data_ptr(), _DTYPE_CODES[n.weight.dtype], n.eps) for n in norms)
    attention = None
    if qkv.kind == o.kind:  # (one step takes one kind: bf16 or int8 attention)
        attention = _native.attention_plan(
            block.input_layernorm.weight.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim,
            *norm_args, qkv.kind, tuple(qkv.items), o.items[0], route.items[0], sinks.data_ptr(),
        )  # fmt: skip
    return _Plan(
        tensors=tensors,
        norms=norm_args,
        qkv=qkv,
        o=o,
        router=route,
        top_k=router.top_k,
        sinks=sinks.data_ptr(),
        moe=moe,
        attention=attention,
    )


def _cache_in(cache: KVCache, dtype: torch.dtype) -> bool:
    """Whether `cache` is one of `gptoss.inference.KVCache` (or alike) holding `dtype`, as the
    attention kernel and the blocks' arithmetic here assume."""
    keys = getattr(cache, "keys", None)
    return isinstance(keys, list) and len(keys) > 0 and keys[0].dtype == dtype


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


class NativeBlock(Block):
    def __getstate__(self) -> dict:
        """Without the plan: it holds addresses (and a native object) of this block's tensors, so a
        copy or an unpickled block builds its own."""
        state = self.__dict__.copy()
        for name in ("_plan", "_plan_built_from"):
            state.pop(name, None)
        return state

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        plan = self._decode_plan(x, cos, cache)
        if plan is None:
            return super().forward(x, cos, sin, cache)
        return self._decode(plan, x, cos, sin, cache)

    def _decode_plan(self, x: Tensor, cos: Tensor, cache: KVCache | None) -> _Plan | None:
        """The plan when this call is a decode step the native path takes, else None."""
        if (
            _native is None
            or cache is None
            or x.dim() != 3
            or x.shape[1] != 1
            or x.shape[0] > MAX_ROWS
            or x.device.type != "cpu"
            or x.dtype not in _DTYPE_CODES
            or cos.dtype != torch.float32
            or not _cache_in(cache, x.dtype)
            or (
                torch.is_grad_enabled()
                and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
            )
        ):
            return None
        key = _plan_key(self)
        if getattr(self, "_plan_built_from", None) != key:  # (a block it cannot take is remembered too)
            self._plan, self._plan_built_from = _build_plan(self), key
        return self._plan

    def _decode(self, plan: _Plan, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache) -> Tensor:
        B, H = x.shape[0], x.shape[2]
        code = _DTYPE_CODES[x.dtype]
        rows = x.detach().reshape(B, H).contiguous()
        c, s = cos.contiguous(), sin.contiguous()
        shared_slot = getattr(cache, "shared_slot", None)  # (a cache alike without it: update)
        shared = shared_slot(self.self_attn.layer_idx) if shared_slot is not None else None
        if shared is not None and plan.attention is not None:  # the usual step: one call to the experts
            keys, values, slot, attended, mask = shared
            h, logits = torch.empty_like(rows), torch.empty(B, plan.router.items[0][2], dtype=x.dtype)
            residual = torch.empty_like(rows)
            _native.attention_step(
                plan.attention, rows.data_ptr(), code, B, c.data_ptr(), s.data_ptr(), keys.data_ptr(),
                values.data_ptr(), keys.shape[2], slot, attended, mask.data_ptr(), mask.shape[0],
                residual.data_ptr(), h.data_ptr(), logits.data_ptr(),
            )  # fmt: skip
        else:
            residual = rows + _matmul(plan.o, self._attention(plan, rows, c, s, cache, code), code)[0]
            h = _rms_norm(plan.norms[1], residual, code)
            (logits,) = _matmul(plan.router, h, code)
        top_logits, expert_idx = torch.topk(logits, plan.top_k, dim=-1)
        expert_weight = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)
        y = torch.empty_like(residual)
        _native.mxfp4_moe(
            h.data_ptr(), code, B, plan.top_k, expert_idx.data_ptr(), expert_weight.data_ptr(), code,
            *plan.moe, y.data_ptr(),
        )  # fmt: skip
        return (residual + y).view(B, 1, H)

    def _attention(
        self, plan: _Plan, rows: Tensor, c: Tensor, s: Tensor, cache: KVCache, code: int
    ) -> Tensor:
        """The attention of a step that attention_step does not take, call by call, before o_proj."""
        attn = self.self_attn
        B, heads, kv_heads, dim = rows.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim
        q, k, v = _matmul(plan.qkv, _rms_norm(plan.norms[0], rows, code), code)
        _native.rotary(q.data_ptr(), code, B, heads, dim, c.data_ptr(), s.data_ptr())
        _native.rotary(k.data_ptr(), code, B, kv_heads, dim, c.data_ptr(), s.data_ptr())
        keys, values, mask = cache.update(
            attn.layer_idx,
            k.view(B, 1, kv_heads, dim).transpose(1, 2),
            v.view(B, 1, kv_heads, dim).transpose(1, 2),
        )
        out = torch.empty(B, heads * dim, dtype=rows.dtype)  # (B, heads, 1, dim) as o_proj reads it
        _native_attention(q.view(B, heads, 1, dim), keys, values, mask, plan.sinks, out)
        return out
