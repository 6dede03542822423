import copy
import logging
import math
import pickle

import numpy as np
import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.consistency_models import CMStochasticIterativeScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, settings)

DF = diffusers.CMStochasticIterativeScheduler
KD = CMStochasticIterativeScheduler
# A sigma_min for which diffusers' last step computes sqrt(float32(sigma_min)**2 - sigma_min**2) of a
# negative number (about one sigma_min in four does): its samples end all NaN.
NAN_SIGMA_MIN = 0.001135678391959799


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    # diffusers warns at every step when scale_model_input was not called; some loops skip it on purpose
    log = logging.getLogger("diffusers.schedulers.scheduling_consistency_models")
    level = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(level)


def cm_loop(s, x, seed=0, gen=None, guidance_scale=None, fused_cfg=False, begin_index=None, skip_set=False,
            **set_kwargs):
    """The ConsistencyModelPipeline loop (scaled input, ``step(...)[0]``); every step's sample.
    ``skip_set``: no set_timesteps (the constructor's training schedule, or one set before)."""
    if not skip_set:
        s.set_timesteps(**set_kwargs)
    if begin_index is not None:
        s.set_begin_index(begin_index)
    gen = torch.Generator().manual_seed(seed) if gen is None else gen
    x = x * s.init_noise_sigma
    outs = []
    for t in s.timesteps[begin_index or 0:]:
        inp = s.scale_model_input(x, t)
        if guidance_scale is None:
            x = s.step(dummy_model(inp, t), t, x, generator=gen)[0]
        else:
            u, c = dummy_cfg(inp, t)
            if fused_cfg:
                x = s.step_cfg(u, c, guidance_scale, t, x, generator=gen)[0]
            else:
                x = s.step(u + guidance_scale * (c - u), t, x, generator=gen)[0]
        outs.append(x)
    return outs


def assert_loop_parity(config, x=None, tol=1e-5, **kwargs):
    """Every step of the loop within ``tol`` of diffusers', finite, same schedule."""
    x = initial_sample() if x is None else x
    kd, df = KD(**config), DF(**config)
    got, expected = cm_loop(kd, x, **kwargs), cm_loop(df, x, **kwargs)
    assert torch.equal(kd.timesteps, df.timesteps) and kd.timesteps.dtype == df.timesteps.dtype
    assert torch.equal(kd.sigmas, df.sigmas) and kd.sigmas.dtype == df.sigmas.dtype
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.isfinite(a).all()
        assert parity_error(a, b) <= tol, parity_error(a, b)
    return got, expected


CONFIGS = [
    {},
    dict(clip_denoised=False),
    dict(s_noise=1.011, clip_denoised=False),
    dict(sigma_min=0.01, sigma_max=40.0, sigma_data=0.7, rho=5.0, num_train_timesteps=151, clip_denoised=False),
    dict(sigma_min=0.0, rho=3.0, sigma_data=1.0),
    dict(num_train_timesteps=18, s_noise=0.5),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 18])
def test_parity_steps_and_configs(config, steps):
    assert_loop_parity(config, num_inference_steps=steps)


@pytest.mark.parametrize("config", [{}, dict(clip_denoised=False, s_noise=1.005)])
@pytest.mark.parametrize("steps", [4, 25])
def test_parity_with_the_shared_harness(config, steps):
    assert_parity(KD, DF, config, steps=steps)


@pytest.mark.parametrize("timesteps", [
    [22, 0],  # the openai cd_imagenet64_l2 schedule
    [17, 0],
    [39, 30, 12, 3],
    torch.tensor([38, 20, 10, 0]),
    np.array([25, 5]),
    [30.7, 12.2, 0.9],  # truncated to [30, 12, 0], as diffusers does
    [10, -5],  # a negative timestep: sigma beyond sigma_max
    [-3, -5],  # ... twice: the next sigma is clamped to sigma_max
    [39],
    [0],  # one step: no noise drawn
])
@pytest.mark.parametrize("clip_denoised", [True, False])
def test_parity_custom_timesteps(timesteps, clip_denoised):
    assert_loop_parity(dict(clip_denoised=clip_denoised), timesteps=timesteps)
    kd = KD()
    kd.set_timesteps(timesteps=timesteps)
    assert kd.custom_timesteps is True and kd.num_inference_steps is None


