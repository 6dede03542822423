"""kdfast's HeliosScheduler against diffusers': the multi-stage schedule, the loops of Helios' two
pipelines (pyramid stages, custom sigmas and mu), every solver option, dtypes, one fused pass per
step without host reads, outputs, indices, configs and errors."""
import copy
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.schedulers import base
from kdfast.schedulers.helios import HeliosScheduler, HeliosSchedulerOutput
from parity import diffusers, dummy_model, initial_sample, no_host_reads, parity_error, settings

DF = diffusers.HeliosScheduler
KD = HeliosScheduler
SHAPE = (2, 4, 3, 8, 8)  # video latents [batch, channels, frames, height, width]


def step_loop(s, x, n, *set_args, output_dtype=None, guidance=None, **set_kwargs):
    """pipeline_helios' loop: set_timesteps, then the model and step at each timestep."""
    s.set_timesteps(n, *set_args, **set_kwargs)
    for t in s.timesteps:
        if guidance is None:
            m = dummy_model(x, t)
        else:
            u, c = dummy_model(x, t), dummy_model(0.97 * x + 0.02, t)
            m = u + guidance * (c - u)
        x = s.step(m if output_dtype is None else m.to(output_dtype), t, x, return_dict=False)[0]
    return x


def stage_noise(stage, shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + stage)).to(dtype)


def pyramid_loop(s, x, steps, mu=None, dtype=None):
    """pipeline_helios_pyramid's (non-distilled) loop: each stage's schedule, the latents upsampled
    2x between stages and renoised with the scheduler's ori_start_sigmas and gamma."""
    for stage, n in enumerate(steps):
        s.set_timesteps(n, stage, mu=mu, is_amplify_first_chunk=False)
        if stage > 0:
            b, c, f, h, w = x.shape
            x = F.interpolate(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), size=(2 * h, 2 * w), mode="nearest")
            x = x.reshape(b, f, c, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)
            ori_sigma = 1 - s.ori_start_sigmas[stage]
            gamma = s.config.gamma
            alpha = 1 / (math.sqrt(1 + (1 / gamma)) * (1 - ori_sigma) + ori_sigma)
            beta = alpha * (1 - ori_sigma) / math.sqrt(gamma)
            x = alpha * x + beta * stage_noise(stage, x.shape, x.dtype)
        for t in s.timesteps:
            x = s.step(dummy_model(x, t), t, x, return_dict=False)[0]
    return x


def small():
    return initial_sample((1, 4, 2, 4, 4))


# ---------------------------------------------------------------- schedule


SCHEDULE_CASES = [
    (dict(), dict(stage_index=0)), (dict(), dict(stage_index=1)), (dict(), dict(stage_index=2)),
    (dict(shift=3.0), dict(stage_index=2)),
    (dict(use_dynamic_shifting=True), dict(stage_index=1, mu=0.8)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(stage_index=0, mu=1.1)),
    (dict(stages=2, stage_range=[0, 0.5, 1], gamma=0.5), dict(stage_index=1)),
    (dict(stages=1), dict()), (dict(stages=1, shift=3.0), dict()),
    (dict(stages=1, time_shift_type="linear", shift=2.0), dict()),
    (dict(stages=1, use_dynamic_shifting=True), dict(mu=0.9)),
    (dict(stages=1), dict(sigmas=np.linspace(0.999, 0.0, 8)[:-1])),  # pipeline_helios' sigmas (float64)
    (dict(stages=1, use_dynamic_shifting=True), dict(sigmas=np.linspace(0.999, 0.0, 8)[:-1], mu=1.15)),
    (dict(stages=1), dict(sigmas=np.linspace(0.9, 0.1, 7).astype(np.float32))),  # float32 stays float32
    (dict(scheduler_type="dmd"), dict(stage_index=1, is_amplify_first_chunk=True)),
    (dict(scheduler_type="dmd", stages=1), dict()),
]


@pytest.mark.parametrize("config, kwargs", SCHEDULE_CASES, ids=[f"{c}-{k}" for c, k in SCHEDULE_CASES])
def test_schedule_equals_diffusers_bit_for_bit(config, kwargs):
    kd, df = KD(**config), DF(**config)
    for a, b in ((kd.timesteps, df.timesteps), (kd.sigmas, df.sigmas)):  # the training schedule
        assert a.dtype == b.dtype and torch.equal(a, b)
    for name in ("timestep_ratios", "start_sigmas", "end_sigmas", "ori_start_sigmas"):
        assert getattr(kd, name) == getattr(df, name), name
    for name in ("timesteps_per_stage", "sigmas_per_stage"):
        got, want = getattr(kd, name), getattr(df, name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    assert (kd.sigma_min, kd.sigma_max, kd.gamma) == (df.sigma_min, df.sigma_max, df.gamma)
    for n in (1, 7, 30):
        kd.set_timesteps(n, **kwargs)
        df.set_timesteps(n, **kwargs)
        for a, b in ((kd.timesteps, df.timesteps), (kd.sigmas, df.sigmas)):
            assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), (n, a, b)
        assert kd.num_inference_steps == df.num_inference_steps
        assert kd.step_index is df.step_index is None and kd.begin_index is df.begin_index is None
    assert len(kd) == len(df) == 1000 and kd.order == df.order == 1


