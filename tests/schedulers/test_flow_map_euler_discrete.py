import copy
import pickle
import random

import numpy as np
import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.flow_map_euler_discrete import FlowMapEulerDiscreteScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

DF = diffusers.FlowMapEulerDiscreteScheduler
KD = FlowMapEulerDiscreteScheduler


class DFG(DF):
    """diffusers' class whose step takes (and drops) the generator parity.run_loop passes."""

    def step(self, model_output, timestep, sample, r_timestep=None, return_dict=True, generator=None):
        return super().step(model_output, timestep, sample, r_timestep, return_dict)


CONFIGS = [{}, dict(shift=5.0), dict(shift=0.4, num_train_timesteps=100)]


@pytest.mark.parametrize("steps", [1, 2, 4, 10, 25, 50])
@pytest.mark.parametrize("config", CONFIGS)
def test_parity(config, steps):
    assert_parity(KD, DFG, config, steps=steps)


@pytest.mark.parametrize("steps, kwargs", [(None, dict(sigmas=[1.0, 0.75, 0.5, 0.25])),
                                           (None, dict(timesteps=[1000.0, 800.0, 300.0])),
                                           (None, dict(sigmas=np.array([0.9, 0.6, 0.3], dtype=np.float32))),
                                           (None, dict(sigmas=torch.tensor([1.0, 0.5]))),
                                           (3, dict(sigmas=[1.0, 0.5, 0.25], timesteps=[999.0, 500.0, 250.0])),
                                           (None, dict(timesteps=[1000.0, 600.0, 600.0, 100.0]))])
@pytest.mark.parametrize("config", [{}, dict(shift=3.0)])
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # (diffusers' torch.tensor(tensor))
def test_parity_custom_schedules(config, steps, kwargs):
    # (with sigmas and timesteps both, the timesteps are only checked: diffusers makes them from the sigmas)
    assert_parity(KD, DFG, config, steps=steps, **kwargs)


def test_schedules_equal_diffusers_bit_for_bit():
    kd, df = KD(shift=3.0), DF(shift=3.0)  # the num_train_timesteps schedule of __init__ too
    for kwargs in (None, dict(num_inference_steps=1), dict(num_inference_steps=28),
                   dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1]), dict(timesteps=[1000.0, 750.0, 500.0, 250.0]),
                   dict(sigmas=[0.9, 0.4], timesteps=[100.0, 50.0])):
        if kwargs is not None:
            kd.set_timesteps(**kwargs)
            df.set_timesteps(**kwargs)
        for a, b in ((kd.sigmas, df.sigmas), (kd.timesteps, df.timesteps)):
            assert a.dtype == b.dtype == torch.float64 and a.device == b.device and torch.equal(a, b), kwargs
        assert kd.num_inference_steps == df.num_inference_steps
        assert kd.step_index is df.step_index is None and kd.begin_index is df.begin_index is None
    assert torch.equal(kd.apply_shift(torch.linspace(0, 1, 7, dtype=torch.float64)),
                       df.apply_shift(torch.linspace(0, 1, 7, dtype=torch.float64)))
    assert len(kd) == 1000 and kd.order == df.order == 1


def test_steps_on_the_schedule_of_init():
    outs = []
    for cls in (KD, DF):
        s = cls(shift=2.0)
        x = initial_sample()
        for t in s.timesteps[:3]:
            x = s.step(dummy_model(x, t), t, x).prev_sample
        outs.append((x, s.step_index))
    assert outs[0][1] == outs[1][1] == 3 and parity_error(outs[0][0], outs[1][0]) <= 1e-6


def _r_choices(s, i):
    """Targets of step i of a loop: the ways an any-step loop names them."""
    n = len(s.timesteps)
    nxt = s.timesteps[i + 1] if i + 1 < n else None
    return [None, 0, 0.0, torch.tensor(0.0), nxt, float(s.timesteps[min(i + 2, n - 1)]),
            float(s.timesteps[min(i + 1, n - 1)]) + 4e-4, 123.4, torch.tensor(321.0, dtype=torch.float64),
            s.timesteps[i]]  # (the last: r == t, a no-op)


