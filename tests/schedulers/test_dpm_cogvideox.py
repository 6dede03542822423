import contextlib
import copy
import logging
import pickle

import numpy as np
import pytest
import torch

from kdfast.schedulers.dpm_cogvideox import CogVideoXDPMScheduler
from parity import diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, settings

import diffusers.schedulers.scheduling_dpm_cogvideox as df_module

DF = diffusers.CogVideoXDPMScheduler
VIDEO = (1, 3, 4, 8, 8)  # [B, F, C, H, W], as CogVideoX's latents
COGVIDEOX_5B = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                    prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                    snr_shift_scale=1.0, timestep_spacing="trailing")


def cog_loop(scheduler, steps, x, seed=0, guidance_scale=None, fused=False, generator=None, **step_kwargs):
    """CogVideoX's denoising loop (pipeline_cogvideox.py): each step gets the previous step's x0
    and timestep. Returns the (prev_sample, pred_original_sample) of every step."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed) if generator is None else generator
    timesteps = scheduler.timesteps
    old = None
    outs = []
    for i, t in enumerate(timesteps):
        back = timesteps[i - 1] if i > 0 else None
        if guidance_scale is None:
            x, old = scheduler.step(dummy_model(x, t), old, t, back, x, generator=gen, return_dict=False,
                                    **step_kwargs)
        else:
            u, c = dummy_cfg(x, t)
            if fused:
                x, old = scheduler.step_cfg(u, c, guidance_scale, old, t, back, x, generator=gen, **step_kwargs)
            else:
                x, old = scheduler.step(u + guidance_scale * (c - u), old, t, back, x, generator=gen,
                                        return_dict=False, **step_kwargs)
        outs += [x, old]
    return outs


def loop_error(got, expected) -> float:
    return max(parity_error(a, b) for a, b in zip(got, expected))


def assert_loop_parity(config, steps, dtype=torch.float32, shape=VIDEO, tol=1e-5, **kwargs):
    """kdfast and diffusers give the same outputs at every step (fp32: within ``tol``; fp16/bf16:
    kdfast's error against diffusers' fp32 loop, on the same noise, at most 2x diffusers' own)."""
    df = DF(**config)
    kd = CogVideoXDPMScheduler.from_config(df.config)
    x = initial_sample(shape, dtype)
    expected = cog_loop(df, steps, x, **kwargs)
    got = cog_loop(kd, steps, x, fused=kwargs.get("guidance_scale") is not None, **kwargs)
    assert torch.equal(kd.timesteps, df.timesteps)
    assert len(got) == len(expected) == 2 * steps
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.isfinite(a).all()
    if dtype == torch.float32:
        err = loop_error(got, expected)
        assert err <= tol, f"{config} steps={steps}: parity error {err:.3e}"
    else:
        with noise_drawn_as(dtype):  # the fp32 truth, on the noise the half-precision loops drew
            truth = cog_loop(DF(**config), steps, x.float(), **kwargs)
        err, base = loop_error(got[-2:], truth[-2:]), loop_error(expected[-2:], truth[-2:])
        assert err <= 2 * base + 1e-4, f"{config} {dtype}: error {err:.3e} vs diffusers' {base:.3e}"
    return got, expected


@contextlib.contextmanager
def noise_drawn_as(draw_dtype, noise=None):
    """diffusers' step drawing its noise in ``draw_dtype`` (then cast to the sample's), or
    taking ``noise``."""
    real = df_module.randn_tensor

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        if noise is not None:
            return noise
        return real(shape, generator=generator, device=device, dtype=draw_dtype).to(dtype)

    df_module.randn_tensor = randn_tensor
    try:
        yield
    finally:
        df_module.randn_tensor = real


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 5, 20, 50])
def test_parity_prediction_types_spacings_and_steps(prediction_type, spacing, steps):
    assert_loop_parity(dict(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1), steps)