# ---------------------------------------------------------------- parity


PYRAMID_CONFIGS = [
    {}, dict(solver_order=1), dict(solver_order=3), dict(solver_type="bh1"), dict(solver_type="bh1", solver_order=3),
    dict(lower_order_final=False), dict(disable_corrector=[0, 2, 5]), dict(shift=3.0), dict(use_flow_sigmas=False),
    dict(prediction_type="epsilon"), dict(prediction_type="v_prediction"), dict(prediction_type="sample"),
    dict(scheduler_type="euler"), dict(use_dynamic_shifting=True),
    dict(use_dynamic_shifting=True, time_shift_type="linear"),
    dict(solver_type="midpoint", solver_order=3, gamma=0.5),
]


@pytest.mark.parametrize("config", PYRAMID_CONFIGS, ids=[str(c) for c in PYRAMID_CONFIGS])
def test_pyramid_pipeline_loops_match_diffusers(config):
    # every stage, with the pipeline's stage transitions (2x upsampling, renoising): 10 to 50 steps a stage
    mu = 0.8 if config.get("use_dynamic_shifting") else None
    for steps in ([10, 10, 10], [20, 30, 50]):
        df = DF(**config)
        kd = KD.from_config(df.config)
        expected, got = pyramid_loop(df, small(), steps, mu), pyramid_loop(kd, small(), steps, mu)
        assert got.shape == expected.shape == (1, 4, 2, 16, 16) and got.dtype == expected.dtype == torch.float32
        assert torch.isfinite(got).all()
        err = parity_error(got, expected)
        assert err <= 1e-5, (config, steps, err)
        assert kd.step_index == df.step_index == steps[-1]


STAGE1_CONFIGS = [
    ({}, {}), (dict(solver_order=1), {}), (dict(shift=3.0), {}), (dict(scheduler_type="euler"), {}),
    (dict(lower_order_final=False), {}), (dict(use_flow_sigmas=False), {}), (dict(solver_type="heun"), {}),
    (dict(use_dynamic_shifting=True), dict(mu=0.9)),
    # pipeline_helios: sigmas = linspace(0.999, 0, n + 1)[:-1] and its mu
    (dict(), dict(pipeline_sigmas=True)), (dict(solver_order=3), dict(pipeline_sigmas=True)),
    (dict(solver_type="bh1"), dict(pipeline_sigmas=True)),
    (dict(use_dynamic_shifting=True), dict(pipeline_sigmas=True, mu=1.0)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear", solver_order=3), dict(pipeline_sigmas=True, mu=0.7)),
    (dict(scheduler_type="euler", use_dynamic_shifting=True), dict(pipeline_sigmas=True, mu=1.0)),
    (dict(prediction_type="v_prediction"), dict(pipeline_sigmas=True)),
]


@pytest.mark.parametrize("config, kwargs", STAGE1_CONFIGS, ids=[f"{c}-{k}" for c, k in STAGE1_CONFIGS])
@pytest.mark.parametrize("steps", [10, 50])
def test_single_stage_loops_match_diffusers(config, kwargs, steps):
    kwargs = dict(kwargs)
    if kwargs.pop("pipeline_sigmas", False):
        kwargs["sigmas"] = np.linspace(0.999, 0.0, steps + 1)[:-1]
    df = DF(stages=1, **config)
    kd = KD.from_config(df.config)
    x = initial_sample(SHAPE)
    expected, got = step_loop(df, x, steps, **kwargs), step_loop(kd, x, steps, **kwargs)
    assert torch.equal(kd.sigmas, df.sigmas) and torch.isfinite(got).all()
    err = parity_error(got, expected)
    assert err <= 1e-5, (config, steps, err)


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 16, 2, 6, 10), (3, 4, 8, 8), (2, 7)])
def test_each_stage_and_shape(stage, shape):
    # (UniPC's einsum needs no particular rank: 4-D images and 2-D tensors step as well)
    x = initial_sample(shape)
    for config in ({}, dict(solver_order=3, use_dynamic_shifting=True)):
        kwargs = dict(mu=0.75) if config else {}
        expected = step_loop(DF(**config), x, 12, stage, **kwargs)
        got = step_loop(KD(**config), x, 12, stage, **kwargs)
        assert got.shape == shape and parity_error(got, expected) <= 1e-5


@pytest.mark.parametrize("config", [
    dict(solver_order=3, lower_order_final=False), dict(prediction_type="epsilon", predict_x0=False),
    dict(prediction_type="v_prediction", predict_x0=False), dict(prediction_type="sample", predict_x0=False)])
