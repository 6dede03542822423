"""kdfast.schedulers.sasolver.SASolverScheduler against diffusers' SASolverScheduler: loop parity
for every option (float32, float64, half precision), fused guidance, one kernel pass per step
without host reads, diffusers' state attributes, and the places where diffusers fails or returns NaN."""
import contextlib
import copy
import itertools
import pickle

import numpy as np
import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler
from kdfast.schedulers.sasolver import SASolverScheduler, default_tau
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop, settings)

import diffusers.schedulers.scheduling_sasolver as df_module  # noqa: E402 (after parity's importorskip)

DF = diffusers.SASolverScheduler
KD = SASolverScheduler
# The parity loops run a dummy model, not a denoiser: on the default linear schedule its
# epsilon makes x0 = (x - sigma * eps) / alpha large (|x| ~ 400), and with guidance at 10-25
# steps a 1-ulp change of the input moves the result by up to 8e-5: no float32 loop can be
# within 1e-5 of another there. Guided runs use Stable Diffusion's schedule (|x| ~ 50, where a
# 1-ulp change moves the result by < 3e-6); unguided runs use either.
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
_RANDN = df_module.randn_tensor


@contextlib.contextmanager
def _float32_draws():
    """diffusers' noise drawn in float32 then cast (a float64 loop draws other numbers)."""
    def randn(shape, generator=None, device=None, dtype=None, **kwargs):
        return _RANDN(shape, generator=generator, device=device, dtype=torch.float32, **kwargs).to(dtype)

    df_module.randn_tensor = randn
    try:
        yield
    finally:
        df_module.randn_tensor = _RANDN


class DFDouble(DF):
    """diffusers' SA-Solver with float64 sigmas: fed a float64 sample it computes in float64."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.sigmas = self.sigmas.double()


class DF64(DFDouble):
    """diffusers' SA-Solver evaluated in float64, with the float32 loop's noise: the reference where
    diffusers' own float32 arithmetic is further than 1e-5 from its float64 result (its
    coefficients expand the Lagrange polynomials in powers of lambda, whose terms cancel: at
    third and fourth order, and on fine schedules, it loses up to 4e-3, see
    test_diffusers_float32_is_not_the_reference_for_high_orders)."""

    def step(self, *args, **kwargs):
        with _float32_draws():
            return super().step(*args, **kwargs)


def assert_sa_parity(config, steps=20, guidance_scale=None, shape=(2, 4, 8, 8), **set_kwargs):
    """kdfast within 1e-5 of diffusers' algorithm evaluated in float64, and of diffusers' float32
    loop within 1e-5 plus that loop's own float32 error (its distance to its float64 result),
    i.e. within 1e-5 wherever diffusers' float32 arithmetic is accurate. Returns that error."""
    x = initial_sample(shape)
    truth = run_loop(DF64(**config), steps, x.double(), guidance_scale, **set_kwargs)
    own = parity_error(run_loop(DF(**config), steps, x, guidance_scale, **set_kwargs), truth)
    got, _ = assert_parity(KD, DF, config, steps=steps, tol=1e-5 + own, guidance_scale=guidance_scale,
                           shape=shape, **set_kwargs)
    assert parity_error(got, truth) <= 1e-5, f"{config} steps={steps}: {parity_error(got, truth):.3e} from float64"
    return own


def assert_float64_parity(config, steps=25, tol=1e-9, **set_kwargs):
    """In float64 both compute the same algorithm to rounding (noise drawn in float64 by both);
    diffusers' power expansion of the fourth-order Lagrange polynomials keeps ~1e-10 of it."""
    x = initial_sample().double()
    expected = run_loop(DFDouble(**config), steps, x, **set_kwargs)
    got = run_loop(KD(**config), steps, x, **set_kwargs)
    assert got.dtype == torch.float64
    err = parity_error(got, expected)
    assert err <= tol, f"{config} steps={steps}: float64 parity error {err:.3e}"


def _set(s, steps):
    s.set_timesteps(steps)
    return s


def _loop(s, x, start=0, end=None, gen=None):
    for t in s.timesteps[start:end]:
        x = s.step(dummy_model(x, t), t, x, generator=gen).prev_sample
    return x


# --------------------------------------------------------------------------- orders, algorithms, predictions


@pytest.mark.parametrize("predictor_order,corrector_order", list(itertools.product((1, 2, 3, 4), (1, 2, 3, 4))))
@pytest.mark.parametrize("algorithm_type", ["data_prediction", "noise_prediction"])
def test_parity_every_order_and_algorithm(predictor_order, corrector_order, algorithm_type):
    assert_sa_parity(dict(predictor_order=predictor_order, corrector_order=corrector_order,
                          algorithm_type=algorithm_type), steps=20)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("algorithm_type", ["data_prediction", "noise_prediction"])