@pytest.mark.parametrize("steps", [3, 25, 60])
@pytest.mark.parametrize("config", [
    {},
    COGVIDEOX_5B,
    dict(COGVIDEOX_5B, snr_shift_scale=3.0),  # CogVideoX-2b
    dict(COGVIDEOX_5B, set_alpha_to_one=False),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),  # a float32 schedule (scaled_linear: float64)
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", set_alpha_to_one=False),
    dict(rescale_betas_zero_snr=True, prediction_type="sample", timestep_spacing="trailing"),
    dict(snr_shift_scale=0.4, prediction_type="v_prediction", set_alpha_to_one=False),
    dict(snr_shift_scale=12.0, steps_offset=1),
    dict(trained_betas=np.linspace(0.0002, 0.03, 1000).tolist(), beta_schedule="squaredcos_cap_v2"),
    dict(num_train_timesteps=500, timestep_spacing="trailing"),
    # recorded, not applied, as in diffusers' step
    dict(clip_sample=True, clip_sample_range=0.05, sample_max_value=0.1),
])
def test_parity_configs(config, steps):
    df = DF(**config)
    kd = CogVideoXDPMScheduler.from_config(df.config)
    assert kd.alphas_cumprod.dtype == df.alphas_cumprod.dtype and torch.equal(kd.alphas_cumprod, df.alphas_cumprod)
    assert torch.equal(kd.betas, df.betas) and torch.equal(kd.final_alpha_cumprod, df.final_alpha_cumprod)
    assert_loop_parity(config, steps)
    if df.alphas_cumprod.dtype == torch.float64:  # (see the test below for float32 schedules)
        assert_loop_parity(config, 200)


def test_long_float32_schedules_are_closer_to_float64_than_diffusers():
    # diffusers computes the log-SNR coefficients of a float32 schedule (linear betas) in float32:
    # its h = lambda_prev - lambda_t loses digits, and at hundreds of steps its loop drifts past
    # 1e-5 from kdfast's, whose coefficients are float64. The truth: diffusers' step on float64
    # cumulative alphas and a float64 sample (same noise).
    config = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    x = initial_sample(VIDEO)
    got = cog_loop(CogVideoXDPMScheduler(**config), 500, x)
    expected = cog_loop(DF(**config), 500, x)
    exact = DF(**config)
    exact.alphas_cumprod, exact.final_alpha_cumprod = exact.alphas_cumprod.double(), torch.tensor(1.0).double()
    with noise_drawn_as(torch.float32):
        truth = cog_loop(exact, 500, x.double())
    err, base = loop_error(got, truth), loop_error(expected, truth)
    assert err < base / 4 and err < 1e-5, (err, base)
    assert loop_error(got, expected) < 2 * base


def test_noise_is_drawn_draw_for_draw_like_diffusers():
    # one draw per step, two on second-order steps (the first unused): the generators end in
    # the same state, and another seed gives another result
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    x = initial_sample(VIDEO)
    got = cog_loop(CogVideoXDPMScheduler(), 6, x, generator=gens[0])
    expected = cog_loop(DF(), 6, x, generator=gens[1])
    assert loop_error(got, expected) <= 1e-5
    assert torch.equal(gens[0].get_state(), gens[1].get_state())
    other = cog_loop(CogVideoXDPMScheduler(), 6, x, seed=1)
    assert parity_error(other[-4], got[-4]) > 1e-3
    # the global generator, when none is given
    outs = []
    for cls in (CogVideoXDPMScheduler, DF):
        torch.manual_seed(11)
        s = cls()
        s.set_timesteps(4)
        outs.append(s.step(dummy_model(x, s.timesteps[0]), None, s.timesteps[0], None, x)[0])
        outs.append(torch.randn(3))
    assert parity_error(outs[0], outs[2]) <= 1e-5 and torch.equal(outs[1], outs[3])


def test_a_list_of_generators_draws_per_sample_like_diffusers():
    shape = (2, 3, 4, 8, 8)
    outs = []
    for cls in (DF, CogVideoXDPMScheduler):
        gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
        outs.append(cog_loop(cls(**COGVIDEOX_5B), 5, initial_sample(shape), generator=gens))
    assert loop_error(outs[1], outs[0]) <= 1e-5
    with pytest.raises(ValueError, match="generator: got a list of 3 generators for a batch of 2"):
        cog_loop(CogVideoXDPMScheduler(), 5, initial_sample(shape), generator=[torch.Generator()] * 3)


