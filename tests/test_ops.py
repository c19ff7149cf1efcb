"""Native kernels against the PyTorch reference, on every instruction set this CPU has.

Tolerance: fp32 accumulation in a different order than PyTorch's, so |Δ| ≤ 1e-5 · (|x|·|W|)
summed over the row, a bound on reordering error far below any real bug (a wrong code, nibble
or scale shifts results by whole table steps). With bf16 activations the reference is the same
fp32 product of the same (bf16) values, and the result is rounded to bf16 once: the bound adds
2^-8 · |reference| (half a bf16 step is 2^-9 relative; one more for the reference's own rounding).
One bf16 row against MXFP4 weights on AVX2 is first rounded to 16-bit block floats (see
test_mxfp4_one_bf16_row_within_the_block_float_bound for that kernel's own term).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from gptoss import ops
from gptoss.model import Visibility
from gptoss.quant.mxfp4 import pack, unpack

native = pytest.mark.skipif(
    not ops.native_available() and not os.environ.get("GPTOSS_REQUIRE_NATIVE"),
    reason="native kernels not built (no C compiler); the PyTorch path is the one in use",
)


def test_native_kernels_are_built_where_required():
    # CI sets GPTOSS_REQUIRE_NATIVE, so a broken build fails here instead of skipping silently.
    if os.environ.get("GPTOSS_REQUIRE_NATIVE"):
        assert ops.native_available()


ISAS = ["c", "avx2", "avx512", "avx512bf16"]


def available_isas() -> list[str]:
    isas = []
    for name in (*ISAS, "amx"):
        try:
            ops.set_isa(name)
            isas.append(name)
        except ValueError:
            pass
    ops.set_isa("best")
    return isas


def _use_isa(name: str):
    if not ops.native_available():
        pytest.fail("native kernels are not built")
    if name not in available_isas():
        pytest.skip(f"this CPU has no {name}")
    yield ops.set_isa(name)
    ops.set_isa("best")


@pytest.fixture(params=ISAS)
def isa(request):
    yield from _use_isa(request.param)


@pytest.fixture(params=[*ISAS, "amx"])
def moe_isa(request):
    """As isa, and "amx": AVX-512 BF16, with prompts through the experts on AMX tiles (mxfp4_amx,
    for experts with at least 6 tokens; the rest of the kernels are avx512bf16's)."""
    yield from _use_isa(request.param)


def close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> bool:
    bound = 1e-5 * (x.float().abs() @ w.abs().T).clamp_min(1.0)
    if y.dtype == torch.bfloat16:
        bound = bound + 2**-8 * ref.abs()
    return bool(torch.all((y.float() - ref).abs() <= bound))


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


class LinearCalls(TorchFunctionMode):
    """The output widths of the F.linear calls made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.widths: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.widths.append(args[1].shape[0])
        return func(*args, **(kwargs or {}))


def test_int8_reference_path_dequantizes_in_blocks(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randint(-127, 128, (50, 32), dtype=torch.int8, generator=generator)
    scale, bias = torch.rand(50, generator=generator) / 64, torch.randn(50, generator=generator)
    # autograd through x: the reference path on every CPU (the native kernels and the fp32 GEMM
    # path serve inference only)
    x = torch.randn(20, 32, generator=generator, requires_grad=True)
    whole = ops.int8_linear(x, weight, scale, bias)
    monkeypatch.setattr(ops, "INT8_REFERENCE_ROWS", 7)
    with LinearCalls() as calls:
        blocks = ops.int8_linear(x, weight, scale, bias)
    assert calls.widths == [7] * 7 + [1]  # 50 output channels dequantized 7 at a time
    torch.testing.assert_close(blocks, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole, F.linear(x, weight.float() * scale[:, None], bias))


@native
def test_bf16_activations_come_back_in_their_dtype():
    weight = torch.randn(40, 64).bfloat16()
    x = torch.randn(2, 3, 64).bfloat16()
    with torch.no_grad():
        y = ops.linear(x, weight)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 40)
    assert torch.allclose(y.float(), F.linear(x, weight).float(), rtol=1e-2, atol=1e-2)


def test_training_and_large_batches_take_the_reference_path(monkeypatch):
    monkeypatch.setattr(ops, "BF16_GEMM_IN_HARDWARE", True)  # (else: test_fp32_gemm_linear)
    weight = torch.randn(16, 32).bfloat16()
    x = torch.randn(20, 32).bfloat16()  # more rows than the native kernels serve
    assert torch.equal(ops.linear(x, weight), F.linear(x, weight))
    blocks, scales = pack(torch.randn(1, 32, 16))
    x_grad = torch.randn(2, 32, requires_grad=True)
    ops.mxfp4_linear(x_grad, blocks[0], scales[0]).sum().backward()  # autograd flows through
    assert x_grad.grad is not None


@pytest.mark.parametrize("shape", [(9, 96), (2, 13, 160)])
def test_fp32_gemm_linear(monkeypatch, shape):
    """Without bf16 dot products in the CPU, bf16 products larger than the native kernels take
    PyTorch's fp32 GEMM a block of output channels at a time: the bf16 product up to the order of
    its fp32 sums, rounded once."""
    generator = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=generator).bfloat16()
    weight = torch.randn(50, shape[-1], generator=generator).bfloat16()
    bias = torch.randn(50, generator=generator).bfloat16()
    monkeypatch.setattr(ops, "FP32_GEMM_BLOCK", 7 * shape[-1])  # blocks of 7 output channels
    monkeypatch.setattr(ops, "AVX2_DENSE_ROWS", ops.MAX_ROWS)  # (AVX2 takes these rows natively)
    with torch.no_grad():
        y = ops.fp32_gemm_linear(x, weight, bias)
        monkeypatch.setattr(ops, "BF16_GEMM_IN_HARDWARE", False)
        assert torch.equal(ops.linear(x, weight, bias), y)  # what `linear` takes on such CPUs
    ref = F.linear(x.float(), weight.float(), bias.float())
    assert y.dtype == torch.bfloat16 and y.shape == (*shape[:-1], 50)
    rows = x.reshape(-1, shape[-1])
    assert close(y.reshape(rows.shape[0], 50), rows, weight.float(), ref.reshape(rows.shape[0], 50))
    # int8 weights the same way, their scales applied in fp32
    w8 = torch.randint(-127, 128, (50, shape[-1]), dtype=torch.int8, generator=generator)
    scale = torch.rand(50, generator=generator) / 64
    with torch.no_grad():
        y8 = ops.int8_linear(x, w8, scale, bias)
    dequantized = w8.float() * scale[:, None]
    assert torch.equal(y8, ops.fp32_gemm_linear(x, w8, bias, scale))
    ref8 = F.linear(rows.float(), dequantized, bias.float())
    assert close(y8.reshape(rows.shape[0], 50), rows, dequantized, ref8)


# Any number of rows: MXFP4 runs natively (prefill), with bf16 activations too. On AVX2, more than
# MAX_ROWS rows take the prompt kernel: 50 in two passes of 25 (8 row triples and a single row).
ROW_COUNTS = [1, 2, 3, 5, 8, 9, 13, 20, 50]


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", ROW_COUNTS)
# with bf16 activations, rows of 64·k take mxfp4_quads (1 to 4 activation rows): 128 one quad; 192 a
# quad and a last pair of blocks; 448 three quads (the odd one after the two chains) and a pair;
# 1184 (37 blocks) three column chunks of the AVX2 prompt kernel, the last one short
@pytest.mark.parametrize("inp", [96, 128, 192, 448, 1184])
def test_mxfp4_linear_rows_and_dtypes(isa, dtype, n, inp):
    generator = torch.Generator().manual_seed(n)
    out = 51  # odd: the two-rows-at-a-time kernels end on a single row; quads sum 16 rows at a time
    blocks, scales = pack(torch.randn(1, inp, out, generator=generator))
    blocks, scales = blocks[0], scales[0]
    x = torch.randn(n, inp, generator=generator).to(dtype)
    bias = torch.randn(out, generator=generator).to(dtype)
    weight = unpack(blocks, scales, torch.float32).T
    with torch.no_grad():
        y = ops.mxfp4_linear(x, blocks, scales, bias)
    assert y.dtype == dtype and y.shape == (n, out)
    assert close(y, x, weight, x.float() @ weight.T + bias.float())


@native
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3])  # mxfp4_quads (its epilogue 16 rows at a time) with 1 and 3 rows
def test_mxfp4_bf16_activations_with_any_bias_and_output_dtype(isa, bias_dtype, out_dtype, n):
    """The native module takes the bias and the output in either dtype, whatever the activations'."""
    generator = torch.Generator().manual_seed(n)
    inp, out = 192, 51  # 51 rows: groups of 16 and a last one of 3
    blocks, scales = pack(torch.randn(1, inp, out, generator=generator))
    blocks, scales = blocks[0].contiguous(), scales[0].contiguous()
    x = torch.randn(n, inp, generator=generator).to(torch.bfloat16)
    bias = None if bias_dtype is None else torch.randn(out, generator=generator).to(bias_dtype)

    def matmul(dtype: torch.dtype) -> torch.Tensor:
        y = torch.full((n, out), float("nan"), dtype=dtype)
        ops._native.mxfp4_matmul(
            x.data_ptr(), ops.DTYPE_CODES[x.dtype], n, inp, blocks.data_ptr(), scales.data_ptr(), out,
            0 if bias is None else bias.data_ptr(), 0 if bias is None else ops.DTYPE_CODES[bias.dtype],
            y.data_ptr(), ops.DTYPE_CODES[dtype],
        )  # fmt: skip
        return y

    y = matmul(out_dtype)
    weight = unpack(blocks, scales, torch.float32).T
    ref = x.float() @ weight.T + (0 if bias is None else bias.float())
    assert close(y, x, weight, ref)
    if out_dtype == torch.bfloat16:  # the same sums, rounded as PyTorch rounds them
        assert torch.equal(y, matmul(torch.float32).to(torch.bfloat16))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [3, 4, 10])
