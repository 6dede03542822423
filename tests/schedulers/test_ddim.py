import numpy as np
import pytest
import torch

import kdfast.schedulers
from kdfast.schedulers.ddim import DDIMScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

DF = diffusers.DDIMScheduler


def with_step_kwargs(cls, **fixed):
    """``cls`` whose step (and step_cfg) always get ``fixed`` keyword arguments (run_loop passes none)."""
    body = {"step": lambda self, *a, **k: cls.step(self, *a, **{**fixed, **k})}
    if hasattr(cls, "step_cfg"):
        body["step_cfg"] = lambda self, *a, **k: cls.step_cfg(self, *a, **{**fixed, **k})
    return type(cls.__name__, (cls,), body)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_parity_prediction_types_spacings_and_eta(prediction_type, spacing, eta):
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1)
    assert_parity(with_step_kwargs(DDIMScheduler, eta=eta), with_step_kwargs(DF, eta=eta), config, steps=20)


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("config", [
    dict(clip_sample=False),
    dict(clip_sample=True, clip_sample_range=0.5, prediction_type="v_prediction"),
    dict(set_alpha_to_one=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"),
])
def test_parity_configs(config, steps):
    assert_parity(DDIMScheduler, DF, config, steps=steps)
    assert_parity(with_step_kwargs(DDIMScheduler, eta=0.8), with_step_kwargs(DF, eta=0.8), config, steps=steps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_parity_thresholding_and_clipped_model_output(prediction_type, use_clipped):
    config = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                  prediction_type=prediction_type)
    kw = dict(eta=0.3, use_clipped_model_output=use_clipped)
    got, _ = assert_parity(with_step_kwargs(DDIMScheduler, **kw), with_step_kwargs(DF, **kw), config, steps=20)
    if prediction_type == "epsilon":  # (the dummy model's direct x0 stays inside [-1, 1])
        plain = run_loop(with_step_kwargs(DDIMScheduler, **kw)(prediction_type=prediction_type, clip_sample=False),
                         20, initial_sample())
        assert parity_error(got, plain) > 1e-3  # the thresholding did something
    # clip_sample with the clipped model output re-deriving epsilon
    kw = dict(use_clipped_model_output=use_clipped)
    assert_parity(with_step_kwargs(DDIMScheduler, **kw), with_step_kwargs(DF, **kw),
                  dict(clip_sample_range=0.8, prediction_type=prediction_type), steps=20)


def test_step_reads_the_timestep_value_like_diffusers():
    # DDIM's prev timestep is t - T // n whatever t is: any training timestep is a valid input
    df, kd = DF(clip_sample=False), DDIMScheduler(clip_sample=False)
    for s in (df, kd):
        s.set_timesteps(25)
    x, m = initial_sample(), initial_sample(seed=1)
    for t in [537, 999, 0, 13, np.int64(700), torch.tensor(412), torch.tensor([388])[0], df.timesteps[4]]:
        expected = df.step(m, t, x).prev_sample
        got = kd.step(m, t, x).prev_sample
        assert parity_error(got, expected) < 1e-6, t
    for eta in (0.4, 1.0):  # eta on the fly, noise given
        noise = initial_sample(seed=9)
        expected = df.step(m, 611, x, eta=eta, variance_noise=noise).prev_sample
        assert parity_error(kd.step(m, 611, x, eta=eta, variance_noise=noise).prev_sample, expected) < 1e-6
    # a schedule element and its value give the same step
    t = kd.timesteps[3]
    torch.testing.assert_close(kd.step(m, t, x).prev_sample, kd.step(m, int(t), x).prev_sample, rtol=0, atol=0)


def test_on_the_fly_coefficients_are_kept_and_bounded():
    DDIMScheduler.clear_table_cache()  # tables are shared between instances: start from a fresh one
    try:
        kd = DDIMScheduler()
        kd.set_timesteps(10)
        kd._table._limit = 4
        x, m = initial_sample(), initial_sample(seed=1)
        for t in range(100, 110):
            kd.step(m, t, x)
        assert len(kd._table._extra) == 4
        assert all(kd._key(int(t)) in kd._table for t in kd.timesteps)  # the schedule's own rows stay
    finally:
        DDIMScheduler.clear_table_cache()


def test_a_steps_coefficients_outlive_their_table_row():
    # The table is shared: another scheduler's new etas may drop this step's row before its
    # x0 is read (lazily, with the step's own coefficients).
    DDIMScheduler.clear_table_cache()
    try:
        a, b = DDIMScheduler(), DDIMScheduler()
        a.set_timesteps(10)
        b.set_timesteps(10)
        a._table._limit = 4
        x, m, noise = initial_sample(), initial_sample(seed=1), initial_sample(seed=2)
        t = a.timesteps[2]
        a._step_index = b._step_index = None
        lazy = a.step(m, t, x, eta=0.3, variance_noise=noise)
        for k in range(10):
            b.step(m, t, x, eta=0.5 + k / 100, variance_noise=noise)
            b._step_index = None
        assert all((int(t), 0.3) != key[:2] for key in a._table._extra)  # the row is gone
        x0 = lazy.pred_original_sample  # (read before the step below makes the row again)
        a._step_index = None
        eager = a.step(m, t, x, eta=0.3, variance_noise=noise, return_pred_original_sample=True)
        assert torch.equal(x0, eager.pred_original_sample)
        assert torch.equal(lazy.prev_sample, eager.prev_sample)
    finally:
        DDIMScheduler.clear_table_cache()


def test_threads_sharing_a_table_with_new_etas():
    # Per-request eta in a server: threads with schedulers of one config insert and drop rows
    # of one shared table while the others step. Every step must give its single-threaded value.
    import sys
    import threading

    DDIMScheduler.clear_table_cache()
    x, m, noise = initial_sample(), initial_sample(seed=1), initial_sample(seed=2)
    etas = [[0.3] * 60, [0.01 * k for k in range(1, 61)], [0.7 + 0.001 * k for k in range(60)]]

    def run(schedule_etas, out, errors):
        try:
            s = DDIMScheduler()
            s.set_timesteps(10)
            s._table._limit = 8  # churn: rows are dropped while other threads use theirs
            for k, eta in enumerate(schedule_etas):
                s._step_index = None
                o = s.step(m, s.timesteps[k % 10], x, eta=eta, variance_noise=noise)
                out.append((o.prev_sample, o.pred_original_sample))
        except Exception as e:  # reported by the main thread
            errors.append(e)

    expected = []
    for e in etas:
        expected.append([])
        run(e, expected[-1], [])
    DDIMScheduler.clear_table_cache()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        outs, errors = [[] for _ in etas], []
        threads = [threading.Thread(target=run, args=(e, o, errors)) for e, o in zip(etas, outs)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
        DDIMScheduler.clear_table_cache()
    assert not errors, errors
    for got, want in zip(outs, expected):
        assert len(got) == len(want)
        for (p, x0), (p_want, x0_want) in zip(got, want):
            assert torch.equal(p, p_want) and torch.equal(x0, x0_want)


def test_shared_tables_are_cleared_copied_and_extended_without_races():
    # Each of these read or changed shared state that another thread may be using: the cache
    # was cleared without its lock (a set_timesteps elsewhere raised KeyError between its get
    # and move_to_end), a copy iterated the extras without the table's lock ("OrderedDict
    # mutated during iteration" while another thread stepped with a new eta), and float64
    # rows were inserted into the dict a copy may be iterating.
    import collections
    import copy

    from kdfast.schedulers.base import FusedScheduler

    class Guarded(collections.OrderedDict):
        lock = None

        def clear(self):
            assert self.lock.locked(), "cleared without the lock"
            super().clear()

        def __iter__(self):
            assert self.lock.locked(), "iterated without the lock"
            return super().__iter__()

        def __reduce_ex__(self, protocol):  # (how deepcopy and pickle walk it)
            assert self.lock.locked(), "copied without the lock"
            return super().__reduce_ex__(protocol)

    saved = FusedScheduler._TABLE_CACHE
    try:
        cache = FusedScheduler._TABLE_CACHE = Guarded(saved)
        cache.lock = FusedScheduler._TABLE_CACHE_LOCK
        DDIMScheduler.clear_table_cache()
    finally:
        FusedScheduler._TABLE_CACHE = saved
    s = DDIMScheduler()
    s.set_timesteps(10)
    x, m, noise = initial_sample(), initial_sample(seed=1), initial_sample(seed=2)
    s.step(m, s.timesteps[0], x, eta=0.3, variance_noise=noise)  # an extra row
    table = s._table
    extras = table._extra
    table._extra = Guarded(extras)
    table._extra.lock = table._lock
    try:
        twin = copy.deepcopy(s)
    finally:
        table._extra = extras
    assert list(twin._table._extra) == list(extras)
    first = table.row64(next(iter(table.plans)))
    published = table._rows64
    table.row64(list(table.plans)[1])
    assert len(published) == 1 and len(table._rows64) == 2 and table.row64(next(iter(table.plans))) is first
    DDIMScheduler.clear_table_cache()


def test_schedules_share_tables_across_instances():
    a, b = DDIMScheduler(), DDIMScheduler()
    a.set_timesteps(12)
    b.set_timesteps(12)
    assert a._table is b._table
    c = DDIMScheduler(clip_sample=False)
    c.set_timesteps(12)
    assert c._table is not a._table  # another config, another table


def test_the_shared_tables_are_bounded_in_rows_too(monkeypatch):
    # 64 tables of 1000-step schedules kept ~0.7 GB: the cache holds a row budget as well,
    # dropping the least recently used tables, never the one just made
    from kdfast.schedulers.base import FusedScheduler
    monkeypatch.setattr(FusedScheduler, "_TABLE_CACHE_ROWS", 100)
    DDIMScheduler.clear_table_cache()
    s = DDIMScheduler()
    for steps in (30, 40, 50, 150):
        s.set_timesteps(steps)
        rows = [t.row_count() for t in FusedScheduler._TABLE_CACHE.values()]
        assert rows[-1] == steps and (sum(rows) <= 100 or rows == [steps]), rows
    assert [t.row_count() for t in FusedScheduler._TABLE_CACHE.values()] == [150]
    s.set_timesteps(30)
    assert [t.row_count() for t in FusedScheduler._TABLE_CACHE.values()] == [30]
    x = initial_sample()  # rows made after set_timesteps (a per-call eta) count too
    for eta in (0.1, 0.2, 0.3):
        s.step(x, s.timesteps[0], x, eta=eta, variance_noise=x)
    assert s._table.row_count() == 33
    DDIMScheduler.clear_table_cache()


def test_eta_noise_generator_and_variance_noise():
    x = initial_sample()
    a = run_loop(with_step_kwargs(DDIMScheduler, eta=1.0)(), 10, x, seed=1)
    b = run_loop(with_step_kwargs(DDIMScheduler, eta=1.0)(), 10, x, seed=2)
    assert parity_error(a, b) > 1e-3
    kd = DDIMScheduler()
    kd.set_timesteps(10)
    with pytest.raises(ValueError, match="Cannot pass both generator and variance_noise"):
        kd.step(x, kd.timesteps[0], x, eta=0.5, generator=torch.Generator(), variance_noise=x)
    # without eta neither is used (as in diffusers)
    kd.step(x, kd.timesteps[0], x, generator=torch.Generator(), variance_noise=x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config,eta", [(dict(prediction_type="epsilon"), 0.0),
                                        (dict(prediction_type="v_prediction", clip_sample=False), 0.5),
                                        (dict(thresholding=True, sample_max_value=2.0), 0.0)])
def test_half_precision_keeps_dtype_and_matches(dtype, config, eta):
    assert_parity(with_step_kwargs(DDIMScheduler, eta=eta), with_step_kwargs(DF, eta=eta), config, steps=20,
                  dtype=dtype)


@pytest.mark.parametrize("config,eta", [({}, 0.0), (dict(clip_sample=False), 0.7),
                                        (dict(thresholding=True, sample_max_value=1.5), 0.0),
                                        (dict(prediction_type="v_prediction"), 0.0)])
def test_fused_guidance_matches_diffusers_guidance(config, eta):
    assert_parity(with_step_kwargs(DDIMScheduler, eta=eta), with_step_kwargs(DF, eta=eta), config, steps=20,
                  guidance_scale=2.0)


def _cfg_pp_reference(scheduler, uncond, cond, scale, t, x, eta=0.0, noise=None):
    """CFG++ DDIM in plain float64 torch: x0 from the guided output, renoising with the unguided one."""
    cfg = scheduler.config
    ac = scheduler.alphas_cumprod.double()
    prev_t = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    a_t = ac[t]
    a_prev = ac[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod.double()
    x, u, c = x.double(), uncond.double(), cond.double()
    g = u + scale * (c - u)

    def x0_eps(m):
        if cfg.prediction_type == "epsilon":
            return (x - (1 - a_t).sqrt() * m) / a_t.sqrt(), m
        if cfg.prediction_type == "sample":
            return m, (x - a_t.sqrt() * m) / (1 - a_t).sqrt()
        return a_t.sqrt() * x - (1 - a_t).sqrt() * m, a_t.sqrt() * m + (1 - a_t).sqrt() * x

    x0, _ = x0_eps(g)
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    _, eps_u = x0_eps(u)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    out = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps_u
    return out + std * noise.double() if eta > 0 else out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_cfg_pp_matches_the_formula(prediction_type, eta):
    kd = DDIMScheduler(prediction_type=prediction_type, clip_sample=prediction_type == "v_prediction")
    kd.set_timesteps(10)
    x = initial_sample()
    for t in kd.timesteps[:4]:
        u, c = dummy_cfg(x, t)
        noise = initial_sample(seed=int(t))
        got = kd.step_cfg(u, c, 3.0, t, x, eta=eta, variance_noise=noise if eta else None, cfg_pp=True).prev_sample
        expected = _cfg_pp_reference(kd, u, c, 3.0, int(t), x, eta, noise)
        assert parity_error(got, expected) < 1e-5
        plain = kd.step_cfg(u, c, 3.0, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
        assert parity_error(got, plain) > 1e-4  # CFG++ is a different update
        x = got.float()
    # without guidance, CFG++ is plain DDIM
    u, _ = dummy_cfg(x, kd.timesteps[5])
    t = kd.timesteps[5]
    torch.testing.assert_close(kd.step_cfg(u, u, 3.0, t, x, cfg_pp=True).prev_sample, kd.step(u, t, x).prev_sample)


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
                       beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    kd.save_pretrained(tmp_path)
    again = DDIMScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert not df.config.clip_sample and not df.config.set_alpha_to_one and df.config.timestep_spacing == "trailing"
    df.save_pretrained(tmp_path / "df")
    back = DDIMScheduler.from_pretrained(tmp_path / "df")
    assert back.config.steps_offset == 1 and back.config.beta_schedule == "scaled_linear"
    x = initial_sample()
    assert parity_error(run_loop(back, 10, x), run_loop(df, 10, x)) < 1e-5
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", use_karras_sigmas=True)
    assert DDIMScheduler.from_config(euler.config).config.beta_schedule == "scaled_linear"


def test_add_noise_and_velocity_match():
    df, kd = DF(), DDIMScheduler()
    x, n = initial_sample(), initial_sample(seed=5)
    t = torch.tensor([3, 500])
    torch.testing.assert_close(kd.add_noise(x, n, t), df.add_noise(x, n, t))
    torch.testing.assert_close(kd.get_velocity(x, n, t), df.get_velocity(x, n, t))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="prediction_type='flow_prediction'"):
        DDIMScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        DDIMScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        DDIMScheduler(dynamic_thresholding_ratio=1.5)


def test_bad_step_input():
    kd = DDIMScheduler()
    x = initial_sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, 999, x)
    with pytest.raises(ValueError, match="cannot be larger"):
        kd.set_timesteps(1001)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        kd.set_timesteps(0)
    kd.set_timesteps(5)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), kd.timesteps[0], x)
    with pytest.raises(ValueError, match="eta must be a finite"):
        kd.step(x, kd.timesteps[0], x, eta=float("nan"))
    with pytest.raises(ValueError, match="cfg_pp"):
        kd.step_cfg(x, x, 2.0, kd.timesteps[0], x, cfg_pp=True, use_clipped_model_output=True)
    with pytest.raises(ValueError, match="integer"):
        kd.step(x, 500.5, x)
    with pytest.raises(IndexError, match="outside the training schedule"):
        kd.step(x, 1000, x)
    with pytest.raises(TypeError):
        kd.step(x, 999, x, s_churn=1.0)


