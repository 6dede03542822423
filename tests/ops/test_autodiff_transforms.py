"""torch.func's transforms and forward-mode AD through kdfast's ops.

torch runs a custom op's reverse-mode formula only: a tangent through one would come out as
zero, silently; under torch.func.grad / vjp it fails with a message about autograd.Function
internals, and vmap has no batching rule for it. So under these, every op computes with torch's
own ops (its reference, in the kernels' float32), which carry tangents, gradients and batching:
the results here are checked against the fused ops' own values and autograd gradients."""
import inspect
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import kdfast
import kdfast.models
from kdfast import ops
from kdfast.backends import BackendUnavailableError
from kdfast.reference import diffusion_losses as ref

from conftest import usable_backends


def test_group_norm_act_carries_tangents_like_torchs_modules():
    gen = torch.Generator().manual_seed(0)
    x, tx = torch.randn(2, 8, 4, 4, generator=gen), torch.randn(2, 8, 4, 4, generator=gen)
    w, b, shift = torch.randn(8, generator=gen), torch.randn(8, generator=gen), torch.randn(2, 8, generator=gen)
    tw, tshift = torch.randn(8, generator=gen), torch.randn(2, 8, generator=gen)

    def ours(x, w, shift):
        return ops.group_norm_act(x, 4, w, b, shift=shift)

    def torchs(x, w, shift):
        return F.silu(F.group_norm(x + shift[:, :, None, None], 4, w, b))

    out, tangent = torch.func.jvp(ours, (x, w, shift), (tx, tw, tshift))
    expected, expected_tangent = torch.func.jvp(torchs, (x, w, shift), (tx, tw, tshift))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(tangent, expected_tangent)
    assert tangent.abs().max() > 0.1
    last = x.contiguous(memory_format=torch.channels_last)
    out_last, tangent_last = torch.func.jvp(ours, (last, w, shift), (tx, tw, tshift))
    assert out_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(tangent_last, expected_tangent)
    x_only = torch.func.jvp(lambda x: torchs(x, w, shift), (x,), (tx,))[1]
    with fwAD.dual_level():
        dual = ours(fwAD.make_dual(x, tx), w, shift)
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, x_only)
        # an input without a tangent inside a forward-AD level: the fused kernel, as outside
        torch.testing.assert_close(ours(x, w, shift), expected, rtol=1e-5, atol=1e-5)


def test_group_norm_act_under_torch_func_grad_and_vmap():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, 2, 8, 4, 4, generator=gen), torch.randn(8, generator=gen)

    def ours(x, w):
        return ops.group_norm_act(x, 4, w).square().sum()

    def torchs(x, w):
        return F.silu(F.group_norm(x, 4, w)).square().sum()

    for argnums in (0, 1):
        got = torch.func.grad(ours, argnums)(x[0], w)
        torch.testing.assert_close(got, torch.func.grad(torchs, argnums)(x[0], w))
    # per-sample gradients: vmap over grad
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(ours), (0, None))(x, w),
                               torch.func.vmap(torch.func.grad(torchs), (0, None))(x, w))


def test_group_norm_act_under_vmap_and_forward_ad():
    gen = torch.Generator().manual_seed(1)
    x, tx, w = torch.randn(3, 2, 8, 4, 4, generator=gen), torch.randn(3, 2, 8, 4, 4, generator=gen), torch.randn(8)

    def ours(x):
        return ops.group_norm_act(x, 4, w)

    def torchs(x):
        return F.silu(F.group_norm(x, 4, w))

    # jvp of a vmapped op: the tangent sits beneath the batching layer
    _, got = torch.func.jvp(torch.func.vmap(ours), (x,), (tx,))
    _, expected = torch.func.jvp(torch.func.vmap(torchs), (x,), (tx,))
    torch.testing.assert_close(got, expected)
    # vmap inside a forward-AD level, without tangents: the op runs as usual
    with fwAD.dual_level():
        torch.testing.assert_close(torch.func.vmap(ours)(x), torch.func.vmap(torchs)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_act_under_forward_ad_computes_in_float32(dtype):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 8, 6, 6, generator=gen) * 3).to(dtype)
    plain = ops.group_norm_act(x, 4)
    with fwAD.dual_level():
        dual = ops.group_norm_act(fwAD.make_dual(x, torch.ones_like(x)), 4)
        primal = fwAD.unpack_dual(dual).primal
    assert primal.dtype == dtype
    truth = F.silu(F.group_norm(x.double(), 4))
    assert (primal.double() - truth).abs().max() <= 2 * (plain.double() - truth).abs().max() + 1e-6


def test_the_unets_fused_norms_carry_tangents():
    # (without attention: torch's CPU attention has no forward-mode formula)
    torch.manual_seed(0)
    unet = kdfast.models.UNet(kdfast.models.UNetConfig(sample_size=8, base_channels=16, channel_mults=(1, 2),
                                                       norm_groups=4, time_embed_dim=32, attention=False)).eval()
    with torch.no_grad():
        for p in unet.parameters():  # (its output layers start at zero)
            p.normal_(0.0, 0.3)
    fused = unet.for_inference()
    x, tx, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7])
    _, expected = torch.func.jvp(lambda x: unet(x, t), (x,), (tx,))
    _, got = torch.func.jvp(lambda x: fused(x, t), (x,), (tx,))
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # vmapped (a sample at a time): the channels-last inference form as the plain model
    torch.testing.assert_close(torch.func.vmap(lambda x, t: fused(x[None], t[None])[0])(x, t), unet(x, t),
                               rtol=1e-4, atol=1e-5)