@pytest.mark.parametrize("n", [1, 3])  # bf16: mxfp4_quads with 1 and 3 rows
def test_mxfp4_extreme_scales(isa, dtype, groups, n):
    # Scale bytes 0 and 1 make subnormal weights, which the bf16 kernel cannot build by adding to
    # the exponent: those blocks take an fp32 detour. The four-block kernel (4 and 10 groups, the
    # latter ending on a pair of blocks) scales fp32 sums instead, building the scales from their
    # bits where no byte of the row is 0. Large activations there make them count.
    generator = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (7, groups, 16), dtype=torch.uint8, generator=generator)
    scales = torch.full((7, groups), 127, dtype=torch.uint8)
    scales[:, 1] = torch.tensor([0, 1, 2, 1, 0, 126, 1], dtype=torch.uint8)
    x = torch.randn(n, 32 * groups, generator=generator)
    x[:, 32:64] *= 2.0**120
    x = x.to(dtype)
    weight = unpack(blocks, scales, torch.float32).T
    with torch.no_grad():
        y = ops.mxfp4_linear(x, blocks, scales)
    assert close(y, x, weight, x.float() @ weight.T)


@native
@pytest.mark.parametrize("inp", [64, 192, 2880])
def test_mxfp4_one_bf16_row_within_the_block_float_bound(isa, inp):
    """One bf16 row on AVX2 (mxfp4_i16_avx2) is rounded to 16-bit block floats first: a value within
    2^7 of its group's largest stays exact, a smaller one moves by at most 2^-15 of the largest (half
    a step of 2^(e-15) for a largest in [2^(e-1), 2^e)); every other kernel meets the tighter bound
    anyway."""
    generator = torch.Generator().manual_seed(inp)
    blocks, scales = pack(torch.randn(1, inp, 37, generator=generator))
    blocks, scales = blocks[0], scales[0]
    weight = unpack(blocks, scales, torch.float32).T
    x = block_float_worst_case(1, inp, generator)
    with torch.no_grad():
        y = ops.mxfp4_linear(x, blocks, scales)
    assert within_block_float_bound(y, x, weight)
    near = near_the_largest(x)  # no rounding term at all
    with torch.no_grad():
        y = ops.mxfp4_linear(near, blocks, scales)
    assert close(y, near, weight, near.float() @ weight.T)


