import copy
import logging
import pickle

import numpy as np
import pytest
import torch

from kdfast.schedulers.ddim_cogvideox import CogVideoXDDIMScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

DF = diffusers.CogVideoXDDIMScheduler
VIDEO = (1, 3, 4, 8, 8)  # [B, F, C, H, W], as CogVideoX's latents
COGVIDEOX_5B = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                    prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                    snr_shift_scale=1.0, timestep_spacing="trailing")


def with_step_kwargs(cls, **fixed):
    """``cls`` whose step (and step_cfg) always get ``fixed`` keyword arguments (run_loop passes none)."""
    body = {"step": lambda self, *a, **k: cls.step(self, *a, **{**fixed, **k})}
    if hasattr(cls, "step_cfg"):
        body["step_cfg"] = lambda self, *a, **k: cls.step_cfg(self, *a, **{**fixed, **k})
    return type(cls.__name__, (cls,), body)


def x0_loop(scheduler, steps, x):
    """The (prev_sample, pred_original_sample) of every step, both from the tuple output."""
    scheduler.set_timesteps(steps)
    outs = []
    for t in scheduler.timesteps:
        x, x0 = scheduler.step(dummy_model(x, t), t, x, return_dict=False)
        outs += [x, x0]
    return outs


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 4, 20, 50])
def test_parity_prediction_types_spacings_and_steps(prediction_type, spacing, steps):
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1)
    assert_parity(CogVideoXDDIMScheduler, DF, config, steps=steps, shape=VIDEO)


@pytest.mark.parametrize("steps", [3, 25, 200])
@pytest.mark.parametrize("config", [
    {},
    COGVIDEOX_5B,
    dict(COGVIDEOX_5B, snr_shift_scale=3.0),  # CogVideoX-2b
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),  # a float32 schedule (scaled_linear: float64)
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", set_alpha_to_one=False),
    dict(rescale_betas_zero_snr=True, prediction_type="sample", timestep_spacing="trailing"),
    dict(snr_shift_scale=0.4, prediction_type="v_prediction"),
    dict(snr_shift_scale=12.0, steps_offset=1),
    dict(trained_betas=np.linspace(0.0002, 0.03, 1000).tolist(), beta_schedule="squaredcos_cap_v2"),
    dict(num_train_timesteps=500, timestep_spacing="trailing"),
    # recorded, not applied, as in diffusers' step
    dict(clip_sample=True, clip_sample_range=0.05, sample_max_value=0.1),
])
def test_parity_configs(config, steps):
    df = DF(**config)
    kd = CogVideoXDDIMScheduler.from_config(df.config)
    assert kd.alphas_cumprod.dtype == df.alphas_cumprod.dtype and torch.equal(kd.alphas_cumprod, df.alphas_cumprod)
    assert torch.equal(kd.betas, df.betas) and torch.equal(kd.final_alpha_cumprod, df.final_alpha_cumprod)
    assert_parity(CogVideoXDDIMScheduler, DF, config, steps=min(steps, df.config.num_train_timesteps), shape=VIDEO)


def test_every_step_and_x0_match():
    # the final sample of a set_alpha_to_one loop is the last x0: compare every output
    for config in (COGVIDEOX_5B, dict(prediction_type="epsilon"), dict(set_alpha_to_one=False)):
        x = initial_sample(VIDEO)
        got, expected = x0_loop(CogVideoXDDIMScheduler(**config), 10, x), x0_loop(DF(**config), 10, x)
        for k, (a, b) in enumerate(zip(got, expected)):
            assert parity_error(a, b) <= 1e-5, (config, k)


def test_ignored_step_options_are_ignored_like_diffusers(caplog):
    # diffusers' CogVideoX DDIM step takes eta, use_clipped_model_output, generator and
    # variance_noise and uses none of them: the step is deterministic
    kw = dict(eta=0.7, use_clipped_model_output=True, variance_noise=initial_sample(VIDEO, seed=3))
    with caplog.at_level(logging.WARNING, logger="kdfast.schedulers.ddim_cogvideox"):
        got, expected = assert_parity(with_step_kwargs(CogVideoXDDIMScheduler, **kw), with_step_kwargs(DF, **kw),
                                      {}, steps=10, shape=VIDEO)
    plain = run_loop(CogVideoXDDIMScheduler(), 10, initial_sample(VIDEO))
    assert torch.equal(got, plain)
    warned = [r for r in caplog.records if "ignores eta" in r.getMessage()]
    assert len(warned) == 1  # once per scheduler, not per step