def test_timestep_lookup_needs_no_host_read():
    kd = DDIMScheduler(thresholding=True)
    kd.set_timesteps(10)
    x = initial_sample()
    gen = torch.Generator().manual_seed(0)

    for t in list(kd.timesteps):
        u, c = dummy_cfg(x, t)
        with no_host_reads():
            x = kd.step_cfg(u, c, 2.0, t, x, eta=0.5, generator=gen).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("config", [dict(thresholding=True, sample_max_value=1.5), dict(clip_sample_range=0.7)])
def test_pred_original_sample_on_request(config):
    df, kd = DF(**config), DDIMScheduler(**config)
    for s in (df, kd):
        s.set_timesteps(5)
    x = initial_sample()
    for t_df, t_kd in zip(df.timesteps, kd.timesteps):
        m = dummy_model(x, t_df)
        expected = df.step(m, t_df, x, eta=0.5, variance_noise=x).pred_original_sample
        got = kd.step(m, t_kd, x, eta=0.5, variance_noise=x, return_pred_original_sample=True).pred_original_sample
        assert parity_error(got, expected) < 1e-5


def test_get_variance_like_diffusers():
    # a private method, but pipelines (CycleDiffusion) call it on the pipeline's scheduler
    kd, df = DDIMScheduler(), diffusers.DDIMScheduler()
    for t, prev in ((500, 480), (torch.tensor(999), torch.tensor(949)), (20, -1), (0, -1)):
        a, b = kd._get_variance(t, prev), df._get_variance(t, prev)
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_negative_eta_shrinks_the_direction_term_like_diffusers():
    # diffusers adds no noise for eta <= 0 but still takes sqrt(1 - alpha_prev - std**2) with
    # std = eta * sigma_t: a negative eta is not the same as eta 0
    got, expected = [], []
    for cls, out in ((DDIMScheduler, got), (DF, expected)):
        s = cls()
        s.set_timesteps(10)
        x = initial_sample()
        for t in s.timesteps:
            x = s.step(dummy_model(x, t), t, x, eta=-0.5).prev_sample
        out.append(x)
    assert parity_error(got[0], expected[0]) < 1e-5
    s = DDIMScheduler()
    s.set_timesteps(10)
    x = initial_sample()
    for t in s.timesteps:
        x = s.step(dummy_model(x, t), t, x).prev_sample
    assert parity_error(got[0], x) > 1e-3


