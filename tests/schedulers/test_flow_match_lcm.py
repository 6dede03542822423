import math

import numpy as np
import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.flow_match_lcm import FlowMatchLCMScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

DF = diffusers.FlowMatchLCMScheduler
KD = FlowMatchLCMScheduler
FLUX = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)


def loop_with_generator(scheduler, steps, x, seed=0, **set_kwargs):
    """``run_loop`` that also returns the generator, to compare draws."""
    scheduler.set_timesteps(steps, **set_kwargs)
    gen = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        x = scheduler.step(dummy_model(x, t), t, x, generator=gen).prev_sample
    return x, gen


@pytest.mark.parametrize("config", [
    {},
    dict(shift=3.0),
    dict(shift=3.0, use_karras_sigmas=True),
    dict(shift=2.0, use_exponential_sigmas=True),
    dict(shift=2.0, use_beta_sigmas=True),
    dict(shift=1.0, shift_terminal=0.1),
    dict(invert_sigmas=True),
    dict(shift=5.0, num_train_timesteps=500),
])
@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_parity(config, steps):
    if steps == 1 and "shift_terminal" in config:
        return  # test_diffusers_nan_schedule_is_refused
    assert_parity(KD, DF, config, steps=steps)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("mu", [0.5, 1.15])
def test_parity_dynamic_shifting(time_shift_type, mu):
    config = dict(FLUX, time_shift_type=time_shift_type)
    assert_parity(KD, DF, config, steps=4, mu=mu)
    sigmas = np.linspace(1.0, 1 / 5, 5).tolist()  # a pipeline's own sigmas with mu
    assert_parity(KD, DF, config, steps=5, mu=mu, sigmas=sigmas)
    assert_parity(KD, DF, dict(config, shift_terminal=0.05, use_karras_sigmas=True), steps=3, mu=mu)


@pytest.mark.parametrize("kwargs", [
    dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1]),
    dict(timesteps=[1000.0, 750.0, 500.0, 250.0]),
    dict(sigmas=[1.0, 0.6, 0.2], timesteps=[999.0, 600.0, 200.0]),
    dict(sigmas=[0.9]),
])
def test_custom_sigmas_and_timesteps(kwargs):
    assert_parity(KD, DF, dict(shift=3.0), steps=None, **kwargs)


def test_schedules_equal_diffusers_bit_for_bit():
    for config, kwargs in ((dict(shift=3.0), dict(num_inference_steps=4)),
                           (FLUX, dict(num_inference_steps=3, mu=0.9)),
                           (dict(shift=3.0), dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1])),
                           (dict(shift=3.0), dict(timesteps=[1000.0, 750.0, 500.0, 250.0])),
                           (dict(shift_terminal=0.05, use_karras_sigmas=True), dict(num_inference_steps=6)),
                           (dict(invert_sigmas=True), dict(num_inference_steps=3))):
        df, kd = DF(**config), KD(**config)
        df.set_timesteps(**kwargs)
        kd.set_timesteps(**kwargs)
        assert torch.equal(kd.sigmas, df.sigmas) and torch.equal(kd.timesteps, df.timesteps), (config, kwargs)
    df, kd = DF(shift=3.0), KD(shift=3.0)  # the training schedule of __init__
    assert torch.equal(kd.sigmas, df.sigmas) and torch.equal(kd.timesteps, df.timesteps)
    assert (kd.sigma_min, kd.sigma_max) == (df.sigma_min, df.sigma_max)


def test_fp32_loop_is_bit_identical_to_diffusers():
    # x0 = x - sigma * v, then (1 - sigma_next) * x0 + sigma_next * noise, in float32 with
    # diffusers' float32 coefficients: the same rounding, not just 1e-5
    for config, steps in ((dict(shift=3.0), 4), (dict(invert_sigmas=True), 3)):
        x = initial_sample()
        assert torch.equal(run_loop(KD(**config), steps, x), run_loop(DF(**config), steps, x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(shift=3.0), dict(shift=3.0, scale_factors=[1.5, 2.0])])
def test_low_precision_keeps_dtype_and_matches(dtype, config):
    assert_parity(KD, DF, config, steps=3, dtype=dtype)


