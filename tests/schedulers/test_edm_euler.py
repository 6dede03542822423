import pytest
import torch

from kdfast.schedulers.edm_euler import EDMEulerScheduler
from parity import assert_parity, diffusers, dummy_model, initial_sample, parity_error, run_loop, settings

DF = diffusers.EDMEulerScheduler


@pytest.mark.parametrize("config", [
    {},
    dict(prediction_type="v_prediction"),
    dict(sigma_schedule="exponential"),
    dict(final_sigmas_type="sigma_min", sigma_max=14.6, sigma_min=0.03, rho=5.0, sigma_data=1.0),
])
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_parity(config, steps):
    if steps > 1 or config.get("final_sigmas_type") == "sigma_min" or config.get("sigma_schedule") == "exponential":
        # (one exponential step starts at sigma_min: nothing to cancel)
        assert_parity(EDMEulerScheduler, DF, config, steps=steps)
        return
    # One step from sigma_max into 0 returns x0. diffusers forms it as x + (x - x0) / s * (0 - s)
    # in fp32, which cancels at |x| ~ 250 (its error reaches ~2e-5); kdfast's coefficients give
    # x0 itself. Both against the same step in float64:
    x = initial_sample()
    df, kd = DF(**config), EDMEulerScheduler(**config)
    want, got = run_loop(df, 1, x), run_loop(kd, 1, x)
    xs = (x * kd.init_noise_sigma).double()
    s = float(kd.sigmas[0])
    truth = kd.precondition_outputs(xs, dummy_model(xs * kd._input_scale[0], kd.timesteps[0]).double(), s)
    assert parity_error(got, truth) <= 1e-6 < parity_error(want, truth)


def test_schedule_and_scaled_inputs_bit_for_bit():
    for config in ({}, dict(sigma_schedule="exponential"), dict(final_sigmas_type="sigma_min")):
        df, kd = DF(**config), EDMEulerScheduler(**config)
        assert torch.equal(kd.sigmas, df.sigmas) and torch.equal(kd.timesteps, df.timesteps)
        for s in (df, kd):
            s.set_timesteps(12)
        assert torch.equal(kd.sigmas, df.sigmas) and torch.equal(kd.timesteps, df.timesteps)
        assert kd.init_noise_sigma == df.init_noise_sigma
        x = initial_sample()
        for t in kd.timesteps[:3]:
            assert torch.equal(kd.scale_model_input(x, t), df.scale_model_input(x, t))
            kd._step_index += 1
            df._step_index += 1
    # a custom ramp
    df, kd = DF(), EDMEulerScheduler()
    ramp = [0.0, 0.2, 0.5, 0.9]
    df.set_timesteps(sigmas=torch.tensor(ramp))
    kd.set_timesteps(sigmas=ramp)
    assert torch.equal(kd.sigmas, df.sigmas)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    assert_parity(EDMEulerScheduler, DF, {}, steps=12, dtype=dtype)


def test_guidance_fused():
    assert_parity(EDMEulerScheduler, DF, dict(prediction_type="v_prediction"), steps=10, guidance_scale=4.0)