def test_ill_conditioned_options_are_as_accurate_as_diffusers(config):
    # These updates are ill-conditioned in float32: with predict_x0=False the first step multiplies the sample by
    # alpha_t / alpha_s0 ~ 100 (alpha = 1 - 0.999); an order-3 last step into sigma = 1e-8 (h ~ 11.5) combines
    # model outputs with coefficients ~30. diffusers' own float32 loop is 1e-5 to 1e-3 off its float64 one, so
    # kdfast is held to DESIGN.md's rule against that float64 truth: at most ~2x diffusers' error.
    x = initial_sample(SHAPE)
    for stage, steps in ((0, 10), (2, 30)):
        truth = step_loop(DF(**config), x.double(), steps, stage)
        expected, got = step_loop(DF(**config), x, steps, stage), step_loop(KD(**config), x, steps, stage)
        err, base_err = parity_error(got, truth), parity_error(expected, truth)
        assert err <= 2 * base_err + 1e-6, (config, stage, err, base_err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [{}, dict(solver_order=3), dict(scheduler_type="euler"),
                                    dict(stages=1, use_dynamic_shifting=True)],
                         ids=["unipc", "order3", "euler", "1stage"])
def test_half_precision_within_twice_diffusers_error(dtype, config):
    x = initial_sample(SHAPE)
    kwargs = dict(sigmas=np.linspace(0.999, 0.0, 21)[:-1], mu=1.0) if config.get("stages") == 1 else dict(stage_index=1)
    truth = step_loop(DF(**config), x.double(), 20, **kwargs)
    expected = step_loop(DF(**config), x.to(dtype), 20, **kwargs)
    got = step_loop(KD(**config), x.to(dtype), 20, **kwargs)
    assert got.dtype == expected.dtype == dtype and torch.isfinite(got).all()
    err, base_err = parity_error(got, truth), parity_error(expected, truth)
    assert err <= 2 * base_err, (err, base_err)


@pytest.mark.parametrize("scheduler_type", ["unipc", "euler"])
@pytest.mark.parametrize("output_dtype", [torch.bfloat16, torch.float16])
def test_float32_latents_with_a_half_precision_transformer(scheduler_type, output_dtype):
    # Both pipelines keep float32 latents and get the transformer's output in its dtype: diffusers converts it to
    # x0 in float32 (the history stays float32); kdfast too. The outputs: UniPC the sample's dtype, Euler the model
    # output's (diffusers casts its float32 result to it).
    # Step by step from the same inputs, against diffusers' step in float64 on the same half-precision outputs:
    # diffusers rounds sigma * v (UniPC) or (sigma_next - sigma) * v (Euler) to the half dtype before using it,
    # kdfast keeps float32 (a half-precision history would be ~1e-3 off).
    config = dict(scheduler_type=scheduler_type)
    kd, df, df64 = KD(**config), DF(**config), DF(**config)
    for s in (kd, df, df64):
        s.set_timesteps(20, 1)
    x = initial_sample(SHAPE)
    for t_kd, t_df in zip(kd.timesteps, df.timesteps):
        m = dummy_model(x, t_kd).to(output_dtype)
        got, want = kd.step(m, t_kd, x).prev_sample, df.step(m, t_df, x).prev_sample
        truth = df64.step(m.double(), t_df, x.double()).prev_sample
        assert got.dtype == want.dtype == (torch.float32 if scheduler_type == "unipc" else output_dtype)
        if scheduler_type == "unipc":
            assert parity_error(got, truth) <= 1e-6, parity_error(got, truth)
        else:  # (both rounded to the half dtype at the end)
            assert parity_error(got, truth) <= torch.finfo(output_dtype).eps * 4
        assert parity_error(got, truth) <= 2 * parity_error(want, truth) + 1e-6
        x = want.float()
    if scheduler_type == "unipc":
        assert all(m.dtype == torch.float32 for m in kd.model_outputs)
    # whole loops: a rounding of the model output can flip with the sample's last bit, so they are held to
    # DESIGN.md's rule against the float64 loop
    x = initial_sample(SHAPE)
    truth = step_loop(DF(**config), x.double(), 20, 1)
    expected = step_loop(DF(**config), x, 20, 1, output_dtype=output_dtype)
    got = step_loop(KD(**config), x, 20, 1, output_dtype=output_dtype)
    assert parity_error(got, truth) <= 2 * parity_error(expected, truth)


def test_float64_samples_step_in_float64():
    x = initial_sample(SHAPE, torch.float64)
    for config in ({}, dict(solver_order=3)):
        expected, got = step_loop(DF(**config), x, 20, 1), step_loop(KD(**config), x, 20, 1)
        assert got.dtype == expected.dtype == torch.float64
        assert parity_error(got, expected) <= 1e-12


def test_model_outputs_last_sample_and_orders_follow_diffusers():
    # the state a pipeline could read after each step: history (converted outputs), last_sample, orders
    for config in ({}, dict(solver_order=3, disable_corrector=[1])):
        kd, df = KD(**config), DF(**config)
        for s in (kd, df):
            s.set_timesteps(8, 2)
        x = initial_sample(SHAPE)
        for t_kd, t_df in zip(kd.timesteps, df.timesteps):
            m = dummy_model(x, t_kd)
            got, want = kd.step(m, t_kd, x), df.step(m, t_df, x)
            assert got.this_order == want.this_order == kd.this_order == df.this_order
            assert kd.lower_order_nums == df.lower_order_nums and kd.step_index == df.step_index
            assert parity_error(got.last_sample, want.last_sample) <= 1e-6
            for a, b in zip(kd.model_outputs, df.model_outputs):
                assert (a is None) == (b is None) and (a is None or parity_error(a, b) <= 1e-6)
            assert [None if v is None else float(v) for v in kd.timestep_list] == \
                   [None if v is None else float(v) for v in df.timestep_list]
            x = want.prev_sample


