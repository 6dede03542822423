import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdfast import ops
from kdfast.backends import BackendUnavailableError
from kdfast.reference import group_norm as ref

from conftest import usable_backends
from helpers import assert_close_by_rule

BACKENDS = usable_backends("group_norm_act")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, groups): one position, one channel per group, primes, a 3-D sequence, a 5-D volume,
# a group wider than the CPU's widening block (4096), a batch of one; small maps whose groups
# a CPU task takes several at a time (runs of 14, 14 and 4 groups of 3x3 maps; 2 runs of 2x2).
CASES = [((3, 8, 1, 1), 4), ((2, 6, 5, 7), 6), ((4, 12, 3, 11), 3), ((2, 10, 13), 5), ((2, 4, 3, 5, 2), 2),
         ((2, 16, 67, 71), 4), ((1, 32, 16, 16), 8), ((2, 1024, 3, 3), 32), ((2, 2048, 2, 2), 32)]


def randn(shape, dtype, seed, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def inputs(shape, dtype, seed, channels_last=False, shift=True, affine=True):
    n, c = shape[:2]
    x = randn(shape, dtype, seed, 2.0, 0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    w = randn((c,), dtype, seed + 1) if affine else None
    b = randn((c,), dtype, seed + 2) if affine else None
    s = randn((n, c), dtype, seed + 3) if shift else None
    return x, w, b, s


def assert_matches(out, x, groups, w, b, s, activation, eps=1e-5, name="", backend=None):
    expect64 = ref.group_norm_act(x, groups, w, b, eps, s, activation)
    expect_lowp = ref.group_norm_act(x, groups, w, b, eps, s, activation, dtype=None)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close_by_rule(out, expect64, expect_lowp, name=name, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_matches_reference(backend, dtype, shape, groups, activation):
    for channels_last in ((False, True) if len(shape) in (4, 5) else (False,)):
        x, w, b, s = inputs(shape, dtype, 7, channels_last)
        out = ops.group_norm_act(x, groups, w, b, shift=s, activation=activation, backend=backend)
        assert_matches(out, x, groups, w, b, s, activation, name=f"{backend} {dtype} {shape} cl={channels_last}",
              backend=backend)
        # the output keeps the input's layout
        assert out.stride() == x.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_optional_pieces_and_eps(backend):
    x, w, b, s = inputs((3, 8, 5, 4), torch.float32, 3)
    for kwargs in ({}, {"weight": w}, {"bias": b}, {"shift": s}):
        out = ops.group_norm_act(x, 2, eps=1e-3, backend=backend, **kwargs)
        assert_matches(out, x, 2, kwargs.get("weight"), kwargs.get("bias"), kwargs.get("shift"), "silu", eps=1e-3)
    # a shift given as [N, C, 1, 1] (a broadcastable embedding) means the same
    out = ops.group_norm_act(x, 2, w, b, shift=s[:, :, None, None], backend=backend)
    torch.testing.assert_close(out, ops.group_norm_act(x, 2, w, b, shift=s, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_views(backend):
    # fp16 activations with fp32 affine parameters and a bf16 shift (a half model with an fp32
    # norm), and x that is a strided view (copied) or a batch slice of a larger tensor
    x = randn((4, 6, 5, 5), torch.float16, 1)
    w, b = randn((6,), torch.float32, 2), randn((6,), torch.float64, 3).float()
    s = randn((4, 6), torch.bfloat16, 4)
    out = ops.group_norm_act(x, 3, w, b, shift=s, backend=backend)
    assert_matches(out, x, 3, w, b, s, "silu", backend=backend)
    big = randn((6, 6, 10, 5), torch.float32, 5)
    for view in (big[:, :, ::2], big[2:], big.transpose(2, 3)):
        out = ops.group_norm_act(view, 3, w, b, backend=backend)
        assert_matches(out, view, 3, w, b, None, "silu")
    wide_shift = randn((4, 12), torch.float32, 6)[:, ::2]  # a strided [N, C] view
    out = ops.group_norm_act(x.float(), 3, w, b, shift=wide_shift, backend=backend)
    assert_matches(out, x.float(), 3, w, b, wide_shift, "silu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_and_bias_of_different_dtypes_keep_the_wider(backend):
    # The kernel reads weight and bias in one dtype: the wider of the two, not the weight's (an
    # fp32 bias of 1e5 narrowed to an fp16 weight's dtype was inf; a bf16 weight cost an fp32
    # bias its digits).
    x = randn((2, 4, 3, 3), torch.float32, 7)
    for w_dtype in (torch.float16, torch.bfloat16):
        w = randn((4,), w_dtype, 8)
        b = randn((4,), torch.float32, 9, scale=1e5) + 0.1234567
        out = ops.group_norm_act(x, 2, w, b, activation="identity", backend=backend)
        expect = ref.group_norm_act(x, 2, w, b, 1e-5, None, "identity")
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), expect, rtol=2e-7, atol=1e-6)


def test_bias_without_weight_backward():
    # torch's own group_norm backward on the CPU fails with a bias and no weight; the op's
    # backward (which differentiates the reference) gives the gradients of a weight of ones
    x = randn((2, 4, 3, 3), torch.float32, 10).requires_grad_(True)
    b = randn((4,), torch.float32, 11).requires_grad_(True)
    ops.group_norm_act(x, 2, bias=b).sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    torch.nn.functional.silu(torch.nn.functional.group_norm(x2, 2, torch.ones(4), b2)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_keeps_accuracy(backend):
    # the statistics are two-pass: a group whose mean is 1e4 times its spread normalises as
    # well as torch's
    x = randn((2, 4, 64, 64), torch.float32, 9, 1.0, 1e4)
    out = ops.group_norm_act(x, 2, activation="identity", backend=backend)
    assert_matches(out, x, 2, None, None, None, "identity")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups_at_a_large_offset_give_the_bias(backend, dtype):
    # The mean was a float32 sum of the values: off by a few ulps of 1e4, which the group's
    # zero variance magnified into outputs of 0.1 to 0.5 (torch: exactly act(bias)). Every CPU
    # path: channel-major groups, small groups taken several at a time, whole channels-last
    # samples and a channels-last sample cut into blocks (a batch of one).
    cases = [((2, 8, 5, 7), 4), ((1, 32, 16, 16), 8), ((2, 64, 3, 3), 8), ((1, 64, 64, 64), 8)]
    bias = randn((64,), torch.float32, 12)
    for (shape, groups), value in zip(cases, (10000.1, 10000.1, -5000.3, 3000.7)):
        x = torch.full(shape, value, dtype=dtype)
        b = bias[:shape[1]].to(dtype)
        for fmt in (torch.contiguous_format, torch.channels_last):
            out = ops.group_norm_act(x.contiguous(memory_format=fmt), groups, None, b, backend=backend)
            expect = F.silu(b.float()[None, :, None, None].expand(shape)).to(dtype)
            rtol = 0 if dtype == torch.float32 else 2 ** -7  # (silu's rounding before the 16-bit one's)
            torch.testing.assert_close(out, expect, rtol=rtol, atol=1e-6, msg=f"{shape} {fmt}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups", [((2, 4, 8, 8), 2), ((1, 64, 64, 64), 4)])  # (the second: split on GPUs)
def test_a_shift_far_above_the_spread_keeps_accuracy(backend, shape, groups):
    # x + shift is never rounded to float32: a shift of 1000 on activations of spread 1e-2
    # normalises to float32 accuracy (torch's add + group norm is off by up to 8e-4 here)
    for channels_last in (False, True):
        x = randn(shape, torch.float32, 10, 1e-2)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        s = randn(shape[:2], torch.float32, 11, 1.0, 1000.0)
        out = ops.group_norm_act(x, groups, shift=s, activation="identity", backend=backend)
        expect = ref.group_norm_act(x, groups, None, None, 1e-5, s, "identity")
        torch.testing.assert_close(out.double(), expect, rtol=0, atol=2e-6, msg=f"channels_last={channels_last}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups", [((2, 8, 5, 7), 4), ((3, 12, 4, 4), 3), ((1, 64, 64, 64), 8)])
def test_constant_groups_at_different_offsets_give_the_bias(backend, shape, groups):
    # Every group its own constant, far from the others': a group's mean must be taken about one
    # of its own elements (deviations from another group's value are float32 sums of 1e4-sized
    # terms, a few ulps off, which the zero variance magnifies). Whole channels-last samples, a
    # sample cut into blocks (a batch of one) and the channel-major paths.
    c = shape[1]
    levels = torch.tensor([(-1.0) ** g * (10000.1 + 1234.5 * g) for g in range(groups)])
    x = levels.repeat_interleave(c // groups)[None, :, None, None].expand(shape).contiguous()
    bias = randn((c,), torch.float32, 13)
    expect = F.silu(bias[None, :, None, None].expand(shape))
    for fmt in (torch.contiguous_format, torch.channels_last):
        out = ops.group_norm_act(x.contiguous(memory_format=fmt), groups, None, bias, backend=backend)
        torch.testing.assert_close(out, expect, rtol=0, atol=1e-6, msg=f"{shape} {fmt}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups", [((2, 4, 64, 64), 2), ((2, 64, 3, 3), 8), ((3, 16, 20, 20), 4),
                                          ((1, 64, 64, 64), 8)])
def test_an_outlying_first_element_keeps_accuracy(backend, shape, groups):
    # At a mean 1e4 times the spread, each group's first element (the pivot its sums are taken
    # about) 100 spreads above the rest, with and without a shift: the error is at most the
    # rounding of the float center (mean - shift, in [8192, 16384): half an ulp is 2^-11) times
    # 1 / std. Sums of squares about the pivot less the squared offset cancel; with a shift, a
    # float center per channel biased the variance (errors of 4e-3 where this bound is 3e-4).
    # Channel-major groups, small groups taken several at a time, whole channels-last samples and
    # a channels-last sample cut into blocks (a batch of one).
    cpg = shape[1] // groups
    for channels_last in (False, True):
        for shift in (None, randn(shape[:2], torch.float32, 15)):
            x = randn(shape, torch.float32, 14, 1.0, 1e4)
            x[:, ::cpg, 0, 0] += 100.0
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = ops.group_norm_act(x, groups, shift=shift, activation="identity", backend=backend)
            expect = ref.group_norm_act(x, groups, None, None, 1e-5, shift, "identity")
            shifted = x.double() + (0 if shift is None else shift.double()[:, :, None, None])
            rstd = 1 / shifted.reshape(shape[0], groups, -1).var(-1, unbiased=False).min().sqrt().item()
            err = (out.double() - expect).abs().max().item()
            assert err <= 2 ** -11 * rstd + 1e-5, f"channels_last={channels_last} shift={shift is not None}: {err:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spatial", [(1, 2), (2, 4), (4, 4), (4, 8), (3, 8, 1)])
def test_small_maps_of_every_fixed_size(backend, spatial):
    # maps of 2, 8, 16 and 32 positions (the CPU spreads their per-channel constants with
    # fixed-length loops), channel-major groups taken several at a time, both activations
    shape = (2, 96) + spatial
    for activation in ref.ACTIVATIONS:
        x, w, b, s = inputs(shape, torch.float32, 16)
        out = ops.group_norm_act(x, 8, w, b, shift=s, activation=activation, backend=backend)
        assert_matches(out, x, 8, w, b, s, activation, name=f"{shape} {activation}")


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_one_element_groups(backend):
    # (which torch's F.group_norm refuses) normalise to 0, so to the bias; 0 / 0 at eps = 0 is NaN
    x = torch.tensor([[0.3, -0.7, 0.1], [1.0, math.nan, 2.0]])
    w, b = torch.tensor([2.0, 3.0, 4.0]), torch.tensor([0.5, 0.25, -1.0])
    out = ops.group_norm_act(x, 3, w, b, activation="identity", backend=backend)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.25, -1.0], [0.5, math.nan, -1.0]]), equal_nan=True)
    assert ops.group_norm_act(x, 3, w, b, eps=0.0, activation="identity", backend=backend).isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # (numpy, in Triton's interpreter)
def test_silu_extremes(backend):
    # a constant group normalises to the bias; huge affine values reach silu's tails
    x = torch.zeros(2, 4, 3, 3)
    w = torch.tensor([1e30, -1e30, 1.0, 1.0])
    b = torch.tensor([0.0, 0.0, 200.0, -200.0])
    out = ops.group_norm_act(x, 4, w, b, backend=backend)
    torch.testing.assert_close(out, F.silu(torch.zeros(2, 4, 3, 3) + b[None, :, None, None]), atol=1e-30, rtol=1e-6)
    x = randn((2, 4, 3, 3), torch.float32, 4)
    out = ops.group_norm_act(x, 4, w, None, backend=backend)
    expect = F.silu(F.group_norm(x.double(), 4, w.double()))
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-30)
    x[0, 0, 0, 0] = float("nan")
    out = ops.group_norm_act(x, 2, backend=backend)
    assert out[0, :2].isnan().all() and out[0, 2:].isfinite().all() and out[1].isfinite().all()


