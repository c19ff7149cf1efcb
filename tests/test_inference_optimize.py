"""Decode speedups change nothing but speed (native kernels), or little (int8, measured)."""

import copy

import pytest
import torch

from conftest import random_model, tiny_config
from gptoss.inference import generate
from gptoss.inference.optimize import prepare_for_inference
from gptoss.quant.int8 import Int8Linear, quantize_int8
from gptoss.quant.mxfp4 import quantize_experts


@pytest.fixture(scope="module")
def reference():
    # MXFP4 experts and bf16 elsewhere: the layout of the released checkpoints.
    return quantize_experts(random_model(tiny_config(intermediate_size=96), seed=41)).to(torch.bfloat16)


def test_prepared_model_generates_what_the_reference_generates(reference):
    prepared = prepare_for_inference(copy.deepcopy(reference))
    prompts = [[5, 9, 200, 31, 17, 4], [7]]
    assert generate(prepared, prompts, 12, temperature=0) == generate(reference, prompts, 12, temperature=0)
    ids = torch.tensor(prompts[0])[None]
    with torch.no_grad():
        torch.testing.assert_close(prepared(ids).float(), reference(ids).float(), atol=0.05, rtol=0.02)


def test_int8_linear_is_close_to_the_float_layer():
    linear = torch.nn.Linear(64, 48)
    quantized = Int8Linear(linear)
    assert quantized.weight.dtype == torch.int8
    for rows in (1, 5, 40):  # decode-sized and prefill-sized calls take different kernels
        x = torch.randn(rows, 64)
        with torch.no_grad():
            exact, approx = linear(x), quantized(x)
        assert (approx - exact).norm() / exact.norm() < 0.01


def test_int8_quantization_in_row_chunks_equals_all_at_once(monkeypatch):
    from gptoss.quant import int8

    linear = torch.nn.Linear(64, 50).to(torch.bfloat16)
    whole = Int8Linear(linear)
    monkeypatch.setattr(int8, "QUANTIZE_ROWS", 7)  # bounds the fp32 working copy of a big head
    chunked = Int8Linear(linear)
    assert torch.equal(whole.weight, chunked.weight) and torch.equal(whole.scale, chunked.scale)


def test_int8_model_predicts_nearly_the_same_distribution(reference):
    model = prepare_for_inference(copy.deepcopy(reference), int8=True)
    assert isinstance(model.lm_head, Int8Linear)
    assert all(isinstance(b.self_attn.o_proj, Int8Linear) for b in model.model.layers)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.log_softmax(reference(ids).float(), dim=-1)
        q = torch.log_softmax(model(ids).float(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    assert 0 < kl < 1e-3


def test_int8_can_leave_attention_or_head_alone(reference):
    head_only = quantize_int8(copy.deepcopy(reference), attention=False)
    assert isinstance(head_only.lm_head, Int8Linear)
    assert not isinstance(head_only.model.layers[0].self_attn.q_proj, Int8Linear)
    twice = quantize_int8(head_only)  # already-quantized layers are kept, not requantized
    assert twice.lm_head is head_only.lm_head
