import pytest
import torch

from kdfast.schedulers.heun_discrete import HeunDiscreteScheduler
from parity import (
    assert_parity, diffusers, dummy_model, initial_sample, no_host_reads, parity_error, run_loop, settings)


class DF(diffusers.HeunDiscreteScheduler):
    """diffusers' Heun, taking (and ignoring) the ``generator`` that run_loop passes to every step."""

    def step(self, model_output, timestep, sample, return_dict=True, generator=None):
        return super().step(model_output, timestep, sample, return_dict=return_dict)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_parity_prediction_types_and_spacings(prediction_type, spacing):
    assert_parity(HeunDiscreteScheduler, DF, dict(prediction_type=prediction_type, timestep_spacing=spacing,
                                                  steps_offset=1), steps=15)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("steps", [10, 25])
def test_parity_sigma_schedules(sigmas, steps):
    assert_parity(HeunDiscreteScheduler, DF, {sigmas: True, "beta_schedule": "scaled_linear"}, steps=steps)


@pytest.mark.parametrize("config", [
    dict(beta_schedule="exp"),
    dict(beta_schedule="scaled_linear", prediction_type="v_prediction"),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
])
def test_parity_other_configs(config):
    assert_parity(HeunDiscreteScheduler, DF, config, steps=20)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_cosine_schedule_is_as_accurate_as_diffusers(prediction_type):
    # squaredcos_cap_v2 starts at sigma ~2e4: the corrector adds ~1e5-sized terms that cancel
    # to ~50, so float32 loops (diffusers' and kdfast's alike) differ from the float64 loop by
    # 1e-5..1e-2; 1e-5 parity is not defined there. kdfast is held to diffusers' own accuracy.
    config = dict(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    x = initial_sample()
    truth = run_loop(DF(**config), 20, x.double())
    df_err = parity_error(run_loop(DF(**config), 20, x), truth)
    kd_err = parity_error(run_loop(HeunDiscreteScheduler(**config), 20, x), truth)
    assert kd_err <= 2 * df_err + 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parity_clip_sample(prediction_type):
    config = dict(clip_sample=True, clip_sample_range=1.5, prediction_type=prediction_type)
    got, _ = assert_parity(HeunDiscreteScheduler, DF, config, steps=20)
    if prediction_type == "epsilon":
        plain = run_loop(HeunDiscreteScheduler(prediction_type=prediction_type), 20, initial_sample())
        assert parity_error(got, plain) > 1e-3  # the clipping did something


def test_parity_custom_timesteps():
    assert_parity(HeunDiscreteScheduler, DF, {}, steps=None, timesteps=[999, 800, 600, 400, 200, 50])


def test_two_stages_and_state():
    kd = HeunDiscreteScheduler()
    kd.set_timesteps(5)
    assert kd.order == 2 and len(kd.timesteps) == 9 and len(kd.sigmas) == 10
    x = initial_sample()
    t = kd.timesteps[0]
    assert kd.state_in_first_order
    y = kd.step(dummy_model(kd.scale_model_input(x, t), t), t, x).prev_sample
    assert not kd.state_in_first_order and kd.sample is x  # the predictor's input is kept, not copied
    t = kd.timesteps[1]
    kd.step(dummy_model(kd.scale_model_input(y, t), t), t, y)
    assert kd.state_in_first_order and kd.prev_derivative is None and kd.sample is None


def test_schedule_without_set_timesteps_matches_diffusers():
    # diffusers sets a full schedule at construction; stepping it directly works in both
    df, kd = DF(), HeunDiscreteScheduler()
    assert kd.num_inference_steps == df.num_inference_steps == 1000
    assert torch.equal(kd.timesteps, df.timesteps) and torch.equal(kd.sigmas, df.sigmas)
    x = initial_sample()
    outs = []
    for s in (df, kd):
        y = x * s.init_noise_sigma
        for t in s.timesteps[:6]:
            y = s.step(dummy_model(s.scale_model_input(y, t), t), t, y).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_half_precision_keeps_dtype_and_matches(dtype, prediction_type):
    assert_parity(HeunDiscreteScheduler, DF, dict(prediction_type=prediction_type), steps=20, dtype=dtype)


@pytest.mark.parametrize("config", [{}, dict(use_karras_sigmas=True, clip_sample=True, clip_sample_range=2.0)])
def test_fused_guidance_matches_diffusers_guidance(config):
    assert_parity(HeunDiscreteScheduler, DF, config, steps=20, guidance_scale=2.0)


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = HeunDiscreteScheduler(use_karras_sigmas=True, clip_sample=True, clip_sample_range=3.0,
                               beta_schedule="scaled_linear")
    kd.save_pretrained(tmp_path)
    again = HeunDiscreteScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert df.config.use_karras_sigmas and df.config.clip_sample_range == 3.0
    df.save_pretrained(tmp_path / "df")
    back = HeunDiscreteScheduler.from_pretrained(tmp_path / "df")
    assert back.config.use_karras_sigmas and back.config.clip_sample
    x = initial_sample()
    assert parity_error(run_loop(back, 10, x), run_loop(df, 10, x)) < 1e-5
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", sigma_min=0.1)  # foreign keys ignored
    assert HeunDiscreteScheduler.from_config(euler.config).config.beta_schedule == "scaled_linear"


def test_set_begin_index_and_img2img_start():
    df, kd = DF(), HeunDiscreteScheduler()
    x = initial_sample()
    outs = []
    for s in (df, kd):
        s.set_timesteps(10)
        start = 4 * s.order - 1  # diffusers' img2img start: t_start * order, first stage at an odd index
        s.set_begin_index(start)
        y = x * s.sigmas[start]
        for t in s.timesteps[start:]:
            y = s.step(dummy_model(s.scale_model_input(y, t), t), t, y).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_add_noise_matches():
    df, kd = DF(), HeunDiscreteScheduler()
    df.set_timesteps(20)
    kd.set_timesteps(20)
    x, n = initial_sample(), initial_sample(seed=5)
    t = df.timesteps[[3, 8]]
    torch.testing.assert_close(kd.add_noise(x, n, t), df.add_noise(x, n, t))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        HeunDiscreteScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing"):
        HeunDiscreteScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        HeunDiscreteScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="Only one of"):
        HeunDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)


