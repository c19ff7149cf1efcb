import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from conftest import random_model, tiny_config
from gptoss import load_model, save_model
from gptoss.quant.mxfp4 import FP4_VALUES, MXFP4Experts, dequantize_experts, pack, quantize_experts, unpack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpack_matches_transformers_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 5, 16), dtype=torch.uint8, generator=generator)
    # exponents across the useful range, both tiny and large scales
    scales = torch.randint(100, 150, (3, 40, 5), dtype=torch.uint8, generator=generator)
    ours = unpack(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(
        ours.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        theirs.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )


def test_code_layout_low_nibble_first_and_scale_bias():
    # one block: byte 0x21 holds code 1 (0.5) in the low nibble and code 2 (1.0) in the high one
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x21
    blocks[0, 0, 1] = 0xF9  # low: code 9 (-0.5), high: code 15 (-6.0)
    scales = torch.tensor([[128]], dtype=torch.uint8)  # 2^(128-127) = 2
    values = unpack(blocks, scales, torch.float32)[:, 0]  # (in=32,)
    assert values[:4].tolist() == [1.0, 2.0, -1.0, -12.0]
    assert torch.all(values[4:] == 0)


def test_pack_round_trips_representable_values_exactly():
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (2, 64, 24), generator=generator)
    exponents = torch.randint(-4, 5, (2, 2, 24), generator=generator).repeat_interleave(32, dim=1)
    weight = torch.tensor(FP4_VALUES)[codes] * 2.0**exponents
    # make every block hit the top magnitude so its scale is the one chosen
    weight[:, ::32] = 6.0 * 2.0 ** exponents[:, ::32]
    blocks, scales = pack(weight)
    assert blocks.shape == (2, 24, 2, 16) and scales.shape == (2, 24, 2)
    assert torch.equal(unpack(blocks, scales, torch.float32), weight)


def test_pack_error_is_within_half_the_widest_step():
    weight = torch.randn(4, 96, 40, generator=torch.Generator().manual_seed(2))
    restored = unpack(*pack(weight), torch.float32)
    blocks = lambda t: t.view(4, 3, 32, 40)  # noqa: E731 - (E, in blocks, 32, out)
    scale = 2.0 ** torch.ceil(torch.log2(blocks(weight).abs().amax(dim=2, keepdim=True) / 6))
    # the widest step of the e2m1 table is 4 → 6, so rounding never moves a value by more than 1·scale
    assert torch.all((blocks(restored) - blocks(weight)).abs() <= scale)
    assert (restored - weight).abs().mean() < 0.15 * weight.abs().mean()  # ~11% for 4-bit codes


def test_rejects_input_not_divisible_into_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(torch.zeros(1, 33, 8))


def test_mxfp4_checkpoint_equals_the_same_weights_dequantized(tmp_path):
    config = tiny_config(num_local_experts=6, num_experts_per_tok=3)
    model = quantize_experts(random_model(config, seed=3))
    save_model(model, tmp_path / "packed")

    packed = load_model(tmp_path / "packed", dtype=torch.float32)
    experts = packed.model.layers[0].mlp.experts
    assert isinstance(experts, MXFP4Experts)
    assert not any(n.endswith("experts.gate_up_proj") for n, _ in packed.named_parameters())
    assert experts.gate_up_proj_blocks.dtype == torch.uint8  # held packed, 4.25 bits per weight

    dense = load_model(tmp_path / "packed", dtype=torch.float32, dequantize=True)
    assert not any(isinstance(b.mlp.experts, MXFP4Experts) for b in dense.model.layers)
    ids = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        # same values, different memory layouts of the weights: equal up to summation order
        assert (packed(ids) - dense(ids)).abs().max().item() <= 1e-5
        assert (packed(ids) - model(ids)).abs().max().item() <= 1e-5


def test_transformers_loads_our_mxfp4_checkpoint(tmp_path):
    config = tiny_config()
    model = quantize_experts(random_model(config, seed=4))
    save_model(model, tmp_path / "packed")
    # transformers dequantizes MXFP4 on a CPU without Triton kernels
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max().item() <= 1e-4


def test_dequantize_then_quantize_loses_nothing():
    model = quantize_experts(random_model(tiny_config(), seed=5))
    experts = model.model.layers[1].mlp.experts
    before = unpack(experts.gate_up_proj_blocks, experts.gate_up_proj_scales, torch.float32)
    experts = quantize_experts(dequantize_experts(model)).model.layers[1].mlp.experts
    after = unpack(experts.gate_up_proj_blocks, experts.gate_up_proj_scales, torch.float32)
    assert torch.equal(before, after)
