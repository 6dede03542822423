import inspect
import json

import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.ddpm import DDPMScheduler
from kdfast.schedulers.ddpm_parallel import DDPMParallelScheduler
from paradigms import batch_inputs, learned_model, mixed_timesteps, stepwise_mean
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

DF = diffusers.DDPMParallelScheduler
FIXED = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"]


def learned_loop(scheduler, steps, x, variance_type, seed=0):
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        x = scheduler.step(learned_model(x, t, variance_type), t, x, generator=gen).prev_sample
    return x


# --------------------------------------------------------------------------- step (DDPM's)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_step_loop_parity(prediction_type, spacing, variance_type):
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1,
                  variance_type=variance_type)
    assert_parity(DDPMParallelScheduler, DF, config, steps=15)


@pytest.mark.parametrize("config", [
    dict(clip_sample=True, clip_sample_range=0.5, prediction_type="v_prediction"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(rescale_betas_zero_snr=True, timestep_spacing="linspace", clip_sample=True),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", variance_type="fixed_large"),
    dict(beta_schedule="sigmoid", variance_type="fixed_small_log"),
    dict(beta_schedule="laplace", timestep_spacing="trailing"),
    dict(trained_betas=[0.0001 + 0.0002 * k for k in range(100)], num_train_timesteps=100),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
])
def test_step_loop_parity_configs(config):
    assert_parity(DDPMParallelScheduler, DF, config, steps=12)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_step_loop_parity_learned_variances(variance_type):
    x = initial_sample()
    expected = learned_loop(DF(variance_type=variance_type), 8, x, variance_type)
    got = learned_loop(DDPMParallelScheduler(variance_type=variance_type), 8, x, variance_type)
    assert parity_error(got, expected) <= 1e-5


@pytest.mark.parametrize("config", [{}, dict(thresholding=True, sample_max_value=1.5),
                                    dict(prediction_type="v_prediction", clip_sample=False,
                                         variance_type="fixed_large")])
def test_step_cfg_fuses_guidance(config, monkeypatch):
    assert_parity(DDPMParallelScheduler, DF, config, steps=10, guidance_scale=2.0)
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(1) or real(*a))
    kd = DDPMParallelScheduler(**config)
    kd.set_timesteps(5)
    x, gen = initial_sample(), torch.Generator().manual_seed(0)
    for t in kd.timesteps:
        u, c = dummy_cfg(x, t)
        calls.clear()
        x = kd.step_cfg(u, c, 2.0, t, x, generator=gen).prev_sample
        assert len(calls) == 1
        calls.clear()
        x = kd.step(u, t, x, generator=gen).prev_sample
        assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(), dict(prediction_type="v_prediction", clip_sample=False,
                                                 variance_type="fixed_large"),
                                    dict(thresholding=True, sample_max_value=2.0)])
def test_step_half_precision_keeps_dtype_and_matches(dtype, config):
    assert_parity(DDPMParallelScheduler, DF, config, steps=12, dtype=dtype)


def test_step_path_needs_no_host_read():
    for config in (dict(thresholding=True), dict(variance_type="fixed_large", clip_sample=False)):
        kd = DDPMParallelScheduler(**config)
        kd.set_timesteps(8)
        x, gen = initial_sample(), torch.Generator().manual_seed(0)
        for t in list(kd.timesteps):
            m = dummy_model(x, t)
            with no_host_reads():
                x = kd.step_cfg(m, m, 2.0, t, x, generator=gen).prev_sample
                x = kd.step(m, t, x, generator=gen).prev_sample
        assert torch.isfinite(x).all()


def test_step_outputs_and_tuples_like_diffusers():
    df, kd = DF(clip_sample_range=0.7), DDPMParallelScheduler(clip_sample_range=0.7)
    for s in (df, kd):
        s.set_timesteps(5)
    x = initial_sample()
    for t in kd.timesteps:
        m = dummy_model(x, t)
        want = df.step(m, t, x, generator=torch.Generator().manual_seed(int(t)), return_dict=False)
        prev, x0 = kd.step(m, t, x, generator=torch.Generator().manual_seed(int(t)), return_dict=False)
        assert parity_error(prev, want[0]) < 1e-5 and parity_error(x0, want[1]) < 1e-5
        x = prev
    with pytest.raises(TypeError, match="bogus"):
        kd.step(x, kd.timesteps[0], x, bogus=1)


