import warnings

import pytest
import torch

import kdfast.schedulers.base as base
import kdfast.schedulers.lms_discrete as lms
from kdfast.schedulers.lms_discrete import LMSDiscreteScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


class DF(diffusers.LMSDiscreteScheduler):
    """diffusers' LMS, taking (and ignoring) the ``generator`` that run_loop passes to every step."""

    def step(self, model_output, timestep, sample, order=4, return_dict=True, generator=None):
        return super().step(model_output, timestep, sample, order=order, return_dict=return_dict)


def loop(s, steps, x, orders=None, begin_index=None, return_x0=False):
    """A loop with a given ``order`` per step (cycled); returns the samples (and x0s) of every step."""
    s.set_timesteps(steps)
    if begin_index is not None:
        s.set_begin_index(begin_index)
    start = begin_index or 0
    x = x * (s.sigmas[start] if begin_index is not None else s.init_noise_sigma)
    samples, x0s = [], []
    for k, t in enumerate(s.timesteps[start:]):
        kw = {} if orders is None else dict(order=orders[k % len(orders)])
        out = s.step(dummy_model(s.scale_model_input(x, t), t), t, x, **kw)
        x = out.prev_sample
        samples.append(x)
        if return_x0:
            x0s.append(out.pred_original_sample)
    return (samples, x0s) if return_x0 else samples


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_parity_prediction_types_and_spacings(prediction_type, spacing, steps):
    assert_parity(LMSDiscreteScheduler, DF, dict(prediction_type=prediction_type, timestep_spacing=spacing,
                                                 steps_offset=1, **SD), steps=steps)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("steps", [1, 10, 25])
def test_parity_sigma_schedules(sigmas, steps):
    assert_parity(LMSDiscreteScheduler, DF, {sigmas: True}, steps=steps)