def _latents(seed=0):
    return torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


COEFS = torch.tensor(ops.coefficients(1.0, -0.5, {"x": 0.9, "x0": 0.1}))
GUIDED = torch.tensor(ops.coefficients(0.8, -0.3, {"x": 0.7, "x0": 0.2, "model": 0.05}))
# Each op as a function of one latent-shaped input (the others fixed), whose output depends
# differentiably on it.
OPS = {
    "solver_step": lambda a: ops.solver_step(a, a * 0.5 + 0.1, COEFS).sample,
    "solver_step_guided_clipped": lambda a: ops.solver_step(a, a.tanh(), GUIDED, cond=a * 0.3, guidance_scale=4.0,
                                                            clip_value=0.9).sample,
    "solver_step_dynamic": lambda a: ops.solver_step(
        a, a.sin(), GUIDED, dynamic_scale=ops.threshold_scale(a, a.sin(), 0.8, -0.3, ratio=0.9, max_value=1.5)).sample,
    "threshold_scale": lambda a: ops.threshold_scale(a * 3, a, 0.0, 1.0, ratio=0.8, max_value=2.0),
    "kd_divergence": lambda a: ops.kd_divergence(a.reshape(8, -1), a.reshape(8, -1).flip(0) * 0.5),
    "kd_divergence_skew": lambda a: ops.kd_divergence(a.reshape(8, -1) * 2, a.reshape(8, -1).flip(1), kind="skew_kl",
                                                      beta=0.1, temperature=2.0,
                                                      labels=torch.tensor([1, -100, 3, 4, 0, 0, 2, 5])),
    "pseudo_huber": lambda a: ops.pseudo_huber(a, a.flip(0) * 0.5, c=0.1),
    "pseudo_huber_elementwise": lambda a: ops.pseudo_huber(a, a.flip(0) * 0.5, c=torch.tensor([0.1, 0.2]),
                                                           weights=torch.tensor([1.0, 0.5]), elementwise=True),
    "dmd": lambda a: ops.dmd(a, a.flip(0) * 0.5, a.cos(), x_t=a.flip(1)),
    "pd_target": lambda a: ops.pd_target(a, a.flip(0) * 0.5, 0.8, 0.6, 0.9, 0.4, prediction_type="v_prediction"),
    "progressive_mse": lambda a: ops.progressive_mse(a, a.flip(0) * 0.5, a.cos(), 0.8, 0.6,
                                                     torch.tensor([0.9, 0.95]), 0.4),
    "per_sample_ddim_step": lambda a: ops.per_sample_ddim_step(a, a * 0.5, 0.8, 0.6, 0.9, 0.4),
    "grid_combination": lambda a: ops.grid_combination(a, a.repeat(1, 1, 1, 2), torch.tensor([0.9, 0.1, 0.05])),
    "group_norm_act": lambda a: ops.group_norm_act(a, 2),
}


def _autograd_jvp(op, a, tangent):
    """J(a) @ tangent from the fused op's own reverse-mode gradients, a Jacobian row per output
    element (each from a fresh forward: the KD kernels' gradient buffer serves one backward)."""
    out = op(a)
    rows = []
    for i in range(out.numel()):
        leaf = a.clone().requires_grad_()
        row, = torch.autograd.grad(op(leaf).reshape(-1)[i], leaf, allow_unused=True)
        rows.append(torch.zeros((), dtype=out.dtype) if row is None else (row * tangent).sum())
    return torch.stack(rows).reshape(out.shape)


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_op_under_torch_func_matches_its_fused_values_and_gradients(name):
    op = OPS[name]
    a, tangent, weight = _latents(0), _latents(1), _latents(2)
    plain = op(a)
    tol = dict(rtol=1e-5, atol=1e-5)
    # jvp and forward-mode AD: the tangent autograd's Jacobian gives (nonzero)
    value, got = torch.func.jvp(op, (a,), (tangent,))
    expected = _autograd_jvp(op, a, tangent)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(value, plain, **tol)
    torch.testing.assert_close(got, expected, **tol)
    with fwAD.dual_level():
        torch.testing.assert_close(fwAD.unpack_dual(op(fwAD.make_dual(a, tangent))).tangent, expected, **tol)
        torch.testing.assert_close(op(a), plain)  # an input without a tangent: the fused op, as outside

    # torch.func.grad and vjp: autograd's gradient through the fused op
    def loss(a):
        out = op(a)
        return (out * weight.reshape(-1)[:out.numel()].reshape(out.shape)).sum()

    leaf = a.clone().requires_grad_()
    expected_grad, = torch.autograd.grad(loss(leaf), leaf)
    torch.testing.assert_close(torch.func.grad(loss)(a), expected_grad, **tol)
    _, vjp = torch.func.vjp(op, a)
    torch.testing.assert_close(vjp(torch.ones_like(plain))[0],
                               torch.autograd.grad(op(leaf).sum(), leaf)[0], **tol)

    # vmap: each slice as the op computes it alone
    stack = torch.stack([a, tangent, weight])
    torch.testing.assert_close(torch.func.vmap(op)(stack), torch.stack([op(x) for x in stack]), **tol)
    # per-sample gradients: vmap over grad
    per_sample = torch.func.vmap(torch.func.grad(loss))(stack)
    for x, g in zip(stack, per_sample):
        leaf = x.clone().requires_grad_()
        torch.testing.assert_close(g, torch.autograd.grad(loss(leaf), leaf)[0], **tol)


