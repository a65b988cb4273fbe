"""The shift-add kernel (kernels/shiftadd_tir.py) against its references, bit for bit.

The integer pipeline makes exact equality the right bound: the TVM kernel, the torch custom op
and a literal numpy transcription must agree to the last bit on DeiT-S shapes and odd ones."""
import numpy as np
import pytest
import torch

from vitopt.errors import ConfigError, InputError
from vitopt.ir.shift import ShiftLinear, codes_to_weight, encode_weight
from vitopt.kernels.shiftadd_reference import shift_linear_naive_np, shift_linear_ref

tvm = pytest.importorskip("tvm")
from vitopt.kernels import shiftadd_tir  # noqa: E402

ODD = [(7, 13, 29), (1, 5, 3), (3, 1, 2)]  # (rows, in features, out features)


def _case(m, k, n, seed=0, max_shift=6, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 3
    codes, scale = encode_weight(torch.randn(n, k, generator=gen) * 0.05, max_shift)
    b = torch.randn(n, generator=gen) if bias else None
    return x, codes, scale, b


@pytest.fixture(scope="module")
def any_rows_kernel():
    return {}


def _kernel(cache, k, n, act_bits=16):
    key = (k, n, act_bits)
    if key not in cache:
        cache[key] = shiftadd_tir.build(None, k, n, act_bits)
    return cache[key]


@pytest.mark.parametrize("m,k,n", ODD)
@pytest.mark.parametrize("act_bits", [16, 8])
def test_reference_matches_literal_numpy(m, k, n, act_bits):
    x, codes, scale, bias = _case(m, k, n, seed=m + k)
    ref = shift_linear_ref(x, codes, scale, bias, act_bits, 6).numpy()
    naive = shift_linear_naive_np(x.numpy(), codes.numpy(), scale.numpy(), bias.numpy(), act_bits,
                                  6)
    assert np.array_equal(ref, naive)


@pytest.mark.parametrize("m,k,n", ODD + [(197, 384, 1536), (197, 1536, 384)])
def test_kernel_equals_reference_exactly(m, k, n, any_rows_kernel):
    x, codes, scale, bias = _case(m, k, n)
    kernel = _kernel(any_rows_kernel, k, n)
    out = kernel(x.numpy(), codes.numpy(), scale.numpy(), bias.numpy())
    ref = shift_linear_ref(x, codes, scale, bias, 16, 6).numpy()
    assert np.array_equal(out, ref), np.abs(out - ref).max()


def test_kernel_batch_dims_zero_rows_and_int8_activations(any_rows_kernel):
    x, codes, scale, _ = _case(2 * 5, 13, 29, seed=3)
    x = x.reshape(2, 5, 13)
    x[0, 1] = 0.0  # an all-zero row takes the scale-1 path
    kernel = _kernel(any_rows_kernel, 13, 29)
    out = kernel(x.numpy(), codes.numpy(), scale.numpy())
    assert out.shape == (2, 5, 29)
    assert np.array_equal(out, shift_linear_ref(x, codes, scale, None, 16, 6).numpy())
    assert not out[0, 1].any()
    k8 = _kernel(any_rows_kernel, 13, 29, act_bits=8)
    assert np.array_equal(k8(x.numpy(), codes.numpy(), scale.numpy()),
                          shift_linear_ref(x, codes, scale, None, 8, 6).numpy())


def test_kernel_fixed_rows_and_every_shift_value():
    """All codes from -(max_shift+1) to max_shift+1, built for a static row count; K = 31 is
    prime and max_shift 9 gives chunks of 2^7 terms: 31 chunks of one term."""
    k, n, max_shift = 31, 17, 9
    codes = (torch.arange(n * k) % (2 * max_shift + 3) - (max_shift + 1)).to(torch.int8).reshape(n, k)
    scale = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.1
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(2)) * 100
    kernel = shiftadd_tir.build(6, k, n, max_shift=max_shift)
    assert np.array_equal(kernel(x.numpy(), codes.numpy(), scale.numpy()),
                          shift_linear_ref(x, codes, scale, None, 16, max_shift).numpy())
    with pytest.raises(InputError, match="built for"):
        kernel(np.zeros((5, k), np.float32), codes.numpy(), scale.numpy())


def test_launcher_validates_inputs(any_rows_kernel):
    kernel = _kernel(any_rows_kernel, 13, 29)
    x, codes, scale, _ = _case(3, 13, 29)
    with pytest.raises(InputError, match="int8"):
        kernel(x.numpy(), codes.numpy().astype(np.int32), scale.numpy())
    with pytest.raises(InputError, match="scale"):
        kernel(x.numpy(), codes.numpy(), scale.numpy()[:5])
    with pytest.raises(InputError, match="max_shift"):
        kernel(x.numpy(), np.full((29, 13), 9, np.int8), scale.numpy())
    with pytest.raises(InputError, match="x has shape"):
        kernel(x.numpy()[:, :4], codes.numpy(), scale.numpy())
    with pytest.raises(ConfigError, match="act_bits"):
        shiftadd_tir.prim_func(None, 4, 4, act_bits=4)
    with pytest.raises(ConfigError, match="schedule"):
        shiftadd_tir.load_tuning("rocm")


def test_llvm_kernel_is_vectorized(any_rows_kernel):
    asm = _kernel(any_rows_kernel, 384, 1536).lib.mod.inspect_source("asm")
    # variable left shifts on whole vector registers (vpsllvd: AVX2 ymm / AVX-512 zmm)
    assert any(f"vpsllvd" in line and ("%zmm" in line or "%ymm" in line)
               for line in asm.splitlines()), "the shift loop was not vectorized"


def test_cuda_cross_compiles_without_gpu():
    kernel = shiftadd_tir.build(None, 384, 1536, kind="cuda")
    device_modules = kernel.lib.mod.imports
    assert [m.kind for m in device_modules] == ["cuda"]
    source = device_modules[0].inspect_source()
    assert "threadIdx.x" in source and "<<" in source  # the left shifts of the kernel
    with pytest.raises(Exception, match="llvm"):
        kernel(np.zeros((1, 384), np.float32), np.zeros((1536, 384), np.int8),
               np.ones(1536, np.float32))


def test_encode_weight_and_shift_linear_module():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(29, 13)
    layer = ShiftLinear.from_linear(linear, max_shift=5)
    assert layer.weight_q.dtype == torch.int8 and layer.weight_q.abs().max() <= 6
    w = layer.weight
    unit = w / layer.weight_scale[:, None]
    nonzero = unit[unit != 0].abs()
    assert torch.equal(torch.exp2(torch.round(torch.log2(nonzero))), nonzero)  # powers of two
    # the fit is at least as good as the plain max-abs scale
    codes, scale = encode_weight(linear.weight, 5)
    assert torch.equal(codes_to_weight(codes, scale), w)
    x = torch.randn(3, 4, 29, generator=gen)
    assert torch.equal(layer(x), shift_linear_ref(x, layer.weight_q, layer.weight_scale,
                                                  layer.bias, 16, 5))
    # the integer product is exact: equal to the float product of the rounded activations
    from vitopt.kernels.shiftadd_reference import quantize_rows
    xq, sx = quantize_rows(x.reshape(-1, 29), 16)
    dense = ((xq.double() * sx.double()[:, None]) @ w.double().t() + layer.bias.double())
    assert torch.allclose(layer(x).reshape(-1, 13).double(), dense, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="act_bits"):
        ShiftLinear(codes, scale, None, 5, act_bits=12)