@pytest.mark.parametrize("config", [
    {},
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
    dict(prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(num_train_timesteps=500, **SD),
])
def test_parity_other_configs(config):
    assert_parity(LMSDiscreteScheduler, DF, config, steps=15)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_sigma_range_from_a_foreign_config_as_diffusers_reads_it(sigmas):
    # diffusers' LMS spaces Karras sigmas between the schedule's ends but reads sigma_min /
    # sigma_max (kept from another scheduler's config) for the exponential and beta spacings
    euler = diffusers.EulerDiscreteScheduler(sigma_min=0.1, sigma_max=8.0, **{sigmas: True})
    df = DF.from_config(euler.config)
    kd = LMSDiscreteScheduler.from_config(df.config)
    assert kd.config.sigma_min == 0.1
    x = initial_sample()
    assert parity_error(run_loop(kd, 12, x), run_loop(df, 12, x)) < 1e-5
    assert torch.equal(kd.sigmas, df.sigmas)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("steps", [2, 3])
def test_few_large_steps_are_more_accurate_than_diffusers(prediction_type, steps):
    # On the 0.0001-0.02 schedule two steps go from sigma 157 to 0.01: diffusers' float32
    # derivative (x - x0) / sigma cancels ~1e-7 |x| ~ 5e-5, above the 1e-5 parity bound; kdfast
    # forms the derivative on the host without cancellation. Both are held to the float64 loop.
    x = initial_sample()
    truth = run_loop(DF(prediction_type=prediction_type), steps, x.double())
    df_err = parity_error(run_loop(DF(prediction_type=prediction_type), steps, x), truth)
    kd_err = parity_error(run_loop(LMSDiscreteScheduler(prediction_type=prediction_type), steps, x), truth)
    assert kd_err <= 2 * df_err + 1e-6 and kd_err < 2e-6


@pytest.mark.parametrize("orders", [[1], [2], [3], [4, 2, 1, 3, 4, 4, 2]])
def test_parity_order_argument(orders):
    # orders that change from step to step: diffusers keeps up to `order` derivatives, dropping
    # one per step, and sums min(step_index + 1, order) coefficients with those it holds
    x = initial_sample()
    got = loop(LMSDiscreteScheduler(**SD), 12, x, orders)
    expected = loop(DF(**SD), 12, x, orders)
    for a, b in zip(got, expected):
        assert parity_error(a, b) < 1e-5


def test_derivatives_are_kept_like_diffusers():
    kd, df = LMSDiscreteScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(8)
    x_kd = x_df = initial_sample()
    for k, (t_kd, t_df) in enumerate(zip(kd.timesteps, df.timesteps)):
        order = (4, 2, 3, 1)[k % 4]
        m = dummy_model(kd.scale_model_input(x_kd, t_kd), t_kd)
        x_kd = kd.step(m, t_kd, x_kd, order).prev_sample
        x_df = df.step(dummy_model(df.scale_model_input(x_df, t_df), t_df), t_df, x_df, order).prev_sample
        if k < 7:  # (the last step's derivative is not kept: nothing reads it)
            assert len(kd.derivatives) == len(df.derivatives)
            # an epsilon model's derivative (x - x0) / sigma is its output: kdfast keeps it
            # exactly (diffusers' float32 x - x0 cancels to ~1e-4 here, at sigma ~ 100)
            assert torch.equal(kd.derivatives[-1], m)
            assert parity_error(kd.derivatives[-1], df.derivatives[-1]) < 1e-3


def test_order_too_high_or_too_low_is_a_clear_error():
    kd = LMSDiscreteScheduler()
    kd.set_timesteps(10)
    x = initial_sample()
    t = kd.timesteps[0]
    with pytest.raises(ValueError, match=r"order=5 is not supported.*at most 4"):
        kd.step(x, t, x, order=5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="order must be a positive integer"):
            kd.step(x, t, x, order=bad)
    with pytest.raises(ValueError, match="order=7"):
        kd.step_cfg(x, x, 2.0, t, x, order=7)
    assert kd.step_index is None  # nothing happened


def test_coefficients_are_diffusers_integrals_in_float64():
    from scipy import integrate

    kd, df = LMSDiscreteScheduler(use_karras_sigmas=True), DF(use_karras_sigmas=True)
    for s in (kd, df):
        s.set_timesteps(12)
    sig = kd.sigmas.double().tolist()
    for order in (1, 2, 3, 4):
        for t in range(order - 1, 12):
            for j in range(order):
                got = kd.get_lms_coefficient(order, t, j)
                assert got == pytest.approx(df.get_lms_coefficient(order, t, j), rel=2e-6, abs=1e-7)

                def basis(tau):
                    prod = 1.0
                    for k in range(order):
                        if k != j:
                            prod *= (tau - sig[t - k]) / (sig[t - j] - sig[t - k])
                    return prod

                exact = integrate.quad(basis, sig[t], sig[t + 1], epsabs=0, epsrel=1e-13)[0]
                assert got == pytest.approx(exact, rel=1e-12, abs=1e-14)


def test_repeated_sigmas_give_finite_coefficients():
    # a zero-length step has zero coefficients; a repeated node drops to the nodes before it
    assert lms.lms_coefficients([5.0, 3.0, 3.0, 0.0], 1, 2) == [0.0, 0.0]
    assert lms.lms_coefficients([5.0, 3.0, 3.0, 0.0], 2, 3) == [-3.0, 0.0, 0.0]  # nodes 3, 3, 5: Euler
    assert lms.lms_coefficients([5.0, 4.0, 3.0, 0.0], 2, 3) == pytest.approx([-14.25, 18.0, -6.75])  # by hand


def test_coefficients_are_computed_once_per_schedule_and_order(monkeypatch):
    base.FusedScheduler.clear_table_cache()
    calls = []
    real = lms.lms_coefficients
    monkeypatch.setattr(lms, "lms_coefficients", lambda *a: calls.append(a) or real(*a))
    x = initial_sample()
    kd = LMSDiscreteScheduler(**SD)
    kd.set_timesteps(10)
    assert len(calls) == 10
    calls.clear()
    loop(kd, 10, x)
    assert not calls  # set_timesteps again with the same settings: the shared table
    loop(kd, 10, x, orders=[2])
    assert len(calls) == 8  # order 2 from the third step on (the first two are order 4's), made on first use
    calls.clear()
    loop(LMSDiscreteScheduler(**SD), 10, x, orders=[2])
    assert not calls


def test_one_fused_call_per_step(monkeypatch):
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    kd = LMSDiscreteScheduler(**SD)
    kd.set_timesteps(9)
    x = initial_sample()
    for k, t in enumerate(kd.timesteps):
        calls.clear()
        if k % 2:
            u, c = dummy_cfg(kd.scale_model_input(x, t), t)
            x = kd.step_cfg(u, c, 2.0, t, x).prev_sample
        else:
            x = kd.step(dummy_model(kd.scale_model_input(x, t), t), t, x).prev_sample
        assert len(calls) == 1
        assert len(calls[0][5]) == min(k, 3)  # history: the past derivatives it reads
        assert calls[0][10] == (k < 8)  # write_history: not after the last step (nothing reads it)


def test_timestep_lookup_needs_no_host_read(monkeypatch):
    kd = LMSDiscreteScheduler(use_karras_sigmas=True)
    kd.set_timesteps(8)
    kd.set_begin_index(2)
    x = initial_sample()

    def forbidden(*args, **kwargs):
        raise AssertionError("lms_coefficients on the step path")

    monkeypatch.setattr(lms, "lms_coefficients", forbidden)  # made by set_timesteps / set_begin_index
    for k, t in enumerate(list(kd.timesteps)[2:]):
        m = dummy_model(kd.scale_model_input(x, t), t)
        with no_host_reads():
            x = kd.step(m, t, x).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_half_precision_keeps_dtype_and_matches(dtype, prediction_type):
    assert_parity(LMSDiscreteScheduler, DF, dict(prediction_type=prediction_type, **SD), steps=20, dtype=dtype)


@pytest.mark.parametrize("config", [{}, dict(use_karras_sigmas=True, prediction_type="v_prediction", **SD)])
def test_fused_guidance_matches_diffusers_guidance(config):
    got, _ = assert_parity(LMSDiscreteScheduler, DF, config, steps=20, guidance_scale=2.0)
    unfused = run_loop(LMSDiscreteScheduler(**config), 20, initial_sample(), guidance_scale=2.0)
    assert parity_error(got, unfused) < 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_pred_original_sample_and_tuples_match_diffusers(prediction_type):
    kd, df = LMSDiscreteScheduler(prediction_type=prediction_type, **SD), DF(prediction_type=prediction_type, **SD)
    for s in (kd, df):
        s.set_timesteps(6)
    x_kd = x_df = initial_sample() * df.init_noise_sigma
    for k, (t_kd, t_df) in enumerate(zip(kd.timesteps, df.timesteps)):
        prev, x0 = df.step(dummy_model(df.scale_model_input(x_df, t_df), t_df), t_df, x_df, return_dict=False)
        m = dummy_model(kd.scale_model_input(x_kd, t_kd), t_kd)
        if k % 2:
            out = kd.step(m, t_kd, x_kd, return_dict=True, return_pred_original_sample=True)
            got_prev, got_x0 = out.prev_sample, out.pred_original_sample
        else:
            out = kd.step(m, t_kd, x_kd, return_dict=False)
            assert isinstance(out, tuple) and len(out) == 2
            got_prev, got_x0 = out
        assert parity_error(got_prev, prev) < 1e-5 and parity_error(got_x0, x0) < 1e-5
        x_kd, x_df = got_prev, prev


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = LMSDiscreteScheduler(use_karras_sigmas=True, prediction_type="v_prediction", **SD)
    kd.save_pretrained(tmp_path)
    again = LMSDiscreteScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert df.config.use_karras_sigmas and df.config.prediction_type == "v_prediction"
    df.save_pretrained(tmp_path / "df")
    back = LMSDiscreteScheduler.from_pretrained(tmp_path / "df")
    assert settings(back.config) == {k: v for k, v in settings(df.config).items()}
    x = initial_sample()
    assert parity_error(run_loop(back, 10, x), run_loop(df, 10, x)) < 1e-5
    assert "LMSDiscreteScheduler" in [c.__name__ for c in kd.compatibles]


@pytest.mark.parametrize("start", [3, 8])
def test_set_begin_index_and_img2img_start(start):
    # diffusers sums min(step_index + 1, 4) coefficients with the derivatives it holds (fewer
    # at an img2img start): kdfast plans those steps in set_begin_index
    x = initial_sample()
    got = loop(LMSDiscreteScheduler(**SD), 12, x, begin_index=start)
    expected = loop(DF(**SD), 12, x, begin_index=start)
    assert parity_error(got[-1], expected[-1]) < 1e-5


def test_add_noise_and_scale_model_input_match():
    df, kd = DF(**SD), LMSDiscreteScheduler(**SD)
    df.set_timesteps(20)
    kd.set_timesteps(20)
    x, n = initial_sample(), initial_sample(seed=5)
    t = df.timesteps[[3, 8]]
    assert torch.equal(kd.add_noise(x, n, t), df.add_noise(x, n, t))
    for s in (df, kd):
        s.set_begin_index(4)
    assert torch.equal(kd.add_noise(x, n, t), df.add_noise(x, n, t))
    assert torch.equal(kd.scale_model_input(x, kd.timesteps[4]), df.scale_model_input(x, df.timesteps[4]))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_schedule_state_matches(spacing):
    df, kd = DF(timestep_spacing=spacing, **SD), LMSDiscreteScheduler(timestep_spacing=spacing, **SD)
    for _ in range(2):
        assert torch.equal(kd.sigmas, df.sigmas) and torch.equal(kd.timesteps, df.timesteps)
        assert kd.timesteps.dtype == df.timesteps.dtype == torch.float32
        assert torch.equal(torch.as_tensor(kd.init_noise_sigma), torch.as_tensor(df.init_noise_sigma))
        assert kd.num_inference_steps == df.num_inference_steps
        for s in (df, kd):
            s.set_timesteps(12)
    assert len(kd) == len(df) and kd.order == df.order == 1
    assert kd.derivatives == [] and kd.step_index is None and kd.begin_index is None


def test_schedule_without_set_timesteps_matches_diffusers():
    df, kd = DF(), LMSDiscreteScheduler()
    assert kd.num_inference_steps == df.num_inference_steps == 1000
    assert torch.equal(kd.timesteps, df.timesteps) and torch.equal(kd.sigmas, df.sigmas)
    outs = []
    for s in (df, kd):
        y = initial_sample() * s.init_noise_sigma
        for t in s.timesteps[:6]:
            y = s.step(dummy_model(s.scale_model_input(y, t), t), t, y).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_zero_sigma_where_diffusers_gives_nan():
    # beta_start=0: the training sigma of timestep 0 is 0, and so is the last step's sigma.
    # diffusers' derivative there is 0 / 0 (NaN) times a zero coefficient: the result is NaN.
    # kdfast's step from sigma 0 has zero length; every earlier step matches diffusers.
    config = dict(beta_start=0.0)
    x = initial_sample()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # diffusers' log(0)
        expected = loop(DF(**config), 10, x)
        got = loop(LMSDiscreteScheduler(**config), 10, x)
    assert torch.isnan(expected[-1]).all() and torch.isfinite(got[-1]).all()
    for a, b in zip(got[:-1], expected[:-1]):
        assert parity_error(a, b) < 1e-5
    assert torch.equal(got[-1], got[-2])  # sigma 0 -> 0: the sample stays


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        LMSDiscreteScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing"):
        LMSDiscreteScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        LMSDiscreteScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="Only one of"):
        LMSDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)


def test_bad_step_input():
    kd = LMSDiscreteScheduler()
    x = initial_sample()
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        kd.set_timesteps(0)
    kd.set_timesteps(3)
    # an integer is looked up as a timestep value, as diffusers does (only its Euler-type
    # schedulers refuse integers, as indices from enumerate()): 1 is not in the schedule
    with pytest.raises(IndexError, match="timestep 1 is not one of the schedule's"):
        kd.step(x, 1, x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), kd.timesteps[0], x)
    with pytest.raises(TypeError, match="unexpected keyword argument 'eta'"):
        kd.step(x, kd.timesteps[0], x, eta=0.5)
    with pytest.raises(TypeError, match="unexpected step arguments: eta"):
        kd.step_cfg(x, x, 2.0, kd.timesteps[0], x, eta=0.5)
    fresh = LMSDiscreteScheduler()
    fresh.set_timesteps(3)
    with pytest.raises(IndexError, match="timestep 123.5 is not one of the schedule's 3 timesteps"):
        fresh.step(x, 123.5, x)
    for t in kd.timesteps:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)