@pytest.mark.parametrize("config", [{}, dict(clip_denoised=False, num_train_timesteps=12, s_noise=1.01)])
def test_parity_on_the_training_schedule_without_set_timesteps(config):
    # diffusers steps on the constructor's schedule (float64 sigmas, no final sigma_min); its last
    # step's next sigma is sigmas[-1] (index + 1 reaches num_train_timesteps)
    got, expected = assert_loop_parity(config, skip_set=True)
    assert len(got) == config.get("num_train_timesteps", 40)


def test_schedule_state_matches():
    kd, df = KD(), DF()
    for a, b in ((kd.sigmas, df.sigmas), (kd.timesteps, df.timesteps)):
        assert torch.equal(a, b) and a.dtype == b.dtype == torch.float64
    assert kd.init_noise_sigma == df.init_noise_sigma == 80.0 and type(kd.init_noise_sigma) is float
    assert kd.num_inference_steps is df.num_inference_steps is None
    assert kd.custom_timesteps is df.custom_timesteps is False
    assert kd.is_scale_input_called is df.is_scale_input_called is False
    assert len(kd) == len(df) == 40 and kd.order == df.order == 1
    assert [c.__name__ for c in kd.compatibles] == [c.__name__ for c in df.compatibles]
    for kwargs in (dict(num_inference_steps=5), dict(timesteps=[30, 10]), dict(num_inference_steps=40),
                   dict(timesteps=[39, 38, 0])):
        for s in (kd, df):
            s.set_timesteps(**kwargs)
        assert torch.equal(kd.sigmas, df.sigmas) and kd.sigmas.dtype == df.sigmas.dtype == torch.float32
        assert torch.equal(kd.timesteps, df.timesteps) and kd.timesteps.dtype == df.timesteps.dtype == torch.float64
        # (diffusers keeps the previous num_inference_steps with custom timesteps)
        assert kd.num_inference_steps == df.num_inference_steps
        assert kd.custom_timesteps == df.custom_timesteps
        assert kd.step_index is df.step_index is None and kd.begin_index is df.begin_index is None
    kd = KD(sigma_max=14.0)
    assert kd.init_noise_sigma == 14.0


def test_scalings_and_sigma_to_t_match():
    kd, df = KD(sigma_min=0.01, sigma_data=0.7), DF(sigma_min=0.01, sigma_data=0.7)
    for sigma in (torch.tensor([80.0, 3.0, 0.01]), torch.tensor(2.5, dtype=torch.float64), 0.3):
        for name in ("get_scalings", "get_scalings_for_boundary_condition"):
            for a, b in zip(getattr(kd, name)(sigma), getattr(df, name)(sigma)):
                assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), name
    c_skip, c_out = kd.get_scalings_for_boundary_condition(0.01)
    assert c_skip == 1.0 and c_out == 0.0  # the boundary condition: identity at sigma_min
    for sigmas in (np.array([80.0, 0.5, 0.002]), 3.0, [1.0, 2.0]):
        assert np.array_equal(kd.sigma_to_t(sigmas), df.sigma_to_t(sigmas))