def test_step_reads_the_timestep_value_like_diffusers():
    df, kd = DF(), CogVideoXDDIMScheduler()
    for s in (df, kd):
        s.set_timesteps(25)
    x, m = initial_sample(VIDEO), initial_sample(VIDEO, seed=1)
    for t in [537, 999, 0, 13, -5, np.int64(700), torch.tensor(412), torch.tensor([388])[0], df.timesteps[4]]:
        expected = df.step(m, t, x)
        got = kd.step(m, t, x)
        assert parity_error(got.prev_sample, expected.prev_sample) < 1e-6, t
        assert parity_error(got.pred_original_sample, expected.pred_original_sample) < 1e-6, t
    t = kd.timesteps[3]  # a schedule element and its value give the same step
    assert torch.equal(kd.step(m, t, x).prev_sample, kd.step(m, int(t), x).prev_sample)


def test_outputs_tuple_and_lazy_x0():
    df, kd = DF(), CogVideoXDDIMScheduler()
    for s in (df, kd):
        s.set_timesteps(5)
    x = initial_sample(VIDEO)
    t_df, t_kd = df.timesteps[1], kd.timesteps[1]
    m = dummy_model(x, t_df)
    a, b = kd.step(m, t_kd, x, return_dict=False), df.step(m, t_df, x, return_dict=False)
    assert len(a) == len(b) == 2
    for u, v in zip(a, b):
        assert parity_error(u, v) <= 1e-6
    out = kd.step(m, t_kd, x)
    assert list(out.keys()) == ["prev_sample", "pred_original_sample"]
    eager = kd.step(m, t_kd, x, return_pred_original_sample=True)
    assert torch.equal(eager.pred_original_sample, out.pred_original_sample)
    assert torch.equal(eager.prev_sample, out.prev_sample)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [{}, COGVIDEOX_5B, dict(prediction_type="sample", beta_schedule="linear")])
def test_half_precision_keeps_dtype_and_matches(dtype, config):
    assert_parity(CogVideoXDDIMScheduler, DF, config, steps=20, dtype=dtype, shape=VIDEO)


def test_float64_sample():
    x = initial_sample(VIDEO).double()
    got, expected = run_loop(CogVideoXDDIMScheduler(), 20, x), run_loop(DF(), 20, x)
    assert got.dtype == torch.float64 and parity_error(got, expected) < 1e-12


@pytest.mark.parametrize("config", [{}, COGVIDEOX_5B, dict(prediction_type="sample")])
def test_fused_guidance_matches_diffusers_guidance(config):
    assert_parity(CogVideoXDDIMScheduler, DF, config, steps=20, guidance_scale=6.0, shape=VIDEO)
    kd = CogVideoXDDIMScheduler(**config)
    kd.set_timesteps(8)
    x = initial_sample(VIDEO)
    for t in kd.timesteps:
        u, c = dummy_cfg(x, t)
        fused = kd.step_cfg(u, c, 6.0, t, x)
        outside = kd.step(u + 6.0 * (c - u), t, x)
        torch.testing.assert_close(fused.prev_sample, outside.prev_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused.pred_original_sample, outside.pred_original_sample, rtol=1e-6, atol=1e-6)
        x = fused.prev_sample