@pytest.mark.parametrize("orders", [(2, 2), (3, 4), (4, 1)])
def test_parity_prediction_types(prediction_type, algorithm_type, orders):
    assert_sa_parity(dict(SD, prediction_type=prediction_type, algorithm_type=algorithm_type,
                          predictor_order=orders[0], corrector_order=orders[1]), steps=20)


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("config", [dict(), dict(predictor_order=3, corrector_order=3),
                                    dict(predictor_order=4, corrector_order=4, algorithm_type="noise_prediction"),
                                    dict(SD, predictor_order=1, corrector_order=4, prediction_type="v_prediction")])
def test_parity_step_counts(steps, config):
    assert_sa_parity(config, steps=steps)


@pytest.mark.parametrize("predictor_order,corrector_order", list(itertools.product((1, 2, 3, 4), (1, 2, 3, 4))))
@pytest.mark.parametrize("algorithm_type,prediction_type", [("data_prediction", "epsilon"),
                                                            ("data_prediction", "v_prediction"),
                                                            ("noise_prediction", "sample")])
def test_float64_loop_is_diffusers_algorithm(predictor_order, corrector_order, algorithm_type, prediction_type):
    # float64 coefficient rows and float64 steps: the plans equal diffusers' formulas to rounding
    assert_float64_parity(dict(predictor_order=predictor_order, corrector_order=corrector_order,
                               algorithm_type=algorithm_type, prediction_type=prediction_type))


@pytest.mark.parametrize("config", [
    dict(SD, use_karras_sigmas=True, predictor_order=3), dict(SD, use_exponential_sigmas=True, corrector_order=4),
    dict(SD, use_beta_sigmas=True, predictor_order=4, corrector_order=3), dict(FLOW, flow_shift=3.0, predictor_order=3),
    dict(use_flow_sigmas=True, flow_shift=2.0, algorithm_type="noise_prediction", prediction_type="v_prediction"),
    dict(timestep_spacing="trailing", lower_order_final=False, predictor_order=3, corrector_order=3),
    dict(timestep_spacing="leading", steps_offset=1), dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(thresholding=True, prediction_type="sample", sample_max_value=1.5, dynamic_thresholding_ratio=0.9),
    dict(tau_func=lambda t: 0.3 + float(t) / 700.0, predictor_order=3, corrector_order=2),
    dict(tau_func=lambda t: 2.5, algorithm_type="noise_prediction", predictor_order=2, corrector_order=3),
])
def test_float64_loop_is_diffusers_algorithm_for_every_option(config):
    assert_float64_parity(config, steps=30, begin_index=0)


def test_diffusers_float32_is_not_the_reference_for_high_orders():
    # Why the parity tests hold kdfast to diffusers evaluated in float64: diffusers' own float32
    # loop is up to 4e-3 from it at fourth order, kdfast's within 1e-5 of it.
    own = assert_sa_parity(dict(predictor_order=4, corrector_order=4), steps=50)
    assert own > 1e-4
    assert assert_sa_parity(dict(), steps=25) < 2e-6  # and at the default orders it is accurate


# --------------------------------------------------------------------------- tau


@pytest.mark.parametrize("tau_func", [None, lambda t: 0, lambda t: 0.5, lambda t: 1.0,
                                      lambda t: 1.5 if t > 600 else 0.2,
                                      lambda t: (t.float() / 1000).sqrt(),  # a tensor, from a tensor
                                      default_tau])
@pytest.mark.parametrize("algorithm_type", ["data_prediction", "noise_prediction"])
def test_parity_tau_functions(tau_func, algorithm_type):
    assert_sa_parity(dict(SD, tau_func=tau_func, algorithm_type=algorithm_type, predictor_order=3,
                          corrector_order=3), steps=20)


@pytest.mark.parametrize("tau", [5.0, 8.0])
def test_large_tau_stays_finite_where_diffusers_overflows(tau):
    # exp((1 + tau^2) * lambda_t) passes float32's range for tau >= 5 at the last steps: diffusers'
    # loop is NaN there. kdfast's coefficients leave that factor out (it cancels with
    # sigma_t * exp(-tau^2 lambda_t)), and its float64 loop equals diffusers' float64 loop.
    # (Noise of the sample's own size each step: the loop is too ill-conditioned for a float32
    # comparison, so the float32 check is finiteness.)
    config = dict(tau_func=lambda t: tau, predictor_order=3, corrector_order=3)
    x = initial_sample()
    assert not torch.isfinite(run_loop(DF(**config), 20, x)).all()
    assert torch.isfinite(run_loop(KD(**config), 20, x)).all()
    assert_float64_parity(config, steps=20)