@pytest.mark.parametrize("config, kwargs", [
    ({}, dict(num_inference_steps=7)),
    (dict(s_noise=1.011, sigma_min=NAN_SIGMA_MIN), dict(timesteps=[39, 21, 3])),
    (dict(num_train_timesteps=9, sigma_data=0.3), None),  # the training schedule
    ({}, dict(timesteps=[-3, -5])),
])
def test_every_steps_coefficients_are_diffusers(monkeypatch, config, kwargs):
    # Probes: with x = 1 and m = 0 a step gives c_skip; with x = 0 and m = 1, c_out; with
    # x = m = 0 and unit noise, s_noise * sqrt(sigma_hat**2 - sigma_min**2). diffusers' noise is
    # replaced by that unit noise, and its values must be kdfast's bit for bit (where finite).
    import diffusers.schedulers.scheduling_consistency_models as cm

    noise = []
    monkeypatch.setattr(cm, "randn_tensor", lambda shape, **kw: noise[-1].to(kw["dtype"]))
    one, zero = torch.ones(1, 3), torch.zeros(1, 3)
    probes = [(one, zero, zero), (zero, one, zero), (zero, zero, one)]
    kd, df = KD(clip_denoised=False, **config), DF(clip_denoised=False, **config)
    if kwargs:
        for s in (kd, df):
            s.set_timesteps(**kwargs)
    nan_steps = []
    for i in range(len(kd.timesteps)):
        for x, m, z in probes:
            for s in (kd, df):
                s.set_begin_index(i)
                s._step_index = None
            got = kd.step(m, kd.timesteps[i], x, variance_noise=z).prev_sample
            noise.append(z)
            expected = df.step(m, df.timesteps[i], x).prev_sample
            if torch.isfinite(expected).all():
                assert torch.equal(got, expected), (i, got, expected)
            else:  # NAN_SIGMA_MIN, a step to sigma_min (the last; here the one to timestep 39 too):
                # diffusers takes the root of a negative number; it is 0 here
                assert float(kd.sigmas[i + 1]) == float(kd.sigmas[-1])
                c_skip, c_out = df.get_scalings_for_boundary_condition(df.sigmas[i])
                assert torch.equal(got, zero if z is one else c_skip * x + c_out * m)
                nan_steps.append(i)
    assert nan_steps == ([1] * 3 + [2] * 3 if config.get("sigma_min") == NAN_SIGMA_MIN else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_scale_model_input_bit_for_bit(dtype):
    x = initial_sample(dtype=dtype) * 30
    for kwargs in (dict(num_inference_steps=6), None):  # None: the training schedule (float64 sigmas)
        kd, df = KD(sigma_data=0.3), DF(sigma_data=0.3)
        if kwargs:
            for s in (kd, df):
                s.set_timesteps(**kwargs)
        for k, (t_kd, t_df) in enumerate(zip(kd.timesteps[:5], df.timesteps[:5])):
            a, b = kd.scale_model_input(x, t_kd), df.scale_model_input(x, t_df)
            assert a.dtype == b.dtype == dtype and torch.equal(a, b)
            assert kd.is_scale_input_called and kd.step_index == df.step_index == k
            kd._step_index += 1
            df._step_index += 1


def test_outputs_and_tuples_like_diffusers():
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(3)
    x = initial_sample() * 80.0
    t_kd, t_df = kd.timesteps[0], df.timesteps[0]
    out = kd.step(dummy_model(x, t_kd), t_kd, x, torch.Generator().manual_seed(1))  # generator by position
    out_df = df.step(dummy_model(x, t_df), t_df, x, torch.Generator().manual_seed(1))
    assert list(out.keys()) == list(out_df.keys()) == ["prev_sample"]
    assert out[0] is out.prev_sample is out["prev_sample"] and len(out.to_tuple()) == len(out_df.to_tuple()) == 1
    assert parity_error(out.prev_sample, out_df.prev_sample) <= 1e-5
    assert "CMStochasticIterativeSchedulerOutput(prev_sample=" in repr(out)
    x = out.prev_sample
    got = kd.step(dummy_model(x, kd.timesteps[1]), kd.timesteps[1], x, return_dict=False)
    expected = df.step(dummy_model(x, df.timesteps[1]), df.timesteps[1], x, return_dict=False)
    assert type(got) is tuple and len(got) == len(expected) == 1 and got[0].shape == x.shape
    assert kd.step_index == df.step_index == 2


def test_noise_follows_the_generator_draw_for_draw():
    x = initial_sample()
    a = cm_loop(KD(), x, seed=1, num_inference_steps=4)[-1]
    b = cm_loop(KD(), x, seed=2, num_inference_steps=4)[-1]
    assert parity_error(a, b) > 1e-3
    # diffusers draws at every step, the last one included: the generators end in the same state
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)]
    for s, gen in zip((KD(), DF()), gens):
        cm_loop(s, x, gen=gen, num_inference_steps=3)
    assert torch.equal(torch.randn(4, generator=gens[0]), torch.randn(4, generator=gens[1]))
    # ... and not at all on a one-timestep schedule
    for s in (KD(), DF()):
        gen = torch.Generator().manual_seed(3)
        cm_loop(s, x, gen=gen, num_inference_steps=1)
        assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=torch.Generator().manual_seed(3)))
    # a list of generators draws per batch entry, as diffusers' randn_tensor does
    outs = [cm_loop(s, x, gen=[torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)],
                    num_inference_steps=3)[-1] for s in (KD(), DF())]
    assert parity_error(outs[0], outs[1]) <= 1e-5
    # and without a generator, from torch's global one
    outs = []
    for s in (KD(), DF()):
        s.set_timesteps(2)
        torch.manual_seed(21)
        t = s.timesteps[0]
        outs.append(s.step(dummy_model(x, t), t, x).prev_sample)
    assert parity_error(outs[0], outs[1]) <= 1e-5