def test_split_samples_match_whole_samples():
    # channels-last batches smaller than the thread count are cut into (sample, block) tasks; the
    # result is the same, bit for bit, as a whole-sample task's (the same sums in the same order)
    x, w, b, s = inputs((6, 40, 47, 37), torch.float32, 2, channels_last=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        whole = ops.group_norm_act(x, 8, w, b, shift=s, backend="cpu")
        torch.set_num_threads(4)
        for i in (0, 3):
            one = ops.group_norm_act(x[i:i + 1], 8, w, b, shift=s[i:i + 1], backend="cpu")
            assert torch.equal(one, whole[i:i + 1])
        pair = ops.group_norm_act(x[1:3], 8, w, b, shift=s[1:3], backend="cpu")
        assert torch.equal(pair, whole[1:3])
    finally:
        torch.set_num_threads(threads)
    assert_matches(whole, x, 8, w, b, s, "silu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_channels_than_a_cpu_block(backend):
    # a pixel of over 4096 channels (the CPU's widening block), odd, in channels-last
    x, w, b, s = inputs((2, 4097, 2, 3), torch.bfloat16, 3, channels_last=True)
    out = ops.group_norm_act(x, 17, w, b, shift=s, backend=backend)
    assert_matches(out, x, 17, w, b, s, "silu", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for shape in ((0, 4, 3, 3), (2, 4, 0, 3)):
        x = torch.randn(shape)
        out = ops.group_norm_act(x, 2, shift=torch.randn(shape[:2]), backend=backend)
        assert out.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_match_torch(backend, channels_last):
    x, w, b, s = inputs((3, 8, 5, 4), torch.float32, 11, channels_last)
    grad = randn((3, 8, 5, 4), torch.float32, 12)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, s)]
    out = ops.group_norm_act(leaves[0], 4, leaves[1], leaves[2], shift=leaves[3], backend=backend)
    got = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b, s)]
    expect = torch.autograd.grad(ref.group_norm_act(leaves64[0], 4, leaves64[1], leaves64[2], 1e-5, leaves64[3]),
                                 leaves64, grad.double())
    for g, e, name in zip(got, expect, ("x", "weight", "bias", "shift")):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5, msg=name)
    if channels_last:  # x's gradient in x's layout (no contiguous copy on the way)
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    # only what needs a gradient gets one
    x2 = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(ops.group_norm_act(x2, 4, w, b, shift=s, backend=backend).sum(), [x2])
    assert gx.shape == x.shape
    # a frozen input, trained affine parameters (torch 2.13's CPU group norm backward crashed
    # on this with a channels-last x)
    out = ops.group_norm_act(x, 4, leaves[1], leaves[2], shift=s, backend=backend)
    got = torch.autograd.grad(out, leaves[1:3], grad)
    for g, e, name in zip(got, expect[1:3], ("weight", "bias")):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5, msg=name)