def _topk(a):
    rows = a.reshape(8, -1)
    lp, ids = torch.log_softmax(rows.flip(0).detach(), -1).topk(3, -1)
    return ops.kd_topk(rows, ids, lp)


def _topk_with_grad(a):
    rows = a.reshape(8, -1)
    lp, ids = torch.log_softmax(rows.flip(0).detach(), -1).topk(3, -1)
    return ops.kd_topk_with_grad(rows, ids, lp)[0]


WITH_BACKEND_CHECKS = {**OPS, "kd_topk": _topk, "kd_topk_with_grad": _topk_with_grad,
                       "kd_divergence_with_grad": lambda a: ops.kd_divergence_with_grad(a.reshape(8, -1),
                                                                                         a.reshape(8, -1).flip(0))[0]}


@pytest.mark.parametrize("name", sorted(WITH_BACKEND_CHECKS))
def test_a_backend_that_cannot_run_is_refused_under_transforms_as_outside(name, monkeypatch):
    # Under a transform the op computes with the reference, whatever backend is asked for; the
    # request was not even checked there: a misspelt name (or cuda for CPU tensors, which the
    # tests' emulator runs) passed silently
    op = WITH_BACKEND_CHECKS[name]
    a, tangent = _latents(0), _latents(1)
    monkeypatch.setattr(kdfast.backends, "_FORCED", "no-such-backend")  # (as KDFAST_BACKEND sets it)
    for call in (lambda: op(a),
                 lambda: torch.func.vmap(op)(torch.stack([a, tangent])),
                 lambda: torch.func.grad(lambda a: op(a).sum())(a),
                 lambda: torch.func.jvp(op, (a,), (tangent,))):
        with pytest.raises(BackendUnavailableError):
            call()
    monkeypatch.setattr(kdfast.backends, "_FORCED", "reference")
    torch.func.vmap(op)(torch.stack([a, tangent]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_transformed_ops_keep_dtypes_and_compute_in_float32(dtype):
    a = (_latents(3) * 2).to(dtype)
    for name in ("solver_step", "pd_target", "grid_combination", "group_norm_act", "kd_divergence", "pseudo_huber"):
        op = OPS[name]
        plain = op(a)
        batched = torch.func.vmap(op)(a.unsqueeze(0))[0]
        assert batched.dtype == plain.dtype, name
        torch.testing.assert_close(batched.float(), plain.float(), rtol=0, atol=0 if dtype == torch.float32 else
                                   (2e-3 if dtype == torch.float16 else 1.6e-2), msg=name)


def test_kd_divergence_with_grad_under_vmap_gives_each_rows_loss_and_gradient():
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 6, 40, generator=gen), torch.randn(3, 6, 40, generator=gen)
    labels = torch.tensor([0, -100, 3, 7, 2, 1])

    def both(s, t):
        return ops.kd_divergence_with_grad(s, t[:, :37], kind="jsd", beta=0.3, labels=labels, vocab_size=37)

    rows, grads = torch.func.vmap(both)(s, t)
    for k in range(3):
        r, g = both(s[k], t[k])
        torch.testing.assert_close(rows[k], r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-6)
    assert (grads[:, :, 37:] == 0).all() and (grads[:, 1] == 0).all()
    # no graph is recorded: a transform sees a constant
    assert (torch.func.grad(lambda s: both(s, t[0])[0].sum())(s[0]) == 0).all()


def test_per_sample_gradients_of_a_distillation_loss():
    """vmap(grad) over a small student with kd_loss (differentially private KD, influence
    functions): each sample's gradient equals autograd's for that sample alone."""
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(16, 50), torch.nn.Linear(16, 50)
    params = {k: v.detach() for k, v in student.named_parameters()}
    x = torch.randn(4, 3, 16)
    labels = torch.tensor([[1, -100, 4], [0, 2, 2], [-100, -100, 9], [3, 3, 3]])

    def loss(params, x, labels):
        logits = torch.func.functional_call(student, params, (x,))
        return kdfast.losses.kd_loss(logits, teacher(x).detach(), labels, kind="forward_kl", temperature=2.0)

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, labels)
    for k in range(4):
        student.zero_grad()
        loss(dict(student.named_parameters()), x[k], labels[k]).backward()
        for name, p in student.named_parameters():
            torch.testing.assert_close(per_sample[name][k], p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_hard", [0.0, 0.5])
def test_fused_linear_kd_under_torch_func_matches_the_fused_gradients(weight_hard):
    gen = torch.Generator().manual_seed(5)
    hidden, weight, bias = (torch.randn(10, 12, generator=gen), torch.randn(30, 12, generator=gen) * 0.3,
                            torch.randn(30, generator=gen))
    t_hidden, t_weight = torch.randn(10, 8, generator=gen), torch.randn(33, 8, generator=gen) * 0.3
    labels = torch.tensor([1, 2, -100, 4, 29, 0, 5, -100, 7, 8])
    options = dict(kind="jsd", beta=0.3, temperature=1.5, weight_hard=weight_hard, weight_soft=0.7,
                   scale_by_t2=True, chunk_size=3)

    def loss(hidden, weight, bias):
        return kdfast.losses.fused_linear_kd(hidden, weight, t_hidden, t_weight, labels, student_bias=bias, **options)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    value = loss(*leaves)
    expected = torch.autograd.grad(value, leaves)
    got_value, got = torch.func.grad_and_value(loss, argnums=(0, 1, 2))(hidden, weight, bias)[::-1]
    torch.testing.assert_close(got_value, value.detach(), rtol=1e-5, atol=1e-6)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # per-token gradients of the hidden states: vmap over single tokens
    rows = torch.func.vmap(torch.func.grad(lambda h, t, y: kdfast.losses.fused_linear_kd(
        h[None], weight, t[None], t_weight, y[None], student_bias=bias, **options)))(hidden, t_hidden, labels)
    torch.testing.assert_close(rows[2], torch.zeros(12))  # an ignored token
    leaf = hidden[:1].clone().requires_grad_()
    kdfast.losses.fused_linear_kd(leaf, weight, t_hidden[:1], t_weight, labels[:1], student_bias=bias,
                                  **options).backward()
    torch.testing.assert_close(rows[0], leaf.grad[0], rtol=1e-4, atol=1e-6)


def _scheduler_loop(cls, steps=3, **config):
    """A loop of ``steps`` steps of a fresh scheduler (made outside any transform, as diffusers'
    schedulers must be) as a function of the initial latent."""
    scheduler = cls(**config)
    scheduler.set_timesteps(10)

    def loop(x):
        for t in scheduler.timesteps[:steps]:
            x = scheduler.step(torch.tanh(x) * 0.5 + 0.1 * x, t, x).prev_sample
        return x
    return loop


SCHEDULERS = {
    "ddim": (kdfast.schedulers.DDIMScheduler, {}),
    "ddim_dynamic_thresholding": (kdfast.schedulers.DDIMScheduler, {"thresholding": True, "sample_max_value": 1.2}),
    "dpmsolver_2m": (kdfast.schedulers.DPMSolverMultistepScheduler, {}),
    "unipc": (kdfast.schedulers.UniPCMultistepScheduler, {}),
    "euler": (kdfast.schedulers.EulerDiscreteScheduler, {}),
    "heun": (kdfast.schedulers.HeunDiscreteScheduler, {}),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_loops_under_torch_func(name):
    cls, config = SCHEDULERS[name]
    x, tangent = _latents(5), _latents(6)
    plain = _scheduler_loop(cls, **config)(x)
    leaf = x.clone().requires_grad_()
    expected_grad, = torch.autograd.grad(_scheduler_loop(cls, **config)(leaf).square().sum(), leaf)
    loop = _scheduler_loop(cls, **config)
    got_grad = torch.func.grad(lambda x: loop(x).square().sum())(x)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-5)
    value, got = torch.func.jvp(_scheduler_loop(cls, **config), (x,), (tangent,))
    torch.testing.assert_close(value, plain, rtol=1e-5, atol=1e-5)
    fresh = lambda z: _scheduler_loop(cls, **config)(z)  # noqa: E731  (a new scheduler per forward)
    torch.testing.assert_close(got, _autograd_jvp(fresh, x, tangent), rtol=1e-4, atol=1e-5)
    # vmap over a batch of latents: each as its own loop
    stack = torch.stack([x, tangent])
    torch.testing.assert_close(torch.func.vmap(_scheduler_loop(cls, **config))(stack),
                               torch.stack([_scheduler_loop(cls, **config)(z) for z in stack]), rtol=1e-5, atol=1e-5)


def test_a_k_diffusion_style_sampler_under_jvp(kds):
    """k-diffusion's samplers run under torch.no_grad, which forward-mode AD passes through:
    kdfast's carry the tangent k-diffusion's own carry (float32), and central differences
    confirm it (float64)."""
    sigmas = kdfast.sampling.get_sigmas_karras(5, 0.1, 10.0)
    x, tangent = _latents(7) * 10, _latents(8)

    def denoiser(z, sigma):
        return torch.tanh(z) * 0.5

    def run(x):
        return kdfast.sampling.sample_dpmpp_2m(denoiser, x, sigmas.to(x.dtype), disable=True)

    value, got = torch.func.jvp(run, (x,), (tangent,))
    torch.testing.assert_close(value, run(x))
    _, expected = torch.func.jvp(lambda x: kds.sample_dpmpp_2m(denoiser, x, sigmas, disable=True), (x,), (tangent,))
    assert expected.abs().max() > 0.05
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    x64, t64 = x.double(), tangent.double()
    _, got64 = torch.func.jvp(run, (x64,), (t64,))
    eps = 1e-6
    torch.testing.assert_close(got64, (run(x64 + eps * t64) - run(x64 - eps * t64)) / (2 * eps), rtol=1e-6, atol=1e-6)


def test_a_captured_loop_refuses_torch_func_and_forward_mode_ad():
    sampler = object.__new__(kdfast.CapturedSampler)  # (no graph: the refusal comes first)
    x = _latents()
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="kdfast.CapturedSampler: .* forward-mode AD"):
            sampler(fwAD.make_dual(x, torch.ones_like(x)))
    with pytest.raises(NotImplementedError, match="kdfast.CapturedSampler: .* torch.func's transforms"):
        torch.func.vmap(sampler)(x.unsqueeze(0))


