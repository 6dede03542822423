import math
import warnings

import numpy as np
import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.ddim import DDIMScheduler
from kdfast.schedulers.ddim_inverse import DDIMInverseScheduler
from parity import diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, settings

DF = diffusers.DDIMInverseScheduler


def invert(scheduler, steps, x, guidance_scale=None, fused=False):
    """DDIM inversion as diffusers' pipelines run it (no generator: the step is deterministic);
    returns the last sample and the last step's pred_original_sample."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        if guidance_scale is None:
            out = scheduler.step(dummy_model(x, t), t, x)
        else:
            u, c = dummy_cfg(x, t)
            out = (scheduler.step_cfg(u, c, guidance_scale, t, x) if fused
                   else scheduler.step(u + guidance_scale * (c - u), t, x))
        x = out.prev_sample
    return x, out.pred_original_sample


def float64_twin(config):
    """diffusers' scheduler computing in float64 (its schedule tensors are float32)."""
    df = DF(**config)
    df.alphas_cumprod = df.alphas_cumprod.double()
    df.initial_alpha_cumprod = df.initial_alpha_cumprod.double()
    return df


def assert_inverse_parity(config, steps, dtype=torch.float32, guidance_scale=None, tol=1e-5):
    """The loop of kdfast's scheduler equals diffusers': fp32 to ``tol``; fp16/bf16 with the
    tolerance rule of DESIGN.md (error against the fp32 loop at most 2x diffusers' own)."""
    df, kd = DF(**config), DDIMInverseScheduler.from_config(DF(**config).config)
    x = initial_sample(dtype=dtype)
    expected, _ = invert(df, steps, x, guidance_scale)
    got, _ = invert(kd, steps, x, guidance_scale, fused=guidance_scale is not None)
    assert torch.equal(kd.timesteps, df.timesteps), (kd.timesteps, df.timesteps)
    assert got.dtype == expected.dtype == dtype and torch.isfinite(got).all()
    if dtype == torch.float32 and tol is None:
        # An ill-conditioned loop ('sample' models divide by sqrt(1 - alpha_cumprod[0]) = 0.01):
        # both libraries' float32 rounding is amplified, so each is held to the float64 truth.
        truth, _ = invert(float64_twin(config), steps, x.double(), guidance_scale)
        err, own = parity_error(got, truth), parity_error(expected, truth)
        assert err <= 2 * own + 1e-6 and parity_error(got, expected) <= 1e-4, (err, own)
    elif dtype == torch.float32:
        err = parity_error(got, expected)
        assert err <= tol, f"{config} steps={steps}: parity error {err:.3e}"
    else:
        truth, _ = invert(DF(**config), steps, x.float(), guidance_scale)
        err, own = parity_error(got, truth), parity_error(expected, truth)
        assert err <= 2 * own + 1e-4, f"{config} {dtype}: error {err:.3e} vs diffusers' {own:.3e}"
    return got, expected


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_parity_prediction_types_spacings_and_steps(prediction_type, spacing, steps):
    # ('sample' from alpha_cumprod 1 is undefined: see test_sample_prediction_from_alpha_one_...)
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing,
                  set_alpha_to_one=prediction_type != "sample")
    assert_inverse_parity(config, steps)


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("config", [
    dict(clip_sample=False),
    dict(clip_sample=True, clip_sample_range=0.5, prediction_type="v_prediction"),
    dict(clip_sample_range=0.3, prediction_type="sample", set_alpha_to_one=False),
    dict(set_alpha_to_one=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(steps_offset=1),
    dict(num_train_timesteps=500, timestep_spacing="trailing"),
    dict(trained_betas=np.linspace(0.0001, 0.02, 1000).tolist()),
])
def test_parity_configs(config, steps):
    assert_inverse_parity(config, steps)


@pytest.mark.parametrize("config", [{}, dict(clip_sample=False), dict(prediction_type="v_prediction"),
                                    dict(prediction_type="sample", set_alpha_to_one=False, clip_sample_range=0.5),
                                    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")])
def test_each_step_and_its_pred_original_sample_match(config):
    # step by step from the same inputs: the (clipped) x0 diffusers returns, and the sample
    df, kd = DF(**config), DDIMInverseScheduler(**config)
    for s in (df, kd):
        s.set_timesteps(10)
    x = initial_sample() * 3
    for t in kd.timesteps:
        m = dummy_model(x, t)
        expected = df.step(m, t, x)
        lazy, eager = kd.step(m, t, x), kd.step(m, t, x, return_pred_original_sample=True)
        for out in (lazy, eager):
            assert parity_error(out.prev_sample, expected.prev_sample) <= 1e-5
            assert parity_error(out.pred_original_sample, expected.pred_original_sample) <= 1e-5
        if config.get("clip_sample", True):
            assert eager.pred_original_sample.abs().max() <= config.get("clip_sample_range", 1.0)
        x = expected.prev_sample


def test_step_reads_the_timestep_value_like_diffusers():
    df, kd = DF(clip_sample=False), DDIMInverseScheduler(clip_sample=False)
    for s in (df, kd):
        s.set_timesteps(25)
    x, m = initial_sample(), initial_sample(seed=1)
    for t in [537, 999, 0, 13, 39, -5, np.int64(700), torch.tensor(412), torch.tensor([388])[0], df.timesteps[4]]:
        assert parity_error(kd.step(m, t, x).prev_sample, df.step(m, t, x).prev_sample) <= 1e-6, t
    t = kd.timesteps[3]  # an element of the schedule and its value give the same step
    torch.testing.assert_close(kd.step(m, t, x).prev_sample, kd.step(m, int(t), x).prev_sample, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [{}, dict(prediction_type="v_prediction", clip_sample=False),
                                    dict(prediction_type="sample", set_alpha_to_one=False)])
def test_half_precision_keeps_dtype_and_matches(dtype, config):
    assert_inverse_parity(config, 20, dtype=dtype)
    kd = DDIMInverseScheduler(**config)
    kd.set_timesteps(5)
    x = initial_sample(dtype=dtype)
    out = kd.step(dummy_model(x, kd.timesteps[1]), kd.timesteps[1], x, return_pred_original_sample=True)
    assert out.prev_sample.dtype == out.pred_original_sample.dtype == dtype


@pytest.mark.parametrize("config,tol", [({}, 1e-5), (dict(clip_sample=False, prediction_type="v_prediction"), 1e-5),
                                        (dict(prediction_type="sample", set_alpha_to_one=False), None)])
def test_fused_guidance_matches_guidance_combined_outside(config, tol):
    got, _ = assert_inverse_parity(config, 20, guidance_scale=3.0, tol=tol)
    # and kdfast's own unfused step
    kd = DDIMInverseScheduler(**config)
    unfused, _ = invert(kd, 20, initial_sample(), 3.0, fused=False)
    assert parity_error(got, unfused) <= 1e-6
    plain, _ = invert(DDIMInverseScheduler(**config), 20, initial_sample())
    assert parity_error(got, plain) > 1e-3  # guidance changed the result


def test_one_fused_pass_per_step_and_no_host_reads(monkeypatch):
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(1) or real(*a))
    kd = DDIMInverseScheduler(clip_sample_range=0.8)
    kd.set_timesteps(8)
    x = initial_sample()
    outputs = [dummy_cfg(x, t) for t in kd.timesteps]
    with no_host_reads():
        for t, (u, c) in zip(kd.timesteps, outputs):
            x = kd.step(u, t, x).prev_sample
            x = kd.step_cfg(u, c, 2.0, t, x).prev_sample
    assert len(calls) == 16 and torch.isfinite(x).all()


def test_outputs_tuple_and_lazy_x0(monkeypatch):
    kd, df = DDIMInverseScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(5)
    x = initial_sample()
    t = kd.timesteps[2]
    m = dummy_model(x, t)
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(1) or real(*a))
    out = kd.step(m, t, x, return_dict=False)
    expected = df.step(m, t, x, return_dict=False)
    assert len(out) == len(expected) == 2
    assert len(calls) == 1 and out[0] is not None  # the sample alone: one pass
    prev, x0 = out  # unpacking computes x0 (one more pass)
    assert len(calls) == 2
    assert parity_error(prev, expected[0]) <= 1e-6 and parity_error(x0, expected[1]) <= 1e-6
    full = kd.step(m, t, x)
    assert list(full.keys()) == ["prev_sample", "pred_original_sample"]


def _exact(prediction_type, x, alpha, x_star):
    """The output of a model that is exact for a one-point data set {x_star}, at noise level alpha."""
    eps = (x - alpha**0.5 * x_star) / (1 - alpha) ** 0.5
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x_star.expand_as(x)
    return alpha**0.5 * eps - (1 - alpha) ** 0.5 * x_star


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 50])
def test_inversion_then_ddim_returns_to_the_start(prediction_type, spacing, steps):
    # With a model that is exact (the data set is one point), DDIM keeps epsilon constant along
    # the path: inverting a sample and running DDIM back from the noise returns to it.
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing, set_alpha_to_one=False, clip_sample=False)
    inv, fwd = DDIMInverseScheduler(**config), DDIMScheduler(**config)
    inv.set_timesteps(steps)
    fwd.set_timesteps(steps)
    ac = inv.alphas_cumprod.double()
    x_star, eps0 = initial_sample(seed=1).double().clamp(-1, 1), initial_sample(seed=2).double()
    start = (ac[0].sqrt() * x_star + (1 - ac[0]).sqrt() * eps0).float()
    x = start
    ratio = inv.config.num_train_timesteps // inv.num_inference_steps
    for t in inv.timesteps:  # the model sees the noise level the step starts from
        a = ac[t - ratio] if t - ratio >= 0 else inv.initial_alpha_cumprod.double()
        x = inv.step(_exact(prediction_type, x.double(), a, x_star).float(), t, x).prev_sample
    a_top = ac[inv.timesteps[-1]]
    noise = a_top.sqrt() * x_star + (1 - a_top).sqrt() * eps0  # where the exact path is
    assert parity_error(x, noise) < 1e-4
    for t in fwd.timesteps:
        x = fwd.step(_exact(prediction_type, x.double(), ac[t], x_star).float(), t, x).prev_sample
    assert parity_error(x, start) < 1e-4


