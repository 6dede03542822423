import warnings

import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.kdpm2_discrete import KDPM2DiscreteScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


class DF(diffusers.KDPM2DiscreteScheduler):
    """diffusers' KDPM2, taking (and ignoring) the ``generator`` that run_loop passes to every step."""

    def step(self, model_output, timestep, sample, return_dict=True, generator=None):
        return super().step(model_output, timestep, sample, return_dict=return_dict)


def loop(s, steps, x, begin_index=None):
    """Every step's sample, from ``begin_index`` (img2img) or the start."""
    s.set_timesteps(steps)
    start = 0
    if begin_index is not None:
        s.set_begin_index(begin_index)
        start = begin_index
    x = x * (s.sigmas[start] if begin_index is not None else s.init_noise_sigma)
    out = []
    for t in s.timesteps[start:]:
        x = s.step(dummy_model(s.scale_model_input(x, t), t), t, x).prev_sample
        out.append(x)
    return out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_parity_prediction_types_and_spacings(prediction_type, spacing, steps):
    assert_parity(KDPM2DiscreteScheduler, DF, dict(prediction_type=prediction_type, timestep_spacing=spacing,
                                                   steps_offset=1), steps=steps)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("steps", [1, 10, 25])
def test_parity_sigma_schedules(sigmas, steps):
    assert_parity(KDPM2DiscreteScheduler, DF, {sigmas: True, **SD}, steps=steps)


@pytest.mark.parametrize("config", [
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist(), prediction_type="v_prediction"),
    dict(num_train_timesteps=500, **SD),
    dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),  # (foreign keys diffusers' Karras reads)
])
def test_parity_other_configs(config):
    df = DF.from_config(config)  # keeps sigma_min / sigma_max in its config, as kdfast does
    kd = KDPM2DiscreteScheduler.from_config(df.config)
    x = initial_sample()
    assert parity_error(run_loop(kd, 15, x), run_loop(df, 15, x)) < 1e-5
    assert torch.equal(kd.timesteps, df.timesteps) and torch.equal(kd.sigmas, df.sigmas)


@pytest.mark.parametrize("steps", [2, 3, 20])
def test_cosine_schedule_is_as_accurate_as_diffusers(steps):
    # squaredcos_cap_v2 starts at sigma ~2e4: float32 loops (diffusers' and kdfast's alike)
    # differ from the float64 loop by up to ~3e-5, so 1e-5 parity is not defined there; kdfast
    # is held to diffusers' own accuracy.
    config = dict(beta_schedule="squaredcos_cap_v2")
    x = initial_sample()
    truth = run_loop(DF(**config), steps, x.double())
    df_err = parity_error(run_loop(DF(**config), steps, x), truth)
    kd_err = parity_error(run_loop(KDPM2DiscreteScheduler(**config), steps, x), truth)
    assert kd_err <= 2 * df_err + 1e-6


def test_sample_prediction_is_supported():
    # diffusers raises NotImplementedError; kdfast takes x0 = model output in both stages
    with pytest.raises(NotImplementedError):
        run_loop(DF(prediction_type="sample"), 4, initial_sample())
    kd = KDPM2DiscreteScheduler(prediction_type="sample")
    kd.set_timesteps(4)
    x, m1, m2 = initial_sample(), initial_sample(seed=1) * 0.1, initial_sample(seed=2) * 0.1
    s, s_mid, s_next = (kd.sigmas[0].double(), kd.sigmas_interpol[1].double(), kd.sigmas[1].double())
    mid = kd.step(m1, kd.timesteps[0], x).prev_sample
    expected_mid = x.double() + (x.double() - m1.double()) / s * (s_mid - s)
    assert parity_error(mid, expected_mid) < 1e-6
    got = kd.step(m2, kd.timesteps[1], mid).prev_sample
    expected = x.double() + (mid.double() - m2.double()) / s_mid * (s_next - s)
    assert parity_error(got, expected) < 1e-6


def test_two_stages_and_state():
    df, kd = DF(), KDPM2DiscreteScheduler()
    for s in (df, kd):
        s.set_timesteps(5)
    assert kd.order == df.order == 2 and len(kd.timesteps) == 9 and len(kd.sigmas) == 12
    x = initial_sample()
    t = kd.timesteps[0]
    assert kd.state_in_first_order
    y = kd.step(dummy_model(kd.scale_model_input(x, t), t), t, x).prev_sample
    assert not kd.state_in_first_order and kd.sample is x  # the first stage's input is kept, not copied
    t = kd.timesteps[1]
    df.step(dummy_model(x, df.timesteps[0]), df.timesteps[0], x)
    # the second stage's model input is scaled with the midpoint's sigma
    assert torch.equal(kd.scale_model_input(y, t), df.scale_model_input(y, df.timesteps[1]))
    kd.step(dummy_model(kd.scale_model_input(y, t), t), t, y)
    assert kd.state_in_first_order and kd.sample is None