@pytest.mark.parametrize("config", [{}, dict(shift=3.0)])
def test_any_step_targets_like_diffusers(config):
    # every way of naming r: None (the next timestep), numbers and tensors on and off the schedule
    x = initial_sample()
    kd, df = KD(**config), DF(**config)
    for s in (kd, df):
        s.set_timesteps(6)
    for i in range(6):
        for r_kd, r_df in zip(_r_choices(kd, i), _r_choices(df, i)):
            a = kd.step(dummy_model(x, kd.timesteps[i]), kd.timesteps[i], x, r_timestep=r_kd).prev_sample
            b = df.step(dummy_model(x, df.timesteps[i]), df.timesteps[i], x, r_timestep=r_df).prev_sample
            assert parity_error(a, b) <= 1e-6, (i, r_kd)
            assert kd.step_index == df.step_index
    t = kd.timesteps[2]
    assert torch.equal(kd.step(x, t, initial_sample(seed=2), r_timestep=t).prev_sample, initial_sample(seed=2))


def test_one_shot_and_off_schedule_sources():
    # any-step sampling: from any t (on or off the schedule, a number or a tensor) to any r
    x = initial_sample()
    kd, df = KD(shift=3.0), DF(shift=3.0)
    for s in (kd, df):
        s.set_timesteps(4)
    for t, r in ((1000.0, 0.0), (777.0, 500), (torch.tensor(640.5), torch.tensor(12.0)), (999, 0),
                 (np.float64(873.25), np.float32(100.5)), (np.float16(500.0), 0.0), (torch.tensor([501.0]), None)):
        if r is None:  # off the schedule and no r: diffusers' ValueError
            for s in (kd, df):
                with pytest.raises(ValueError, match="`r_timestep` is None but `timestep` is not on the current"):
                    s.step(x, t, x)
            continue
        a = kd.step(dummy_model(x, 500), t, x, r_timestep=r).prev_sample
        b = df.step(dummy_model(x, 500), t, x, r_timestep=r).prev_sample
        assert parity_error(a, b) <= 1e-6, (t, r)
    assert kd.step_index == df.step_index


def test_index_for_timestep_like_diffusers():
    # within 1e-3 in float32, the first of equal ones; None off the schedule; a tensor's first element
    rng = random.Random(0)
    for kwargs in (dict(num_inference_steps=7), dict(timesteps=[999.0, 999.00001, 500.0, 500.0004, 500.0011, 3.0]),
                   dict(sigmas=[1.0, 0.5, 0.5, 0.2])):
        kd, df = KD(shift=2.0), DF(shift=2.0)
        kd.set_timesteps(**kwargs)
        df.set_timesteps(**kwargs)
        values = [float(t) for t in df.timesteps]
        probes = values + [v + rng.choice([-1, 1]) * rng.choice([1e-4, 4.9e-4, 9.99e-4, 1e-3, 1.0001e-3, 2e-3, 0.3])
                           for v in values for _ in range(10)] + [rng.uniform(-10, 1100) for _ in range(100)]
        for v in probes:
            for form in (v, torch.tensor(v), torch.tensor(v, dtype=torch.float64), torch.tensor([v, 3.0])):
                assert kd.index_for_timestep(form) == df.index_for_timestep(form), (kwargs, v)
        for i in range(len(kd.timesteps)):  # elements, found by address
            assert kd.index_for_timestep(kd.timesteps[i]) == df.index_for_timestep(df.timesteps[i])
            assert kd.index_for_timestep(kd.timesteps[i].expand(3)) == df.index_for_timestep(df.timesteps[i])
    kd.timesteps = torch.tensor([900.0, 400.0], dtype=torch.float64)  # assigned: looked up there, as in diffusers
    assert kd.index_for_timestep(400.0002) == 1 and kd.index_for_timestep(kd.timesteps[0]) == 0
    kd.timesteps[1] = 300.0  # edited in place: read back once
    assert kd.index_for_timestep(300.0) == 1 and kd.index_for_timestep(400.0) is None