def test_variance_noise_replaces_the_draw_and_the_update_by_hand():
    kd = KD(s_noise=1.01, clip_denoised=False, sigma_data=0.6)
    x = initial_sample() * 3
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    outs = []
    for kw in (dict(generator=torch.Generator().manual_seed(7)), dict(variance_noise=z)):
        kd.set_timesteps(4)
        t = kd.timesteps[1]
        kd.set_begin_index(1)
        m = 4 * dummy_model(x, t)
        outs.append(kd.step(m, t, x, **kw).prev_sample)
    assert torch.equal(outs[0], outs[1])
    # x0 = c_skip x + c_out m;  prev = x0 + s_noise sqrt(sigma_next^2 - sigma_min^2) z, in float64
    sigma, sigma_next, smin, sd = float(kd.sigmas[1]), float(kd.sigmas[2]), 0.002, 0.6
    c_skip = sd ** 2 / ((sigma - smin) ** 2 + sd ** 2)
    c_out = (sigma - smin) * sd / math.sqrt(sigma ** 2 + sd ** 2)
    x0 = c_skip * x.double() + c_out * m.double()
    truth = x0 + 1.01 * math.sqrt(sigma_next ** 2 - smin ** 2) * z.double()
    assert parity_error(outs[0], truth) <= 1e-6
    # with clip_denoised, x0 is clamped to [-1, 1] before the noise is added
    kd = KD(s_noise=1.01, clip_denoised=True, sigma_data=0.6)
    kd.set_timesteps(4)
    kd.set_begin_index(1)
    got = kd.step(m, kd.timesteps[1], x, variance_noise=z).prev_sample
    assert x0.abs().max() > 1.5
    assert parity_error(got, x0.clamp(-1, 1) + 1.01 * math.sqrt(sigma_next ** 2 - smin ** 2) * z.double()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config, steps", [({}, 2), ({}, 6), (dict(clip_denoised=False), 5)])
def test_half_precision_keeps_dtype_and_matches(dtype, config, steps):
    got, _ = assert_parity(KD, DF, config, steps=steps, dtype=dtype)
    assert got.dtype == dtype


def test_float64_samples_match_diffusers_float64():
    assert_loop_parity(dict(clip_denoised=False, s_noise=1.003), x=initial_sample().double(), tol=1e-12,
                       num_inference_steps=6)


@pytest.mark.parametrize("sample_dtype, model_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32),
                                                       (torch.bfloat16, torch.float16)])