# --------------------------------------------------------------------------- batch_step_no_noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,steps", [("leading", 12), ("trailing", 10)])  # (where diffusers' prev is step's)
@pytest.mark.parametrize("clipping", [dict(clip_sample=False), dict(clip_sample=True, clip_sample_range=0.8),
                                      dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)])
@pytest.mark.parametrize("variance_type", FIXED + ["learned", "learned_range"])
def test_batch_step_parity_over_mixed_timesteps(prediction_type, spacing, steps, clipping, variance_type):
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1,
                  variance_type=variance_type, **clipping)
    df, kd = DF(**config), DDPMParallelScheduler(**config)
    for s in (df, kd):
        s.set_timesteps(steps)
    learned = variance_type if variance_type.startswith("learned") else None
    t = mixed_timesteps(kd)
    m, x = batch_inputs(t, scale=2.0, model_scale=2.5, learned=learned)  # (some x0 outside [-1, 1])
    expected = df.batch_step_no_noise(m, t, x)
    got = kd.batch_step_no_noise(m, t, x)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert parity_error(got, expected) <= 1e-5
    if learned:  # the variance half is not used: the prediction alone gives the same
        assert torch.equal(kd.batch_step_no_noise(m[:, :3], t, x), got)
        assert parity_error(df.batch_step_no_noise(m[:, :3], t, x), expected) == 0.0
    # every sample on the schedule gets exactly step()'s mean: a ParaDiGMS loop converges to the sequential one
    t = mixed_timesteps(kd, off_schedule=None)
    assert torch.equal(kd.batch_step_no_noise(m, t, x), stepwise_mean(kd, m, t, x))
    if clipping.get("clip_sample") is False:
        return
    unclipped = DDPMParallelScheduler.from_config(kd.config, clip_sample=False, thresholding=False)
    unclipped.set_timesteps(steps)
    assert parity_error(unclipped.batch_step_no_noise(m, t, x), kd.batch_step_no_noise(m, t, x)) > 1e-3


def test_batch_step_before_set_timesteps_steps_to_t_minus_1():
    df, kd = DF(variance_type="fixed_large"), DDPMParallelScheduler(variance_type="fixed_large")
    t = torch.tensor([999, 999, 500, 1, 0, 0, 731, 2, 999])
    m, x = batch_inputs(t)
    got = kd.batch_step_no_noise(m, t, x)
    assert parity_error(got, df.batch_step_no_noise(m, t, x)) <= 1e-5
    assert torch.equal(got, stepwise_mean(DDPMParallelScheduler(variance_type="fixed_large"), m, t, x))


@pytest.mark.parametrize("schedule", [dict(num_inference_steps=12, spacing="linspace"),
                                      dict(num_inference_steps=7, spacing="trailing"),
                                      dict(timesteps=[999, 800, 501, 250, 30, 3])])
def test_batch_step_follows_the_schedule_where_diffusers_does_not(schedule, monkeypatch):
    # diffusers' batch_step_no_noise steps t to t - T // num_inference_steps; for these schedules that is
    # not the next timestep, which its step() (and both of kdfast's) takes
    import diffusers.schedulers.scheduling_ddpm_parallel as ddpm_parallel

    config = dict(timestep_spacing=schedule.pop("spacing", "leading"))
    df, kd = DF(**config), DDPMParallelScheduler(**config)
    for s in (df, kd):
        s.set_timesteps(**schedule)
    t = mixed_timesteps(kd, off_schedule=None)
    m, x = batch_inputs(t)
    got = kd.batch_step_no_noise(m, t, x)
    monkeypatch.setattr(ddpm_parallel, "randn_tensor", lambda shape, **kw: torch.zeros(shape, dtype=kw["dtype"]))
    df_means = torch.cat([df.step(m[i:i + 1], int(t[i]), x[i:i + 1]).prev_sample for i in range(len(t))])
    assert parity_error(got, df_means) <= 1e-5
    assert parity_error(df.batch_step_no_noise(m, t, x), df_means) > 1e-4
    # a timestep off the schedule steps as diffusers' batch_step_no_noise steps it
    off = torch.tensor([640] * len(t))
    assert parity_error(kd.batch_step_no_noise(m, off, x), df.batch_step_no_noise(m, off, x)) <= 1e-5