def churn_loop(scheduler, steps, x, seed=0, **step_kwargs):
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(dummy_model(scheduler.scale_model_input(x, t), t), t, x, generator=gen,
                           **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("kwargs", [dict(s_churn=1.0), dict(s_churn=5.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)])
def test_churn_draws_like_diffusers(kwargs):
    x = initial_sample()
    want = churn_loop(DF(), 10, x, **kwargs)
    got = churn_loop(EDMEulerScheduler(), 10, x, **kwargs)
    assert parity_error(got, want) <= 1e-5
    assert parity_error(churn_loop(EDMEulerScheduler(), 10, x, seed=1, **kwargs), got) > 1e-3


def test_pred_original_sample_given_and_returned():
    kd, df = EDMEulerScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(6)
        s.set_begin_index(2)
    x, m, x0 = initial_sample(), initial_sample(seed=1), initial_sample(seed=2)
    a = kd.step(m, kd.timesteps[2], x, pred_original_sample=x0, s_churn=2.0, generator=torch.Generator().manual_seed(0))
    b = df.step(m, df.timesteps[2], x, pred_original_sample=x0, s_churn=2.0, generator=torch.Generator().manual_seed(0))
    assert parity_error(a.prev_sample, b.prev_sample) <= 1e-6
    assert a.pred_original_sample is x0
    # and the x0 the step computes itself, lazily or with the step
    for s in (kd, df):
        s.set_timesteps(6)
    a = kd.step(m, kd.timesteps[0], x)
    b = df.step(m, df.timesteps[0], x)
    assert parity_error(a.pred_original_sample, b.pred_original_sample) <= 1e-6
    kd.set_timesteps(6)
    c = kd.step(m, kd.timesteps[0], x, return_pred_original_sample=True, return_dict=False)
    assert len(c) == 2 and parity_error(c[1], b.pred_original_sample) <= 1e-6
    # with churn: x0 from the churned sample
    for s in (kd, df):
        s.set_timesteps(6)
    a = kd.step(m, kd.timesteps[0], x, s_churn=3.0, generator=torch.Generator().manual_seed(4))
    b = df.step(m, df.timesteps[0], x, s_churn=3.0, generator=torch.Generator().manual_seed(4))
    assert parity_error(a.pred_original_sample, b.pred_original_sample) <= 1e-6
    assert parity_error(a.prev_sample, b.prev_sample) <= 1e-6


def test_preconditioning_helpers_match():
    kd, df = EDMEulerScheduler(prediction_type="v_prediction"), DF(prediction_type="v_prediction")
    x, m = initial_sample(), initial_sample(seed=1)
    sigma = torch.tensor(3.5)
    torch.testing.assert_close(kd.precondition_inputs(x, sigma), df.precondition_inputs(x, sigma), rtol=0, atol=0)
    torch.testing.assert_close(kd.precondition_outputs(x, m, sigma), df.precondition_outputs(x, m, sigma),
                               rtol=0, atol=0)
    torch.testing.assert_close(kd.precondition_noise(sigma), df.precondition_noise(sigma), rtol=0, atol=0)


def test_add_noise_and_config_round_trip(tmp_path):
    kd, df = EDMEulerScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(8)
    x, noise = initial_sample(), initial_sample(seed=1)
    torch.testing.assert_close(kd.add_noise(x, noise, kd.timesteps[[1, 4]]), df.add_noise(x, noise, df.timesteps[[1, 4]]),
                               rtol=0, atol=0)
    kd = EDMEulerScheduler.from_config(DF(sigma_schedule="exponential").config)
    assert settings(kd.config) == settings(DF(sigma_schedule="exponential").config)
    kd.save_pretrained(tmp_path)
    assert settings(DF.from_pretrained(tmp_path).config) == settings(kd.config)
    from kdfast.schedulers import from_diffusers

    assert type(from_diffusers(df)) is EDMEulerScheduler


def test_one_fused_pass_per_step(monkeypatch):
    import kdfast.schedulers.base as base

    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(1) or real(*a))
    x = run_loop(EDMEulerScheduler(), 7, initial_sample())
    assert len(calls) == 7 and torch.isfinite(x).all()


def test_bad_input():
    with pytest.raises(ValueError, match="sigma_schedule"):
        EDMEulerScheduler(sigma_schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type"):
        EDMEulerScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="sigma_min"):
        EDMEulerScheduler(sigma_min=5.0, sigma_max=1.0)
    kd = EDMEulerScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        kd.set_timesteps(0)
    # sigma values passed for the ramp's positions gave negative sigmas and NaN timesteps
    for ramp in ([80.0, 20.0, 5.0, 1.0, 0.1], [1.5, 0.5, -0.2], [0.0, float("nan")]):
        with pytest.raises(ValueError, match=r"sigmas must be positions along the ramp from sigma_max \(0\) to "
                                             r"sigma_min \(1\), not sigma values"):
            kd.set_timesteps(sigmas=ramp)
    # ... but positions a little past the ends, and any of the exponential schedule (which takes
    # only their count), give positive sigmas, as in diffusers
    for schedule, ramp in (("karras", [-0.1, 0.5, 1.1]), ("exponential", [80.0, 10.0, 1.0, 0.1])):
        ours, theirs = EDMEulerScheduler(sigma_schedule=schedule), diffusers.EDMEulerScheduler(sigma_schedule=schedule)
        ours.set_timesteps(sigmas=ramp)
        theirs.set_timesteps(sigmas=torch.tensor(ramp))
        torch.testing.assert_close(ours.sigmas, theirs.sigmas)
    kd.set_timesteps(3)
    x = initial_sample()
    with pytest.raises(ValueError, match="integer"):
        kd.step(x, 2, x)
    with pytest.raises(ValueError, match="pred_original_sample"):
        kd.step_cfg(x, x, 2.0, kd.timesteps[0], x, pred_original_sample=x)
