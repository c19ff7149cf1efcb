"""LoRA: low-rank adapters on attention/MLP linears and on the 3-D expert tensors, applied from outside.

    apply_lora(model, LoRAConfig(rank=16, targets=["self_attn.*", "mlp.experts.*"]))
    ... train: only the adapters require gradients ...
    save_lora(model, "adapter/", base_model="gpt-oss-20b/")
    merge_lora(load_lora(load_model("gpt-oss-20b/"), "adapter/"))   # a plain GptOss again

A target's weight W (used as x @ W, shape (in, out)) gets the delta (alpha / rank) · A @ B with
A (in, rank) random and B (rank, out) zero, so an adapted model starts equal to its base. For the
stacked expert tensors `gate_up_proj` (E, H, 2I) and `down_proj` (E, I, H) every expert has its own
pair, A (E, in, rank) and B (E, rank, out): what PEFT needs `target_parameters` for is a plain
target here. Dropout applies to the adapter's input only, as in PEFT.

Targets are `fnmatch` patterns over names: modules for linears (`model.layers.3.self_attn.q_proj`),
parameters for experts (`model.layers.3.mlp.experts.gate_up_proj`). A pattern also matches any name
that ends in `.` + pattern, so `q_proj`, `self_attn.*` and `mlp.experts.*` work as PEFT users expect.
Only layers' linears and expert tensors are candidates: the embedding and the output head (which
the fused loss reads directly) are not.

An MXFP4 base keeps its packed experts frozen as they are; the experts of layers with an adapter on
them are dequantized to the base dtype (bf16: (H·2I + I·H)·E·2 bytes per layer, 1.59 GB for each of
the 20b's 24 layers), because a packed tensor cannot take a delta. See docs/finetuning.md.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gptoss.checkpoint import _replace_dir, load_model, save_checkpoint
from gptoss.model import Experts, GptOss, grouped_matmul
from gptoss.quant.mxfp4 import MXFP4Experts, dequantize_experts

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "gptoss-lora"
EXPERT_TENSORS = ("gate_up_proj", "down_proj")
DEFAULT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


@dataclass
class LoRAConfig:
    """Rank, scale, dropout and the name patterns that choose what gets an adapter."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be positive, not {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), not {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target pattern")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _init_a(shape: tuple[int, ...], fan_in: int, like: Tensor) -> nn.Parameter:
    """A's initialisation: PEFT's (kaiming-uniform with a = √5), i.e. U(±1/√fan_in); fp32 always."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape, device=like.device, dtype=torch.float32).uniform_(-bound, bound))


def _zeros(shape: tuple[int, ...], like: Tensor) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, device=like.device, dtype=torch.float32))


class LoRALinear(nn.Linear):
    """An nn.Linear plus `lora_A` (rank, in) and `lora_B` (out, rank), PEFT's layout.

    It holds the base's own `weight` and `bias` objects under the same names, so the checkpoint keys
    of the base stay what they were.
    """

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = _init_a((config.rank, self.in_features), self.in_features, base.weight)
        self.lora_B = _zeros((self.out_features, config.rank), base.weight)
        self.lora_config = config
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        delta = self.lora_dropout(x) @ self.lora_A.T.to(x.dtype) @ self.lora_B.T.to(x.dtype)
        return super().forward(x) + delta * self.scaling

    def delta_weight(self) -> Tensor:
        """scaling · B @ A (out, in) in fp32: what merging adds to `weight`."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def adapter_tensors(self) -> dict[str, Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}


