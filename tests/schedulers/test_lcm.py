import logging

import pytest
import torch

from kdfast.schedulers.lcm import LCMScheduler
from kdfast.schedulers.tcd import TCDScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

DF = diffusers.LCMScheduler


@pytest.fixture(autouse=True)
def _quiet_schedule_warnings():
    # both libraries warn about off-schedule custom timesteps; the tests use them on purpose
    names = ("kdfast.schedulers.lcm", "diffusers.schedulers.scheduling_lcm")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    yield
    for n, level in zip(names, levels):
        logging.getLogger(n).setLevel(level)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 25, 50])
def test_parity_prediction_types_and_steps(prediction_type, steps):
    assert_parity(LCMScheduler, DF, dict(prediction_type=prediction_type), steps=steps)


@pytest.mark.parametrize("config", [
    dict(clip_sample=True, clip_sample_range=0.8),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    dict(timestep_scaling=2.5, set_alpha_to_one=False),
    dict(original_inference_steps=100, steps_offset=1),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="trailing"),
])
def test_parity_configs(config):
    assert_parity(LCMScheduler, DF, config, steps=6)


def test_thresholding_and_clipping_act():
    x = initial_sample()
    plain = run_loop(LCMScheduler(), 4, x)
    for config in (dict(clip_sample=True, clip_sample_range=0.8), dict(thresholding=True, sample_max_value=1.5)):
        got, _ = assert_parity(LCMScheduler, DF, config, steps=4)
        assert parity_error(got, plain) > 1e-3


@pytest.mark.parametrize("kwargs", [
    dict(original_inference_steps=20),
    dict(strength=0.6),
    dict(strength=0.3, original_inference_steps=30),
])
def test_parity_set_timesteps_options(kwargs):
    assert_parity(LCMScheduler, DF, {}, steps=5, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(timesteps=[999, 759, 499, 259]),
    dict(timesteps=[999, 759, 499, 259, 100], strength=0.5),  # fewer steps run than num_inference_steps
    dict(timesteps=[899, 499, 19]),
])
def test_parity_custom_timesteps(kwargs):
    assert_parity(LCMScheduler, DF, {}, steps=None, **kwargs)
    assert_parity(LCMScheduler, DF, dict(prediction_type="v_prediction"), steps=None, guidance_scale=2.0, **kwargs)


def test_returns_denoised_like_diffusers():
    df, kd = DF(), LCMScheduler()
    x = initial_sample()
    for s in (df, kd):
        s.set_timesteps(4)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    xs = [x, x]
    for j, (t_df, t_kd) in enumerate(zip(df.timesteps, kd.timesteps)):
        out_df = df.step(dummy_model(xs[0], t_df), t_df, xs[0], generator=gens[0])
        out_kd = kd.step(dummy_model(xs[1], t_kd), t_kd, xs[1], generator=gens[1])
        assert parity_error(out_kd.denoised, out_df.denoised) < 1e-5
        assert parity_error(out_kd.prev_sample, out_df.prev_sample) < 1e-5
        prev, denoised = out_kd.to_tuple()
        assert prev is out_kd[0] and denoised is out_kd[1]
        xs = [out_df.prev_sample, out_kd.prev_sample]
    assert out_kd.prev_sample is out_kd.denoised  # the last step returns the denoised sample
    assert torch.equal(torch.randn(3, generator=gens[0]), torch.randn(3, generator=gens[1]))


def test_noise_follows_the_generator_and_variance_noise():
    x = initial_sample()
    a = run_loop(LCMScheduler(), 4, x, seed=1)
    b = run_loop(LCMScheduler(), 4, x, seed=2)
    assert parity_error(a, b) > 1e-3
    kd = LCMScheduler()
    kd.set_timesteps(4)
    m = dummy_model(x, kd.timesteps[0])
    a = kd.step(m, kd.timesteps[0], x, generator=torch.Generator().manual_seed(5)).prev_sample
    kd.set_timesteps(4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    b = kd.step(m, kd.timesteps[0], x, variance_noise=noise).prev_sample
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [{}, dict(prediction_type="v_prediction", clip_sample=True)])
def test_half_precision_keeps_dtype_and_matches(dtype, config):
    assert_parity(LCMScheduler, DF, config, steps=4, dtype=dtype)


@pytest.mark.parametrize("config", [{}, dict(thresholding=True, sample_max_value=1.5)])
def test_fused_guidance_matches_diffusers_guidance(config):
    assert_parity(LCMScheduler, DF, config, steps=8, guidance_scale=2.0)


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = LCMScheduler(original_inference_steps=100, timestep_scaling=5.0, clip_sample=True, set_alpha_to_one=False)
    kd.save_pretrained(tmp_path)
    again = LCMScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert df.config.original_inference_steps == 100 and df.config.timestep_scaling == 5.0
    df.save_pretrained(tmp_path / "df")
    back = LCMScheduler.from_pretrained(tmp_path / "df")
    assert back.config.original_inference_steps == 100 and back.config.clip_sample
    x = initial_sample()
    assert parity_error(run_loop(back, 4, x), run_loop(df, 4, x)) < 1e-5
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False)  # foreign keys ignored
    assert LCMScheduler.from_config(ddim.config).config.beta_schedule == "scaled_linear"


