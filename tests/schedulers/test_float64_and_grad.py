"""float64 loops and gradients through the drop-in schedulers, against diffusers.

float64: the compiled kernels take float32/float16/bfloat16 only, so a float64 step is computed
by the reference backend in float64 (kdfast.ops.solver_step). A 10-step float64 loop keeps
float64 throughout and matches diffusers' float64 loop to <= 2e-6 relative (max |diff| over
max(1, max |x|)); measured 1.9e-10 (Heun) to 6.6e-7 (SDE-DPM-Solver++) here, up to 1.1e-6 from
other starting samples. Not ~1e-15, because diffusers' float64 loop is not float64 throughout:
kdfast's float64 steps use float64 coefficient rows (``CoefficientTable.row64``), and its
DDIM, UniPC and DEIS loops match diffusers' code run with its schedule tensors in float64 to
<= 3e-15 (test below).

In diffusers, coefficients come from float32 schedule tensors (``alphas_cumprod``, ``sigmas``)
in float32 arithmetic (LCM's c_skip / c_out too), Euler, Euler ancestral and DPM-Solver cast the
sample to float32 at the start of every step, and SDE-DPM-Solver++ draws float32 noise: alone,
that moves its float64 result by up to 7.8e-7 from the same code with float64 schedule tensors.

Gradients: a step with dynamic thresholding differentiates through the per-sample quantile
(``kdfast::threshold_scale`` has an autograd formula: torch.quantile's, as diffusers' step
uses), and through the scale's use in the step.
"""
import inspect

import pytest
import torch

import kdfast
import kdfast.schedulers as kd
from parity import diffusers, initial_sample, parity_error


def model64(x: torch.Tensor, t) -> torch.Tensor:
    """parity.dummy_model in the sample's own dtype (that one computes in float32)."""
    tf = float(t) / 1000.0
    return torch.sin(1.3 * x + tf) * 0.6 + 0.1 * x * (1.0 - tf) + 0.05 * tf


def run(scheduler, steps, x, guidance_scale=None, fused_cfg=False, seed=0):
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        kwargs = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
        if guidance_scale is None:
            out = scheduler.step(model64(inp, t), t, x, **kwargs)
        else:
            u, c = model64(inp, t), model64(0.97 * inp + 0.02, t)
            out = (scheduler.step_cfg(u, c, guidance_scale, t, x, **kwargs) if fused_cfg
                   else scheduler.step(u + guidance_scale * (c - u), t, x, **kwargs))
        assert out.prev_sample.dtype == x.dtype, (type(scheduler).__name__, out.prev_sample.dtype)
        x = out.prev_sample
    return x


FLOAT64_TOL = 2e-6
# name, config; the parity error measured here (10 steps, shape (2, 4, 8, 8))
FLOAT64_CASES = [
    ("DDIMScheduler", {}),                                                          # 2.8e-7
    ("DDIMScheduler", dict(prediction_type="v_prediction")),                        # 3.0e-8
    ("DDIMScheduler", dict(thresholding=True, sample_max_value=3.0)),               # 7.5e-9
    ("EulerDiscreteScheduler", {}),                                                 # 1.2e-7
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),                       # 1.8e-7
    ("EulerAncestralDiscreteScheduler", {}),                                        # 2.1e-7
    ("HeunDiscreteScheduler", {}),                                                  # 1.9e-10
    ("DPMSolverMultistepScheduler", {}),                                            # 3.1e-7
    ("DPMSolverMultistepScheduler", dict(solver_order=3)),                          # 3.4e-7
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),        # 6.6e-7
    ("DPMSolverMultistepScheduler", dict(thresholding=True, sample_max_value=3.0)),  # 3.5e-7
    ("UniPCMultistepScheduler", {}),                                                # 3.7e-7
    ("DEISMultistepScheduler", {}),                                                 # 1.2e-7
    ("LCMScheduler", {}),                                                           # 2.5e-7
]


@pytest.mark.parametrize("name,config", FLOAT64_CASES, ids=[f"{n}-{c}" for n, c in FLOAT64_CASES])
def test_float64_loop_matches_diffusers(name, config):
    df = getattr(diffusers, name)(**config)
    kdf = getattr(kd, name).from_config(df.config)
    x = initial_sample(dtype=torch.float64)
    expected = run(df, 10, x)
    got = run(kdf, 10, x)
    assert got.dtype == expected.dtype == torch.float64
    assert torch.isfinite(got).all()
    err = parity_error(got, expected)
    assert err <= FLOAT64_TOL, f"{name} {config}: float64 parity error {err:.2e}"


@pytest.mark.parametrize("name", ["DDIMScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"])
def test_float64_loop_is_float64_exact(name):
    """Against diffusers' own code with its schedule tensors made float64 (these three then
    compute in float64 throughout): kdfast's float64 rows leave nothing at float32 precision."""
    df = getattr(diffusers, name)()
    kdf = getattr(kd, name).from_config(df.config)
    x = initial_sample(dtype=torch.float64)

    def loop(s, promote):
        s.set_timesteps(10)
        if promote:
            for attr in ("alphas_cumprod", "final_alpha_cumprod", "sigmas", "alpha_t", "sigma_t", "lambda_t"):
                if isinstance(getattr(s, attr, None), torch.Tensor):
                    setattr(s, attr, getattr(s, attr).double())
        y = x * s.init_noise_sigma
        for t in s.timesteps:
            y = s.step(model64(s.scale_model_input(y, t), t), t, y).prev_sample
        return y

    assert parity_error(loop(kdf, False), loop(df, True)) <= 1e-12


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DDIMScheduler"])
def test_float64_guided_loop_matches_diffusers(name):
    """Guidance fused into the float64 step. The guided dummy model drives the multistep loops
    to values ~500, which amplifies diffusers' float32 roundings: measured 1.1e-6 (DPM-Solver),
    1.7e-6 (UniPC), 2.8e-7 (DDIM) at guidance 1.5."""
    df = getattr(diffusers, name)()
    x = initial_sample(dtype=torch.float64)
    expected = run(df, 10, x, guidance_scale=1.5)
    got = run(getattr(kd, name).from_config(df.config), 10, x, guidance_scale=1.5, fused_cfg=True)
    assert got.dtype == torch.float64
    assert parity_error(got, expected) <= 5e-6