def test_batch_step_timestep_forms():
    kd = DDPMParallelScheduler()
    kd.set_timesteps(10)
    t = torch.tensor([900, 800, 700, 700, 1, 0])  # (1: off the schedule)
    m, x = batch_inputs(t, shape=(6, 2, 3, 3))
    want = kd.batch_step_no_noise(m, t, x)
    for form in (t.tolist(), t.numpy(), t.to(torch.int32), t.to(torch.int16),
                 t.reshape(2, 3), [torch.tensor(v) for v in t.tolist()]):
        assert torch.equal(kd.batch_step_no_noise(m, form, x), want), form
    one = kd.batch_step_no_noise(m, 700, x)
    for form in (torch.tensor(700), torch.tensor([700]), kd.timesteps[2], [700]):
        assert torch.equal(kd.batch_step_no_noise(m, form, x), one), form
    window = kd.timesteps[2:5, None].expand(-1, 2)
    assert torch.equal(kd.batch_step_no_noise(m, window, x), kd.batch_step_no_noise(m, window.tolist(), x))
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    assert torch.equal(kd.batch_step_no_noise(m[perm], t[perm], x[perm]), want[perm])


def test_batch_step_follows_an_edited_schedule():
    kd = DDPMParallelScheduler(clip_sample=False)
    kd.set_timesteps(10)
    t = torch.tensor([800, 700, 700])
    m, x = batch_inputs(t)
    m, x = m[:3], x[:3]
    before = kd.batch_step_no_noise(m, t, x)
    kd.timesteps[2] = 650  # in place: 800 now steps to 650, as step() does
    after = kd.batch_step_no_noise(m, t.tolist(), x)  # (a list: no tensor of the schedule's to look up)
    assert not torch.equal(after[:1], before[:1]) and torch.equal(after[1:], before[1:])
    assert torch.equal(after[:1], stepwise_mean(kd, m[:1], t[:1], x[:1]))


def picard_loop(scheduler, x, noises, window, tolerance=0.0):
    """ParaDiGMS as diffusers' pipeline runs it for a stochastic scheduler: the noise of every timestep
    drawn beforehand (``_get_variance(t) ** 0.5`` times ``noises[j]``), a sliding window of timesteps
    refined by Picard iterations, each one batch_step_no_noise over the window."""
    ts = scheduler.timesteps
    n = len(ts)
    buf = torch.stack([x] * (n + 1))
    noise = torch.stack([scheduler._get_variance(ts[j]) ** 0.5 * noises[j] for j in range(n)] + [0 * x])
    begin, end, sweeps = 0, min(window, n), 0
    while begin < n:
        block_t = ts[begin:end, None].repeat(1, x.shape[0])
        block = buf[begin:end]
        m = torch.stack([dummy_model(block[i], ts[begin + i]) for i in range(end - begin)])
        denoised = scheduler.batch_step_no_noise(m.flatten(0, 1), block_t.flatten(0, 1), block.flatten(0, 1))
        new = (buf[begin][None] + torch.cumsum(denoised.reshape(block.shape) - block, dim=0)
               + torch.cumsum(noise[begin:end], dim=0))
        error = (new - buf[begin + 1:end + 1]).flatten(1).abs().amax(dim=1)
        ind = int(torch.argmax(torch.cat([(error > tolerance).int(), torch.ones(1, dtype=torch.int32)])))
        buf[begin + 1:end + 1] = new
        new_begin = begin + min(1 + ind, window)
        new_end = min(new_begin + window, n)
        buf[end:new_end + 1] = buf[end][None]
        begin, end, sweeps = new_begin, new_end, sweeps + 1
    return buf[-1], sweeps


@pytest.mark.parametrize("config", [dict(), dict(timestep_spacing="linspace", prediction_type="v_prediction")])
def test_paradigms_loop_converges_to_the_sequential_loop(config):
    x = initial_sample((2, 3, 4, 4))
    noises = [initial_sample((2, 3, 4, 4), seed=100 + j) for j in range(12)]
    kd = DDPMParallelScheduler(**config)
    kd.set_timesteps(12)
    sequential = x
    for j, t in enumerate(kd.timesteps):
        sequential = kd.step(dummy_model(sequential, t), t, sequential, variance_noise=noises[j]).prev_sample
    parallel, _ = picard_loop(kd, x, noises, window=5)
    assert parity_error(parallel, sequential) <= 1e-5
    df = DF(**config)
    df.set_timesteps(12)
    df_parallel, _ = picard_loop(df, x, noises, window=5)
    if config.get("timestep_spacing") == "linspace":  # diffusers' own parallel loop ends elsewhere
        assert parity_error(df_parallel, sequential) > 1e-3
    else:
        assert parity_error(df_parallel, sequential) <= 1e-5
    assert not kd._is_ode_scheduler and not DF._is_ode_scheduler


