import math
import warnings

import pytest
import torch

import diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete as df_module
import kdfast.schedulers.base as base
from kdfast.schedulers.kdpm2_ancestral_discrete import KDPM2AncestralDiscreteScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

DF = diffusers.KDPM2AncestralDiscreteScheduler
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def loop(s, steps, x, begin_index=None, gen=None):
    """Every step's sample, from ``begin_index`` (img2img) or the start."""
    s.set_timesteps(steps)
    start = 0
    if begin_index is not None:
        s.set_begin_index(begin_index)
        start = begin_index
    gen = torch.Generator().manual_seed(0) if gen is None else gen
    x = x * (s.sigmas[start] if begin_index is not None else s.init_noise_sigma)
    out = []
    for t in s.timesteps[start:]:
        x = s.step(dummy_model(s.scale_model_input(x, t), t), t, x, generator=gen).prev_sample
        out.append(x)
    return out


def float64_truth(config, steps, x):
    """diffusers' loop in float64, with the float32 noise of the float32 loops (cast)."""
    real = df_module.randn_tensor

    def float32_draw(shape, generator=None, device=None, dtype=None, layout=None):
        return real(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    df_module.randn_tensor = float32_draw
    try:
        return run_loop(DF(**config), steps, x.double())
    finally:
        df_module.randn_tensor = real


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_parity_prediction_types_and_spacings(prediction_type, spacing, steps):
    assert_parity(KDPM2AncestralDiscreteScheduler, DF, dict(prediction_type=prediction_type, timestep_spacing=spacing,
                                                            steps_offset=1), steps=steps)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("steps", [1, 10, 25])
def test_parity_sigma_schedules(sigmas, steps):
    assert_parity(KDPM2AncestralDiscreteScheduler, DF, {sigmas: True, **SD}, steps=steps)


@pytest.mark.parametrize("config", [
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist(), prediction_type="v_prediction"),
    dict(num_train_timesteps=500, **SD),
])
def test_parity_other_configs(config):
    assert_parity(KDPM2AncestralDiscreteScheduler, DF, config, steps=15)


@pytest.mark.parametrize("config, steps", [({}, 2), (SD, 2), (dict(use_beta_sigmas=True), 3),
                                           (dict(beta_schedule="squaredcos_cap_v2"), 20)])
def test_large_steps_are_as_accurate_as_diffusers(config, steps):
    # A second stage from sigma 14.6 with its midpoint at 0.03 multiplies the rounding error of
    # diffusers' float32 x - x0 by ~500: its loop is 2e-5..6e-5 off the float64 loop, above
    # the 1e-5 parity bound. kdfast forms the derivative on the host without that cancellation;
    # both are held to the float64 loop (with the same noise).
    x = initial_sample()
    truth = float64_truth(config, steps, x)
    df_err = parity_error(run_loop(DF(**config), steps, x), truth)
    kd_err = parity_error(run_loop(KDPM2AncestralDiscreteScheduler(**config), steps, x), truth)
    assert kd_err <= 2 * df_err + 1e-6


def test_ancestral_noise_follows_the_generator():
    x = initial_sample()
    a = run_loop(KDPM2AncestralDiscreteScheduler(**SD), 10, x, seed=1)
    b = run_loop(KDPM2AncestralDiscreteScheduler(**SD), 10, x, seed=2)
    assert parity_error(a, b) > 1e-3
    assert parity_error(a, run_loop(DF(**SD), 10, x, seed=1)) < 1e-5


def test_noise_is_drawn_at_every_second_stage_like_diffusers():
    # the generator ends in the same state, so whatever uses it next sees the same numbers
    gens = []
    for s in (DF(**SD), KDPM2AncestralDiscreteScheduler(**SD)):
        s.set_timesteps(6)
        gen = torch.Generator().manual_seed(3)
        x = initial_sample()
        for t in s.timesteps:
            x = s.step(dummy_model(s.scale_model_input(x, t), t), t, x, generator=gen).prev_sample
        gens.append(torch.randn(4, generator=gen))
    assert torch.equal(gens[0], gens[1])


