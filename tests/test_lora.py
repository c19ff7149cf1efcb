"""LoRA: targets by pattern, frozen base, per-expert adapters, merge, save/load, MXFP4 bases."""

import copy
import json

import pytest
import torch
from torch import nn

from conftest import random_model, tiny_config
from gptoss.checkpoint import load_checkpoint, save_checkpoint
from gptoss.model import Experts
from gptoss.quant.mxfp4 import MXFP4Experts, quantize_experts
from gptoss.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    LoRAExperts,
    LoRALinear,
    apply_lora,
    load_lora,
    lora_candidates,
    lora_modules,
    lora_state_dict,
    merge_lora,
    resolve_targets,
    save_lora,
)

ALL = ["self_attn.*", "mlp.experts.*"]


# One thread for every test here (the bitwise comparisons need equal thread counts everywhere).
pytestmark = pytest.mark.usefixtures("one_thread")


def ids(seed: int = 0, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, 320, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_adapters(model: nn.Module, scale: float = 0.2, seed: int = 1) -> None:
    """Give every adapter a visible delta (B starts at zero, which would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def test_patterns_select_linears_and_expert_tensors():
    model = random_model(tiny_config())
    candidates = lora_candidates(model)
    assert candidates["model.layers.0.self_attn.q_proj"] == "linear"
    assert candidates["model.layers.2.mlp.experts.down_proj"] == "experts"
    assert not any(name.startswith(("lm_head", "model.embed")) for name in candidates)  # never adapted
    assert resolve_targets(model, ["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    assert len(resolve_targets(model, ALL)) == 3 * (4 + 2)
    assert resolve_targets(model, ["model.layers.1.mlp.experts.gate_up_proj"]) == [
        "model.layers.1.mlp.experts.gate_up_proj"
    ]
    with pytest.raises(ValueError, match="match nothing.*self_attn.q_proj"):
        resolve_targets(model, ["attn.query"])
    dense = random_model(tiny_config(num_local_experts=0))
    assert resolve_targets(dense, ["mlp.*"])[:2] == [
        "model.layers.0.mlp.gate_up_proj",
        "model.layers.0.mlp.down_proj",
    ]


def test_adapted_model_starts_equal_and_only_adapters_get_gradients():
    base = random_model(tiny_config())
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # B = 0: exactly the base

    model.train()
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), ids(1).flatten()).backward()
    adapters = {n for n, p in model.named_parameters() if "lora_" in n}
    assert len(adapters) == 2 * 3 * (4 + 2)
    for name, param in model.named_parameters():
        if name in adapters:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    # With B = 0 only B's gradient is nonzero at the start (A's flows through B); every B gets one.
    for name, param in model.named_parameters():
        if name.endswith("lora_B"):
            assert param.grad.abs().sum() > 0, name


def test_merge_equals_base_plus_adapter_in_logits(tmp_path):
    model = random_model(tiny_config())
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=ALL))
    randomize_adapters(model)
    model.eval()  # dropout off
    x = ids()
    with torch.no_grad():
        adapted = model(x)
        merged_model = merge_lora(copy.deepcopy(model))
        merged = merged_model(x)
    assert not lora_modules(merged_model)
    assert {type(m) for m in merged_model.modules()} >= {nn.Linear, Experts}
    assert all(p.requires_grad for p in merged_model.parameters())
    # fp32: x @ (W + s·AB) and x @ W + s·(x @ A) @ B differ by rounding only.
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    base = random_model(tiny_config())
    with torch.no_grad():
        assert (base(x) - adapted).abs().max() > 1e-2  # the adapters did change the model

    save_checkpoint(merged_model, tmp_path / "merged")  # a plain checkpoint: loads like any other
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "merged")(x), merged, rtol=0, atol=0)


def test_expert_adapters_give_each_expert_its_own_delta():
    config = tiny_config()
    model = random_model(config)
    base_experts = model.model.layers[0].mlp.experts
    reference = copy.deepcopy(base_experts)
    apply_lora(
        model, LoRAConfig(rank=2, alpha=2, targets=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    )
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LoRAExperts)
    assert experts.gate_up_proj is base_experts.gate_up_proj  # the base tensor itself, frozen
    assert experts.gate_up_proj_lora_A.shape == (4, 64, 2)
    assert experts.gate_up_proj_lora_B.shape == (4, 2, 128)
    assert experts.down_proj_lora_A.shape == (4, 64, 2)
    assert experts.down_proj_lora_B.shape == (4, 2, 64)

    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    route = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]] * 2)  # every expert gets tokens
    weight = torch.full((8, 2), 0.5)
    with torch.no_grad():
        before = experts(x, route, weight)
        torch.testing.assert_close(before, reference(x, route, weight), rtol=0, atol=0)
        experts.gate_up_proj_lora_B[2].normal_(0, 0.5)  # a delta on expert 2 only
        experts.down_proj_lora_B[2].normal_(0, 0.5)
        after = experts(x, route, weight)
        uses_2 = (route == 2).any(dim=1)
        assert (after[uses_2] - before[uses_2]).abs().amin(dim=1).gt(0).all()
        torch.testing.assert_close(after[~uses_2], before[~uses_2], rtol=0, atol=0)
        # The same as a plain Experts whose expert-2 weights got s·A₂B₂.
        for name in ("gate_up_proj", "down_proj"):
            getattr(reference, name)[2] += experts.delta_weight(name)[2]
        torch.testing.assert_close(after, reference(x, route, weight), rtol=1e-5, atol=1e-5)


def test_adapters_save_alone_and_load_onto_a_fresh_base(tmp_path):
    config = LoRAConfig(rank=4, alpha=16, dropout=0.05, targets=["q_proj", "v_proj", "mlp.experts.down_proj"])
    model = random_model(tiny_config())
    targets = apply_lora(model, config)
    randomize_adapters(model)
    out = save_lora(model, tmp_path / "adapter", base_model="tiny-base")

    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    assert meta["r"] == 4 and meta["lora_alpha"] == 16 and meta["lora_dropout"] == 0.05
    assert meta["target_patterns"] == ["q_proj", "v_proj", "mlp.experts.down_proj"]
    assert meta["targets"] == sorted(targets) and meta["base_model_name_or_path"] == "tiny-base"
    saved_bytes = (out / ADAPTER_WEIGHTS).stat().st_size
    base_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" not in n)
    assert saved_bytes < base_bytes / 10  # the adapters alone

    fresh = load_lora(random_model(tiny_config()), out)
    for key, tensor in lora_state_dict(model).items():
        torch.testing.assert_close(lora_state_dict(fresh)[key], tensor, rtol=0, atol=0)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids()), model(ids()), rtol=0, atol=0)

    wrong_shape = random_model(tiny_config(hidden_size=96, head_dim=24))
    with pytest.raises(ValueError, match="another base"):
        load_lora(wrong_shape, out)
    with pytest.raises(ValueError, match="no model.layers.2.mlp.experts.down_proj.*another base"):
        load_lora(random_model(tiny_config(num_hidden_layers=2)), out)


def test_mxfp4_base_dequantizes_only_adapted_experts_and_trains_through_packed_ones():
    base = quantize_experts(random_model(tiny_config()))
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(rank=4, targets=["self_attn.q_proj", "model.layers.1.mlp.experts.*"]))
    kinds = [type(layer.mlp.experts) for layer in model.model.layers]
    assert kinds == [MXFP4Experts, LoRAExperts, MXFP4Experts]
    x = ids()
    with torch.no_grad():  # dequantization is exact: the adapted model starts equal to the packed base
        torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-5)

    model.train()
    model(x).logsumexp(-1).mean().backward()
    # Layer 0's adapter learns through layers 1 and 2 (packed experts pass gradients to their input).
    assert model.model.layers[0].self_attn.q_proj.lora_B.grad.abs().sum() > 0

    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        merged = merge_lora(model)
        assert {type(layer.mlp.experts) for layer in merged.model.layers} == {Experts}  # one consistent kind
        torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-5)


def test_lora_linear_keeps_the_base_names():
    model = random_model(tiny_config())
    before = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=2, targets=["o_proj"]))
    layer = model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer, nn.Linear)
    after = set(model.state_dict())
    assert after - before == {f"model.layers.{i}.self_attn.o_proj.lora_{p}" for i in range(3) for p in "AB"}