def test_variance_noise_replaces_the_draws():
    # kdfast only (diffusers' step takes variance_noise and ignores it): the step's noise
    x = initial_sample(VIDEO)
    kd, df = CogVideoXDPMScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(5)
    old = None
    for i in range(3):
        t_kd, t_df = kd.timesteps[i], df.timesteps[i]
        back = (kd.timesteps[i - 1], df.timesteps[i - 1]) if i else (None, None)
        noise = initial_sample(VIDEO, seed=20 + i)
        m = dummy_model(x, t_kd)
        got = kd.step(m, old, t_kd, back[0], x, variance_noise=noise)
        with noise_drawn_as(None, noise=noise):
            expected = df.step(m, old, t_df, back[1], x)
        assert parity_error(got[0], expected[0]) <= 1e-6 and parity_error(got[1], expected[1]) <= 1e-6
        x, old = got
    with pytest.raises(ValueError, match="generator or variance_noise, not both"):
        kd.step(m, None, kd.timesteps[0], None, x, generator=torch.Generator(), variance_noise=noise)


def test_return_contract_like_diffusers():
    kd, df = CogVideoXDPMScheduler(**COGVIDEOX_5B), DF(**COGVIDEOX_5B)
    for s in (kd, df):
        s.set_timesteps(4)
    x = initial_sample(VIDEO)
    m = dummy_model(x, 999)
    first = kd.step(m, None, kd.timesteps[0], None, x, generator=torch.Generator().manual_seed(0))
    assert type(first) is tuple and len(first) == 2  # return_dict defaults to False
    # diffusers returns the tuple from a first-order step whatever return_dict says
    a = kd.step(m, None, kd.timesteps[0], None, x, generator=torch.Generator().manual_seed(0), return_dict=True)
    b = df.step(m, None, df.timesteps[0], None, x, generator=torch.Generator().manual_seed(0), return_dict=True)
    assert type(a) is type(b) is tuple
    # a second-order step with return_dict=True: an output with both fields
    old = first[1]
    a = kd.step(m, old, kd.timesteps[1], kd.timesteps[0], x, generator=torch.Generator().manual_seed(0),
                return_dict=True)
    b = df.step(m, old, df.timesteps[1], df.timesteps[0], x, generator=torch.Generator().manual_seed(0),
                return_dict=True)
    assert parity_error(a.prev_sample, b.prev_sample) <= 1e-6
    assert parity_error(a.pred_original_sample, b.pred_original_sample) <= 1e-6
    assert list(a.keys()) == list(b.keys()) == ["prev_sample", "pred_original_sample"]
    assert parity_error(a[0], b[0]) <= 1e-6 and parity_error(a.to_tuple()[1], b.to_tuple()[1]) <= 1e-6
    # the last step is first order whatever is passed (a zero-length look-ahead in diffusers)
    last = kd.step(m, old, kd.timesteps[-1], kd.timesteps[-2], x, generator=torch.Generator(), return_dict=True)
    assert type(last) is tuple


def test_mixed_precision_like_the_pipeline():
    # CogVideoX pipelines step bfloat16 latents with a float32 model output: diffusers' x0 and
    # prev sample are float32 then. kdfast's x0 (the next step's history) is float32 too; its
    # prev sample stays bfloat16 (the pipeline casts it to bfloat16 at once).
    kd, df = CogVideoXDPMScheduler(**COGVIDEOX_5B), DF(**COGVIDEOX_5B)
    outs = []
    for s in (kd, df):
        s.set_timesteps(6)
        x = initial_sample(VIDEO, torch.bfloat16)
        gen = torch.Generator().manual_seed(0)
        old = None
        for i, t in enumerate(s.timesteps):
            m = dummy_model(x.float(), t)
            x, old = s.step(m, old, t, s.timesteps[i - 1] if i else None, x, generator=gen)
            assert old.dtype == torch.float32
            x = x.to(torch.bfloat16)
        outs.append((x, old))
    assert parity_error(outs[0][0], outs[1][0]) < 2e-2 and parity_error(outs[0][1], outs[1][1]) < 2e-2
    # fused guidance of a bfloat16 uncond and a float32 cond: x0 in the dtype of the guided output
    x = initial_sample(VIDEO, torch.bfloat16)
    u, c = dummy_model(x, 999), dummy_model(x.float() * 0.9, 999)
    t = kd.timesteps[0]
    fused = kd.step_cfg(u, c, 6.0, None, t, None, x, generator=torch.Generator().manual_seed(0))
    outside = df.step(u + 6.0 * (c - u), None, df.timesteps[0], None, x, generator=torch.Generator().manual_seed(0))
    assert fused[1].dtype == outside[1].dtype == torch.float32
    assert parity_error(fused[1], outside[1]) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [{}, COGVIDEOX_5B, dict(prediction_type="sample", beta_schedule="linear")])