class LoRAExperts(Experts):
    """Dense experts with a low-rank delta per expert on `gate_up_proj` and/or `down_proj`.

    The base's parameters are kept (same objects, same names); the adapters are
    `{tensor}_lora_A` (E, in, rank) and `{tensor}_lora_B` (E, rank, out).
    """

    def __init__(self, base: Experts, tensors: Sequence[str], config: LoRAConfig) -> None:
        nn.Module.__init__(self)
        self.gate_up_proj, self.gate_up_proj_bias = base.gate_up_proj, base.gate_up_proj_bias
        self.down_proj, self.down_proj_bias = base.down_proj, base.down_proj_bias
        self.alpha, self.limit = base.alpha, base.limit  # the SwiGLU's, not LoRA's
        self.adapted = tuple(t for t in EXPERT_TENSORS if t in tensors)
        for name in self.adapted:
            weight = getattr(self, name)
            experts, n_in, n_out = weight.shape
            self.register_parameter(f"{name}_lora_A", _init_a((experts, n_in, config.rank), n_in, weight))
            self.register_parameter(f"{name}_lora_B", _zeros((experts, config.rank, n_out), weight))
        self.lora_config = config
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.dropout)

    def project(self, name: str, x: Tensor, expert_of: Tensor, ends: Tensor) -> Tensor:
        """The base projection plus each row's expert's low-rank delta, as grouped GEMMs too."""
        y = super().project(name, x, expert_of, ends)
        if name not in self.adapted:
            return y
        low = grouped_matmul(self.lora_dropout(x), getattr(self, f"{name}_lora_A"), ends)
        return y + grouped_matmul(low, getattr(self, f"{name}_lora_B"), ends) * self.scaling

    def delta_weight(self, name: str) -> Tensor:
        """scaling · A @ B (E, in, out) in fp32 for expert tensor `name`."""
        return torch.bmm(getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")) * self.scaling

    def adapter_tensors(self) -> dict[str, Tensor]:
        return {
            f"{name}.{part}": getattr(self, f"{name}_{part}")
            for name in self.adapted
            for part in ("lora_A", "lora_B")
        }


# ---------------------------------------------------------------------- choosing targets
def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) or fnmatchcase(name, "*." + p) for p in patterns)


def lora_candidates(model: GptOss) -> dict[str, str]:
    """Every name a target pattern can select → its kind: "linear" (a module) or "experts" (a tensor)."""
    names = {}
    for name, module in model.named_modules():
        if not name.startswith("model.layers."):
            continue
        if isinstance(module, nn.Linear):
            names[name] = "linear"
        elif isinstance(module, Experts):
            names.update({f"{name}.{t}": "experts" for t in EXPERT_TENSORS})
    return names


def resolve_targets(model: GptOss, patterns: Sequence[str]) -> list[str]:
    """The candidate names `patterns` select; a ValueError listing the candidates when none is."""
    candidates = lora_candidates(model)
    chosen = [n for n in candidates if _matches(n, patterns)]
    if not chosen:
        examples = sorted({n.split(".", 3)[-1] for n in candidates})
        raise ValueError(
            f"LoRA targets {list(patterns)} match nothing in this model; the candidates in each "
            f"layer (model.layers.N.…) are: {', '.join(examples)}"
        )
    return chosen


# ---------------------------------------------------------------------- applying, merging
def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def apply_lora(model: GptOss, config: LoRAConfig) -> list[str]:
    """Freeze `model` and add adapters on the targets `config` selects, in place; return the targets.

    MXFP4 experts that get an adapter are dequantized first (to the dtype of their biases).
    """
    kinds = lora_candidates(model)
    targets = resolve_targets(model, config.targets)
    model.requires_grad_(False)
    expert_tensors: dict[str, list[str]] = {}  # experts module → its adapted tensors
    for target in targets:
        if kinds[target] == "linear":
            _replace(model, target, LoRALinear(model.get_submodule(target), config))
        else:
            owner, _, tensor = target.rpartition(".")
            expert_tensors.setdefault(owner, []).append(tensor)
    dequantized_layers, dequantized_bytes = 0, 0
    for name, tensors in expert_tensors.items():
        experts = model.get_submodule(name)
        if isinstance(experts, MXFP4Experts):
            experts = experts.to_dense(model.config, experts.gate_up_proj_bias.dtype)
            dequantized_layers += 1
            dequantized_bytes += sum(
                w.numel() * w.element_size() for w in (experts.gate_up_proj, experts.down_proj)
            )
        _replace(model, name, LoRAExperts(experts, tensors, config))
    if dequantized_layers:
        log.info(
            "LoRA: dequantized the MXFP4 experts of %d layers to put adapters on them (%.2f GiB)",
            dequantized_layers,
            dequantized_bytes / 2**30,
        )
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear | LoRAExperts)}


