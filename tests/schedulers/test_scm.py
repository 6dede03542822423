import copy
import math
import pickle

import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.scm import SCMScheduler
from parity import diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, settings

DF = diffusers.SCMScheduler
# diffusers' default intermediate_timesteps (1.3) is for 2 steps only; other counts pass None
ANY_STEPS = dict(intermediate_timesteps=None)


def model(x, t):
    """The parity model at TrigFlow timesteps (angles up to pi/2), spread over its range."""
    return dummy_model(x, t * 600.0)


def loop(s, steps, x, seed=0, gen=None, guidance_scale=None, fused_cfg=False, begin_index=None, **set_kwargs):
    """sCM sampling as SANA-Sprint runs it: a step at every timestep but the last (0).
    Returns every step's (prev_sample, pred_original_sample)."""
    s.set_timesteps(steps, **set_kwargs)
    start = 0
    if begin_index is not None:
        s.set_begin_index(begin_index)
        start = begin_index
    gen = torch.Generator().manual_seed(seed) if gen is None else gen
    outs = []
    for t in s.timesteps[start:-1]:
        if guidance_scale is None:
            out = s.step(model(x, t), t, x, generator=gen)
        else:
            u, c = dummy_cfg(x, t * 600.0)
            if fused_cfg:
                out = s.step_cfg(u, c, guidance_scale, t, x, generator=gen)
            else:
                out = s.step(u + guidance_scale * (c - u), t, x, generator=gen)
        x = out.prev_sample
        outs.append((out.prev_sample, out.pred_original_sample))
    return outs


def assert_loop_parity(config, steps, x=None, tol=1e-5, **kwargs):
    x = initial_sample() if x is None else x
    kd, df = SCMScheduler(**config), DF(**config)
    got, expected = loop(kd, steps, x, **kwargs), loop(df, steps, x, **kwargs)
    assert kd.timesteps.dtype == df.timesteps.dtype == torch.float32
    assert torch.equal(kd.timesteps, df.timesteps), (kd.timesteps, df.timesteps)
    assert len(got) == len(expected) == len(df.timesteps) - 1 - (kwargs.get("begin_index") or 0)
    for (prev, x0), (prev_df, x0_df) in zip(got, expected):
        assert prev.dtype == x0.dtype == x.dtype
        assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
        assert parity_error(prev, prev_df) <= tol and parity_error(x0, x0_df) <= tol
    return got, expected


@pytest.mark.parametrize("steps", [1, 3, 4, 7])
@pytest.mark.parametrize("max_timesteps", [1.57080, 1.56454, 1.2])
def test_parity_evenly_spaced_steps(steps, max_timesteps):
    assert_loop_parity({}, steps, max_timesteps=max_timesteps, **ANY_STEPS)


@pytest.mark.parametrize("kwargs", [{}, dict(intermediate_timesteps=0.9),
                                    dict(max_timesteps=1.4, intermediate_timesteps=0.3), ANY_STEPS])
def test_parity_two_steps_with_intermediate_timesteps(kwargs):
    assert_loop_parity({}, 2, **kwargs)


@pytest.mark.parametrize("timesteps", [[1.5708, 1.2, 0.7, 0.2, 0.0], torch.tensor([1.5, 1.0, 0.4, 0.1]),
                                       [1.3, 0.0], torch.tensor([1.5708, 0.8, 0.8, 0.0], dtype=torch.float64)])
def test_parity_custom_timesteps(timesteps):
    # (a last timestep > 0 re-noises at the last step too; a repeated one takes a zero-length step)
    assert_loop_parity({}, len(timesteps) - 1, timesteps=timesteps, max_timesteps=None, **ANY_STEPS)


@pytest.mark.parametrize("config", [dict(sigma_data=1.0), dict(sigma_data=0.25, num_train_timesteps=50)])
def test_parity_configs(config):
    assert_loop_parity(config, 4, **ANY_STEPS)
    assert_loop_parity(config, 2)


