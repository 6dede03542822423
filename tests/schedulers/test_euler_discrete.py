import pytest
import torch

from kdfast.schedulers.euler_discrete import EulerDiscreteScheduler
from parity import (
    assert_parity, diffusers, dummy_model, initial_sample, no_host_reads, parity_error, run_loop, settings)

DF = diffusers.EulerDiscreteScheduler
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def with_step_kwargs(cls, **fixed):
    """``cls`` whose step (and step_cfg) always get ``fixed`` keyword arguments (run_loop passes none)."""
    body = {"step": lambda self, *a, **k: cls.step(self, *a, **{**fixed, **k})}
    if hasattr(cls, "step_cfg"):
        body["step_cfg"] = lambda self, *a, **k: cls.step_cfg(self, *a, **{**fixed, **k})
    return type(cls.__name__, (cls,), body)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "original_sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_parity_prediction_types_and_spacings(prediction_type, spacing):
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1)
    assert_parity(EulerDiscreteScheduler, DF, config, steps=20)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_parity_sigma_schedules(sigmas, steps):
    # begin_index=0: beta sigmas repeat a timestep near the end at 50 steps (diffusers' lookup breaks)
    assert_parity(EulerDiscreteScheduler, DF, {sigmas: True, **SD}, steps=steps, begin_index=0)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_parity_sigma_min_max(sigmas):
    assert_parity(EulerDiscreteScheduler, DF, {sigmas: True, "sigma_min": 0.05, "sigma_max": 10.0,
                                               "prediction_type": "v_prediction"}, steps=15, begin_index=0)


def test_repeated_timesteps_in_a_custom_sigma_schedule():
    # sigmas below the training range all map to timestep 0: the schedule repeats it
    sigmas = [10.0, 5.0, 1.0, 0.01, 0.005, 0.0]
    got, _ = assert_parity(EulerDiscreteScheduler, DF, SD, steps=None, sigmas=sigmas)
    kd = EulerDiscreteScheduler(**SD)
    kd.set_timesteps(sigmas=sigmas)
    assert kd.timesteps.tolist()[-2:] == [0.0, 0.0]


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("interpolation_type", ["linear", "log_linear"])
def test_parity_final_sigma_and_interpolation(final_sigmas_type, interpolation_type):
    assert_parity(EulerDiscreteScheduler, DF, dict(final_sigmas_type=final_sigmas_type,
                                                   interpolation_type=interpolation_type, **SD), steps=20)
    assert_parity(EulerDiscreteScheduler, DF, dict(final_sigmas_type=final_sigmas_type, use_karras_sigmas=True,
                                                   interpolation_type=interpolation_type), steps=12, begin_index=0)


@pytest.mark.parametrize("config", [
    dict(prediction_type="v_prediction", timestep_type="continuous"),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist(), timestep_spacing="leading"),
])
def test_parity_other_configs(config):
    assert_parity(EulerDiscreteScheduler, DF, config, steps=20)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("churn", [
    dict(s_churn=0.8),
    dict(s_churn=5.0, s_noise=1.003),
    dict(s_churn=100.0, s_tmin=0.5, s_tmax=5.0),  # gamma capped at sqrt(2) - 1, and only inside [tmin, tmax]
])
def test_parity_churn_with_seeded_generator(prediction_type, churn):
    kd_cls, df_cls = with_step_kwargs(EulerDiscreteScheduler, **churn), with_step_kwargs(DF, **churn)
    config = dict(prediction_type=prediction_type, **SD)
    got, _ = assert_parity(kd_cls, df_cls, config, steps=20)
    plain = run_loop(EulerDiscreteScheduler(**config), 20, initial_sample())
    assert parity_error(got, plain) > 1e-3  # the churn noise did something
    assert_parity(kd_cls, df_cls, config, steps=15, guidance_scale=2.0)