def test_a_list_of_generators_draws_per_sample_like_diffusers():
    outs = []
    for s in (DF(**SD), KDPM2AncestralDiscreteScheduler(**SD)):
        s.set_timesteps(5)
        gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
        x = initial_sample() * s.init_noise_sigma
        for t in s.timesteps:
            x = s.step(dummy_model(s.scale_model_input(x, t), t), t, x, generator=gens).prev_sample
        outs.append(x)
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_variance_noise_replaces_the_draw():
    kd = KDPM2AncestralDiscreteScheduler()
    kd.set_timesteps(10)
    x, m = initial_sample(), initial_sample(seed=1)
    t0, t1 = kd.timesteps[2], kd.timesteps[3]
    kd.set_begin_index(2)
    mid = kd.step(m, t0, x).prev_sample
    a = kd.step(m, t1, mid, generator=torch.Generator().manual_seed(7)).prev_sample
    kd.set_timesteps(10)
    kd.set_begin_index(2)
    mid = kd.step(m, t0, x).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    b = kd.step(m, t1, mid, variance_noise=noise).prev_sample
    torch.testing.assert_close(a, b)


def test_noise_is_drawn_in_the_model_outputs_dtype():
    # diffusers draws randn in model_output's dtype: a half-precision draw, not a float32 one
    kd = KDPM2AncestralDiscreteScheduler()
    kd.set_timesteps(10)
    x, m = initial_sample(dtype=torch.float16), initial_sample(seed=1, dtype=torch.float16)
    t0, t1 = kd.timesteps[2], kd.timesteps[3]
    outs = []
    for noise in (None, torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float16)):
        kd.set_timesteps(10)
        kd.set_begin_index(2)
        mid = kd.step(m, t0, x).prev_sample
        outs.append(kd.step(m, t1, mid, generator=torch.Generator().manual_seed(7), variance_noise=noise).prev_sample)
    assert outs[0].dtype == torch.float16 and torch.equal(outs[0], outs[1])


def test_sample_prediction_is_supported():
    # diffusers raises NotImplementedError; kdfast takes x0 = model output in both stages
    with pytest.raises(NotImplementedError):
        run_loop(DF(prediction_type="sample"), 4, initial_sample())
    kd = KDPM2AncestralDiscreteScheduler(prediction_type="sample")
    kd.set_timesteps(4)
    x, m1, m2 = initial_sample(), initial_sample(seed=1) * 0.1, initial_sample(seed=2) * 0.1
    noise = initial_sample(seed=3)
    s, s_mid = kd.sigmas[0].double(), kd.sigmas_interpol[0].double()
    s_down, s_up = kd.sigmas_down[0].double(), kd.sigmas_up[0].double()
    mid = kd.step(m1, kd.timesteps[0], x).prev_sample
    assert parity_error(mid, x.double() + (x.double() - m1.double()) / s * (s_mid - s)) < 1e-6
    got = kd.step(m2, kd.timesteps[1], mid, variance_noise=noise).prev_sample
    expected = x.double() + (mid.double() - m2.double()) / s_mid * (s_down - s) + s_up * noise.double()
    assert parity_error(got, expected) < 1e-6


def test_two_stages_and_state():
    df, kd = DF(), KDPM2AncestralDiscreteScheduler()
    for s in (df, kd):
        s.set_timesteps(5)
    assert kd.order == df.order == 2 and len(kd.timesteps) == 9 and len(kd.sigmas) == 12
    x = initial_sample()
    t = kd.timesteps[0]
    y = kd.step(dummy_model(kd.scale_model_input(x, t), t), t, x).prev_sample
    assert not kd.state_in_first_order and kd.sample is x  # the first stage's input is kept, not copied
    df.step(dummy_model(x, df.timesteps[0]), df.timesteps[0], x)
    t = kd.timesteps[1]
    # the second stage's model input is scaled with the midpoint's sigma
    assert torch.equal(kd.scale_model_input(y, t), df.scale_model_input(y, df.timesteps[1]))
    kd.step(dummy_model(kd.scale_model_input(y, t), t), t, y)
    assert kd.state_in_first_order and kd.sample is None