@torch.no_grad()
def merge_lora(model: GptOss) -> GptOss:
    """Fold every adapter into its base weight and drop the adapters, in place; return `model`.

    The result is a plain GptOss (nn.Linear and Experts modules, trainable again). If some layers'
    experts were dequantized for their adapters and others are still MXFP4, those are dequantized
    too (exactly), so the model saves as one consistent checkpoint; `mxfp4.quantize_experts`
    re-quantizes it (rounding the merged weights).
    """
    for name, module in lora_modules(model).items():
        with torch.device("meta"):  # the base tensors are moved in, not allocated again
            plain = (
                nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                if isinstance(module, LoRALinear)
                else Experts(model.config)
            )
        if isinstance(module, LoRALinear):
            plain.weight, plain.bias = module.weight, module.bias
            plain.weight.add_(module.delta_weight().to(plain.weight.dtype))
        else:
            for tensor in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
                setattr(plain, tensor, getattr(module, tensor))
            for tensor in module.adapted:
                weight = getattr(plain, tensor)
                weight.add_(module.delta_weight(tensor).to(weight.dtype))
        _replace(model, name, plain)
    if len({type(m) for m in model.modules() if isinstance(m, Experts)}) > 1:
        dequantize_experts(model)
    return model.requires_grad_(True)


# ---------------------------------------------------------------------- saving, loading
def lora_state_dict(model: nn.Module, parameters: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Adapter tensors under `{target}.lora_A` / `{target}.lora_B` (target: module or expert tensor).

    `parameters` (parameter name → tensor) gives the values instead of the modules: the full
    tensors gathered from a model sharded by FSDP, whose own parameters are shards.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        f"{name}.{key}": (tensor if parameters is None else parameters[names[id(tensor)]]).detach()
        for name, module in lora_modules(model).items()
        for key, tensor in module.adapter_tensors().items()
    }


def save_lora(
    model: GptOss,
    directory: str | Path,
    base_model: str | None = None,
    parameters: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write the adapters alone: `adapter_model.safetensors` + `adapter_config.json` (atomic).

    `base_model` (a path or name) is recorded for `gptoss merge` users; rank, alpha, dropout and the
    target patterns come from the adapters themselves; `parameters`, the adapters' values when the
    model's own are shards (see `lora_state_dict`).
    """
    modules = lora_modules(model).values()
    if not modules:
        raise ValueError("the model has no LoRA adapters to save (apply_lora first)")
    settings = {(m.lora_config.rank, m.lora_config.alpha, m.lora_config.dropout) for m in modules}
    if len(settings) > 1:
        raise ValueError(
            f"adapters with different (rank, alpha, dropout) {sorted(settings)} cannot share a file"
        )
    (rank, alpha, dropout), patterns = settings.pop(), []
    for module in modules:
        patterns += [p for p in module.lora_config.targets if p not in patterns]
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model, parameters).items()}
    directory = Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": ADAPTER_FORMAT,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_patterns": patterns,
        "targets": sorted({k.rsplit(".", 1)[0] for k in state}),
        "base_model_name_or_path": base_model,
        "base_model_config": model.config.to_hf(),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_lora_config(directory: str | Path) -> tuple[LoRAConfig, dict[str, Any]]:
    """The LoRAConfig of an adapter directory and its whole `adapter_config.json`."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    meta = json.loads(path.read_text())
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not a gptoss LoRA adapter (format {meta.get('format')!r})")
    config = LoRAConfig(
        rank=meta["r"], alpha=meta["lora_alpha"], dropout=meta["lora_dropout"], targets=meta["targets"]
    )
    return config, meta


@torch.no_grad()
def load_lora(model: GptOss, directory: str | Path) -> GptOss:
    """Add the adapters saved in `directory` to the base `model` (as `apply_lora` does); return it."""
    config, _ = read_lora_config(directory)  # its targets: the exact names the adapters were on
    absent = sorted(set(config.targets) - set(lora_candidates(model)))
    if absent:
        raise ValueError(f"{directory}: this model has no {', '.join(absent[:4])} — another base?")
    apply_lora(model, config)
    saved = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    expected = {
        f"{name}.{key}": tensor
        for name, module in lora_modules(model).items()
        for key, tensor in module.adapter_tensors().items()
    }
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{directory}: adapter tensors do not match (missing {missing}, unexpected {unexpected})"
        )
    for key, target in expected.items():
        if saved[key].shape != target.shape:
            raise ValueError(
                f"{directory}: {key} has shape {tuple(saved[key].shape)}, the base model needs "
                f"{tuple(target.shape)} — was the adapter trained on another base?"
            )
        target.copy_(saved[key])
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Load the base model (checkpoint directory or preset), merge the adapter into it, save to `out`.

    The merged checkpoint keeps the base's dtype; its logits equal base + adapter up to that dtype's
    rounding of the merged weights.
    """
    model = load_model(base)
    return save_checkpoint(merge_lora(load_lora(model, adapter)), out)
