import math

import numpy as np
import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.flow_match_heun_discrete import FlowMatchHeunDiscreteScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

DF = diffusers.FlowMatchHeunDiscreteScheduler
KD = FlowMatchHeunDiscreteScheduler
CHURNS = [
    dict(s_churn=1.0),
    dict(s_churn=5.0, s_tmin=0.2, s_tmax=0.8, s_noise=1.1),  # churn on some steps only, scaled noise
    dict(s_churn=100.0),                                      # gamma capped at sqrt(2) - 1
    dict(s_churn=-0.5),                                       # sigma lowered, no noise (as in diffusers)
]


def churn_loop(scheduler, steps, x, seed=0, guidance_scale=None, fused_cfg=False, **step_kwargs):
    """``run_loop`` passing the churn options to every step; returns the result and the generator."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        if guidance_scale is None:
            x = scheduler.step(dummy_model(x, t), t, x, generator=gen, **step_kwargs).prev_sample
        else:
            u, c = dummy_cfg(x, t)
            if fused_cfg:
                x = scheduler.step_cfg(u, c, guidance_scale, t, x, generator=gen, **step_kwargs).prev_sample
            else:
                x = scheduler.step(u + guidance_scale * (c - u), t, x, generator=gen, **step_kwargs).prev_sample
    return x, gen


def heun_float64(scheduler, steps, x):
    """diffusers' Heun loop (no churn) in float64 arithmetic (diffusers' own casts the sample to
    float32 at every step), on its float32 schedule quantities (the sigmas and the dt it stores)."""
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double().tolist()
    x, d_prev, dt, x_prev = x.double(), None, None, None
    for i, t in enumerate(scheduler.timesteps):
        v = dummy_model(x, t)
        if dt is None:
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            d = (x - (x - v * sigma)) / sigma
            d_prev, dt, x_prev = d, float(np.float32(sigma_next - sigma)), x
            x = x + d * dt
        else:
            d = 0.5 * (d_prev + (x - (x - v * sigmas[i])) / sigmas[i])
            x = x_prev + d * dt
            d_prev = dt = x_prev = None
    return x


@pytest.mark.parametrize("config", [{}, dict(shift=3.0), dict(shift=7.5, num_train_timesteps=500)])
@pytest.mark.parametrize("steps", [1, 4, 9, 25])
def test_parity(config, steps):
    assert_parity(KD, DF, config, steps=steps)


def test_few_steps_are_held_to_float64():
    # With shift 1 and 2 steps the corrector runs at sigma = 0.001 after a step of ~1: diffusers
    # forms its derivative as (x - (x - sigma * v)) / sigma in float32, an error of ~eps * |x| /
    # sigma, and lands 2e-5 from the float64 loop. kdfast reads v itself: it is held to float64.
    x = initial_sample()
    truth = heun_float64(DF(), 2, x)
    assert parity_error(run_loop(DF(), 2, x), truth) > 1e-5
    assert parity_error(run_loop(KD(), 2, x), truth) <= 1e-6
    # the float64 reference is diffusers' loop: it agrees where diffusers' float32 is accurate
    assert parity_error(run_loop(DF(shift=3.0), 25, x), heun_float64(DF(shift=3.0), 25, x)) <= 1e-6
    # and a float64 kdfast loop computes in float64
    assert run_loop(KD(), 2, x.double()).dtype == torch.float64
    assert parity_error(run_loop(KD(), 2, x.double()), truth) <= 1e-12


def test_schedules_equal_diffusers_bit_for_bit():
    for config in ({}, dict(shift=3.0), dict(shift=0.4, num_train_timesteps=250)):
        df, kd = DF(**config), KD(**config)
        # the training schedule of __init__
        assert torch.equal(kd.sigmas, df.sigmas) and torch.equal(kd.timesteps, df.timesteps)
        assert (kd.sigma_min, kd.sigma_max) == (df.sigma_min, df.sigma_max)
        for n in (1, 2, 7, 30):
            df.set_timesteps(n)
            kd.set_timesteps(n)
            assert torch.equal(kd.sigmas, df.sigmas) and torch.equal(kd.timesteps, df.timesteps), (config, n)
            assert len(kd.timesteps) == 2 * n - 1 and kd.num_inference_steps == df.num_inference_steps == n


@pytest.mark.parametrize("churn", CHURNS)
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_churn_parity_and_draws(churn, steps):
    x = initial_sample()
    expected, df_gen = churn_loop(DF(shift=3.0), steps, x, **churn)
    got, kd_gen = churn_loop(KD(shift=3.0), steps, x, **churn)
    assert parity_error(got, expected) <= 1e-5
    # draw for draw: both stages draw while churning, as in diffusers
    assert torch.equal(kd_gen.get_state(), df_gen.get_state())
    if churn["s_churn"] > 0 and steps > 1:
        other, _ = churn_loop(KD(shift=3.0), steps, x, seed=1, **churn)
        assert parity_error(other, got) > 1e-3  # the noise follows the generator
        plain = run_loop(KD(shift=3.0), steps, x)
        assert parity_error(plain, got) > 1e-3  # and the churn acted


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("churn", [{}, dict(s_churn=1.0)])
def test_low_precision_keeps_dtype_and_matches(dtype, churn):
    x = initial_sample()
    truth, _ = churn_loop(DF(shift=3.0), 8, x, **churn)
    expected, _ = churn_loop(DF(shift=3.0), 8, x.to(dtype), **churn)
    got, _ = churn_loop(KD(shift=3.0), 8, x.to(dtype), **churn)
    assert got.dtype == expected.dtype == dtype
    err, base_err = parity_error(got, truth), parity_error(expected, truth)
    assert err <= 2 * base_err + 1e-4, (err, base_err)
    if not churn:
        assert_parity(KD, DF, {}, steps=9, dtype=dtype)


def test_churn_noise_is_drawn_in_the_model_dtype():
    # torch draws float16 and float32 normals alike only for sizes that are multiples of 16:
    # 2 x 4 x 5 x 5 latents show a draw in another dtype than diffusers' (the model output's)
    x = initial_sample((2, 4, 5, 5))
    expected, _ = churn_loop(DF(shift=3.0), 3, x.half(), s_churn=1.0)
    got, _ = churn_loop(KD(shift=3.0), 3, x.half(), s_churn=1.0)
    float32_draws, _ = churn_loop(DF(shift=3.0), 3, x, s_churn=1.0)
    # the same draws: float16 roundings apart; other draws: O(1) apart
    assert parity_error(got, expected) <= 5e-3 < parity_error(float32_draws, expected)


@pytest.mark.parametrize("churn", [{}, dict(s_churn=1.0)])
def test_mixed_dtypes_like_diffusers(churn):
    # float16 latents, float32 model output: diffusers returns float32 results of float32 precision
    outs = []
    for s in (DF(shift=3.0), KD(shift=3.0)):
        s.set_timesteps(3)
        x, gen = initial_sample(dtype=torch.float16), torch.Generator().manual_seed(0)
        for t in s.timesteps[:2]:  # both stages, each from float16 latents
            x = s.step(dummy_model(x.float(), t), t, x.half(), generator=gen, **churn).prev_sample
            outs.append(x)
    for got, expected in zip(outs[2:], outs[:2]):
        assert got.dtype == expected.dtype == torch.float32
        assert parity_error(got, expected) <= 1e-6


@pytest.mark.parametrize("churn", [{}, dict(s_churn=2.0)])
def test_guidance_fused(churn):
    x = initial_sample()
    expected, _ = churn_loop(DF(shift=3.0), 6, x, guidance_scale=4.0, **churn)
    fused, _ = churn_loop(KD(shift=3.0), 6, x, guidance_scale=4.0, fused_cfg=True, **churn)
    unfused, _ = churn_loop(KD(shift=3.0), 6, x, guidance_scale=4.0, **churn)
    assert parity_error(fused, expected) <= 1e-5
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-6)
    if not churn:
        assert_parity(KD, DF, dict(shift=3.0), steps=7, guidance_scale=3.0)


def test_two_stages_and_state():
    kd = KD(shift=3.0)
    kd.set_timesteps(4)
    assert kd.order == 2 and len(kd.timesteps) == 7 and len(kd.sigmas) == 8
    x = initial_sample(dtype=torch.float16)
    t = kd.timesteps[0]
    assert kd.state_in_first_order and kd.sample is None and kd.prev_derivative is None
    y = kd.step(dummy_model(x, t), t, x).prev_sample
    # the predictor's input in float32, as diffusers keeps it (a float32 input itself, below)
    assert not kd.state_in_first_order and kd.sample.dtype == torch.float32 and torch.equal(kd.sample, x.float())
    assert kd.prev_derivative.dtype == torch.float32  # as diffusers keeps it
    assert kd.dt == pytest.approx(float(kd.sigmas[1] - kd.sigmas[0]), abs=0)
    t = kd.timesteps[1]
    kd.step(dummy_model(y, t), t, y)
    assert kd.state_in_first_order and kd.prev_derivative is None and kd.sample is None and kd.dt is None


def test_churned_state_equals_diffusers():
    # with churn the predictor's sample is x + c * noise: not stored, computed when read
    df, kd = DF(shift=3.0), KD(shift=3.0)
    x = initial_sample()
    for s in (df, kd):
        s.set_timesteps(5)
        t = s.timesteps[0]
        s.step(dummy_model(x, t), t, x, s_churn=3.0, generator=torch.Generator().manual_seed(3))
    assert kd.sample.dtype == torch.float32
    torch.testing.assert_close(kd.sample, df.sample, rtol=0, atol=1e-6)
    torch.testing.assert_close(kd.prev_derivative, df.prev_derivative, rtol=0, atol=1e-5)
    assert kd.dt == float(df.dt)


@pytest.mark.parametrize("start", [4, 3])
def test_set_begin_index(start):
    # img2img: diffusers' pipelines start at t_start * order (even: a predictor); an odd start
    # (a predictor between two equal sigmas) is followed as diffusers follows it
    x = initial_sample()
    outs = []
    for s in (DF(shift=3.0), KD(shift=3.0)):
        s.set_timesteps(6)
        s.set_begin_index(start)
        assert s.begin_index == start
        y = s.scale_noise(x, s.timesteps[start:start + 1], initial_sample(seed=4))
        for t in s.timesteps[start:]:
            y = s.step(dummy_model(y, t), t, y).prev_sample
        outs.append(y)
        assert s.step_index == len(s.timesteps)
    assert parity_error(outs[1], outs[0]) <= 1e-5


def test_scale_noise_matches_diffusers():
    x, noise = initial_sample(), initial_sample(seed=1)
    for s_kwargs in ({}, dict(begin_index=5)):
        df, kd = DF(shift=3.0), KD(shift=3.0)
        for s in (df, kd):
            s.set_timesteps(8)
            if s_kwargs:
                s.set_begin_index(s_kwargs["begin_index"])
        a = df.scale_noise(x, df.timesteps[3], noise)
        b = kd.scale_noise(x, kd.timesteps[3], noise)
        assert torch.equal(a, b)
        # diffusers' Heun sets the step index here: of a repeated timestep, the second match
        assert kd.step_index == df.step_index == s_kwargs.get("begin_index", 4)
    # before set_timesteps, on the training schedule (no repeated timesteps, so no stages: an
    # odd position was refused as a second stage)
    for position in (10, 11):
        df, kd = DF(shift=3.0), KD(shift=3.0)
        assert torch.equal(kd.scale_noise(x, kd.timesteps[position], noise),
                           df.scale_noise(x, df.timesteps[position], noise))
        assert kd.step_index == df.step_index == position


def test_outputs_and_return_dict():
    df, kd = DF(shift=3.0), KD(shift=3.0)
    x = initial_sample()
    for s in (df, kd):
        s.set_timesteps(3)
    for i in range(2):
        t = df.timesteps[i]
        m = dummy_model(x, t)
        a, b = df.step(m, t, x), kd.step(m, kd.timesteps[i], x, return_dict=i == 0)
        if i == 0:
            assert list(b.keys()) == list(a.keys()) == ["prev_sample"] and len(b.to_tuple()) == 1
            torch.testing.assert_close(b["prev_sample"], a.prev_sample, rtol=0, atol=1e-6)
        else:
            assert isinstance(b, tuple) and len(b) == 1
            torch.testing.assert_close(b[0], a.prev_sample, rtol=0, atol=1e-6)


def test_config_round_trip(tmp_path):
    df = DF(shift=3.0, num_train_timesteps=800)
    kd = KD.from_config(df.config)
    assert settings(kd.config) == settings(df.config)
    kd.save_pretrained(tmp_path)
    again = DF.from_pretrained(tmp_path)
    assert settings(again.config) == settings(df.config)
    df.save_pretrained(tmp_path / "df")
    back = KD.from_pretrained(tmp_path / "df")
    assert settings(back.config) == settings(df.config)
    x = initial_sample()
    assert parity_error(run_loop(back, 5, x), run_loop(DF.from_config(kd.config), 5, x)) <= 1e-5
    assert KD.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=2.0).config).config.shift == 2.0
    assert DF in kd.compatibles and len(kd) == len(df) == 800


def test_kdfast_sample_with_the_scheduler():
    import kdfast

    kd = KD(shift=3.0)
    kd.set_timesteps(6)
    x = initial_sample()
    got = kdfast.sample(lambda x, t: dummy_model(x, t), x, kd, disable=True)
    assert parity_error(got, run_loop(DF(shift=3.0), 6, x)) <= 1e-5


def test_step_path_has_no_host_reads_and_one_fused_call(monkeypatch):
    kd = KD(shift=3.0)
    kd.set_timesteps(5)
    x = initial_sample()
    calls = []
    fused_step = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(1) or fused_step(*a))

    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(list(kd.timesteps)):
        u, c = dummy_cfg(x, t)
        with no_host_reads():
            if i % 3 == 0:
                x = kd.step(u, t, x, s_churn=2.0, generator=gen).prev_sample
            else:
                x = kd.step_cfg(u, c, 2.5, t, x, s_churn=2.0 * (i % 2), generator=gen).prev_sample
        assert len(calls) == i + 1  # one kernel call per stage
    assert torch.isfinite(x).all()


def test_diffusers_nan_cases_are_refused():
    # shift 0: diffusers' schedule is 0 / 0 at sigma 1 (NaN sigmas and timesteps) and its steps
    # return NaN; kdfast refuses the shift
    df = DF(shift=0.0)
    df.set_timesteps(3)
    df.set_begin_index(0)
    x = initial_sample()
    t = df.timesteps[0]
    assert torch.isnan(df.sigmas).any() and torch.isnan(df.step(dummy_model(x, 0.0), t, x).prev_sample).all()
    with pytest.raises(ValueError, match="shift must be > 0"):
        KD(shift=0.0)
    # s_churn <= -(number of sigma intervals) makes sigma_hat 0: diffusers divides by it
    df, kd = DF(shift=3.0), KD(shift=3.0)
    for s in (df, kd):
        s.set_timesteps(3)
    assert not torch.isfinite(df.step(dummy_model(x, t), df.timesteps[0], x, s_churn=-5.0).prev_sample).all()
    with pytest.raises(ValueError, match="s_churn=-5.0"):
        kd.step(dummy_model(x, t), kd.timesteps[0], x, s_churn=-5.0)
    assert kd.step_index == 0 and kd.state_in_first_order  # nothing was stepped


def test_bad_input():
    for bad in (0, -1.0, float("nan"), "3"):
        with pytest.raises(ValueError, match="shift"):
            KD(shift=bad)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        KD(num_train_timesteps=0)
    kd = KD()
    for bad in (0, None, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            kd.set_timesteps(bad)
    x = initial_sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, kd.timesteps[0], x)
    kd.set_timesteps(2)
    with pytest.raises(IndexError, match="timestep 12.5"):
        kd.step(x, 12.5, x)
    with pytest.raises(ValueError, match="integer"):
        kd.step(x, 3, x)
    with pytest.raises(ValueError, match="integer"):
        kd.step(x, torch.tensor(999), x)
    with pytest.raises(ValueError, match="shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(TypeError, match="bogus_option"):
        kd.step_cfg(x, x, 2.0, kd.timesteps[0], x, bogus_option=1)
    with pytest.raises(ValueError, match="guidance_scale"):
        kd.step_cfg(x, x, math.inf, kd.timesteps[0], x)
    y = kd.step(x, kd.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="first stage"):
        kd.step(y[:1], kd.timesteps[1], y[:1])
    for t in kd.timesteps[1:]:
        y = kd.step(dummy_model(y, t), t, y).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(y, kd.timesteps[-1], y)


def test_copies_continue_the_same_loop():
    import copy
    import pickle

    kd = KD(shift=3.0)
    kd.set_timesteps(4)
    x = initial_sample()
    t = kd.timesteps[0]
    y = kd.step(dummy_model(x, t), t, x, s_churn=2.0, generator=torch.Generator().manual_seed(0)).prev_sample
    t = kd.timesteps[1]
    results = []
    for clone in (copy.deepcopy(kd), pickle.loads(pickle.dumps(kd)), kd):
        assert not clone.state_in_first_order
        results.append(clone.step(dummy_model(y, t), clone.timesteps[1], y).prev_sample)
    for r in results[:2]:
        torch.testing.assert_close(r, results[2], rtol=0, atol=0)


ASSIGNED = {
    "slice": lambda ts: ts[4:],  # SDEdit-style: start part-way down the schedule
    "strided": lambda ts: ts[::2],
    "custom": lambda ts: ts[[0, 2, 5, 8]].clone(),
}


@pytest.mark.parametrize("how", [*ASSIGNED, "edited in place", "inference mode"])
def test_assigned_timesteps_and_inference_mode_like_diffusers(how):
    # the schedule a pipeline assigns or edits is followed as diffusers follows it (its step
    # index picks the sigmas); a loop under torch.inference_mode computes the same
    results = []
    for s in (DF(shift=3.0), KD(shift=3.0)):
        s.set_timesteps(6)
        if how in ASSIGNED:
            s.timesteps = ASSIGNED[how](s.timesteps)
        elif how == "edited in place":
            s.timesteps[1] += 30
        x, gen = initial_sample(), torch.Generator().manual_seed(0)
        with torch.inference_mode(how == "inference mode"):
            for t in s.timesteps:
                x = s.step(dummy_model(x, t), t, x, generator=gen).prev_sample
        results.append(x)
    assert parity_error(results[1], results[0]) <= 1e-5


def test_the_churn_window_includes_its_ends():
    # s_tmin / s_tmax equal to schedule sigmas: diffusers' window is closed at both ends
    s = FlowMatchHeunDiscreteScheduler(shift=3.0)
    s.set_timesteps(4)
    sig = s.sigmas.tolist()
    x = initial_sample()
    for lo, hi in [(sig[3], sig[3]), (sig[1], sig[1]), (sig[3], sig[1])]:
        kw = dict(s_churn=5.0, s_tmin=lo, s_tmax=hi)
        expected, df_gen = churn_loop(diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0), 4, x, **kw)
        got, kd_gen = churn_loop(FlowMatchHeunDiscreteScheduler(shift=3.0), 4, x, **kw)
        assert parity_error(got, expected) <= 1e-5, kw
        assert torch.equal(kd_gen.get_state(), df_gen.get_state())
