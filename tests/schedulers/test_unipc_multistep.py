import itertools

import numpy as np
import pytest
import torch

from kdfast.schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler
from kdfast.schedulers.unipc_multistep import UniPCMultistepScheduler
from parity import (
    assert_parity, diffusers, dummy_model, initial_sample, no_host_reads, parity_error, run_loop, settings)


class DF(diffusers.UniPCMultistepScheduler):
    """diffusers' UniPC, whose ``step`` takes no generator; the harness passes one."""

    def step(self, model_output, timestep, sample, return_dict=True, generator=None, **kwargs):
        return super().step(model_output, timestep, sample, return_dict=return_dict)


class DF64(DF):
    """diffusers' UniPC evaluated in float64 (sigmas, and the sample the caller passes): the
    reference for configurations whose float32 rounding in diffusers reaches 1e-5."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.sigmas = self.sigmas.double()


KD = UniPCMultistepScheduler
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")


def assert_parity_fp32_aware(config, steps, **set_kwargs):
    """kdfast within 1e-5 of diffusers evaluated in float64, and of diffusers in float32 within
    1e-5 plus diffusers' own float32 error (its distance to its float64 evaluation)."""
    x = initial_sample()
    truth = run_loop(DF64(**config), steps, x.double(), **set_kwargs)
    own = parity_error(run_loop(DF(**config), steps, x, **set_kwargs), truth)
    got, _ = assert_parity(KD, DF, config, steps=steps, tol=1e-5 + own, **set_kwargs)
    assert parity_error(got, truth) <= 1e-5


def finite_end(solver_type, predict_x0):
    # diffusers returns NaN for the last step into sigma = 0 with bh1 or predict_x0=False
    # (test_final_step_into_zero_sigma_is_finite); parity runs use sigma_min there.
    return "zero" if solver_type == "bh2" and predict_x0 else "sigma_min"


@pytest.mark.parametrize("solver_order,solver_type,predict_x0",
                         list(itertools.product((1, 2, 3), ("bh1", "bh2"), (True, False))))
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_parity_orders_solver_types_and_predictions(solver_order, solver_type, predict_x0, prediction_type):
    config = dict(solver_order=solver_order, solver_type=solver_type, predict_x0=predict_x0,
                  prediction_type=prediction_type, final_sigmas_type=finite_end(solver_type, predict_x0))
    if prediction_type == "sample" and not predict_x0:
        # epsilon = (x - alpha * x0_pred) / sigma amplifies float32 rounding by 1/sigma near the end:
        # diffusers' float32 loop is itself ~6e-6 from its float64 evaluation here.
        assert_parity_fp32_aware(config, steps=20)
    else:
        assert_parity(KD, DF, config, steps=20)


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("config", [dict(solver_order=3), dict(solver_order=2, solver_type="bh1",
                                                                 final_sigmas_type="sigma_min"),
                                    dict(solver_order=3, predict_x0=False, final_sigmas_type="sigma_min",
                                         prediction_type="v_prediction")])
def test_parity_step_counts(steps, config):
    assert_parity(KD, DF, config, steps=steps)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
def test_parity_sigma_schedules(sigmas, steps, final_sigmas_type):
    # begin_index=0: some of these schedules repeat a timestep, where diffusers' value lookup crashes.
    # With sigma_min the last sigma repeats (a zero step: both return the sample unchanged).
    assert_parity(KD, DF, dict(SD, solver_order=3, final_sigmas_type=final_sigmas_type, **{sigmas: True}),
                  steps=steps, begin_index=0)


def test_duplicate_timesteps_do_not_break_the_step_index():
    config = dict(SD, use_beta_sigmas=True)
    x = initial_sample()
    # diffusers finds the repeated timestep by value, skips a step and runs off the end of the schedule
    with pytest.raises(AssertionError):  # its "assert self.this_order > 0"
        run_loop(DF(**config), 50, x)
    got = run_loop(KD(**config), 50, x)  # kdfast knows which element it was given
    assert parity_error(got, run_loop(DF(**config), 50, x, begin_index=0)) < 1e-5