def test_mixed_dtypes_give_diffusers_dtype(sample_dtype, model_dtype):
    # diffusers draws its noise in the model output's dtype and promotes the two dtypes
    x = (initial_sample() * 2).to(sample_dtype)
    outs = []
    for s in (KD(clip_denoised=False), DF(clip_denoised=False)):
        s.set_timesteps(3)
        t = s.timesteps[1]
        s.set_begin_index(1)
        outs.append(s.step(dummy_model(x.float(), t).to(model_dtype), t, x,
                           generator=torch.Generator().manual_seed(0)).prev_sample)
    assert outs[0].dtype == outs[1].dtype == torch.promote_types(sample_dtype, model_dtype)
    assert parity_error(outs[0], outs[1]) <= 2e-3


@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_noise_is_drawn_in_the_model_outputs_dtype(model_dtype):
    x = initial_sample() * 2
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=model_dtype)
    outs = []
    for kw in (dict(generator=torch.Generator().manual_seed(5)), dict(variance_noise=z)):
        s = KD(clip_denoised=False)
        s.set_timesteps(3)
        t = s.timesteps[0]
        outs.append(s.step(dummy_model(x, t).to(model_dtype), t, x, **kw).prev_sample)
    assert outs[0].dtype == torch.float32 and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("kwargs", [dict(num_inference_steps=2), dict(num_inference_steps=6), dict(timesteps=[30, 8])])
@pytest.mark.parametrize("clip_denoised", [True, False])
def test_fused_guidance_matches_guidance_outside(kwargs, clip_denoised):
    x = initial_sample()
    cfg = dict(clip_denoised=clip_denoised)
    fused = cm_loop(KD(**cfg), x, guidance_scale=3.0, fused_cfg=True, **kwargs)
    unfused = cm_loop(KD(**cfg), x, guidance_scale=3.0, **kwargs)
    expected = cm_loop(DF(**cfg), x, guidance_scale=3.0, **kwargs)
    for a, b, c in zip(fused, unfused, expected):
        assert parity_error(a, b) <= 1e-6 and parity_error(a, c) <= 1e-5


def test_fused_guidance_draws_noise_in_the_guided_outputs_dtype():
    # unfused, uncond (float16) + scale * (cond (float32) - uncond) is float32: so is the draw
    x = initial_sample()
    outs = []
    for fused in (True, False):
        s = KD(clip_denoised=False)
        s.set_timesteps(3)
        t = s.timesteps[0]
        u, c = dummy_model(x, t).half(), dummy_model(0.9 * x, t)
        gen = torch.Generator().manual_seed(2)
        outs.append(s.step_cfg(u, c, 2.5, t, x, generator=gen).prev_sample if fused
                    else s.step(u + 2.5 * (c - u), t, x, generator=gen).prev_sample)
    assert outs[0].dtype == outs[1].dtype == torch.float32 and parity_error(outs[0], outs[1]) <= 1e-6


def test_one_fused_call_per_step_and_no_host_reads(monkeypatch):
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    kd = KD()
    kd.set_timesteps(5)
    x = initial_sample() * kd.init_noise_sigma
    gen = torch.Generator().manual_seed(0)
    inputs = [dummy_cfg(kd.scale_model_input(x, t), t) for t in kd.timesteps]  # made before the host reads are
    kd._step_index = None  # ... forbidden: the first step looks its timestep up again
    calls.clear()

    with no_host_reads():
        for k, (t, (u, c)) in enumerate(zip(kd.timesteps, inputs)):
            before = len(calls)
            if k % 2:
                x = kd.step_cfg(u, c, 2.0, t, x, generator=gen).prev_sample
            else:
                x = kd.step(u, t, x, generator=gen, return_dict=False)[0]
            assert len(calls) == before + 1
    assert len(calls) == 5 and torch.isfinite(x).all()
    # the fused call clamps x0 (clip_denoised) in the kernel and reads the noise: nothing else runs
    assert all(a[8] == 1.0 and a[7] is not None for a in calls[:-1])