def test_double_backward():
    x = randn((2, 4, 3, 3), torch.float32, 1).requires_grad_()
    w = randn((4,), torch.float32, 2).requires_grad_()
    (gx,) = torch.autograd.grad(ops.group_norm_act(x, 2, w).square().sum(), [x], create_graph=True)
    (gw,) = torch.autograd.grad(gx.square().sum(), [w])
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(ref.group_norm_act(x64, 2, w64).square().sum(), [x64], create_graph=True)
    (gw64,) = torch.autograd.grad(gx64.square().sum(), [w64])
    torch.testing.assert_close(gw.double(), gw64, rtol=1e-3, atol=1e-4)


def test_reference_backend_and_forcing(unemulated_backends):
    x, w, b, s = inputs((2, 8, 3, 3), torch.float32, 5)
    out = ops.group_norm_act(x, 4, w, b, shift=s, backend="reference")
    assert_matches(out, x, 4, w, b, s, "silu")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ops.group_norm_act(x, 4, backend="cuda")


def test_opcheck():
    x, w, b, s = inputs((2, 8, 3, 3), torch.float32, 5)
    for args in ((x, s, w, b, 4, 1e-5, 1, ""), (x.contiguous(memory_format=torch.channels_last), None, None, None,
                                                 2, 1e-3, 0, "")):
        torch.library.opcheck(torch.ops.kdfast.group_norm_act.default, args)