def test_timesteps_given_as_numbers_evaluate_tau_at_them():
    # diffusers evaluates tau_func at the timestep argument; a loop passing Python numbers off the
    # schedule (here each shifted by 150) gets the taus of those numbers, as in diffusers.
    config = dict(SD, tau_func=lambda t: float(t) / 800.0)
    x = initial_sample()
    outs = []
    for s in (DF(**config), KD(**config)):
        s.set_timesteps(12)
        gen, y = torch.Generator().manual_seed(0), x
        for k, t in enumerate(s.timesteps.tolist()):  # (the first one finds the start index by value)
            y = s.step(dummy_model(y, t), t + 150 * (k > 0), y, generator=gen).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) <= 1e-5
    # and differ from the schedule's own taus
    assert parity_error(outs[1], run_loop(KD(**config), 12, x)) > 1e-3


def test_numpy_timesteps_are_taken_as_their_numbers():
    # (a numpy array is no dict key: the tau cache failed with "unhashable type")
    config = dict(SD, tau_func=lambda t: float(t) / 800.0)
    x = initial_sample()
    outs = []
    for s, as_numpy in ((DF(**config), False), (KD(**config), True), (KD(**config), "scalar")):
        s.set_timesteps(6)
        gen, y = torch.Generator().manual_seed(0), x
        for k, t in enumerate(s.timesteps.tolist()):
            t = t + 150 * (k > 0)
            given = np.array(t) if as_numpy is True else np.int64(t) if as_numpy else t
            y = s.step(dummy_model(y, t), given, y, generator=gen).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) <= 1e-5
    assert parity_error(outs[2], outs[0]) <= 1e-5


def test_tensor_timestep_off_the_schedule_takes_the_schedule_tau():
    # (reading a tensor's value would be a host sync: a tensor stands for the schedule's timestep)
    config = dict(SD, tau_func=lambda t: float(t) / 800.0)
    kd = _set(KD(**config), 8)
    x = initial_sample()
    gen = torch.Generator().manual_seed(0)
    y = x
    for k, t in enumerate(kd.timesteps):
        y = kd.step(dummy_model(y, t), t.clone() + 150 * (k > 0), y, generator=gen).prev_sample
    assert parity_error(y, run_loop(KD(**config), 8, x)) == 0.0


def test_assigning_tau_func_takes_effect():
    x = initial_sample()
    outs = []
    for s in (DF(**SD), KD(**SD)):
        s.set_timesteps(15)
        gen, y = torch.Generator().manual_seed(0), x
        for k, t in enumerate(s.timesteps):
            if k == 6:
                s.tau_func = lambda t: 0.8
            y = s.step(dummy_model(y, t), t, y, generator=gen).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) <= 1e-5
    assert parity_error(outs[1], run_loop(KD(**SD), 15, x)) > 1e-3


# --------------------------------------------------------------------------- sigmas, spacing, final steps


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_parity_sigma_schedules(sigmas, steps):
    # begin_index=0: these schedules can repeat a timestep, where diffusers' value lookup skips a step.
    # Their last sigma repeats: the last step has length zero (both return its start, plus nothing).
    assert_sa_parity(dict(SD, predictor_order=3, corrector_order=3, **{sigmas: True}), steps=steps, begin_index=0)


@pytest.mark.parametrize("config", [dict(FLOW, flow_shift=3.0), dict(FLOW, predictor_order=3, corrector_order=4),
                                    dict(use_flow_sigmas=True, flow_shift=3.0, algorithm_type="noise_prediction"),
                                    dict(use_flow_sigmas=True, prediction_type="v_prediction")])
@pytest.mark.parametrize("steps", [10, 25])
def test_parity_flow_sigmas(config, steps):
    assert_sa_parity(config, steps=steps)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("orders", [(2, 2), (3, 4)])
def test_parity_spacing_and_lower_order_final(spacing, lower_order_final, orders):
    assert_sa_parity(dict(SD, timestep_spacing=spacing, steps_offset=1, lower_order_final=lower_order_final,
                          predictor_order=orders[0], corrector_order=orders[1]), steps=10)


@pytest.mark.parametrize("config", [
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True, prediction_type="v_prediction"),
    dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist(), predictor_order=1, corrector_order=1),
    dict(num_train_timesteps=500, beta_end=0.03),
])
def test_parity_other_configs(config):
    assert_sa_parity(config, steps=20, begin_index=0)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range", "fixed_small"])
def test_parity_variance_type_with_the_samples_channels(variance_type):
    # diffusers keeps model_output[:, :3]: a no-op for a 3-channel output (other shapes: see
    # test_learned_variance_channels_raise_where_diffusers_fails); DDPM's values pass through
    assert_sa_parity(dict(variance_type=variance_type), steps=20, shape=(2, 3, 8, 8))