def test_set_begin_index_timestep_lookup_and_assigned_timesteps():
    x = initial_sample()
    assert_loop_parity({}, x, begin_index=2, num_inference_steps=6)
    kd = KD()
    kd.set_timesteps(4)
    assert kd.index_for_timestep(kd.timesteps[2]) == 2 and kd.index_for_timestep(float(kd.timesteps[1])) == 1
    with pytest.raises(IndexError, match="not one of the schedule"):
        kd.step(x, 0.123, x)
    # a loop over a slice of the schedule assigned back, as diffusers runs it: its first step
    # uses sigmas[0] (the sigmas stay), the lookup is in the new timesteps
    outs = []
    for s in (KD(clip_denoised=False), DF(clip_denoised=False)):
        s.set_timesteps(6)
        s.timesteps = s.timesteps[2:]
        gen = torch.Generator().manual_seed(0)
        y = x
        for t in s.timesteps:
            y = s.step(dummy_model(s.scale_model_input(y, t), t), t, y, generator=gen).prev_sample
        outs.append(y)
    assert parity_error(outs[0], outs[1]) <= 1e-5


def test_add_noise_matches():
    x, noise = initial_sample((3, 4, 8, 8)), initial_sample((3, 4, 8, 8), seed=1)
    for setup in (lambda s: s.set_timesteps(5), lambda s: None):
        kd, df = KD(), DF()
        setup(kd)
        setup(df)
        t = kd.timesteps[[0, 3, 2]].clone()
        assert torch.equal(kd.add_noise(x[:3], noise[:3], t), df.add_noise(x[:3], noise[:3], t))
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(5)
        s.set_begin_index(2)
    t = kd.timesteps[:2].clone()
    assert torch.equal(kd.add_noise(x[:2], noise[:2], t), df.add_noise(x[:2], noise[:2], t))


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = KD(sigma_min=0.01, sigma_max=40.0, sigma_data=0.7, s_noise=1.007, rho=5.0, clip_denoised=False,
            num_train_timesteps=151)
    kd.save_pretrained(tmp_path)
    again = KD.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert settings(df.config) == settings(kd.config)
    df.save_pretrained(tmp_path / "df")
    back = KD.from_pretrained(tmp_path / "df")
    assert settings(back.config) == settings(kd.config)
    assert settings(KD.from_config(df.config).config) == settings(df.config)
    assert KD.from_config(DF().config).config.num_train_timesteps == 40
    x = initial_sample()
    got, expected = cm_loop(back, x, num_inference_steps=5), cm_loop(df, x, num_inference_steps=5)
    assert parity_error(got[-1], expected[-1]) <= 1e-5


def test_bad_config_values_are_named():
    for kwargs, match in [
        (dict(num_train_timesteps=1), "num_train_timesteps must be an integer >= 2"),
        (dict(num_train_timesteps=40.0), "num_train_timesteps must be an integer >= 2"),
        (dict(sigma_min=-0.1), "need 0 <= sigma_min < sigma_max"),
        (dict(sigma_min=90.0), "need 0 <= sigma_min < sigma_max"),
        (dict(sigma_max=float("inf")), "sigma_max must be a finite number"),
        (dict(sigma_min="0.002"), "sigma_min must be a finite number"),
        (dict(sigma_data=0.0), "sigma_data must be > 0"),
        (dict(sigma_data=float("nan")), "sigma_data must be a finite number"),
        (dict(rho=0.0), "rho must be > 0"),
        (dict(s_noise=float("inf")), "s_noise must be a finite number"),
        (dict(clip_denoised="yes"), "clip_denoised must be True or False"),
    ]:
        with pytest.raises(ValueError, match=match):
            KD(**kwargs)


