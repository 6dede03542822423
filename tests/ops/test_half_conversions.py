"""The kernels' own fp32 <-> fp16 / bf16 conversions (csrc/common/kd_common.h, and Triton's
casts), pushed through an op whose fp32 result is known exactly: a solver step whose outputs
are ``1 * aux`` (every other coefficient 0, so no other term is added). Stored in a 16-bit
dtype, the result must be torch's ``.to(dtype)`` of the fp32 value bit for bit: round to
nearest even (ties included), subnormals, overflow to inf at 65520 for fp16, NaN kept a NaN.
Read from a 16-bit input, it must be the exact fp32 value (fp16 subnormals included).
"""
import math

import numpy as np
import pytest
import torch

from kdfast import ops
from kdfast.ops.solver_step import coefficients

from conftest import usable_backends

BACKENDS = usable_backends("solver_step")

# out_0 (sample) = out_1 (history) = 1 * aux; every other coefficient is 0 (its term dropped)
IDENTITY = torch.tensor(coefficients(0.0, 0.0, sample={"aux": 1.0}, history={"aux": 1.0}), dtype=torch.float32)


def floats_from_bits(bits):
    return torch.from_numpy(np.asarray(bits, dtype=np.uint32).view(np.float32).copy())


def all_16bit_values(dtype, backend):
    """Every 16-bit pattern as ``dtype`` except -0 (0 + 1 * -0 may be +0); for the Triton
    interpreter (slow, and flushing bf16 subnormals on load, unlike a GPU) a spread subset
    that keeps every fp16 subnormal and the ends of the range."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32)
    if backend == "triton" and not torch.cuda.is_available():
        magnitude = bits & 0x7fff
        keep = (torch.arange(bits.numel()) % 41 == 0) | (magnitude >= 0x7bf0)
        if dtype == torch.float16:
            keep |= magnitude < 0x0410
        else:
            keep &= (magnitude >= 0x0080) | (magnitude == 0)
        bits = bits[keep]
    h = bits.to(torch.int16).view(dtype)
    return h[~((h == 0) & torch.signbit(h))]


def bits16(t):
    return t.view(torch.int16).numpy().view(np.uint16)


def step_identity(values, sample_dtype, history_dtype, backend):
    """(sample, history) outputs of a step whose outputs are ``1 * values``."""
    shape = values.shape
    x = torch.zeros(shape, dtype=sample_dtype)
    model = torch.zeros(shape, dtype=sample_dtype)
    out = ops.solver_step(x, model, IDENTITY, aux=values, write_history=True, history_dtype=history_dtype,
                          backend=backend)
    return out.sample, out.history


def crafted_fp32():
    """fp32 values at every kind of 16-bit rounding boundary (none is -0: 0 + 1 * -0 may be +0)."""
    bits = []
    rng = np.random.default_rng(0)
    # bf16: exact ties (low half 0x8000) above even and odd upper halves, and their neighbours.
    highs = np.concatenate([np.arange(0x3f80, 0x3f90), rng.integers(0x0080, 0x7f7f, 200),
                            rng.integers(0x8080, 0xff7f, 200), [0x0000, 0x0001, 0x007f, 0x7f7e, 0x8001, 0xff7e]])
    for hi in highs:
        for lo in (0x7fff, 0x8000, 0x8001, 0x0001, 0xffff):
            bits.append((int(hi) << 16) | lo)
    # fp16 normal range: ties at bit 12 (binary16 keeps 10 of fp32's 23 mantissa bits).
    for e in (103, 113, 120, 127, 134, 140, 142):  # fp32 biased exponents within fp16's normal range
        for man in rng.integers(0, 1 << 10, 20):
            base = (e << 23) | (int(man) << 13)
            for lo in (0x0fff, 0x1000, 0x1001):
                bits.append(base | lo)
                bits.append(0x80000000 | base | lo)
    f = floats_from_bits(bits)
    extra = [
        # fp16 subnormals (k * 2^-24) and exact ties between them ((k + 1/2) * 2^-24), both parities
        *[(k + 0.5) * 2.0 ** -24 for k in range(0, 40)],
        *[-(k + 0.5) * 2.0 ** -24 for k in range(0, 40)],
        *[k * 2.0 ** -24 for k in range(1, 1024, 7)],
        *[(k + 0.25) * 2.0 ** -24 for k in range(0, 40)], *[(k + 0.75) * 2.0 ** -24 for k in range(0, 40)],
        1022.5 * 2.0 ** -24, 1023.5 * 2.0 ** -24, 1023.75 * 2.0 ** -24, 2.0 ** -14, 2.0 ** -26, 2.0 ** -25 * 1.0001,
        # fp16 overflow: 65504 is the largest finite, 65520 and up round to inf
        65504.0, -65504.0, 65505.0, 65519.0, 65519.99609375, -65519.99609375, 65520.0, -65520.0, 65536.0, 1e6,
        65488.0, 65491.0, 65496.0, 65500.0,
        # bf16 overflow and fp32 extremes
        3.3895313892515355e38, 3.4028234663852886e38, -3.4028234663852886e38, 1e-45, 1e-40, -1e-40,
        math.inf, -math.inf, 1.0, -2.0, 0.0,
    ]
    f = torch.cat([f, torch.tensor(extra, dtype=torch.float32)])
    # NaNs whose payload would carry into the exponent, or wrap the sign, if rounded like numbers
    nans = floats_from_bits([0x7fffffff, 0xffffffff, 0x7fff8000, 0xffff8000, 0x7fc00000, 0xffc00000, 0x7fc0ffff])
    f = torch.cat([f, nans])
    return f[~((f == 0) & torch.signbit(f))]


def assert_same_16(out, f, dtype, name):
    expected = f.to(dtype)
    assert out.dtype == dtype
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan), f"{name}: NaN where torch has none, or the reverse"
    got, want = bits16(out[~nan]), bits16(expected[~nan])
    bad = np.nonzero(got != want)[0]
    if bad.size:
        src = f[~nan][bad[:8]].numpy().view(np.uint32)
        pairs = ", ".join(f"{s:#010x}->{g:#06x} (torch {w:#06x})" for s, g, w in zip(src, got[bad[:8]], want[bad[:8]]))
        raise AssertionError(f"{name}: {bad.size} values rounded unlike torch: {pairs}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy: overflow to inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_stored_as_fp16_rounds_like_torch(backend):
    f = crafted_fp32()
    sample, history = step_identity(f.reshape(1, -1), torch.float16, torch.float16, backend)
    assert_same_16(sample.reshape(-1), f, torch.float16, f"{backend} fp16 sample")
    assert_same_16(history.reshape(-1), f, torch.float16, f"{backend} fp16 history")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_stored_as_bf16_rounds_like_torch(backend):
    f = crafted_fp32()
    sample, history = step_identity(f.reshape(1, -1), torch.bfloat16, torch.bfloat16, backend)
    assert_same_16(sample.reshape(-1), f, torch.bfloat16, f"{backend} bf16 sample")
    assert_same_16(history.reshape(-1), f, torch.bfloat16, f"{backend} bf16 history")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_output_dtypes(backend):
    # A bf16 sample with an fp16 history entry (and the reverse): each output rounds on its own.
    f = crafted_fp32()
    for sample_dtype, history_dtype in ((torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)):
        sample, history = step_identity(f.reshape(1, -1), sample_dtype, history_dtype, backend)
        assert_same_16(sample.reshape(-1), f, sample_dtype, f"{backend} {sample_dtype} sample")
        assert_same_16(history.reshape(-1), f, history_dtype, f"{backend} {history_dtype} history")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16bit_value_widens_exactly(backend, dtype):
    # All 65536 bit patterns as the aux input: subnormals, the largest finite values, inf and NaN
    # come out of the fp32 step as torch's exact .float() (-0 left out: 0 + 1 * -0 may be +0).
    h = all_16bit_values(dtype, backend)
    sample, history = step_identity(h.reshape(1, -1), torch.float32, torch.float32, backend)
    expected = h.float()
    for name, out in (("sample", sample), ("history", history)):
        out = out.reshape(-1)
        assert out.dtype == torch.float32
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(out), nan), f"{backend} {dtype} {name}: NaN mismatch"
        assert torch.equal(out[~nan].view(torch.int32), expected[~nan].view(torch.int32)), \
            f"{backend} {dtype} {name}: widened values differ from torch's"
    # spot values: the smallest fp16 subnormal is 2^-24, the largest 1023 * 2^-24
    if dtype == torch.float16:
        sub = torch.tensor([0x0001, 0x03ff, 0x8001, 0x0200], dtype=torch.int32).to(torch.int16).view(torch.float16)
        out, _ = step_identity(sub.reshape(1, -1), torch.float32, torch.float32, backend)
        assert out.reshape(-1).tolist() == [2.0 ** -24, 1023 * 2.0 ** -24, -(2.0 ** -24), 2.0 ** -15]


@pytest.mark.parametrize("backend", BACKENDS)
def test_16bit_input_to_16bit_output_is_exact(backend):
    # fp16 -> fp32 -> fp16 (and bf16 likewise) must round-trip every non-NaN value bit for bit.
    for dtype in (torch.float16, torch.bfloat16):
        h = all_16bit_values(dtype, backend)
        h = h[~torch.isnan(h)]
        sample, history = step_identity(h.reshape(1, -1), dtype, dtype, backend)
        assert torch.equal(sample.reshape(-1).view(torch.int16), h.view(torch.int16)), f"{backend} {dtype}"
        assert torch.equal(history.reshape(-1).view(torch.int16), h.view(torch.int16)), f"{backend} {dtype}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kd_divergence_gradient_rounds_like_torch(dtype):
    # The same conversion on another op's store path: kd_divergence's 16-bit gradient on the CPU
    # backend is its fp32 gradient rounded once, bit for bit like torch.
    g = torch.Generator().manual_seed(5)
    s = torch.randn(16, 515, generator=g) * 4
    t = torch.randn(16, 515, generator=g) * 4
    for kind in ("forward_kl", "jsd"):
        for loss_scale in (1.0, 1e-6, 3e4):  # tiny gradients are fp16 subnormals, big ones overflow
            args = dict(kind=kind, loss_scale=loss_scale, backend="cpu")
            _, grad32 = ops.kd_divergence_with_grad(s, t, **args)
            _, grad = ops.kd_divergence_with_grad(s, t, grad_dtype=dtype, **args)
            assert_same_16(grad.reshape(-1), grad32.reshape(-1), dtype, f"{kind} {loss_scale}")


def short_rows(t, width=7):
    """``t`` as rows of ``width`` elements (padded with 1s), each shorter than the CPU's 8-lane
    F16C / AVX2 conversion blocks: on the CPU backend every element then takes the scalar
    conversions of kd_common.h, which rows of full blocks only reach in their last few elements
    (only the KDFAST_CPU_BASELINE=1 build runs them everywhere)."""
    pad = (-t.numel()) % width
    return torch.cat([t, torch.ones(pad, dtype=t.dtype)]).reshape(-1, width), t.numel()


# (only the CPU launcher converts in blocks; the Triton interpreter would take minutes over rows of 7)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_short_rows_convert_like_torch(backend, dtype):
    # The crafted rounding cases (subnormal ties, the 65520 overflow, NaN) stored from rows of 7,
    # and every 16-bit pattern widened from rows of 7.
    f = crafted_fp32()
    rows, n = short_rows(f)
    sample, history = step_identity(rows, dtype, dtype, backend)
    assert_same_16(sample.reshape(-1)[:n], f, dtype, f"{backend} {dtype} sample, short rows")
    assert_same_16(history.reshape(-1)[:n], f, dtype, f"{backend} {dtype} history, short rows")
    h = all_16bit_values(dtype, backend)
    rows, n = short_rows(h)
    sample, _ = step_identity(rows, torch.float32, torch.float32, backend)
    out, expected = sample.reshape(-1)[:n], h.float()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan), f"{backend} {dtype}: NaN mismatch, short rows"
    assert torch.equal(out[~nan].view(torch.int32), expected[~nan].view(torch.int32)), \
        f"{backend} {dtype}: widened values differ from torch's, short rows"