@pytest.mark.parametrize("config", [dict(), dict(predictor_order=3, corrector_order=4),
                                    dict(algorithm_type="noise_prediction", predictor_order=4, corrector_order=3)])
def test_as_many_steps_as_training_timesteps_stays_finite_where_diffusers_gives_nan(config):
    # linspace over 1000 training timesteps takes one sigma twice: the next steps interpolate
    # through two equal log-SNRs, and diffusers divides by their difference (NaN from there on;
    # at third and fourth order its float32 coefficients overflow even earlier). kdfast lowers the
    # order where nodes coincide (a corrector over the zero-length step leaves the sample as is),
    # and equals diffusers' float64 loop up to the repeated sigma.
    x = initial_sample((1, 1, 4, 4))
    paths, schedulers = [], (DF(**config), KD(**config), DF64(**config))
    for s in schedulers:
        s.set_timesteps(1000)
        gen, y, path = torch.Generator().manual_seed(0), x.double() if isinstance(s, DF64) else x, []
        for t in s.timesteps:
            y = s.step(dummy_model(y, t), t, y, generator=gen).prev_sample
            path.append(y)
        paths.append(path)
    df_path, kd_path, df64_path = paths
    sigmas = schedulers[1].sigmas.tolist()
    assert [i for i in range(1000) if sigmas[i] == sigmas[i + 1]] == [499]
    assert not torch.isfinite(df_path[-1]).all() and all(torch.isfinite(y).all() for y in kd_path)
    first_nan = next(i for i, y in enumerate(df_path) if not torch.isfinite(y).all())
    assert first_nan <= 500
    assert parity_error(kd_path[499], df64_path[499]) <= 1e-4  # (500 float32 steps of rounding)
    if not config:  # at the default orders diffusers' float32 loop is accurate until then
        assert first_nan == 500
        assert parity_error(kd_path[499], df_path[499]) <= 1e-4


# --------------------------------------------------------------------------- thresholding, guidance, dtypes


@pytest.mark.parametrize("config", [
    dict(thresholding=True, prediction_type="sample", sample_max_value=1.5, dynamic_thresholding_ratio=0.9),
    dict(thresholding=True, predictor_order=3, corrector_order=3, sample_max_value=2.0),
    dict(SD, thresholding=True, prediction_type="v_prediction", sample_max_value=1.2, dynamic_thresholding_ratio=0.8),
])
def test_parity_dynamic_thresholding(config):
    assert_sa_parity(config, steps=20)


class DFThresholdFixed(DF64):
    """diffusers' SA-Solver with the one line of its noise_prediction thresholding that fails fixed:
    it reads alpha_t and sigma_t at a timestep it is never given (``self.alpha_t[None]``); here
    at the step's own sigma, as the rest of its conversion does."""

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        if not (self.config.algorithm_type == "noise_prediction" and self.config.thresholding):
            return super().convert_model_output(model_output, *args, sample=sample, **kwargs)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
        if self.config.prediction_type == "epsilon":
            epsilon = model_output
        elif self.config.prediction_type == "sample":
            epsilon = (sample - alpha_t * model_output) / sigma_t
        else:
            epsilon = alpha_t * model_output + sigma_t * sample
        x0_pred = self._threshold_sample((sample - sigma_t * epsilon) / alpha_t)
        return (sample - alpha_t * x0_pred) / sigma_t


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_noise_prediction_thresholding_works_where_diffusers_fails(prediction_type):
    config = dict(SD, algorithm_type="noise_prediction", thresholding=True, prediction_type=prediction_type,
                  sample_max_value=1.5, dynamic_thresholding_ratio=0.9)
    x = initial_sample()
    with pytest.raises(RuntimeError):  # alpha_t[None] has shape [1, 1000]: it does not broadcast
        run_loop(DF(**config), 10, x)
    got = run_loop(KD(**config), 10, x)
    assert torch.isfinite(got).all()
    assert parity_error(got, run_loop(DFThresholdFixed(**config), 10, x.double())) <= 1e-5
    # and the thresholding does something
    assert parity_error(got, run_loop(KD(**dict(config, thresholding=False)), 10, x)) > 1e-3


@pytest.mark.parametrize("config", [dict(SD), dict(SD, predictor_order=3, corrector_order=4),
                                    dict(SD, algorithm_type="noise_prediction", prediction_type="v_prediction"),
                                    dict(SD, thresholding=True, prediction_type="sample", sample_max_value=1.5),
                                    dict(FLOW, flow_shift=3.0)])