@pytest.mark.parametrize("config", [{}, dict(use_karras_sigmas=True), dict(use_beta_sigmas=True),
                                    dict(timestep_spacing="leading", steps_offset=1)])
def test_schedule_state_matches(config):
    df, kd = DF(**config), KDPM2AncestralDiscreteScheduler(**config)
    for steps in (None, 1, 12):
        if steps:
            for s in (df, kd):
                s.set_timesteps(steps)
        assert kd.timesteps.dtype == df.timesteps.dtype
        assert torch.equal(kd.timesteps, df.timesteps) and torch.equal(kd.sigmas, df.sigmas)
        assert torch.equal(kd.log_sigmas, df.log_sigmas)
        assert torch.equal(kd.sigmas_interpol, df.sigmas_interpol) and torch.equal(kd.sigmas_down, df.sigmas_down)
        # diffusers' last sigma_up is 0/0 = NaN (never read); kdfast's is its limit, 0
        assert torch.equal(kd.sigmas_up[:-3], df.sigmas_up[:-3]) and torch.isnan(df.sigmas_up[-1])
        assert (kd.sigmas_up[-3:] == 0).all()
        assert torch.equal(torch.as_tensor(kd.init_noise_sigma), torch.as_tensor(df.init_noise_sigma))
    assert len(kd) == len(df) and kd.sample is None and kd.step_index is None and kd.begin_index is None


def test_schedule_without_set_timesteps_matches_diffusers():
    outs = []
    for s in (DF(), KDPM2AncestralDiscreteScheduler()):
        assert s.num_inference_steps == 1000
        y = initial_sample() * s.init_noise_sigma
        gen = torch.Generator().manual_seed(0)
        for t in s.timesteps[:6]:
            y = s.step(dummy_model(s.scale_model_input(y, t), t), t, y, generator=gen).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_half_precision_keeps_dtype_and_matches(dtype, prediction_type):
    assert_parity(KDPM2AncestralDiscreteScheduler, DF, dict(prediction_type=prediction_type), steps=20, dtype=dtype)


@pytest.mark.parametrize("config", [{}, dict(use_karras_sigmas=True, prediction_type="v_prediction", **SD)])
def test_fused_guidance_matches_diffusers_guidance(config):
    got, _ = assert_parity(KDPM2AncestralDiscreteScheduler, DF, config, steps=20, guidance_scale=2.0)
    unfused = run_loop(KDPM2AncestralDiscreteScheduler(**config), 20, initial_sample(), guidance_scale=2.0)
    assert parity_error(got, unfused) < 1e-6