def test_one_fused_pass_per_step_and_no_host_reads(monkeypatch):
    import kdfast.schedulers.base as base

    calls = []
    real = base.fused_step
    # (what the kernel writes besides the sample: fused_step's write_history and write_aux)
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a[10:12]) or real(*a))
    kd = CogVideoXDDIMScheduler(**COGVIDEOX_5B)
    kd.set_timesteps(6)
    x = initial_sample(VIDEO)
    inputs = [dummy_cfg(x, t) for t in kd.timesteps]
    gen = torch.Generator().manual_seed(0)
    with no_host_reads():
        for k, (t, (u, c)) in enumerate(zip(kd.timesteps, inputs)):
            if k % 2:
                x = kd.step_cfg(u, c, 5.0, t, x, eta=0.0, generator=gen).prev_sample
            else:
                x = kd.step(u, t, x, generator=gen, return_dict=False)[0]  # the pipeline's call
    assert calls == [(False, False)] * 6 and torch.isfinite(x).all()


def test_config_round_trip_and_attributes(tmp_path):
    df = DF(**COGVIDEOX_5B)
    kd = CogVideoXDDIMScheduler.from_config(df.config)
    assert settings(kd.config) == settings(df.config)
    assert set(settings(CogVideoXDDIMScheduler().config)) == set(settings(DF().config))
    kd.save_pretrained(tmp_path)
    assert settings(DF.from_pretrained(tmp_path).config) == settings(df.config)
    again = CogVideoXDDIMScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    assert kd.diffusers_class_name() == "CogVideoXDDIMScheduler" and kd.order == DF.order == 1
    assert kd.init_noise_sigma == df.init_noise_sigma and len(kd) == len(df) == 1000
    assert kd.num_inference_steps is None and torch.equal(kd.timesteps, df.timesteps)
    assert sorted(c.__name__ for c in kd.compatibles) == sorted(c.__name__ for c in df.compatibles)
    for s in (df, kd):
        s.set_timesteps(13, device="cpu")
    assert torch.equal(kd.timesteps, df.timesteps) and kd.timesteps.dtype == df.timesteps.dtype
    x = initial_sample(VIDEO)
    assert kd.scale_model_input(x, kd.timesteps[0]) is x
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    assert CogVideoXDDIMScheduler.from_config(euler.config).config.prediction_type == "v_prediction"


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    kd = CogVideoXDDIMScheduler()
    kd.set_timesteps(6)
    other = copy.deepcopy(kd) if how == "deepcopy" else pickle.loads(pickle.dumps(kd))
    x = initial_sample(VIDEO)
    a = b = x
    for t_a, t_b in zip(kd.timesteps, other.timesteps):
        a = kd.step(dummy_model(a, t_a), t_a, a).prev_sample
        b = other.step(dummy_model(b, t_b), t_b, b).prev_sample
    assert torch.equal(a, b)


def test_add_noise_velocity_and_variance_match():
    for config in ({}, COGVIDEOX_5B, dict(beta_schedule="linear")):
        df, kd = DF(**config), CogVideoXDDIMScheduler(**config)
        x, n = initial_sample(VIDEO), initial_sample(VIDEO, seed=5)
        t = torch.tensor([3])
        torch.testing.assert_close(kd.add_noise(x, n, t), df.add_noise(x, n, t), rtol=0, atol=0)
        torch.testing.assert_close(kd.get_velocity(x, n, t), df.get_velocity(x, n, t), rtol=0, atol=0)
        x2, n2 = initial_sample((2, 3, 4, 8, 8)), initial_sample((2, 3, 4, 8, 8), seed=5)
        t2 = torch.tensor([999, 10])
        torch.testing.assert_close(kd.add_noise(x2, n2, t2), df.add_noise(x2, n2, t2), rtol=0, atol=0)
        for t, prev in ((500, 480), (torch.tensor(999), torch.tensor(949)), (20, -1), (0, -1)):
            a, b = kd._get_variance(t, prev), df._get_variance(t, prev)
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="prediction_type='flow_prediction'"):
        CogVideoXDDIMScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="timestep_spacing"):
        CogVideoXDDIMScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        CogVideoXDDIMScheduler(beta_schedule="cosine")
    for shift in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="snr_shift_scale must be a finite number > 0"):
            CogVideoXDDIMScheduler(snr_shift_scale=shift)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        CogVideoXDDIMScheduler(num_train_timesteps=0)