@pytest.mark.parametrize("guidance_scale", [1.5, 5.0])
def test_fused_guidance_matches_guidance_combined_outside(config, guidance_scale):
    # assert_parity runs kdfast with step_cfg and diffusers with the guidance combined outside
    assert_sa_parity(config, steps=20, guidance_scale=guidance_scale)
    x = initial_sample()
    fused = run_loop(KD(**config), 20, x, guidance_scale, fused_cfg=True)
    outside = run_loop(KD(**config), 20, x, guidance_scale)
    assert parity_error(fused, outside) <= 2e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(), dict(predictor_order=3, corrector_order=3,
                                                 algorithm_type="noise_prediction"),
                                    dict(thresholding=True, prediction_type="sample", predictor_order=4),
                                    dict(FLOW, flow_shift=3.0)])
def test_half_precision_keeps_dtype_and_matches(dtype, config):
    got, _ = assert_parity(KD, DF, config, steps=20, dtype=dtype)
    assert got.dtype == dtype


def test_half_precision_draws_the_noise_in_the_model_dtype():
    # diffusers draws each step's noise in model_output's dtype: other numbers than a float32 draw
    outs = []
    for s in (DF(), KD()):
        s.set_timesteps(5)
        x = initial_sample(dtype=torch.float16)
        _loop(s, x, gen=torch.Generator().manual_seed(3))
        outs.append(s.last_noise)
    assert outs[1].dtype == torch.float16 and torch.equal(outs[1], outs[0])


# --------------------------------------------------------------------------- one pass, no host reads, draws


@pytest.mark.parametrize("config", [dict(), dict(predictor_order=4, corrector_order=4),
                                    dict(algorithm_type="noise_prediction", predictor_order=3, corrector_order=3),
                                    dict(thresholding=True, prediction_type="sample")])
def test_one_fused_pass_per_step_and_no_host_reads(monkeypatch, config):
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    x = initial_sample()
    expected = run_loop(KD(**config), 12, x)
    kd = _set(KD(**config), 12)  # (its coefficient table is the one the loop above made: shared)
    gen = torch.Generator().manual_seed(0)
    calls.clear()
    for t in kd.timesteps:
        m = dummy_model(x, t)
        with no_host_reads():
            x = kd.step(m, t, x, generator=gen).prev_sample
    assert len(calls) == 12
    assert parity_error(x, expected) == 0.0
    # the history the kernel reads is at most 3 entries (order 4 needs 3 before the current one)
    assert max(len(a[5]) for a in calls) == min(3, max(config.get("predictor_order", 2),
                                                       config.get("corrector_order", 2)) - 1)
    calls.clear()
    u, c = dummy_cfg(x, kd.timesteps[0])
    kd.set_timesteps(12)
    with no_host_reads():
        kd.step_cfg(u, c, 3.0, kd.timesteps[0], x, generator=gen)
    assert len(calls) == 1


@pytest.mark.parametrize("config", [dict(), dict(predictor_order=4, corrector_order=3, lower_order_final=False),
                                    dict(SD, predictor_order=1, corrector_order=4, use_karras_sigmas=True)])
@pytest.mark.parametrize("begin_index", [0, 1, 4])
def test_every_step_is_planned_when_the_schedule_is_set(monkeypatch, config, begin_index):
    # coefficients are computed on the host in set_timesteps, for a loop from any begin index
    kd = _set(KD(**config), 9)
    kd.set_begin_index(begin_index)

    def planned_in_the_step(*args, **kwargs):
        raise AssertionError("a step planned coefficients")

    monkeypatch.setattr(KD, "_plan", planned_in_the_step)
    monkeypatch.setattr(KD, "_gradient", planned_in_the_step)
    assert torch.isfinite(_loop(kd, initial_sample(), start=begin_index)).all()
    assert kd.step_index == 9


def test_reading_last_sample_is_one_pass(monkeypatch):
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    kd = _set(KD(), 6)
    _loop(kd, initial_sample(), end=3)
    calls.clear()
    first = kd.last_sample
    assert len(calls) == 1 and kd.last_sample is first and len(calls) == 1


def test_noise_is_drawn_draw_for_draw():
    # one draw per step, also where tau = 0 leaves it unused: the generator ends where diffusers' ends
    for config in (dict(), dict(tau_func=lambda t: 0)):
        states = []
        for s in (DF(**config), KD(**config)):
            s.set_timesteps(9)
            gen = torch.Generator().manual_seed(7)
            _loop(s, initial_sample(), gen=gen)
            states.append(gen.get_state())
        assert torch.equal(states[0], states[1])
    # another seed, another result (the default tau is 1 for timesteps in [200, 800])
    x = initial_sample()
    a = run_loop(KD(), 10, x, seed=0)
    assert parity_error(run_loop(KD(), 10, x, seed=1), a) > 1e-3
    # with tau = 0 everywhere the generator does not matter (the ODE)
    ode = dict(tau_func=lambda t: 0)
    assert parity_error(run_loop(KD(**ode), 10, x, seed=1), run_loop(KD(**ode), 10, x, seed=0)) == 0.0