@pytest.mark.parametrize("config,set_kwargs", [
    (dict(FLOW, flow_shift=3.0), {}),
    (dict(FLOW, flow_shift=3.0, final_sigmas_type="sigma_min", solver_order=3), {}),
    (dict(FLOW, use_karras_sigmas=True), dict(begin_index=0)),
    (dict(FLOW, use_dynamic_shifting=True, shift_terminal=0.1), dict(mu=0.8)),
    (dict(FLOW, use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=1.5)),
])
@pytest.mark.parametrize("steps", [10, 25])
def test_parity_flow_matching(config, set_kwargs, steps):
    assert_parity(KD, DF, config, steps=steps, **set_kwargs)


def test_parity_custom_flow_sigmas():
    sigmas = np.array([1.0, 0.9, 0.75, 0.6, 0.42, 0.3, 0.18, 0.08])  # diffusers needs an array
    assert_parity(KD, DF, dict(FLOW, flow_shift=2.0), steps=None, sigmas=sigmas)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("final_sigmas_type,lower_order_final", [("zero", True), ("sigma_min", True),
                                                                  ("sigma_min", False)])
def test_parity_spacing_and_final_step(spacing, final_sigmas_type, lower_order_final):
    assert_parity(KD, DF, dict(timestep_spacing=spacing, steps_offset=1, final_sigmas_type=final_sigmas_type,
                               solver_order=3, lower_order_final=lower_order_final), steps=10)


@pytest.mark.parametrize("solver_order", [2, 3])
def test_parity_dynamic_thresholding(solver_order):
    assert_parity(KD, DF, dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9,
                               solver_order=solver_order, prediction_type="sample"), steps=20)
    # diffusers only thresholds x0 predictions: with predict_x0=False thresholding has no effect
    assert_parity(KD, DF, dict(thresholding=True, predict_x0=False, final_sigmas_type="sigma_min",
                               solver_order=solver_order), steps=15)


@pytest.mark.parametrize("disable_corrector", [[0], [0, 1, 2], [3, 7, 18], list(range(20))])
def test_parity_disable_corrector(disable_corrector):
    assert_parity(KD, DF, dict(solver_order=3, disable_corrector=disable_corrector), steps=20)


@pytest.mark.parametrize("config", [
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True),
    dict(SD, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
    dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist(), solver_order=1),
    dict(solver_type="midpoint"),  # other solvers' names map to bh2, as in diffusers
])
def test_parity_other_configs(config):
    assert_parity(KD, DF, config, steps=20, begin_index=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(solver_order=2), dict(solver_order=3, thresholding=True,
                                                               prediction_type="sample")])
def test_half_precision_keeps_dtype_and_matches(dtype, config):
    assert_parity(KD, DF, config, steps=20, dtype=dtype)


@pytest.mark.parametrize("config", [dict(), dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
                                    dict(predict_x0=False, final_sigmas_type="sigma_min"),
                                    dict(thresholding=True, prediction_type="sample", sample_max_value=1.5)])
def test_fused_guidance_matches_diffusers_guidance(config):
    assert_parity(KD, DF, config, steps=20, guidance_scale=2.0)