# (steps of their own form: CogVideoX DPM's two timesteps, Helios' stages, pi-Flow's grid
# output, SCM's two-step schedule; their loops under transforms are covered above by kind)
_SPECIAL_STEPS = {"CogVideoXDPMScheduler", "HeliosDMDScheduler", "HeliosScheduler", "PiflowScheduler", "SCMScheduler"}


_SEEDED = {"DPMSolverSDEScheduler": {"noise_sampler_seed": 0}}  # (its Brownian tree's seed)


@pytest.mark.parametrize("name", [n for n in kdfast.schedulers.supported() if n not in _SPECIAL_STEPS])
def test_a_scheduler_made_inside_a_transform_steps_as_outside(name):
    """diffusers' schedulers cannot be made inside torch.func.grad or jvp (their tables are
    wrapped, without storage, and numpy cannot read them); kdfast's build theirs outside the
    transform, and a timestep sliced from them there is read beneath its wrapper."""
    cls = getattr(kdfast.schedulers, name)
    draws = "generator" in inspect.signature(cls.step).parameters
    x = _latents(9)

    def loop(x):
        scheduler = cls(**_SEEDED.get(name, {}))
        scheduler.set_timesteps(4)
        for t in scheduler.timesteps[:2]:
            noise = {"generator": torch.Generator().manual_seed(0)} if draws else {}
            x = scheduler.step(torch.tanh(x) * 0.5, t, x, **noise).prev_sample
        return x

    leaf = x.clone().requires_grad_()
    plain = loop(leaf)
    expected_grad, = torch.autograd.grad(plain.square().sum(), leaf)
    torch.testing.assert_close(torch.func.grad(lambda x: loop(x).square().sum())(x), expected_grad,
                               rtol=1e-5, atol=1e-5)
    value, tangent = torch.func.jvp(loop, (x,), (torch.ones_like(x),))
    torch.testing.assert_close(value, plain.detach(), rtol=1e-5, atol=1e-5)
    assert tangent.abs().max() > 0


