"""Latents in any per-sample dense layout (channels_last above all) are read in place and give
outputs in the same layout, with the values of the contiguous computation.

The kernels read each sample as one flat block at a batch stride. Element-wise math and
per-sample reductions do not depend on the order of the elements inside a block, so a call is
copy-free whenever its tensors share the sample's order; a tensor in another order is copied
into it (never read as if it were in it).
"""
import sys

import pytest
import torch

import kdfast
from kdfast import ops
from kdfast.ops import diffusion_losses as dl

from conftest import usable_backends

step_module = sys.modules["kdfast.ops.solver_step"]  # kdfast.ops.solver_step is the function
CL = torch.channels_last
BACKENDS = usable_backends("solver_step")
THRESHOLD_BACKENDS = usable_backends("threshold_scale")
LOSS_BACKENDS = usable_backends("diffusion_loss")
SHAPE = (2, 3, 5, 4)


def _tensors(n, seed, dtype=torch.float32, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


def _coefs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ops.solver_step.__globals__["NUM_COEFS"], generator=g, dtype=torch.float64).float()


def _step(x, m, cond, h0, aux, noise, coefs, **kw):
    return ops.solver_step(x, m, coefs, cond=cond, guidance_scale=3.0, history=[h0], aux=aux, noise=noise,
                           write_history=True, write_aux=True, **kw)


@pytest.fixture
def launched(monkeypatch):
    """The addresses each compiled-kernel launch of the fast path read its inputs from."""
    seen = []
    for name, launch in list(step_module._LAUNCHERS.items()):
        def spy(x, args, launch=launch):
            seen.append(list(args[2]))
            return launch(x, args)
        monkeypatch.setitem(step_module._LAUNCHERS, name, spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_channels_last_step_is_copy_free_and_stays_channels_last(backend, dtype, launched):
    x, m, cond, h0, aux, noise = _tensors(6, 1, dtype)
    coefs = _coefs(2)
    want = _step(x, m, cond, h0, aux, noise, coefs, backend=backend)
    cl = [t.to(memory_format=CL) for t in (x, m, cond, h0, aux, noise)]
    launched.clear()
    got = _step(*cl, coefs, backend=backend)
    for g, w in zip(got, want):
        assert g.stride() == cl[0].stride() and g.is_contiguous(memory_format=CL)
        assert torch.equal(g, w)  # element-wise math: the order of the elements changes nothing
    if backend in (None, "cpu"):
        # the kernel read every input where it lies: no copy into another layout
        assert launched == [[t.data_ptr() for t in cl[:3]] + [cl[3].data_ptr(), 0, 0] + [t.data_ptr() for t in cl[4:]]]


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_mixed_layouts_are_brought_to_the_samples(backend):
    # NCHW latents with a channels_last UNet (whose outputs follow its weights), and the reverse
    x, m, cond, h0 = _tensors(4, 3)
    coefs = _coefs(4)
    want = ops.solver_step(x, m, coefs, cond=cond, guidance_scale=2.0, history=[h0], write_history=True)
    for layouts in [(False, True, True, False), (True, False, False, True), (True, False, True, False)]:
        ins = [t.to(memory_format=CL) if cl else t for t, cl in zip((x, m, cond, h0), layouts)]
        got = ops.solver_step(ins[0], ins[1], coefs, cond=ins[2], guidance_scale=2.0, history=[ins[3]],
                              write_history=True, backend=backend)
        for g, w in zip(got[:2], want[:2]):
            assert torch.equal(g, w), layouts
            assert g.stride() == ins[0].stride(), "the outputs follow the sample's layout"


def test_other_dense_orders_and_batch_strided_channels_last():
    x, m, h0 = _tensors(3, 5)
    coefs = _coefs(6)
    want = ops.solver_step(x, m, coefs, history=[h0], clip_value=0.5, write_history=True)
    permuted = [t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) for t in (x, m, h0)]  # W outermost
    doubled = torch.cat([x, x]).to(memory_format=CL)
    halves = [doubled[2:], m.to(memory_format=CL), h0.to(memory_format=CL)]  # a CFG half of a channels_last batch
    for ins in (permuted, halves):
        got = ops.solver_step(ins[0], ins[1], coefs, history=[ins[2]], clip_value=0.5, write_history=True)
        for g, w in zip(got[:2], want[:2]):
            assert torch.equal(g, w)
            assert g.stride()[1:] == ins[0].stride()[1:]


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_dynamic_thresholding_on_channels_last(backend):
    x, m, cond = (t * 4 for t in _tensors(3, 7))
    coefs = _coefs(8)
    scale = ops.threshold_scale(x, m, 1.0, -0.5, cond=cond, guidance_scale=2.0, ratio=0.9, max_value=3.0)
    want = ops.solver_step(x, m, coefs, cond=cond, guidance_scale=2.0, dynamic_scale=scale).sample
    cl = [t.to(memory_format=CL) for t in (x, m, cond)]
    scale_backend = backend if backend in THRESHOLD_BACKENDS else None
    for mixed in (cl, [cl[0], m, cl[2]]):
        got_scale = ops.threshold_scale(mixed[0], mixed[1], 1.0, -0.5, cond=mixed[2], guidance_scale=2.0, ratio=0.9,
                                        max_value=3.0, backend=scale_backend)
        assert torch.equal(got_scale, scale)
        got = ops.solver_step(mixed[0], mixed[1], coefs, cond=mixed[2], guidance_scale=2.0, dynamic_scale=got_scale,
                              backend=backend).sample
        assert torch.equal(got, want) and got.is_contiguous(memory_format=CL)