def block_float_worst_case(n: int, inp: int, generator: torch.Generator) -> torch.Tensor:
    """bf16 rows whose groups of 32 hold one large value (a power of two, the worst case for
    16-bit block floats) and 31 tiny ones (down to 2^-20 of it), the values that rounding touches."""
    x = torch.randn(n, inp, generator=generator) * 2.0 ** -torch.randint(0, 21, (n, inp), generator=generator)
    x[:, ::32] = 8.0 * torch.sign(torch.randn(n, inp // 32, generator=generator))
    return x.to(torch.bfloat16)


def within_block_float_bound(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """close()'s bound for bf16 outputs, plus what rounding x to 16-bit block floats may add: each
    group of 32 up to 2^-15 · max|x| · Σ|w|."""
    (n, inp), out = x.shape, weight.shape[0]
    ref = x.float() @ weight.T
    group_max = x.float().abs().view(n, inp // 32, 32).amax(dim=2)  # (n, groups)
    group_w = weight.abs().view(out, inp // 32, 32).sum(dim=2)  # (out, groups)
    rounding = 2**-15 * group_max @ group_w.T
    bound = 1e-5 * (x.float().abs() @ weight.abs().T).clamp_min(1.0) + rounding + 2**-8 * ref.abs()
    return bool(torch.all((y.float() - ref).abs() <= bound))


def near_the_largest(x: torch.Tensor) -> torch.Tensor:
    """x with every value raised to at least 2^-4 in magnitude: within 2^7 of its group's largest
    (8), where 16-bit block floats are exact."""
    near = x.float().abs().clamp_min(2.0**-4) * x.float().sign()
    near[near == 0] = 2.0**-4
    return near.to(torch.bfloat16)


@native
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_mxfp4_one_bf16_row_with_a_non_finite_value(isa, bad):
    """A NaN or infinity among the activations makes every output non-finite, as in the reference;
    the block-float rounding of one bf16 row must not turn it into a number."""
    generator = torch.Generator().manual_seed(1)
    blocks, scales = pack(torch.randn(1, 128, 9, generator=generator))
    x = torch.randn(1, 128, generator=generator)
    x[0, 70] = bad
    with torch.no_grad():
        y = ops.mxfp4_linear(x.to(torch.bfloat16), blocks[0], scales[0])
    assert not torch.isfinite(y).any()


@native
@pytest.mark.parametrize("kind", ["bf16", "int8"])
# 45, 1197: rows with a tail; 1197: three column chunks; 100: passes of 34, 34, 32 rows
@pytest.mark.parametrize("n,inp", [(9, 96), (37, 160), (100, 45), (50, 1197)])
def test_dense_prefill_rows_on_avx2(monkeypatch, kind, n, inp):
    """On AVX2 without bf16 dot products, bf16 and int8 products up to AVX2_DENSE_ROWS rows take
    the native prompt kernel (a tile of weights decoded a column chunk at a time for up to 48 rows);
    more rows the fp32 GEMM."""
    if "avx2" not in available_isas():
        pytest.skip("this CPU has no avx2")
    monkeypatch.setattr(ops, "BF16_GEMM_IN_HARDWARE", False)
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(n, inp, generator=generator).bfloat16()
    bias = torch.randn(67, generator=generator).bfloat16()
    if kind == "bf16":
        weight, scale = torch.randn(67, inp, generator=generator).bfloat16(), None
        dense, dequantized = (lambda: ops.linear(x, weight, bias)), weight.float()
    else:
        weight = torch.randint(-127, 128, (67, inp), dtype=torch.int8, generator=generator)
        scale = torch.rand(67, generator=generator) / 64
        dense, dequantized = (
            (lambda: ops.int8_linear(x, weight, scale, bias)),
            weight.float() * scale[:, None],
        )
    ref = F.linear(x.float(), dequantized, bias.float())
    try:
        ops.set_isa("avx2")
        with torch.no_grad():
            y = dense()
            assert torch.equal(y, ops._native_dense(x, x, [(weight, scale, bias)])[0])
            assert close(y, x, dequantized, ref)
            monkeypatch.setattr(ops, "AVX2_DENSE_ROWS", n - 1)
            assert torch.equal(dense(), ops.fp32_gemm_linear(x, weight, bias, scale))
    finally:
        ops.set_isa("best")


@native
# (6, 1100, 37): a group of six rows, rows longer than a chunk with a tail, a weight row past the
# blocks of four; (27, 200, 50): more rows than a kernel call takes, the last three alone
@pytest.mark.parametrize(
    "n,inp,out", [(1, 45, 7), (3, 96, 50), (8, 160, 129), (5, 2880, 67), (6, 1100, 37), (27, 200, 50)]
)
def test_bf16_linear_bf16_activations(isa, n, inp, out):
    generator = torch.Generator().manual_seed(inp + out)
    weight = torch.randn(out, inp, generator=generator).bfloat16()
    x = torch.randn(n, inp, generator=generator).bfloat16()
    bias = torch.randn(out, generator=generator).bfloat16()
    with torch.no_grad():
        y = ops.linear(x, weight, bias)
    assert y.dtype == torch.bfloat16
    assert close(y, x, weight.float(), F.linear(x.float(), weight.float(), bias.float()))


@pytest.fixture
def avx512bf16():
    yield from _use_isa("avx512bf16")


@native
def test_bf16_rows_do_not_depend_on_their_neighbours(avx512bf16):
    """With bf16 dot products, five or more activation rows take blocks of four weight rows against
    groups of activation rows: a row's numbers are the same whatever its place among the rows, the
    weight rows beside it, or the chunk of MAX_ROWS it falls in (one call of 16 = two calls of 8)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(37, 1100, generator=g).bfloat16()
    bias = torch.randn(37, generator=g).bfloat16()
    x = torch.randn(16, 1100, generator=g).bfloat16()
    with torch.no_grad():
        y = ops._native_dense(x, x, [(weight, None, bias)])[0]  # (any row count, as the decode step)
        for rows in (x[:8], x[2:9], x[8:]):
            assert torch.equal(ops.linear(rows.flip(0), weight, bias).flip(0), ops.linear(rows, weight, bias))
        assert torch.equal(torch.cat([ops.linear(x[:8], weight, bias), ops.linear(x[8:], weight, bias)]), y)
        assert torch.equal(ops.linear(x[:6], weight[3:], bias[3:]), y[:6, 3:])


@native
# (7, 64, 33): rows of 32·k in pairs
@pytest.mark.parametrize("n,inp,out", [(1, 45, 7), (4, 2880, 67), (6, 77, 9), (7, 64, 33)])
def test_int8_linear_bf16_activations(isa, n, inp, out):
    generator = torch.Generator().manual_seed(inp)
    weight = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=generator)
    scale = (torch.rand(out, generator=generator) / 64).bfloat16()
    x = torch.randn(n, inp, generator=generator).bfloat16()
    dequantized = weight.float() * scale.float()[:, None]
    with torch.no_grad():
        y = ops.int8_linear(x, weight, scale)
    assert y.dtype == torch.bfloat16 and close(y, x, dequantized, x.float() @ dequantized.T)


@native
# (1, 64): one pair of groups; (3, 2880): the 20b width, three rows; (6, 96): rows in pairs
@pytest.mark.parametrize("n,inp", [(1, 64), (3, 2880), (6, 96)])
def test_int8_bf16_rows_within_the_block_float_bound(isa, n, inp):
    """bf16 rows against int8 weights on AVX-512 (int8w_i16_avx512) are rounded to 16-bit block
    floats first, as one bf16 row against MXFP4 is on AVX2 (the bound of the test above)."""
    generator = torch.Generator().manual_seed(n * inp)
    weight = torch.randint(-127, 128, (37, inp), dtype=torch.int8, generator=generator)
    scale = torch.rand(37, generator=generator) / 64
    dequantized = weight.float() * scale[:, None]
    x = block_float_worst_case(n, inp, generator)
    with torch.no_grad():
        y = ops.int8_linear(x, weight, scale)
    assert within_block_float_bound(y, x, dequantized)
    near = near_the_largest(x)
    with torch.no_grad():
        y = ops.int8_linear(near, weight, scale)
    assert close(y, near, dequantized, near.float() @ dequantized.T)


@native
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_bf16_rows_with_a_non_finite_value(isa, bad):
    """A NaN or infinity in a row makes that row's outputs non-finite, as in the reference, and
    leaves the other rows as they are."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randint(-127, 128, (9, 128), dtype=torch.int8, generator=generator)
    scale = torch.rand(9, generator=generator) / 64
    x = torch.randn(2, 128, generator=generator)
    x[1, 70] = bad
    with torch.no_grad():
        y = ops.int8_linear(x.to(torch.bfloat16), weight, scale)
    assert torch.isfinite(y[0]).all() and not torch.isfinite(y[1]).any()


def expert_weights(hidden: int, inter: int, generator: torch.Generator, dtype: torch.dtype):
    gate_up = pack(torch.randn(1, hidden, 2 * inter, generator=generator))
    down = pack(torch.randn(1, inter, hidden, generator=generator) * 0.2)
    gate_up_bias = torch.randn(2 * inter, generator=generator).to(dtype)
    down_bias = torch.randn(hidden, generator=generator).to(dtype)
    return gate_up[0][0], gate_up[1][0], gate_up_bias, down[0][0], down[1][0], down_bias


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 7, 8, 11])
def test_mxfp4_expert_equals_linear_swiglu_linear(isa, dtype, n):
    from gptoss.model import clamped_swiglu

    generator = torch.Generator().manual_seed(n)
    hidden, inter = 64, 96
    weights = expert_weights(hidden, inter, generator, dtype)
    x = (torch.randn(n, hidden, generator=generator) * 0.5).to(dtype)  # gate values beyond ±7: clamps
    with torch.no_grad():
        y = ops.mxfp4_expert(x, *weights, alpha=1.702, limit=7.0)
    # the reference in fp32 from the same values; natively the hidden activations are stored in the
    # activation dtype once, so with bf16 that rounding (2^-9 relative) passes on through `down`
    gu_b, gu_s, gu_bias, d_b, d_s, d_bias = weights
    w_gu, w_d = unpack(gu_b, gu_s, torch.float32), unpack(d_b, d_s, torch.float32)
    gate_up = x.float() @ w_gu + gu_bias.float()
    assert gate_up[..., ::2].max() > 7 and gate_up[..., 1::2].abs().max() > 7
    h = clamped_swiglu(gate_up, 1.702, 7.0)
    ref = h @ w_d + d_bias.float()
    assert y.dtype == dtype and y.shape == (n, hidden)
    bound = 1e-4 * (h.abs() @ w_d.abs()).clamp_min(1.0)
    if dtype == torch.bfloat16:
        bound = bound + 2**-8 * (h.abs() @ w_d.abs()) + 2**-8 * ref.abs()
    assert torch.all((y.float() - ref).abs() <= bound)


def test_mxfp4_expert_reference_path_matches_its_definition():
    from gptoss.model import clamped_swiglu

    generator = torch.Generator().manual_seed(0)
    weights = expert_weights(64, 32, generator, torch.float32)
    x = torch.randn(3, 64, generator=generator, requires_grad=True)  # autograd: the PyTorch path
    y = ops.mxfp4_expert(x, *weights, alpha=1.702, limit=7.0)
    gu_b, gu_s, gu_bias, d_b, d_s, d_bias = weights
    h = clamped_swiglu(x @ unpack(gu_b, gu_s, torch.float32) + gu_bias, 1.702, 7.0)
    torch.testing.assert_close(y, h @ unpack(d_b, d_s, torch.float32) + d_bias)
    y.sum().backward()
    assert x.grad is not None


def moe_weights(experts: int, hidden: int, inter: int, generator: torch.Generator, dtype: torch.dtype):
    per_expert = [expert_weights(hidden, inter, generator, dtype) for _ in range(experts)]
    return [torch.stack(parts) for parts in zip(*per_expert, strict=True)]


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (60, 2): ~24 tokens per expert, the AVX2 prompt kernel with its SwiGLU and accumulating epilogues,
# and on AMX two 16-token chunks; (100, 2): ~40, three chunks (a pair and one alone); with AVX-512
# BF16 and no AMX, (100, 2) and (150, 2) (~60: 32 tokens and a tail of 28) take the prompt GEMM
@pytest.mark.parametrize("n,k", [(1, 4), (3, 2), (11, 3), (20, 1), (60, 2), (100, 2), (150, 2)])
# (128, 64), (256, 192): mxfp4_quads with bf16 activations, the SwiGLU written in its layout; on
# AMX, 384 gate_up rows are calls of 256 and 128
@pytest.mark.parametrize("hidden,inter", [(64, 32), (128, 64), (256, 192)])
def test_mxfp4_moe_is_the_weighted_sum_of_chosen_experts(moe_isa, dtype, n, k, hidden, inter):
    generator = torch.Generator().manual_seed(n * k)
    experts = 5
    stacks = moe_weights(experts, hidden, inter, generator, dtype)
    x = (torch.randn(n, hidden, generator=generator) * 0.5).to(dtype)
    idx = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(n)])
    weight = torch.softmax(torch.randn(n, k, generator=generator), dim=-1).to(dtype)
    with torch.no_grad():
        y = ops.mxfp4_moe(x, idx, weight, *stacks, alpha=1.702, limit=7.0)
    assert y.dtype == dtype and moe_close(y, x, idx, weight, stacks)


def moe_close(y: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, stacks) -> bool:
    """Whether y is the MoE of x within the kernels' tolerance: the reference in fp32, each
    expert's weights unpacked once."""
    from gptoss.model import clamped_swiglu

    n, k = idx.shape
    gu_b, gu_s, gu_bias, d_b, d_s, d_bias = stacks
    gate_up = [unpack(gu_b[e], gu_s[e], torch.float32) for e in range(gu_b.shape[0])]
    down = [unpack(d_b[e], d_s[e], torch.float32) for e in range(d_b.shape[0])]
    dtype = x.dtype
    ref, bound = torch.zeros(n, d_b.shape[1]), torch.zeros(n, d_b.shape[1])
    for t in range(n):
        for j in range(k):
            e, w = idx[t, j], weight[t, j].float()
            w_d = down[e]
            h = clamped_swiglu(x[t].float() @ gate_up[e] + gu_bias[e].float(), 1.702, 7.0)
            ref[t] += w * (h @ w_d + d_bias[e].float())
            bound[t] += (
                w * (1e-4 + (2**-8 if dtype == torch.bfloat16 else 0)) * (h.abs() @ w_d.abs()).clamp_min(1.0)
            )
    if dtype == torch.bfloat16:
        bound += 2**-8 * ref.abs()
    return bool(torch.all((y.float() - ref).abs() <= bound))


@native
def test_mxfp4_moe_prompt_with_extreme_scales(moe_isa):
    """Scale bytes outside 2..252 (which the bf16 kernels cannot fold into an exponent; 0 and 1 here,
    whose blocks are denormal) in a prompt's busy experts: their rows take the kernel that handles
    them, on every instruction set."""
    generator = torch.Generator().manual_seed(5)
    stacks = moe_weights(3, 128, 64, generator, torch.bfloat16)
    stacks[1][0, 5, 2] = 0  # gate_up scales: 2^-127
    stacks[1][1, 70, 1] = 1
    stacks[4][2, 9, 0] = 0  # down scales
    x = (torch.randn(100, 128, generator=generator) * 0.5).bfloat16()  # ~67 tokens an expert
    idx = torch.stack([torch.randperm(3, generator=generator)[:2] for _ in range(100)])
    weight = torch.softmax(torch.randn(100, 2, generator=generator), dim=-1).bfloat16()
    with torch.no_grad():
        y = ops.mxfp4_moe(x, idx, weight, *stacks, alpha=1.702, limit=7.0)
    assert moe_close(y, x, idx, weight, stacks)


@native
def test_mxfp4_moe_tokens_spread_over_the_experts_compute_what_each_alone_does():
    """Eight tokens on different experts take the decode kernel (an expert has at most four
    tokens), as each token alone does: the same numbers, bit for bit. (The prefill kernel sums in
    another order: with these weights one output of the 4096 differs by a bf16 step.)"""
    generator = torch.Generator().manual_seed(3)
    experts, k, hidden, inter = 16, 2, 512, 384
    stacks = moe_weights(experts, hidden, inter, generator, torch.bfloat16)
    x = torch.randn(8, hidden, generator=generator).to(torch.bfloat16)
    idx = torch.randperm(experts, generator=generator).view(8, k)
    weight = torch.softmax(torch.randn(8, k, generator=generator), dim=-1).to(torch.bfloat16)
    with torch.no_grad():
        batch = ops.mxfp4_moe(x, idx, weight, *stacks, alpha=1.702, limit=7.0)
        alone = [
            ops.mxfp4_moe(x[t : t + 1], idx[t : t + 1], weight[t : t + 1], *stacks, alpha=1.702, limit=7.0)
            for t in range(8)
        ]
    assert torch.equal(batch, torch.cat(alone))


@native
def test_mxfp4_moe_experts_with_few_tokens_compute_as_alone_beside_a_busy_one():
    """A batch of decode steps gives a few experts many of its tokens and most experts one to four:
    those take the decode kernel for their own count, not the busiest expert's, so each group of
    tokens gets the numbers a call of its own gives, bit for bit. (With one kernel for all, chosen
    for the busiest, two outputs of the few-token group differ by a bf16 step here.)"""
    generator = torch.Generator().manual_seed(2)
    experts, k, hidden, inter = 8, 2, 512, 384
    stacks = moe_weights(experts, hidden, inter, generator, torch.bfloat16)
    x = torch.randn(14, hidden, generator=generator).to(torch.bfloat16)
    busy = torch.tensor([[0, 1]] * 8)  # experts 0 and 1: 8 tokens each
    few = torch.tensor([[2, 3], [4, 5], [2, 6], [7, 3], [4, 2], [6, 7]])  # 1-3 tokens each
    idx = torch.cat([busy, few])
    weight = torch.softmax(torch.randn(14, k, generator=generator), dim=-1).to(torch.bfloat16)
    with torch.no_grad():
        batch = ops.mxfp4_moe(x, idx, weight, *stacks, alpha=1.702, limit=7.0)
        apart = [
            ops.mxfp4_moe(x[r], idx[r], weight[r], *stacks, alpha=1.702, limit=7.0)
            for r in (slice(0, 8), slice(8, 14))
        ]
    assert torch.equal(batch, torch.cat(apart))


@native
@pytest.mark.parametrize("n", [1, 13, 150])  # 150: ~100 tokens an expert, the prompt kernels
def test_mxfp4_moe_sums_the_same_whatever_the_thread_count(n):
    """Down-projection rows are handed out in runs that depend on the thread count; each output
    must still add its experts in one order, so the results are equal bit for bit."""
    generator = torch.Generator().manual_seed(n)
    experts, k, hidden, inter = 6, 4, 256, 192  # 8 down-projection tiles, several runs per thread
    stacks = moe_weights(experts, hidden, inter, generator, torch.bfloat16)
    x = torch.randn(n, hidden, generator=generator).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(n)])
    weight = torch.softmax(torch.randn(n, k, generator=generator), dim=-1).to(torch.bfloat16)
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2, 3):
            ops.set_num_threads(threads)
            with torch.no_grad():
                outputs.append(ops.mxfp4_moe(x, idx, weight, *stacks, alpha=1.702, limit=7.0))
    finally:
        ops.set_num_threads(before)
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])


