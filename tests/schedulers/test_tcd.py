import logging

import pytest
import torch

from kdfast.schedulers.tcd import TCDScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, settings)

DF = diffusers.TCDScheduler


@pytest.fixture(autouse=True)
def _quiet_schedule_warnings():
    # both libraries warn about off-schedule custom timesteps; the tests use them on purpose
    names = ("kdfast.schedulers.lcm", "diffusers.schedulers.scheduling_tcd")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    yield
    for n, level in zip(names, levels):
        logging.getLogger(n).setLevel(level)


def tcd_loop(scheduler, steps, x, eta=0.3, seed=0, guidance_scale=None, fused=False, **set_kwargs):
    scheduler.set_timesteps(steps, **set_kwargs)
    gen = torch.Generator().manual_seed(seed)
    noised = []
    for t in scheduler.timesteps:
        if guidance_scale is None:
            out = scheduler.step(dummy_model(x, t), t, x, eta=eta, generator=gen)
        else:
            u, c = dummy_cfg(x, t)
            out = (scheduler.step_cfg(u, c, guidance_scale, t, x, eta=eta, generator=gen) if fused
                   else scheduler.step(u + guidance_scale * (c - u), t, x, eta=eta, generator=gen))
        x = out.prev_sample
        noised.append(out.pred_noised_sample)
    return x, noised


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 25])
def test_parity_prediction_types_and_steps(prediction_type, steps):
    assert_parity(TCDScheduler, DF, dict(prediction_type=prediction_type), steps=steps)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 9])
def test_parity_eta(eta, steps):
    x = initial_sample()
    want, want_noised = tcd_loop(DF(), steps, x, eta=eta)
    got, got_noised = tcd_loop(TCDScheduler(), steps, x, eta=eta)
    assert parity_error(got, want) <= 1e-5
    for a, b in zip(got_noised, want_noised):
        assert parity_error(a, b) <= 1e-5
    if eta > 0 and steps > 1:  # the noise follows the generator
        other, _ = tcd_loop(TCDScheduler(), steps, x, eta=eta, seed=1)
        assert parity_error(other, got) > 1e-3


@pytest.mark.parametrize("config", [
    dict(timestep_scaling=2.5, set_alpha_to_one=False),
    dict(original_inference_steps=100, steps_offset=1),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="trailing"),
    dict(clip_sample=True, thresholding=True),  # recorded, not applied by the step (as in diffusers)
])
def test_parity_configs(config):
    assert_parity(TCDScheduler, DF, config, steps=6)


@pytest.mark.parametrize("kwargs", [
    dict(original_inference_steps=20),  # TCD: every training timestep is a candidate then
    dict(strength=0.6),
    dict(strength=0.3, original_inference_steps=30),
])
def test_parity_set_timesteps_options(kwargs):
    assert_parity(TCDScheduler, DF, {}, steps=5, **kwargs)
    df, kd = DF(), TCDScheduler()
    df.set_timesteps(5, **kwargs)
    kd.set_timesteps(5, **kwargs)
    assert torch.equal(kd.timesteps, df.timesteps)


def test_custom_timesteps():
    x = initial_sample()
    want, _ = tcd_loop(DF(), None, x, timesteps=[999, 759, 499, 259])
    got, _ = tcd_loop(TCDScheduler(), None, x, timesteps=[999, 759, 499, 259])
    assert parity_error(got, want) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    assert_parity(TCDScheduler, DF, {}, steps=8, dtype=dtype)


def test_guidance_fused():
    x = initial_sample()
    want, _ = tcd_loop(DF(), 6, x, eta=0.5, guidance_scale=3.0)
    got, _ = tcd_loop(TCDScheduler(), 6, x, eta=0.5, guidance_scale=3.0, fused=True)
    assert parity_error(got, want) <= 1e-5


def test_outputs_and_tuple():
    kd, df = TCDScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(4)
    x = initial_sample()
    t = kd.timesteps[0]
    a = kd.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(0), return_dict=False)
    b = df.step(dummy_model(x, t), df.timesteps[0], x, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert len(a) == len(b) == 2
    for u, v in zip(a, b):
        assert parity_error(u, v) <= 1e-5
    out = kd.step(dummy_model(x, t), kd.timesteps[1], x, eta=0.0)
    assert list(out.keys()) == ["prev_sample", "pred_noised_sample"]
    assert out.prev_sample is out.pred_noised_sample  # eta = 0: the same tensor, one output written


def test_one_fused_pass_per_step_and_no_host_reads(monkeypatch):
    import kdfast.schedulers.base as base

    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(1) or real(*a))
    kd = TCDScheduler()
    kd.set_timesteps(6)
    x = initial_sample()
    outputs = [dummy_model(x, t) for t in kd.timesteps]
    gen = torch.Generator().manual_seed(0)
    with no_host_reads():
        for t, o in zip(kd.timesteps, outputs):
            x = kd.step(o, t, x, generator=gen).prev_sample
    assert len(calls) == 6 and torch.isfinite(x).all()


def test_config_round_trip(tmp_path):
    df = DF(prediction_type="v_prediction", original_inference_steps=40)
    kd = TCDScheduler.from_config(df.config)
    assert settings(kd.config) == settings(df.config)
    kd.save_pretrained(tmp_path)
    assert settings(DF.from_pretrained(tmp_path).config) == settings(df.config)
    from kdfast.schedulers import from_diffusers

    assert type(from_diffusers(df)) is TCDScheduler


def test_bad_input():
    kd = TCDScheduler()
    x = initial_sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, 999, x)
    kd.set_timesteps(4)
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="eta"):
            kd.step(x, kd.timesteps[0], x, eta=eta)
    with pytest.raises(ValueError, match="shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(TypeError, match="bogus"):
        kd.step_cfg(x, x, 2.0, kd.timesteps[0], x, bogus=1)
    for t in kd.timesteps:
        x = kd.step(x, t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)


def test_get_variance_like_diffusers():
    # a private method, but CycleDiffusion's helpers call it on whatever scheduler the pipeline holds
    for config in ({}, dict(set_alpha_to_one=False)):
        kd, df = TCDScheduler(**config), DF(**config)
        for t, prev in ((500, 480), (torch.tensor(999), torch.tensor(949)), (20, -1), (0, -1)):
            a, b = kd._get_variance(t, prev), df._get_variance(t, prev)
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_epsilon_at_zero_terminal_snr_is_refused_without_suggesting_clipping():
    # TCD's step applies neither clip_sample nor thresholding, so the error does not offer them
    s = TCDScheduler(rescale_betas_zero_snr=True, clip_sample=True, timestep_spacing="trailing")
    s.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="defines no x0 \\(diffusers' step") as err:
        s.step(torch.sin(x), s.timesteps[0], x)
    assert "clip_sample" not in str(err.value) and "v_prediction" in str(err.value)


def test_eta_09_at_previous_timesteps_that_are_multiples_of_10():
    # s = floor((1 - eta) * prev_t) in float32 as diffusers computes it: at eta 0.9 and prev_t 500
    # or 100, float64 gives another integer (the default schedules' timesteps all end in 9)
    kd, df = TCDScheduler(), DF()
    kd.set_timesteps(timesteps=[999, 500, 100])
    df.set_timesteps(timesteps=[999, 500, 100])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    y = x.clone()
    for t in df.timesteps:
        m = torch.randn(1, 4, 8, 8, generator=gen)
        x = kd.step(m, t, x, eta=0.9, generator=torch.Generator().manual_seed(int(t))).prev_sample
        y = df.step(m, t, y, eta=0.9, generator=torch.Generator().manual_seed(int(t))).prev_sample
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
