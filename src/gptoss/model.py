"""The gpt-oss transformer on one device, in reading order.

RMSNorm → rotary (YaRN) → attention (sinks, sliding window, GQA) → dense MLP / MoE → block → model.
Module and parameter names equal the Hugging Face checkpoint keys (`model.layers.N.self_attn.q_proj`,
`model.layers.N.mlp.experts.gate_up_proj`, ...), so loading a checkpoint is a name lookup.
Caches, quantization, parallelism, compilation and the id map of a trimmed vocabulary
(`gptoss.trimmed_vocab`) are applied from outside this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptoss.config import SLIDING, ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalise in fp32 whatever the activation dtype: bf16 sums of squares lose too much.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x32).to(x.dtype)


# ---------------------------------------------------------------------- rotary position embedding
def yarn_inv_freq(config: ModelConfig) -> tuple[Tensor, float]:
    """YaRN-scaled inverse frequencies (head_dim/2,) and the attention factor that scales cos/sin.

    Dimensions that rotate fast (more than beta_fast turns over the original context) keep their
    frequency; slow ones (under beta_slow turns) are interpolated by `factor`; a linear ramp joins them.
    """
    dim, base, factor = config.head_dim, config.rope_theta, config.rope_scaling_factor
    original_ctx = config.rope_original_max_position_embeddings

    def correction_dim(turns: float) -> float:
        return dim * math.log(original_ctx / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = max(correction_dim(config.rope_beta_fast), 0.0)
    high = min(correction_dim(config.rope_beta_slow), dim - 1.0)
    if low == high:
        high += 0.001
    cpu = torch.device("cpu")  # a real tensor even while the model is built on the meta device
    freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=cpu) / dim)
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device=cpu) - low) / (high - low)
    extrapolate = 1 - ramp.clamp(0, 1)
    inv_freq = (1.0 / (factor * freqs)) * (1 - extrapolate) + (1.0 / freqs) * extrapolate
    attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # A plain attribute, not a buffer: `model.to(torch.bfloat16)` must not round the frequencies.
        self.inv_freq, self.attention_factor = yarn_inv_freq(config)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (B, T, head_dim/2) in fp32 for integer positions (B, T)."""
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        angles = position_ids[..., None].float() * self.inv_freq
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX "halves" rotation of x (B, T, heads, D) by cos/sin (B, T, D/2), computed in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# ---------------------------------------------------------------------- attention
@dataclass(frozen=True)
class Visibility:
    """Which keys each query may attend to, from positions alone (no (T, S) object until PyTorch's
    attention asks for its mask): query t of row b sits at position queries[b, t]; key s at
    keys[b, s] (negative: an empty slot), or at position s when keys is None. A query at position q
    sees a key at p >= 0 when 0 <= q - p < window (no window: every earlier key)."""

    queries: Tensor  # (B or 1, T) int64
    keys: Tensor | None = None  # (B or 1, S) int64
    window: int | None = None
    # masks built, by length: a cache shares one Visibility between the layers of a kind in a pass
    _masks: dict[int, Tensor] = field(default_factory=dict, compare=False, repr=False)

    def mask(self, length: int) -> Tensor:
        """The (B or 1, 1, T, length) boolean mask, True where query t may see key s (built once)."""
        if length not in self._masks:
            self._masks[length] = self._build(length)
        return self._masks[length]

    def _build(self, length: int) -> Tensor:
        query = self.queries[:, None, :, None]
        keys = torch.arange(length, device=query.device) if self.keys is None else self.keys[:, None, None, :]
        distance = query - keys
        seen = distance >= 0
        if self.keys is not None:
            seen = seen & (keys >= 0)
        if self.window is not None:
            seen = seen & (distance < self.window)
        return seen


class KVCache(Protocol):
    """What attention needs from a cache (the inference engine provides implementations)."""

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Visibility]:
        """Store the new keys/values (B, KVH, T, D) of layer `layer_idx`.

        Returns the keys and values to attend over (B, KVH, S, D) and which of them each query may
        see (causality and the layer's window applied).
        """
        ...