def test_bad_step_input():
    kd = CogVideoXDDIMScheduler()
    x = initial_sample(VIDEO)
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, 999, x)
    with pytest.raises(ValueError, match="cannot be larger"):
        kd.set_timesteps(1001)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        kd.set_timesteps(0)
    kd.set_timesteps(5)
    t = kd.timesteps[0]
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:, :2], t, x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step_cfg(x, x[:, :2], 2.0, t, x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        kd.step(None, t, x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), t, x)
    with pytest.raises(ValueError, match="eta must be a finite"):
        kd.step(x, t, x, eta=float("nan"))
    with pytest.raises(ValueError, match="integer"):
        kd.step(x, 500.5, x)
    with pytest.raises(ValueError, match="single value"):
        kd.step(x, torch.tensor([1, 2]), x)
    with pytest.raises(IndexError, match="timestep 1000 is outside the training schedule"):
        kd.step(x, 1000, x)
    with pytest.raises(TypeError, match="bogus"):
        kd.step_cfg(x, x, 2.0, t, x, bogus=1)
    with pytest.raises(TypeError, match="cfg_pp"):  # DDIMScheduler's CFG++ is not this scheduler's
        kd.step_cfg(x, x, 2.0, t, x, cfg_pp=True)
    with pytest.raises(TypeError):
        kd.step(x, t, x, s_churn=1.0)
    # leading spacing with an offset past the training range: diffusers' step is an IndexError too
    kd = CogVideoXDDIMScheduler(steps_offset=1)
    kd.set_timesteps(1000)
    assert int(kd.timesteps[0]) == 1000
    with pytest.raises(IndexError, match="outside the training schedule"):
        kd.step(x, kd.timesteps[0], x)
    kd.step(x, kd.timesteps[1], x)


def test_where_diffusers_gives_inf_or_nan_kdfast_raises():
    x = initial_sample(VIDEO)
    # an epsilon model at the zero-SNR last timestep (alphas_cumprod[999] = 0) has no x0
    config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    df, kd = DF(**config), CogVideoXDDIMScheduler(**config)
    for s in (df, kd):
        s.set_timesteps(10)
    m = dummy_model(x, 999)
    assert not torch.isfinite(df.step(m, df.timesteps[0], x).prev_sample).all()
    with pytest.raises(ValueError, match="prediction_type='epsilon' defines no x0.*v_prediction"):
        kd.step(m, kd.timesteps[0], x)
    for t_df, t_kd in zip(df.timesteps[1:], kd.timesteps[1:]):  # the other steps are defined
        assert parity_error(kd.step(m, t_kd, x).prev_sample, df.step(m, t_df, x).prev_sample) < 1e-5
    # a non-positive SNR shift: diffusers' schedule leaves [0, 1), its steps are NaN
    df = DF(snr_shift_scale=-0.5)
    df.set_timesteps(4)
    assert not torch.isfinite(df.step(m, df.timesteps[1], x).prev_sample).all()
    with pytest.raises(ValueError, match="snr_shift_scale"):
        CogVideoXDDIMScheduler(snr_shift_scale=-0.5)
    # a zero beta makes alphas_cumprod 1: 0 / 0 at the last step of diffusers'
    betas = np.linspace(0.0, 0.02, 1000).tolist()
    df = DF(trained_betas=betas, timestep_spacing="linspace")
    df.set_timesteps(4)
    assert not torch.isfinite(df.step(m, df.timesteps[-1], x).prev_sample).all()
    with pytest.raises(ValueError, match="alphas_cumprod in \\[0, 1\\).*got 1.0 at timestep 0.*trained_betas"):
        CogVideoXDDIMScheduler(trained_betas=betas)
    with pytest.raises(ValueError, match="alphas_cumprod in \\[0, 1\\).*beta_start, beta_end"):
        CogVideoXDDIMScheduler(beta_schedule="linear", beta_start=0.0, beta_end=0.02)
    with pytest.raises(ValueError, match="the training betas must be finite and in \\[0, 1\\].*trained_betas"):
        CogVideoXDDIMScheduler(trained_betas=[1.5] * 1000)