def test_half_precision_keeps_dtype_and_matches(dtype, config):
    assert_loop_parity(config, 20, dtype=dtype)


def test_float64_sample():
    x = initial_sample(VIDEO).double()
    got, expected = cog_loop(CogVideoXDPMScheduler(), 20, x), cog_loop(DF(), 20, x)
    assert got[-1].dtype == torch.float64 and loop_error(got, expected) < 1e-12


@pytest.mark.parametrize("config,scale", [(COGVIDEOX_5B, 6.0), (dict(prediction_type="sample"), 6.0),
                                          # (the dummy epsilon model is chaotic under strong guidance)
                                          ({}, 1.5)])
def test_fused_guidance_matches_guidance_outside(config, scale):
    assert_loop_parity(config, 20, guidance_scale=scale)
    kd = CogVideoXDPMScheduler(**config)
    kd.set_timesteps(8)
    x = initial_sample(VIDEO)
    old = None
    for i, t in enumerate(kd.timesteps):
        back = kd.timesteps[i - 1] if i else None
        u, c = dummy_cfg(x, t)
        fused = kd.step_cfg(u, c, 6.0, old, t, back, x, generator=torch.Generator().manual_seed(i))
        outside = kd.step(u + 6.0 * (c - u), old, t, back, x, generator=torch.Generator().manual_seed(i))
        for a, b in zip(fused, outside):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        x, old = fused


def test_one_fused_pass_per_step_and_no_host_reads(monkeypatch):
    import kdfast.schedulers.base as base

    calls = []
    real = base.fused_step
    # (what the kernel writes besides the sample: fused_step's write_history and write_aux)
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a[10:12]) or real(*a))
    kd = CogVideoXDPMScheduler(**COGVIDEOX_5B)
    kd.set_timesteps(6)
    x = initial_sample(VIDEO)
    inputs = [dummy_cfg(x, t) for t in kd.timesteps]
    gen = torch.Generator().manual_seed(0)
    old = None
    timesteps = kd.timesteps
    with no_host_reads():
        for i, (t, (u, c)) in enumerate(zip(timesteps, inputs)):
            back = timesteps[i - 1] if i > 0 else None
            if i % 2:
                x, old = kd.step_cfg(u, c, 5.0, old, t, back, x, generator=gen)
            else:
                x, old = kd.step(u, old, t, back, x, eta=0.0, generator=gen, return_dict=False)
    assert calls == [(True, False)] * 6 and torch.isfinite(x).all() and torch.isfinite(old).all()


def test_schedule_steps_are_planned_in_set_timesteps():
    CogVideoXDPMScheduler.clear_table_cache()
    try:
        kd = CogVideoXDPMScheduler(**COGVIDEOX_5B)
        kd.set_timesteps(10)
        ts = [int(t) for t in kd.timesteps]
        planned = set(kd._table.plans) | set(kd._table._extra)
        assert {(t, None, False) for t in ts} <= planned
        assert {(t, b, True) for b, t in zip(ts, ts[1:]) if t - 100 >= 0} <= planned
        x = initial_sample(VIDEO)
        cog_loop(kd, 10, x)
        assert set(kd._table.plans) | set(kd._table._extra) == planned  # nothing planned while stepping
    finally:
        CogVideoXDPMScheduler.clear_table_cache()