def test_step_index_state_machine_like_diffusers():
    x = initial_sample()

    def run(s, start, begin_index=None, first=None):
        s.set_timesteps(8)
        if begin_index is not None:
            s.set_begin_index(begin_index)
        seen = [s.step_index]
        y = x
        if first is not None:
            y = s.step(dummy_model(y, 0), first, y, r_timestep=float(s.timesteps[start])).prev_sample
            seen.append(s.step_index)
        for t in s.timesteps[start:]:
            y = s.step(dummy_model(y, t), t, y).prev_sample
            seen.append(s.step_index)
        return y, seen, s.begin_index

    for args in ((0,), (3,), (3, 1), (5, 0), (2, None, 1000.0), (2, None, 7.5), (4, 6, 950.0)):
        got, expected = run(KD(), *args), run(DF(), *args)
        assert got[1] == expected[1] and got[2] == expected[2], args
        assert parity_error(got[0], expected[0]) <= 1e-6
    # set_timesteps resets the state machine
    kd = KD()
    kd.set_timesteps(4)
    kd.set_begin_index(2)
    kd.step(x, kd.timesteps[0], x)
    assert kd.step_index == 3
    kd.set_timesteps(4)
    assert kd.step_index is None and kd.begin_index is None


def test_batched_timesteps_like_diffusers():
    x = initial_sample()  # a batch of 2
    kd, df = KD(shift=3.0), DF(shift=3.0)
    for s in (kd, df):
        s.set_timesteps(5)
    cases = [(lambda s: s.timesteps[1].expand(2), lambda s: None),                  # pipelines' expand: on schedule
             (lambda s: s.timesteps[1].expand(2), lambda s: s.timesteps[3].expand(2)),
             (lambda s: torch.tensor([s.timesteps[2].item(), 5.0]), lambda s: 0.0),  # first on schedule: one sigma
             (lambda s: torch.tensor([700.0, 350.0]), lambda s: 0.0),               # off: a sigma per sample
             (lambda s: torch.tensor([700.0, 350.0]), lambda s: torch.tensor([300.0, 10.0])),
             (lambda s: s.timesteps[0], lambda s: torch.tensor([450.0, 20.0]))]
    for make_t, make_r in cases:
        outs = []
        for s in (kd, df):
            t = make_t(s)
            outs.append(s.step(dummy_model(x, 400), t, x, r_timestep=make_r(s)).prev_sample)
        assert outs[0].dtype == outs[1].dtype and parity_error(outs[0], outs[1]) <= 1e-6
    # with guidance fused into the per-sample path too
    u, c = dummy_cfg(x, 400)
    a = kd.step_cfg(u, c, 2.5, torch.tensor([700.0, 350.0]), x, r_timestep=0.0).prev_sample
    b = df.step(u + 2.5 * (c - u), torch.tensor([700.0, 350.0]), x, r_timestep=0.0).prev_sample
    assert parity_error(a, b) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_half_precision_keeps_dtype_and_matches(dtype, steps):
    got, expected = assert_parity(KD, DFG, dict(shift=3.0), steps=steps, dtype=dtype)
    # diffusers computes in float64 and rounds once: so does the fused step (float32, then one rounding)
    assert torch.equal(got, expected)


def test_output_dtype_is_the_model_outputs_like_diffusers():
    for sample_dtype, model_dtype in ((torch.float32, torch.float16), (torch.float16, torch.float32),
                                      (torch.bfloat16, torch.float32)):
        outs = []
        for cls in (KD, DF):
            s = cls()
            s.set_timesteps(3)
            x = initial_sample(dtype=sample_dtype)
            t = s.timesteps[0]
            outs.append(s.step(dummy_model(x, t).to(model_dtype), t, x).prev_sample)
        assert outs[0].dtype == outs[1].dtype == model_dtype
        # (a narrower sample is widened before the step, not its result after)
        assert parity_error(outs[0], outs[1]) <= (1e-6 if model_dtype == torch.float32 else 0.0)


def test_fused_guidance_returns_the_guided_outputs_dtype():
    kd = KD()
    kd.set_timesteps(3)
    x = initial_sample(dtype=torch.float16)
    t = kd.timesteps[0]
    u, c = dummy_cfg(x, t)
    u, c = u.half(), c.float()
    a = kd.step_cfg(u, c, 2.0, t, x).prev_sample
    b = kd.step(u + 2.0 * (c - u), t, x).prev_sample
    assert a.dtype == b.dtype == torch.float32 and parity_error(a, b) <= 1e-6