def test_where_diffusers_is_nan_kdfast_raises():
    # each setting refused above makes diffusers' samples NaN / infinite, or its schedule fail
    x = initial_sample()

    def last_sample(s, **kwargs):
        return cm_loop(s, x, **kwargs)[-1]

    df = DF(num_train_timesteps=1)
    with pytest.warns(RuntimeWarning, match="invalid value"):
        df.set_timesteps(1)
    assert torch.isnan(df.sigmas[0])  # 0 / (num_train_timesteps - 1)
    df = DF(sigma_min=-0.1)  # a negative number to the power 1 / rho: complex sigmas and timesteps
    assert df.timesteps.is_complex() and df.sigmas.is_complex()
    assert torch.isnan(last_sample(DF(sigma_min=90.0), num_inference_steps=3)).all()
    assert not torch.isfinite(last_sample(DF(s_noise=float("inf")), num_inference_steps=3)).all()
    with pytest.raises(ZeroDivisionError):
        DF(rho=0.0)
    # sigma_data = 0: c_out = 0, the model is ignored and every sample collapses to ~0 (or 0 / 0)
    assert last_sample(DF(sigma_data=0.0, clip_denoised=False), num_inference_steps=1).abs().max() < 1e-6
    # a custom timestep whose sigma overflows float32
    with pytest.warns(RuntimeWarning):
        df = DF()
        df.set_timesteps(timesteps=[-10 ** 9])
    assert torch.isinf(df.sigmas[0])
    t = df.timesteps[0]
    assert torch.isnan(df.step(torch.zeros_like(x), t, df.scale_model_input(x, t)).prev_sample).all()
    with pytest.raises(ValueError, match="beyond float32 range"):
        KD().set_timesteps(timesteps=[-10 ** 9])
    for kwargs in (dict(num_train_timesteps=1), dict(sigma_min=-0.1), dict(sigma_min=90.0), dict(rho=0.0),
                   dict(s_noise=float("inf")), dict(sigma_data=0.0)):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            KD(**kwargs)


@pytest.mark.parametrize("steps", [2, 5])
def test_where_diffusers_last_step_is_nan_kdfast_adds_no_noise(steps):
    # diffusers' last step adds s_noise * sqrt(sigma_hat**2 - sigma_min**2) * z with sigma_hat =
    # float32(sigma_min); in float32 that is the root of a negative number for this sigma_min
    config = dict(sigma_min=NAN_SIGMA_MIN, clip_denoised=False)
    x = initial_sample()
    expected = cm_loop(DF(**config), x, num_inference_steps=steps)
    assert torch.isnan(expected[-1]).all() and all(torch.isfinite(e).all() for e in expected[:-1])
    kd = KD(**config)
    got = cm_loop(kd, x, num_inference_steps=steps)
    assert all(torch.isfinite(g).all() for g in got)
    for a, b in zip(got[:-1], expected[:-1]):
        assert parity_error(a, b) <= 1e-5
    # the last step is the exact one: x0 itself (the noise's scale is sqrt(0))
    prev, t = got[-2], kd.timesteps[-1]
    c_skip, c_out = DF(**config).get_scalings_for_boundary_condition(kd.sigmas[-2])
    m = dummy_model(prev / float(((kd.sigmas[-2] ** 2 + 0.25) ** 0.5)), t)
    assert parity_error(got[-1], c_skip * prev + c_out * m) <= 1e-6
    # the generator is still drawn from at that step, as diffusers draws
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)]
    cm_loop(KD(**config), x, gen=gens[0], num_inference_steps=steps)
    cm_loop(DF(**config), x, gen=gens[1], num_inference_steps=steps)
    assert torch.equal(torch.randn(3, generator=gens[0]), torch.randn(3, generator=gens[1]))


