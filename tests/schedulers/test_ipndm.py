import copy
import math
import pickle

import numpy as np
import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.ipndm import IPNDMScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

DF = diffusers.IPNDMScheduler
# trained betas are iPNDM's noise levels themselves (sigma, with alpha = sqrt(1 - sigma^2)), one more than steps
TRAINED = [0.999, 0.95, 0.8, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05, 0.0]


def without_generator(cls):
    """``cls`` whose step takes (and drops) the generator parity.run_loop passes: iPNDM draws no noise."""
    return type(cls.__name__, (cls,), {"step": lambda self, m, t, x, generator=None, **k: cls.step(self, m, t, x, **k)})


DFG = without_generator(DF)


def loop(s, steps, x, start=0, begin_index=None, guidance_scale=None, fused=False, as_values=False):
    """Sample over ``timesteps[start:]``; every step's prev_sample."""
    s.set_timesteps(steps)
    if begin_index is not None:
        s.set_begin_index(begin_index)
    outs = []
    for t in s.timesteps[start:]:
        tt = float(t) if as_values else t
        if guidance_scale is None:
            x = s.step(dummy_model(x, t), tt, x).prev_sample
        else:
            u, c = dummy_cfg(x, t)
            x = (s.step_cfg(u, c, guidance_scale, tt, x) if fused
                 else s.step(u + guidance_scale * (c - u), tt, x)).prev_sample
        outs.append(x)
    return outs


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 10, 25, 50])
@pytest.mark.parametrize("config", [{}, dict(num_train_timesteps=50)])
def test_parity(config, steps):
    assert_parity(IPNDMScheduler, DFG, config, steps=steps)


def test_parity_of_every_step():
    x = initial_sample()
    for steps in (1, 4, 10, 50):
        got, expected = loop(IPNDMScheduler(), steps, x), loop(DF(), steps, x)
        assert len(got) == len(expected) == steps
        for a, b in zip(got, expected):
            assert parity_error(a, b) <= 1e-5


@pytest.mark.parametrize("steps", [1, 4, 9, 50])
@pytest.mark.parametrize("trained", [TRAINED, np.array(TRAINED[:5] + [0.0]), [1.0, 0.5, 0.0],
                                     [0.9999, 0.9, 0.5, 0.0]])  # (a small first alpha, 0.014: no 1e-8 floor)
def test_parity_with_trained_betas(trained, steps):
    # the schedule is the trained betas, whatever num_inference_steps says (as in diffusers)
    config = dict(trained_betas=trained)
    assert_parity(IPNDMScheduler, DFG, config, steps=steps)
    kd = IPNDMScheduler(**config)
    kd.set_timesteps(steps)
    assert len(kd.timesteps) == len(trained) - 1 and kd.num_inference_steps == steps


def test_schedule_and_state_equal_diffusers():
    kd, df = IPNDMScheduler(), DF()
    # __init__ sets a num_train_timesteps schedule, and steps on it
    for name in ("timesteps", "betas", "alphas"):
        a, b = getattr(kd, name), getattr(df, name)
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), name
    assert kd.num_inference_steps == df.num_inference_steps == 1000
    assert kd.init_noise_sigma == df.init_noise_sigma == 1.0 and kd.pndm_order == df.pndm_order == 4
    assert len(kd) == len(df) == 1000 and kd.order == df.order == 1
    x = initial_sample()
    a = kd.step(dummy_model(x, kd.timesteps[0]), kd.timesteps[0], x).prev_sample
    b = df.step(dummy_model(x, df.timesteps[0]), df.timesteps[0], x).prev_sample
    assert parity_error(a, b) <= 1e-6
    for steps in (1, 7, 30):
        for s in (kd, df):
            s.set_timesteps(steps)
        for name in ("timesteps", "betas", "alphas"):
            assert torch.equal(getattr(kd, name), getattr(df, name)), (name, steps)
        assert kd.ets == df.ets == [] and kd.step_index is df.step_index is None
        assert kd.begin_index is df.begin_index is None and kd.num_inference_steps == steps


def test_ets_and_step_index_follow_diffusers():
    kd, df = IPNDMScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(8)
    x_kd = x_df = initial_sample()
    for i, (t_kd, t_df) in enumerate(zip(kd.timesteps, df.timesteps)):
        x_kd = kd.step(dummy_model(x_kd, t_kd), t_kd, x_kd).prev_sample
        x_df = df.step(dummy_model(x_df, t_df), t_df, x_df).prev_sample
        assert kd.step_index == df.step_index == i + 1
        assert len(kd.ets) == len(df.ets) == i + 1  # every entry kept, as in diffusers
        for a, b in zip(kd.ets, df.ets):
            assert a.dtype == b.dtype and parity_error(a, b) <= 1e-5
        assert parity_error(x_kd, x_df) <= 1e-5
    # the first entry is the sample itself (alpha = 0 at the first timestep)
    assert torch.equal(kd.ets[0], initial_sample())


