import pytest
import torch

from kdfast.schedulers.euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from parity import (
    assert_parity, diffusers, dummy_model, initial_sample, no_host_reads, parity_error, run_loop, settings)

DF = diffusers.EulerAncestralDiscreteScheduler
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 30])
def test_parity_prediction_types_and_spacings(prediction_type, spacing, steps):
    assert_parity(EulerAncestralDiscreteScheduler, DF, dict(prediction_type=prediction_type, timestep_spacing=spacing,
                                                            steps_offset=1, **SD), steps=steps)


@pytest.mark.parametrize("config", [
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="linear"),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
])
def test_parity_other_configs(config):
    assert_parity(EulerAncestralDiscreteScheduler, DF, config, steps=50)


def test_ancestral_noise_follows_the_generator():
    x = initial_sample()
    a = run_loop(EulerAncestralDiscreteScheduler(**SD), 15, x, seed=1)
    b = run_loop(EulerAncestralDiscreteScheduler(**SD), 15, x, seed=2)
    assert parity_error(a, b) > 1e-3
    assert parity_error(a, run_loop(DF(**SD), 15, x, seed=1)) < 1e-5


def test_noise_is_drawn_on_every_step_like_diffusers():
    # the generator ends in the same state, so whatever uses it next sees the same numbers
    gens = []
    for s in (DF(**SD), EulerAncestralDiscreteScheduler(**SD)):
        s.set_timesteps(6)
        gen = torch.Generator().manual_seed(3)
        x = initial_sample()
        for t in s.timesteps:
            x = s.step(dummy_model(s.scale_model_input(x, t), t), t, x, generator=gen).prev_sample
        gens.append(torch.randn(4, generator=gen))
    assert torch.equal(gens[0], gens[1])


def test_variance_noise_replaces_the_draw():
    kd = EulerAncestralDiscreteScheduler()
    kd.set_timesteps(10)
    x, m = initial_sample(), initial_sample(seed=1)
    t = kd.timesteps[2]
    kd.set_begin_index(2)
    a = kd.step(m, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    kd.set_timesteps(10)
    kd.set_begin_index(2)
    b = kd.step(m, t, x, variance_noise=torch.randn(x.shape, generator=torch.Generator().manual_seed(7))).prev_sample
    torch.testing.assert_close(a, b)


def test_sample_prediction_is_supported():
    # diffusers raises NotImplementedError; kdfast does the Euler step with x0 = model output
    kd = EulerAncestralDiscreteScheduler(prediction_type="sample")
    kd.set_timesteps(4)
    x, m = initial_sample(), initial_sample(seed=1) * 0.1
    noise = initial_sample(seed=2)
    t = kd.timesteps[0]
    got = kd.step(m, t, x, variance_noise=noise).prev_sample
    s, s_to = kd.sigmas[0].double(), kd.sigmas[1].double()
    up = (s_to**2 * (s**2 - s_to**2) / s**2) ** 0.5
    down = (s_to**2 - up**2) ** 0.5
    expected = x.double() + (x.double() - m.double()) / s * (down - s) + up * noise.double()
    assert parity_error(got, expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_half_precision_keeps_dtype_and_matches(dtype, prediction_type):
    assert_parity(EulerAncestralDiscreteScheduler, DF, dict(prediction_type=prediction_type, **SD), steps=20,
                  dtype=dtype)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fused_guidance_matches_diffusers_guidance(prediction_type):
    assert_parity(EulerAncestralDiscreteScheduler, DF, dict(prediction_type=prediction_type), steps=20,
                  guidance_scale=2.0)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_schedule_state_matches(spacing):
    df, kd = DF(timestep_spacing=spacing, **SD), EulerAncestralDiscreteScheduler(timestep_spacing=spacing, **SD)
    assert kd.init_noise_sigma == float(df.init_noise_sigma)
    torch.testing.assert_close(kd.sigmas, df.sigmas, rtol=0, atol=0)
    for s in (df, kd):
        s.set_timesteps(12)
    assert kd.init_noise_sigma == float(df.init_noise_sigma)
    torch.testing.assert_close(kd.sigmas, df.sigmas, rtol=0, atol=0)
    assert kd.timesteps.dtype == df.timesteps.dtype
    x = initial_sample()
    assert torch.equal(kd.scale_model_input(x, kd.timesteps[0]), df.scale_model_input(x, df.timesteps[0]))


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = EulerAncestralDiscreteScheduler(timestep_spacing="trailing", prediction_type="v_prediction", **SD)
    kd.save_pretrained(tmp_path)
    again = EulerAncestralDiscreteScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert df.config.timestep_spacing == "trailing" and df.config.prediction_type == "v_prediction"
    df.save_pretrained(tmp_path / "df")
    back = EulerAncestralDiscreteScheduler.from_pretrained(tmp_path / "df")
    assert back.config.timestep_spacing == "trailing"
    x = initial_sample()
    assert parity_error(run_loop(back, 10, x), run_loop(df, 10, x)) < 1e-5
    euler = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True, **SD)  # foreign keys are ignored
    assert EulerAncestralDiscreteScheduler.from_config(euler.config).config.beta_end == 0.012


def test_set_begin_index_and_img2img_start():
    df, kd = DF(**SD), EulerAncestralDiscreteScheduler(**SD)
    x = initial_sample()
    outs = []
    for s in (df, kd):
        s.set_timesteps(20)
        s.set_begin_index(8)
        gen = torch.Generator().manual_seed(0)
        y = x * s.sigmas[8]
        for t in s.timesteps[8:]:
            y = s.step(dummy_model(s.scale_model_input(y, t), t), t, y, generator=gen).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_add_noise_matches():
    df, kd = DF(**SD), EulerAncestralDiscreteScheduler(**SD)
    df.set_timesteps(20)
    kd.set_timesteps(20)
    x, n = initial_sample(), initial_sample(seed=5)
    t = df.timesteps[[3, 7]]
    torch.testing.assert_close(kd.add_noise(x, n, t), df.add_noise(x, n, t))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        EulerAncestralDiscreteScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing"):
        EulerAncestralDiscreteScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        EulerAncestralDiscreteScheduler(beta_schedule="cosine")


def test_bad_step_input():
    kd = EulerAncestralDiscreteScheduler()
    x = initial_sample()
    # (before set_timesteps it steps on the training schedule, as diffusers' does: test_scheduler_api)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        kd.set_timesteps(0)
    kd.set_timesteps(5)
    with pytest.raises(ValueError, match="integer indices"):
        kd.step(x, 1, x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("inf"), kd.timesteps[0], x)
    with pytest.raises(TypeError, match="unexpected step arguments"):
        kd.step_cfg(x, x, 2.0, kd.timesteps[0], x, eta=0.5)
    for t in kd.timesteps:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)