def test_a_list_of_generators_draws_per_sample_like_diffusers():
    outs = []
    for s in (DF(**SD), KD(**SD)):
        s.set_timesteps(8)
        gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
        y = initial_sample()
        for t in s.timesteps:
            y = s.step(dummy_model(y, t), t, y, generator=gens).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) <= 1e-5


def test_variance_noise_replaces_the_draw():
    kd, ref = _set(KD(**SD), 6), _set(KD(**SD), 6)
    x = y = initial_sample()
    gen = torch.Generator().manual_seed(0)
    for t in kd.timesteps:
        x = ref.step(dummy_model(x, t), t, x, generator=gen).prev_sample
        y = kd.step(dummy_model(y, t), t, y, variance_noise=ref.last_noise).prev_sample
    assert parity_error(y, x) == 0.0


# --------------------------------------------------------------------------- state: diffusers' attributes


def test_state_after_each_step_matches_diffusers():
    config = dict(SD, predictor_order=3, corrector_order=3)
    df, kd = _set(DF(**config), 10), _set(KD(**config), 10)
    xd = xk = initial_sample()
    gd, gk = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in df.timesteps:
        xd = df.step(dummy_model(xd, t), t, xd, generator=gd).prev_sample
        xk = kd.step(dummy_model(xk, t), t, xk, generator=gk).prev_sample
        assert parity_error(xk, xd) <= 1e-5
        assert (kd.step_index, kd.lower_order_nums, kd.this_predictor_order, kd.this_corrector_order) == \
            (df.step_index, df.lower_order_nums, df.this_predictor_order, df.this_corrector_order)
        assert parity_error(kd.last_sample, df.last_sample) <= 1e-5
        assert torch.equal(kd.last_noise, df.last_noise)
        assert len(kd.model_outputs) == len(df.model_outputs) == 3
        for a, b in zip(kd.model_outputs, df.model_outputs):
            assert (a is None) == (b is None) and (a is None or parity_error(a, b) <= 1e-5)
        assert [int(v) for v in kd.timestep_list if v is not None] == [int(v) for v in df.timestep_list
                                                                      if v is not None]
    assert len(kd.timestep_list) == 3


def test_first_step_last_sample_is_the_sample_itself():
    kd = _set(KD(), 5)
    x = initial_sample()
    t = kd.timesteps[0]
    kd.step(dummy_model(x, t), t, x)
    assert kd.last_sample is x  # no corrector at the first step, as in diffusers


@pytest.mark.parametrize("set_noise", [True, False])
def test_resume_with_state_set_from_outside(set_noise):
    config = dict(SD, predictor_order=3, corrector_order=3)
    past = [initial_sample(seed=s) * 0.3 for s in (1, 2, 3)]
    last, noise = initial_sample(seed=4), initial_sample(seed=5)
    x = initial_sample()
    outs = []
    for s in (DF(**config), KD(**config)):
        s.set_timesteps(10)
        if isinstance(s, KD) and not set_noise:  # kdfast keeps a noise of its own from an earlier loop
            _loop(s, x, end=10, gen=torch.Generator().manual_seed(9))
            s.set_timesteps(10)
        s.set_begin_index(5)
        s.model_outputs = [p.clone() for p in past]
        s.lower_order_nums = 3
        s.last_sample = last.clone()
        s.last_noise = noise.clone()
        s.this_corrector_order = 3
        s.timestep_list = [None, None, s.timesteps[4]]
        outs.append(_loop(s, x, start=5, gen=torch.Generator().manual_seed(0)))
    assert parity_error(outs[1], outs[0]) <= 1e-5


def test_clearing_last_sample_skips_the_corrector_like_diffusers():
    outs = []
    for s in (DF(**SD), KD(**SD)):
        s.set_timesteps(10)
        y, gen = initial_sample(), torch.Generator().manual_seed(0)
        for k, t in enumerate(s.timesteps):
            if k == 4:
                s.last_sample = None
            y = s.step(dummy_model(y, t), t, y, generator=gen).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) <= 1e-5
    assert parity_error(outs[1], run_loop(KD(**SD), 10, initial_sample())) > 1e-4


def test_copies_and_pickles_mid_loop_continue_alike():
    kd = _set(KD(**SD, predictor_order=3), 10)
    x = _loop(kd, initial_sample(), end=4, gen=torch.Generator().manual_seed(0))
    clones = [copy.deepcopy(kd), pickle.loads(pickle.dumps(kd))]
    ends = [_loop(s, x, start=4, gen=torch.Generator().manual_seed(1)) for s in [kd] + clones]
    for e in ends[1:]:
        assert parity_error(e, ends[0]) == 0.0