def test_compile_and_vmap_free_paths():
    # under torch.compile the op is traced through its fake implementation
    x, w, b, s = inputs((2, 8, 3, 3), torch.float32, 5)
    compiled = torch.compile(lambda t: ops.group_norm_act(t, 4, w, b, shift=s), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ops.group_norm_act(x, 4, w, b, shift=s))


def test_bad_input():
    x = torch.randn(2, 8, 3, 3)
    for eps in ("1e-5", True):  # (float() took these as numbers)
        with pytest.raises(TypeError, match="eps must be a number"):
            ops.group_norm_act(x, 2, eps=eps)
    # 0 in the float32 kernels: a constant group's 1 / sqrt(0) made every output NaN
    with pytest.raises(ValueError, match="eps must be 0 or above 7.0064923e-46"):
        ops.group_norm_act(torch.ones(2, 8, 3, 3), 2, eps=1e-50)
    assert torch.isfinite(ops.group_norm_act(torch.ones(2, 8, 3, 3), 2, eps=0.75 * 2.0**-149)).all()  # (rounds up)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.group_norm_act([1.0], 2)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.group_norm_act(x.double(), 2)
    with pytest.raises(ValueError, match=r"x must be \[batch, channels"):
        ops.group_norm_act(torch.randn(8), 2)
    with pytest.raises(ValueError, match="num_groups must be a positive divisor of the 8 channels"):
        ops.group_norm_act(x, 3)
    with pytest.raises(ValueError, match="num_groups"):
        ops.group_norm_act(x, 0)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        ops.group_norm_act(x, 2.0)
    torch.testing.assert_close(ops.group_norm_act(x, np.int64(2)), ops.group_norm_act(x, 2))  # (as F.group_norm)
    with pytest.raises(TypeError, match="eps must be a number"):
        ops.group_norm_act(x, 2, eps=np.complex128(1e-5 + 1j))  # (float() kept the real part)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.group_norm_act(x, 2, torch.ones(4))
    with pytest.raises(TypeError, match="bias must be float32"):
        ops.group_norm_act(x, 2, None, torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 8\)"):
        ops.group_norm_act(x, 2, shift=torch.ones(2, 8, 3, 3))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        ops.group_norm_act(x, 2, eps=-1.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.group_norm_act(x, 2, activation="gelu")
    with pytest.raises(ValueError, match="activation must be in"):
        torch.ops.kdfast.group_norm_act(x, None, None, None, 2, 1e-5, 5, "")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", usable_backends("group_norm_act", "cuda"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", CASES)