def test_bad_set_timesteps_arguments():
    kd = KD(num_train_timesteps=10)
    for kwargs, match in [
        (dict(), "Exactly one of `num_inference_steps` or `timesteps`"),
        (dict(num_inference_steps=3, timesteps=[5, 0]), "Can only pass one of"),
        (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
        (dict(num_inference_steps=2.5), "num_inference_steps must be an integer >= 1"),
        (dict(num_inference_steps=11), "cannot be larger than `self.config.train_timesteps`: 10"),
        (dict(timesteps=[3, 5]), "must be in descending order"),
        (dict(timesteps=[5, 5]), "must be in descending order"),
        (dict(timesteps=[10, 0]), "must start before `self.config.train_timesteps`: 10"),
        (dict(timesteps=[]), "timesteps must be a non-empty 1-D sequence"),
        (dict(timesteps=[[5, 0]]), "timesteps must be a non-empty 1-D sequence"),
        (dict(timesteps=[float("nan"), 0]), "timesteps must be finite"),
        (dict(timesteps=["a", "b"]), "timesteps must be a 1-D sequence of numbers"),
    ]:
        with pytest.raises(ValueError, match=match):
            kd.set_timesteps(**kwargs)
    # a refused schedule leaves the scheduler as it was
    assert kd.num_inference_steps is None and kd.custom_timesteps is False and len(kd.timesteps) == 10


def test_bad_step_input():
    kd = KD()
    kd.set_timesteps(2)
    x = initial_sample()
    t = kd.timesteps[0]
    with pytest.raises(ValueError, match="integer indices"):
        kd.step(x, 0, x)
    with pytest.raises(ValueError, match="integer indices"):
        kd.step(x, torch.tensor(3), x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], t, x)
    with pytest.raises(TypeError, match="model_output and sample must be torch.Tensor"):
        kd.step(x.numpy(), t, x)
    with pytest.raises(TypeError, match="sample must be a floating-point tensor"):
        kd.step(x, t, x.long())
    with pytest.raises(TypeError, match="model_output must be a floating-point tensor"):
        kd.step(x.int(), t, x)
    with pytest.raises(ValueError, match=r"variance_noise must be a tensor of the sample's shape \(2, 4, 8, 8\)"):
        kd.step(x, t, x, variance_noise=x[:1])
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), t, x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step_cfg(x, x[:1], 2.0, t, x)
    with pytest.raises(TypeError, match="unexpected step arguments: eta"):
        kd.step_cfg(x, x, 2.0, t, x, eta=0.5)
    with pytest.raises(TypeError, match="bogus_option"):
        kd.step(x, t, x, bogus_option=1)
    with pytest.raises(TypeError, match="bogus_option"):
        DF().step(x, t, x, bogus_option=1)
    assert kd.step_index in (None, 0)  # nothing was stepped
    for t in kd.timesteps:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end of the 2-step schedule"):
        kd.step(x, kd.timesteps[-1], x)
    # timesteps assigned longer than the sigmas: no next sigma (diffusers: IndexError too)
    kd = KD()
    kd.set_timesteps(3)
    kd.timesteps = torch.cat([kd.timesteps, kd.timesteps[-1:] - 50])
    kd.set_begin_index(3)
    with pytest.raises(IndexError, match="step 3 has no next sigma"):
        kd.step(x, kd.timesteps[3], x)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    s = KD()
    s.set_timesteps(5)
    x = initial_sample() * 80.0
    x = s.step(dummy_model(x, s.timesteps[0]), s.timesteps[0], x, generator=torch.Generator().manual_seed(0))[0]
    twin = copy.deepcopy(s) if how == "deepcopy" else pickle.loads(pickle.dumps(s))
    assert dict(twin.config) == dict(s.config) and twin.step_index == s.step_index == 1
    for i, t in enumerate(s.timesteps[1:]):
        a = s.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        b = twin.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        assert torch.equal(a, b)
        x = a


def test_a_loop_under_inference_mode_equals_one_under_no_grad():
    outs = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            outs.append(cm_loop(KD(), initial_sample(), num_inference_steps=4))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