def test_timestep_lookup_needs_no_host_read():
    kd = EulerAncestralDiscreteScheduler()
    kd.set_timesteps(10)
    x = initial_sample()
    gen = torch.Generator().manual_seed(0)

    for t in list(kd.timesteps):
        m = dummy_model(kd.scale_model_input(x, t), t)
        with no_host_reads():
            x = kd.step(m, t, x, generator=gen).prev_sample
    assert torch.isfinite(x).all()


def test_pred_original_sample_on_request():
    df, kd = DF(**SD), EulerAncestralDiscreteScheduler(**SD)
    outs = []
    for s in (df, kd):
        s.set_timesteps(6)
        gen = torch.Generator().manual_seed(0)
        y, x0s = initial_sample() * s.init_noise_sigma, []
        for t in s.timesteps:
            kw = {} if s is df else dict(return_pred_original_sample=True)
            out = s.step(dummy_model(s.scale_model_input(y, t), t), t, y, generator=gen, **kw)
            y = out.prev_sample
            x0s.append(out.pred_original_sample)
        outs.append(x0s)
    for got, expected in zip(*outs[::-1]):
        assert parity_error(got, expected) < 1e-5


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_zero_snr_step_to_a_larger_sigma_is_finite_where_diffusers_gives_nan(spacing):
    # Zero-SNR rescaling floors the first sigma at 4096, below the second (15406 on the full
    # schedule): the ancestral split of that step has a negative variance. diffusers returns
    # NaN; kdfast takes a plain Euler step to the next sigma (sigma_up = 0), and every later
    # step matches diffusers again.
    config = dict(beta_schedule="linear", rescale_betas_zero_snr=True, timestep_spacing=spacing)
    kd, df = EulerAncestralDiscreteScheduler(**config), diffusers.EulerAncestralDiscreteScheduler(**config)
    for s in (kd, df):
        s.set_timesteps(1000)
    assert kd._host_sigmas[1] > kd._host_sigmas[0]
    x, m = initial_sample(), initial_sample(seed=1)

    def step(s, k, sample):  # the same draws on both sides: kdfast draws as diffusers does
        return s.step(m, s.timesteps[k], sample, generator=torch.Generator().manual_seed(k)).prev_sample

    first, first_df = step(kd, 0, x), step(df, 0, x)
    assert torch.isnan(first_df).all() and torch.isfinite(first).all()
    sigma, sigma_to = kd._host_sigmas[0], kd._host_sigmas[1]
    x0 = x - sigma * m  # epsilon prediction
    torch.testing.assert_close(first, x + (x - x0) / sigma * (sigma_to - sigma), rtol=1e-5, atol=1e-3)
    assert parity_error(step(kd, 1, first), step(df, 1, first)) < 1e-5