def test_channels_last_under_autograd_and_opcheck():
    x, m, h0 = _tensors(3, 9)
    coefs = _coefs(10)
    grads = []
    for layout in (torch.contiguous_format, CL):
        leaves = [t.clone(memory_format=layout).requires_grad_(True) for t in (x, m, h0)]
        out = ops.solver_step(leaves[0], leaves[1], coefs, history=[leaves[2]], clip_value=0.8).sample
        assert out.stride() == leaves[0].stride()
        (out * torch.arange(out.numel()).view(SHAPE)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the fake (meta) outputs have the real ones' strides: channels_last in, channels_last out
    cl = [t.to(memory_format=CL) for t in (x, m, h0)]
    args = (cl[0], cl[1], coefs, None, 1.0, cl[2], None, None, None, None, 0, 1.0, None, 3, torch.float32, "")
    torch.library.opcheck(torch.ops.kdfast.solver_step.default, args)
    mixed = (x, cl[1], coefs, None, 1.0, cl[2], None, None, None, None, 0, 1.0, None, 3, torch.float32, "")
    torch.library.opcheck(torch.ops.kdfast.solver_step.default, mixed)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
                                  "DDIMScheduler"])
def test_scheduler_loop_keeps_channels_last_latents(name):
    """A loop on channels_last latents (with a model whose outputs keep its input's layout)
    gives the NCHW loop's samples, in channels_last, step after step."""
    cls = getattr(kdfast.schedulers, name)
    extra = {"thresholding": True, "sample_max_value": 1.5} if name != "EulerDiscreteScheduler" else {}

    def model(x, t):
        return torch.sin(3 * x) * 0.8 + 0.1 * x * (float(t) / 1000.0)

    results = []
    for layout in (torch.contiguous_format, CL):
        sched = cls(**extra)
        sched.set_timesteps(8)
        x = (_tensors(1, 11)[0] * sched.init_noise_sigma).to(memory_format=layout)
        for t in sched.timesteps:
            x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
            assert x.is_contiguous(memory_format=layout)
        results.append(x)
    assert torch.equal(results[0], results[1])


# --------------------------------------------------------------------------- diffusion losses


@pytest.mark.parametrize("backend", [None, *LOSS_BACKENDS])
def test_diffusion_losses_on_channels_last(backend):
    x, y, z, w = _tensors(4, 12)
    sched = (torch.tensor([0.9, 0.7]), torch.tensor([0.4, 0.7]), torch.tensor([0.95, 0.8]), torch.tensor([0.3, 0.6]))
    cases = {
        "pseudo_huber": lambda a, b, c, d: dl.pseudo_huber(a, b, c=0.1, backend=backend),
        "pseudo_huber_elementwise": lambda a, b, c, d: dl.pseudo_huber(a, b, c=0.1, elementwise=True,
                                                                       backend=backend),
        "dmd": lambda a, b, c, d: dl.dmd(a, b, c, x_t=d, backend=backend),
        "progressive_mse": lambda a, b, c, d: dl.progressive_mse(a, b, c, *sched, prediction_type="v_prediction",
                                                                 backend=backend),
        "pd_target": lambda a, b, c, d: dl.pd_target(a, b, *sched, backend=backend),
        "per_sample_ddim_step": lambda a, b, c, d: dl.per_sample_ddim_step(a, b, *sched, backend=backend),
    }
    probe = torch.randn(SHAPE, generator=torch.Generator().manual_seed(13))
    for name, fn in cases.items():
        results = []
        for layouts in ((False,) * 4, (True,) * 4, (True, False, True, False), (False, True, False, True)):
            leaves = [t.clone(memory_format=CL if cl else torch.contiguous_format).requires_grad_(True)
                      for t, cl in zip((x, y, z, w), layouts)]
            out = fn(*leaves)
            if out.dim() > 1:
                assert out.stride() == leaves[0].stride(), f"{name}: outputs follow the first input's layout"
            (out * probe[:, :1, :1, :1].reshape(-1, *[1] * (out.dim() - 1)).abs()).sum().backward()
            results.append([out] + [t.grad for t in leaves])
        for k, got in enumerate(results[1:], 1):
            for a, b in zip(got, results[0]):
                assert (a is None) == (b is None), name
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{name} layouts #{k}")