def test_churn_variance_noise_replaces_the_draw():
    kd = EulerDiscreteScheduler()
    kd.set_timesteps(10)
    x, m, n = initial_sample(), initial_sample(seed=1), initial_sample(seed=2)
    t = kd.timesteps[0]
    a = kd.step(m, t, x, s_churn=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    kd.set_timesteps(10)
    expected_noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    b = kd.step(m, t, x, s_churn=1.0, variance_noise=expected_noise).prev_sample
    torch.testing.assert_close(a, b)
    kd.set_timesteps(10)
    c = kd.step(m, t, x, s_churn=1.0, variance_noise=n).prev_sample
    assert not torch.allclose(a, c)


def test_parity_custom_timesteps_and_sigmas():
    assert_parity(EulerDiscreteScheduler, DF, {}, steps=None, timesteps=[999, 850, 700, 500, 320, 160, 40, 5])
    sigmas = [14.6, 9.0, 5.0, 2.5, 1.2, 0.5, 0.1, 0.0]
    assert_parity(EulerDiscreteScheduler, DF, SD, steps=None, sigmas=sigmas)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_half_precision_keeps_dtype_and_matches(dtype, prediction_type):
    assert_parity(EulerDiscreteScheduler, DF, dict(prediction_type=prediction_type, **SD), steps=20, dtype=dtype)


@pytest.mark.parametrize("config", [{}, dict(use_karras_sigmas=True, prediction_type="v_prediction")])
def test_fused_guidance_matches_diffusers_guidance(config):
    assert_parity(EulerDiscreteScheduler, DF, config, steps=20, guidance_scale=2.0, begin_index=0)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_schedule_state_matches(spacing):
    df, kd = DF(timestep_spacing=spacing, **SD), EulerDiscreteScheduler(timestep_spacing=spacing, **SD)
    assert kd.init_noise_sigma == pytest.approx(float(df.init_noise_sigma), rel=1e-7)
    torch.testing.assert_close(kd.sigmas, df.sigmas, rtol=0, atol=0)
    for s in (df, kd):
        s.set_timesteps(12)
    assert kd.init_noise_sigma == float(df.init_noise_sigma)
    torch.testing.assert_close(kd.sigmas, df.sigmas, rtol=0, atol=0)
    assert kd.timesteps.dtype == df.timesteps.dtype
    x = initial_sample()
    t = df.timesteps[3]
    for s in (df, kd):
        s.set_begin_index(3)
    assert torch.equal(kd.scale_model_input(x, kd.timesteps[3]), df.scale_model_input(x, t))


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=0.1, final_sigmas_type="sigma_min", **SD)
    kd.save_pretrained(tmp_path)
    again = EulerDiscreteScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)  # diffusers loads what kdfast saved
    assert df.config.use_karras_sigmas and df.config.sigma_min == 0.1 and df.config.final_sigmas_type == "sigma_min"
    df.save_pretrained(tmp_path / "df")
    back = EulerDiscreteScheduler.from_pretrained(tmp_path / "df")
    assert back.config.use_karras_sigmas and back.config.beta_schedule == "scaled_linear"
    x = initial_sample()
    assert parity_error(run_loop(back, 10, x), run_loop(df, 10, x, begin_index=0)) < 1e-5
    other = EulerDiscreteScheduler.from_config(diffusers.DDIMScheduler(**SD).config)  # foreign keys ignored
    assert other.config.beta_end == 0.012


def test_set_begin_index_and_img2img_start():
    df, kd = DF(**SD), EulerDiscreteScheduler(**SD)
    x = initial_sample()
    outs = []
    for s in (df, kd):
        s.set_timesteps(20)
        s.set_begin_index(8)
        y = x * s.sigmas[8]
        for t in s.timesteps[8:]:
            y = s.step(dummy_model(s.scale_model_input(y, t), t), t, y).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_add_noise_matches():
    df, kd = DF(**SD), EulerDiscreteScheduler(**SD)
    df.set_timesteps(20)
    kd.set_timesteps(20)
    x, n = initial_sample(), initial_sample(seed=5)
    t = df.timesteps[[3, 7]]
    torch.testing.assert_close(kd.add_noise(x, n, t), df.add_noise(x, n, t))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        EulerDiscreteScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="interpolation_type='cubic'"):
        EulerDiscreteScheduler(interpolation_type="cubic")
    with pytest.raises(ValueError, match="timestep_spacing"):
        EulerDiscreteScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="timestep_type"):
        EulerDiscreteScheduler(timestep_type="discrete-ish")
    with pytest.raises(ValueError, match="final_sigmas_type"):
        EulerDiscreteScheduler(final_sigmas_type="one")
    with pytest.raises(ValueError, match="beta_schedule"):
        EulerDiscreteScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="Only one of"):
        EulerDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)


def test_bad_set_timesteps_arguments():
    kd = EulerDiscreteScheduler(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="Must pass exactly one"):
        kd.set_timesteps()
    with pytest.raises(ValueError, match="Only one of"):
        kd.set_timesteps(timesteps=[999, 500], sigmas=[3.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="Can only pass one"):
        kd.set_timesteps(10, timesteps=[999, 500])
    with pytest.raises(ValueError, match="karras"):
        kd.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        kd.set_timesteps(0)


def test_bad_step_input():
    kd = EulerDiscreteScheduler()
    x = initial_sample()
    # (before set_timesteps it steps on the training schedule, as diffusers' does: test_scheduler_api)
    kd.set_timesteps(5)
    with pytest.raises(ValueError, match="integer indices"):
        kd.step(x, 3, x)
    with pytest.raises(ValueError, match="integer indices"):
        kd.step(x, torch.tensor(999), x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), kd.timesteps[0], x)
    for t in kd.timesteps:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)


def test_timestep_lookup_needs_no_host_read():
    kd = EulerDiscreteScheduler()
    kd.set_timesteps(10)
    x = initial_sample()
    gen = torch.Generator().manual_seed(0)

    for t in list(kd.timesteps):
        m = dummy_model(kd.scale_model_input(x, t), t)
        with no_host_reads():
            x = kd.step(m, t, x, s_churn=0.5, generator=gen).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("churn", [{}, dict(s_churn=2.0, s_noise=1.01)])
def test_pred_original_sample_on_request(churn):
    df, kd = DF(prediction_type="v_prediction", **SD), EulerDiscreteScheduler(prediction_type="v_prediction", **SD)
    outs = []
    for s in (df, kd):
        s.set_timesteps(6)
        gen = torch.Generator().manual_seed(0)
        y, x0s = initial_sample() * s.init_noise_sigma, []
        for t in s.timesteps:
            kw = {} if s is df else dict(return_pred_original_sample=True)
            out = s.step(dummy_model(s.scale_model_input(y, t), t), t, y, generator=gen, **churn, **kw)
            y = out.prev_sample
            x0s.append(out.pred_original_sample)
        outs.append(x0s)
    for got, expected in zip(*outs[::-1]):
        assert parity_error(got, expected) < 1e-5