def test_convert_model_output_matches_diffusers():
    for config in (dict(), dict(algorithm_type="noise_prediction", prediction_type="v_prediction")):
        outs = []
        for s in (DF(**config), KD(**config)):
            s.set_timesteps(10)
            y = _loop(s, initial_sample(), end=3, gen=torch.Generator().manual_seed(0))
            t = s.timesteps[3]
            outs.append(s.convert_model_output(dummy_model(y, t), sample=y))
        assert parity_error(outs[1], outs[0]) <= 1e-5
    with pytest.raises(ValueError, match="step index"):
        _set(KD(), 5).convert_model_output(initial_sample(), sample=initial_sample())


def test_set_begin_index_and_add_noise():
    x, n = initial_sample(), initial_sample(seed=5)
    outs = []
    for s in (DF(**SD), KD(**SD)):
        s.set_timesteps(20)
        s.set_begin_index(8)
        outs.append(_loop(s, s.add_noise(x, n, s.timesteps[8:9]), start=8, gen=torch.Generator().manual_seed(0)))
    assert parity_error(outs[1], outs[0]) <= 1e-5
    df, kd = _set(DF(), 20), _set(KD(), 20)
    t = df.timesteps[[3, 7]]
    assert torch.equal(kd.add_noise(x, n, t), df.add_noise(x, n, t))  # DDPM's add_noise, bit for bit


def test_img2img_start_by_timestep_value():
    outs = []
    for s in (DF(**SD), KD(**SD)):
        s.set_timesteps(20)
        outs.append(_loop(s, initial_sample(), start=6, gen=torch.Generator().manual_seed(0)))
    assert parity_error(outs[1], outs[0]) <= 1e-5


def test_python_number_timesteps_equal_tensor_timesteps():
    kd = _set(KD(), 10)
    x = initial_sample()
    gen = torch.Generator().manual_seed(0)
    y = x
    for t in kd.timesteps.tolist():
        y = kd.step(dummy_model(y, t), t, y, generator=gen).prev_sample
    assert parity_error(y, run_loop(KD(), 10, x)) == 0.0


def test_whole_loop_sample_matches_the_step_loop():
    import kdfast

    kd = _set(KD(**SD), 10)
    x = initial_sample()

    def denoiser(y, t):
        return dummy_model(y, t)

    got = kdfast.sample(denoiser, x, kd, generator=torch.Generator().manual_seed(0))
    assert parity_error(got, run_loop(KD(**SD), 10, x)) == 0.0


# --------------------------------------------------------------------------- config


def test_config_round_trip(tmp_path):
    df = DF(predictor_order=3, corrector_order=4, algorithm_type="noise_prediction", use_karras_sigmas=True, **SD)
    kd = KD.from_config(df.config)
    assert settings(kd.config) == settings(df.config)
    kd.save_pretrained(tmp_path)
    assert settings(KD.from_pretrained(tmp_path).config) == settings(kd.config)
    loaded = DF.from_pretrained(tmp_path)  # diffusers loads what kdfast saved
    assert settings(loaded.config) == settings(df.config)
    x = initial_sample()
    assert parity_error(run_loop(KD.from_pretrained(tmp_path), 10, x, begin_index=0),
                        run_loop(loaded, 10, x, begin_index=0)) <= 1e-5
    _, unused = KD.from_config({**df.config, "solver_order": 3}, return_unused_kwargs=True)
    assert unused == {"solver_order": 3}


def test_tau_func_config():
    tau = lambda t: 0.25  # noqa: E731
    kd = KD(tau_func=tau)
    assert kd.config.tau_func is tau and kd.tau_func is tau
    assert KD.from_config(kd.config).tau_func is tau  # a dict round trip keeps the function
    assert KD().tau_func is default_tau and KD().config.tau_func is None
    with pytest.raises(TypeError, match="tau_func"):  # (diffusers: "Object of type function is not JSON serializable")
        kd.to_json_string()


def test_from_config_of_another_scheduler_and_compatibles():
    dpm = diffusers.DPMSolverMultistepScheduler(solver_order=3, **SD)
    kd = KD.from_config(dpm.config)
    assert kd.config.beta_end == 0.012 and kd.config.algorithm_type == "data_prediction"
    assert settings(kd.config) == settings(DF.from_config(dpm.config).config)
    assert type(DPMSolverMultistepScheduler.from_config(kd.config)) is DPMSolverMultistepScheduler
    assert {c.__name__ for c in kd.compatibles} == {c.__name__ for c in DF().compatibles}  # (diffusers: from a set)
    assert kd.order == DF().order == 1 and len(kd) == 1000 and kd.init_noise_sigma == 1.0