def test_noise_is_float32_for_half_latents_as_in_diffusers():
    # torch draws float16 and float32 normals alike only for sizes that are multiples of 16:
    # 2 x 4 x 5 x 5 latents show a draw in another dtype
    assert_parity(KD, DF, dict(shift=3.0), steps=3, dtype=torch.float16, shape=(2, 4, 5, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resizing_reads_float32_x0_like_diffusers(dtype, monkeypatch):
    # diffusers resizes a float32 x0 (it upcasts the latents): so does kdfast, whatever their dtype
    seen = {}
    interpolate = torch.nn.functional.interpolate

    def recording(x, *args, **kwargs):
        seen.setdefault(current, []).append(x.dtype)
        return interpolate(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", recording)
    for current in (DF, KD):
        run_loop(current(scale_factors=[1.5, 2.0]), 3, initial_sample(dtype=dtype))
    assert seen[KD] == seen[DF] == [torch.float32, torch.float32]


@pytest.mark.parametrize("scale_factors", [None, [1.5, 1.0]])
def test_mixed_dtypes_like_diffusers(scale_factors):
    # float16 latents, float32 model output: diffusers returns a float32 result of float32 precision
    x = initial_sample(dtype=torch.float16)
    a, b = DF(shift=3.0, scale_factors=scale_factors), KD(shift=3.0, scale_factors=scale_factors)
    for s in (a, b):
        s.set_timesteps(3)
    t = a.timesteps[0]
    m = dummy_model(x.float(), t)
    got = b.step(m, b.timesteps[0], x, generator=torch.Generator().manual_seed(0)).prev_sample
    expected = a.step(m, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected)


def test_float64_loop_is_float64():
    # diffusers casts float64 latents to float32 at every step (and draws float64 noise for a
    # float64 model output); kdfast computes them in float64, with diffusers' float32 schedule
    # quantities (sigmas, 1 - sigma_next) as coefficients
    kd = KD(shift=3.0)
    x = initial_sample().double()
    got = run_loop(kd, 3, x)
    assert got.dtype == torch.float64
    sigmas = kd.sigmas.double().tolist()
    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(kd.timesteps):
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x0 = x - sigmas[i] * dummy_model(x, t)
        x = float(np.float32(1.0 - sigmas[i + 1])) * x0 + sigmas[i + 1] * noise
    assert parity_error(got, x) <= 1e-12
    assert parity_error(got, run_loop(DF(shift=3.0), 3, initial_sample().double())) <= 1e-6


@pytest.mark.parametrize("config", [dict(shift=3.0), dict(shift=3.0, scale_factors=[1.25, 1.5])])
def test_guidance_fused(config):
    got, _ = assert_parity(KD, DF, config, steps=3, guidance_scale=4.5)
    unfused = run_loop(KD(**config), 3, initial_sample(), guidance_scale=4.5)
    torch.testing.assert_close(got, unfused, rtol=0, atol=1e-6)


def test_noise_follows_the_generator_draw_for_draw():
    x = initial_sample()
    for config in (dict(shift=3.0), dict(shift=3.0, scale_factors=[2.0])):
        expected, df_gen = loop_with_generator(DF(**config), 2, x)
        got, kd_gen = loop_with_generator(KD(**config), 2, x)
        assert torch.equal(got, expected)
        # a draw at every step, the last (sigma_next = 0) included, as diffusers draws
        assert torch.equal(kd_gen.get_state(), df_gen.get_state())
    other, _ = loop_with_generator(KD(shift=3.0), 3, x, seed=1)
    assert parity_error(other, loop_with_generator(KD(shift=3.0), 3, x)[0]) > 1e-3
    # a list of generators, one per batch entry
    outs = []
    for s in (DF(shift=3.0), KD(shift=3.0)):
        s.set_timesteps(3)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        y = x
        for t in s.timesteps:
            y = s.step(dummy_model(y, t), t, y, generator=gens).prev_sample
        outs.append(y)
    assert torch.equal(outs[1], outs[0])
    # variance_noise replaces the draw
    kd = KD(shift=3.0)
    kd.set_timesteps(4)
    v, noise = initial_sample(seed=1), initial_sample(seed=2)
    out = kd.step(v, kd.timesteps[0], x, variance_noise=noise).prev_sample
    s, s_next = kd.sigmas[0], kd.sigmas[1]
    torch.testing.assert_close(out, (1 - s_next) * (x - s * v) + s_next * noise)


@pytest.mark.parametrize("mode", ["bicubic", "nearest", "bilinear", "area", "nearest-exact"])
def test_scale_factors_parity(mode):
    config = dict(shift=3.0, scale_factors=[1.5, 2.0], upscale_mode=mode)
    got, _ = assert_parity(KD, DF, config, steps=3)
    assert got.shape == (2, 4, 16, 16)


@pytest.mark.parametrize("shape, mode, factors", [((2, 16, 8), "linear", [1.5, 2.0]),
                                                  ((1, 2, 3, 4, 4), "trilinear", [2.0, 1.0]),
                                                  ((2, 4, 8, 8), "bicubic", [0.5, 1.0])])
def test_scale_factors_other_layouts(shape, mode, factors):
    assert_parity(KD, DF, dict(scale_factors=factors, upscale_mode=mode), steps=3, shape=shape)


def test_set_scale_factors_and_upscaling_off():
    x = initial_sample()
    outs, schedulers = [], (DF(shift=3.0), KD(shift=3.0))
    for s in schedulers:
        s.set_timesteps(3)
        s.set_scale_factors([2.0, 1.5], "bilinear")
        outs.append(run_loop(s, 3, x))
    assert outs[1].shape == (2, 4, 12, 12)
    assert parity_error(outs[1], outs[0]) <= 1e-5
    # a second loop at another size: the sizes are taken from its own first step again
    x = initial_sample((2, 4, 6, 6), seed=3)
    again = [run_loop(s, 3, x) for s in schedulers]
    assert again[1].shape == (2, 4, 9, 9) and parity_error(again[1], again[0]) <= 1e-5
    # no mode: no resizing (scale factors of any length are then ignored, as in diffusers)
    for mode in (None, ""):
        assert_parity(KD, DF, dict(scale_factors=[2.0], upscale_mode=mode), steps=3)


def test_step_path_has_no_host_reads_and_one_fused_call(monkeypatch):
    for config, per_step in ((dict(shift=3.0), [1, 1, 1]), (dict(shift=3.0, scale_factors=[1.5, 2.0]), [2, 2, 1])):
        kd = KD(**config)
        kd.set_timesteps(3)
        calls = []
        fused_step = base.fused_step
        monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(1) or fused_step(*a))

        x, gen = initial_sample(), torch.Generator().manual_seed(0)
        for i, t in enumerate(list(kd.timesteps)):
            u, c = dummy_cfg(x, t)
            before = len(calls)
            with no_host_reads():
                if i == 1:
                    x = kd.step(u, t, x, generator=gen).prev_sample
                else:
                    x = kd.step_cfg(u, c, 3.0, t, x, generator=gen).prev_sample
            # one kernel call per step; a resizing step: two, around the interpolation
            assert len(calls) - before == per_step[i]
        monkeypatch.undo()
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("begin", [0, 2])
def test_set_begin_index_and_scale_noise(begin):
    x, noise = initial_sample(), initial_sample(seed=1)
    outs = []
    for s in (DF(shift=3.0), KD(shift=3.0)):
        s.set_timesteps(5)
        s.set_begin_index(begin)
        t = s.timesteps[begin:begin + 1].expand(2)
        y = s.scale_noise(x, t, noise)
        for t in s.timesteps[begin:]:
            y = s.step(dummy_model(y, t), t, y, generator=torch.Generator().manual_seed(0)).prev_sample
        outs.append(y)
    assert torch.equal(outs[1], outs[0])
    df, kd = DF(shift=3.0), KD(shift=3.0)
    for s in (df, kd):
        s.set_timesteps(6)
    assert torch.equal(kd.scale_noise(x, kd.timesteps[[1, 4]], noise), df.scale_noise(x, df.timesteps[[1, 4]], noise))


def test_training_schedule_without_set_timesteps():
    x = initial_sample()
    outs = []
    for s in (DF(shift=3.0), KD(shift=3.0)):
        y, gen = x, torch.Generator().manual_seed(0)
        for t in s.timesteps[:3]:
            y = s.step(dummy_model(y, t), t, y, generator=gen).prev_sample
        outs.append(y)
    assert torch.equal(outs[1], outs[0])


def test_outputs_and_return_dict():
    df, kd = DF(shift=3.0), KD(shift=3.0)
    x = initial_sample()
    for s in (df, kd):
        s.set_timesteps(3)
    t = df.timesteps[0]
    a = df.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(0))
    b = kd.step(dummy_model(x, t), kd.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert list(b.keys()) == list(a.keys()) == ["prev_sample"] and torch.equal(b["prev_sample"], a.prev_sample)
    t = df.timesteps[1]
    a = df.step(dummy_model(x, t), t, x, return_dict=False, generator=torch.Generator().manual_seed(1))
    b = kd.step(dummy_model(x, t), kd.timesteps[1], x, return_dict=False, generator=torch.Generator().manual_seed(1))
    assert isinstance(b, tuple) and len(b) == len(a) == 1 and torch.equal(b[0], a[0])


def test_shift_api_and_time_shift():
    kd, df = KD(shift=3.0), DF(shift=3.0)
    assert kd.shift == df.shift == 3.0
    for s in (kd, df):
        s.set_shift(5.0)
        s.set_timesteps(4)
    assert kd.shift == 5.0 and torch.equal(kd.sigmas, df.sigmas)
    t = np.linspace(0.1, 1.0, 5)
    for tst in ("exponential", "linear"):
        kd, df = KD(time_shift_type=tst), DF(time_shift_type=tst)
        np.testing.assert_array_equal(kd.time_shift(0.7, 1.0, t), df.time_shift(0.7, 1.0, t))
        np.testing.assert_array_equal(KD(shift_terminal=0.2).stretch_shift_to_terminal(t[::-1]),
                                      DF(shift_terminal=0.2).stretch_shift_to_terminal(t[::-1]))


def test_config_round_trip(tmp_path):
    df = DF(**FLUX, scale_factors=[1.5, 2.0], upscale_mode="bilinear", shift_terminal=0.02)
    kd = KD.from_config(df.config)
    assert settings(kd.config) == settings(df.config)
    kd.save_pretrained(tmp_path)
    again = DF.from_pretrained(tmp_path)
    assert settings(again.config) == settings(df.config)
    df.save_pretrained(tmp_path / "df")
    back = KD.from_pretrained(tmp_path / "df")
    assert settings(back.config) == settings(df.config)
    assert back._scale_factors == [1.5, 2.0] and back._upscale_mode == "bilinear"
    # a FlowMatchEuler config (what a pipeline holds) builds the LCM scheduler
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    lcm = KD.from_config(euler.config)
    assert lcm.config.shift == 3.0 and lcm.config.scale_factors is None
    assert parity_error(run_loop(lcm, 3, initial_sample()), run_loop(DF.from_config(euler.config), 3,
                                                                       initial_sample())) == 0
    assert DF in kd.compatibles and len(kd) == 1000 and kd.order == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_diffusers_nan_schedule_is_refused():
    # one step with shift_terminal: diffusers stretches by 0 / 0 and steps on NaN sigmas
    df = DF(shift_terminal=0.1)
    df.set_timesteps(1)
    assert torch.isnan(df.sigmas[0])
    with pytest.raises(ValueError, match="non-finite sigmas"):
        KD(shift_terminal=0.1).set_timesteps(1)


def test_bad_input():
    with pytest.raises(ValueError, match="mu"):
        KD(**FLUX).set_timesteps(4)
    with pytest.raises(ValueError, match="time_shift_type"):
        KD(time_shift_type="cubic")
    with pytest.raises(ValueError, match="Only one"):
        KD(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="upscale_mode='bicubc'"):
        KD(upscale_mode="bicubc")
    for bad in ([1.5, 0.0], [float("nan")], "2", 2.0):
        with pytest.raises(ValueError, match="scale_factors"):
            KD(scale_factors=bad)
    with pytest.raises(ValueError, match="upscale_mode"):
        KD().set_scale_factors([2.0], "cubic")
    with pytest.raises(ValueError, match="same length"):
        KD().set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0])
    with pytest.raises(ValueError, match="num_inference_steps"):
        KD().set_timesteps(0)
    kd = KD(scale_factors=[2.0, 2.0])
    kd.set_timesteps(4)
    x = initial_sample()
    with pytest.raises(ValueError, match="2 scale factors for 4 timesteps"):
        kd.step(x, kd.timesteps[0], x)
    kd = KD()
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
        kd.step_cfg(x, x, math.nan, kd.timesteps[0], x)
    for t in kd.timesteps:
        x = kd.step(x, t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)


def test_kdfast_sample_and_copies():
    import copy
    import pickle

    import kdfast

    kd = KD(shift=3.0)
    kd.set_timesteps(4)
    x = initial_sample()
    got = kdfast.sample(lambda x, t: dummy_model(x, t), x, kd, generator=torch.Generator().manual_seed(0),
                        disable=True)
    assert torch.equal(got, run_loop(DF(shift=3.0), 4, x))
    kd.set_timesteps(4)
    kd.step(x, kd.timesteps[0], x)
    for clone in (copy.deepcopy(kd), pickle.loads(pickle.dumps(kd))):
        assert clone.step_index == 1
        a = clone.step(x, clone.timesteps[1], x, generator=torch.Generator().manual_seed(1)).prev_sample
        b = copy.deepcopy(kd).step(x, kd.timesteps[1], x, generator=torch.Generator().manual_seed(1)).prev_sample
        torch.testing.assert_close(a, b, rtol=0, atol=0)


ASSIGNED = {
    "slice": lambda ts: ts[4:],  # SDEdit-style: start part-way down the schedule
    "strided": lambda ts: ts[::2],
    "custom": lambda ts: ts[[0, 2, 5]].clone(),
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
