"""The native decode step of a block (gptoss.inference.native.NativeBlock) computes what the general
path of the same prepared model computes, bit for bit, and steps aside whenever it cannot."""

import copy
import os

import pytest
import torch

from conftest import random_model, tiny_config
from gptoss import ops
from gptoss.inference import KVCache
from gptoss.inference.optimize import prepare_for_inference
from gptoss.inference.runner import forward_hidden
from gptoss.model import Block
from gptoss.ops import decode
from gptoss.quant.mxfp4 import quantize_experts
from gptoss.swap import rebuilt

# Without the native module every block takes the general path (there is nothing to compare);
# CI sets GPTOSS_REQUIRE_NATIVE, where test_ops.py fails on a missing build.
pytestmark = pytest.mark.skipif(
    not ops.native_available() and not os.environ.get("GPTOSS_REQUIRE_NATIVE"),
    reason="native kernels not built",
)


def released_layout(config=None, seed=7):
    """MXFP4 experts, bf16 elsewhere (the released checkpoints' layout), hidden 128 so that the MXFP4
    rows take the four-block kernel."""
    config = config or tiny_config(hidden_size=128, intermediate_size=96, sliding_window=4)
    return quantize_experts(random_model(config, seed=seed)).to(torch.bfloat16)


def general_path(model):
    """The same prepared model with its blocks back on Block.forward (native sub-modules kept)."""
    model = copy.deepcopy(model)
    for i, block in enumerate(model.model.layers):
        model.model.layers[i] = rebuilt(block, Block)
    return model


def decode_hidden(model, prompts, steps, cache_type=KVCache):
    """Prefill each prompt into its own cache row, then `steps` batched decode steps; the hidden
    states of every decode step (R, 1, H), in order. Blocks of 3 positions: steps cross them."""
    capacity = max(map(len, prompts)) + steps
    cache = cache_type(model.config, len(prompts), capacity=capacity, dtype=torch.bfloat16, block_size=3)
    out = []
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            forward_hidden(model, cache, torch.tensor([prompt]), slice(row, row + 1))
        for step in range(steps):
            new = torch.tensor([[(37 * step + 11 * row) % 300 + 5] for row in range(len(prompts))])
            out.append(forward_hidden(model, cache, new, slice(0, len(prompts))))
    return out


def took_the_decode_step(model):
    return all(getattr(block, "_plan", None) is not None for block in model.model.layers)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("lengths", [[3], [6, 6], [9, 2, 6]])
def test_decode_step_equals_the_general_path_bit_for_bit(int8, lengths):
    """Rows at one position (each step one native call for rotary, cache write and attention) and at
    different positions, past the sliding window (4) and around its ring."""
    model = prepare_for_inference(released_layout(), int8=int8)
    prompts = [[(5 * i + 3 * n) % 300 + 2 for i in range(n)] for n in lengths]
    ours = decode_hidden(model, prompts, steps=7)
    assert took_the_decode_step(model)
    theirs = decode_hidden(general_path(model), prompts, steps=7)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_a_batch_of_more_rows_than_a_kernel_call_takes_runs_the_decode_step(monkeypatch):
    """A decode batch of more than `ops.MAX_ROWS` sequences takes the native step too (its products
    run the rows in chunks of MAX_ROWS against each weight tile while it is in cache). The general
    path sends products that wide to PyTorch's GEMM (other sums); with its dense products, rotary
    and attention native at that width as well, it is the same kernels, so the same numbers."""
    monkeypatch.setattr(ops, "MAX_ROWS", decode.STEP_ROWS)
    model = prepare_for_inference(released_layout())
    prompts = [[(7 * i + 5 * r) % 300 + 2 for i in range(2 + r % 5)] for r in range(11)]
    ours = decode_hidden(model, prompts, steps=5)
    assert took_the_decode_step(model)
    theirs = decode_hidden(general_path(model), prompts, steps=5)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


class CacheWithoutDecodeView(KVCache):
    """A cache whose one-token passes all go through `update` (as the model's KVCache protocol asks)."""

    def decode_view(self, layer_idx):
        return None


def test_a_cache_without_decode_view_gets_its_writes_through_update():
    model = prepare_for_inference(released_layout())
    prompts = [[4, 8, 15, 16, 23]]
    ours = decode_hidden(model, prompts, steps=6, cache_type=CacheWithoutDecodeView)
    assert took_the_decode_step(model)
    theirs = decode_hidden(general_path(model), prompts, steps=6)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_decode_step_follows_weights_changed_in_place_or_replaced():
    model = prepare_for_inference(released_layout())
    prompts = [[4, 8, 15, 16, 23]]
    decode_hidden(model, prompts, steps=2)  # plans built
    block = model.model.layers[1]

    def change_in_place():  # the sinks are converted to fp32 in the plan: the change must be seen
        with torch.no_grad():
            block.self_attn.sinks.add_(1.5)

    def replace():
        block.self_attn.o_proj.weight = torch.nn.Parameter(block.self_attn.o_proj.weight.detach() * 2)

    for change in (change_in_place, replace):
        before = decode_hidden(model, prompts, steps=3)
        change()
        ours = decode_hidden(model, prompts, steps=3)
        theirs = decode_hidden(general_path(model), prompts, steps=3)
        assert not torch.equal(ours[-1], before[-1]), change.__name__
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), change.__name__


def test_what_the_decode_step_cannot_take_goes_the_general_way():
    # float32 weights (no bf16 matvec), dense MLP, experts not in MXFP4: each leaves every block on
    # Block.forward (no plan), the path the other tests compare against.
    cases = {
        "fp32": quantize_experts(random_model(tiny_config(hidden_size=128), seed=3)),
        "dense": random_model(tiny_config(num_local_experts=0), seed=3).to(torch.bfloat16),
        "bf16 experts": random_model(tiny_config(), seed=3).to(torch.bfloat16),
    }
    for name, model in cases.items():
        model = prepare_for_inference(model)
        dtype = model.model.embed_tokens.weight.dtype
        cache = KVCache(model.config, 1, capacity=8, dtype=dtype)
        with torch.no_grad():
            forward_hidden(model, cache, torch.tensor([[3, 4, 5]]), slice(0, 1))
            forward_hidden(model, cache, torch.tensor([[6]]), slice(0, 1))
        assert all(getattr(b, "_plan", None) is None for b in model.model.layers), name


def test_autograd_takes_the_general_path():
    model = prepare_for_inference(released_layout())
    cache = KVCache(model.config, 1, capacity=8, dtype=torch.bfloat16)
    forward_hidden(model, cache, torch.tensor([[4, 8, 15]]), slice(0, 1))
    hidden = forward_hidden(model, cache, torch.tensor([[16]]), slice(0, 1))  # grad enabled
    assert hidden.requires_grad and not took_the_decode_step(model)