def test_float64_history_and_outputs_stay_float64():
    s = kd.DPMSolverMultistepScheduler(solver_order=3)
    s.set_timesteps(5)
    x = initial_sample(dtype=torch.float64)
    for t in s.timesteps[:3]:
        x = s.step(model64(x, t), t, x).prev_sample
    assert x.dtype == torch.float64
    assert all(h is None or h.dtype == torch.float64 for h in s.model_outputs)
    lcm = kd.LCMScheduler()
    lcm.set_timesteps(4)
    y = initial_sample(dtype=torch.float64)
    out = lcm.step(model64(y, lcm.timesteps[0]), lcm.timesteps[0], y, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == out.denoised.dtype == torch.float64


def test_float64_sample_through_kdfast_sample():
    s = kd.DPMSolverMultistepScheduler()
    s.set_timesteps(8)
    x = initial_sample(dtype=torch.float64)
    got = kdfast.sample(lambda x, t: model64(x, t), x, s, disable=True)
    df = diffusers.DPMSolverMultistepScheduler()
    assert got.dtype == torch.float64
    assert parity_error(got, run(df, 8, x)) <= FLOAT64_TOL


# --------------------------------------------------------------------------- gradients


def _grad_loop(scheduler, x0, steps=5, taken=3):
    """d(weighted sum of the result)/d(initial sample) through ``taken`` steps; the model
    output depends on the sample, so the gradient flows through both step inputs."""
    scheduler.set_timesteps(steps)
    x = x0.clone().requires_grad_(True)
    xx = x
    for t in scheduler.timesteps[:taken]:
        xx = scheduler.step(torch.sin(xx) * 2 + 0.3 * xx, t, xx).prev_sample
    weight = torch.linspace(-1, 1, xx.numel(), dtype=xx.dtype).reshape(xx.shape)
    (xx * weight).sum().backward()
    return xx.detach(), x.grad


# name, config, whether the thresholding scales of the 3 steps lie strictly inside [1, max]
# (the quantile's own gradient is live; 1.8 to 853 here) or are all clamped to max (none)
GRAD_CASES = [
    ("DDIMScheduler", dict(thresholding=True, sample_max_value=1e3), True),
    ("DDIMScheduler", dict(thresholding=True, sample_max_value=4.0, prediction_type="v_prediction"), True),
    ("DDIMScheduler", dict(clip_sample=True, clip_sample_range=1.5), None),
    ("DPMSolverMultistepScheduler", dict(thresholding=True, sample_max_value=1e3), True),
    ("DPMSolverMultistepScheduler", dict(thresholding=True, sample_max_value=1e3, solver_order=3), True),
    ("DPMSolverMultistepScheduler", dict(thresholding=True, sample_max_value=4.0), False),
    ("UniPCMultistepScheduler", dict(thresholding=True, sample_max_value=1e3), True),
]


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float64, 5e-6)])
@pytest.mark.parametrize("name,config,live", GRAD_CASES, ids=[f"{n}-{c}" for n, c, _ in GRAD_CASES])
def test_gradient_matches_diffusers(monkeypatch, name, config, live, dtype, rtol):
    scales = []
    threshold_scale = kdfast.ops.threshold_scale

    def recording(*args, **kwargs):
        scale = threshold_scale(*args, **kwargs)
        scales.append(scale.detach())
        return scale

    monkeypatch.setattr(kdfast.ops, "threshold_scale", recording)
    x0 = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    out, got = _grad_loop(getattr(kd, name)(**config), x0)
    expected_out, expected = _grad_loop(getattr(diffusers, name)(**config), x0)
    if live is not None:
        inside = [((s > 1) & (s < config["sample_max_value"])).all().item() for s in scales]
        clamped = [(s == config["sample_max_value"]).all().item() for s in scales]
        assert len(scales) == 3 and all(inside if live else clamped), scales
    assert got.dtype == dtype and torch.isfinite(got).all()
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= rtol * scale, f"{name} {config} {dtype}: {(got - expected).abs().max()}"
    assert (out - expected_out).abs().max() <= rtol * max(1.0, expected_out.abs().max())


def test_issue_reproduction_ddim_thresholding_backward():
    s = kd.DDIMScheduler(thresholding=True)
    s.set_timesteps(5)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    s.step(torch.sin(x), s.timesteps[0], x).prev_sample.sum().backward()
    d = diffusers.DDIMScheduler(thresholding=True)
    d.set_timesteps(5)
    y = x.detach().clone().requires_grad_(True)
    d.step(torch.sin(y), d.timesteps[0], y).prev_sample.sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5)