def test_timesteps_batched_by_vmap_are_refused_with_the_reason():
    scheduler = kdfast.schedulers.DDPMWuerstchenScheduler()
    scheduler.set_timesteps(4)
    x = _latents(10)
    with pytest.raises(ValueError, match="timesteps batched by torch.func.vmap"):
        torch.func.vmap(lambda t: scheduler.step(x, t, x).prev_sample)(scheduler.timesteps[:2])


# (the others hold CPU tensors of their own: labels, per-sample weights)
_DEVICE_FREE = ("solver_step", "solver_step_guided_clipped", "solver_step_dynamic", "threshold_scale",
                "kd_divergence", "pseudo_huber", "dmd", "pd_target", "per_sample_ddim_step", "grid_combination",
                "group_norm_act")


@pytest.mark.gpu
@pytest.mark.parametrize("name", _DEVICE_FREE)
def test_each_op_under_torch_func_on_a_gpu(name):
    op = OPS[name]
    a, tangent = _latents(0), _latents(1)
    value, got = torch.func.jvp(op, (a.cuda(),), (tangent.cuda(),))
    torch.testing.assert_close(value, op(a.cuda()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cpu(), torch.func.jvp(op, (a,), (tangent,))[1], rtol=1e-5, atol=1e-5)
    stack = torch.stack([a, tangent]).cuda()
    torch.testing.assert_close(torch.func.vmap(op)(stack), torch.stack([op(x) for x in stack]), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_a_scheduler_loop_under_torch_func_on_a_gpu():
    x = _latents(5)
    loop = _scheduler_loop(kdfast.schedulers.UniPCMultistepScheduler)
    expected = torch.func.grad(lambda x: loop(x).square().sum())(x)
    loop = _scheduler_loop(kdfast.schedulers.UniPCMultistepScheduler)
    got = torch.func.grad(lambda x: loop(x).square().sum())(x.cuda())
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_zero_weights_keep_their_gradient_under_transforms():
    """A zero weight adds nothing, but its gradient is its term (the fused backward's); the
    reference dropped zero-weight terms, and with them that gradient, under transforms."""
    gen = torch.Generator().manual_seed(11)
    sample, outputs = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 8, generator=gen)
    x, y, z = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    cases = {
        "grid_combination": (lambda c: ops.grid_combination(sample, outputs, c).square().sum(),
                             torch.tensor([0.0, 0.5, 0.0])),
        "pseudo_huber": (lambda w: ops.pseudo_huber(x, y, c=0.1, weights=w).sum(), torch.tensor([0.0, 0.5])),
        "dmd": (lambda w: ops.dmd(x, y, z, weights=w).sum(), torch.tensor([0.0, 0.5])),
        "progressive_mse": (lambda w: ops.progressive_mse(x, y, z, 0.8, 0.6, 0.9, 0.4, weights=w).sum(),
                            torch.tensor([0.0, 0.5])),
    }
    for name, (loss, weights) in cases.items():
        leaf = weights.clone().requires_grad_()
        expected, = torch.autograd.grad(loss(leaf), leaf)
        assert expected[0].abs() > 0.1, name
        torch.testing.assert_close(torch.func.grad(loss)(weights), expected, rtol=1e-5, atol=1e-6, msg=name)
        tangent = torch.func.jvp(loss, (weights,), (torch.ones_like(weights),))[1]
        torch.testing.assert_close(tangent, expected.sum(), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", usable_backends("diffusion_loss"))
def test_a_zero_weight_on_a_non_finite_sample_gets_gradient_zero(backend):
    """The sample's loss is masked to 0, so a trainable weight gets 0 there, not NaN (eager gave
    NaN, torch.func 0); a finite sample keeps its loss as the weight's gradient."""
    x = torch.tensor([[math.nan, 1.0], [0.5, 2.0], [math.inf, 0.0]])
    y = torch.zeros(3, 2)
    weights = torch.tensor([0.0, 1.0, 0.0])
    for elementwise in (False, True):
        def loss(w):
            return ops.pseudo_huber(x, y, c=0.1, weights=w, elementwise=elementwise, backend=backend).sum()

        leaf = weights.clone().requires_grad_()
        (eager,) = torch.autograd.grad(loss(leaf), leaf)
        term = ref.pseudo_huber(x[1:2], y[1:2], 0.1, None, elementwise).float()
        torch.testing.assert_close(eager, torch.cat([torch.zeros(1), term, torch.zeros(1)]), msg=str(elementwise))
        torch.testing.assert_close(torch.func.grad(loss)(weights), eager, msg=str(elementwise))
        # the zero-weight samples' inputs get 0 too (torch.func gave 0 * NaN there)

        def loss_of_x(x):
            return ops.pseudo_huber(x, y, c=0.1, weights=weights, elementwise=elementwise, backend=backend).sum()

        leaf = x.clone().requires_grad_()
        (eager_x,) = torch.autograd.grad(loss_of_x(leaf), leaf)
        assert torch.equal(eager_x[[0, 2]], torch.zeros(2, 2)) and torch.isfinite(eager_x[1]).all()
        torch.testing.assert_close(torch.func.grad(loss_of_x)(x), eager_x, msg=str(elementwise))


@pytest.mark.parametrize("backend", usable_backends("diffusion_loss") + ["reference"])
def test_dmd_gradient_at_a_non_finite_x_with_a_given_x_t(backend):
    """With x_t given, g does not depend on x: an inf or NaN element of x gets g / n in eager
    mode, under torch.func and through a second-order backward alike (the transforms gave 0)."""
    x = torch.tensor([[0.5, math.inf, -0.3, math.nan], [0.1, 0.2, 0.3, 0.4]])
    real = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.1, 0.1]])
    fake = torch.tensor([[0.2, 0.5, 0.1, 0.4], [0.3, 0.1, 0.2, 0.0]])
    x_t = torch.ones(2, 4)

    def loss(x):
        return ops.dmd(x, real, fake, x_t=x_t, backend=backend).sum()

    g = (fake - real) / (x_t - real).abs().mean(1, keepdim=True)
    leaf = x.clone().requires_grad_()
    (eager,) = torch.autograd.grad(loss(leaf), leaf)
    torch.testing.assert_close(eager, g / 4)
    torch.testing.assert_close(torch.func.grad(loss)(x), g / 4)
    torch.testing.assert_close(torch.func.jvp(loss, (x,), (torch.ones_like(x),))[1], (g / 4).sum())
    leaf = x.clone().requires_grad_()
    (first,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
    torch.testing.assert_close(first.detach(), g / 4)
    (second,) = torch.autograd.grad(first.sum(), leaf)  # the Hessian I / n, also at inf and NaN
    torch.testing.assert_close(second, torch.full_like(x, 0.25))


def test_the_dmd_reference_compiles_as_one_graph():
    # its zero-with-unit-derivative Function has a custom jvp, which torch.compile does not trace
    # (fullgraph failed); compiled, a jvp-less twin stands in
    import kdfast.reference.diffusion_losses as dref

    real, fake, x_t = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4)
    x = torch.randn(2, 4, dtype=torch.float64)
    x[0, 1] = math.inf
    x.requires_grad_(True)

    def loss(a):
        return dref.dmd(a, real, fake, x_t, None, torch.float64).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    (got,) = torch.autograd.grad(compiled(x), x)
    (expected,) = torch.autograd.grad(loss(x), x)
    torch.testing.assert_close(got, expected)
    assert torch.isfinite(got).all()