def test_off_schedule_timesteps_like_diffusers():
    # diffusers reads the values of timestep and timestep_back: any training timesteps work
    kd, df = CogVideoXDPMScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(20)
    x, m, old = initial_sample(VIDEO), initial_sample(VIDEO, seed=1), initial_sample(VIDEO, seed=2)
    for t, back in [(537, 700), (999, None), (13, 60), (np.int64(300), torch.tensor(333)), (torch.tensor(412), 950),
                    (60, 20), (-5, 100)]:
        previous = old if back is not None else None
        got = kd.step(m, previous, t, back, x, generator=torch.Generator().manual_seed(0))
        expected = df.step(m, previous, t, back, x, generator=torch.Generator().manual_seed(0))
        for a, b in zip(got, expected):
            assert parity_error(a, b) < 1e-6, (t, back)


def test_get_variables_and_get_mult_match_diffusers():
    kd, df = CogVideoXDPMScheduler(**COGVIDEOX_5B), DF(**COGVIDEOX_5B)
    ac = df.alphas_cumprod
    for a, p, b in [(ac[500], ac[450], ac[550]), (ac[999], ac[950], None), (ac[20], torch.tensor(1.0), ac[70])]:
        v_kd, v_df = kd.get_variables(a, p, b), df.get_variables(a, p, b)
        for u, v in zip(v_kd, v_df):
            assert (u is None and v is None) or torch.equal(u, v)
        for u, v in zip(kd.get_mult(v_kd[0], v_kd[1], a, p, b), df.get_mult(v_df[0], v_df[1], a, p, b)):
            assert torch.equal(u, v)


def test_config_round_trip_and_attributes(tmp_path):
    df = DF(**COGVIDEOX_5B)
    kd = CogVideoXDPMScheduler.from_config(df.config)
    assert settings(kd.config) == settings(df.config)
    assert settings(CogVideoXDPMScheduler().config) == settings(DF().config)  # defaults too
    kd.save_pretrained(tmp_path)
    assert settings(DF.from_pretrained(tmp_path).config) == settings(df.config)
    assert settings(CogVideoXDPMScheduler.from_pretrained(tmp_path).config) == settings(kd.config)
    assert kd.diffusers_class_name() == "CogVideoXDPMScheduler" and kd.order == DF.order == 1
    assert kd.init_noise_sigma == df.init_noise_sigma and len(kd) == len(df)
    assert sorted(c.__name__ for c in kd.compatibles) == sorted(c.__name__ for c in df.compatibles)
    for s in (df, kd):
        s.set_timesteps(17, device="cpu")
    assert torch.equal(kd.timesteps, df.timesteps) and kd.timesteps.dtype == df.timesteps.dtype
    x, n = initial_sample(VIDEO), initial_sample(VIDEO, seed=5)
    assert kd.scale_model_input(x, kd.timesteps[0]) is x
    t = torch.tensor([321])
    torch.testing.assert_close(kd.add_noise(x, n, t), df.add_noise(x, n, t), rtol=0, atol=0)
    torch.testing.assert_close(kd.get_velocity(x, n, t), df.get_velocity(x, n, t), rtol=0, atol=0)
    a, b = kd._get_variance(500, 441), df._get_variance(500, 441)
    assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    kd = CogVideoXDPMScheduler(**COGVIDEOX_5B)
    kd.set_timesteps(6)
    other = copy.deepcopy(kd) if how == "deepcopy" else pickle.loads(pickle.dumps(kd))
    x = initial_sample(VIDEO)
    assert loop_error(cog_loop(kd, 6, x), cog_loop(other, 6, x)) == 0


def test_ignored_step_options_are_ignored_like_diffusers(caplog):
    x = initial_sample(VIDEO)
    with caplog.at_level(logging.WARNING, logger="kdfast.schedulers.ddim_cogvideox"):
        got = cog_loop(CogVideoXDPMScheduler(), 5, x, eta=0.8, use_clipped_model_output=True)
    expected = cog_loop(DF(), 5, x, eta=0.8, use_clipped_model_output=True)
    assert loop_error(got, expected) <= 1e-5
    assert loop_error(got, cog_loop(CogVideoXDPMScheduler(), 5, x)) == 0
    assert len([r for r in caplog.records if "ignores eta" in r.getMessage()]) == 1


