"""Native kernels against the PyTorch reference, on every instruction set this CPU has.

Tolerance: fp32 accumulation in a different order than PyTorch's, so |Δ| ≤ 1e-5 · (|x|·|W|)
summed over the row, a bound on reordering error far below any real bug (a wrong code, nibble
or scale shifts results by whole table steps).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from gptoss import ops
from gptoss.mxfp4 import pack, unpack

native = pytest.mark.skipif(
    not ops.native_available() and not os.environ.get("GPTOSS_REQUIRE_NATIVE"),
    reason="native kernels not built (no C compiler); the PyTorch path is the one in use",
)


def test_native_kernels_are_built_where_required():
    # CI sets GPTOSS_REQUIRE_NATIVE, so a broken build fails here instead of skipping silently.
    if os.environ.get("GPTOSS_REQUIRE_NATIVE"):
        assert ops.native_available()


def available_isas() -> list[str]:
    isas = []
    for name in ("c", "avx2", "avx512"):
        try:
            ops.set_isa(name)
            isas.append(name)
        except ValueError:
            pass
    ops.set_isa("best")
    return isas


@pytest.fixture(params=["c", "avx2", "avx512"])
def isa(request):
    if not ops.native_available():
        pytest.fail("native kernels are not built")
    if request.param not in available_isas():
        pytest.skip(f"this CPU has no {request.param}")
    yield ops.set_isa(request.param)
    ops.set_isa("best")


def close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> bool:
    bound = 1e-5 * (x.abs() @ w.abs().T).clamp_min(1.0)
    return bool(torch.all((y - ref).abs() <= bound))


SHAPES = [(1, 32, 1), (1, 64, 37), (3, 96, 50), (8, 160, 129), (5, 2880, 67)]


@native
@pytest.mark.parametrize("n,inp,out", SHAPES)
def test_mxfp4_linear(isa, n, inp, out):
    generator = torch.Generator().manual_seed(n * inp + out)
    blocks, scales = pack(torch.randn(1, inp, out, generator=generator))
    blocks, scales = blocks[0], scales[0]
    x, bias = torch.randn(n, inp, generator=generator), torch.randn(out, generator=generator)
    weight = unpack(blocks, scales, torch.float32).T  # (out, in)
    with torch.no_grad():
        y = ops.mxfp4_linear(x, blocks, scales, bias)
    assert y.shape == (n, out) and close(y, x, weight, x @ weight.T + bias)


@native
@pytest.mark.parametrize("n,inp,out", [*SHAPES, (2, 45, 7), (4, 17, 3)])
def test_bf16_linear(isa, n, inp, out):
    generator = torch.Generator().manual_seed(n + inp + out)
    weight = torch.randn(out, inp, generator=generator).bfloat16()
    x, bias = torch.randn(n, inp, generator=generator), torch.randn(out, generator=generator).bfloat16()
    with torch.no_grad():
        y = ops.linear(x, weight, bias)
    assert close(y, x, weight.float(), F.linear(x, weight.float(), bias.float()))


@native
@pytest.mark.parametrize("n,inp,out", [*SHAPES, (2, 45, 7)])
def test_int8_linear(isa, n, inp, out):
    generator = torch.Generator().manual_seed(inp)
    weight = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=generator)
    scale = torch.rand(out, generator=generator) / 64
    x, bias = torch.randn(n, inp, generator=generator), torch.randn(out, generator=generator)
    dequantized = weight.float() * scale[:, None]
    with torch.no_grad():
        y = ops.int8_linear(x, weight, scale, bias)
    assert close(y, x, dequantized, F.linear(x, dequantized, bias))


@native
def test_bf16_activations_come_back_in_their_dtype():
    weight = torch.randn(40, 64).bfloat16()
    x = torch.randn(2, 3, 64).bfloat16()
    with torch.no_grad():
        y = ops.linear(x, weight)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 40)
    assert torch.allclose(y.float(), F.linear(x, weight).float(), rtol=1e-2, atol=1e-2)


def test_training_and_large_batches_take_the_reference_path():
    weight = torch.randn(16, 32).bfloat16()
    x = torch.randn(20, 32).bfloat16()  # more rows than the native kernels serve
    assert torch.equal(ops.linear(x, weight), F.linear(x, weight))
    blocks, scales = pack(torch.randn(1, 32, 16))
    x_grad = torch.randn(2, 32, requires_grad=True)
    ops.mxfp4_linear(x_grad, blocks[0], scales[0]).sum().backward()  # autograd flows through
    assert x_grad.grad is not None


@native
def test_native_linears_keep_parameters_and_state_dict():
    from conftest import random_model, tiny_config

    model = random_model(tiny_config()).to(torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = model(ids[:, :1]).float()
        ops.use_native_linears(model)
        after = model(ids[:, :1]).float()
    assert type(model.lm_head) is ops.NativeLinear
    assert state.keys() == model.state_dict().keys()
    # bf16 model: the native path accumulates in fp32 and rounds once, PyTorch rounds per op
    assert torch.allclose(before, after, atol=0.05, rtol=0.05)
