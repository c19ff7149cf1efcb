"""The native kernels applied from outside (gptoss.inference.native): module swaps that keep the
model's parameters, names and state, and no reach into private fields or classes of live objects."""

import os

import pytest
import torch

from conftest import random_model, tiny_config
from gptoss import ops
from gptoss.inference import native as native_modules

requires_native = pytest.mark.skipif(
    not ops.native_available() and not os.environ.get("GPTOSS_REQUIRE_NATIVE"),
    reason="native kernels not built (no C compiler); the PyTorch path is the one in use",
)


@requires_native
def test_native_linears_keep_parameters_and_state_dict():
    model = random_model(tiny_config()).to(torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = model(ids[:, :1]).float()
        native_modules.use_native_kernels(model)
        after = model(ids[:, :1]).float()
    assert type(model.lm_head) is native_modules.NativeLinear
    assert state.keys() == model.state_dict().keys()
    # bf16 model: the native path accumulates in fp32 and rounds once, PyTorch rounds per op
    assert torch.allclose(before, after, atol=0.05, rtol=0.05)


@requires_native
def test_native_classes_replace_only_the_forward():
    model = native_modules.use_native_kernels(random_model(tiny_config()))
    block = model.model.layers[0]
    assert type(block.input_layernorm) is native_modules.NativeRMSNorm
    assert type(block.self_attn) is native_modules.NativeAttention
    assert type(block.mlp.router) is native_modules.NativeRouter
    # the same parameter objects (tying kept), only the class of their holder changed
    before = random_model(tiny_config(tie_word_embeddings=True))
    params = dict(before.named_parameters(remove_duplicate=False))
    after = native_modules.use_native_kernels(before)
    assert after is before
    assert all(p is params[name] for name, p in after.named_parameters(remove_duplicate=False))
    assert after.lm_head.weight is after.model.embed_tokens.weight