def test_convert_model_output_matches_diffusers():
    for config in ({}, dict(prediction_type="epsilon"), dict(prediction_type="v_prediction", predict_x0=False)):
        kd, df = KD(**config), DF(**config)
        for s in (kd, df):
            s.set_timesteps(6, 1)
        x = initial_sample(SHAPE)
        for s in (kd, df):
            s.step(dummy_model(x, 900), s.timesteps[0], x)
        m = dummy_model(x, 800)
        assert parity_error(kd.convert_model_output(m, sample=x), df.convert_model_output(m, sample=x)) <= 1e-6
    with pytest.raises(NotImplementedError, match="custom sigma"):
        kd.convert_model_output(m, sample=x, sigma=torch.tensor(0.5))
    with pytest.raises(ValueError, match="needs a step index"):
        KD().convert_model_output(m, sample=x)


# ---------------------------------------------------------------- undefined steps


def test_steps_where_diffusers_gives_nan_are_refused():
    # stages=1 without custom sigmas starts at sigma = 1 (alpha = 0, log-SNR -inf): diffusers' order-3 steps and
    # epsilon conversions there are NaN, kdfast raises (the order-2 default is finite in both, and equal)
    x = initial_sample(SHAPE)
    for config, match in ((dict(stages=1, solver_order=3), "predictor order 3, corrector order 2"),
                          (dict(stages=1, prediction_type="epsilon"), "step 0")):
        assert not torch.isfinite(step_loop(DF(**config), x, 10)).all()
        with pytest.raises(ValueError, match=match):
            step_loop(KD(**config), x, 10)
    assert parity_error(step_loop(KD(stages=1), x, 10), step_loop(DF(stages=1), x, 10)) <= 1e-5
    # bh1 from sigma = 1: B(h) = -inf; diffusers' first step is -inf * 0 (NaN), kdfast's the finite limit; its
    # second step (the corrector needs B(h)) is refused
    s = KD(stages=1, solver_type="bh1")
    s.set_timesteps(10)
    y = s.step(dummy_model(x, 1000), s.timesteps[0], x).prev_sample
    assert torch.isfinite(y).all()
    sigma = s.sigmas[1].item()  # x0 = x - v at sigma = 1; the step: (1 - sigma_1) x0 + sigma_1 x
    assert parity_error(y, (1 - sigma) * (x - dummy_model(x, 1000)) + sigma * x) <= 1e-6
    with pytest.raises(ValueError, match="step 1: the UniPC update"):
        s.step(dummy_model(y, 900), s.timesteps[1], y)
    assert s.step_index == 1  # (a refused step changes nothing)


# ---------------------------------------------------------------- the step path


@pytest.mark.parametrize("config", [{}, dict(solver_order=3), dict(scheduler_type="euler")],
                         ids=["unipc", "order3", "euler"])
def test_one_fused_pass_per_step(monkeypatch, config):
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    s = KD(**config)
    for stage in range(3):
        s.set_timesteps(7, stage)
        x = initial_sample(SHAPE)
        for i, t in enumerate(s.timesteps):
            corrector = s.this_order if i else 0
            x = s.step(dummy_model(x, t), t, x).prev_sample
            assert len(calls) == 7 * stage + i + 1
            if config.get("scheduler_type") != "euler":
                # the sample to correct comes in as aux (from the second step on), with the history both updates read
                assert (calls[-1][6] is not None) == (i > 0) and calls[-1][10] and calls[-1][11] == (i > 0)
                assert len(calls[-1][5]) == max(corrector, s.this_order - 1)


def test_pipeline_loops_make_no_host_reads():
    x = initial_sample(SHAPE)
    for config, kwargs in (({}, dict(stage_index=1)), (dict(solver_order=3), dict(stage_index=2)),
                           (dict(scheduler_type="euler"), dict(stage_index=0)),
                           (dict(stages=1, use_dynamic_shifting=True),
                            dict(sigmas=np.linspace(0.999, 0, 9)[:-1], mu=1.0))):
        s = KD(**config)
        s.set_timesteps(8, **kwargs)
        y = x
        for k, t in enumerate(s.timesteps):
            u, c = dummy_model(y, t), dummy_model(0.5 * y, t).bfloat16()
            with no_host_reads("cpu", "numpy"):
                if k % 2:
                    y = s.step_cfg(u, c, 3.0, t, y, return_dict=False)[0]
                else:
                    y = s.step(u, t, y, generator=None, return_dict=False)[0]
        assert s.step_index == 8 and torch.isfinite(y).all()