def test_gpu_matches_reference(backend, dtype, shape, groups):
    for channels_last in ((False, True) if len(shape) in (4, 5) else (False,)):
        x, w, b, s = (None if t is None else t.cuda() for t in inputs(shape, dtype, 7, channels_last))
        for activation in ref.ACTIVATIONS:
            out = ops.group_norm_act(x, groups, w, b, shift=s, activation=activation, backend=backend)
            assert_matches(out.cpu(), x.cpu(), groups, w.cpu(), b.cpu(), s.cpu(), activation,
                  name=f"{backend} {dtype} {shape} cl={channels_last}")


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not usable here")
def test_triton_split_groups():
    # the GPU path for too few (sample, group) pairs, through the interpreter (which cuts groups
    # as on a 132-multiprocessor GPU): 16 chunks per group, a NaN in one chunk of one group
    from kdfast import _ext
    assert _ext.cpu()[0].group_norm_gpu_splits(1, 64, 64 * 64, 4, 132) == 16
    for channels_last in (False, True):
        x, w, b, s = inputs((1, 64, 64, 64), torch.float32, 8, channels_last)
        out = ops.group_norm_act(x, 4, w, b, shift=s, backend="triton")
        assert_matches(out, x, 4, w, b, s, "silu", backend="triton", name=f"cl={channels_last}")
    x = x.contiguous()
    x[0, 17, 63, 5] = float("nan")
    out = ops.group_norm_act(x, 4, backend="triton").view(4, -1)
    assert out[1].isnan().all() and out[[0, 2, 3]].isfinite().all()
    # a first element (the chunks' pivot) far from the group's mean: float32 sums of squared
    # deviations about it cancelled in the variance (errors of 0.1)
    x = randn((1, 64, 64, 64), torch.float32, 9, 1.0, 1e4)
    x.view(-1)[0] = -1e4
    out = ops.group_norm_act(x, 4, activation="identity", backend="triton")
    assert_matches(out, x, 4, None, None, None, "identity", backend="triton", name="outlying pivot")
    # eps of the order of the variance (at a variance of 4, leaving eps out changed ~1e-6), on
    # groups cut in 2
    assert _ext.cpu()[0].group_norm_gpu_splits(1, 16, 32 * 32, 2, 132) == 2
    x = randn((1, 16, 32, 32), torch.float32, 10, 1e-3)
    out = ops.group_norm_act(x, 2, eps=1e-6, activation="identity", backend="triton")
    assert_matches(out, x, 2, None, None, None, "identity", eps=1e-6, backend="triton", name="eps")


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not usable here")
def test_the_triton_group_norm_needs_the_cpu_extension(monkeypatch):
    # it plans its grid with kdfast._C: without it, triton was still offered (and chosen on a
    # GPU), and failed with an AttributeError on None
    from kdfast import _ext, backends
    from kdfast.ops.group_norm import group_norm_op

    monkeypatch.setattr(_ext, "cpu", lambda: (None, "kdfast._C is not importable (test)"))
    monkeypatch.setattr(group_norm_op, "_cache", {})
    assert "plans its grid with kdfast._C: kdfast._C is not importable" in group_norm_op.reason("triton", "cpu")
    with pytest.raises(BackendUnavailableError, match="plans its grid with kdfast._C"):
        group_norm_op.select("cpu", "triton")
    assert group_norm_op.select("cpu").backend == "reference"  # (cpu needs kdfast._C too)
    assert backends.op("solver_step").reason("triton", "cpu") is None