def test_one_fused_call_per_step_and_x0_when_read(monkeypatch):
    kd, df = KDPM2AncestralDiscreteScheduler(**SD), DF(**SD)
    for s in (kd, df):
        s.set_timesteps(5)
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    x_kd = x_df = initial_sample() * df.init_noise_sigma
    for k, (t_kd, t_df) in enumerate(zip(kd.timesteps, df.timesteps)):
        prev, x0 = df.step(dummy_model(df.scale_model_input(x_df, t_df), t_df), t_df, x_df,
                           generator=torch.Generator().manual_seed(k), return_dict=False)
        calls.clear()
        inp = kd.scale_model_input(x_kd, t_kd)
        gen = torch.Generator().manual_seed(k)
        if k % 3 == 2:
            u, _ = dummy_cfg(inp, t_kd)
            # step_cfg with guidance 0 takes the unconditional output: the same model output as diffusers'
            out = kd.step_cfg(u, dummy_model(0.5 * inp, t_kd), 0.0, t_kd, x_kd, generator=gen, return_dict=False)
        else:
            out = kd.step(dummy_model(inp, t_kd), t_kd, x_kd, generator=gen, return_dict=False)
        assert len(calls) == 1 and isinstance(out, tuple) and len(out) == 2
        x_kd = out[0]  # what pipelines read: no second kernel call
        assert len(calls) == 1
        got_prev, got_x0 = out  # unpacking computes x0 from the step's inputs
        assert len(calls) == 2 and got_prev is x_kd
        assert parity_error(got_x0, x0) < 1e-5 and parity_error(got_prev, prev) < 1e-5
        x_df = prev


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = KDPM2AncestralDiscreteScheduler(use_beta_sigmas=True, timestep_spacing="trailing", **SD)
    kd.save_pretrained(tmp_path)
    again = KDPM2AncestralDiscreteScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert df.config.use_beta_sigmas and df.config.timestep_spacing == "trailing"
    df.save_pretrained(tmp_path / "df")
    back = KDPM2AncestralDiscreteScheduler.from_pretrained(tmp_path / "df")
    assert back.config.use_beta_sigmas and back.config.beta_schedule == "scaled_linear"
    x = initial_sample()
    assert parity_error(run_loop(back, 10, x), run_loop(df, 10, x)) < 1e-5
    assert "KDPM2AncestralDiscreteScheduler" in [c.__name__ for c in kd.compatibles]
    # a pipeline's KDPM2 config works as is (they share every key)
    other = KDPM2AncestralDiscreteScheduler.from_config(diffusers.KDPM2DiscreteScheduler(**SD).config)
    assert settings(other.config)["beta_schedule"] == "scaled_linear"


def test_set_begin_index_and_img2img_start():
    x = initial_sample()
    got, expected = loop(KDPM2AncestralDiscreteScheduler(), 10, x, 8), loop(DF(), 10, x, 8)
    for a, b in zip(got, expected):
        assert parity_error(a, b) < 1e-5


def test_odd_img2img_start_is_finite_where_diffusers_gives_nan():
    # An odd start shifts the stages: the last step is then a second stage whose midpoint sigma
    # is 0, and diffusers divides by it (NaN). kdfast takes the limit (the model output, for
    # an epsilon model); every earlier step matches diffusers.
    x = initial_sample()
    gens = [torch.Generator().manual_seed(0) for _ in range(2)]
    got, expected = loop(KDPM2AncestralDiscreteScheduler(), 10, x, 3, gens[0]), loop(DF(), 10, x, 3, gens[1])
    assert torch.isnan(expected[-1]).all() and torch.isfinite(got[-1]).all()
    for a, b in zip(got[:-1], expected[:-1]):
        assert parity_error(a, b) < 1e-5
    # that last stage adds no noise (sigma_up = 0) but draws it, as diffusers does
    assert torch.equal(torch.randn(4, generator=gens[0]), torch.randn(4, generator=gens[1]))


def test_two_steps_from_sigma_157_are_finite_where_diffusers_gives_nan():
    # On the 0.0001-0.02 schedule two steps go from sigma 157 to 0.0101: sigma_down**2 =
    # next**4 / sigma**2 is the difference of two float32 numbers equal to 1e-8 relative, which
    # rounds to <= 0, and diffusers' midpoint, its timestep and both steps are NaN. kdfast
    # computes those in float64 (midpoint = next sigma), and its loop is the float64 one.
    config = dict(beta_start=0.0001, beta_end=0.02)
    kd, df = KDPM2AncestralDiscreteScheduler(**config), DF(**config)
    for s in (kd, df):
        s.set_timesteps(2)
    assert torch.isnan(df.timesteps[1]) and torch.isfinite(kd.timesteps).all()
    s0, s1 = kd.sigmas[0].item(), kd.sigmas[1].item()
    assert kd.sigmas_down[0].item() == pytest.approx(s1 * s1 / s0, rel=1e-6)
    assert kd.sigmas_interpol[0].item() == pytest.approx(s1, rel=1e-6)
    assert kd.sigmas_up[0].item() == pytest.approx(s1 * math.sqrt(1 - (s1 / s0) ** 2), rel=1e-6)
    x = initial_sample()
    got, expected = run_loop(kd, 2, x), run_loop(df, 2, x)
    assert torch.isnan(expected).all() and torch.isfinite(got).all()
    # by hand, in float64: the Euler step to the midpoint, then the step to sigma_down from the
    # first stage's sample with the midpoint's model output, plus sigma_up * noise; then the
    # last step, a first stage from sigma 0.0101 to x0
    gen = torch.Generator().manual_seed(0)
    x = x.double() * s0
    t0, t_mid, t1 = kd.timesteps
    s_mid, s_down, s_up = (kd.sigmas_interpol[0].item(), kd.sigmas_down[0].item(), kd.sigmas_up[0].item())
    mid = x + (s_mid - s0) * dummy_model(x / math.sqrt(s0**2 + 1), t0)
    noise = torch.randn(x.shape, generator=gen).double()
    y = x + (s_down - s0) * dummy_model(mid / math.sqrt(s_mid**2 + 1), t_mid) + s_up * noise
    y = y - s1 * dummy_model(y / math.sqrt(s1**2 + 1), t1)
    assert parity_error(got, y) < 1e-5