@pytest.mark.parametrize("config", [{}, dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
                                    dict(timestep_spacing="leading", steps_offset=1)])
def test_schedule_state_matches(config):
    df, kd = DF(**config), KDPM2DiscreteScheduler(**config)
    for steps in (None, 1, 12):
        if steps:
            for s in (df, kd):
                s.set_timesteps(steps)
        assert kd.timesteps.dtype == df.timesteps.dtype  # float64 with Karras (diffusers rounds them)
        assert torch.equal(kd.timesteps, df.timesteps) and torch.equal(kd.sigmas, df.sigmas)
        assert torch.equal(kd.log_sigmas, df.log_sigmas)
        # diffusers' sigmas_interpol[0] is NaN (log(0) - log(0)); never read, 0 in kdfast
        assert torch.equal(kd.sigmas_interpol[1:], df.sigmas_interpol[1:]) and kd.sigmas_interpol[0] == 0
        assert torch.equal(torch.as_tensor(kd.init_noise_sigma), torch.as_tensor(df.init_noise_sigma))
        assert kd.num_inference_steps == df.num_inference_steps
    assert len(kd) == len(df) and kd.sample is None and kd.step_index is None and kd.begin_index is None


def test_num_train_timesteps_argument():
    df, kd = DF(**SD), KDPM2DiscreteScheduler(**SD)
    for s in (df, kd):
        s.set_timesteps(10, num_train_timesteps=800)
    assert torch.equal(kd.timesteps, df.timesteps) and torch.equal(kd.sigmas, df.sigmas)


def test_schedule_without_set_timesteps_matches_diffusers():
    df, kd = DF(), KDPM2DiscreteScheduler()
    assert kd.num_inference_steps == df.num_inference_steps == 1000
    outs = []
    for s in (df, kd):
        y = initial_sample() * s.init_noise_sigma
        for t in s.timesteps[:6]:
            y = s.step(dummy_model(s.scale_model_input(y, t), t), t, y).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_half_precision_keeps_dtype_and_matches(dtype, prediction_type):
    assert_parity(KDPM2DiscreteScheduler, DF, dict(prediction_type=prediction_type), steps=20, dtype=dtype)


@pytest.mark.parametrize("config", [{}, dict(use_karras_sigmas=True, prediction_type="v_prediction", **SD)])
def test_fused_guidance_matches_diffusers_guidance(config):
    got, _ = assert_parity(KDPM2DiscreteScheduler, DF, config, steps=20, guidance_scale=2.0)
    unfused = run_loop(KDPM2DiscreteScheduler(**config), 20, initial_sample(), guidance_scale=2.0)
    assert parity_error(got, unfused) < 1e-6


def test_one_fused_call_per_step_and_x0_when_read(monkeypatch):
    kd, df = KDPM2DiscreteScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(5)
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    x_kd = x_df = initial_sample() * df.init_noise_sigma
    for k, (t_kd, t_df) in enumerate(zip(kd.timesteps, df.timesteps)):
        prev, x0 = df.step(dummy_model(df.scale_model_input(x_df, t_df), t_df), t_df, x_df, return_dict=False)
        calls.clear()
        inp = kd.scale_model_input(x_kd, t_kd)
        if k % 3 == 2:
            u, c = dummy_cfg(inp, t_kd)
            out = kd.step_cfg(u, c, 1.0, t_kd, x_kd, return_dict=False)  # (scale 1: the conditional output)
            out_x0 = None
        else:
            out = kd.step(dummy_model(inp, t_kd), t_kd, x_kd, return_dict=False)
            out_x0 = x0
        assert len(calls) == 1 and isinstance(out, tuple) and len(out) == 2
        x_kd = out[0]  # what pipelines read: no second kernel call
        assert len(calls) == 1
        got_prev, got_x0 = out  # unpacking computes x0 from the step's inputs
        assert len(calls) == 2 and got_prev is x_kd
        if out_x0 is not None:
            assert parity_error(got_x0, out_x0) < 1e-5 and parity_error(got_prev, prev) < 1e-5
        x_df = prev if out_x0 is not None else x_kd
    eager = KDPM2DiscreteScheduler()
    eager.set_timesteps(5)
    x = initial_sample()
    t = eager.timesteps[0]
    calls.clear()
    out = eager.step(dummy_model(x, t), t, x, return_pred_original_sample=True)
    assert len(calls) == 1 and out.pred_original_sample is not None and len(calls) == 1


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = KDPM2DiscreteScheduler(use_karras_sigmas=True, prediction_type="v_prediction", **SD)
    kd.save_pretrained(tmp_path)
    again = KDPM2DiscreteScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert df.config.use_karras_sigmas and df.config.prediction_type == "v_prediction"
    df.save_pretrained(tmp_path / "df")
    back = KDPM2DiscreteScheduler.from_pretrained(tmp_path / "df")
    assert back.config.use_karras_sigmas and back.config.beta_schedule == "scaled_linear"
    x = initial_sample()
    assert parity_error(run_loop(back, 10, x), run_loop(df, 10, x)) < 1e-5
    euler = diffusers.EulerDiscreteScheduler(**SD)  # foreign keys are ignored
    assert KDPM2DiscreteScheduler.from_config(euler.config).config.beta_end == 0.012
    assert "KDPM2DiscreteScheduler" in [c.__name__ for c in kd.compatibles]