def test_bad_step_input():
    kd = CogVideoXDPMScheduler()
    x = initial_sample(VIDEO)
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, None, 999, None, x)
    kd.set_timesteps(5)
    t, back = kd.timesteps[1], kd.timesteps[0]
    with pytest.raises(ValueError, match="timestep_back must be the previous step's timestep"):
        kd.step(x, x, t, None, x)
    df = DF()
    df.set_timesteps(5)
    with pytest.raises(IndexError):  # diffusers
        df.step(x, x, 400, None, x)
    with pytest.raises(ValueError, match="old_pred_original_sample must be .* shape"):
        kd.step(x, x[:, :2], t, back, x)
    with pytest.raises(ValueError, match="old_pred_original_sample"):
        kd.step(x, 0.5, t, back, x)
    with pytest.raises(IndexError, match="timestep_back 1000 is outside the training schedule"):
        kd.step(x, x, t, 1000, x)
    with pytest.raises(ValueError, match="timestep_back must be an integer"):
        kd.step(x, x, t, 900.5, x)
    with pytest.raises(IndexError, match="timestep_back -1001 is outside"):  # (read on first-order steps too)
        kd.step(x, None, t, -1001, x)
    with pytest.raises(IndexError):
        df.step(x, None, t, -1001, x)
    with pytest.raises(IndexError, match="timestep 1000 is outside"):
        kd.step(x, None, 1000, None, x)
    with pytest.raises(ValueError, match="timestep must be an integer"):
        kd.step(x, None, 10.5, None, x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:, :2], None, t, None, x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step_cfg(x, x[:, :2], 3.0, None, t, None, x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("inf"), None, t, None, x)
    with pytest.raises(ValueError, match="eta must be a finite"):
        kd.step(x, None, t, None, x, eta=float("nan"))
    with pytest.raises(TypeError):
        kd.step(x, None, t, None, x, bogus=1)
    with pytest.raises(TypeError):  # the DDIM calling form (diffusers' class refuses it too)
        kd.step(x, t, x, generator=None, return_dict=False)
    with pytest.raises(TypeError):
        DF().step(x, t, x, generator=None, return_dict=False)


def test_where_diffusers_gives_inf_or_nan_kdfast_raises():
    x, m = initial_sample(VIDEO), initial_sample(VIDEO, seed=1)
    # an epsilon model at the zero-SNR last timestep (alphas_cumprod[999] = 0) has no x0
    config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    df, kd = DF(**config), CogVideoXDPMScheduler(**config)
    for s in (df, kd):
        s.set_timesteps(10)
    prev, x0 = df.step(m, None, df.timesteps[0], None, x, generator=torch.Generator())
    assert not torch.isfinite(prev).all() and not torch.isfinite(x0).all()
    with pytest.raises(ValueError, match="alphas_cumprod\\[999\\] is 0 .*prediction_type='epsilon' defines no x0"):
        kd.step(m, None, kd.timesteps[0], None, x, generator=torch.Generator())
    # a timestep_back equal to the timestep: r = 0, diffusers' second-order update is inf/NaN
    df, kd = DF(), CogVideoXDPMScheduler()
    for s in (df, kd):
        s.set_timesteps(10)
    prev, _ = df.step(m, x, 500, 500, x, generator=torch.Generator())
    assert not torch.isfinite(prev).all()
    with pytest.raises(ValueError, match="timestep 500: the update is not finite from timestep_back=500"):
        kd.step(m, x, 500, 500, x, generator=torch.Generator())
    # the CogVideoX configuration is finite everywhere: its first step (alphas_cumprod = 0) and
    # the second, which looks back at it (r = inf), and the last (alpha_prev = 1, h = inf)
    got, expected = assert_loop_parity(COGVIDEOX_5B, 3)
    assert all(torch.isfinite(t).all() for t in expected)
    # a non-positive SNR shift leaves diffusers' schedule outside [0, 1): NaN steps
    df = DF(snr_shift_scale=-1.0)
    df.set_timesteps(4)
    assert not torch.isfinite(df.step(m, None, df.timesteps[1], None, x, generator=torch.Generator())[0]).all()
    with pytest.raises(ValueError, match="snr_shift_scale must be a finite number > 0"):
        CogVideoXDPMScheduler(snr_shift_scale=-1.0)
    with pytest.raises(ValueError, match="alphas_cumprod in \\[0, 1\\).*trained_betas"):
        CogVideoXDPMScheduler(trained_betas=np.linspace(0.0, 0.02, 1000).tolist())