def test_schedule_attributes_match_diffusers():
    for config in (dict(), dict(SD, use_karras_sigmas=True), dict(FLOW, flow_shift=3.0),
                   dict(timestep_spacing="leading", steps_offset=1), dict(lambda_min_clipped=-3.0)):
        df, kd = DF(**config), KD(**config)
        for name in ("betas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t", "sigmas", "timesteps"):
            assert torch.equal(getattr(kd, name), getattr(df, name)), name
        df.set_timesteps(15)
        kd.set_timesteps(15, device="cpu")
        assert torch.equal(kd.timesteps, df.timesteps) and kd.timesteps.dtype == torch.int64
        assert torch.equal(kd.sigmas, df.sigmas) and kd.sigmas.dtype == torch.float32
        assert kd.num_inference_steps == df.num_inference_steps == 15
        assert kd.step_index is None and kd.begin_index is None and kd.last_sample is None
        x = initial_sample()
        assert kd.scale_model_input(x, kd.timesteps[0]) is x


def test_return_dict_false_is_a_one_tuple():
    for s in (DF(), KD()):
        s.set_timesteps(4)
        x = initial_sample()
        out = s.step(dummy_model(x, s.timesteps[0]), s.timesteps[0], x, None, False)  # positional, as diffusers
        assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == x.shape
    out = _set(KD(), 4).step(x, 999, x)
    assert list(out.keys()) == ["prev_sample"] and out[0] is out.prev_sample


# --------------------------------------------------------------------------- bad input


def test_bad_config_values_are_named():
    for name in ("predictor_order", "corrector_order"):
        for bad in (0, 5, True, 2.5):
            with pytest.raises(ValueError, match=name):
                KD(**{name: bad})
    with pytest.raises(ValueError, match="algorithm_type='dpmsolver'"):
        KD(algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        KD(prediction_type="eps")
    with pytest.raises(ValueError, match="flow_prediction"):  # diffusers raises at the first step
        KD(prediction_type="flow_prediction", algorithm_type="noise_prediction")
    with pytest.raises(ValueError, match="timestep_spacing"):
        KD(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        KD(beta_schedule="cubic")
    with pytest.raises(ValueError, match="Only one of"):
        KD(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="use_flow_sigmas"):  # diffusers' steps are NaN
        KD(use_flow_sigmas=True, use_karras_sigmas=True)
    with pytest.raises(TypeError, match="tau_func"):
        KD(tau_func=0.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        KD().set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        KD().set_timesteps()


@pytest.mark.parametrize("tau_func,error", [(lambda t: float("nan"), ValueError), (lambda t: "1", TypeError),
                                            (lambda t: None, TypeError), (lambda t: float("inf"), ValueError)])
def test_bad_tau_values_are_named(tau_func, error):
    with pytest.raises(error, match="tau_func"):
        KD(tau_func=tau_func).set_timesteps(5)


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
    with pytest.raises(TypeError, match="eta"):
        kd.step(x, kd.timesteps[0], x, eta=0.5)
    with pytest.raises(ValueError, match="variance_noise"):  # (tau is 0 at the first step: read or not)
        kd.step(x, kd.timesteps[0], x, variance_noise=x[:1])
    kd.set_timesteps(5)
    x = _loop(kd, x)
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, 0, x)


def test_learned_variance_channels_raise_where_diffusers_fails():
    config = dict(variance_type="learned_range")
    x = initial_sample((2, 3, 8, 8))
    out = torch.cat([dummy_model(x, 999), dummy_model(x, 999)], dim=1)
    df = _set(DF(**config), 5)
    with pytest.raises(RuntimeError):  # noise drawn in the output's 6 channels, the sample has 3
        df.step(out, df.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    kd = _set(KD(**config), 5)
    with pytest.raises(ValueError, match=r"model_output\[:, :3\]"):
        kd.step(out, kd.timesteps[0], x)


def test_resume_without_the_state_it_needs_is_an_error():
    kd = _set(KD(), 10)
    kd.set_begin_index(3)
    kd.last_sample = initial_sample()
    with pytest.raises(ValueError, match="this_corrector_order"):
        kd.step(initial_sample(), kd.timesteps[3], initial_sample())
    kd = _set(KD(), 10)
    kd.set_begin_index(3)
    kd.last_sample, kd.this_corrector_order = initial_sample(), 1
    with pytest.raises(ValueError, match="last_noise"):
        kd.step(initial_sample(), kd.timesteps[3], initial_sample())
    kd = _set(KD(predictor_order=3), 10)
    kd.set_begin_index(3)
    kd.lower_order_nums = 3
    with pytest.raises(ValueError, match="model_outputs is missing"):
        kd.step(initial_sample(), kd.timesteps[3], initial_sample())
