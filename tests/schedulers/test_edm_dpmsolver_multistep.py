import pytest
import torch

from kdfast.schedulers.edm_dpmsolver_multistep import EDMDPMSolverMultistepScheduler
from parity import assert_parity, diffusers, dummy_model, initial_sample, parity_error, run_loop, settings

DF = diffusers.EDMDPMSolverMultistepScheduler


@pytest.mark.parametrize("config", [
    {},
    dict(prediction_type="v_prediction"),
    dict(sigma_schedule="exponential", solver_order=3),
    dict(solver_order=1),
    dict(solver_type="heun", solver_order=3, lower_order_final=False),
    dict(final_sigmas_type="sigma_min", euler_at_final=True),
    dict(thresholding=True, sample_max_value=2.0, dynamic_thresholding_ratio=0.9),
    dict(sigma_max=14.6, sigma_min=0.03, rho=5.0, sigma_data=1.0, prediction_type="v_prediction"),
])
@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_parity(config, steps):
    assert_parity(EDMDPMSolverMultistepScheduler, DF, config, steps=steps)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_parity_sde(solver_type):
    config = dict(algorithm_type="sde-dpmsolver++", solver_type=solver_type)
    got, _ = assert_parity(EDMDPMSolverMultistepScheduler, DF, config, steps=12)
    other = run_loop(EDMDPMSolverMultistepScheduler(**config), 12, initial_sample(), seed=1)
    assert parity_error(other, got) > 1e-3  # the noise follows the generator


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_parity_sde_noise_drawn_in_the_converted_outputs_dtype(dtype):
    # diffusers' EDM scheduler draws its SDE noise in the preconditioned output's dtype (the
    # plain DPM-Solver in float32): kdfast drew float32, so float64 loops got another stream
    # (1.4 off) and half-precision ones too where the CPU's float32 and half draws differ (an
    # element count that is not a multiple of 16)
    config = dict(algorithm_type="sde-dpmsolver++")
    df, kd = DF(**config), EDMDPMSolverMultistepScheduler(**config)
    x = initial_sample((1, 3, 5, 5), dtype)
    # (half precision: rounding apart, the same draws; other draws differ by O(1))
    assert parity_error(run_loop(kd, 12, x), run_loop(df, 12, x)) <= (1e-5 if dtype == torch.float64 else 3e-2)


@pytest.mark.parametrize("sigma_schedule,steps", [("karras", 13), ("exponential", 1), ("exponential", 60)])
def test_parity_sde_with_a_final_sigma_min_step(sigma_schedule, steps):
    # The appended sigma_min lies a few float32 ulps above the schedule's last sigma: a
    # zero-length step, whose rounding (a tiny negative log-SNR step) once made the SDE noise
    # variance negative and the step refuse to run.
    config = dict(algorithm_type="sde-dpmsolver++", final_sigmas_type="sigma_min", sigma_schedule=sigma_schedule)
    assert_parity(EDMDPMSolverMultistepScheduler, DF, config, steps=steps)


def test_schedule_and_scaled_inputs_bit_for_bit():
    for config in ({}, dict(sigma_schedule="exponential"), dict(final_sigmas_type="sigma_min")):
        df, kd = DF(**config), EDMDPMSolverMultistepScheduler(**config)
        assert torch.equal(kd.sigmas, df.sigmas) and torch.equal(kd.timesteps, df.timesteps)
        for s in (df, kd):
            s.set_timesteps(15)
        assert torch.equal(kd.sigmas, df.sigmas) and torch.equal(kd.timesteps, df.timesteps)
        assert kd.init_noise_sigma == df.init_noise_sigma
        x = initial_sample()
        for t in kd.timesteps[:3]:
            assert torch.equal(kd.scale_model_input(x, t), df.scale_model_input(x, t))
            kd._step_index += 1
            df._step_index += 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    assert_parity(EDMDPMSolverMultistepScheduler, DF, {}, steps=15, dtype=dtype)