@native
def test_mxfp4_moe_refuses_an_expert_it_does_not_have():
    stacks = moe_weights(2, 32, 32, torch.Generator().manual_seed(0), torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="expert index 2 is outside 0..1"):
        ops.mxfp4_moe(
            torch.randn(1, 32), torch.tensor([[2]]), torch.ones(1, 1), *stacks, alpha=1.7, limit=7.0
        )


def test_mxfp4_moe_reference_path_allows_autograd():
    generator = torch.Generator().manual_seed(1)
    stacks = moe_weights(3, 32, 32, generator, torch.float32)
    x = torch.randn(4, 32, generator=generator, requires_grad=True)
    idx, weight = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1]]), torch.full((4, 2), 0.5)
    y = ops.mxfp4_moe(x, idx, weight, *stacks, alpha=1.702, limit=7.0)
    with torch.no_grad():
        expected = ops.mxfp4_moe(x, idx, weight, *stacks, alpha=1.702, limit=7.0)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    weight.requires_grad_()  # a router being trained: its gradient flows too
    ops.mxfp4_moe(x.detach(), idx, weight, *stacks, alpha=1.702, limit=7.0).sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- decode-time helpers
@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [7, 64, 2880])
def test_rms_norm(isa, dtype, dim):
    from gptoss.model import rms_norm

    g = torch.Generator().manual_seed(dim)
    x = (torch.randn(3, 5, dim, generator=g) * 4).to(dtype)
    weight = torch.randn(dim, generator=g).to(dtype)
    y, ref = ops.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    # fp32 sums in another order; bf16 results may round to the neighbouring value
    tolerance = 2**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.float(), ref.float(), atol=tolerance, rtol=tolerance)


