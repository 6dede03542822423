import numpy as np
import pytest
import torch

from kdfast.schedulers.deis_multistep import DEISMultistepScheduler
from parity import (
    assert_parity, diffusers, dummy_model, initial_sample, no_host_reads, parity_error, run_loop, settings)


class DF(diffusers.DEISMultistepScheduler):
    """diffusers' DEIS, whose ``step`` takes no generator; the harness passes one."""

    def step(self, model_output, timestep, sample, return_dict=True, generator=None, **kwargs):
        return super().step(model_output, timestep, sample, return_dict=return_dict)


class DF64(DF):
    """diffusers' DEIS evaluated in float64 (sigmas, and the sample the caller passes)."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.sigmas = self.sigmas.double()


KD = DEISMultistepScheduler
# diffusers' DEIS calls np.log on torch tensors: one numpy DeprecationWarning per call, by the thousand
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")


def assert_deis_parity(config, steps, **set_kwargs):
    """kdfast within 1e-5 of diffusers evaluated in float64, and of diffusers' float32 loop
    within 1e-5 plus that loop's own float32 error (its distance to the float64 evaluation).

    diffusers computes DEIS' coefficients as differences of nearly equal antiderivatives
    (``ind_fn(rho_t, ...) - ind_fn(rho_s0, ...)``) in float32; with small steps (third order,
    25-50 steps, beta sigmas) the cancellation costs it up to 1e-2 (see
    test_diffusers_float32_coefficients_lose_accuracy). kdfast computes them in float64, so it
    matches diffusers' own float64 evaluation. Where diffusers' float32 loop is accurate the
    tolerance is 1e-5 (plus its ~1e-6 rounding).
    """
    x = initial_sample()
    truth = run_loop(DF64(**config), steps, x.double(), **set_kwargs)
    own = parity_error(run_loop(DF(**config), steps, x, **set_kwargs), truth)
    got, _ = assert_parity(KD, DF, config, steps=steps, tol=1e-5 + own, **set_kwargs)
    err = parity_error(got, truth)
    assert err <= 1e-5, f"{config} steps={steps}: error {err:.3e} against diffusers in float64"


@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_parity_orders_and_predictions(solver_order, prediction_type, steps):
    assert_deis_parity(dict(solver_order=solver_order, prediction_type=prediction_type), steps)


@pytest.mark.parametrize("solver_order", [2, 3])
@pytest.mark.parametrize("steps", [12, 14, 15])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_parity_around_the_lower_order_final_threshold(solver_order, steps, lower_order_final):
    # diffusers lowers the last steps' order only below 15 steps: 14 is the last count that
    # does, 15 the first that does not (with 10, 25 and 50 steps any threshold in 11..15 passed)
    assert_deis_parity(dict(solver_order=solver_order, lower_order_final=lower_order_final), steps)


@pytest.mark.parametrize("solver_order", [1, 2])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 50])
def test_parity_with_diffusers_float32_at_1e5(solver_order, prediction_type, steps):
    # where diffusers' float32 coefficients are accurate, plain 1e-5 parity with its float32 loop
    assert_parity(KD, DF, dict(solver_order=solver_order, prediction_type=prediction_type), steps=steps)


def test_third_order_few_steps_parity_with_diffusers_float32():
    assert_parity(KD, DF, dict(solver_order=3), steps=10)


def test_diffusers_float32_coefficients_lose_accuracy():
    config = dict(SD, use_beta_sigmas=True, solver_order=3)
    x = initial_sample()
    truth = run_loop(DF64(**config), 25, x.double(), begin_index=0)
    df32 = run_loop(DF(**config), 25, x, begin_index=0)
    got = run_loop(KD(**config), 25, x, begin_index=0)
    assert parity_error(df32, truth) > 1e-3  # diffusers' float32 loop vs the same code in float64
    assert parity_error(got, truth) < 1e-5  # kdfast, in float32 with float64 coefficients


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("solver_order", [2, 3])
def test_parity_sigma_schedules(sigmas, steps, solver_order):
    # begin_index=0: some of these schedules repeat a timestep, where diffusers' value lookup crashes.
    assert_deis_parity(dict(SD, solver_order=solver_order, **{sigmas: True}), steps, begin_index=0)


@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_parity_flow_matching(solver_order, steps):
    # diffusers' first flow step divides by alpha_s0 ~ 3e-4 and cancels in float32 (2e-5);
    # kdfast folds the coefficients in float64 first.
    assert_deis_parity(dict(FLOW, flow_shift=3.0, solver_order=solver_order), steps)


def test_dynamic_shifting_mu():
    config = dict(FLOW, use_dynamic_shifting=True, solver_order=2)
    assert_deis_parity(config, 10, mu=0.7)
    kd = KD(**config)
    kd.set_timesteps(10, mu=0.7)
    assert kd.config.flow_shift == pytest.approx(np.exp(0.7))  # diffusers also keeps e^mu as its flow_shift


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_parity_spacing_and_final_step(spacing, lower_order_final):
    assert_deis_parity(dict(timestep_spacing=spacing, steps_offset=1, solver_order=3,
                            lower_order_final=lower_order_final), 10)


@pytest.mark.parametrize("solver_order", [2, 3])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_parity_dynamic_thresholding(solver_order, prediction_type):
    # the history is epsilon recomputed from the thresholded x0, as in diffusers
    assert_deis_parity(dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9,
                            solver_order=solver_order, prediction_type=prediction_type), 20)


@pytest.mark.parametrize("config", [
    dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True),
    dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist(), solver_order=3),
    dict(algorithm_type="dpmsolver++", solver_type="midpoint"),  # mapped to deis / logrho, as in diffusers
])
def test_parity_other_configs(config):
    assert_deis_parity(config, 20, begin_index=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(solver_order=2), dict(solver_order=3, thresholding=True,
                                                               prediction_type="sample")])
def test_half_precision_keeps_dtype_and_matches(dtype, config):
    assert_parity(KD, DF, config, steps=20, dtype=dtype)


@pytest.mark.parametrize("config", [dict(), dict(solver_order=3, steps=10),
                                    dict(thresholding=True, prediction_type="sample", sample_max_value=1.5)])
def test_fused_guidance_matches_diffusers_guidance(config):
    config = dict(config)
    steps = config.pop("steps", 20)
    assert_parity(KD, DF, config, steps=steps, guidance_scale=2.0)


def _finish(scheduler, x, start=0):
    for t in scheduler.timesteps[start:]:
        x = scheduler.step(dummy_model(x, t), t, x).prev_sample
    return x


def test_model_outputs_set_from_outside():
    df, kd = DF(solver_order=3), KD(solver_order=3)
    x = initial_sample()
    past = [initial_sample(seed=s) * 0.3 for s in (1, 2, 3)]
    for s in (df, kd):  # resume mid-schedule with a third-order epsilon history from the caller
        s.set_timesteps(10)
        s.set_begin_index(5)
        s.model_outputs = [p.clone() for p in past]
        s.lower_order_nums = 3
    outs = [_finish(s, x, start=5) for s in (df, kd)]
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = KD(solver_order=3, use_karras_sigmas=True, **SD)
    kd.save_pretrained(tmp_path)
    again = KD.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)  # diffusers loads what kdfast saved
    assert df.config.solver_order == 3 and df.config.use_karras_sigmas
    df.save_pretrained(tmp_path / "df")
    back = KD.from_pretrained(tmp_path / "df")  # and kdfast loads diffusers' config
    assert back.config.solver_order == 3 and back.config.beta_schedule == "scaled_linear"
    x = initial_sample()
    assert parity_error(run_loop(back, 10, x, begin_index=0), run_loop(df, 10, x, begin_index=0)) < 1e-5


def test_from_config_of_another_scheduler_maps_solver_names():
    dpm = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="heun", **SD)
    kd = KD.from_config(dpm.config)
    assert kd.config.algorithm_type == "deis" and kd.config.solver_type == "logrho"
    assert kd.config.beta_end == 0.012
    unipc = diffusers.UniPCMultistepScheduler(solver_type="bh1")
    assert KD.from_config(unipc.config).config.solver_type == "logrho"


def test_step_signature_and_convert_model_output_match_diffusers():
    df, kd = DF(solver_order=3, thresholding=True), KD(solver_order=3, thresholding=True)
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
    with pytest.raises(ValueError, match="algorithm_type='unipc'"):
        KD(algorithm_type="unipc")
    with pytest.raises(ValueError, match="solver_type='rk4'"):
        KD(solver_type="rk4")
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        KD(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing"):
        KD(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        KD(beta_schedule="cubic")
    with pytest.raises(ValueError, match="time_shift_type"):
        KD(time_shift_type="quadratic")
    with pytest.raises(ValueError, match="solver_order"):
        KD(solver_order=4)
    with pytest.raises(ValueError, match="Only one of"):
        KD(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="mu needs"):
        KD().set_timesteps(10, mu=0.5)


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
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        kd.set_timesteps(0)
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