def test_config_round_trip_and_save_load(tmp_path):
    kd = DDIMInverseScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
                              beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    df = DF(**settings(kd.config))
    assert settings(kd.config) == settings(df.config)
    assert sorted(DDIMInverseScheduler().config) == sorted(DF().config)
    kd.save_pretrained(tmp_path)
    again = DDIMInverseScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    loaded = DF.from_pretrained(tmp_path)
    assert settings(loaded.config) == settings(kd.config)
    loaded.save_pretrained(tmp_path / "df")
    back = DDIMInverseScheduler.from_pretrained(tmp_path / "df")
    assert settings(back.config) == settings(kd.config)
    x = initial_sample()
    assert parity_error(invert(back, 10, x)[0], invert(loaded, 10, x)[0]) <= 1e-5
    # pipelines make the inverse scheduler from the forward one's config
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, timestep_spacing="trailing")
    inv = DDIMInverseScheduler.from_config(ddim.config)
    assert inv.config.beta_schedule == "scaled_linear" and inv.config.timestep_spacing == "trailing"
    assert parity_error(invert(inv, 10, x)[0], invert(DF.from_config(ddim.config), 10, x)[0]) <= 1e-5


def test_attributes_like_diffusers():
    for config in ({}, dict(set_alpha_to_one=False, rescale_betas_zero_snr=True)):
        kd, df = DDIMInverseScheduler(**config), DF(**config)
        assert torch.equal(kd.timesteps, df.timesteps) and kd.num_inference_steps is None
        assert torch.equal(kd.alphas_cumprod, df.alphas_cumprod) and torch.equal(kd.betas, df.betas)
        assert torch.equal(kd.initial_alpha_cumprod, df.initial_alpha_cumprod)
        assert kd.order == df.order == 1 and len(kd) == len(df) == 1000 and kd.init_noise_sigma == 1.0
        kd.set_timesteps(12)
        df.set_timesteps(12)
        assert kd.num_inference_steps == df.num_inference_steps == 12
        x = initial_sample()
        assert kd.scale_model_input(x, kd.timesteps[0]) is x
    assert [c.__name__ for c in DDIMInverseScheduler().compatibles] == [c.__name__ for c in DF().compatibles]