@pytest.mark.parametrize("config", [{}, dict(scheduler_type="euler")])
def test_fused_guidance_equals_guidance_outside(config):
    x = initial_sample(SHAPE)
    expected = step_loop(DF(**config), x, 12, 1, guidance=4.0)
    s = KD(**config)
    s.set_timesteps(12, 1)
    y = x
    for t in s.timesteps:
        y = s.step_cfg(dummy_model(y, t), dummy_model(0.97 * y + 0.02, t), 4.0, t, y).prev_sample
    assert parity_error(y, expected) <= 1e-5


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("config", [dict(stages=1), dict(scheduler_type="euler", stages=1)])
def test_kdfast_sample_runs_the_pipeline_loop(config, guided):
    def model(x, t, cond=None):
        m = dummy_model(x, t)
        return m if cond is None else m + 0.1 * cond

    x = initial_sample(SHAPE)
    kwargs = dict(guidance_scale=3.0, cond=torch.full_like(x, 0.5), uncond=torch.zeros_like(x)) if guided else {}
    s = KD(**config)
    s.set_timesteps(10, sigmas=np.linspace(0.999, 0, 11)[:-1])
    got = kdfast.sample(model, x, s, disable=True, **kwargs)
    df = DF(**config)
    df.set_timesteps(10, sigmas=np.linspace(0.999, 0, 11)[:-1])
    y = x
    for t in df.timesteps:
        if guided:
            u, c = model(y, t, kwargs["uncond"]), model(y, t, kwargs["cond"])
            m = u + 3.0 * (c - u)
        else:
            m = model(y, t)
        y = df.step(m, t, y).prev_sample
    assert parity_error(got, y) <= 1e-5


# ---------------------------------------------------------------- outputs, indices, copies


def test_outputs_and_tuples_like_diffusers():
    x = initial_sample(SHAPE)
    for config in ({}, dict(scheduler_type="euler")):
        kd, df = KD(**config), DF(**config)
        for s in (kd, df):
            s.set_timesteps(4, 0)
        m = dummy_model(x, 999)
        got, want = kd.step(m, kd.timesteps[0], x, return_dict=False), df.step(m, df.timesteps[0], x, return_dict=False)
        assert isinstance(got, tuple) and len(got) == len(want)
        if config:
            assert len(got) == 1
        else:  # (prev_sample, model_outputs=None, last_sample, this_order), as diffusers returns it
            assert got[1] is None and want[1] is None and got[2] is x and want[2] is x and got[3] == want[3] == 1
        assert parity_error(got[0], want[0]) <= 1e-6
        out, out_df = kd.step(m, kd.timesteps[1], x), df.step(m, df.timesteps[1], x)
        assert type(out).__name__ == type(out_df).__name__ == "HeliosSchedulerOutput"
        assert isinstance(out, HeliosSchedulerOutput)
        assert list(out.keys()) == list(out_df.keys())
        assert out[0] is out.prev_sample and out["prev_sample"] is out.prev_sample and out.model_outputs is None
        assert len(out.to_tuple()) == len(out_df.to_tuple())
        if not config:
            assert out.this_order == out_df.this_order == 2
            assert parity_error(out.last_sample, out_df.last_sample) <= 1e-6 and out.last_sample is not x
        a = kd.step(m, kd.timesteps[2], x, None, False)  # generator and return_dict by position
        assert isinstance(a, tuple) and parity_error(a[0], df.step(m, df.timesteps[2], x, None, False)[0]) <= 1e-6


def test_step_index_and_begin_index_like_diffusers():
    x = initial_sample(SHAPE)
    for config in ({}, dict(scheduler_type="euler")):
        seen = []
        for cls in (DF, KD):
            s = cls(**config)
            s.set_timesteps(6, 1)
            s.set_begin_index(3)  # recorded, not used: diffusers' Helios steps start at index 0
            y, indices = x, [s.step_index]
            for t in s.timesteps[3:]:
                y = s.step(dummy_model(y, t), t, y).prev_sample
                indices.append(s.step_index)
            seen.append((y, indices, s.begin_index))
            s.set_timesteps(6, 2)
            assert s.step_index is None and s.begin_index is None
        assert seen[0][1:] == seen[1][1:] == ([None, 1, 2, 3], 3)
        assert parity_error(seen[1][0], seen[0][0]) <= 1e-6


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    s = KD(solver_order=3)
    s.set_timesteps(8, 1)
    x = initial_sample(SHAPE)
    for t in s.timesteps[:3]:
        x = s.step(dummy_model(x, t), t, x).prev_sample
    twin = copy.deepcopy(s) if how == "deepcopy" else pickle.loads(pickle.dumps(s))
    for i in range(3, 8):
        m = dummy_model(x, s.timesteps[i])
        a, b = s.step(m, s.timesteps[i], x).prev_sample, twin.step(m, twin.timesteps[i], x).prev_sample
        assert torch.equal(a, b)
        x = a


def test_assigned_and_edited_sigmas_are_followed_like_diffusers():
    x = initial_sample(SHAPE)
    outs = []
    for cls in (DF, KD):
        s = cls(solver_order=3)
        s.set_timesteps(8, 1)
        s.sigmas = s.sigmas * 0.9  # assigned
        y = x
        for i, t in enumerate(s.timesteps):
            if i == 4:
                s.sigmas[6] = 0.2  # edited in place, mid-loop
            y = s.step(dummy_model(y, t), t, y).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) <= 1e-5


