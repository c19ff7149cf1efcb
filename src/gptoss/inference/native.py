"""The native kernels applied to a model from outside: module swaps and the blocks' decode plans.

`use_native_kernels` replaces the model's linear layers, RMSNorms, attention modules, routers and
blocks by subclasses whose forward goes through `gptoss.ops` (gpt-fast's module swaps): each new
module takes over the old one's parameters, buffers, children and settings, so parameter objects
(and any tying), names and the state_dict stay as they were, and model.py stays the reference math.

A `NativeBlock` runs a decode step as `gptoss.ops.decode` resolves it, from the block's weights
(gathered here, where the module types are known) and the engine's `KVCache` (typed access: its
dtype, its `decode_view`, its `update`), or a verify pass's `QueryRows` view of one of its rows.
Anything else (prefill, autograd, LoRA-wrapped projections,
dense MLPs, experts not in MXFP4, another cache) takes the general path, `Block.forward`.

A plan holds the addresses of the weights it read. It is rebuilt when a module, parameter or buffer
is registered anywhere (PyTorch's global registration hooks: a replaced weight or sub-module) or
when a tensor's storage moved (`param.data = ...`, `.to()`); in-place changes need nothing, the
kernels read the weights where they lie.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from gptoss import ops
from gptoss.inference.cache import KVCache
from gptoss.inference.verify import QueryRows
from gptoss.model import Attention, Block, RMSNorm, Router, Visibility
from gptoss.model import KVCache as CacheProtocol
from gptoss.ops import decode
from gptoss.quant.int8 import Int8Linear
from gptoss.quant.mxfp4 import MXFP4Experts
from gptoss.swap import rebuilt


class NativeLinear(nn.Linear):
    """nn.Linear whose forward goes through `ops.linear`; same parameters, same state_dict."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