def test_triton_refuses_samples_of_2_31_elements():
    # Its offsets within a sample are 32-bit: such a sample would be read at wrapped offsets.
    # (Meta tensors: the refusal comes before anything is allocated or launched.)
    from kdfast import _ext
    module, reason = _ext.triton()
    if module is None:
        pytest.skip(reason)
    launch = module.group_norm.launch
    x = torch.empty((1, 32, 2 ** 26), device="meta")
    with pytest.raises(ValueError, match="fewer than 2\\^31 elements"):
        launch(x, None, None, None, 8, 1e-5, 0, False, torch.empty_like(x))


def _gpu_splits(shape, groups):
    """Blocks per group the CUDA launcher uses for this shape on this GPU."""
    from kdfast import _ext
    from kdfast.ops.group_norm import _sm_count
    n, c = shape[:2]
    spatial = math.prod(shape[2:])
    doubles = _ext.cuda()[0].group_norm_workspace_doubles(n, c, spatial, groups, _sm_count(torch.cuda.current_device()))
    return doubles // (2 * n * groups) if doubles else 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_split_groups(dtype):
    # a batch too small to fill the GPU with one block per group: each group is cut into
    # chunks whose moments a second kernel gathers (SD-sized maps at batch 1, a huge group, and,
    # in fp32, a mean 1e4 times the spread)
    large_mean = 1e4 if dtype == torch.float32 else 0.5
    for shape, groups, offset in (((1, 320, 32, 32), 32, 0.5), ((1, 64, 64, 64), 4, 0.5),
                                  ((2, 4, 64, 64), 2, large_mean)):
        assert _gpu_splits(shape, groups) > 1, shape
        for channels_last in (False, True):
            x, w, b, s = inputs(shape, dtype, 5, channels_last)
            x = (x.double() + offset).to(dtype)
            xc, wc, bc, sc = (t.cuda() for t in (x, w, b, s))
            out = ops.group_norm_act(xc, groups, wc, bc, shift=sc, backend="cuda")
            assert_matches(out.cpu(), x, groups, w, b, s, "silu", name=f"{dtype} {shape} cl={channels_last}")
            # deterministic: the chunks' moments are gathered in a fixed order
            assert torch.equal(out, ops.group_norm_act(xc, groups, wc, bc, shift=sc, backend="cuda"))
    # eps of the order of the variance
    x = randn((1, 64, 64, 64), torch.float32, 10, 1e-3)
    out = ops.group_norm_act(x.cuda(), 4, eps=1e-6, activation="identity", backend="cuda")
    assert_matches(out.cpu(), x, 4, None, None, None, "identity", eps=1e-6, name="eps")
    # a NaN in one chunk of a split group reaches the whole group and nothing else
    x = torch.randn(1, 64, 64, 64, device="cuda")
    x[0, 17, 63, 5] = float("nan")
    out = ops.group_norm_act(x, 4, backend="cuda").view(4, -1)
    assert out[1].isnan().all() and out[[0, 2, 3]].isfinite().all()