def test_float64_matches_diffusers():
    x = initial_sample(dtype=torch.float64)
    got, expected = run_loop(KD(shift=3.0), 6, x), run_loop(DFG(shift=3.0), 6, x)
    assert got.dtype == torch.float64 and parity_error(got, expected) <= 1e-12
    # float64 shows the sigmas themselves: off the schedule, a Python number is divided in float32
    # (diffusers' torch.tensor(number)), a tensor in float64, a numpy scalar in its own dtype
    kd, df = KD(shift=3.0), DF(shift=3.0)
    for s in (kd, df):
        s.set_timesteps(4)
    v = torch.ones_like(x)
    for t, r in ((777.7, 333.3), (torch.tensor(777.7, dtype=torch.float64), torch.tensor(333.3, dtype=torch.float64)),
                 (np.float64(777.7), np.float32(333.3)), (777, 0), (float(kd.timesteps[1]) + 9e-4, None)):
        a = kd.step(v, t, x, r_timestep=r).prev_sample
        b = df.step(v, t, x, r_timestep=r).prev_sample
        assert parity_error(a, b) <= 1e-15, (t, r)


@pytest.mark.parametrize("steps", [1, 4, 12])
def test_fused_guidance_matches_guidance_outside(steps):
    assert_parity(KD, DFG, dict(shift=3.0), steps=steps, guidance_scale=4.5)
    x = initial_sample()
    kd = KD(shift=3.0)
    kd.set_timesteps(steps)
    y_fused = y_plain = x
    for i, t in enumerate(kd.timesteps):
        r = 0.0 if i % 2 else None
        u, c = dummy_cfg(y_fused, t)
        y_fused = kd.step_cfg(u, c, 4.5, t, y_fused, r_timestep=r).prev_sample
        u, c = dummy_cfg(y_plain, t)
        y_plain = kd.step(u + 4.5 * (c - u), t, y_plain, r_timestep=r).prev_sample
        assert parity_error(y_fused, y_plain) <= 1e-6
    assert kd.step_index == 2 * steps


def test_outputs_and_tuples_like_diffusers():
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(3)
    x = initial_sample()
    m = dummy_model(x, 900)
    got = kd.step(m, kd.timesteps[0], x, return_dict=False)
    want = df.step(m, df.timesteps[0], x, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want) == 1 and parity_error(got[0], want[0]) <= 1e-6
    out, out_df = kd.step(m, kd.timesteps[1], x), df.step(m, df.timesteps[1], x)
    assert list(out.keys()) == list(out_df.keys()) == ["prev_sample"]
    assert out[0] is out.prev_sample and out["prev_sample"] is out.prev_sample
    assert type(out).__name__ == type(out_df).__name__ == "FlowMapEulerDiscreteSchedulerOutput"
    # positional r_timestep and return_dict, as diffusers orders them
    a = kd.step(m, kd.timesteps[0], x, kd.timesteps[2], False)
    b = df.step(m, df.timesteps[0], x, df.timesteps[2], False)
    assert isinstance(a, tuple) and parity_error(a[0], b[0]) <= 1e-6


def test_scale_noise_and_scale_model_input_are_diffusers():
    kd, df = KD(), DF()
    x, n = initial_sample(), initial_sample(seed=4)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for t in (torch.tensor([900.0]), torch.tensor([250.0, 640.0]), torch.tensor(333.0)):
            assert torch.equal(kd.scale_noise(x.to(dtype), t, n.to(dtype)), df.scale_noise(x.to(dtype), t, n.to(dtype)))
    assert torch.equal(kd.scale_noise(x, 500, n), df.scale_noise(x, torch.tensor(500), n))
    assert kd.scale_model_input(x, 3) is x
    with pytest.raises(ValueError, match="scale_noise needs `noise`"):
        kd.scale_noise(x, torch.tensor(1.0))


@pytest.mark.parametrize("guided", [False, True])
def test_one_fused_call_per_step(monkeypatch, guided):
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    kd = KD(shift=3.0)
    kd.set_timesteps(5)
    x = initial_sample()
    for i, t in enumerate(kd.timesteps):
        for r in (None, 0.0, kd.timesteps[-1]):
            calls.clear()
            u, c = dummy_cfg(x, t)
            out = kd.step_cfg(u, c, 3.0, t, x, r_timestep=r) if guided else kd.step(u, t, x, r_timestep=r)
            assert len(calls) == 1 and (calls[0][3] is c) == guided
        x = out.prev_sample