@pytest.mark.parametrize("start", [3, 8])
def test_set_begin_index_and_img2img_start(start):
    # pipelines start at t_start * order (even: a first stage); an odd start begins with a
    # first stage at a midpoint index, as diffusers does it
    x = initial_sample()
    got, expected = loop(KDPM2DiscreteScheduler(), 10, x, start), loop(DF(), 10, x, start)
    for a, b in zip(got, expected):
        assert parity_error(a, b) < 1e-5


def test_add_noise_matches():
    df, kd = DF(), KDPM2DiscreteScheduler()
    df.set_timesteps(20)
    kd.set_timesteps(20)
    x, n = initial_sample(), initial_sample(seed=5)
    t = df.timesteps[[3, 8]]
    assert torch.equal(kd.add_noise(x, n, t), df.add_noise(x, n, t))
    for s in (df, kd):
        s.set_begin_index(6)
    assert torch.equal(kd.add_noise(x, n, t), df.add_noise(x, n, t))


def test_zero_sigma_where_diffusers_gives_nan():
    # beta_start=0: the training sigma of timestep 0 is 0, and so is the last step's. diffusers'
    # last midpoint is then 0 and its derivative there 0 / 0: NaN. kdfast takes the limit (the
    # model output, for an epsilon model); every earlier step matches diffusers.
    x = initial_sample()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # diffusers' log(0)
        expected = loop(DF(beta_start=0.0), 6, x)
        got = loop(KDPM2DiscreteScheduler(beta_start=0.0), 6, x)
    assert torch.isnan(expected[-1]).all() and all(torch.isfinite(g).all() for g in got)
    first_nan = next(k for k, e in enumerate(expected) if torch.isnan(e).any())
    assert first_nan > 5
    for a, b in zip(got[:first_nan], expected[:first_nan]):
        assert parity_error(a, b) < 1e-5


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        KDPM2DiscreteScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing"):
        KDPM2DiscreteScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        KDPM2DiscreteScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="Only one of"):
        KDPM2DiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)


def test_bad_step_input():
    kd = KDPM2DiscreteScheduler()
    x = initial_sample()
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        kd.set_timesteps(0)
    kd.set_timesteps(3)
    # an integer is looked up as a timestep value, as diffusers does (only its Euler-type
    # schedulers refuse integers, as indices from enumerate()): 1 is not in the schedule
    with pytest.raises(IndexError, match="timestep 1 is not one of the schedule's"):
        kd.step(x, 1, x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(TypeError, match="unexpected keyword argument 's_churn'"):
        kd.step(x, kd.timesteps[0], x, s_churn=1.0)
    with pytest.raises(TypeError, match="unexpected step arguments: s_churn"):
        kd.step_cfg(x, x, 2.0, kd.timesteps[0], x, s_churn=1.0)
    x = kd.step(dummy_model(x, kd.timesteps[0]), kd.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="first stage's sample shape"):
        kd.step(x[:1], kd.timesteps[1], x[:1])
    for t in kd.timesteps[1:]:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)


def test_timestep_lookup_needs_no_host_read():
    kd = KDPM2DiscreteScheduler(use_karras_sigmas=True)
    kd.set_timesteps(6)
    x = initial_sample()

    for t in list(kd.timesteps):
        m = dummy_model(kd.scale_model_input(x, t), t)
        with no_host_reads():
            x = kd.step(m, t, x).prev_sample
    assert torch.isfinite(x).all()
