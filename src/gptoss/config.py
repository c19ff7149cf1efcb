"""Model configuration: one typed dataclass, the named presets, and the arithmetic derived from it.

Every number about a model (parameter counts, weight memory, KV-cache size, FLOPs) is computed here
from the config alone, so nothing else in the package restates a shape.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# An MXFP4 block: 32 four-bit codes (16 bytes) plus one shared exponent byte.
MXFP4_BLOCK = 32
MXFP4_BYTES_PER_BLOCK = 17

# The checkpoint bundled with the package (src/gptoss/models/), what commands load by default.
DEFAULT_MODEL = "gptoss-nano"

SLIDING = "sliding_attention"
FULL = "full_attention"


_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_experts_per_tok",
    "sliding_window",
    "max_position_embeddings",
    "rope_original_max_position_embeddings",
)
_NUMBERS = ("rope_theta", "rope_scaling_factor", "rms_norm_eps", "swiglu_alpha", "swiglu_limit")
# What every gpt_oss config.json states (the rest has defaults).
_REQUIRED_HF = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of one gpt-oss model.

    `num_local_experts == 0` means a dense member: every block has one clamped-SwiGLU MLP of width
    `intermediate_size` instead of routed experts.
    """

    vocab_size: int = 201088
    # None: one embedding/head row per token id. A number: the model keeps rows for only that many
    # ids (a trimmed vocabulary, listed by the model's `token_ids` buffers) yet still reads and
    # scores ids of the whole `vocab_size` space; ids without a row get no probability.
    vocab_rows: int | None = None
    hidden_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2880
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    # None: even layers slide, odd layers attend to everything (the released pattern).
    layer_types: tuple[str, ...] | None = None
    max_position_embeddings: int = 131072
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    eos_token_id: int = 200002
    pad_token_id: int = 199999
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.layer_types is None:
            pattern = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", pattern)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    def validate(self) -> None:
        wrong_type = [
            f"{name} must be a positive integer, not {value!r}"
            for name in _POSITIVE_INTS
            if type(value := getattr(self, name)) is not int or value < 1
        ] + [
            f"{name} must be a number, not {value!r}"
            for name in _NUMBERS
            if type(value := getattr(self, name)) not in (int, float)
        ]
        if type(self.num_local_experts) is not int:
            wrong_type.append(f"num_local_experts must be an integer, not {self.num_local_experts!r}")
        if wrong_type:  # the checks below would fail on these with a bare TypeError
            raise ValueError("invalid ModelConfig: " + "; ".join(wrong_type))
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            problems.append(f"unknown layer_types {sorted(unknown)}; use {SLIDING!r} or {FULL!r}")
        if self.num_local_experts < 0:
            problems.append("num_local_experts must be >= 0 (0 means a dense MLP)")
        if self.is_moe and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            problems.append(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must lie in 1..num_local_experts "
                f"({self.num_local_experts})"
            )
        if self.vocab_rows is not None and not 0 < self.vocab_rows <= self.vocab_size:
            problems.append(f"vocab_rows ({self.vocab_rows}) must lie in 1..vocab_size ({self.vocab_size})")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ derived shape facts
    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def embedding_rows(self) -> int:
        """Rows of the embedding and of the output head (fewer than `vocab_size` when trimmed)."""
        return self.vocab_size if self.vocab_rows is None else self.vocab_rows

    @property
    def experts_per_token(self) -> int:
        """Expert MLPs a token passes through (1 for a dense member)."""
        return self.num_experts_per_tok if self.is_moe else 1

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def num_sliding_layers(self) -> int:
        return sum(t == SLIDING for t in self.layer_types)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes`; a new layer count re-derives the default layer pattern."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = None
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ parameter counts
    def attention_params(self) -> int:
        """One attention block: q/k/v/o with biases, plus one sink logit per head."""
        h = self.hidden_size
        return (
            (h * self.q_dim + self.q_dim)
            + 2 * (h * self.kv_dim + self.kv_dim)
            + (self.q_dim * h + h)
            + self.num_attention_heads
        )

    def expert_params(self) -> int:
        """One clamped-SwiGLU MLP: fused gate/up projection and down projection, with biases."""
        h, i = self.hidden_size, self.intermediate_size
        return (h * 2 * i + 2 * i) + (i * h + h)

    def router_params(self) -> int:
        return self.num_local_experts * self.hidden_size + self.num_local_experts if self.is_moe else 0

    def _block_params(self, experts: int) -> int:
        norms = 2 * self.hidden_size
        return self.attention_params() + norms + self.router_params() + experts * self.expert_params()

    def embedding_params(self) -> int:
        return self.embedding_rows * self.hidden_size

    def total_params(self) -> int:
        stored_experts = self.num_local_experts if self.is_moe else 1
        unembedding = 0 if self.tie_word_embeddings else self.embedding_rows * self.hidden_size
        return (
            self.embedding_params()
            + self.num_hidden_layers * self._block_params(stored_experts)
            + self.hidden_size  # final norm
            + unembedding
        )

    def active_params(self) -> int:
        """Parameters one token touches, not counting the embedding table (a lookup, not a matmul).

        The output head is counted even when tied to the embedding, because it is a real matmul.
        """
        return (
            self.num_hidden_layers * self._block_params(self.experts_per_token)
            + self.hidden_size
            + self.embedding_rows * self.hidden_size
        )

    def expert_weight_elements(self) -> int:
        """Elements of all expert weight matrices (the tensors MXFP4 packs; biases excluded)."""
        if not self.is_moe:
            return 0
        h, i = self.hidden_size, self.intermediate_size
        return self.num_hidden_layers * self.num_local_experts * 3 * h * i

    # ------------------------------------------------------------------ memory
    def weight_bytes(self, dtype_bytes: int = 2, mxfp4_experts: bool = False) -> int:
        """Bytes of all weights at `dtype_bytes` each; optionally expert matrices packed as MXFP4."""
        total = self.total_params() * dtype_bytes
        if mxfp4_experts and self.is_moe:
            experts = self.expert_weight_elements()
            total += experts // MXFP4_BLOCK * MXFP4_BYTES_PER_BLOCK - experts * dtype_bytes
        return total

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V for one token in every layer (what a cache without sliding-window reuse stores)."""
        return self.num_hidden_layers * 2 * self.kv_dim * dtype_bytes

    def kv_cache_bytes(self, context: int | None = None, dtype_bytes: int = 2) -> int:
        """KV cache for one sequence of `context` tokens; sliding layers keep only their window."""
        context = self.max_position_embeddings if context is None else context
        per_layer_token = 2 * self.kv_dim * dtype_bytes
        full = (self.num_hidden_layers - self.num_sliding_layers) * context
        sliding = self.num_sliding_layers * min(context, self.sliding_window)
        return (full + sliding) * per_layer_token

    # ------------------------------------------------------------------ compute
    def flops_per_token(self, context: int = 1) -> int:
        """Forward FLOPs for one token that attends to `context` earlier positions (itself included).

        2 FLOPs per active weight or bias of the projections (the usual 2N), plus QK^T and AV over
        the attended positions (a sliding layer attends to at most its window).
        """
        norms_and_sinks = self.num_hidden_layers * (2 * self.hidden_size + self.num_attention_heads)
        matmul = self.active_params() - norms_and_sinks - self.hidden_size
        full = self.num_hidden_layers - self.num_sliding_layers
        attended = full * context + self.num_sliding_layers * min(context, self.sliding_window)
        return 2 * matmul + 4 * self.q_dim * attended

    # ------------------------------------------------------------------ Hugging Face config.json
    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict that transformers' GptOssForCausalLM reads.

        A dense member is written as a one-expert, top-1 MoE (softmax over a single logit is 1, so it
        computes exactly the dense MLP) so that transformers can load it; `gptoss_dense` marks it.
        """
        hf: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "num_local_experts": self.num_local_experts if self.is_moe else 1,
            "num_experts_per_tok": self.num_experts_per_tok if self.is_moe else 1,
            "experts_per_token": self.num_experts_per_tok if self.is_moe else 1,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "initial_context_length": self.rope_original_max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "truncate": False,
            },
            "rms_norm_eps": self.rms_norm_eps,
            "swiglu_alpha": self.swiglu_alpha,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "output_router_logits": False,
            "use_cache": True,
        }
        if not self.is_moe:
            hf["gptoss_dense"] = True
        if self.vocab_rows is not None:
            # transformers sizes the embedding from vocab_size, so it gets the row count; the id
            # space the rows map into (tensor `model.token_ids`) is kept beside it.
            hf["vocab_size"] = self.vocab_rows
            hf["gptoss_token_space"] = self.vocab_size
        return hf

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "custom") -> ModelConfig:
        """Build a config from a Hugging Face `config.json` dict (legacy or current rope keys)."""
        model_type = hf.get("model_type")
        if model_type != "gpt_oss":
            raise ValueError(
                f"config.json has model_type {model_type!r}; gptoss loads only 'gpt_oss' checkpoints"
            )
        for key in _REQUIRED_HF:
            if type(hf.get(key)) is not int or hf[key] < 1:
                found = "it is missing" if key not in hf else f"not {hf[key]!r}"
                raise ValueError(f"config.json needs {key!r} as a positive integer ({found})")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "yarn"))
        if rope_type != "yarn":
            raise ValueError(f"rope type {rope_type!r} is not supported; gpt-oss uses 'yarn'")
        defaults = cls()
        dense = bool(hf.get("gptoss_dense"))
        experts = hf.get("num_local_experts", defaults.num_local_experts)
        top_k = hf.get("num_experts_per_tok", hf.get("experts_per_token", defaults.num_experts_per_tok))
        rows = hf.get("vocab_size", defaults.vocab_size)
        space = hf.get("gptoss_token_space")
        return cls(
            vocab_size=space or rows,
            vocab_rows=rows if space else None,
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            num_local_experts=0 if dense else experts,
            num_experts_per_tok=defaults.num_experts_per_tok if dense else top_k,
            sliding_window=hf.get("sliding_window") or defaults.sliding_window,
            layer_types=tuple(hf["layer_types"]) if hf.get("layer_types") else None,
            max_position_embeddings=hf.get("max_position_embeddings", defaults.max_position_embeddings),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", defaults.rope_theta)),
            rope_scaling_factor=rope.get("factor", defaults.rope_scaling_factor),
            rope_original_max_position_embeddings=rope.get(
                "original_max_position_embeddings",
                hf.get("initial_context_length", defaults.rope_original_max_position_embeddings),
            ),
            rope_beta_fast=rope.get("beta_fast", defaults.rope_beta_fast),
            rope_beta_slow=rope.get("beta_slow", defaults.rope_beta_slow),
            rms_norm_eps=hf.get("rms_norm_eps", defaults.rms_norm_eps),
            swiglu_alpha=hf.get("swiglu_alpha", defaults.swiglu_alpha),
            swiglu_limit=hf.get("swiglu_limit", defaults.swiglu_limit),
            tie_word_embeddings=hf.get("tie_word_embeddings", defaults.tie_word_embeddings),
            initializer_range=hf.get("initializer_range", defaults.initializer_range),
            eos_token_id=_first_id(hf.get("eos_token_id"), defaults.eos_token_id),
            pad_token_id=_first_id(hf.get("pad_token_id"), defaults.pad_token_id),
            name=name,
        )

    @classmethod
    def from_dir(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a checkpoint directory needs the Hugging Face config.json beside "
                "its *.safetensors files"
            )
        try:
            hf = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}; re-copy it from the model's source") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{path} holds a JSON {type(hf).__name__}, not the object of a model config")
        try:
            return cls.from_hf(hf, name=Path(directory).name)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        except (TypeError, AttributeError, KeyError) as exc:  # a field of the wrong JSON type
            raise ValueError(
                f"{path} has a field of the wrong type ({exc}); compare it with the model's original"
            ) from None

    # ------------------------------------------------------------------ summary
    def summary(self, context: int | None = None) -> dict[str, Any]:
        """Everything `gptoss info` reports, as plain JSON-ready values."""
        context = self.max_position_embeddings if context is None else context
        return {
            "name": self.name,
            "kind": "moe" if self.is_moe else "dense",
            "layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "attention_heads": self.num_attention_heads,
            "kv_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "experts": self.num_local_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "vocab_rows": self.embedding_rows,
            "context": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "sliding_layers": self.num_sliding_layers,
            "total_params": self.total_params(),
            "active_params": self.active_params(),
            "embedding_params": self.embedding_params(),
            "weight_bytes_bf16": self.weight_bytes(2),
            "weight_bytes_mxfp4_experts": self.weight_bytes(2, mxfp4_experts=True),
            "kv_cache_bytes_per_token_bf16": self.kv_cache_bytes_per_token(2),
            "kv_cache_context": context,
            "kv_cache_bytes_bf16": self.kv_cache_bytes(context, 2),
            "kv_cache_bytes_bf16_no_window": self.kv_cache_bytes_per_token(2) * context,
            "flops_per_token_first": self.flops_per_token(1),
            "flops_per_token_at_context": self.flops_per_token(context),
        }


def _first_id(value: Any, default: int) -> int:
    if value is None:
        return default
    return int(value[0]) if isinstance(value, list) else int(value)


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, ModelConfig] = {
    # The released shapes.
    "gpt-oss-20b": ModelConfig(name="gpt-oss-20b"),
    "gpt-oss-120b": ModelConfig(name="gpt-oss-120b", num_hidden_layers=36, num_local_experts=128),
    # Our dense member: the released attention design with one wide clamped-SwiGLU MLP per block.
    "gpt-oss-15b": ModelConfig(
        name="gpt-oss-15b",
        hidden_size=5120,
        num_hidden_layers=40,
        intermediate_size=17920,
        num_local_experts=0,
    ),
    # Our MoE flagship: 48 experts of width 4096, 8 active per token.
    "gpt-oss-90b": ModelConfig(
        name="gpt-oss-90b",
        hidden_size=4096,
        num_hidden_layers=36,
        intermediate_size=4096,
        num_local_experts=48,
        num_experts_per_tok=8,
    ),
    # A few million block parameters (plus the full-vocabulary embeddings) for CPU work and tests.
    "gpt-oss-nano": ModelConfig(
        name="gpt-oss-nano",
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=256,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
}


def get_config(name: str) -> ModelConfig:
    """The preset called `name` (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