def causal(length: int, window: int | None, device: torch.device) -> Visibility:
    """Each of `length` tokens sees itself and earlier ones, at most `window` in all."""
    return Visibility(torch.arange(length, device=device)[None], None, window)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_window if config.layer_types[layer_idx] == SLIDING else None
        self.q_proj = nn.Linear(config.hidden_size, config.q_dim)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_dim)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_dim)
        self.o_proj = nn.Linear(config.q_dim, config.hidden_size)
        # One learned logit per head that joins the softmax as an extra column with no value:
        # it lets a head put weight on "nothing" instead of being forced onto some token.
        self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        q, k = self.rotate(q, k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, KVH, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is None:
            visible = causal(T, self.window, x.device)
        else:
            k, v, visible = cache.update(self.layer_idx, k, v)
        out = self.attend(q, k, v, visible)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of x (B, T, hidden), heads side by side (what decode kernels fuse)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def rotate(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Rotary embedding of queries and keys (B, T, heads, D) (what decode kernels replace)."""
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, visible: Visibility) -> Tensor:
        """Queries over keys and values with this layer's sinks (what decode kernels replace)."""
        return sink_attention(q, k, v, visible, self.sinks)


def sink_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    visible: Visibility,
    sinks: Tensor,
    probs_dtype: torch.dtype | None = None,
) -> Tensor:
    """Grouped-query attention with a per-head sink column, softmax in fp32, the probabilities
    rounded to `probs_dtype` (default: v's) before they weight the values.

    q (B, H, T, D); k, v (B, KVH, S, D); which keys each query sees (B or 1 rows); sinks (H,).
    """
    B, H, T, D = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    group = H // kv_heads
    qg = q.view(B, kv_heads, group, T, D)  # query heads sharing one KV head sit together
    # Contiguous keys and values: a cache may hand over a strided view (a slice of a longer buffer,
    # or blocks gathered with padding), and fp32 BLAS rounds differently for different strides; the
    # numbers must not depend on where a cache keeps them.
    scores = torch.einsum("bkgtd,bksd->bkgts", qg.float(), k.float().contiguous()) / math.sqrt(D)
    scores = scores.masked_fill(~visible.mask(S)[:, :, None], float("-inf"))
    sink = sinks.float().view(1, kv_heads, group, 1, 1).expand(B, -1, -1, T, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :S]
    out = torch.einsum("bkgts,bksd->bkgtd", probs.to(probs_dtype or v.dtype).to(v.dtype), v.contiguous())
    return out.reshape(B, H, T, D)


# ---------------------------------------------------------------------- MLPs
def clamped_swiglu(gate_up: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's SwiGLU on fused (..., 2I) columns, gate = even columns, linear = odd columns."""
    gate, linear = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


class MLP(nn.Module):
    """The dense members' MLP: the same clamped SwiGLU as one expert, without routing."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(clamped_swiglu(self.gate_up_proj(x), self.alpha, self.limit))


class Router(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_local_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For tokens x (N, H): router logits (N, E), chosen experts (N, k), their weights (N, k)."""
        logits = self.project(x)
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1)
        # softmax over the chosen k only, as the reference does
        return logits, top_idx, torch.softmax(top_logits.float(), dim=-1).to(x.dtype)

    def project(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast gives a matmul of x (the grouped GEMM is not on autocast's list)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_matmul(x: Tensor, weights: Tensor, ends: Tensor) -> Tensor:
    """Rows x (M, K) times weights (G, K, N), rows ends[g-1]:ends[g] by group g's (one grouped GEMM).

    The GEMM wants rows of whole 16-byte units, so K and N are padded with zeros to multiples of 8
    where they are not (small test shapes, LoRA ranks): the products and sums are the same."""
    dtype = autocast_dtype(x)
    x, weights = x.to(dtype), weights.to(dtype)
    K, N = weights.shape[1:]
    if K % 8:
        x, weights = F.pad(x, (0, -K % 8)), F.pad(weights, (0, 0, 0, -K % 8))
    if N % 8:
        weights = F.pad(weights, (0, -N % 8))
    return F.grouped_mm(x, weights, offs=ends)[:, :N]


class Experts(nn.Module):
    """E clamped-SwiGLU MLPs stored as stacked tensors in the Hugging Face layout (x @ W)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size  # noqa: E741
        self.gate_up_proj = nn.Parameter(torch.zeros(E, H, 2 * I))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.down_proj = nn.Parameter(torch.zeros(E, I, H))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H))
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    def project(self, name: str, x: Tensor, expert_of: Tensor, ends: Tensor) -> Tensor:
        """Rows x (M, in) grouped by expert through stacked weight `name` (E, in, out) and its bias:
        rows ends[e-1]:ends[e] belong to expert e, whose index every row has in expert_of (M,)."""
        weight, bias = getattr(self, name), getattr(self, f"{name}_bias")
        return grouped_matmul(x, weight, ends) + bias[expert_of]

    def forward(self, x: Tensor, expert_idx: Tensor, expert_weight: Tensor) -> Tensor:
        """x (N, H); expert_idx, expert_weight (N, k) → weighted sum of the chosen experts (N, H).

        The N·k (token, expert) pairs are sorted by expert and every expert multiplies its rows in
        one grouped GEMM: no loop over experts, no count read back to the host (no sync, no graph
        break under compile), each expert's weight gradient written once."""
        N, k = expert_idx.shape
        flat_expert = expert_idx.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of, expert_of = order // k, flat_expert[order]
        counts = torch.bincount(flat_expert, minlength=self.gate_up_proj_bias.shape[0])
        ends = counts.cumsum(0).to(torch.int32)
        h = clamped_swiglu(self.project("gate_up_proj", x[token_of], expert_of, ends), self.alpha, self.limit)
        y = self.project("down_proj", h, expert_of, ends)
        weight_sorted = expert_weight.reshape(-1)[order]
        return torch.zeros_like(x).index_add_(0, token_of, y * weight_sorted[:, None])


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)

    def forward(self, x: Tensor) -> Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        _, expert_idx, expert_weight = self.router(flat)
        return self.experts(flat, expert_idx, expert_weight).view(B, T, H)


# ---------------------------------------------------------------------- block and model
class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe else MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embedding, blocks and final norm: the `model.` prefix of checkpoint keys."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.embedding_rows, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: Tensor, position_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        return self.norm(x)


class GptOss(nn.Module):
    """A gpt-oss causal language model: token ids (B, T) → next-token logits (B, T, vocab).

    With a trimmed vocabulary (`config.vocab_rows`) the ids and logits are those of the embedding's
    rows until `gptoss.trimmed_vocab.trim_vocabulary` maps them onto token ids (loaders do)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        # One row per token id; with `config.vocab_rows`, per kept id (`gptoss.trimmed_vocab`).
        self.lm_head: nn.Module = nn.Linear(config.hidden_size, config.embedding_rows, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: Tensor, position_ids: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """Logits for every position. Without `position_ids`, positions are 0..T-1 for every row."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, cache))

    def hidden_states(
        self, input_ids: Tensor, position_ids: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """The final hidden states (B, T, hidden) that the output head turns into logits (a training
        loss reads them together with `lm_head.weight`, never forming the whole logits)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.model(input_ids, position_ids, cache)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random initialisation: normal(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.fill_(1.0)
            elif name.endswith("bias") and "router" not in name:
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)