def _scattered(batch: int, tokens: int, keys: int, window: int | None, g: torch.Generator) -> Visibility:
    """Keys at distinct scattered positions 1 .. keys + 6 (a fifth of the slots empty) and queries
    anywhere: what a query sees is no span of the keys."""
    positions = torch.stack([torch.randperm(keys + 6, generator=g)[:keys] + 1 for _ in range(batch)])
    positions[torch.rand(batch, keys, generator=g) < 0.2] = -1
    return Visibility(torch.randint(0, keys + 8, (batch, tokens), generator=g), positions, window)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [16, 20, 64])  # 20: not a multiple of the vector width
@pytest.mark.parametrize("tokens", [1, 3, 20])  # 20: a prompt's queries (native with AVX-512)
@pytest.mark.parametrize(("keys", "window"), [(11, None), (37, 9)])  # vector steps of 16 with a tail
def test_sink_attention_over_a_cache(isa, dtype, dim, tokens, keys, window):
    from gptoss.model import sink_attention

    g = torch.Generator().manual_seed(dim * 10 + tokens)
    batch, heads, kv_heads = 2, 8, 2
    cache_k = torch.randn(batch, kv_heads, keys + 5, dim, generator=g).to(dtype)
    cache_v = torch.randn(batch, kv_heads, keys + 5, dim, generator=g).to(dtype)
    k, v = cache_k[:, :, :keys], cache_v[:, :, :keys]  # the cache's strided view, as attention gets it
    q = (torch.randn(batch, heads, tokens, dim, generator=g) * 2).to(dtype)
    visible = _scattered(batch, tokens, keys, window, g)
    visible.queries[1, 0] = 0  # a query that sees no key (none at 0): all its weight goes to the sink
    sinks = torch.randn(heads, generator=g)
    out, ref = ops.sink_attention(q, k, v, visible, sinks), sink_attention(q, k, v, visible, sinks)
    assert out.dtype == dtype and out.shape == (batch, heads, tokens, dim)
    assert torch.all(out[1, :, 0] == 0)
    # bf16: probabilities and outputs round to bf16 in both; fp32 sums in another order may put
    # one of them on the neighbouring value
    tolerance = 2**-6 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), ref.float(), atol=tolerance, rtol=tolerance)
    shared = Visibility(visible.queries[:1], visible.keys[:1], window)  # one row's positions for every row
    torch.testing.assert_close(
        ops.sink_attention(q, k, v, shared, sinks).float(),
        sink_attention(q, k, v, shared, sinks).float(),
        atol=tolerance,
        rtol=tolerance,
    )