def test_constants_of_the_diffusion_losses_stay_constant_under_transforms():
    """c and the schedule values take no gradient in the fused ops; under transforms neither."""
    x, y = _latents(12), _latents(13)
    c, alpha = torch.tensor([0.1, 0.2]), torch.tensor([0.8, 0.7])
    assert (torch.func.grad(lambda c: ops.pseudo_huber(x, y, c=c).sum())(c) == 0).all()
    for op in (ops.pd_target, ops.per_sample_ddim_step):
        assert (torch.func.grad(lambda a: op(x, y, a, 0.6, 0.9, 0.4).sum())(alpha) == 0).all()
    assert (torch.func.grad(lambda a: ops.progressive_mse(x, y, x, a, 0.6, 0.9, 0.4).sum())(alpha) == 0).all()


def test_diffusion_losses_of_an_empty_batch_under_transforms():
    x = torch.zeros(0, 3, 4, 4)
    for op in (lambda a: ops.pseudo_huber(a, a * 0.5, c=0.1), lambda a: ops.dmd(a, a * 0.5, a),
               lambda a: ops.progressive_mse(a, a * 0.5, a, 0.8, 0.6, 0.9, 0.4)):
        assert torch.func.grad(lambda a: op(a).sum())(x).shape == x.shape
        assert torch.func.vmap(op)(x.unsqueeze(0)).shape == (1, 0)