def test_outputs_and_tuples_like_diffusers():
    kd, df = SCMScheduler(), DF()
    x = initial_sample()
    for s in (kd, df):
        s.set_timesteps(3, **ANY_STEPS)
    gens = [torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)]
    for k, (t_kd, t_df) in enumerate(zip(kd.timesteps[:-1], df.timesteps[:-1])):
        m = model(x, t_df)
        if k == 1:
            expected = df.step(m, t_df, x, generator=gens[1], return_dict=False)
            got = kd.step(m, t_kd, x, generator=gens[0], return_dict=False)
            assert isinstance(got, tuple) and len(got) == len(expected) == 2
        else:
            out_df = df.step(m, t_df, x, gens[1])  # generator by position, as diffusers orders it
            out = kd.step(m, t_kd, x, gens[0])
            assert list(out.keys()) == list(out_df.keys()) == ["prev_sample", "pred_original_sample"]
            assert out[0] is out.prev_sample and out["pred_original_sample"] is out.pred_original_sample
            got, expected = out.to_tuple(), out_df.to_tuple()
        for a, b in zip(got, expected):
            assert parity_error(a, b) < 1e-5
        x = got[0]
    # at the last step (t = 0, no noise added) the two outputs are equal, and two tensors as
    # diffusers' (editing one in place must not change the other)
    assert got[0] is not got[1] and torch.equal(got[0], got[1])
    assert kd.step_index == df.step_index == 3


def test_noise_follows_the_generator_draw_for_draw():
    x = initial_sample()
    a = loop(SCMScheduler(), 4, x, seed=1, **ANY_STEPS)[-1][0]
    b = loop(SCMScheduler(), 4, x, seed=2, **ANY_STEPS)[-1][0]
    assert parity_error(a, b) > 1e-3
    # diffusers draws at every step, the last (noiseless) one too: the generators end in the same state
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)]
    for s, gen in zip((SCMScheduler(), DF()), gens):
        loop(s, 2, x, gen=gen)
    assert torch.equal(torch.randn(4, generator=gens[0]), torch.randn(4, generator=gens[1]))
    # a list of generators draws per batch entry, as diffusers' randn_tensor does
    outs = [loop(s, 3, x, gen=[torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)], **ANY_STEPS)
            for s in (SCMScheduler(), DF())]
    assert parity_error(outs[0][-1][0], outs[1][-1][0]) < 1e-5
    # and without a generator, from torch's global one
    outs = []
    for s in (SCMScheduler(), DF()):
        s.set_timesteps(2)
        torch.manual_seed(21)
        t = s.timesteps[0]
        outs.append(s.step(model(x, t), t, x).prev_sample)
    assert parity_error(outs[0], outs[1]) < 1e-5


def test_variance_noise_replaces_the_draw():
    kd = SCMScheduler(sigma_data=0.7)
    x = initial_sample()
    outs = []
    for kw in (dict(generator=torch.Generator().manual_seed(7)),
               dict(variance_noise=torch.randn(x.shape, generator=torch.Generator().manual_seed(7)))):
        kd.set_timesteps(2)
        t = kd.timesteps[0]
        outs.append(kd.step(model(x, t), t, x, **kw))
    assert torch.equal(outs[0].prev_sample, outs[1].prev_sample)
    s, t = kd.timesteps[0].double(), kd.timesteps[1].double()
    x0 = torch.cos(s) * x.double() - torch.sin(s) * model(x, kd.timesteps[0]).double()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).double()
    assert parity_error(outs[0].pred_original_sample, x0) < 1e-6
    assert parity_error(outs[0].prev_sample, torch.cos(t) * x0 + torch.sin(t) * 0.7 * noise) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("steps, kwargs", [(1, ANY_STEPS), (2, {}), (5, ANY_STEPS)])
def test_half_precision_keeps_dtype_and_matches(dtype, steps, kwargs):
    # diffusers adds its float32 noise to a half-precision x0 and returns float32 samples; kdfast
    # keeps the latents' dtype. Its half loop is diffusers' loop with each sample cast back to
    # that dtype (what keeps a pipeline's latents in it), and it is held to the parity rule:
    # at most 2x that loop's error against the float32 loop.
    x = initial_sample()

    def half_loop(s):
        s.set_timesteps(steps, **kwargs)
        gen, y = torch.Generator().manual_seed(0), x.to(dtype)
        for t in s.timesteps[:-1]:
            out = s.step(model(y, t), t, y, generator=gen)
            assert out.pred_original_sample.dtype == dtype
            y = out.prev_sample.to(dtype)
        return y

    truth = loop(DF(), steps, x, **kwargs)[-1][0]
    outs = loop(SCMScheduler(), steps, x.to(dtype), **kwargs)
    assert all(prev.dtype == x0.dtype == dtype for prev, x0 in outs)
    got = outs[-1]
    err, base_err = parity_error(got[0], truth), parity_error(half_loop(DF()), truth)
    assert err <= 2 * base_err + 1e-4, (err, base_err)