def test_where_diffusers_gives_inf_or_nan_the_step_raises_and_draws_nothing():
    x = initial_sample()
    m = dummy_model(x, 501)
    # eta > 1: the direction's variance 1 - alpha_prev - std**2 is negative
    df, kd = DF(), DDIMScheduler()
    for s in (df, kd):
        s.set_timesteps(10)
    assert torch.isnan(df.step(m, 501, x, eta=1.5, variance_noise=x).prev_sample).all()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"timestep 501: the step's coefficients are not finite.*eta must be <= 1"):
        kd.step(m, 501, x, eta=1.5, generator=gen)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn
    assert torch.isfinite(kd.step(m, 501, x, eta=1.0, generator=gen).prev_sample).all()
    # an epsilon model at zero terminal SNR defines no x0 without clipping
    config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    df, kd = DF(**config), DDIMScheduler(**config)
    for s in (df, kd):
        s.set_timesteps(10)
    t = int(kd.timesteps[0])
    assert not torch.isfinite(df.step(dummy_model(x, t), t, x).prev_sample).all()
    with pytest.raises(ValueError, match=r"prediction_type='epsilon' defines no x0"):
        kd.step(dummy_model(x, t), kd.timesteps[0], x)
    kd = DDIMScheduler(**dict(config, prediction_type="v_prediction"))
    kd.set_timesteps(10)
    assert torch.isfinite(kd.step(dummy_model(x, t), kd.timesteps[0], x).prev_sample).all()


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDIMParallelScheduler"])
@pytest.mark.parametrize("config", [dict(rescale_betas_zero_snr=True, beta_end=0.03, timestep_spacing="linspace"),
                                    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")])
def test_eta_1_from_zero_terminal_snr_has_no_direction_term(name, config):
    # At alpha_cumprod 0 with eta = 1 the direction's variance 1 - alpha_prev - std**2 is exactly
    # 0; rounding leaves it a hair above or below 0 depending on the step count (diffusers' float32
    # then gives NaN at some counts). kdfast takes it as 0 at every count: finite, and where
    # diffusers is finite the same.
    cls, df_cls = getattr(kdfast.schedulers, name), getattr(diffusers, name)
    x = initial_sample()
    m = dummy_model(x, 999)
    compared = 0
    for steps in range(2, 61):
        df, kd = df_cls(**config), cls(**config)
        for s in (df, kd):
            s.set_timesteps(steps)
        t = df.timesteps[0]
        expected = df.step(m, t, x, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
        got = kd.step(m, t, x, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.isfinite(got).all(), steps
        if torch.isfinite(expected).all():
            assert parity_error(got, expected) < 1e-5, steps
            compared += 1
    assert compared >= 5
