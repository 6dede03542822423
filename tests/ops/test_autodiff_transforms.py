"""torch.func's transforms and forward-mode AD through kdfast's ops.

torch runs a custom op's reverse-mode formula only: a tangent through one came out as zero,
silently, and under torch.func.grad / vjp the op failed with a message about autograd.Function
internals. group_norm_act (the one op that sits inside networks) now computes as torch's
modules do there, which carries both; every other op refuses, naming itself."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import kdfast
import kdfast.models
from kdfast import ops


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


def _latents(seed=0):
    return torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


COEFS = torch.tensor(ops.coefficients(1.0, -0.5, {"x": 0.9, "x0": 0.1}))
REFUSED = {
    "solver_step": lambda a: ops.solver_step(a, a * 0.5, COEFS).sample,
    "threshold_scale": lambda a: ops.threshold_scale(a, a, 0.0, 1.0),
    "kd_divergence": lambda a: ops.kd_divergence(a.reshape(8, -1), a.reshape(8, -1) * 0.5),
    "kd_divergence_with_grad": lambda a: ops.kd_divergence_with_grad(a.reshape(8, -1), a.reshape(8, -1))[0],
    "pseudo_huber": lambda a: ops.pseudo_huber(a, a * 0.5, c=0.1),
    "dmd": lambda a: ops.dmd(a, a * 0.5, a * 0.2),
    "pd_target": lambda a: ops.pd_target(a, a * 0.5, 0.8, 0.6, 0.9, 0.4),
    "progressive_mse": lambda a: ops.progressive_mse(a, a * 0.5, a * 0.2, 0.8, 0.6, 0.9, 0.4),
    "per_sample_ddim_step": lambda a: ops.per_sample_ddim_step(a, a * 0.5, 0.8, 0.6, 0.9, 0.4),
    "grid_combination": lambda a: ops.grid_combination(a, a.repeat(1, 1, 1, 2), torch.tensor([0.9, 0.1, 0.05])),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_ops_refuse_forward_mode_ad_and_torch_func_grad_by_name(name):
    op = REFUSED[name]
    x = _latents()
    plain = op(x)  # the op itself works
    with pytest.raises(NotImplementedError, match=f"kdfast.ops.{name}: forward-mode AD"):
        torch.func.jvp(op, (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match=f"kdfast.ops.{name}: .* torch.func's grad, vjp and jacrev"):
        torch.func.grad(lambda a: op(a).sum())(x)
    # inside torch.func.grad, an input the transform does not track is no reason to refuse
    got = torch.func.grad(lambda a: (a * op(x).sum()).sum())(x)
    torch.testing.assert_close(got, torch.ones_like(x) * plain.sum())
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match=f"kdfast.ops.{name}: forward-mode AD"):
            op(fwAD.make_dual(x, torch.ones_like(x)))
        # inside a forward-AD level, an input without a tangent is no reason to refuse
        torch.testing.assert_close(op(x), plain)


def test_a_captured_loop_refuses_forward_mode_ad():
    sampler = object.__new__(kdfast.CapturedSampler)  # (no graph: the refusal comes first)
    x = _latents()
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="kdfast.ops.CapturedSampler: forward-mode AD"):
            sampler(fwAD.make_dual(x, torch.ones_like(x)))


def test_a_scheduler_made_and_stepped_under_jvp_is_refused_by_name():
    x = _latents()

    def loop(m):
        s = kdfast.schedulers.DDIMScheduler()
        s.set_timesteps(10)  # (its timesteps, made inside the transform, have no storage)
        return s.step(m, s.timesteps[0], x).prev_sample

    with pytest.raises(NotImplementedError, match="kdfast.ops.solver_step: forward-mode AD"):
        torch.func.jvp(loop, (x,), (torch.ones_like(x),))


def test_a_scheduler_step_under_jvp_is_refused_by_name():
    s = kdfast.schedulers.DDIMScheduler()
    s.set_timesteps(10)
    x = _latents()
    # (the timestep made inside the transform has no storage: it is looked up by value)
    with pytest.raises(NotImplementedError, match="kdfast.ops.solver_step: forward-mode AD"):
        torch.func.jvp(lambda m: s.step(m, s.timesteps[0], x).prev_sample, (x,), (torch.ones_like(x),))