def test_deprecated_set_alpha_to_zero():
    with pytest.warns(FutureWarning, match="set_alpha_to_zero"):
        kd = DDIMInverseScheduler(set_alpha_to_zero=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = DF(set_alpha_to_zero=False)
    # diffusers reads it as set_alpha_to_one; kdfast records the value in effect as well
    assert torch.equal(kd.initial_alpha_cumprod, df.initial_alpha_cumprod)
    assert kd.config.set_alpha_to_one is False and "kwargs" not in kd.config
    twin = DDIMInverseScheduler.from_config(kd.config)
    assert torch.equal(twin.initial_alpha_cumprod, kd.initial_alpha_cumprod)
    with pytest.warns(FutureWarning):
        via = DDIMInverseScheduler.from_config(DF().config, set_alpha_to_zero=False)
    assert torch.equal(via.initial_alpha_cumprod, df.initial_alpha_cumprod)


def test_deprecated_set_alpha_to_zero_in_a_config_file(tmp_path):
    # an old scheduler_config.json: diffusers passes the key on to the constructor (kdfast kept
    # it as an unused entry, and the first step started from alpha_cumprod 1 instead)
    (tmp_path / "scheduler_config.json").write_text(
        '{"_class_name": "DDIMInverseScheduler", "set_alpha_to_zero": false}')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = DF.from_pretrained(tmp_path)
        loaded = [DDIMInverseScheduler.from_pretrained(tmp_path),
                  DDIMInverseScheduler.from_config({"set_alpha_to_zero": False, "set_alpha_to_one": True})]
    assert float(df.initial_alpha_cumprod) < 1
    for kd in loaded:
        assert torch.equal(kd.initial_alpha_cumprod, df.initial_alpha_cumprod)
        assert kd.config.set_alpha_to_one is False and "set_alpha_to_zero" not in kd.config


def test_sample_prediction_from_alpha_one_raises_where_diffusers_gives_inf_or_nan():
    # set_alpha_to_one=True: the first step starts at alpha_cumprod 1, where a 'sample' model
    # implies no noise: (x - x0) / 0.
    x = initial_sample()
    df = DF(prediction_type="sample")
    df.set_timesteps(10)
    t0 = df.timesteps[0]
    assert not torch.isfinite(df.step(dummy_model(x, t0), t0, x).prev_sample).all()
    kd = DDIMInverseScheduler(prediction_type="sample")
    kd.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 0: .*alpha_cumprod 1.*set_alpha_to_one=False"):
        kd.step(dummy_model(x, kd.timesteps[0]), kd.timesteps[0], x)
    # the later steps are defined, and match
    for t in kd.timesteps[1:3]:
        m = dummy_model(x, t)
        assert parity_error(kd.step(m, t, x).prev_sample, df.step(m, t, x).prev_sample) <= 1e-5
    with pytest.raises(ValueError, match="alpha_cumprod 1"):  # a schedule with no defined step at all
        DDIMInverseScheduler(prediction_type="sample").set_timesteps(1)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="prediction_type='flow_prediction'"):
        DDIMInverseScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="timestep_spacing='uniform'"):
        DDIMInverseScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule='cosine'"):
        DDIMInverseScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="clip_sample_range"):
        DDIMInverseScheduler(clip_sample_range=-1.0)
    with pytest.raises(TypeError, match="thresholding"):
        DDIMInverseScheduler(thresholding=True)  # diffusers ignores it silently
    # linspace builds (from_config of a forward config), and set_timesteps refuses it as diffusers does
    kd = DDIMInverseScheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="timestep_spacing='linspace'"):
        kd.set_timesteps(10)
    with pytest.raises(ValueError, match="linspace"):
        DF(timestep_spacing="linspace").set_timesteps(10)