def test_step_path_needs_no_host_read():
    kd = KD(shift=3.0)
    kd.set_timesteps(6)
    x = initial_sample()

    for k, t in enumerate(list(kd.timesteps)):  # no begin index: the first timestep is looked up
        u, c = dummy_cfg(x, t)
        nxt = kd.timesteps[k + 1] if k + 1 < len(kd.timesteps) else 0.0
        with no_host_reads("cpu", "numpy"):
            if k % 3 == 0:
                x = kd.step(u, t, x).prev_sample
            elif k % 3 == 1:
                x = kd.step_cfg(u, c, 2.0, t.expand(x.shape[0]), x, r_timestep=nxt).prev_sample
            else:
                x = kd.step(u, t, x, r_timestep=0.0 if k == 5 else 431.7).prev_sample
    assert torch.isfinite(x).all() and kd.step_index == 6


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = KD(num_train_timesteps=500, shift=5.0)
    kd.save_pretrained(tmp_path)
    again = KD.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert df.config.shift == 5.0 and df.config.num_train_timesteps == 500
    df.save_pretrained(tmp_path / "df")
    back = KD.from_pretrained(tmp_path / "df")
    assert settings(back.config) == settings(kd.config)
    x = initial_sample()
    assert parity_error(run_loop(KD.from_config(df.config), 4, x), run_loop(DFG.from_config(df.config), 4, x)) <= 1e-6
    assert KD.from_config(DF().config).config.shift == 1.0
    assert DF in kd.compatibles


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    s = KD(shift=3.0)
    s.set_timesteps(6)
    x = initial_sample()
    for t in s.timesteps[:2]:
        x = s.step(dummy_model(x, t), t, x).prev_sample
    twin = copy.deepcopy(s) if how == "deepcopy" else pickle.loads(pickle.dumps(s))
    assert twin.step_index == s.step_index == 2
    for i in range(2, 6):
        a = s.step(dummy_model(x, 1), s.timesteps[i], x).prev_sample
        b = twin.step(dummy_model(x, 1), twin.timesteps[i], x).prev_sample
        assert torch.equal(a, b)
        x = a
    # an element of the original's schedule is, for the copy, a tensor to look up by value
    assert twin.index_for_timestep(s.timesteps[3]) == 3


def test_a_loop_under_inference_mode_equals_one_under_no_grad():
    outs = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            outs.append(run_loop(KD(shift=2.0), 5, initial_sample()))
    assert torch.equal(outs[0], outs[1])


def test_non_finite_timesteps_are_refused_where_diffusers_goes_wrong():
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(4)
    x = initial_sample()
    t = kd.timesteps[1]
    # diffusers takes a NaN timestep for timesteps[0] (and steps as if given it), steps to NaN from inf
    assert df.index_for_timestep(float("nan")) == 0
    assert not torch.isfinite(df.step(x, float("inf"), x, r_timestep=0.0).prev_sample).all()
    for bad in (float("nan"), float("inf"), torch.tensor(float("nan")), torch.tensor([float("-inf"), 1.0])):
        with pytest.raises(ValueError, match=r"^timestep must be finite, got (nan|inf|-inf) \(diffusers takes"):
            kd.step(x, bad, x, r_timestep=0.0)
        with pytest.raises(ValueError, match="r_timestep must be finite"):
            kd.step(x, t, x, r_timestep=bad)
    # finite, but infinite as a float32 sigma, or a batch with an infinite entry after the first
    assert not torch.isfinite(df.step(x, t, x, r_timestep=1e300).prev_sample).all()
    assert not torch.isfinite(df.step(x, t, x, r_timestep=torch.tensor([600.0, float("inf")])).prev_sample).all()
    for bad in (1e300, torch.tensor([600.0, float("inf")])):
        with pytest.raises(ValueError, match="r_timestep must be finite, and its sigma"):
            kd.step(x, t, x, r_timestep=bad)
    assert kd.step_index is None  # refused steps change nothing