def loop_steps(s, x, start):
    """Step over ``timesteps[start:]`` of the schedule set; the last sample."""
    for t in s.timesteps[start:]:
        x = s.step(dummy_model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("begin", [1, 3, 6])
def test_set_begin_index_and_partial_loops(begin):
    x = initial_sample()
    got = loop(IPNDMScheduler(), 10, x, start=begin, begin_index=begin)
    expected = loop(DF(), 10, x, start=begin, begin_index=begin)
    assert parity_error(got[-1], expected[-1]) <= 1e-5
    # without a begin index the first timestep is looked up (as an element or as a value)
    for as_values in (False, True):
        got = loop(IPNDMScheduler(), 10, x, start=begin, as_values=as_values)
        expected = loop(DF(), 10, x, start=begin, as_values=as_values)
        assert parity_error(got[-1], expected[-1]) <= 1e-5
    # the first steps after a begin index are planned by set_begin_index, not on the step path (a
    # configuration of its own: the table of a schedule is shared, with what other loops planned)
    kd = IPNDMScheduler(num_train_timesteps=900 + begin)
    kd.set_timesteps(10)
    kd.set_begin_index(begin)
    kd._plan = None  # planning on the step path would call it
    assert parity_error(loop_steps(kd, x, begin), loop(DF(), 10, x, start=begin, begin_index=begin)[-1]) <= 1e-5


def test_history_injected_from_outside():
    # diffusers' own tests fill ets by hand, then step: the order follows len(ets)
    x = initial_sample()
    past = [initial_sample(seed=k) * 0.1 for k in range(1, 6)]
    for n_past in (1, 2, 3, 5):
        outs = []
        for cls in (IPNDMScheduler, DF):
            s = cls()
            s.set_timesteps(10)
            s.ets = past[:n_past]
            t = s.timesteps[5]
            outs.append((s.step(dummy_model(x, t), t, x).prev_sample, len(s.ets)))
        assert outs[0][1] == outs[1][1] == n_past + 1
        assert parity_error(outs[0][0], outs[1][0]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_half_precision_keeps_dtype_and_matches(dtype, steps):
    assert_parity(IPNDMScheduler, DFG, {}, steps=steps, dtype=dtype)
    kd = IPNDMScheduler()
    kd.set_timesteps(steps)
    x = initial_sample(dtype=dtype)
    for t in kd.timesteps:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
        assert x.dtype == dtype and all(e.dtype == dtype for e in kd.ets)


def test_mixed_dtypes_promote_like_diffusers():
    # diffusers' ets entry and prev_sample take the promoted dtype of sample and model output
    for sample_dtype, model_dtype in ((torch.float32, torch.float16), (torch.float16, torch.float32),
                                      (torch.bfloat16, torch.float32)):
        kd, df, exact = IPNDMScheduler(), DF(), DF()
        for s in (kd, df, exact):
            s.set_timesteps(5)
        x = y = z = initial_sample(dtype=sample_dtype)
        for t in kd.timesteps:
            m = dummy_model(y, t).to(model_dtype)  # one model output for all three
            x, y = kd.step(m, t, x).prev_sample, df.step(m, t, y).prev_sample
            z = exact.step(m.float(), t, z).prev_sample
            assert x.dtype == y.dtype == kd.ets[-1].dtype == df.ets[-1].dtype == torch.float32
        # a float16 model output: diffusers rounds alpha * model_output to float16 (a 0-d alpha does not
        # promote); the fused step does not, and equals diffusers given that output in float32
        assert parity_error(x, z) <= 1e-6
        assert parity_error(x, y) <= (1e-4 if model_dtype == torch.float16 else 1e-6)


def test_float64_matches_diffusers_closely():
    x = initial_sample(dtype=torch.float64)
    got, expected = loop(IPNDMScheduler(), 10, x), loop(DF(), 10, x)
    assert got[-1].dtype == torch.float64 and parity_error(got[-1], expected[-1]) <= 1e-10


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_fused_guidance_matches_guidance_outside(steps):
    x = initial_sample()
    assert_parity(IPNDMScheduler, DFG, {}, steps=steps, guidance_scale=3.0)
    fused, plain = IPNDMScheduler(), IPNDMScheduler()
    a = loop(fused, steps, x, guidance_scale=3.0, fused=True)
    b = loop(plain, steps, x, guidance_scale=3.0)
    for p, q in zip(a, b):
        assert parity_error(p, q) <= 1e-6
    for p, q in zip(fused.ets, plain.ets):  # ets holds the guided entries
        assert parity_error(p, q) <= 1e-6


def test_fused_guidance_promotes_dtypes_like_guidance_outside():
    # a float32 cond with float16 uncond and sample: the guided output, ets and prev_sample are float32
    outs = []
    for fused in (True, False):
        s = IPNDMScheduler()
        s.set_timesteps(4)
        x = initial_sample(dtype=torch.float16)
        for t in s.timesteps:
            u, c = dummy_cfg(x, t)
            u, c = u.half(), c.float()
            x = (s.step_cfg(u, c, 2.0, t, x) if fused else s.step(u + 2.0 * (c - u), t, x)).prev_sample
            assert x.dtype == s.ets[-1].dtype == torch.float32
        outs.append(x)
    assert parity_error(outs[0], outs[1]) <= 1e-6


def test_outputs_and_tuples_like_diffusers():
    kd, df = IPNDMScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(4)
    x = initial_sample()
    m = dummy_model(x, kd.timesteps[0])
    got = kd.step(m, kd.timesteps[0], x, return_dict=False)
    want = df.step(m, df.timesteps[0], x, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want) == 1 and parity_error(got[0], want[0]) <= 1e-6
    out = kd.step(m, kd.timesteps[1], x)
    assert out.keys() == ["prev_sample"] and out[0] is out.prev_sample and out.pred_original_sample is None
    assert kd.step(m, kd.timesteps[2], x, False)[0].shape == x.shape  # return_dict by position, as in diffusers


@pytest.mark.parametrize("guided", [False, True])
def test_one_kernel_call_per_step_reading_ets_by_reference(monkeypatch, guided):
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    s = IPNDMScheduler()
    s.set_timesteps(7)
    x = initial_sample()
    for i, t in enumerate(s.timesteps):
        calls.clear()
        ets = list(s.ets)
        u, c = dummy_cfg(x, t)
        x = (s.step_cfg(u, c, 2.0, t, x) if guided else s.step(u, t, x)).prev_sample
        assert len(calls) == 1
        sample, model, coefs, cond, scale, history = calls[0][:6]
        assert (cond is c) == guided and len(history) == min(i, 3)
        assert all(h is e for h, e in zip(history, ets[::-1]))  # the newest entries, newest first
        assert calls[0][10] is True  # the step writes the new ets entry itself
        assert s.ets[-1] is not u and len(s.ets) == i + 1


def test_step_path_needs_no_host_read():
    s = IPNDMScheduler()
    s.set_timesteps(6)
    x = initial_sample()

    for k, t in enumerate(list(s.timesteps)):  # no begin index: the first timestep is looked up
        u, c = dummy_cfg(x, t)
        with no_host_reads("cpu", "numpy"):
            x = (s.step_cfg(u, c, 2.0, t, x) if k % 2 else s.step(u, t, x)).prev_sample
    assert torch.isfinite(x).all()


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = IPNDMScheduler(num_train_timesteps=200, trained_betas=TRAINED)
    kd.save_pretrained(tmp_path)
    again = IPNDMScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert df.config.num_train_timesteps == 200 and list(df.config.trained_betas) == TRAINED
    df.save_pretrained(tmp_path / "df")
    back = IPNDMScheduler.from_pretrained(tmp_path / "df")
    assert settings(back.config) == settings(kd.config)
    x = initial_sample()
    assert parity_error(run_loop(IPNDMScheduler.from_config(df.config), 5, x), run_loop(DFG.from_config(df.config),
                                                                                        5, x)) <= 1e-5
    assert IPNDMScheduler.from_config(DF().config).config.trained_betas is None
    assert DF in kd.compatibles


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    s = IPNDMScheduler()
    s.set_timesteps(8)
    x = initial_sample()
    for t in s.timesteps[:3]:
        x = s.step(dummy_model(x, t), t, x).prev_sample
    twin = copy.deepcopy(s) if how == "deepcopy" else pickle.loads(pickle.dumps(s))
    assert twin.step_index == s.step_index == 3 and len(twin.ets) == 3
    for t in s.timesteps[3:]:
        a = s.step(dummy_model(x, t), t, x).prev_sample
        b = twin.step(dummy_model(x, t), t, x).prev_sample
        assert torch.equal(a, b)
        x = a


def test_a_loop_under_inference_mode_equals_one_under_no_grad():
    outs = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            outs.append(loop(IPNDMScheduler(), 6, initial_sample())[-1])
    assert torch.equal(outs[0], outs[1])


def test_bad_config_values_are_named():
    for bad in (0, -3, 2.5, None):
        with pytest.raises(ValueError, match="num_train_timesteps must be an integer >= 1"):
            IPNDMScheduler(num_train_timesteps=bad)
    with pytest.raises(ValueError, match="trained_betas must be a 1-D sequence of at least 2"):
        IPNDMScheduler(trained_betas=[0.5])
    with pytest.raises(ValueError, match="trained_betas must be finite and within"):
        IPNDMScheduler(trained_betas=[1.0, float("nan"), 0.0])


def test_betas_beyond_one_are_refused_where_diffusers_steps_to_nan():
    trained = [0.9, 1.2, 0.0]
    df = DF(trained_betas=trained)
    assert torch.isnan(df.alphas[1])
    assert not torch.isfinite(run_loop(DFG(trained_betas=trained), 2, initial_sample())).all()
    with pytest.raises(ValueError, match=r"trained_betas must be finite and within \[-1, 1\]"):
        IPNDMScheduler(trained_betas=trained)


def test_the_first_step_ignores_the_model_output_and_stays_finite():
    # alpha = 0 at the first timestep: diffusers' (x - E) / 1e-8 is 0 / 1e-8 and prev = beta_1 * x; an
    # infinite model output (weight 0) makes diffusers' NaN (0 * inf), kdfast's step drops the zero term
    kd, df = IPNDMScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(5)
    x = initial_sample()
    m = torch.full_like(x, float("inf"))
    got = kd.step(m, kd.timesteps[0], x).prev_sample
    assert torch.isnan(df.step(m, df.timesteps[0], x).prev_sample).all()
    assert torch.isfinite(got).all() and parity_error(got, float(kd.betas[1]) * x.double()) <= 1e-7
    assert torch.equal(kd.ets[0], x)


def test_bad_set_timesteps_and_steps_are_named():
    kd = IPNDMScheduler()
    for bad in (0, -1, None, 3.5):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
            kd.set_timesteps(bad)
    kd.set_timesteps(3)
    x = initial_sample()
    t = kd.timesteps[0]
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], t, x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), t, x)
    for call in (lambda: kd.step(x, t, x, bogus_option=1), lambda: kd.step_cfg(x, x, 2.0, t, x, bogus_option=1)):
        with pytest.raises(TypeError, match="bogus_option"):
            call()
    with pytest.raises(TypeError):
        DF().step(x, t, x, bogus_option=1)
    assert kd.ets == []  # refused steps keep no entry
    with pytest.raises(IndexError, match="not one of the schedule"):  # diffusers: IndexError too
        IPNDMScheduler().step(x, 0.123, x)
    kd.set_timesteps(3)
    for t in kd.timesteps:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end of the 3-step schedule"):
        kd.step(x, kd.timesteps[-1], x)
    assert math.isfinite(float(x.abs().max()))