@pytest.mark.gpu
@pytest.mark.parametrize("shape,groups", [((4, 32, 16, 16), 8), ((1, 320, 32, 32), 32)])
def test_gpu_no_sync_and_graph_capture(shape, groups):
    # one block per group, and split groups (whose scratch comes from the capture's pool)
    x, w, b, s = (t.cuda() for t in inputs(shape, torch.float16, 3, True))
    expect = ops.group_norm_act(x, groups, w, b, shift=s)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.group_norm_act(x, groups, w, b, shift=s)
        graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, expect)


def test_parameters_are_read_in_place(monkeypatch):
    # a module's nn.Parameter weights are plain tensors to the op (read by address, no custom op
    # dispatch, which costs more than the kernel on small maps); other subclasses are dispatched
    real = torch.ops.kdfast.group_norm_act
    calls = []
    monkeypatch.setattr(torch.ops.kdfast, "group_norm_act", lambda *args: calls.append(args) or real(*args))
    norm = torch.nn.GroupNorm(2, 4)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = randn((2, 4, 3, 3), torch.float32, 1)
    with torch.no_grad():
        out = ops.group_norm_act(x, 2, norm.weight, norm.bias, norm.eps)
        assert calls == []
        torch.testing.assert_close(out, F.silu(norm(x)))

        class Marked(torch.Tensor):
            pass

        ops.group_norm_act(x.as_subclass(Marked), 2, norm.weight, norm.bias, norm.eps)
        assert calls and type(calls[0][0]) is Marked


def test_reference_of_channels_last_groups_with_a_small_spread():
    # torch's channels-last group norm takes E[x^2] - E[x]^2 even in float64: a negative variance
    # (NaN at eps = 0) for values at 1e4 +- 1e-3; the spec is the same for every layout
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-3 * torch.randn(2, 4, 6, 6, generator=g)
    cl = ops.group_norm_act(x.to(memory_format=torch.channels_last), 2, eps=0.0, activation="identity",
                            backend="reference")
    assert torch.isfinite(cl).all()
    torch.testing.assert_close(cl, ops.group_norm_act(x, 2, eps=0.0, activation="identity", backend="reference"),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_an_overflowing_variance_is_loud_not_quietly_the_bias(backend, channels_last):
    # an element 1e20 from its group's mean overflows float32 sums of squares: the group comes out
    # right (sums in double) or NaN, as torch's contiguous float32 group norm gives; it made every
    # output of the group act(bias) = 0 before (as torch's channels-last one does), with nothing
    # to show it
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 0, 0] = 1e20
    x[0, 0, 1:, :] = torch.arange(12.0).view(3, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = ops.group_norm_act(x, 2, activation="identity", backend=backend)[0, 0]
    expect = ref.group_norm_act(x, 2, activation="identity")[0, 0].float()
    assert torch.isnan(out).all() or torch.allclose(out, expect, rtol=1e-5, atol=1e-5)


def test_a_shift_of_more_dims_than_x_is_refused():
    # (torch would broadcast x up to 5-d; the op returned a 4-d result)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="shift must have shape"):
        ops.group_norm_act(x, 2, shift=torch.randn(2, 4, 1, 1, 1), backend="reference")