@pytest.mark.parametrize("config", [dict(), dict(prediction_type="v_prediction", clip_sample=False)])
def test_in_diffusers_paradigms_pipeline(config):
    from test_ddim_parallel import paradigms_latents

    expected = paradigms_latents(DF(**config), guidance_scale=1.0)
    got = paradigms_latents(DDPMParallelScheduler(**config), guidance_scale=1.0)
    assert torch.isfinite(got).all() and parity_error(got, expected) <= 1e-5


# --------------------------------------------------------------------------- errors, NaN, config


def test_bad_batch_input_is_named():
    kd = DDPMParallelScheduler()
    kd.set_timesteps(10)
    x = initial_sample((4, 2, 3, 3))
    t = torch.tensor([900, 800, 700, 0])
    with pytest.raises(ValueError, match="timesteps: got 3 timesteps for a batch of 4"):
        kd.batch_step_no_noise(x, t[:3], x)
    with pytest.raises(IndexError, match=r"timesteps\[1\] = 1000 is outside the training schedule \[0, 1000\)"):
        kd.batch_step_no_noise(x, torch.tensor([900, 1000, 700, 0]), x)
    with pytest.raises(IndexError, match=r"timesteps\[0\] = -5 is outside"):
        kd.batch_step_no_noise(x, [-5, 800, 700, 0], x)
    # a float timestep indexes alphas_cumprod in diffusers: an IndexError there, and here
    for bad in (t.float(), [900.0, 800.0, 700.0, 0.0], 700.0):
        with pytest.raises(IndexError):
            DF().batch_step_no_noise(x, torch.as_tensor(bad), x)
        with pytest.raises(IndexError, match="timesteps must be integer training timesteps"):
            kd.batch_step_no_noise(x, bad, x)
    with pytest.raises(TypeError, match="timesteps must hold integer"):
        kd.batch_step_no_noise(x, t.bool(), x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.batch_step_no_noise(x[:3], t, x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.batch_step_no_noise(torch.cat([x, x], 1), t, x)  # a variance half with a fixed variance type
    learned = DDPMParallelScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="does not match sample shape"):
        learned.batch_step_no_noise(torch.cat([x, x, x], 1), t, x)
    with pytest.raises(ValueError, match="sample must have a batch dimension"):
        kd.batch_step_no_noise(x[0, 0, 0, 0], t, x[0, 0, 0, 0])
    with pytest.raises(TypeError, match="model_output and sample must be torch.Tensor"):
        kd.batch_step_no_noise(x, t, x.numpy())
    with pytest.raises(TypeError, match="sample must be float32"):
        kd.batch_step_no_noise(x.long(), t, x.long())
    kd.variance_type = "unknown"  # diffusers reads the attribute, not the config
    with pytest.raises(ValueError, match="variance_type='unknown'"):
        kd.batch_step_no_noise(x, t, x)


def test_where_diffusers_gives_inf_or_nan_kdfast_raises_or_stays_finite():
    zero_snr = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    t = torch.tensor([999, 999, 899, 0])
    m, x = batch_inputs(t, shape=(4, 2, 3, 3))
    # epsilon at alphas_cumprod 0 without clipping: x0 is infinite; diffusers returns inf/NaN, kdfast says why
    df, kd = DF(**zero_snr, clip_sample=False), DDPMParallelScheduler(**zero_snr, clip_sample=False)
    for s in (df, kd):
        s.set_timesteps(10)
    assert not torch.isfinite(df.batch_step_no_noise(m, t, x)[:2]).any()
    with pytest.raises(ValueError, match=r"timestep 999: alphas_cumprod\[999\] is 0 \(rescale_betas_zero_snr=True\)"):
        kd.batch_step_no_noise(m, t, x)
    with pytest.raises(ValueError, match="prediction_type='epsilon' defines no x0"):
        kd.step(m, kd.timesteps[0], x)
    assert torch.isfinite(kd.batch_step_no_noise(m[2:], t[2:], x[2:])).all()
    # clipped, both are finite and agree; where x == eps exactly diffusers' x0 is 0/0 = NaN, kdfast's 0
    df, kd = DF(**zero_snr), DDPMParallelScheduler(**zero_snr)
    for s in (df, kd):
        s.set_timesteps(10)
    got = kd.batch_step_no_noise(m, t, x)
    assert torch.isfinite(got).all() and parity_error(got, df.batch_step_no_noise(m, t, x)) <= 1e-5
    assert torch.isnan(df.batch_step_no_noise(x, t, x)[:2]).all()
    assert torch.isfinite(kd.batch_step_no_noise(x, t, x)).all()
    # a zero beta: 1 - alphas_cumprod[0] = 0, and the posterior mean's x0 coefficient 0 / 0
    df = DF(trained_betas=[0.0] + [0.01] * 99, num_train_timesteps=100)
    kd = DDPMParallelScheduler.from_config(df.config)
    for s in (df, kd):
        s.set_timesteps(10)
    t0 = torch.tensor([0, 50])
    assert torch.isnan(df.batch_step_no_noise(m[:2], t0, x[:2])[0]).all()
    with pytest.raises(ValueError, match="timestep 0: the step's coefficients are not finite"):
        kd.batch_step_no_noise(m[:2], t0, x[:2])
    with pytest.raises(ValueError, match="timestep 0: the step's coefficients are not finite"):
        kd.step(m[:2], kd.timesteps[-1], x[:2])
    assert torch.isfinite(kd.batch_step_no_noise(m[:2], t0[1:], x[:2])).all()
    # fixed_large_log: diffusers' step is NaN (sqrt of a log-variance); kdfast's finite (see DDPMScheduler)
    df, kd = DF(variance_type="fixed_large_log"), DDPMParallelScheduler(variance_type="fixed_large_log")
    assert torch.isnan(run_loop(df, 5, initial_sample())).all()
    assert torch.isfinite(run_loop(kd, 5, initial_sample())).all()


def test_config_round_trip_and_drop_in(tmp_path):
    df = DF(variance_type="learned_range", clip_sample=False, steps_offset=1, timestep_spacing="trailing",
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    kd = DDPMParallelScheduler.from_config(df.config)
    assert settings(kd.config) == settings(df.config)
    kd.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "DDPMParallelScheduler"
    again = DDPMParallelScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    back = DF.from_pretrained(tmp_path)
    assert settings(back.config) == settings(df.config)
    assert list(inspect.signature(DDPMParallelScheduler.__init__).parameters) == \
        list(inspect.signature(DF.__init__).parameters)
    for name in ("step", "batch_step_no_noise", "set_timesteps", "previous_timestep", "_get_variance"):
        ours = list(inspect.signature(getattr(DDPMParallelScheduler, name)).parameters)
        theirs = list(inspect.signature(getattr(DF, name)).parameters)
        assert ours[:len(theirs)] == theirs, name
    plain = DF(beta_schedule="squaredcos_cap_v2")
    kd = DDPMParallelScheduler.from_config(plain.config)
    x = initial_sample()
    assert parity_error(run_loop(kd, 10, x), run_loop(plain, 10, x)) < 1e-5
    assert DDPMScheduler.from_config(kd.config).config.beta_schedule == "squaredcos_cap_v2"
    assert DF in kd.compatibles and diffusers.DDIMScheduler in kd.compatibles
    assert len(kd) == 1000 and kd.order == 1 and kd.init_noise_sigma == 1.0
    for name in ("variance_type", "custom_timesteps", "one", "alphas_cumprod", "betas", "alphas", "timesteps"):
        assert hasattr(kd, name) and hasattr(plain, name), name


def test_get_variance_and_previous_timestep_like_diffusers():
    for variance_type in FIXED:
        kd, df = DDPMParallelScheduler(variance_type=variance_type), DF(variance_type=variance_type)
        for s in (kd, df):
            s.set_timesteps(8)
        for t in df.timesteps:
            assert int(kd.previous_timestep(t)) == int(df.previous_timestep(t))
            a, b = kd._get_variance(t), df._get_variance(t)  # (the pipeline draws its noise with these)
            assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6, atol=0, equal_nan=True)