def test_bad_step_input():
    kd = DDIMInverseScheduler()
    x = initial_sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, 0, x)
    with pytest.raises(ValueError, match="cannot be larger"):
        kd.set_timesteps(1001)
    for n in (0, None):
        with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
            kd.set_timesteps(n)
    kd.set_timesteps(5)
    t = kd.timesteps[1]
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], t, x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), t, x)
    with pytest.raises(ValueError, match="integer"):
        kd.step(x, 500.5, x)
    with pytest.raises(IndexError, match="timestep 1000 is outside the training schedule"):
        kd.step(x, 1000, x)
    with pytest.raises(TypeError, match="eta"):
        kd.step(x, t, x, eta=0.5)
    with pytest.raises(TypeError, match="generator"):
        kd.step(x, t, x, generator=torch.Generator())
    with pytest.raises(TypeError, match="bogus"):
        kd._step(x, t, x, None, 1.0, bogus=1)
    with pytest.raises(TypeError, match="model_output and sample must be torch.Tensor"):
        kd.step(x.numpy(), t, x)
    # steps_offset can push the last leading timestep past the schedule: refused at that step
    off = DDIMInverseScheduler(steps_offset=1)
    off.set_timesteps(1000)
    with pytest.raises(IndexError, match="timestep 1000"):
        off.step(x, off.timesteps[-1], x)