def test_set_begin_index_and_previous_timestep():
    df, kd = DF(), LCMScheduler()
    x = initial_sample()
    outs = []
    for s in (df, kd):
        s.set_timesteps(6)
        s.set_begin_index(2)
        gen = torch.Generator().manual_seed(0)
        y = x
        for t in s.timesteps[2:]:
            y = s.step(dummy_model(y, t), t, y, generator=gen).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5
    for i in (0, 3, 5):
        assert int(kd.previous_timestep(kd.timesteps[i])) == int(df.previous_timestep(df.timesteps[i]))


def test_add_noise_and_velocity_match():
    df, kd = DF(), LCMScheduler()
    x, n = initial_sample(), initial_sample(seed=5)
    t = torch.tensor([19, 759])
    torch.testing.assert_close(kd.add_noise(x, n, t), df.add_noise(x, n, t))
    torch.testing.assert_close(kd.get_velocity(x, n, t), df.get_velocity(x, n, t))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="prediction_type='flow_prediction'"):
        LCMScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="timestep_spacing"):
        LCMScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        LCMScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="original_inference_steps"):
        LCMScheduler(original_inference_steps=0)
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        LCMScheduler(dynamic_thresholding_ratio=-0.1)


def test_bad_set_timesteps_arguments():
    kd = LCMScheduler()
    with pytest.raises(ValueError, match="Must pass exactly one"):
        kd.set_timesteps()
    with pytest.raises(ValueError, match="Can only pass one"):
        kd.set_timesteps(4, timesteps=[999, 499])
    with pytest.raises(ValueError, match="original_steps"):
        kd.set_timesteps(4, original_inference_steps=2000)
    with pytest.raises(ValueError, match="is smaller than `num_inference_steps`: 60"):
        kd.set_timesteps(60)
    # past 1 the origin timesteps ran past the training schedule: an IndexError for TCD and LCM
    for scheduler in (LCMScheduler(), TCDScheduler()):
        for strength in (1.5, 2.0, float("nan")):
            with pytest.raises(ValueError, match=r"strength must be a finite number in \[0.0, 1.0\]"):
                scheduler.set_timesteps(4, strength=strength)
    with pytest.raises(ValueError, match="strength"):
        kd.set_timesteps(10, strength=0.1)
    with pytest.raises(ValueError, match="descending"):
        kd.set_timesteps(timesteps=[999, 999, 499])
    with pytest.raises(ValueError, match="must start before"):
        kd.set_timesteps(timesteps=[1000, 499])
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        kd.set_timesteps(0)
    # a call that fails leaves the last schedule whole (its last step is still the last one)
    kd.set_timesteps(8)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1, got 7.5"):
        kd.set_timesteps(7.5)
    with pytest.raises(ValueError, match="strength must be a finite number"):
        kd.set_timesteps(60, strength=2.0)
    with pytest.raises((RuntimeError, ValueError)):  # an unknown device, here after the custom schedule is made
        kd.set_timesteps(timesteps=[999, 759, 499], device="no-such-device")
    assert kd.num_inference_steps == len(kd.timesteps) == 8 and not kd.custom_timesteps


def test_bad_step_input():
    kd = LCMScheduler()
    x = initial_sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, 999, x)
    kd.set_timesteps(2)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), kd.timesteps[0], x)
    with pytest.raises(TypeError, match="unexpected step arguments"):
        kd.step_cfg(x, x, 2.0, kd.timesteps[0], x, eta=0.5)
    for t in kd.timesteps:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)


def test_timestep_lookup_needs_no_host_read():
    kd = LCMScheduler(thresholding=True)
    kd.set_timesteps(6)
    x = initial_sample()
    gen = torch.Generator().manual_seed(0)

    for t in list(kd.timesteps):
        u, c = dummy_cfg(x, t)
        with no_host_reads():
            x = kd.step_cfg(u, c, 2.0, t, x, generator=gen).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("original_steps", [60, 70, 300])
def test_original_steps_that_do_not_divide_the_training_steps(original_steps):
    # the distillation schedule's stride is T // original_steps (1000 // 60 = 16, not 17)
    kd, df = LCMScheduler(original_inference_steps=original_steps), DF(original_inference_steps=original_steps)
    kd.set_timesteps(4)
    df.set_timesteps(4)
    assert kd.timesteps.tolist() == df.timesteps.tolist()