def _finish(scheduler, x, start=0):
    for t in scheduler.timesteps[start:]:
        x = scheduler.step(dummy_model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("config", [dict(solver_type="bh1"), dict(predict_x0=False),
                                    dict(predict_x0=False, solver_type="bh1"), dict(lower_order_final=False),
                                    dict(FLOW, solver_type="bh1")])
def test_final_step_into_zero_sigma_is_finite(config):
    """diffusers returns NaN/inf for the last step into sigma = 0 here; kdfast returns its limit.

    Into sigma_t = 0 the log-SNR step h is infinite. The first-order UniP update then tends to
    x0 (the data prediction at the last step), but diffusers evaluates 0 * inf: bh1 scales a zero
    residual by B(h) = h = -inf, and predict_x0=False multiplies sigma_t = 0 by e^h - 1 = inf.
    With lower_order_final=False the last step is second order, whose D1 term truly diverges
    (like h); first order is the only finite update, so kdfast takes it. bh2 with predict_x0
    (the default) already gives exactly x0 in diffusers, so the limit is what diffusers' own
    default computes.
    """
    x = initial_sample()
    df = DF(**config)
    df.set_timesteps(10)
    expected = _finish(df, x)
    assert not torch.isfinite(expected).all()  # diffusers' result
    kd = KD(**config)
    kd.set_timesteps(10)
    got = _finish(kd, x)
    assert torch.isfinite(got).all()
    # The limit, from diffusers' own state after the last step: x0 at the last (corrected) sample.
    if kd.predict_x0:
        limit = df.model_outputs[-1]
    else:
        alpha, sigma = 1 / (df.sigmas[-2] ** 2 + 1) ** 0.5, df.sigmas[-2] / (df.sigmas[-2] ** 2 + 1) ** 0.5
        limit = (df.last_sample - sigma * df.model_outputs[-1]) / alpha
    assert torch.isfinite(limit).all()
    assert parity_error(got, limit) < 1e-5
    # and it is close to stopping at sigma_min instead of 0 (a last step of size sigma_min)
    near = _finish(_set(KD(**dict(config, final_sigmas_type="sigma_min")), 10), x)
    assert parity_error(got, near) < 0.05


def _set(s, steps):
    s.set_timesteps(steps)
    return s


def test_third_order_final_step_into_zero_sigma():
    # diffusers' third-order UniP into sigma = 0 solves a singular system and raises; kdfast
    # takes the finite first-order limit (x0), as in test_final_step_into_zero_sigma_is_finite.
    config = dict(solver_order=3, lower_order_final=False)
    df, kd = _set(DF(**config), 10), _set(KD(**config), 10)
    xd = xk = initial_sample()
    for t in df.timesteps[:9]:
        xd = df.step(dummy_model(xd, t), t, xd).prev_sample
        xk = kd.step(dummy_model(xk, t), t, xk).prev_sample
    assert parity_error(xk, xd) < 1e-5
    t = df.timesteps[9]
    with pytest.raises(RuntimeError):  # torch.linalg.LinAlgError, after the corrector and conversion ran
        df.step(dummy_model(xd, t), t, xd)
    got = kd.step(dummy_model(xk, t), t, xk).prev_sample
    assert torch.isfinite(got).all()
    assert parity_error(got, df.model_outputs[-1]) < 1e-5


def test_model_outputs_set_from_outside():
    df, kd = DF(solver_order=3), KD(solver_order=3)
    x = initial_sample()
    past = [initial_sample(seed=s) * 0.3 for s in (1, 2, 3)]
    last = initial_sample(seed=4)
    for s in (df, kd):  # resume mid-schedule with a third-order history and a sample to correct
        s.set_timesteps(10)
        s.set_begin_index(5)
        s.model_outputs = [p.clone() for p in past]
        s.lower_order_nums = 3
        s.last_sample = last.clone()
        s.this_order = 3
    outs = []
    for s in (df, kd):
        outs.append(_finish(s, x, start=5))
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_solver_p_predictor():
    # UniC corrector around another scheduler's predictor (diffusers' solver_p)
    x = initial_sample()
    df = DF(solver_p=diffusers.DPMSolverMultistepScheduler())
    kd = KD(solver_p=DPMSolverMultistepScheduler())
    expected = run_loop(df, 12, x)
    assert parity_error(run_loop(kd, 12, x), expected) < 1e-5
    got = run_loop(KD(solver_p=DPMSolverMultistepScheduler()), 12, x, guidance_scale=2.0, fused_cfg=True)
    assert parity_error(got, run_loop(DF(solver_p=diffusers.DPMSolverMultistepScheduler()), 12, x,
                                      guidance_scale=2.0)) < 1e-5


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = KD(solver_order=3, use_karras_sigmas=True, solver_type="bh1", disable_corrector=[0, 1],
            final_sigmas_type="sigma_min", **SD)
    kd.save_pretrained(tmp_path)
    again = KD.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)  # diffusers loads what kdfast saved
    assert df.config.solver_order == 3 and df.config.solver_type == "bh1" and list(df.config.disable_corrector) == [0, 1]
    df.save_pretrained(tmp_path / "df")
    back = KD.from_pretrained(tmp_path / "df")  # and kdfast loads diffusers' config
    assert back.config.solver_type == "bh1" and back.config.use_karras_sigmas
    x = initial_sample()
    assert parity_error(run_loop(back, 10, x, begin_index=0), run_loop(df, 10, x, begin_index=0)) < 1e-5
    # solver_p is an object, not a setting: saved as null
    KD(solver_p=DPMSolverMultistepScheduler()).save_pretrained(tmp_path / "p")
    assert KD.from_pretrained(tmp_path / "p").config.solver_p is None