def test_a_shorter_assigned_schedule_lowers_the_final_orders_like_diffusers():
    # lower_order_final counts the steps left in timesteps, as diffusers does
    x = initial_sample(SHAPE)
    outs = []
    for cls in (DF, KD):
        s = cls(solver_order=3)
        s.set_timesteps(10, 0)
        s.timesteps = s.timesteps[:7]
        outs.append((step_loop_no_set(s, x), s.this_order))
    assert outs[0][1] == outs[1][1] == 1 and parity_error(outs[1][0], outs[0][0]) <= 1e-5


def step_loop_no_set(s, x):
    for t in s.timesteps:
        x = s.step(dummy_model(x, t), t, x).prev_sample
    return x


# ---------------------------------------------------------------- config


def test_config_keys_defaults_and_round_trips(tmp_path):
    assert list(settings(KD().config)) == list(settings(DF().config))
    assert settings(KD().config) == settings(DF().config)
    kd = KD(num_train_timesteps=800, shift=2.0, stages=2, stage_range=[0, 0.4, 1], gamma=0.25, solver_order=3,
            solver_type="bh1", lower_order_final=False, disable_corrector=[2], scheduler_type="euler",
            time_shift_type="linear", prediction_type="v_prediction")
    kd.save_pretrained(tmp_path)
    assert settings(KD.from_pretrained(tmp_path).config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert settings(df.config) == settings(kd.config)
    df.save_pretrained(tmp_path / "df")
    again = KD.from_pretrained(tmp_path / "df")
    assert settings(again.config) == settings(kd.config)
    x = small()
    assert parity_error(pyramid_loop(again, x, [5, 7]), pyramid_loop(DF.from_config(df.config), x, [5, 7])) <= 1e-5
    assert KD(solver_type="logrho").config.solver_type == DF(solver_type="logrho").config.solver_type == "bh2"
    assert KD.from_config(DF(stages=1).config).config.stages == 1
    assert set(KD.from_config(DF().config).config["_use_default_values"]) == set(DF().config["_use_default_values"])
    assert KD.diffusers_class_name() == "HeliosScheduler" and DF in KD().compatibles


def test_pipeline_attributes():
    # what pipeline_helios_pyramid reads besides timesteps and sigmas
    kd, df = KD(gamma=0.2), DF(gamma=0.2)
    assert kd.config.gamma == df.config.gamma == 0.2
    assert kd.config.get("base_image_seq_len", 256) == 256  # (the pipelines' fallbacks for keys it lacks)
    assert kd.ori_start_sigmas == df.ori_start_sigmas and kd.order == df.order


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(solver_type="dpm"), ValueError, "solver_type='dpm' is not supported"),
    (dict(scheduler_type="heun"), ValueError, "scheduler_type='heun' is not supported"),
    (dict(prediction_type="x0"), ValueError, "prediction_type='x0' is not supported"),
    (dict(time_shift_type="cosine"), ValueError, "time_shift_type='cosine' is not supported"),
    (dict(solver_order=4), ValueError, "solver_order must be 1, 2 or 3"),
    (dict(solver_order=0), ValueError, "solver_order must be an integer >= 1"),
    (dict(thresholding=True), ValueError, "thresholding=True is not supported with predict_x0=True"),
    (dict(solver_p=object()), ValueError, "solver_p is not supported"),
    (dict(predict_x0=False), ValueError, "needs predict_x0=True"),
    (dict(disable_corrector=[1.5]), ValueError, "disable_corrector must be a list of step indices"),
    (dict(stages=0), ValueError, "stages must be an integer >= 1"),
    (dict(stages=3, stage_range=[0, 0.5, 1]), ValueError, "stage_range must be a list of"),
    (dict(stage_range=[0, 0.6, 0.3, 1]), ValueError, "stage_range must ascend"),
    (dict(stages=1, stage_range=[1, 1]), ValueError, "every stage must start below 1"),
    (dict(gamma=0.0), ValueError, "gamma must be > 0"),
    (dict(shift=-1.0), ValueError, "shift must be > 0"),
    (dict(shift=float("nan")), ValueError, "shift must be a finite number"),
    (dict(num_train_timesteps=1), ValueError, "num_train_timesteps must be an integer >= 2"),
    (dict(use_flow_sigmas="yes"), ValueError, "use_flow_sigmas must be True or False"),
])
def test_constructor_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        KD(**kwargs)


def test_step_unipc_and_step_euler_are_diffusers():
    # the two solvers' own entry points (diffusers' step dispatches to them); step_euler runs on a UniPC
    # scheduler too, as in diffusers
    x = initial_sample(SHAPE)
    for name in ("step_unipc", "step_euler"):
        outs = []
        for cls in (DF, KD):
            s = cls()
            s.set_timesteps(6, 1)
            y = x
            for t in s.timesteps:
                y = getattr(s, name)(dummy_model(y, t), t, y, return_dict=False)[0]
            outs.append(y)
        assert parity_error(outs[1], outs[0]) <= 1e-5, name