def test_bad_step_input():
    kd = HeunDiscreteScheduler(use_karras_sigmas=True)
    x = initial_sample()
    with pytest.raises(ValueError, match="Must pass exactly one"):
        kd.set_timesteps()
    with pytest.raises(ValueError, match="karras"):
        kd.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        kd.set_timesteps(0)
    kd.set_timesteps(3)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), kd.timesteps[0], x)
    with pytest.raises(TypeError, match="unexpected step arguments"):
        kd.step_cfg(x, x, 2.0, kd.timesteps[0], x, s_churn=1.0)
    for t in kd.timesteps:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)


def test_timestep_lookup_needs_no_host_read():
    kd = HeunDiscreteScheduler(clip_sample=True)
    kd.set_timesteps(6)
    x = initial_sample()

    for t in list(kd.timesteps):  # the repeated timesteps included
        m = dummy_model(kd.scale_model_input(x, t), t)
        with no_host_reads():
            x = kd.step(m, t, x).prev_sample
    assert torch.isfinite(x).all()


def test_pred_original_sample_on_request():
    df, kd = DF(clip_sample=True, clip_sample_range=2.0), HeunDiscreteScheduler(clip_sample=True, clip_sample_range=2.0)
    outs = []
    for s in (df, kd):
        s.set_timesteps(4)
        y, x0s = initial_sample() * s.init_noise_sigma, []
        for t in s.timesteps:  # both stages
            kw = {} if s is df else dict(return_pred_original_sample=True)
            out = s.step(dummy_model(s.scale_model_input(y, t), t), t, y, **kw)
            y = out.prev_sample
            x0s.append(out.pred_original_sample)
        outs.append(x0s)
    for got, expected in zip(*outs[::-1]):
        assert parity_error(got, expected) < 1e-5