def test_non_finite_schedules_are_refused_where_diffusers_gives_nan():
    for config, kwargs in ((dict(shift=0.0), dict(num_inference_steps=3)),   # 0 / 0 at sigma 1
                           ({}, dict(sigmas=[1.0, float("nan")])),
                           (dict(shift=-1.0), dict(sigmas=[1.0, 0.5])),        # 1 / 0
                           ({}, dict(timesteps=[float("inf"), 3.0]))):
        df = DF(**{**config, "shift": 1.0})
        df.register_to_config(**config)
        df.set_timesteps(**kwargs)
        assert not torch.isfinite(df.sigmas).all()
        kd = KD(**{**config, "shift": 1.0})
        kd.register_to_config(**config)
        with pytest.raises(ValueError, match="non-finite sigmas"):
            kd.set_timesteps(**kwargs)
    for bad in (0.0, -1.0):  # diffusers' __init__ sets a 1000-step schedule with such a sigma
        with pytest.raises(ValueError, match="shift must be > 0"):
            KD(shift=bad)
    with pytest.raises(ValueError, match="shift must be a finite number"):
        KD(shift=float("nan"))


def test_bad_arguments_are_named():
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="num_train_timesteps must be an integer >= 1"):
            KD(num_train_timesteps=bad)
    kd = KD()
    with pytest.raises(ValueError, match="`num_inference_steps` must be provided"):
        kd.set_timesteps()
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
            kd.set_timesteps(bad)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
        kd.set_timesteps(sigmas=[])
    with pytest.raises(ValueError, match="`sigmas` and `timesteps` should have the same length"):
        kd.set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0])
    with pytest.raises(ValueError, match="same length as `num_inference_steps`"):
        kd.set_timesteps(3, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="sigmas must be a sequence of numbers"):
        kd.set_timesteps(sigmas=["a", "b"])
    with pytest.raises(ValueError, match="sigmas must be a 1-D sequence"):
        kd.set_timesteps(sigmas=[[1.0, 0.5]])
    kd.set_timesteps(3)
    x = initial_sample()
    t = kd.timesteps[0]
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], t, x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), t, x)
    with pytest.raises(ValueError, match="timestep is an empty tensor"):
        kd.step(x, torch.tensor([]), x)
    with pytest.raises(TypeError, match="r_timestep must be a number or a tensor"):
        kd.step(x, t, x, r_timestep="0")
    for call in (lambda: kd.step(x, t, x, bogus_option=1), lambda: kd.step_cfg(x, x, 2.0, t, x, bogus_option=1)):
        with pytest.raises(TypeError, match="bogus_option"):
            call()
    with pytest.raises(TypeError):
        DF().step(x, t, x, bogus_option=1)
    assert kd.step_index is None  # nothing was stepped


@pytest.mark.parametrize("how", ["slice", "list", "in_place"])
def test_assigned_or_edited_timesteps_are_followed_like_diffusers(how):
    # diffusers looks each timestep up in the timesteps it holds now, and takes that position's sigma
    outs = []
    for cls in (KD, DF):
        s = cls(shift=3.0)
        s.set_timesteps(8)
        if how == "slice":
            s.timesteps = s.timesteps[3:]
        elif how == "list":
            s.timesteps = torch.tensor([900.0, 700.0, 650.0, 200.0])
        else:
            s.timesteps[2] -= 40.0
        x = initial_sample()
        for t in s.timesteps[:-1]:
            x = s.step(dummy_model(x, t), t, x).prev_sample
        outs.append((x, s.step_index))
    assert outs[0][1] == outs[1][1] and parity_error(outs[0][0], outs[1][0]) <= 1e-6


def test_a_compiled_step_function_compiles_once_and_equals_eager():
    from torch._dynamo.utils import counters

    def one_step(s, x, t):
        return s.step(torch.sin(s.scale_model_input(x, t)) * 0.5, t, x).prev_sample  # the model's part, compiled

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(one_step, backend="aot_eager")
    outs = []
    for f in (one_step, compiled):
        s = KD(shift=3.0)
        s.set_timesteps(10)
        x = initial_sample()
        for t in s.timesteps:
            x = f(s, x, t)
        outs.append(x)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()