def test_unipc_only_options_are_taken_by_the_euler_path_as_in_diffusers():
    config = dict(scheduler_type="euler", thresholding=True, predict_x0=False, solver_order=4, solver_p=None)
    x = initial_sample(SHAPE)
    assert parity_error(step_loop(KD(**config), x, 10, 1), step_loop(DF(**config), x, 10, 1)) <= 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_thresholding_is_ignored_by_the_unipc_path_without_predict_x0_as_in_diffusers(prediction_type):
    # (the loops are compared with thresholding off: v_prediction without predict_x0 is ill-conditioned in
    # float32, see test_ill_conditioned_options_are_as_accurate_as_diffusers)
    config = dict(predict_x0=False, prediction_type=prediction_type)
    x = initial_sample(SHAPE)
    for cls in (KD, DF):
        assert torch.equal(step_loop(cls(thresholding=True, **config), x, 10, 1), step_loop(cls(**config), x, 10, 1))


def test_set_timesteps_errors_name_the_argument():
    for args, kwargs, match in [
        ((10,), {}, r"stage_index must be given \(0 to 2\) when stages=3"),
        ((10, 3), {}, "stage_index must be below stages=3"),
        ((10, -1), {}, "stage_index must be an integer >= 0"),
        ((0, 1), {}, "num_inference_steps must be an integer >= 1"),
        ((2.5, 1), {}, "num_inference_steps must be an integer >= 1"),
        ((10, 1), dict(sigmas=np.linspace(1, 0, 10)), "sigmas: custom sigmas are only used with stages=1"),
        ((10, 1), dict(is_amplify_first_chunk="yes"), "is_amplify_first_chunk must be True or False"),
    ]:
        with pytest.raises(ValueError, match=match):
            KD().set_timesteps(*args, **kwargs)
    with pytest.raises(ValueError, match="mu must be passed when use_dynamic_shifting=True"):
        KD(use_dynamic_shifting=True).set_timesteps(10, 0)
    with pytest.raises(ValueError, match="mu must be a finite number"):
        KD(use_dynamic_shifting=True).set_timesteps(10, 0, mu=float("nan"))
    with pytest.raises(ValueError, match=r"use_dynamic_shifting=True needs shift=1.0"):
        KD(use_dynamic_shifting=True, shift=3.0).set_timesteps(10, 0, mu=1.0)
    with pytest.raises(AssertionError):  # (diffusers)
        DF(use_dynamic_shifting=True, shift=3.0).set_timesteps(10, 0, mu=1.0)
    with pytest.raises(ValueError, match="sigmas must be a 1-D sequence of finite values"):
        KD(stages=1).set_timesteps(3, sigmas=np.array([0.9, float("nan"), 0.1]))
    with pytest.raises(ValueError, match="sigmas must be a 1-D sequence of finite values"):
        KD(stages=1).set_timesteps(3, sigmas=np.ones((2, 2)))