@pytest.mark.parametrize("how", ["slice", "in_place"])
def test_assigned_or_edited_timesteps_are_followed_like_diffusers(how):
    # diffusers looks the first timestep up in the timesteps it holds now, then counts steps
    outs = []
    for cls in (IPNDMScheduler, DF):
        s = cls()
        s.set_timesteps(8)
        if how == "slice":
            s.timesteps = s.timesteps[3:]
        else:
            s.timesteps[0] += 0.5
        x = initial_sample()
        for t in s.timesteps[:4]:
            x = s.step(dummy_model(x, t), t, x).prev_sample
        outs.append((x, s.step_index))
    assert outs[0][1] == outs[1][1] and parity_error(outs[0][0], outs[1][0]) <= 1e-5


def test_a_compiled_step_function_compiles_once_and_equals_eager():
    from torch._dynamo.utils import counters

    def one_step(s, x, t):
        return s.step(torch.sin(s.scale_model_input(x, t)) * 0.5, t, x).prev_sample  # the model's part, compiled

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(one_step, backend="aot_eager")
    outs = []
    for f in (one_step, compiled):
        s = IPNDMScheduler()
        s.set_timesteps(10)
        x = initial_sample()
        for t in s.timesteps:
            x = f(s, x, t)
        outs.append(x)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()