class NativeRMSNorm(RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def _dense_weights(layer: nn.Module) -> ops.DenseWeights | None:
    """A projection's weights as `ops.linears` takes them: native bf16 linears and weight-only int8
    ones; None for anything else (e.g. LoRA-wrapped projections)."""
    if type(layer) is NativeLinear:
        return layer.weight, None, layer.bias
    if type(layer) is Int8Linear:
        return layer.weight, layer.scale, layer.bias
    return None


class NativeAttention(Attention):
    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        layers = [_dense_weights(layer) for layer in (self.q_proj, self.k_proj, self.v_proj)]
        if any(layer is None for layer in layers):
            return super().project(x)
        q, k, v = ops.linears(x, layers)
        return q, k, v

    def rotate(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return super().rotate(q, k, cos, sin)
        return ops.rotary_(q, k, cos, sin)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, visible: Visibility) -> Tensor:
        return ops.sink_attention(q, k, v, visible, self.sinks)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: CacheProtocol | None = None) -> Tensor:
        """`Attention.forward`; a decode step over a paged `KVCache` (any number of rows), and a
        prompt chunk of a full layer where the native prompt attention serves, stores its keys and
        values in the cache's blocks and attends over them where they lie, instead of over a
        gathered copy (`update`: at 128k tokens a chunk's copy of a full layer is 256 MiB)."""
        B, T, _ = x.shape
        if not (
            isinstance(cache, KVCache)
            and (T == 1 or ops.prompt_attention_in_place(x.device, x.dtype))
            and ops.native_available()
            and x.device.type == "cpu"
            and x.dtype in ops.DTYPE_CODES
            and cache.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or self.sinks.requires_grad))
        ):
            return super().forward(x, cos, sin, cache)
        view = cache.decode_view(self.layer_idx) if T == 1 else cache.prompt_view(self.layer_idx)
        if view is None:
            return super().forward(x, cos, sin, cache)
        q, k, v = self.project(x)
        q, k = self.rotate(
            q.view(B, T, self.num_heads, self.head_dim),
            k.view(B, T, self.num_kv_heads, self.head_dim),
            cos,
            sin,
        )
        cache.store(
            self.layer_idx, k.transpose(1, 2), v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        )
        out = decode.paged_attention(q.transpose(1, 2), view, self.sinks)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def prompt_scores_in_memory(model: nn.Module) -> bool:
    """Whether a prompt's attention through `model` holds its (T, S) scores in memory: unless its
    attention layers are `NativeAttention` on a CPU whose native prompt attention serves them."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers or not isinstance(layers[0].self_attn, NativeAttention):
        return True
    weight = layers[0].self_attn.q_proj.weight
    return not ops.prompt_attention_in_place(weight.device, weight.dtype)


class NativeRouter(Router):
    def project(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


# Bumped by every module, parameter or buffer registration in the process: a plan built before the
# last one may read a replaced tensor. (Registrations happen while models are built or changed,
# never in a decode step, so plans are rebuilt only then.)
_registrations = 0


def _registered(*_: object) -> None:
    global _registrations
    _registrations += 1


for _hook in (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
    register_module_buffer_registration_hook,
):
    _hook(_registered)


def _block_weights(block: Block) -> decode.BlockWeights | None:
    """The block's tensors as `ops.decode` reads them, if its modules are the native and MXFP4 ones."""
    attn, mlp = block.self_attn, block.mlp
    norms = (block.input_layernorm, block.post_attention_layernorm)
    router, experts = getattr(mlp, "router", None), getattr(mlp, "experts", None)
    if not (
        type(attn) is NativeAttention
        and all(type(n) is NativeRMSNorm for n in norms)
        and type(router) is NativeRouter
        and type(experts) is MXFP4Experts
    ):
        return None
    qkv = tuple(_dense_weights(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    o = _dense_weights(attn.o_proj)
    if o is None or any(w is None for w in qkv):
        return None
    return decode.BlockWeights(
        norms=((norms[0].weight, norms[0].eps), (norms[1].weight, norms[1].eps)),
        qkv=qkv,  # type: ignore[arg-type]  (None ruled out above)
        o=o,
        router=(router.weight, None, router.bias),
        top_k=router.top_k,
        heads=attn.num_heads,
        kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        sinks=attn.sinks,
        experts=(
            experts.gate_up_proj_blocks,
            experts.gate_up_proj_scales,
            experts.gate_up_proj_bias,
            experts.down_proj_blocks,
            experts.down_proj_scales,
            experts.down_proj_bias,
        ),  # fmt: skip
        alpha=experts.alpha,
        limit=experts.limit,
    )


class NativeBlock(Block):
    """A block whose decode steps run as `ops.decode` plans them (other calls: `Block.forward`)."""

    _plan: decode.DecodePlan | None = None
    _plan_built_at: int | None = None  # `_registrations` when the plan was built

    def __getstate__(self) -> dict:
        """Without the plan: it holds addresses (and a native object) of this block's tensors, so a
        copy or an unpickled block builds its own."""
        state = self.__dict__.copy()
        for name in ("_plan", "_plan_built_at"):
            state.pop(name, None)
        return state

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: CacheProtocol | None = None) -> Tensor:
        plan = self._decode_plan(x, cos, cache)
        if plan is None:
            return super().forward(x, cos, sin, cache)
        assert isinstance(cache, KVCache | QueryRows)  # (checked by _decode_plan)
        layer = self.self_attn.layer_idx

        def update(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Visibility]:
            return cache.update(layer, k, v)

        return decode.step(plan, x, cos, sin, cache.decode_view(layer), update)

    def _decode_plan(self, x: Tensor, cos: Tensor, cache: CacheProtocol | None) -> decode.DecodePlan | None:
        """The plan when this call is a decode step the native path takes, else None."""
        if (
            not isinstance(cache, KVCache | QueryRows)  # a decode step, or a verify pass's rows
            or x.dim() != 3
            or x.shape[1] != 1
            or x.shape[0] > decode.STEP_ROWS
            or x.device.type != "cpu"
            or x.dtype not in ops.DTYPE_CODES
            or cos.dtype != torch.float32
            or cache.dtype != x.dtype
            or (
                torch.is_grad_enabled()
                and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
            )
        ):
            return None
        stale = self._plan_built_at != _registrations or (self._plan is not None and not self._plan.current())
        if stale:  # (a block it cannot take is remembered too)
            weights = _block_weights(self)
            self._plan = None if weights is None else decode.plan(weights)
            self._plan_built_at = _registrations
        return self._plan


_NATIVE_CLASSES: dict[type, type] = {
    nn.Linear: NativeLinear,
    RMSNorm: NativeRMSNorm,
    Attention: NativeAttention,
    Router: NativeRouter,
    Block: NativeBlock,
}


def use_native_kernels(model: nn.Module) -> nn.Module:
    """Route `model`'s linear layers, RMSNorms, attention and routers through `gptoss.ops`, and its
    blocks' decode steps through `gptoss.ops.decode`: every such module is replaced by its native
    subclass (`rebuilt`) in its parent, children first. Returns the model (a new module only when
    `model` itself is one of those types)."""
    for name, child in list(model.named_children()):
        native = use_native_kernels(child)
        if native is not child:
            setattr(model, name, native)
    cls = _NATIVE_CLASSES.get(type(model))
    return model if cls is None else rebuilt(model, cls)