def test_step_errors_name_the_argument():
    x = initial_sample(SHAPE)
    m = dummy_model(x, 900)
    with pytest.raises(ValueError, match=r"call set_timesteps\(...\) before step"):
        KD().step(m, 999.0, x)
    s = KD()
    s.set_timesteps(3, 0)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match=r"model_output must have the shape of sample \(2, 4, 3, 8, 8\)"):
        s.step(m[:1], t, x)
    with pytest.raises(TypeError, match="sample must be a torch.Tensor"):
        s.step(m, t, x.numpy())
    with pytest.raises(TypeError, match="model_output must be a torch.Tensor"):
        s.step(None, t, x)
    with pytest.raises(TypeError, match="sample must be a floating tensor"):
        s.step(m, t, x.long())
    with pytest.raises(TypeError, match="model_output must be a floating tensor"):
        s.step(m.int(), t, x)
    with pytest.raises(ValueError, match="model_output must be on cpu like sample, got meta"):
        s.step(m.to("meta"), t, x)
    with pytest.raises(ValueError, match="cond must have the shape of sample"):
        s.step_cfg(m, m[:1], 2.0, t, x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        s.step_cfg(m, m, float("inf"), t, x)
    with pytest.raises(TypeError, match="unexpected keyword argument 'eta'"):
        s.step(m, t, x, eta=1.0)
    for name in ("sigma", "cus_step_index"):
        with pytest.raises(NotImplementedError, match=f"step_unipc: {name} not supported"):
            s.step_unipc(m, t, x, **{name: 1})
    assert s.step_index is None  # refused steps change nothing
    for t in s.timesteps:
        x = s.step(m, t, x).prev_sample
    with pytest.raises(IndexError, match="step 3 is past the end of the 3-step schedule"):
        s.step(m, t, x)
    s.set_timesteps(3, 0)
    s.step(m, s.timesteps[0], x)
    with pytest.raises(ValueError, match=r"last_sample \(2, 4, 3, 8, 8\) .* does not match sample \(2, 4, 3, 4, 4\)"):
        s.step(m[..., :4, :4], s.timesteps[1], x[..., :4, :4])
    # Euler: diffusers' error for integer timesteps; past the end
    e = KD(scheduler_type="euler")
    e.set_timesteps(2, 1)
    for bad in (5, torch.tensor(5), torch.tensor(5, dtype=torch.int32)):
        for s in (e, DF(scheduler_type="euler")):
            s.set_timesteps(2, 1)
            with pytest.raises(ValueError, match="Passing integer indices"):
                s.step(m, bad, x)
    with pytest.raises(NotImplementedError, match="step_euler: sigma_next not supported"):
        e.step_euler(m, e.timesteps[0], x, sigma_next=torch.tensor(0.1))
    with pytest.raises(TypeError, match="step_euler.. got an unexpected keyword argument 'sigma_befor'"):
        e.step_euler(m, e.timesteps[0], x, sigma_befor=None)
    with pytest.raises(ValueError, match="step_unipc needs scheduler_type='unipc', got 'euler'"):
        e.step_unipc(m, e.timesteps[0], x)
    # the DMD schedule type has no step, as in diffusers
    d = KD(scheduler_type="dmd")
    d.set_timesteps(2, 1)
    with pytest.raises(NotImplementedError, match="use HeliosDMDScheduler"):
        d.step(m, d.timesteps[0], x)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_pipeline_loops_without_syncs():
    x = initial_sample(SHAPE)
    for config, kwargs in (({}, dict(stage_index=1)), (dict(solver_order=3), dict(stage_index=2)),
                           (dict(scheduler_type="euler"), dict(stage_index=0)),
                           (dict(stages=1, use_dynamic_shifting=True),
                            dict(sigmas=np.linspace(0.999, 0, 11)[:-1], mu=1.0))):
        outs = []
        for device in ("cpu", "cuda"):
            s = KD(**config)
            s.set_timesteps(10, device=device, **kwargs)
            y = x.to(device)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if device == "cuda" else 0)
            try:
                for t in s.timesteps:  # (the model: torch ops on t as a device tensor, no read)
                    u = torch.sin(1.3 * y + t.float() / 1000) * 0.6
                    y = s.step_cfg(u, 0.5 * u + 0.1, 3.0, t, y).prev_sample
            finally:
                torch.cuda.set_sync_debug_mode(0)
            outs.append(y.cpu())
        assert parity_error(outs[1], outs[0]) <= 1e-5


@pytest.mark.parametrize("sample_dtype, model_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                                       (torch.float32, torch.float64)])
def test_unipc_steps_return_the_samples_dtype_like_diffusers(sample_dtype, model_dtype):
    # diffusers' Helios UniPC casts its result (and last_sample) to the sample's dtype; a wider
    # model output must not carry the loop into its dtype (a float64 one is stepped in float64)
    got = []
    for cls in (DF, KD):
        s = cls()
        s.set_timesteps(6, stage_index=1)
        x = initial_sample((1, 4, 2, 4, 4)).to(sample_dtype)
        for t in s.timesteps[:2]:
            out = s.step(dummy_model(x, t).to(model_dtype), t, x)
            x = out.prev_sample
        got.append(out)
    assert got[1].prev_sample.dtype == got[0].prev_sample.dtype == sample_dtype
    assert got[1].last_sample.dtype == got[0].last_sample.dtype


def test_step_cfg_with_halves_of_different_dtypes():
    # the guided output has the wider of the two dtypes, as diffusers' manual guidance
    x = initial_sample((1, 4, 2, 8, 8)).half()
    u, c = torch.sin(x), torch.sin(0.97 * x.double())
    d, k = DF(stages=1), KD(stages=1)
    d.set_timesteps(4)
    k.set_timesteps(4)
    want = d.step(u + 3.0 * (c - u), d.timesteps[0], x).prev_sample
    got = k.step_cfg(u, c, 3.0, k.timesteps[0], x).prev_sample
    assert got.dtype == want.dtype
    assert parity_error(got, want) <= 1e-2


@pytest.mark.parametrize("sample_dtype, output_dtype", [(torch.bfloat16, torch.float16),
                                                        (torch.float16, torch.bfloat16),
                                                        (torch.float32, torch.float16)])
def test_euler_step_of_mixed_dtypes_rounds_once(sample_dtype, output_dtype):
    # diffusers computes in float32 and rounds once to the model output's dtype; the fused step
    # wrote a bfloat16 sample's dtype first, then cast: 8x float16's rounding
    kd = HeliosScheduler(scheduler_type="euler")
    kd.set_timesteps(3, 0)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 4, 1, 32, 32, generator=g) * 3).to(sample_dtype)
    v = torch.randn(1, 4, 1, 32, 32, generator=g).to(output_dtype)
    prev = kd.step(v, kd.timesteps[0], x).prev_sample
    exact = x.double() + (kd.sigmas[1] - kd.sigmas[0]).double() * v.double()
    assert prev.dtype == output_dtype
    # one rounding to the output dtype: within a unit in the last place at the largest value
    assert (prev.double() - exact).abs().max() <= torch.finfo(output_dtype).eps * exact.abs().max()