def test_a_loop_under_inference_mode_equals_one_under_no_grad():
    outs = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            s = DDIMInverseScheduler()
            s.set_timesteps(6)
            x, x0 = invert(s, 6, initial_sample())
            outs.append((x, x0))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float64_sample_steps_in_float64():
    df, kd = float64_twin(dict(clip_sample=False)), DDIMInverseScheduler(clip_sample=False)
    x = initial_sample().double()
    got, expected = invert(kd, 20, x)[0], invert(df, 20, x)[0]
    assert got.dtype == torch.float64 and parity_error(got, expected) < 1e-6
    assert math.isfinite(parity_error(got, expected))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    import copy
    import pickle

    s = DDIMInverseScheduler(clip_sample=False)
    s.set_timesteps(8)
    x = initial_sample()
    for t in s.timesteps[:3]:
        x = s.step(dummy_model(x, t), t, x).prev_sample
    twin = copy.deepcopy(s) if how == "deepcopy" else pickle.loads(pickle.dumps(s))
    assert dict(twin.config) == dict(s.config)
    for t_s, t_twin in zip(s.timesteps[3:], twin.timesteps[3:]):
        m = dummy_model(x, t_s)
        a, b = s.step(m, t_s, x), twin.step(m, t_twin, x)
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=0, atol=0)
        torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=0, atol=0)
        x = a.prev_sample


def test_a_pipeline_replacing_the_config_rebuilds_the_scheduler():
    # diffusers' pipelines correct outdated configs by assigning _internal_dict
    kd = DDIMInverseScheduler(steps_offset=0)
    kd._internal_dict = {**kd.config, "steps_offset": 1, "clip_sample": False}
    kd.set_timesteps(10)
    df = DF(steps_offset=1, clip_sample=False)
    df.set_timesteps(10)
    assert torch.equal(kd.timesteps, df.timesteps) and kd.config.steps_offset == 1
    x = initial_sample()
    assert parity_error(invert(kd, 10, x)[0], invert(df, 10, x)[0]) <= 1e-5