def _assert_tiles_match(q, k, v, visible: Visibility, sinks, rows) -> None:
    """ops.sink_attention against the reference, and each (b, t) of `rows` computed alone: the same
    bits, as decoding and a speculative verify pass need."""
    from gptoss.model import sink_attention

    out, ref = ops.sink_attention(q, k, v, visible, sinks), sink_attention(q, k, v, visible, sinks)
    torch.testing.assert_close(out.float(), ref.float(), atol=2**-6, rtol=2**-6)
    for b, t in rows:
        keys = None if visible.keys is None else visible.keys[b : b + 1]
        alone = ops.sink_attention(
            q[b : b + 1, :, t : t + 1],
            k[b : b + 1],
            v[b : b + 1],
            Visibility(visible.queries[b : b + 1, t : t + 1], keys, visible.window),
            sinks,
        )
        assert torch.equal(alone[0, :, 0], out[b, :, t])


@native
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(8, 2, 64), (8, 8, 32), (16, 2, 128), (6, 1, 64)]
)  # groups of 4, 1, 8, 6 query heads a key/value head
@pytest.mark.parametrize(
    ("tokens", "keys", "window"), [(1, 300, None), (40, 71, None), (37, 203, 16), (7, 8300, None)]
)  # 8300 keys: units of the fewest tokens (UNIT_MIN_TOKENS) and a tail
def test_sink_attention_in_tiles(isa, heads, kv_heads, dim, tokens, keys, window):
    """bf16 attention over several tiles of 32 keys (the AVX-512 BF16 kernel takes the query heads
    of a key/value head together), tails, windows that skip whole tiles, batch rows at different
    positions over a full layer's keys (key s at position s), against the reference; and every query
    row's numbers are the same bits when it is computed alone."""
    g = torch.Generator().manual_seed(heads * dim + tokens)
    batch = 2
    q = (torch.randn(batch, heads, tokens, dim, generator=g) * 2).bfloat16()
    k = torch.randn(batch, kv_heads, keys, dim, generator=g).bfloat16()
    v = torch.randn(batch, kv_heads, keys, dim, generator=g).bfloat16()
    starts = torch.tensor([keys - tokens, keys // 2])[:, None]
    visible = Visibility(starts + torch.arange(tokens), None, window)
    sinks = torch.randn(heads, generator=g) * 3
    _assert_tiles_match(q, k, v, visible, sinks, [(0, 0), (1, tokens - 1), (1, tokens // 2)])


@native
@pytest.mark.parametrize(("ring", "tokens", "starts"), [(37, 45, [0, 5, 37, 100]), (48, 1, [0, 47, 48, 130])])
def test_sink_attention_in_tiles_over_a_ring(isa, ring, tokens, starts):
    """A sliding layer's keys as the cache hands them over: the ring (slot s holds the latest
    position ≡ s mod ring before the chunk, empty slots at negative positions), then the chunk's own
    keys; rows at different starts (an empty ring, one partly filled, one wrapped), an odd window."""
    g = torch.Generator().manual_seed(ring + tokens)
    batch, heads, kv_heads, dim = len(starts), 8, 2, 64
    start = torch.tensor(starts)[:, None]
    positions = start + torch.arange(tokens)  # (B, T)
    slot = torch.arange(ring)
    newest = start - 1 + (tokens == 1)  # (a decode step's ring holds its own token already)
    ring_positions = slot + ring * torch.div(newest - slot, ring, rounding_mode="floor")
    keys = ring_positions if tokens == 1 else torch.cat([ring_positions, positions], dim=1)
    q = (torch.randn(batch, heads, tokens, dim, generator=g) * 2).bfloat16()
    k = torch.randn(batch, kv_heads, keys.shape[1], dim, generator=g).bfloat16()
    v = torch.randn(batch, kv_heads, keys.shape[1], dim, generator=g).bfloat16()
    visible = Visibility(positions, keys, ring)
    sinks = torch.randn(heads, generator=g) * 3
    _assert_tiles_match(q, k, v, visible, sinks, [(0, 0), (1, tokens - 1), (2, tokens // 2), (3, 0)])


def test_prefill_attention_in_bf16_weights_fp32_values(monkeypatch):
    """Without bf16 dot products in the CPU, bf16 queries beyond the native kernel's rows weight
    fp32 copies of the values by the bf16-rounded probabilities: the reference's products and fp32
    sums, in another order, rounded once."""
    from gptoss.model import sink_attention

    g = torch.Generator().manual_seed(0)
    tokens, keys, heads, kv_heads, dim = ops.MAX_ROWS + 5, 29, 8, 2, 64
    q = (torch.randn(1, heads, tokens, dim, generator=g) * 2).bfloat16()
    k = torch.randn(1, kv_heads, keys, dim, generator=g).bfloat16()
    v = torch.randn(1, kv_heads, keys, dim, generator=g).bfloat16()
    visible = _scattered(1, tokens, keys, None, g)
    sinks = torch.randn(heads, generator=g)
    monkeypatch.setattr(ops, "BF16_GEMM_IN_HARDWARE", False)
    monkeypatch.setattr(ops, "_native_prompt_attention", lambda: False)  # (AVX2: not for prompts)
    with torch.no_grad():
        out = ops.sink_attention(q, k, v, visible, sinks)
    ref = sink_attention(q, k, v.float(), visible, sinks, probs_dtype=torch.bfloat16)  # fp32 out
    assert out.dtype == torch.bfloat16 and out.shape == (1, heads, tokens, dim)
    assert torch.equal(out, ref.to(torch.bfloat16))  # what sink_attention takes on such CPUs
    bound = 1e-5 + 2**-8 * ref.abs()  # one bf16 rounding (2^-9) and the reference's own
    assert torch.all((out.float() - ref).abs() <= bound)
    torch.testing.assert_close(out, sink_attention(q, k, v, visible, sinks), atol=2**-6, rtol=2**-6)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3])
def test_linears_equal_one_linear_each(isa, dtype, n):
    # q, k and v of a layer in one call: the same kernels on the same rows, so the same bits
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 96, generator=g).to(dtype)
    bf16 = [
        (torch.randn(out, 96, generator=g).to(torch.bfloat16), None, torch.randn(out, generator=g).to(dtype))
        for out in (50, 17, 17)
    ]
    int8 = [
        (torch.randint(-127, 128, (out, 96), generator=g).to(torch.int8), torch.rand(out, generator=g), None)
        for out in (40, 9)  # int8 weights with their row scales, no bias
    ]
    for layers in (bf16, int8):
        together = ops.linears(x, layers)
        apart = [ops.linear(x, w, b) if s is None else ops.int8_linear(x, w, s, b) for w, s, b in layers]
        assert len(together) == len(layers)
        for y, ref in zip(together, apart, strict=True):
            assert y.dtype == dtype and torch.equal(y, ref)
    mixed = ops.linears(x, [bf16[0], int8[0]])  # not one kind: one call each
    assert torch.equal(mixed[1], ops.int8_linear(x, *int8[0][:2]))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (3, 20): a prompt's tokens; (2, 300): enough of them to go to the threads
@pytest.mark.parametrize("batch,tokens", [(1, 1), (2, 3), (3, 20), (2, 300)])
def test_rotary_equals_the_reference(isa, dtype, batch, tokens):
    from gptoss.model import apply_rotary

    g = torch.Generator().manual_seed(batch * tokens)
    q = (torch.randn(batch, tokens, 8, 64, generator=g) * 3).to(dtype)
    k = (torch.randn(batch, tokens, 2, 64, generator=g) * 3).to(dtype)
    angles = torch.rand(batch, tokens, 32, generator=g) * 100
    cos, sin = angles.cos() * 1.3, angles.sin() * 1.3
    ref_q, ref_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out_q, out_k = ops.rotary_(q, k, cos, sin)
    assert out_q is q and out_k is k  # in place
    # the same fp32 products and differences, rounded once to the dtype: the same bits
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