@pytest.mark.parametrize("elementwise", [False, True])
def test_pseudo_huber_with_an_infinite_element_has_the_fused_gradients_under_transforms(elementwise):
    gen = torch.Generator().manual_seed(14)
    x, y = torch.randn(3, 3, 2, 2, generator=gen), torch.randn(3, 3, 2, 2, generator=gen)
    x[0, 0, 0, 0], x[1, 1, 0, 0] = math.inf, -math.inf
    x[2, 0, 1, 1] = 3e19  # finite, its square past float32's range

    def loss(a):
        return ops.pseudo_huber(a, y, c=0.1, elementwise=elementwise).sum()

    leaf = x.clone().requires_grad_()
    expected, = torch.autograd.grad(loss(leaf), leaf)
    got = torch.func.grad(loss)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert loss(x) == math.inf


def test_a_schedule_with_repeated_timesteps_steps_by_position_under_transforms():
    """Karras sigmas at 80 steps repeat timesteps near the end ([..., 3, 1, 1, 0]): a step is
    found by the position of its timestep in the schedule, which inside grad and jvp lies
    beneath a storage-less wrapper (a lookup by value took the other 1, a step off)."""
    scheduler = kdfast.schedulers.DPMSolverMultistepScheduler(use_karras_sigmas=True)
    scheduler.set_timesteps(80)
    assert scheduler.timesteps[77] == scheduler.timesteps[78]

    def loop(x):
        scheduler.set_timesteps(80)
        for t in scheduler.timesteps[77:80]:
            x = scheduler.step(torch.tanh(x) * 0.5, t, x).prev_sample
        return x

    x = _latents(15)
    plain = loop(x)
    torch.testing.assert_close(torch.func.jvp(loop, (x,), (torch.ones_like(x),))[0], plain)
    leaf = x.clone().requires_grad_()
    torch.testing.assert_close(torch.func.grad(lambda z: loop(z).sum())(x),
                               torch.autograd.grad(loop(leaf).sum(), leaf)[0], rtol=1e-5, atol=1e-6)


def test_vmap_over_batched_schedules_labels_and_channels_last_samples():
    """Host-side value checks skip what vmap batches (no value can be read there), and a
    channels-last slice (which vmap cannot query formats of) goes by its strides."""
    gen = torch.Generator().manual_seed(16)
    x, y, z = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(3))
    alpha = torch.tensor([[0.8, 0.7, 0.6], [0.75, 0.65, 0.55]])
    sigma = (1 - alpha ** 2).sqrt()
    for op in (lambda a, s: ops.pd_target(x, y, a, s, 0.9, 0.4),
               lambda a, s: ops.progressive_mse(x, y, z, a, s, 0.9, 0.4)):
        torch.testing.assert_close(torch.func.vmap(op)(alpha, sigma), torch.stack([op(*p) for p in zip(alpha, sigma)]))
    s, t = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    labels = torch.tensor([3, 0, 9, 5])
    ids, logprobs = kdfast.losses.teacher_topk(t, 3)
    for loss, args in ((lambda s, t, y: kdfast.losses.hinton_kd_loss(s[None], t[None], y[None], alpha=0.9),
                        (s, t, labels)),
                       (lambda s, t, y: kdfast.losses.dkd_loss(s[None], t[None], y[None]), (s, t, labels)),
                       (lambda s, i, p: kdfast.losses.topk_kd_loss(s[None], i[None], p[None]), (s, ids, logprobs))):
        per_sample = torch.func.vmap(torch.func.grad(loss))(*args)
        for k in range(4):
            leaf = s[k].clone().requires_grad_()
            expected, = torch.autograd.grad(loss(leaf, *(a[k] for a in args[1:])), leaf)
            torch.testing.assert_close(per_sample[k], expected, rtol=1e-5, atol=1e-6)
    stack = torch.randn(3, 2, 4, 5, 5, generator=gen).permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert stack[0].is_contiguous(memory_format=torch.channels_last)
    loop = _scheduler_loop(kdfast.schedulers.DDIMScheduler)
    batched = torch.func.vmap(loop)(stack)
    torch.testing.assert_close(batched, torch.stack([_scheduler_loop(kdfast.schedulers.DDIMScheduler)(a)
                                                     for a in stack]))
    torch.testing.assert_close(torch.func.vmap(lambda a: ops.pseudo_huber(a, a.tanh(), c=0.1))(stack),
                               torch.stack([ops.pseudo_huber(a, a.tanh(), c=0.1) for a in stack]))


def test_coefficients_made_in_a_step_inside_a_transform_serve_later_steps():
    """Per-call options (DDIM's eta, Euler's s_churn) plan coefficient rows on first use, kept
    in a table shared by every scheduler of the same settings: made inside a transform they
    were storage-less wrappers, and every later step of those settings failed."""
    x, m = _latents(17), _latents(18)
    cases = ((kdfast.schedulers.DDIMScheduler, {"eta": 0.37}, 1),
             (kdfast.schedulers.EulerDiscreteScheduler, {"s_churn": 0.41, "s_tmin": 0.0, "s_tmax": 1e9}, 0))
    for cls, options, index in cases:
        kdfast.schedulers.FusedScheduler.clear_table_cache()

        def step(a):
            scheduler = cls()
            scheduler.set_timesteps(5)
            return scheduler.step(m, scheduler.timesteps[index], a, generator=torch.Generator().manual_seed(0),
                                  **options).prev_sample

        torch.func.grad(lambda a: step(a).sum())(x)
        torch.func.jvp(step, (x,), (torch.ones_like(x),))
        expected = step(x)  # the same table's rows, eagerly
        kdfast.schedulers.FusedScheduler.clear_table_cache()
        torch.testing.assert_close(expected, step(x), rtol=0, atol=0)


