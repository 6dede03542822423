import pytest
import torch

from kdfast import _ext, ops
from kdfast.backends import BackendUnavailableError
from kdfast.ops.grid_combination import MAX_WEIGHTS
from kdfast.reference import grid_combination as ref

from conftest import usable_backends
from helpers import assert_close_by_rule

BACKENDS = usable_backends("grid_combination")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (sample shape, grid): pi-Flow's narrow rows (16 and 64 channels, the CPU's unrolled widths),
# primes, one channel, one row, rows wider than the CPU's 512-element tile, output rows wider than
# the CPU's 4096-float widening buffer, a grid of one
CASES = [((2, 8, 8, 16), 10), ((1, 64, 64), 10), ((3, 5, 7), 4), ((4, 1), 3), ((1, 17), 2), ((2, 3, 600), 5),
         ((5, 1100), 2), ((2, 500), 9), ((6, 32), 1)]


def randn(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def make(shape, grid, dtype, outputs, seed=0):
    x = randn(shape, dtype, seed)
    ys = [randn((*shape[:-1], grid * shape[-1]), dtype, seed + 1 + k) for k in range(outputs)]
    coefs = randn((1 + outputs * grid,), torch.float64, seed + 9)
    if grid > 2:
        coefs[2] = 0.0  # a grid point the step does not use
    return x, ys, coefs


def assert_same_bits(out, expect):
    """Every backend computes add_weighted's terms in order in float32: the same bits."""
    assert torch.equal(out, expect)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,grid", CASES)
@pytest.mark.parametrize("outputs", [1, 2])
def test_matches_reference(backend, dtype, shape, grid, outputs):
    x, ys, coefs = make(shape, grid, dtype, outputs)
    out = ops.grid_combination(x, ys, coefs, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert_same_bits(out, ref.grid_combination(x, ys, coefs))
    expect64 = ref.grid_combination(x, ys, coefs, dtype=torch.float64)
    lowp = ref.grid_combination(x, ys, coefs, dtype=dtype) if dtype != torch.float32 else out
    atol = 2e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_close_by_rule(out, expect64, lowp, name=f"{backend} {dtype} {shape} {grid}", atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    # an fp32 sample with bf16 and fp16 outputs (a half model), a bf16 sample with fp32 outputs
    x, (y0, y1), coefs = make((2, 9, 16), 6, torch.float32, 2)
    for args in ((x, (y0.bfloat16(), y1.half())), (x.bfloat16(), (y0, y1)), (x.half(), (y0.bfloat16(),))):
        c = coefs if len(args[1]) == 2 else coefs[:7]
        out = ops.grid_combination(*args, c, backend=backend)
        assert_same_bits(out, ref.grid_combination(*args, c))
        assert out.dtype == args[0].dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_and_layouts(backend):
    # the halves of a doubled guided batch (row-strided views, read in place), a transposed
    # sample and a sliced output (copied first), strided channels (copied), a broadcast sample
    # (rows of stride 0)
    x, _, coefs = make((3, 4, 8), 5, torch.float32, 2)
    doubled = randn((6, 4, 40), seed=3)
    uncond, cond = doubled[:3], doubled[3:]
    expect = ref.grid_combination(x, (uncond, cond), coefs)
    assert torch.equal(ops.grid_combination(x, (uncond, cond), coefs, backend=backend), expect)
    assert torch.equal(ops.grid_combination(x, (uncond.contiguous(), cond.contiguous()), coefs, backend=backend),
                       expect)
    xt = randn((3, 8, 4)).transpose(1, 2)
    wide = randn((3, 4, 50), seed=4)[..., 5:45]
    assert torch.equal(ops.grid_combination(xt, (wide, cond), coefs, backend=backend),
                       ref.grid_combination(xt.contiguous(), (wide.contiguous(), cond), coefs))
    # every other element of the last dimension (a view whose rows reshape without a copy)
    xs, ws = randn((3, 4, 16))[..., ::2], randn((3, 4, 80), seed=5)[..., ::2]
    assert torch.equal(ops.grid_combination(xs, (ws, cond), coefs, backend=backend),
                       ref.grid_combination(xs.contiguous(), (ws.contiguous(), cond), coefs))
    row = randn((1, 1, 8)).expand(3, 4, 8)
    assert torch.equal(ops.grid_combination(row, (uncond, cond), coefs, backend=backend),
                       ref.grid_combination(row.contiguous(), (uncond, cond), coefs))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_zero_weights_leave_their_inputs_unread(backend):
    # inf and NaN in what a zero weight drops (the sample, a grid point, a whole output) stay out
    x, (y0, y1), coefs = make((2, 5, 16), 4, torch.float32, 2)
    coefs[0] = 0.0
    coefs[1 + 2] = 0.0
    coefs[5:] = 0.0
    x[0, 0, 0] = float("nan")
    y0[..., 2 * 16:3 * 16] = float("inf")
    y1.fill_(float("nan"))
    out = ops.grid_combination(x, (y0, y1), coefs, backend=backend)
    assert out.isfinite().all()
    assert torch.equal(out, ref.grid_combination(torch.zeros_like(x), (y0.nan_to_num(posinf=0.0),),
                                                 coefs[:5]))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_a_zero_weight_on_a_non_finite_term_gets_the_same_gradient_on_every_path(backend):
    # The forward pass skips the term, so eager backward masks it as torch.func's differentiable
    # path does: the weight's gradient is sum(grad * masked term), not NaN or inf
    x, (y0, y1), coefs = make((2, 5, 16), 4, torch.float32, 2)
    coefs[0] = 0.0
    coefs[1 + 2] = 0.0
    coefs[5 + 1] = 0.0
    x[0, 0, 0] = float("nan")
    y0[..., 2 * 16:3 * 16] = float("inf")
    y1[..., 1 * 16:2 * 16] = -float("inf")
    c = coefs.float()

    def loss(w):
        return ops.grid_combination(x, (y0, y1), w, backend=backend).square().sum()

    leaf = c.clone().requires_grad_()
    eager, = torch.autograd.grad(loss(leaf), leaf)
    functional = torch.func.grad(loss)(c)
    assert eager.isfinite().all()
    torch.testing.assert_close(eager, functional)
    assert eager[0] != 0  # (the mask keeps the finite elements' part)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_coefficients_are_used_as_given(backend):
    # float64 coefficients are rounded to float32 once, as the kernels take them
    x, ys, coefs = make((2, 7, 16), 3, torch.float32, 1)
    assert torch.equal(ops.grid_combination(x, ys, coefs, backend=backend),
                       ops.grid_combination(x, ys, coefs.float(), backend=backend))


def test_float64_and_wide_grids_take_the_reference():
    x, ys, coefs = make((2, 3, 4), 5, torch.float64, 2)
    out = ops.grid_combination(x, ys, coefs)
    assert out.dtype == torch.float64
    assert torch.equal(out, ref.grid_combination(x, ys, coefs, dtype=torch.float64))
    with pytest.raises(BackendUnavailableError, match="float64"):
        ops.grid_combination(x, ys, coefs, backend="cpu")
    # more grid weights than the kernels' arguments hold: the reference, or an error when forced
    assert MAX_WEIGHTS == _ext.cpu()[0].MAX_GRID_WEIGHTS
    grid = MAX_WEIGHTS // 2 + 1
    x, ys, coefs = make((2, 3), grid, torch.float32, 2)
    assert torch.equal(ops.grid_combination(x, ys, coefs), ref.grid_combination(x, ys, coefs))
    with pytest.raises(BackendUnavailableError, match=f"{2 * grid} grid weights"):
        ops.grid_combination(x, ys, coefs, backend="cpu")
    # the most the kernels take: one output of MAX_WEIGHTS grid points, two of half as many
    for outputs in (1, 2):
        x, ys, coefs = make((2, 3), MAX_WEIGHTS // outputs, torch.float32, outputs)
        for backend in BACKENDS:
            assert torch.equal(ops.grid_combination(x, ys, coefs, backend=backend), ref.grid_combination(x, ys, coefs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for shape in ((0, 16), (3, 0)):
        x, ys, coefs = make(shape, 4, torch.float32, 1)
        out = ops.grid_combination(x, ys, coefs, backend=backend)
        assert out.shape == shape


def test_gradients_float64():
    x, ys, coefs = make((2, 3, 4), 3, torch.float64, 2)
    inputs = (x.requires_grad_(), ys[0].requires_grad_(), ys[1].requires_grad_(), coefs.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b, c, w: ops.grid_combination(a, (b, c), w), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_autograd_through_the_reference(backend):
    x, ys, coefs = make((2, 5, 16), 4, torch.float32, 2)
    grad = randn((2, 5, 16), seed=7)
    leaves = [t.clone().requires_grad_() for t in (x, *ys, coefs)]
    ops.grid_combination(leaves[0], leaves[1:3], leaves[3], backend=backend).backward(grad)
    expect = [t.clone().requires_grad_() for t in (x, *ys, coefs.float())]
    ref.grid_combination(expect[0], expect[1:3], expect[3]).backward(grad)
    # a zero weight's term is dropped from the value, not from the derivative: d out / d w = y
    assert coefs[2] == 0
    expect[3].grad[2] = (grad * ys[0][..., 16:32]).sum()
    for got, want, name in zip(leaves, expect, ("sample", "outputs[0]", "outputs[1]", "coefs")):
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=1e-5, atol=1e-5)
        assert got.grad.dtype == got.dtype, name


def test_opcheck_and_compile():
    x, (y0, y1), coefs = make((2, 3, 8), 4, torch.float32, 2)
    for args in ((x, y0, y1, coefs, ""), (x.half(), y0, None, coefs[:5], ""), (x.double(), y0.double(), None,
                                                                                coefs[:5], "")):
        torch.library.opcheck(torch.ops.kdfast.grid_combination.default, args)
    compiled = torch.compile(lambda a, b, c: ops.grid_combination(a, (b, c), coefs), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, y0, y1), ops.grid_combination(x, (y0, y1), coefs))
    # a grid size that changes between calls makes the coefficients' length symbolic (dynamo
    # could not trace the divmod that found the grid size)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c, k: ops.grid_combination(a, (b, c), k), backend="eager", fullgraph=True)
    for grid in (2, 3, 4):
        x, (y0, y1), coefs = make((2, 3, 8), grid, torch.float32, 2)
        assert torch.equal(compiled(x, y0, y1, coefs), ops.grid_combination(x, (y0, y1), coefs)), grid


def test_bad_input():
    x, (y0, y1), coefs = make((2, 3, 8), 4, torch.float32, 2)
    cases = [
        ((x.tolist(), y0, coefs[:5]), TypeError, "sample must be a torch.Tensor"),
        ((x.int(), y0, coefs[:5]), TypeError, "sample must be float32"),
        ((torch.tensor(1.0), y0, coefs[:5]), ValueError, "sample must have a channel dimension"),
        ((x, (y0, y1, y0), coefs), TypeError, "sequence of one or two"),
        ((x, "y", coefs), TypeError, "outputs must be a torch.Tensor"),
        ((x, (y0, y1.tolist()), coefs), TypeError, r"outputs\[1\] must be a torch.Tensor"),
        ((x, (y0, y1.int()), coefs), TypeError, r"outputs\[1\] must be float32"),
        ((x, y0[..., :30], coefs[:5]), ValueError, r"outputs\[0\] must have the sample's shape \(2, 3, 8\) but"),
        ((x, y0[:1], coefs[:5]), ValueError, r"outputs\[0\] must have the sample's shape"),
        ((x, y0[None], coefs[:5]), ValueError, r"outputs\[0\] must have the sample's shape"),
        ((x, torch.tensor(2.0), coefs[:5]), ValueError, r"outputs\[0\] must have the sample's shape"),  # (IndexError)
        ((x, (y0, torch.tensor(2.0)), coefs), ValueError, r"outputs\[1\] must have the sample's shape"),
        ((x, (y0, y1[..., :24]), coefs), ValueError, r"outputs\[1\] .* like outputs\[0\]'s"),
        ((x, y0, coefs[:4]), ValueError, r"coefs must hold 1 \+ 1 x 4 values for outputs of 4 grid points"),
        ((x, (y0, y1), coefs[:8]), ValueError, r"coefs must hold 1 \+ 2 x grid values"),
        ((x, y0, coefs[:5].tolist()), TypeError, "coefs must be a CPU float32"),
        ((x, y0, coefs[:5].half()), ValueError, "coefs must be a 1-d CPU float32"),
        ((x, y0, coefs[:5].reshape(1, 5)), ValueError, "coefs must be a 1-d CPU float32"),
        ((x, y0, coefs[:1]), ValueError, "coefs must hold"),
        # a sample of 0 channels with non-empty outputs (the backward crashed on it)
        ((x[..., :0], y0, coefs[:5]), ValueError, r"outputs\[0\] .* 0 channels \(grid points x channels, so empty\)"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            ops.grid_combination(*args)
    with pytest.raises(ValueError, match="coefs must hold"):
        torch.ops.kdfast.grid_combination(x, y0, None, coefs, "")
    # the binding refuses a count that does not match (kdfast.ops never passes one)
    out = torch.empty(6, 8)
    with pytest.raises(ValueError, match="grid_combination"):
        _ext.cpu()[0].grid_combination(6, 8, 4, x.data_ptr(), 8, 0, [y0.data_ptr(), 0], [32, 0], [0, 0],
                                       out.data_ptr(), 0, coefs.float().data_ptr(), 9, 1)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", usable_backends("grid_combination", "cuda"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,grid", CASES)
def test_gpu_matches_reference(backend, dtype, shape, grid):
    for outputs in (1, 2):
        x, ys, coefs = make(shape, grid, dtype, outputs)
        out = ops.grid_combination(x.cuda(), [y.cuda() for y in ys], coefs, backend=backend).cpu()
        # products rounded before sums, as on the CPU (Triton: compiled without FMA contraction)
        assert torch.equal(out, ref.grid_combination(x, ys, coefs)), f"{backend} {dtype} {shape}"
        assert_close_by_rule(out, ref.grid_combination(x, ys, coefs, dtype=torch.float64),
                             ref.grid_combination(x, ys, coefs, dtype=dtype) if dtype != torch.float32 else out,
                             name=f"{backend} {dtype} {shape}", atol=2e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_gpu_no_sync_and_graph_capture():
    x, ys, coefs = make((2, 1024, 64), 10, torch.bfloat16, 2)
    x, ys = x.cuda(), [y.cuda() for y in ys]
    expect = ops.grid_combination(x, ys, coefs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.grid_combination(x, ys, coefs)
        graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, expect)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_a_nonzero_weight_on_a_non_finite_term_keeps_its_gradient(backend):
    # only a zero weight masks a non-finite term (in the value and the coefficients' gradient)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, generator=gen), torch.randn(2, 8, generator=gen)
    y[0, 0] = float("inf")
    c = torch.tensor([0.5, 0.25, -1.0])

    def loss(w):
        return ops.grid_combination(x, y, w, backend=backend).sum()

    leaf = c.clone().requires_grad_()
    (eager,) = torch.autograd.grad(loss(leaf), leaf)
    assert eager[1] == float("inf") and torch.isfinite(eager[[0, 2]]).all()
    torch.testing.assert_close(torch.func.grad(loss)(c), eager)