def test_diffusers_returns_float32_for_half_latents():
    df = DF()
    df.set_timesteps(2)
    x = initial_sample(dtype=torch.float16)
    out = df.step(model(x, df.timesteps[0]), df.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == torch.float32 and out.pred_original_sample.dtype == torch.float16
    kd = SCMScheduler()
    kd.set_timesteps(2)
    out = kd.step(model(x, kd.timesteps[0]), kd.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == out.pred_original_sample.dtype == torch.float16


def test_noise_is_drawn_in_float32_whatever_the_model_outputs_dtype():
    # diffusers' randn_tensor is called without a dtype: float32 noise, even for a half-precision
    # model output (with a float32 sample its precision shows in the result)
    x = initial_sample()
    outs = []
    for kw in (dict(generator=torch.Generator().manual_seed(5)),
               dict(variance_noise=torch.randn(x.shape, generator=torch.Generator().manual_seed(5)))):
        s = SCMScheduler()
        s.set_timesteps(2)
        t = s.timesteps[0]
        outs.append(s.step(model(x, t).half(), t, x, **kw).prev_sample)
    assert outs[0].dtype == torch.float32 and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("steps, kwargs", [(2, {}), (4, ANY_STEPS)])
def test_fused_guidance_matches_diffusers_guidance(steps, kwargs):
    x = initial_sample()
    fused = loop(SCMScheduler(), steps, x, guidance_scale=3.0, fused_cfg=True, **kwargs)
    unfused = loop(SCMScheduler(), steps, x, guidance_scale=3.0, **kwargs)
    expected = loop(DF(), steps, x, guidance_scale=3.0, **kwargs)
    for (a, a0), (b, b0), (c, c0) in zip(fused, unfused, expected):
        assert parity_error(a, b) < 1e-6 and parity_error(a0, b0) < 1e-6
        assert parity_error(a, c) < 1e-5 and parity_error(a0, c0) < 1e-5


def test_one_fused_call_per_step(monkeypatch):
    kd = SCMScheduler()
    kd.set_timesteps(4, **ANY_STEPS)
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    x = initial_sample()
    gen = torch.Generator().manual_seed(0)
    for k, t in enumerate(kd.timesteps[:-1]):
        calls.clear()
        if k % 2:
            u, c = dummy_cfg(x, t)
            x, denoised = kd.step_cfg(u, c, 2.0, t, x, generator=gen, return_dict=False)
        else:
            x, denoised = kd.step(model(x, t), t, x, generator=gen, return_dict=False)  # SANA-Sprint's unpacking
        assert len(calls) == 1 and torch.isfinite(denoised).all()


def test_sana_sprint_loop():
    # SANA-Sprint scales the latents by sigma_data, sets begin index 0 and passes the timestep
    # expanded to the batch; it steps every timestep but the last and decodes denoised / sigma_data
    x = initial_sample()
    outs = []
    for s in (SCMScheduler(), DF()):
        s.set_timesteps(2, max_timesteps=1.5708, intermediate_timesteps=1.3)
        s.set_begin_index(0)
        gen = torch.Generator().manual_seed(0)
        latents = x * s.config.sigma_data
        for t in s.timesteps[:-1]:
            timestep = t.expand(latents.shape[0])
            noise_pred = model(latents / s.config.sigma_data, t) * s.config.sigma_data
            latents, denoised = s.step(noise_pred, timestep, latents, generator=gen, return_dict=False)
        outs.append(denoised / s.config.sigma_data)
    assert parity_error(outs[0], outs[1]) < 1e-5


def test_set_begin_index_and_timestep_lookup():
    x = initial_sample()
    assert_loop_parity({}, 5, x, begin_index=2, **ANY_STEPS)
    # without a begin index the first timestep is looked up; a value not in the schedule is an error
    kd = SCMScheduler()
    kd.set_timesteps(3, **ANY_STEPS)
    assert kd.index_for_timestep(kd.timesteps[2]) == 2 and kd.index_for_timestep(float(kd.timesteps[1])) == 1
    with pytest.raises(IndexError, match="not one of the schedule"):
        kd.step(x, 0.123, x)


def test_a_python_float_timestep_is_looked_up_in_the_schedules_dtype():
    # diffusers compares schedule == timestep: the literal 1.3 (diffusers' default intermediate
    # timestep) is float32 1.3 there; compared in float64 it matched nothing and step raised
    x = initial_sample()
    for value, index in ((1.5708, 0), (1.3, 1), (0.0, 2)):
        kd, df = SCMScheduler(), DF()
        kd.set_timesteps(2)
        df.set_timesteps(2)
        assert kd.index_for_timestep(value) == df.index_for_timestep(value) == index
    kd, df = SCMScheduler(), DF()
    kd.set_timesteps(2)
    df.set_timesteps(2)
    got = kd.step(model(x, kd.timesteps[1]), 1.3, x, generator=torch.Generator().manual_seed(0)).prev_sample
    want = df.step(model(x, df.timesteps[1]), 1.3, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert kd.step_index == df.step_index == 2
    assert parity_error(got, want) < 1e-5


def test_schedule_state_matches():
    kd, df = SCMScheduler(), DF()
    assert torch.equal(kd.timesteps, df.timesteps) and kd.timesteps.dtype == df.timesteps.dtype == torch.int64
    assert kd.num_inference_steps is df.num_inference_steps is None and kd.init_noise_sigma == df.init_noise_sigma
    assert len(kd) == len(df) == 1000 and kd.order == df.order == 1
    for steps, kwargs in ((2, {}), (5, ANY_STEPS), (1, dict(max_timesteps=0.9, **ANY_STEPS))):
        for s in (kd, df):
            s.set_timesteps(steps, **kwargs)
        assert torch.equal(kd.timesteps, df.timesteps) and kd.num_inference_steps == df.num_inference_steps == steps
        assert kd.step_index is df.step_index is None and kd.begin_index is df.begin_index is None


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = SCMScheduler(sigma_data=0.75, num_train_timesteps=500)
    kd.save_pretrained(tmp_path)
    again = SCMScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert df.config.sigma_data == 0.75 and df.config.num_train_timesteps == 500
    df.save_pretrained(tmp_path / "df")
    back = SCMScheduler.from_pretrained(tmp_path / "df")
    assert back.config.sigma_data == 0.75 and back.config.prediction_type == "trigflow"
    x = initial_sample()
    got, expected = loop(back, 3, x, **ANY_STEPS), loop(df, 3, x, **ANY_STEPS)
    assert parity_error(got[-1][0], expected[-1][0]) < 1e-5
    assert SCMScheduler.from_config(df.config).config.sigma_data == 0.75
    assert "SCMScheduler" in [c.__name__ for c in kd.compatibles]


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        SCMScheduler(prediction_type="epsilon")
    with pytest.raises(ValueError, match="sigma_data"):
        SCMScheduler(sigma_data=float("nan"))
    with pytest.raises(ValueError, match="num_train_timesteps"):
        SCMScheduler(num_train_timesteps=0)


def test_bad_set_timesteps_arguments():
    kd = SCMScheduler(num_train_timesteps=10)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
        kd.set_timesteps(0, **ANY_STEPS)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
        kd.set_timesteps(None)
    with pytest.raises(ValueError, match="cannot be larger than `self.config.train_timesteps`: 10"):
        kd.set_timesteps(11, **ANY_STEPS)
    with pytest.raises(ValueError, match="must be of length `num_inference_steps \\+ 1`"):
        kd.set_timesteps(3, timesteps=[1.5, 0.0], max_timesteps=None, **ANY_STEPS)
    with pytest.raises(ValueError, match="`max_timesteps` should not be provided"):
        kd.set_timesteps(1, timesteps=[1.5, 0.0], **ANY_STEPS)
    with pytest.raises(ValueError, match="either `timesteps` or `max_timesteps`"):
        kd.set_timesteps(3, max_timesteps=None, **ANY_STEPS)
    with pytest.raises(ValueError, match="num_inference_steps != 2"):
        kd.set_timesteps(3)
    with pytest.raises(ValueError, match="Unsupported timesteps type"):
        kd.set_timesteps(1, timesteps=(1.5, 0.0), max_timesteps=None, **ANY_STEPS)
    with pytest.raises(ValueError, match="timesteps must be finite"):
        kd.set_timesteps(1, timesteps=[float("nan"), 0.0], max_timesteps=None, **ANY_STEPS)
    with pytest.raises(ValueError, match="max_timesteps must be finite"):
        kd.set_timesteps(3, max_timesteps=float("inf"), **ANY_STEPS)


def test_bad_step_input():
    kd = SCMScheduler()
    x = initial_sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, 1.0, x)
    kd.set_timesteps(2)
    t = kd.timesteps[0]
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], t, x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), t, x)
    with pytest.raises(TypeError, match="unexpected step arguments: eta"):
        kd.step_cfg(x, x, 2.0, t, x, eta=0.5)
    with pytest.raises(ValueError, match=r"noise must have the shape of sample \(2, 4, 8, 8\)"):
        kd.step(x, t, x, variance_noise=x[:1])
    kd.set_timesteps(2)
    for t in kd.timesteps[:-1]:
        x = kd.step(model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end of the 2-step schedule"):
        kd.step(x, kd.timesteps[-1], x)


def test_step_needs_no_host_read():
    kd = SCMScheduler()
    kd.set_timesteps(4, **ANY_STEPS)
    x = initial_sample()
    gen = torch.Generator().manual_seed(0)

    for k, t in enumerate(list(kd.timesteps[:-1])):  # no begin index: the first timestep is looked up
        u, c = dummy_cfg(x, t)
        with no_host_reads():
            if k % 2:
                x = kd.step_cfg(u, c, 2.0, t, x, generator=gen).prev_sample
            else:
                x = kd.step(u, t, x, generator=gen, return_dict=False)[0]
    assert torch.isfinite(x).all()


def test_trigflow_update_by_hand():
    # x0 = cos(s) x - sin(s) v; prev = cos(t) x0 + sin(t) sigma_data z, in float64
    kd = SCMScheduler(sigma_data=0.5)
    kd.set_timesteps(3, max_timesteps=1.5, **ANY_STEPS)
    x, v, z = initial_sample(), initial_sample(seed=1), initial_sample(seed=2)
    s, t = (float(v_) for v_ in kd.timesteps[:2])
    out = kd.step(v, kd.timesteps[0], x, variance_noise=z)
    x0 = math.cos(s) * x.double() - math.sin(s) * v.double()
    assert parity_error(out.pred_original_sample, x0) < 1e-6
    assert parity_error(out.prev_sample, math.cos(t) * x0 + math.sin(t) * 0.5 * z.double()) < 1e-6


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    s = SCMScheduler()
    s.set_timesteps(5, **ANY_STEPS)
    x = initial_sample()
    x = s.step(model(x, s.timesteps[0]), s.timesteps[0], x, generator=torch.Generator().manual_seed(0)).prev_sample
    twin = copy.deepcopy(s) if how == "deepcopy" else pickle.loads(pickle.dumps(s))
    assert dict(twin.config) == dict(s.config) and twin.step_index == s.step_index == 1
    for i, t in enumerate(s.timesteps[1:-1]):
        a = s.step(model(x, t), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        b = twin.step(model(x, t), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        assert torch.equal(a, b)
        x = a


def test_a_loop_under_inference_mode_equals_one_under_no_grad():
    outs = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            outs.append(loop(SCMScheduler(), 4, initial_sample(), **ANY_STEPS))
    for (a, a0), (b, b0) in zip(*outs):
        assert torch.equal(a, b) and torch.equal(a0, b0)


def test_an_unknown_step_keyword_is_an_error_like_diffusers():
    s = SCMScheduler()
    s.set_timesteps(2)
    x = initial_sample()
    t = s.timesteps[0]
    for call in (lambda: s.step(x, t, x, bogus_option=1), lambda: s.step_cfg(x, x, 2.0, t, x, bogus_option=1),
                 lambda: DF().step(x, t, x, bogus_option=1)):
        with pytest.raises(TypeError, match="bogus_option"):
            call()
    assert s.step_index is None  # nothing was stepped