def test_a_schedule_that_a_transform_tracks_is_refused_not_silently_constant():
    base = torch.tensor([1.0, 0.75, 0.5, 0.25])
    cls = kdfast.schedulers.FlowMatchEulerDiscreteScheduler

    def total(sigmas, scale):
        scheduler = cls()
        scheduler.set_timesteps(sigmas=sigmas)
        return scheduler.sigmas.sum() * scale

    with pytest.raises(ValueError, match="`sigmas` is differentiated by a torch.func transform"):
        torch.func.grad(lambda scale: total(base * scale, scale))(torch.tensor(0.9))
    with pytest.raises(ValueError, match="`sigmas` is differentiated by a torch.func transform"):
        torch.func.jvp(lambda scale: total(base * scale, scale), (torch.tensor(0.9),), (torch.tensor(1.0),))
    with pytest.raises(ValueError, match="`sigmas` is batched by torch.func.vmap"):
        torch.func.vmap(lambda scale: total(base * scale, scale))(torch.tensor([0.9, 0.8]))
    # a jvp's tangent beneath an inner grad (forward over reverse), and tensors inside a list
    with pytest.raises(ValueError, match="`sigmas` is differentiated"):
        torch.func.jvp(lambda a: torch.func.grad(lambda q: total(base * a, q))(torch.tensor(0.9)),
                       (torch.tensor(0.9),), (torch.tensor(1.0),))
    with pytest.raises(ValueError, match="`sigmas` is differentiated"):
        torch.func.jvp(lambda a: total([b * a for b in base], a), (torch.tensor(0.9),), (torch.tensor(1.0),))
    with pytest.raises(ValueError, match="`trained_betas` is differentiated"):
        torch.func.grad(lambda a: kdfast.schedulers.DDIMScheduler(
            trained_betas=list(torch.linspace(1e-4, 0.02, 1000) * a)).alphas_cumprod.sum())(torch.tensor(1.0))
    # detached, or made inside the transform from constants: read beneath the wrappers
    expected = total(base * 0.9, 1.0)
    assert torch.func.grad(lambda scale: total((base * scale).detach(), scale))(torch.tensor(0.9)) == expected
    torch.testing.assert_close(torch.func.vmap(lambda scale: total(base * 0.9, scale))(torch.tensor([1.0, 2.0])),
                               torch.stack([expected, 2 * expected]))
    assert torch.func.jvp(lambda a: total([b * 0.9 for b in base], a), (torch.tensor(0.9),),
                          (torch.tensor(1.0),))[1] == expected


def test_functionalize_keeps_the_custom_ops():
    """torch.func.functionalize (torch.export's and make_fx's) runs custom ops as they are:
    the fused op stays in the traced graph, with the eager values."""
    from torch.fx.experimental.proxy_tensor import make_fx

    s, t = torch.randn(6, 16), torch.randn(6, 16)
    graph = make_fx(torch.func.functionalize(lambda a, b: ops.kd_divergence(a, b)))(s, t)
    assert any("kdfast.kd_divergence" in str(node.target) for node in graph.graph.nodes)
    assert torch.equal(graph(s, t), ops.kd_divergence(s, t))
    # forward-mode AD through it: the tangent, which its wrappers hide, by the reference
    x, tangent = _latents(19), _latents(20)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        expected = fwAD.unpack_dual(ops.pseudo_huber(dual, x.flip(0), c=0.1)).tangent
        got = fwAD.unpack_dual(torch.func.functionalize(lambda a: ops.pseudo_huber(a, x.flip(0), c=0.1))(dual))
    assert expected is not None and got.tangent is not None
    torch.testing.assert_close(got.tangent, expected)
    # beneath a grad transform, the reference again
    torch.testing.assert_close(torch.func.grad(torch.func.functionalize(lambda a: ops.kd_divergence(a, t).sum()))(s),
                               torch.func.grad(lambda a: ops.kd_divergence(a, t).sum())(s))


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                  "DDPMWuerstchenScheduler"])
def test_a_timestep_off_the_schedule_under_transforms(name):
    """Schedulers that take any timestep find its step from its value, on the host, inside a
    transform too (Würstchen's nearest-timestep search made host tensors there)."""
    cls = getattr(kdfast.schedulers, name)
    x = _latents(21)
    probe = cls()
    probe.set_timesteps(10)
    t = probe.timesteps[3]
    off = t - 0.013 if t.is_floating_point() else t - 3

    def step(a):
        scheduler = cls()
        scheduler.set_timesteps(10)
        return scheduler.step(torch.tanh(a), off.clone(), a, generator=torch.Generator().manual_seed(0)).prev_sample

    value, tangent = torch.func.jvp(step, (x,), (torch.ones_like(x),))
    torch.testing.assert_close(value, step(x), rtol=0, atol=1e-6)
    assert tangent.abs().max() > 0