def test_zero_sigma_where_diffusers_gives_nan():
    # beta_start=0: the training sigma of timestep 0 is 0, and so is the last step's; diffusers'
    # midpoints and steps after it are NaN. kdfast's are the limits; earlier steps match.
    x = initial_sample()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # diffusers' log(0)
        expected = loop(DF(beta_start=0.0), 6, x)
        got = loop(KDPM2AncestralDiscreteScheduler(beta_start=0.0), 6, x)
    assert torch.isnan(expected[-1]).all() and all(torch.isfinite(g).all() for g in got)
    first_nan = next(k for k, e in enumerate(expected) if torch.isnan(e).any())
    assert first_nan > 5
    for a, b in zip(got[:first_nan], expected[:first_nan]):
        assert parity_error(a, b) < 1e-5


def test_add_noise_matches():
    df, kd = DF(), KDPM2AncestralDiscreteScheduler()
    df.set_timesteps(20)
    kd.set_timesteps(20)
    x, n = initial_sample(), initial_sample(seed=5)
    t = df.timesteps[[0, 8]]
    assert torch.equal(kd.add_noise(x, n, t), df.add_noise(x, n, t))
    for s in (df, kd):
        s.set_begin_index(6)
    assert torch.equal(kd.add_noise(x, n, t), df.add_noise(x, n, t))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        KDPM2AncestralDiscreteScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing"):
        KDPM2AncestralDiscreteScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        KDPM2AncestralDiscreteScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="Only one of"):
        KDPM2AncestralDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)


def test_bad_step_input():
    kd = KDPM2AncestralDiscreteScheduler()
    x = initial_sample()
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        kd.set_timesteps(0)
    kd.set_timesteps(3)
    with pytest.raises(IndexError, match="timestep 1 is not one of the schedule's"):  # looked up, as in diffusers
        kd.step(x, torch.tensor(1), x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(TypeError, match="unexpected step arguments: eta"):
        kd.step_cfg(x, x, 2.0, kd.timesteps[0], x, eta=1.0)
    x = kd.step(dummy_model(x, kd.timesteps[0]), kd.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match=r"variance_noise must be a tensor of model_output's shape \(2, 4, 8, 8\)"):
        kd.step(x, kd.timesteps[1], x, variance_noise=x[:1])
    for t in kd.timesteps[1:]:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)


def test_timestep_lookup_needs_no_host_read():
    kd = KDPM2AncestralDiscreteScheduler(use_karras_sigmas=True)
    kd.set_timesteps(6)
    x = initial_sample()
    gen = torch.Generator().manual_seed(0)

    for t in list(kd.timesteps):
        m = dummy_model(kd.scale_model_input(x, t), t)
        with no_host_reads():
            x = kd.step(m, t, x, generator=gen).prev_sample
    assert torch.isfinite(x).all()
