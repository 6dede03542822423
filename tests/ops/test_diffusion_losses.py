import math

import pytest
import torch

from kdfast import ops
from kdfast.backends import BackendUnavailableError
from kdfast.ops import diffusion_losses as dl
from kdfast.reference import diffusion_losses as ref

from conftest import usable_backends
from helpers import assert_close_by_rule

BACKENDS = usable_backends("diffusion_loss")
COMBINATION_BACKENDS = usable_backends("sample_combination")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 1 element per sample, primes, a 4-D latent, and a sample wider than the CPU tile (16384).
SHAPES = [(3, 1), (2, 7), (3, 1031), (2, 3, 5, 13), (2, 17011)]
LOSSES = ["pseudo_huber", "pseudo_huber_elementwise", "dmd", "progressive_mse"]


def randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def rand(n, seed, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def schedule(batch, seed):
    """Per-sample VP (alpha, sigma) at t and at an earlier s; the last sample ends at the clean end."""
    abar_t = rand(batch, seed, 0.1, 0.9)
    abar_s = torch.minimum(abar_t + rand(batch, seed + 1, 0.02, 0.3), torch.ones(batch))
    abar_s[-1] = 1.0
    return (abar_t.sqrt().float(), (1 - abar_t).sqrt().float(), abar_s.sqrt().float(), (1 - abar_s).sqrt().float())


def case(loss, shape, dtype, seed, device="cpu"):
    """(fused(backend, *tensors), reference(dtype, *tensors), tensors, indices of differentiable tensors)."""
    batch = shape[0]

    def latent(k):
        return randn(shape, dtype, seed + k).to(device)

    w = rand(batch, seed + 100, 0.5, 2.0).float().to(device)
    if loss.startswith("pseudo_huber"):
        elementwise = loss.endswith("elementwise")
        c = rand(batch, seed + 2, 0.01, 1.0).float().to(device)
        return (lambda be, x, y: ops.pseudo_huber(x, y, c=c, weights=w, elementwise=elementwise, backend=be),
                lambda dt, x, y: ref.pseudo_huber(x, y, c, w, elementwise, dt), [latent(0), latent(1)], [0, 1])
    if loss == "dmd":
        return (lambda be, x, real, fake, x_t: ops.dmd(x, real, fake, x_t=x_t, weights=w, backend=be),
                lambda dt, x, real, fake, x_t: ref.dmd(x, real, fake, x_t, w, dt),
                [latent(0), latent(1), latent(2), latent(3)], [0])
    sched = [t.to(device) for t in schedule(batch, seed + 4)]
    pt = ref.PREDICTION_TYPES[seed % 3]
    return (lambda be, p, a, b: ops.progressive_mse(p, a, b, *sched, prediction_type=pt, weights=w, backend=be),
            lambda dt, p, a, b: ref.progressive_mse(p, a, b, *sched, pt, w, dt), [latent(0), latent(1), latent(2)],
            [0])


def evaluate(fn, tensors, diff, grad_loss, cast=None):
    leaves = [(t if cast is None else t.to(cast)).detach().clone().requires_grad_(i in diff)
              for i, t in enumerate(tensors)]
    loss = fn(*leaves)
    grads = torch.autograd.grad((loss * grad_loss.to(loss.dtype)).sum(), [leaves[i] for i in diff])
    return loss.detach(), grads


def assert_matches(backend, loss_name, shape, dtype, seed=0):
    fused, reference, tensors, diff = case(loss_name, shape, dtype, seed)
    grad_loss = rand(shape[0], seed + 7, -2.0, 2.0).float()
    name = f"{backend} {loss_name} {dtype} {shape}"
    loss, grads = evaluate(lambda *t: fused(backend, *t), tensors, diff, grad_loss)
    loss64, grads64 = evaluate(lambda *t: reference(torch.float64, *t), tensors, diff, grad_loss, torch.float64)
    loss32, grads32 = evaluate(lambda *t: reference(torch.float32, *t), tensors, diff, grad_loss)
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    assert torch.isfinite(loss).all(), name
    assert_close_by_rule(loss, loss64, loss32, f"{name} loss", atol=1e-6)
    for k, (g, g64, g32) in enumerate(zip(grads, grads64, grads32)):
        assert g.dtype == dtype and g.shape == shape
        assert torch.isfinite(g).all(), name
        # A 16-bit gradient may round the other way from torch's: allow one unit in the last place.
        ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * g64.abs().max().item()
        assert_close_by_rule(g, g64, g32, f"{name} grad {k}", atol=1e-6 + ulp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, loss, dtype):
    for i, shape in enumerate(SHAPES):
        if backend == "triton" and shape[-1] > 10000 and dtype != torch.float32:
            continue  # the interpreter is slow; the wide case runs once in fp32
        assert_matches(backend, loss, shape, dtype, seed=10 * i)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_inputs_of_different_dtypes(backend, loss):
    # The latents may differ in dtype (an fp32 student against a half teacher, and the other
    # ways round): each is read in its own dtype and each gradient is stored in its own input's
    # dtype, pseudo-Huber's target gradient included.
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    shape = (2, 3, 5, 13)
    for dtypes in ((f32, bf16, f16, bf16), (f16, f32, bf16, f16), (bf16, f16, f32, f32)):
        fused, reference, tensors, diff = case(loss, shape, f32, 3)
        tensors = [t.to(d) for t, d in zip(tensors, dtypes)]
        grad_loss = rand(shape[0], 10, -2.0, 2.0).float()
        name = f"{backend} {loss} {dtypes}"
        got, grads = evaluate(lambda *t: fused(backend, *t), tensors, diff, grad_loss)
        want, grads64 = evaluate(lambda *t: reference(torch.float64, *t), tensors, diff, grad_loss, torch.float64)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=name)
        for i, g, g64 in zip(diff, grads, grads64):
            dtype = tensors[i].dtype
            assert g.dtype == dtype and g.shape == shape, name
            eps = torch.finfo(dtype).eps if dtype != f32 else 1e-5
            torch.testing.assert_close(g.double(), g64, rtol=eps, atol=1e-6 + eps * g64.abs().max().item(),
                                       msg=f"{name} grad {i}")


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_reference_backend_and_fused_agree(backend):
    # The reference backend (pure torch, closed-form backward) is a backend too.
    for loss in LOSSES:
        assert_matches(backend, loss, (3, 2, 9), torch.float32, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("elementwise", [False, True])
def test_pseudo_huber_scalar_and_per_sample_constants(backend, elementwise):
    x, y = randn((4, 3, 11), torch.float32, 1), randn((4, 3, 11), torch.float32, 2)
    c = torch.tensor([0.0, 0.01, 0.5, 3.0])
    w = torch.tensor([1.0, 0.0, 2.0, 0.5]).reshape(4, 1, 1)  # broadcast-shaped weights, one of them 0
    per_sample = ops.pseudo_huber(x, y, c=c, weights=w, elementwise=elementwise, backend=backend)
    expected = ref.pseudo_huber(x, y, c, w.flatten(), elementwise)
    torch.testing.assert_close(per_sample.double(), expected, rtol=1e-6, atol=1e-7)
    assert per_sample[1] == 0
    # A number, a 0-d tensor, a float64 [1] tensor and an expanded tensor give the same.
    base = ops.pseudo_huber(x, y, c=0.25, elementwise=elementwise, backend=backend)
    for c_value in (torch.tensor(0.25), torch.tensor([0.25], dtype=torch.float64), torch.full((1,), 0.25).expand(4)):
        torch.testing.assert_close(ops.pseudo_huber(x, y, c=c_value, elementwise=elementwise, backend=backend), base)
    torch.testing.assert_close(base.double(), ref.pseudo_huber(x, y, 0.25, None, elementwise), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pseudo_huber_zero_c_is_a_norm(backend):
    # c = 0: the L2 norm per sample (gradient (x - y) / ||x - y||) and the L1 mean element-wise;
    # identical samples give 0 and a zero (not NaN) gradient.
    x = randn((3, 50), torch.float32, 3).requires_grad_(True)
    y = randn((3, 50), torch.float32, 4)
    y[1] = x[1].detach()
    norm = ops.pseudo_huber(x, y, c=0.0, backend=backend)
    torch.testing.assert_close(norm, (x - y).norm(dim=1).detach(), rtol=1e-6, atol=0)
    (gx,) = torch.autograd.grad(norm.sum(), x)
    assert torch.isfinite(gx).all() and (gx[1] == 0).all()
    l1 = ops.pseudo_huber(x, y, c=0.0, elementwise=True, backend=backend)
    torch.testing.assert_close(l1, (x - y).abs().mean(dim=1).detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_target_and_weights(backend):
    # Consistency training without a stop-gradient: d/dy = -d/dx; tensor weights get their gradient.
    x = randn((3, 2, 7), torch.float32, 5).requires_grad_(True)
    y = randn((3, 2, 7), torch.float32, 6).requires_grad_(True)
    w = rand(3, 7, 0.5, 1.5).float().requires_grad_(True)
    (ops.pseudo_huber(x, y, c=0.3, weights=w, backend=backend) ** 2).sum().backward()
    x64, y64, w64 = (t.detach().double().requires_grad_(True) for t in (x, y, w))
    (ref.pseudo_huber(x64, y64, 0.3, w64) ** 2).sum().backward()
    for got, want in ((x.grad, x64.grad), (y.grad, y64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    # Only y needs a gradient.
    y.grad = None
    ops.pseudo_huber(x.detach(), y, c=0.3, backend=backend).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pseudo_huber_extreme_values(backend):
    # Squares of these differences overflow fp32 (the norm variant sums in fp64; the element-wise
    # one rescales), and tiny ones underflow it: no NaN, no inf, the float64 values.
    big = randn((3, 40), torch.float32, 8, scale=1e30)
    tiny = randn((3, 40), torch.float32, 9, scale=1e-30)
    for x, y, c in ((big, -big, 1e-3), (tiny, torch.zeros_like(tiny), 0.0), (big, big * 0.5, 1e25)):
        for elementwise in (False, True):
            xr = x.clone().requires_grad_(True)
            loss = ops.pseudo_huber(xr, y, c=c, elementwise=elementwise, backend=backend)
            (gx,) = torch.autograd.grad(loss.sum(), xr)
            x64 = x.double().requires_grad_(True)
            loss64 = ref.pseudo_huber(x64, y, c, None, elementwise)
            (gx64,) = torch.autograd.grad(loss64.sum(), x64)
            assert torch.isfinite(loss).all() and torch.isfinite(gx).all()
            torch.testing.assert_close(loss.double(), loss64, rtol=2e-6, atol=0)
            torch.testing.assert_close(gx.double(), gx64, rtol=2e-5, atol=1e-30)
    # fp16 inputs at the format's limits
    h = torch.tensor([[65504.0, -65504.0, 1.0], [-65504.0, 0.0, 6e-8]], dtype=torch.float16)
    for elementwise in (False, True):
        loss = ops.pseudo_huber(h, -h, c=0.001, elementwise=elementwise, backend=backend)
        expected = ref.pseudo_huber(h, -h, 0.001, None, elementwise)
        torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_a_sample_holding_nan_has_a_nan_loss(backend):
    # (per-sample pseudo-Huber took "not r > 0" for r = NaN as the 0 / 0 case and gave 0,
    # hiding the NaN from whoever watches the loss)
    x, y = randn((3, 2, 5), torch.float32, 30), randn((3, 2, 5), torch.float32, 31)
    x[0, 1, 1] = math.nan
    x[1, 0, 0], y[1, 0, 0] = math.inf, math.inf  # inf - inf
    for elementwise in (False, True):
        for c in (0.1, 0.0):  # (c = 0: the reference took a NaN sample for the dead 0 / 0 case)
            loss = ops.pseudo_huber(x, y, c=c, elementwise=elementwise, backend=backend)
            assert loss[:2].isnan().all() and torch.isfinite(loss[2]), (elementwise, c)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_dmd_default_x_t_with_inf_in_x(backend):
    # With x_t = x, an inf in x leaves its sample without a finite normaliser: loss 0 on every
    # backend (the reference's zero-with-gradient term was inf - inf = NaN there).
    x, real, fake = (randn((2, 8), torch.float32, s) for s in (32, 33, 34))
    x[0, 3] = math.inf
    loss = ops.dmd(x, real, fake, backend=backend)
    assert loss[0] == 0 and torch.isfinite(loss[1]) and loss[1] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_dmd_nan_safety(backend):
    shape = (5, 3, 7)
    x = randn(shape, torch.float32, 10).requires_grad_(True)
    real, fake = randn(shape, torch.float32, 11), randn(shape, torch.float32, 12)
    fake[0, 1, 2] = math.nan        # one bad element: its gradient is 0, the rest of the sample is kept
    fake[0, 2, 3] = math.inf
    real[1, 0, 0] = math.inf        # normaliser inf: the whole sample gets no gradient
    real[2] = x[2].detach()         # normaliser 0
    real[3, 1, 1] = math.nan        # normaliser NaN
    loss = ops.dmd(x, real, fake, backend=backend)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all()
    assert (loss[1:4] == 0).all() and (gx[1:4] == 0).all()
    assert gx[0, 1, 2] == 0 and gx[0, 2, 3] == 0 and (gx[0] != 0).sum() == gx[0].numel() - 2
    x64 = x.detach().double().requires_grad_(True)
    loss64 = ref.dmd(x64, real, fake)
    (gx64,) = torch.autograd.grad(loss64.sum(), x64)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-6, atol=1e-12)
    assert loss[4] > 0


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("loss", LOSSES)
def test_a_zero_weight_sample_with_nan_gets_no_gradient(backend, loss):
    # The forward leaves a zero-weight sample out of the loss even where it holds NaN or inf; its
    # gradient is 0 too (it was (x - y) * 0 = NaN there), the other samples' as before.
    shape = (3, 2, 5)
    x = randn(shape, torch.float32, 20)
    y, z = randn(shape, torch.float32, 21), randn(shape, torch.float32, 22)
    x[0, 1, 2], y[0, 0, 1] = math.nan, math.inf
    sched = (0.6, 0.8, 0.9, 0.3)
    calls = {
        "pseudo_huber": lambda x, y, z, w: ops.pseudo_huber(x, y, c=0.1, weights=w, backend=backend),
        "pseudo_huber_elementwise": lambda x, y, z, w: ops.pseudo_huber(x, y, c=0.1, weights=w, elementwise=True,
                                                                        backend=backend),
        "dmd": lambda x, y, z, w: ops.dmd(x, y, z, weights=w, backend=backend),
        "progressive_mse": lambda x, y, z, w: ops.progressive_mse(x, y, z, *sched, weights=w, backend=backend),
    }
    w = torch.tensor([0.0, 1.0, 0.5])
    xg = x.clone().requires_grad_(True)
    values = calls[loss](xg, y, z, w)
    (gx,) = torch.autograd.grad(values.sum(), xg)
    assert torch.isfinite(values).all() and values[0] == 0
    assert (gx[0] == 0).all() and torch.isfinite(gx).all()
    rest = x[1:].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(calls[loss](rest, y[1:], z[1:], w[1:]).sum(), rest)
    torch.testing.assert_close(gx[1:], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dmd_x_t_default_and_loss_value(backend):
    # x_t defaults to x; the value is 0.5 mean(g^2) even where |x| >> |g|.
    x = randn((3, 40), torch.float32, 13) + 1e6
    real, fake = x - randn((3, 40), torch.float32, 14), x - randn((3, 40), torch.float32, 15)
    default = ops.dmd(x, real, fake, backend=backend)
    torch.testing.assert_close(default, ops.dmd(x, real, fake, x_t=x, backend=backend))
    g = ref.dmd_gradient(x, real, fake)
    torch.testing.assert_close(default.double(), 0.5 * (g * g).mean(1), rtol=1e-6, atol=0)
    x_t = randn((3, 40), torch.float32, 16)
    torch.testing.assert_close(ops.dmd(x, real, fake, x_t=x_t, backend=backend).double(),
                               ref.dmd(x, real, fake, x_t), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", COMBINATION_BACKENDS)
@pytest.mark.parametrize("combination", ref.COMBINATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_combination_matches_reference(backend, combination, dtype):
    for i, shape in enumerate([(3, 1), (3, 2, 5, 7), (2, 17011)]):
        if backend == "triton" and shape[-1] > 10000 and dtype != torch.float32:
            continue
        sched = schedule(shape[0], i)
        for pt in ref.PREDICTION_TYPES:
            a, b = randn(shape, dtype, 2 * i), randn(shape, dtype, 2 * i + 1)
            out = dl.sample_combination(combination, a, b, *sched, prediction_type=pt, backend=backend)
            expected = ref._combine(combination, pt, a, b, *sched, torch.float64)
            lowp = ref._combine(combination, pt, a, b, *sched, torch.float32).to(dtype)
            assert out.dtype == dtype and out.shape == shape
            ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * expected.abs().max().item()
            assert_close_by_rule(out, expected, lowp, f"{backend} {combination} {pt} {dtype}", atol=1e-6 + ulp)


@pytest.mark.parametrize("backend", COMBINATION_BACKENDS)
@pytest.mark.parametrize("combination", ref.COMBINATIONS)
def test_combination_of_different_dtypes(backend, combination):
    # a and b in different dtypes: each read in its own, the result stored in the promoted dtype
    # (fp16 with bf16 promotes to fp32)
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    shape = (3, 2, 5, 7)
    sched = schedule(shape[0], 8)
    for da, db in ((f16, f32), (f32, bf16), (bf16, f16), (f16, bf16)):
        a, b = randn(shape, da, 20), randn(shape, db, 21)
        for pt in ref.PREDICTION_TYPES:
            out = dl.sample_combination(combination, a, b, *sched, prediction_type=pt, backend=backend)
            dtype = torch.promote_types(da, db)
            expected = ref._combine(combination, pt, a, b, *sched, torch.float64)
            lowp = ref._combine(combination, pt, a, b, *sched, torch.float32).to(dtype)
            assert out.dtype == dtype and out.shape == shape
            ulp = 0.0 if dtype == f32 else torch.finfo(dtype).eps * expected.abs().max().item()
            assert_close_by_rule(out, expected, lowp, f"{backend} {combination} {pt} {da} {db}", atol=1e-6 + ulp)


def test_combination_autograd():
    sched = schedule(3, 5)
    a = randn((3, 4, 5), torch.float32, 1).requires_grad_(True)
    b = randn((3, 4, 5), torch.float32, 2).requires_grad_(True)
    weight = randn((3, 4, 5), torch.float32, 3)
    (ops.pd_target(a, b, *sched, prediction_type="v_prediction") * weight).sum().backward()
    a64, b64 = (t.detach().double().requires_grad_(True) for t in (a, b))
    (ref.pd_target(a64, b64, *sched, "v_prediction") * weight).sum().backward()
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-6)


def test_strided_and_non_contiguous_inputs():
    big = randn((6, 3, 9), torch.float32, 20)
    x, y = big[:3], big[3:]  # batch-strided views: used without a copy
    xt = randn((3, 9, 3), torch.float32, 21).transpose(1, 2)  # not in x's layout: copied
    for elementwise in (False, True):
        torch.testing.assert_close(ops.pseudo_huber(x, xt, c=0.1, elementwise=elementwise).double(),
                                   ref.pseudo_huber(x, xt, 0.1, None, elementwise), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ops.dmd(x, y, xt).double(), ref.dmd(x, y, xt), rtol=1e-6, atol=1e-7)


def test_no_grad_and_empty_batch():
    x, y = randn((2, 5), torch.float32, 1).requires_grad_(True), randn((2, 5), torch.float32, 2)
    with torch.no_grad():
        loss = ops.pseudo_huber(x, y, c=0.1)
    assert not loss.requires_grad
    empty = torch.zeros(0, 4, 4)
    assert ops.pseudo_huber(empty, empty, c=0.1).shape == (0,)
    assert ops.dmd(empty, empty, empty).shape == (0,)
    assert ops.pd_target(empty, empty, 0.5, 0.8, 0.7, 0.7).shape == (0, 4, 4)


def _opcheck_args():
    x = randn((3, 2, 5), torch.float32, 1).requires_grad_(True)
    y, z = randn((3, 2, 5), torch.float32, 2), randn((3, 2, 5), torch.float32, 3)
    w = rand(3, 4, 0.5, 1.5).float().requires_grad_(True)
    sched = [t.to(torch.float32) for t in schedule(3, 6)]
    params = [None, torch.full((3,), 0.2), *sched]
    values = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    for kind in range(len(dl.KINDS)):
        yield (kind, 1, x, y.clone().requires_grad_(kind < 2), z, None if kind != dl.DMD else z * 2, w, params,
               values, "")


@pytest.mark.parametrize("kind", range(len(dl.KINDS)))
def test_opcheck(kind):
    args = list(_opcheck_args())[kind]
    torch.library.opcheck(torch.ops.kdfast.diffusion_loss.default, args)
    kind, pred, x, y, z, x_t, w, params, values, backend = args
    full = [w.detach(), *params[1:]]
    loss, aux = dl._loss_forward(kind, pred, x.detach(), y.detach(), z, x_t, full, values)
    torch.library.opcheck(torch.ops.kdfast.diffusion_loss_backward.default,
                          (kind, pred, x.detach(), y.detach(), z, None, full, values, aux, torch.ones(3), True,
                           kind < 2, ""))


def test_direct_op_calls_check_what_the_kernels_take_on_trust():
    # torch.ops.kdfast.* called directly: channels_last latents were read as if contiguous
    # (pseudo-Huber 21.01 instead of 22.08; sample_combination off by 5.2), and mismatched
    # shapes or parameters would read out of bounds.
    x = randn((2, 4, 8, 8), torch.float32, 1).to(memory_format=torch.channels_last)
    y = randn((2, 4, 8, 8), torch.float32, 2)
    params, values = dl._pack([(dl._W, (None, 1.0)), (dl._C, (None, 0.1))])
    direct = torch.ops.kdfast.diffusion_loss(dl.PSEUDO_HUBER, 0, x, y, None, None, None, params, values, "")[0]
    torch.testing.assert_close(direct, dl.pseudo_huber(x, y, c=0.1))
    sched = [(None, v) for v in (0.8, 0.6, 0.9, 0.43)]
    cparams, cvalues = dl._pack(list(zip((dl._AT, dl._ST, dl._AS, dl._SS), sched)))
    direct = torch.ops.kdfast.sample_combination(1, 0, x, y, cparams, cvalues, "")
    torch.testing.assert_close(direct, dl.per_sample_ddim_step(x, y, 0.8, 0.6, 0.9, 0.43))
    bad = [
        ((dl.PSEUDO_HUBER, 0, x, y[:1], None, None, None, params, values), "must have the shape of x"),
        ((7, 0, x, y, None, None, None, params, values), "kind must be in"),
        ((dl.PSEUDO_HUBER, 5, x, y, None, None, None, params, values), "prediction must be in"),
        ((dl.PSEUDO_HUBER, 0, x, y, None, None, None, [None, torch.ones(3), None, None, None, None], values),
         r"params\[c\] must be"),
        ((dl.PSEUDO_HUBER, 0, x, y, None, None, None, params[:3], values), "params and values must hold"),
        # a missing input the kind needs (the Triton kernel read x in its place; the others failed
        # without naming it), and values the public functions refuse
        ((dl.PSEUDO_HUBER, 0, x, None, None, None, None, params, values), r"kind pseudo_huber needs in1 \(y\)"),
        ((dl.DMD, 0, x, y, None, None, None, params, values), r"kind dmd needs in2 \(x0_fake\)"),
        ((dl.PROGRESSIVE_MSE, 0, x, y, None, None, None, params, values), r"kind progressive_mse needs in2 \(x_t\)"),
        ((dl.PSEUDO_HUBER, 0, x, y, None, None, None, params, [1.0, -0.5, 0.0, 0.0, 0.0, 0.0]),
         r"values\[c\] must be >= 0"),
        ((dl.PSEUDO_HUBER, 0, x, y, None, None, None, params, [math.nan, 0.1, 0.0, 0.0, 0.0, 0.0]),
         r"values\[weights\] must be finite"),
        ((dl.PROGRESSIVE_MSE, 0, x, y, x, None, None, params, [1.0, 0.0, 0.8, 0.0, 0.9, 0.43]),
         "sigma_t must be nonzero"),
    ]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            torch.ops.kdfast.diffusion_loss(*args, "")
    loss, aux = torch.ops.kdfast.diffusion_loss(dl.PSEUDO_HUBER, 0, x, y, None, None, None, params, values, "")
    with pytest.raises(ValueError, match="aux must be float64"):
        torch.ops.kdfast.diffusion_loss_backward(dl.PSEUDO_HUBER, 0, x, y, None, None, params, values, aux.float(),
                                                 torch.ones(2), True, True, "")
    with pytest.raises(ValueError, match="kind pseudo_huber needs in1"):
        torch.ops.kdfast.diffusion_loss_backward(dl.PSEUDO_HUBER, 0, x, None, None, None, params, values, aux,
                                                 torch.ones(2), True, False, "")
    gx, _ = torch.ops.kdfast.diffusion_loss_backward(dl.PSEUDO_HUBER, 0, x, y, None, None, params, values, aux,
                                                     torch.ones(2), True, False, "")
    leaf = x.detach().clone().requires_grad_(True)
    dl.pseudo_huber(leaf, y, c=0.1).sum().backward()
    torch.testing.assert_close(gx, leaf.grad)


def test_opcheck_combination():
    sched = [t.to(torch.float32) for t in schedule(3, 7)]
    a = randn((3, 4), torch.float32, 1).requires_grad_(True)
    b = randn((3, 4), torch.float16, 2)
    torch.library.opcheck(torch.ops.kdfast.sample_combination.default,
                          (0, 1, a, b, [None, None, *sched], [0.0] * 6, ""))


def test_compiles():
    x = randn((4, 2, 8), torch.float32, 1).requires_grad_(True)
    y = randn((4, 2, 8), torch.float32, 2)
    w = torch.linspace(0.5, 1.5, 4)

    def loss(x, y):
        return ops.pseudo_huber(x, y, c=0.1, weights=w).mean()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    value = compiled(x, y)
    (grad,) = torch.autograd.grad(value, x)
    x2 = x.detach().requires_grad_(True)
    expected = loss(x2, y)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, x2.grad)


# Each entry: a call of (x, y, z, v) with a Python number v, the value range it takes.
_NUMBER_CALLS = {
    "pseudo_huber c": lambda x, y, z, v: ops.pseudo_huber(x, y, c=v),
    "pseudo_huber weights": lambda x, y, z, v: ops.pseudo_huber(x, y, c=0.1, weights=v, elementwise=True),
    "dmd weights": lambda x, y, z, v: ops.dmd(x, y, z, weights=v),
    "progressive_mse schedule": lambda x, y, z, v: ops.progressive_mse(x, y, z, 0.9, v + 0.2, 0.95, v,
                                                                       prediction_type="v_prediction", weights=2.0),
    "pd_target schedule": lambda x, y, z, v: ops.pd_target(x, y, v + 0.5, 0.4, 0.95, v),
    "ddim_step schedule": lambda x, y, z, v: ops.per_sample_ddim_step(x, y, 0.9, v + 0.2, 0.95, v),
}


@pytest.mark.parametrize("name", list(_NUMBER_CALLS))
def test_a_number_that_changes_between_compiled_calls_compiles_once(name):
    # A Python number reached the custom op as a float, a graph constant: each new value (one
    # timestep's sigma, an annealed c) compiled again, and past torch's limit of 8 values
    # fullgraph=True failed. Traced as a tensor, the second value's graph serves every value.
    call = _NUMBER_CALLS[name]
    x = randn((3, 2, 5), torch.float32, 90).requires_grad_(True)
    y, z = randn((3, 2, 5), torch.float32, 91), randn((3, 2, 5), torch.float32, 92)
    frames = []

    def counting(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda v: call(x, y, z, v), backend=counting, fullgraph=True)
    for k in range(10):
        v = 0.1 + 0.07 * k
        got = compiled(v)
        expected = call(x, y, z, v)
        torch.testing.assert_close(got, expected)
        if got.requires_grad:
            torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])
    assert len(frames) <= 2  # the first value as a constant, then the symbolic one


@pytest.mark.parametrize("value, match", [(math.nan, "c must be finite"), (-0.5, "c must be >= 0.0")])
def test_a_traced_number_is_checked_when_the_compiled_code_runs(value, match):
    x, y = randn((2, 6), torch.float32, 93), randn((2, 6), torch.float32, 94)
    torch._dynamo.reset()
    compiled = torch.compile(lambda v: ops.pseudo_huber(x, y, c=v), backend="eager", fullgraph=True)
    compiled(0.2)
    compiled(0.3)  # (symbolic from here on)
    with pytest.raises(RuntimeError, match=match):
        compiled(value)


def test_a_sequence_for_a_number_is_named_under_compile_too():
    # (under torch.compile it met torch.ones(batch) * value first: an opaque fake-tensor error)
    x, y = randn((3, 6), torch.float32, 95), randn((3, 6), torch.float32, 96)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y, c: ops.pseudo_huber(x, y, c=c), backend="eager")
    with pytest.raises(Exception, match=r"c must be a number or a tensor, got \[0.1, 0.2, 0.3\]"):
        compiled(x, y, [0.1, 0.2, 0.3])


def _x(shape=(3, 8)):
    return randn(shape, torch.float32, 0)


@pytest.mark.parametrize("call, error, match", [
    (lambda x: ops.pseudo_huber(x.numpy(), x, c=0.1), TypeError, "x must be a torch.Tensor"),
    (lambda x: ops.pseudo_huber(x.long(), x, c=0.1), TypeError, "x must be float32"),
    (lambda x: ops.pseudo_huber(x, x.double(), c=0.1), TypeError, "y must be float32"),
    (lambda x: ops.pseudo_huber(x[0, 0], x[0, 0], c=0.1), ValueError, "x must have a batch dimension"),
    (lambda x: ops.pseudo_huber(x[:, :0], x[:, :0], c=0.1), ValueError, "at least one element per sample"),
    (lambda x: ops.pseudo_huber(x, x[:2], c=0.1), ValueError, "y must have the shape of x"),
    (lambda x: ops.pseudo_huber(x, x, c=-1.0), ValueError, "c must be >= 0"),
    (lambda x: ops.pseudo_huber(x, x, c=math.nan), ValueError, "c must be finite"),
    (lambda x: ops.pseudo_huber(x, x, c=None), TypeError, "c is required"),
    (lambda x: ops.pseudo_huber(x, x, c="big"), TypeError, "c must be a number"),
    # float() took these as numbers
    (lambda x: ops.pseudo_huber(x, x, c="0.1"), TypeError, "c must be a number"),
    (lambda x: ops.pseudo_huber(x, x, c=True), TypeError, "c must be a number"),
    (lambda x: ops.dmd(x, x * 0, x * 0 + 1, weights="2"), TypeError, "weights must be a number"),
    (lambda x: ops.pseudo_huber(x, x, c=0.1, weights=torch.ones(2)), ValueError, "weights must be a number or hold"),
    (lambda x: ops.pseudo_huber(x, x, c=0.1, weights=torch.ones(3, dtype=torch.bool)), TypeError,
     r"weights must be a floating-point \(or int32 / int64\) tensor, got torch.bool"),
    (lambda x: ops.pseudo_huber(x, x, c=0.1, weights=math.inf), ValueError, "weights must be finite"),
    (lambda x: ops.dmd(x, x, x[:, :4]), ValueError, "x0_fake must have the shape of x"),
    (lambda x: ops.dmd(x, x, x, x_t=x[:1]), ValueError, "x_t must have the shape of x"),
    (lambda x: ops.progressive_mse(x, x, x, 0.5, 0.5, 0.6, 0.4, prediction_type="x0"), ValueError,
     "prediction_type must be one of"),
    (lambda x: ops.progressive_mse(x, x, x, torch.ones(4), 0.5, 0.6, 0.4), ValueError, "alpha_t must be"),
    (lambda x: ops.pd_target(x, x, 0.5, math.inf, 0.6, 0.4), ValueError, "sigma_t must be finite"),
    (lambda x: dl.sample_combination("ddpm", x, x, 0.5, 0.5, 0.6, 0.4), ValueError, "combination must be one of"),
    (lambda x: ops.per_sample_ddim_step(x, x.half()[:2], 0.5, 0.5, 0.6, 0.4), ValueError,
     "model_output must have the shape of x_t"),
    (lambda x: ops.pseudo_huber(x, x, c=0.1, backend="cuda"), BackendUnavailableError, "cannot run"),
])
def test_bad_input(call, error, match, unemulated_backends):
    with pytest.raises(error, match=match):
        call(_x())


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_reference(backend, loss, dtype):
    for i, shape in enumerate(SHAPES + [(8, 4, 64, 64), (3, 16, 128, 129)]):
        fused, reference, tensors, diff = case(loss, shape, dtype, 10 * i, "cuda")
        grad_loss = rand(shape[0], 7, -2.0, 2.0).float().cuda()
        loss_v, grads = evaluate(lambda *t: fused(backend, *t), tensors, diff, grad_loss)
        loss64, grads64 = evaluate(lambda *t: reference(torch.float64, *t), tensors, diff, grad_loss, torch.float64)
        loss32, grads32 = evaluate(lambda *t: reference(torch.float32, *t), tensors, diff, grad_loss)
        assert_close_by_rule(loss_v, loss64, loss32, f"{backend} {loss} {dtype} {shape}", atol=1e-6)
        for g, g64, g32 in zip(grads, grads64, grads32):
            ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * g64.abs().max().item()
            assert_close_by_rule(g, g64, g32, f"{backend} {loss} {dtype} {shape} grad", atol=1e-6 + ulp)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_nan_safety_and_combination(backend):
    x = randn((5, 3, 7), torch.float32, 10).cuda().requires_grad_(True)
    real, fake = randn((5, 3, 7), torch.float32, 11).cuda(), randn((5, 3, 7), torch.float32, 12).cuda()
    fake[0, 1, 2] = math.nan
    real[1, 0, 0] = math.inf
    real[2] = x[2].detach()
    loss = ops.dmd(x, real, fake, backend=backend)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and (gx[1:3] == 0).all()
    sched = [t.cuda() for t in schedule(5, 3)]
    a, b = randn((5, 3, 7), torch.bfloat16, 1).cuda(), randn((5, 3, 7), torch.bfloat16, 2).cuda()
    out = ops.pd_target(a, b, *sched, prediction_type="v_prediction", backend=backend)
    torch.testing.assert_close(out.float(), ref.pd_target(a, b, *sched, "v_prediction").float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_no_sync_and_graph_capture():
    x = randn((8, 4, 64, 64), torch.bfloat16, 1).cuda().requires_grad_(True)
    y = randn((8, 4, 64, 64), torch.bfloat16, 2).cuda()
    c = torch.full((8,), 0.03, device="cuda")
    w = torch.linspace(0.5, 2.0, 8, device="cuda")
    sched = [t.cuda() for t in schedule(8, 3)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.pseudo_huber(x, y, c=c, weights=w).sum().backward()
        ops.dmd(x, y, y * 0.5, weights=w).sum().backward()
        ops.progressive_mse(x, y, y, *sched, weights=w).sum().backward()
        ops.pd_target(y, y, *sched)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        ops.pseudo_huber(x, y, c=c, weights=w)  # warm-up outside capture
        with torch.cuda.graph(graph):
            loss = ops.pseudo_huber(x, y, c=c, weights=w)
    graph.replay()
    torch.testing.assert_close(loss, ops.pseudo_huber(x.detach(), y, c=c, weights=w))


# --------------------------------------------------------------------------- non-VP schedules


# (alpha_t, sigma_t, alpha_s, sigma_s) with alpha^2 + sigma^2 != 1: variance-exploding (EDM-style,
# alpha = 1, sigma > 1) and flow-matching (alpha = 1 - t, sigma = t) samples in one batch.
NON_VP = tuple(torch.tensor(v) for v in ([1.0, 0.3, 1.0], [8.0, 0.7, 0.4], [1.0, 0.6, 1.0], [2.5, 0.4, 0.05]))


@pytest.mark.parametrize("backend", COMBINATION_BACKENDS + ["reference"])
@pytest.mark.parametrize("combination", ref.COMBINATIONS)
def test_combination_with_non_variance_preserving_schedules(backend, combination):
    a, b = randn((3, 2, 9), torch.float32, 30), randn((3, 2, 9), torch.float32, 31)
    for pt in ref.PREDICTION_TYPES:
        out = dl.sample_combination(combination, a, b, *NON_VP, prediction_type=pt, backend=backend)
        expected = ref._combine(combination, pt, a, b, *NON_VP, torch.float64)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5, msg=f"{combination} {pt}")
    # v = alpha eps - sigma x0: the DDIM step from the true v recovers x_s = alpha_s x0 + sigma_s eps
    x0, eps = randn((3, 2, 9), torch.float64, 32), randn((3, 2, 9), torch.float64, 33)
    at, st, as_, ss = (v.double().reshape(3, 1, 1) for v in NON_VP)
    x_t, v = at * x0 + st * eps, at * eps - st * x0
    if combination == "ddim_step":
        got = ops.per_sample_ddim_step(x_t.float(), v.float(), *NON_VP, prediction_type="v_prediction",
                                       backend=backend)
        torch.testing.assert_close(got.double(), as_ * x0 + ss * eps, rtol=1e-5, atol=1e-5)
    else:  # the target of the two-step x_s that came from this x0 is this x0's v at x_t
        got = ops.pd_target((as_ * x0 + ss * eps).float(), x_t.float(), *NON_VP, prediction_type="v_prediction",
                            backend=backend)
        torch.testing.assert_close(got.double(), v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("prediction_type", ref.PREDICTION_TYPES)
def test_progressive_mse_with_non_variance_preserving_schedules(backend, prediction_type):
    pred = randn((3, 2, 9), torch.float32, 34).requires_grad_(True)
    x_s, x_t = randn((3, 2, 9), torch.float32, 35), randn((3, 2, 9), torch.float32, 36)
    loss = ops.progressive_mse(pred, x_s, x_t, *NON_VP, prediction_type=prediction_type, backend=backend)
    (gp,) = torch.autograd.grad(loss.sum(), pred)
    p64 = pred.detach().double().requires_grad_(True)
    loss64 = ref.progressive_mse(p64, x_s, x_t, *NON_VP, prediction_type)
    (gp64,) = torch.autograd.grad(loss64.sum(), p64)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp.double(), gp64, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- edge cases of the per-sample loss


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_pseudo_huber_residual_far_below_c_has_no_cancellation(backend):
    # ||x - y||^2 = 1e-14 with c = 1: the loss is 5e-15, which sqrt(s + c^2) - c loses to rounding
    x = torch.zeros(2, 100)
    y = torch.full((2, 100), 1e-8)
    y[1] *= 3
    got = ops.pseudo_huber(x, y, c=1.0, backend=backend)
    s = (y.double() ** 2).sum(1)
    exact = s / (torch.sqrt(s + 1.0) + 1.0)
    if backend == "reference":
        assert torch.isfinite(got).all()
        return  # the specification computes r - c (cancellation included)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_per_sample_pseudo_huber_gradient_of_a_sample_holding_nan_is_nan_like_autograd(backend):
    # r = sqrt(||d||^2 + c^2) is NaN: autograd of the formula makes the sample's whole gradient
    # NaN; the fused backward took "not r > 0" for the 0 / 0 case and gave 0 beside the NaN
    x = randn((3, 2, 5), torch.float32, 42)
    y = randn((3, 2, 5), torch.float32, 43)
    y[0, 1, 2] = math.nan
    x.requires_grad_(True)
    loss = ops.pseudo_huber(x, y, c=0.1, backend=backend)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    leaf = x.detach().double().requires_grad_(True)
    d = leaf - y.double()
    (expected,) = torch.autograd.grad((torch.sqrt(d.square().sum((1, 2)) + 0.01) - 0.1).sum(), leaf)
    assert gx[0].isnan().all() and torch.isfinite(gx[1:]).all()
    torch.testing.assert_close(gx[1:].double(), expected[1:], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_elementwise_pseudo_huber_of_an_infinite_or_nan_difference(backend):
    # |d| = inf: the element's loss is inf and its slope NaN, as autograd of the formula gives
    # (diffusers' LCM loss): GradScaler must see an fp16 overflow. A NaN d gave slope 0 (hidden).
    x = randn((3, 8), torch.float32, 40)
    x[0, 3] = math.inf
    x[1, 5] = -math.inf
    x[2, 1] = math.nan
    x.requires_grad_(True)
    y = randn((3, 8), torch.float32, 41)
    loss = ops.pseudo_huber(x, y, c=0.5, elementwise=True, backend=backend)
    assert (loss[:2] == math.inf).all() and loss[2].isnan()
    (gx,) = torch.autograd.grad(loss.sum(), x)
    d = (x.detach() - y).double()
    finite = torch.isfinite(d)
    assert gx[~finite].isnan().all() and torch.isfinite(gx[finite]).all()
    expected = d / torch.sqrt(d * d + 0.25) / 8
    torch.testing.assert_close(gx.double()[finite], expected[finite], rtol=1e-6, atol=1e-7)
    leaf = d.clone().requires_grad_(True)
    (gl,) = torch.autograd.grad((torch.sqrt(leaf * leaf + 0.25) - 0.5).mean(1).sum(), leaf)  # the formula's
    assert torch.equal(gl.isnan(), gx.isnan())
    # torch.func's path (the reference's autograd) agrees: it gave sign(d) at an inf
    gf = torch.func.grad(lambda v: ops.pseudo_huber(v, y, c=0.5, elementwise=True, backend=backend).sum())(x.detach())
    assert torch.equal(gf.isnan(), gx.isnan())
    torch.testing.assert_close(gf[finite], gx[finite], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_pseudo_huber_of_a_difference_past_the_float32_range(backend, dtype):
    # Finite x and y whose difference overflows float32: the loss is finite (the float64 value),
    # not inf (the kernels took x - y in float32 before their overflow-free form).
    x = torch.tensor([[3e38, 0.0, 1.0, 2.0], [-3e38, 0.5, 1.0, -2.0]], dtype=dtype).requires_grad_(True)
    y = torch.tensor([[-3e38, 0.0, 0.0, 0.0], [3e38, 1e38, 0.0, 0.0]], dtype=dtype)
    loss = ops.pseudo_huber(x, y, c=0.001, elementwise=True, backend=backend)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    d = x.detach().double() - y.double()
    expected = (torch.sqrt(d * d + 1e-6) - 1e-3).mean(1)
    assert torch.isfinite(loss).all(), loss
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=0)
    rtol = 1e-6 if dtype == torch.float32 else 2 ** -8  # (a gradient rounded to bfloat16)
    torch.testing.assert_close(gx.double(), d / torch.sqrt(d * d + 1e-6) / 4, rtol=rtol, atol=0)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("loss_name", ["pseudo_huber", "pseudo_huber_elementwise"])
def test_zero_weight_sample_with_infinite_or_nan_loss_contributes_zero(backend, loss_name):
    x = randn((3, 6), torch.float32, 42)
    y = randn((3, 6), torch.float32, 43)
    x[0, 2] = math.inf
    x[1, 4] = math.nan
    w = torch.tensor([0.0, 0.0, 1.5])
    loss = ops.pseudo_huber(x, y, c=0.1, weights=w, elementwise=loss_name.endswith("elementwise"), backend=backend)
    assert loss[0] == 0 and loss[1] == 0, loss
    expected = ref.pseudo_huber(x[2:], y[2:], 0.1, 1.5, loss_name.endswith("elementwise"))
    torch.testing.assert_close(loss[2:].double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("elementwise", [False, True])
def test_gradient_of_y_alone(backend, elementwise):
    # Only y needs a gradient: it is -d/dx, from the backward's single-gradient branch.
    x = randn((3, 2, 7), torch.float32, 44)
    y = randn((3, 2, 7), torch.float32, 45).requires_grad_(True)
    w = torch.tensor([0.5, 1.0, 2.0])
    upstream = torch.tensor([1.0, -2.0, 0.5])
    (gy,) = torch.autograd.grad((ops.pseudo_huber(x, y, c=0.3, weights=w, elementwise=elementwise,
                                                  backend=backend) * upstream).sum(), y)
    y64 = y.detach().double().requires_grad_(True)
    (gy64,) = torch.autograd.grad((ref.pseudo_huber(x, y64, 0.3, w, elementwise) * upstream).sum(), y64)
    torch.testing.assert_close(gy.double(), gy64, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- batch-strided inputs


def _strided(t, kind):
    """``t`` as a view whose samples are contiguous blocks at a batch stride other than numel / batch."""
    if kind == "slice_of_wider":
        return torch.cat([t, torch.full_like(t, 7.0)], 1)[:, :t.shape[1]]
    if kind == "interleaved":
        return torch.stack([t, -t], 1)[:, 0]
    padded = torch.cat([t.reshape(t.shape[0], -1), torch.full((t.shape[0], 3), 7.0, dtype=t.dtype)], 1)
    return padded[:, :t[0].numel()].unflatten(1, t.shape[1:])


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("loss", LOSSES)
def test_batch_strided_inputs(backend, loss):
    """Each input a different batch-strided view (x a differentiable one): the contiguous result."""
    fused, reference, tensors, diff = case(loss, (3, 2, 9), torch.float32, 50)
    grad_loss = rand(3, 51, -2.0, 2.0).float()
    exp_loss, exp_grads = evaluate(lambda *t: reference(torch.float64, *t), tensors, diff, grad_loss, torch.float64)
    kinds = ["slice_of_wider", "interleaved", "padded", "slice_of_wider"]
    for shift in range(3 if backend != "triton" else 1):
        leaves = [t.detach().clone().requires_grad_(i in diff) for i, t in enumerate(tensors)]
        views = [_strided(t, kinds[(i + shift) % 3]) for i, t in enumerate(leaves)]
        assert all(not v.is_contiguous() for v in views)
        got = fused(backend, *views)
        grads = torch.autograd.grad((got * grad_loss).sum(), [leaves[i] for i in diff])
        torch.testing.assert_close(got.double(), exp_loss, rtol=1e-5, atol=1e-6, msg=f"{loss} loss")
        for g, e in zip(grads, exp_grads):
            torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6, msg=f"{loss} grad")


@pytest.mark.parametrize("backend", COMBINATION_BACKENDS + ["reference"])
def test_combination_of_batch_strided_inputs(backend):
    sched = schedule(3, 52)
    a, b = randn((3, 2, 9), torch.float32, 53), randn((3, 2, 9), torch.float32, 54)
    for kind_a, kind_b in (("slice_of_wider", "padded"), ("interleaved", "slice_of_wider")):
        for combination in ref.COMBINATIONS:
            got = dl.sample_combination(combination, _strided(a, kind_a), _strided(b, kind_b), *sched,
                                        prediction_type="v_prediction", backend=backend)
            expected = ref._combine(combination, "v_prediction", a, b, *sched, torch.float64)
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_ddim_step_that_divides_by_zero_is_refused():
    # (pd_target refused its zero divisors; the DDIM step gave NaN and inf without an error)
    x, e = randn((2, 4), torch.float32, 90), randn((2, 4), torch.float32, 91)
    for sched, prediction, match in (((0.0, 1.0, 0.5, 0.8), "epsilon", "alpha_t must be nonzero"),
                                     ((torch.tensor([0.6, 0.0]), 1.0, 0.5, 0.8), "epsilon", "alpha_t must be nonzero"),
                                     ((1.0, 0.0, 0.5, 0.8), "sample", "sigma_t must be nonzero"),
                                     ((0.0, 0.0, 0.5, 0.8), "v_prediction", "must not both be zero")):
        with pytest.raises(ValueError, match=match):
            ops.per_sample_ddim_step(x, e, *sched, prediction_type=prediction)
    # the other predictions take those values
    assert torch.isfinite(ops.per_sample_ddim_step(x, e, 0.0, 1.0, 0.5, 0.8, prediction_type="sample")).all()
    assert torch.isfinite(ops.per_sample_ddim_step(x, e, 1.0, 0.0, 0.5, 0.8)).all()


def test_cpu_schedule_checks_do_not_break_a_full_graph():
    # The free CPU checks branch on data: under torch.compile they are skipped, not a graph break.
    a_t, s_t = torch.tensor([0.9, 0.8]), torch.tensor([0.3, 0.5])

    def target(xs, xt):
        return ops.pd_target(xs, xt, a_t, s_t, 0.95, 0.1)

    xs, xt = randn((2, 3), torch.float32, 80), randn((2, 3), torch.float32, 81)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(target, backend="eager", fullgraph=True)(xs, xt), target(xs, xt))


def test_double_backward_is_refused_where_it_would_lose_a_term():
    # A gradient penalty (create_graph=True) through a kernel's gradient, which has no graph of
    # its own, would silently drop the penalty's gradient: refused. DMD's gradient is the
    # constant g plus a term linear in x (see the next test), so it stays allowed.
    x, y, z = randn((3, 2, 4), torch.float32, 70), randn((3, 2, 4), torch.float32, 71), randn((3, 2, 4), torch.float32, 72)
    sched = [t.to(torch.float32) for t in schedule(3, 8)]
    losses = {
        "pseudo_huber": lambda a: ops.pseudo_huber(a, y, c=10.0),
        "pseudo_huber_elementwise": lambda a: ops.pseudo_huber(a, y, c=10.0, elementwise=True),
        "progressive_mse": lambda a: ops.progressive_mse(a, y, z, *sched),
    }
    for name, fn in losses.items():
        leaf = x.clone().requires_grad_(True)
        loss = fn(leaf).sum()
        with pytest.raises(RuntimeError, match=f"kdfast.{name}: double backward"):
            torch.autograd.grad(loss, leaf, create_graph=True)
        (g,) = torch.autograd.grad(fn(leaf).sum(), leaf)  # a plain backward is unaffected
        assert torch.isfinite(g).all()
    leaf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ops.dmd(leaf, y, z).sum(), leaf, create_graph=True)
    leaf64 = x.double().requires_grad_(True)
    (g64,) = torch.autograd.grad(ref.dmd(leaf64, y.double(), z.double()).sum(), leaf64)
    torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-7)
    # ... unless the gradient's factors carry a graph: learned weights, or a scaled loss
    weights = torch.tensor([0.5, 2.0, 1.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="kdfast.dmd: double backward"):
        torch.autograd.grad(ops.dmd(leaf, y, z, weights=weights).sum(), leaf, create_graph=True)
    factor = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(RuntimeError, match="kdfast.dmd: double backward"):
        torch.autograd.grad(factor * ops.dmd(leaf, y, z).sum(), leaf, create_graph=True)


@pytest.mark.parametrize("weights", [None, 0.5, "tensor"])
def test_dmd_second_order_terms_are_those_of_its_formula(weights):
    # 0.5 w mean((x - sg(x - g))^2) has Hessian w I / n on x: a gradient penalty on the DMD
    # gradient sees it, as it does through DMD2's 0.5 * mse_loss(x, (x - g).detach())
    x, real, fake = (randn((3, 2, 4), torch.float64, 73 + k) for k in range(3))
    w = torch.tensor([0.5, 2.0, 1.0]) if weights == "tensor" else weights
    w64 = torch.ones(3, dtype=torch.float64) if w is None else torch.as_tensor(w, dtype=torch.float64).expand(3)

    def penalty_gradient(loss, leaf):
        (g,) = torch.autograd.grad(3.0 * loss(leaf).sum(), leaf, create_graph=True)
        (h,) = torch.autograd.grad((g ** 2).sum(), leaf)
        return h.double()

    def formula(leaf):
        g = ref.dmd_gradient(leaf, real, fake)
        return w64 * 0.5 * ((leaf - (leaf - g).detach()) ** 2).flatten(1).mean(1)

    expected = penalty_gradient(formula, x.clone().requires_grad_(True))
    kernels = penalty_gradient(lambda a: ops.dmd(a, real.float(), fake.float(), weights=w),
                               x.float().requires_grad_(True))
    reference = penalty_gradient(lambda a: ref.dmd(a, real, fake, weights=w), x.clone().requires_grad_(True))
    torch.testing.assert_close(kernels, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(reference, expected, rtol=1e-12, atol=1e-15)
    empty = torch.zeros(0, 2, 4, requires_grad=True)
    (g,) = torch.autograd.grad(ops.dmd(empty, empty.detach(), empty.detach()).sum(), empty, create_graph=True)
    assert g.shape == empty.shape


def test_vmap_is_refused_by_name_or_batched():
    # Under torch.func.vmap the tensors are batched wrappers without memory of their own: the
    # ops go through the dispatcher, which batches them or names the op it cannot batch (no
    # raw data-pointer error from a kernel given a wrapper).
    x, y = randn((3, 2, 4, 5), torch.float32, 73), randn((3, 2, 4, 5), torch.float32, 74)
    try:
        got = torch.vmap(lambda a, b: ops.pseudo_huber(a, b, c=0.1))(x, y)
    except RuntimeError as e:
        assert "kdfast::diffusion_loss" in str(e)
    else:
        torch.testing.assert_close(got, torch.stack([ops.pseudo_huber(a, b, c=0.1) for a, b in zip(x, y)]))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("elementwise", [False, True])
def test_pseudo_huber_far_below_c_does_not_cancel(backend, elementwise):
    # sqrt(s + c^2) - c loses s where s << c^2: the reference read 2% low at |d| = 1e-7, c = 1,
    # and 0 at c = 1e30; every backend computes s / (sqrt(s + c^2) + c)
    x, y = torch.tensor([[1e-7, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]), torch.zeros(2, 4)
    c = torch.tensor([1.0, 1e30])
    if elementwise:  # the mean of per-element terms d^2 / (sqrt(d^2 + c^2) + c)
        expected = [1e-14 / (math.sqrt(1e-14 + 1.0) + 1.0) / 4, 2.0 / (2e30 * 4)]
    else:  # s / (sqrt(s + c^2) + c) with s = ||d||^2
        expected = [1e-14 / (math.sqrt(1e-14 + 1.0) + 1.0), 2.0 / 2e30]
    expected = torch.tensor(expected, dtype=torch.float64)
    got = ops.pseudo_huber(x, y, c=c, elementwise=elementwise, backend=backend)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