def test_diffusion_loss_opcheck_on_channels_last():
    x, y = (t.to(memory_format=CL).requires_grad_(True) for t in _tensors(2, 14))
    params, values = dl._pack([(dl._W, (None, 1.0)), (dl._C, (None, 0.1))])
    torch.library.opcheck(torch.ops.kdfast.diffusion_loss.default,
                          (dl.PSEUDO_HUBER, 0, x, y, None, None, None, params, values, ""))
    loss, aux = torch.ops.kdfast.diffusion_loss(dl.PSEUDO_HUBER, 0, x.detach(), y.detach(), None, None, None, params,
                                                values, "")
    torch.library.opcheck(torch.ops.kdfast.diffusion_loss_backward.default,
                          (dl.PSEUDO_HUBER, 0, x.detach(), y.detach().contiguous(), None, None, params, values, aux,
                           torch.ones(2), True, True, ""))
    gx, gy = torch.ops.kdfast.diffusion_loss_backward(dl.PSEUDO_HUBER, 0, x.detach(), y.detach().contiguous(), None,
                                                      None, params, values, aux, torch.ones(2), True, True, "")
    assert gx.is_contiguous(memory_format=CL) and gy.is_contiguous(memory_format=CL)
    leaves = [t.detach().contiguous().requires_grad_(True) for t in (x, y)]
    dl.pseudo_huber(*leaves, c=0.1).sum().backward()
    torch.testing.assert_close(gx, leaves[0].grad)
    torch.testing.assert_close(gy, leaves[1].grad)


def _direct_op_calls(layout):
    """Direct calls of the registered ops whose outputs take the sample's layout, on samples that
    are dense but neither contiguous nor channels_last: in another order, or at a batch stride."""
    if layout == "transposed":
        x, m = (t.transpose(1, 3) for t in _tensors(2, 40))
    else:  # every other sample of a channels_last batch
        x, m = (t.contiguous(memory_format=CL)[::2] for t in _tensors(2, 40, shape=(4, *SHAPE[1:])))
    coefs = _coefs(41)
    vals = [1.0, 0.1, 0.0, 0.0, 0.0, 0.0]
    per_sample = [None, None, *(torch.full((2,), v) for v in (0.8, 0.6, 0.9, 0.4359))]
    _, aux = torch.ops.kdfast.diffusion_loss(0, 0, x, m, None, None, None, [None] * 6, vals, "")
    return (x, m), {
        "solver_step": lambda x, m: torch.ops.kdfast.solver_step(x, m, coefs, None, 1.0, None, None, None, None,
                                                                 None, 0, 1.0, None, 1, torch.float32, "")[0],
        "sample_combination": lambda x, m: torch.ops.kdfast.sample_combination(0, 0, x, m, per_sample, vals, ""),
        "diffusion_loss_backward": lambda x, m: torch.ops.kdfast.diffusion_loss_backward(
            0, 0, x, m, None, None, [None] * 6, vals, aux, torch.ones(2), True, False, "")[0],
    }


@pytest.mark.parametrize("layout", ["transposed", "batch-strided channels_last"])
@pytest.mark.parametrize("name", ["solver_step", "sample_combination", "diffusion_loss_backward"])
def test_fake_kernels_give_the_real_strides_while_compiling(name, layout, monkeypatch):
    # The fake kernel runs while torch.compile traces, the real op when the graph runs: a fake
    # kernel that took a transposed sample to be copied to contiguous (as the public entries do
    # under dynamo) while the op kept its order told inductor the wrong strides.
    from torch._subclasses.fake_tensor import FakeTensorMode

    (x, m), calls = _direct_op_calls(layout)
    real = calls[name](x, m)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = calls[name](mode.from_tensor(x), mode.from_tensor(m))
    assert fake.stride() == real.stride()


@pytest.mark.parametrize("layout", ["transposed", "batch-strided channels_last"])
@pytest.mark.parametrize("name", ["solver_step", "sample_combination", "diffusion_loss_backward"])
def test_a_direct_op_call_on_such_samples_compiles_with_inductor(name, layout):
    import torch._inductor.config

    (x, m), calls = _direct_op_calls(layout)
    f = lambda x, m: calls[name](x, m) * 2  # noqa: E731
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):  # (a cached graph would hide a change)
        assert torch.equal(torch.compile(f, backend="inductor", fullgraph=True)(x, m), f(x, m))