def test_from_config_of_another_scheduler_ignores_foreign_keys():
    dpm = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="heun", **SD)
    kd = KD.from_config(dpm.config)
    assert kd.config.beta_end == 0.012 and kd.config.solver_type == "bh2"
    assert kd.config.solver_type == DF.from_config(dpm.config).config.solver_type


def test_step_signature_and_convert_model_output_match_diffusers():
    df, kd = DF(solver_order=3), KD(solver_order=3)
    x = initial_sample()
    outs = []
    for s in (df, kd):
        s.set_timesteps(10)
        y = x
        for t in s.timesteps[:3]:
            (y,) = s.step(dummy_model(y, t), t, y, False)  # return_dict positional, as in diffusers
        t = s.timesteps[3]
        outs.append((y, s.convert_model_output(dummy_model(y, t), sample=y)))
    assert parity_error(outs[1][0], outs[0][0]) < 1e-5
    assert parity_error(outs[1][1], outs[0][1]) < 1e-5


def test_set_begin_index_and_add_noise():
    df, kd = DF(), KD()
    x, n = initial_sample(), initial_sample(seed=5)
    outs = []
    for s in (df, kd):
        s.set_timesteps(20)
        s.set_begin_index(8)
        outs.append(_finish(s, s.add_noise(x, n, s.timesteps[8:9]), start=8))
    assert parity_error(outs[1], outs[0]) < 1e-5
    df.set_timesteps(20)
    kd.set_timesteps(20)
    t = df.timesteps[[3, 7]]
    torch.testing.assert_close(kd.add_noise(x, n, t), df.add_noise(x, n, t))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="solver_type='bh3'"):
        KD(solver_type="bh3")
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        KD(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing"):
        KD(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="final_sigmas_type"):
        KD(final_sigmas_type="one")
    with pytest.raises(ValueError, match="beta_schedule"):
        KD(beta_schedule="cubic")
    with pytest.raises(ValueError, match="time_shift_type"):
        KD(time_shift_type="quadratic")
    with pytest.raises(ValueError, match="solver_order"):
        KD(solver_order=4)
    with pytest.raises(ValueError, match="predict_x0"):
        KD(prediction_type="flow_prediction", predict_x0=False)
    with pytest.raises(ValueError, match="shift_terminal"):
        KD(shift_terminal=0.1)
    with pytest.raises(ValueError, match="Only one of"):
        KD(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="mu"):
        KD(use_flow_sigmas=True, use_dynamic_shifting=True).set_timesteps(10)
    with pytest.raises(ValueError, match="sigmas"):
        KD().set_timesteps(sigmas=[0.9, 0.5])


def test_bad_step_input():
    kd = KD()
    x = initial_sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, 999, x)
    kd.set_timesteps(5)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), kd.timesteps[0], x)
    x = _finish(kd, x)
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, 0, x)


def test_timestep_lookup_needs_no_host_read():
    kd = KD(solver_order=3)
    kd.set_timesteps(10)
    x = initial_sample()

    for t in list(kd.timesteps):
        m = dummy_model(x, t)
        with no_host_reads():
            x = kd.step(m, t, x).prev_sample
    assert torch.isfinite(x).all()