def test_guidance_fused():
    assert_parity(EDMDPMSolverMultistepScheduler, DF, dict(solver_order=3), steps=10, guidance_scale=4.0)


def test_sample_prediction_works_where_diffusers_raises():
    kd = EDMDPMSolverMultistepScheduler(prediction_type="sample")
    x = run_loop(kd, 8, initial_sample())
    assert torch.isfinite(x).all()
    # x0 = the model output: the first-order step into sigma 0 returns it
    kd = EDMDPMSolverMultistepScheduler(prediction_type="sample", solver_order=1)
    kd.set_timesteps(1)
    x, m = initial_sample(), initial_sample(seed=1)
    torch.testing.assert_close(kd.step(m, kd.timesteps[0], x).prev_sample, m)
    df = DF(prediction_type="sample")
    df.set_timesteps(4)
    with pytest.raises(ValueError):
        df.step(m, df.timesteps[0], x)


def test_convert_model_output_and_add_noise():
    kd, df = EDMDPMSolverMultistepScheduler(thresholding=True), DF(thresholding=True)
    for s in (kd, df):
        s.set_timesteps(6)
        s._init_step_index(s.timesteps[2])
    x, m = initial_sample() * 5, initial_sample(seed=1)
    assert parity_error(kd.convert_model_output(m, sample=x), df.convert_model_output(m, sample=x)) <= 1e-6
    kd, df = EDMDPMSolverMultistepScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(6)
    noise = initial_sample(seed=2)
    torch.testing.assert_close(kd.add_noise(x, noise, kd.timesteps[[1, 3]]), df.add_noise(x, noise, df.timesteps[[1, 3]]),
                               rtol=0, atol=0)


def test_config_round_trip(tmp_path):
    df = DF(solver_order=3, algorithm_type="sde-dpmsolver++")
    kd = EDMDPMSolverMultistepScheduler.from_config(df.config)
    assert settings(kd.config) == settings(df.config)
    kd.save_pretrained(tmp_path)
    assert settings(DF.from_pretrained(tmp_path).config) == settings(df.config)
    from kdfast.schedulers import from_diffusers

    assert type(from_diffusers(df)) is EDMDPMSolverMultistepScheduler


def test_one_fused_pass_per_step(monkeypatch):
    import kdfast.schedulers.base as base

    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(1) or real(*a))
    x = run_loop(EDMDPMSolverMultistepScheduler(solver_order=3), 9, initial_sample())
    assert len(calls) == 9 and torch.isfinite(x).all()


def test_bad_input():
    with pytest.raises(ValueError, match="algorithm_type"):
        EDMDPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="solver_order"):
        EDMDPMSolverMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="sigma_schedule"):
        EDMDPMSolverMultistepScheduler(sigma_schedule="linear")
    kd = EDMDPMSolverMultistepScheduler()
    x = initial_sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, kd.timesteps[0], x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        kd.set_timesteps(0)
    kd.set_timesteps(2)
    with pytest.raises(ValueError, match="shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    for t in kd.timesteps:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
def test_step_takes_diffusers_positional_order(algorithm_type):
    # diffusers' EDM step is (model_output, timestep, sample, generator, return_dict): a fifth
    # positional argument was taken as variance_noise
    for cls in (DF, EDMDPMSolverMultistepScheduler):
        s = cls(algorithm_type=algorithm_type)
        s.set_timesteps(4)
        out = s.step(dummy_model(initial_sample(), s.timesteps[0]), s.timesteps[0], initial_sample(),
                     torch.Generator().manual_seed(0), False)
        assert isinstance(out, tuple) and len(out) == 1, cls
    s = EDMDPMSolverMultistepScheduler(algorithm_type=algorithm_type)
    s.set_timesteps(4)
    x = initial_sample()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    expected = s.step(dummy_model(x, s.timesteps[0]), s.timesteps[0], x, variance_noise=noise).prev_sample
    assert expected.shape == x.shape
