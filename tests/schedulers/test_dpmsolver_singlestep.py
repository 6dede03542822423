import copy
import inspect
import itertools
import math
import pickle
from unittest import mock

import pytest
import torch

from kdfast.schedulers import base
from kdfast.schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler
from kdfast.schedulers.dpmsolver_singlestep import DPMSolverSinglestepScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

import diffusers.schedulers.scheduling_dpmsolver_singlestep as df_module

KD = DPMSolverSinglestepScheduler
DF = diffusers.DPMSolverSinglestepScheduler
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEPS = (1, 2, 3, 5, 10, 20)


class DF64(DF):
    """diffusers' code evaluated in float64 (sigmas, and the sample the caller passes): the
    reference for the updates whose float32 rounding in diffusers exceeds 1e-5."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.sigmas = self.sigmas.double()


_real_randn = df_module.randn_tensor


def _randn_float32(shape, generator=None, device=None, dtype=None, **kwargs):
    # the float64 reference draws the SDE noise the float32 loop draws (then widens it)
    return _real_randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def diffusers_float64(config, steps, x, **set_kwargs):
    with mock.patch.object(df_module, "randn_tensor", _randn_float32):
        return run_loop(DF64(**config), steps, x.double(), **set_kwargs)


def assert_loop_parity(config, steps, dtype=torch.float32, guidance_scale=None, **set_kwargs):
    """kdfast against diffusers. float16/bfloat16: the rule of ``assert_parity``. float32: within
    1e-5 of diffusers; where it is not, the gap must be diffusers' own float32 rounding: both
    loops are compared with diffusers' code evaluated in float64, and kdfast must be within 1e-5
    plus twice diffusers' own error of it (the rule the half-precision dtypes follow). The
    updates where that happens are ill-conditioned in float32 (test_where_diffusers_float32_...)."""
    if dtype != torch.float32:
        return assert_parity(KD, DF, config, steps=steps, dtype=dtype, guidance_scale=guidance_scale,
                             **set_kwargs)[0]
    df = DF(**config)
    kd = KD.from_config(df.config)
    x = initial_sample()
    expected = run_loop(df, steps, x, guidance_scale, **set_kwargs)
    got = run_loop(kd, steps, x, guidance_scale, fused_cfg=guidance_scale is not None, **set_kwargs)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(kd.timesteps.cpu().double(), df.timesteps.cpu().double()), (kd.timesteps, df.timesteps)
    assert kd.order_list == df.order_list
    assert torch.isfinite(got).all()
    err = parity_error(got, expected)
    if err <= 1e-5:
        return got
    truth = diffusers_float64(config, steps, x, **set_kwargs)
    own = parity_error(expected, truth)
    assert err <= 1e-5 + 2 * own, f"{config} steps={steps}: parity error {err:.3e}, diffusers' own {own:.3e}"
    assert parity_error(got, truth) <= 1e-5 + 2 * own, \
        f"{config} steps={steps}: {parity_error(got, truth):.3e} from float64 vs diffusers' {own:.3e}"
    return got


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("solver_order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun"),
                                                      (3, "midpoint"), (3, "heun")])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_parity_algorithms_orders_predictions_and_step_counts(algorithm_type, solver_order, solver_type,
                                                              prediction_type):
    # The order list (groups 1, 2, 3, ...) depends on the step count, lower_order_final and the
    # final sigma: every combination, at every step count.
    finals = ("sigma_min",) if algorithm_type == "dpmsolver" else ("zero", "sigma_min")
    for steps, lower_order_final, final in itertools.product(STEPS, (False, True), finals):
        assert_loop_parity(dict(algorithm_type=algorithm_type, solver_order=solver_order, solver_type=solver_type,
                   prediction_type=prediction_type, lower_order_final=lower_order_final,
                   final_sigmas_type=final), steps)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("solver_order", [2, 3])
def test_parity_sigma_schedules(sigmas, solver_order):
    # begin_index=0: some of these schedules repeat their first timestep, where diffusers'
    # value lookup starts at the second step (test_repeated_first_timestep_...).
    for steps, final in itertools.product(STEPS, ("zero", "sigma_min")):
        assert_loop_parity({sigmas: True, "solver_order": solver_order, "final_sigmas_type": final, **SD}, steps,
                           begin_index=0)


def test_repeated_first_timestep_does_not_skip_a_step():
    config = dict(use_beta_sigmas=True, **SD)
    x = initial_sample()
    df = DF(**config)
    df.set_timesteps(50)
    assert df.timesteps[0] == df.timesteps[1]
    with pytest.raises(IndexError):  # diffusers finds the repeated timestep by value and runs off the end
        run_loop(df, 50, x)
    got = run_loop(KD(**config), 50, x)  # kdfast knows which element it was given
    assert parity_error(got, run_loop(DF(**config), 50, x, begin_index=0)) < 1e-5


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_parity_flow_sigmas(algorithm_type, solver_order):
    for steps, final in itertools.product(STEPS, ("zero", "sigma_min")):
        assert_loop_parity(dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                   algorithm_type=algorithm_type, solver_order=solver_order, final_sigmas_type=final), steps)


def test_parity_dynamic_shifting_mu():
    config = dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True)
    assert_loop_parity(config, 10, mu=0.7)
    kd = KD(**config)
    kd.set_timesteps(10, mu=0.7)
    assert kd.config.flow_shift == pytest.approx(math.exp(0.7))
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        KD().set_timesteps(10, mu=0.7)


@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_parity_lambda_min_clipped_and_other_schedules(solver_order):
    for steps in STEPS:
        assert_loop_parity(dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2", solver_order=solver_order),
                           steps)
        assert_loop_parity(dict(solver_order=solver_order, **SD), steps)
    assert_loop_parity(dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist(), solver_order=solver_order), 10)
    assert_loop_parity(dict(num_train_timesteps=500, solver_order=solver_order, algorithm_type="sde-dpmsolver++"), 10)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_parity_dynamic_thresholding(algorithm_type, solver_order):
    for steps, prediction_type in itertools.product((2, 5, 20), ("sample", "epsilon")):
        assert_loop_parity(dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9,
                   algorithm_type=algorithm_type, solver_order=solver_order, prediction_type=prediction_type), steps)


class DFStepSigma(DF):
    """diffusers whose dpmsolver thresholding reads alpha_t, sigma_t at the step's sigma: it reads
    ``self.alpha_t[timestep]`` with the (deprecated) timestep argument, None when not given, and
    fails; here it gets the step index, and alpha_t, sigma_t are indexed by step."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.alpha_t, self.sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas)

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        return super().convert_model_output(model_output, self.step_index, sample=sample, **kwargs)


@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_noise_prediction_thresholding_works_where_diffusers_fails(solver_order):
    config = dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", thresholding=True,
                  sample_max_value=1.5, solver_order=solver_order)
    x = initial_sample()
    with pytest.raises(RuntimeError):  # alpha_t[None]: the whole schedule against the sample
        run_loop(DF(**config), 10, x)
    # kdfast thresholds x0 at the step's sigma (as DPMSolverMultistep does): diffusers' result
    # with the timestep its conversion is missing.
    got = run_loop(KD(**config), 10, x)
    assert parity_error(got, run_loop(DFStepSigma(**config), 10, x)) < 1e-5
    assert parity_error(got, run_loop(KD(**dict(config, thresholding=False)), 10, x)) > 1e-3  # it thresholds


@pytest.mark.parametrize("config", [{}, dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
                                    dict(algorithm_type="sde-dpmsolver++", solver_order=3)])
def test_parity_learned_variance(config):
    # The model outputs [mean, variance]; the solver reads the mean (diffusers' first 3 channels).
    config = dict(config, variance_type="learned_range")
    outs = []
    for s in (DF(**config), KD(**config)):
        s.set_timesteps(6)
        x, gen = initial_sample((2, 3, 8, 8)), torch.Generator().manual_seed(0)
        for t in s.timesteps:
            m = dummy_model(x, t)
            x = s.step(torch.cat([m, 0.3 * m], dim=1), t, x, generator=gen).prev_sample
        outs.append(x)
    assert parity_error(outs[1], outs[0]) < 1e-5


@pytest.mark.parametrize("config", [{}, dict(solver_order=3, final_sigmas_type="sigma_min"),
                                    dict(algorithm_type="sde-dpmsolver++", solver_type="heun"),
                                    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3)])
@pytest.mark.parametrize("timesteps", [[999, 850, 700, 500, 320, 160, 40, 5], [901, 555, 203], [600]])
def test_parity_custom_timesteps(config, timesteps):
    assert_loop_parity(config, None, timesteps=timesteps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [{}, dict(solver_order=3, solver_type="heun"),
                                    dict(algorithm_type="sde-dpmsolver++"),
                                    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
                                    dict(thresholding=True, prediction_type="sample", sample_max_value=1.5)])
def test_half_precision_keeps_dtype_and_matches(dtype, config):
    for steps in (5, 20):
        got = assert_loop_parity(config, steps, dtype=dtype)
        assert got.dtype == dtype


@pytest.mark.parametrize("config", [{}, dict(solver_order=3), dict(algorithm_type="sde-dpmsolver++"),
                                    dict(thresholding=True, prediction_type="v_prediction", sample_max_value=2.0)])
def test_fused_guidance_matches_diffusers_and_the_unfused_step(config):
    assert_loop_parity(config, 10, guidance_scale=2.0)
    outs = []
    for fused in (False, True):
        s = KD(**config)
        outs.append(run_loop(s, 10, initial_sample(), guidance_scale=2.0, fused_cfg=fused))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config, steps", [
    (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="sample"), 1),
    (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="v_prediction",
          solver_order=3), 5),
    (dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun"), 20),
])
def test_where_diffusers_float32_rounding_exceeds_the_tolerance(config, steps):
    # Noise prediction from a sample / v model near sigma_max: x_t = (a_t/a_s) x - s_t (e^h - 1) eps
    # cancels terms ~150x the result, and diffusers computes h and eps in float32. The third-order
    # SDE heun update amplifies any rounding step after step. kdfast's coefficients are float64:
    # it is as close as diffusers (or closer) to diffusers' own code evaluated in float64.
    x = initial_sample()
    expected = run_loop(DF(**config), steps, x)
    got = run_loop(KD(**config), steps, x)
    truth = diffusers_float64(config, steps, x)
    own = parity_error(expected, truth)
    assert own > 1e-5 and parity_error(got, expected) > 1e-5
    assert parity_error(got, truth) <= 2 * own
    assert_loop_parity(config, steps)


# ---------------------------------------------------------------- where diffusers gives NaN


def test_repeated_custom_timestep_is_finite_where_diffusers_gives_nan():
    # [999, 999, 500, 200]: the second-order step's midpoint repeats its start, and diffusers
    # divides by r0 = 0. kdfast drops the repeated node: the first-order update from the group's
    # start, what diffusers' solver_order=1 gives on [999, 500, 200] (the first step has length 0).
    x = initial_sample()
    expected_nan = run_loop(DF(), None, x, timesteps=[999, 999, 500, 200], begin_index=0)
    assert not torch.isfinite(expected_nan).all()
    got = run_loop(KD(), None, x, timesteps=[999, 999, 500, 200])
    assert torch.isfinite(got).all()
    assert parity_error(got, run_loop(DF(solver_order=1), None, x, timesteps=[999, 500, 200])) < 1e-5
    # [500, 500, 500, 200]: a second-order group that ends where it starts (h = 0; diffusers
    # computes 0 / 0). Its exact solution is its first sample: what solver_order=1 gives on [500, 200].
    assert not torch.isfinite(run_loop(DF(), None, x, timesteps=[500, 500, 500, 200], begin_index=0)).all()
    got = run_loop(KD(), None, x, timesteps=[500, 500, 500, 200])
    assert parity_error(got, run_loop(DF(solver_order=1), None, x, timesteps=[500, 200])) < 1e-5


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"])
def test_repeated_timestep_in_a_third_order_group_is_finite(algorithm_type):
    # [999, 700, 700, ...]: the third-order heun step divides by r0 - r1 = 0 in diffusers (its
    # midpoint variant does not read those terms and stays finite: kdfast matches it there).
    config = dict(solver_order=3, final_sigmas_type="sigma_min", algorithm_type=algorithm_type)
    timesteps = [999, 700, 700, 300, 100, 50]
    x = initial_sample()
    heun = run_loop(DF(solver_type="heun", **config), None, x, timesteps=timesteps, begin_index=0)
    assert not torch.isfinite(heun).all()
    assert torch.isfinite(run_loop(KD(solver_type="heun", **config), None, x, timesteps=timesteps)).all()
    midpoint = run_loop(DF(**config), None, x, timesteps=timesteps, begin_index=0)
    assert parity_error(run_loop(KD(**config), None, x, timesteps=timesteps), midpoint) < 1e-5
    if algorithm_type == "sde-dpmsolver++":
        return  # (below, the two loops would draw different noise)
    # Without the repeated node, the group 999 -> 300 is diffusers' second-order heun step
    # 999 -> (700) -> 300: what the first steps of its solver_order=2 loop on [999, 700, 300] give.
    kd = KD(solver_type="heun", **config)
    kd.set_timesteps(timesteps=timesteps)
    df = DF(**dict(config, solver_order=2, solver_type="heun"))
    df.set_timesteps(timesteps=[999, 700, 300, 100])
    df.set_begin_index(0)
    outs = []
    for s, n in ((kd, 3), (df, 2)):
        y = x
        for t in s.timesteps[:n]:
            y = s.step(dummy_model(y, t), t, y).prev_sample
        outs.append(y)
    assert parity_error(outs[0], outs[1]) < 1e-5


def test_flow_sigmas_with_karras_sigmas_are_refused_where_diffusers_gives_nan():
    config = dict(use_flow_sigmas=True, use_karras_sigmas=True, prediction_type="flow_prediction")
    assert not torch.isfinite(run_loop(DF(**config), 10, initial_sample())).all()
    with pytest.raises(ValueError, match="use_flow_sigmas=True cannot be combined with use_karras_sigmas"):
        KD(**config)


# ---------------------------------------------------------------- state and API


def test_signatures_match_diffusers():
    def params(f):
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]

    assert [n for n, _ in params(KD.__init__)] == [n for n, _ in params(DF.__init__)]
    for (name, got), (_, expected) in zip(params(KD.__init__), params(DF.__init__)):
        assert got == expected or (isinstance(got, float) and math.isinf(got) and got == expected), name
    assert params(KD.set_timesteps) == params(DF.set_timesteps)
    assert [n for n, _ in params(KD.step)][:6] == [n for n, _ in params(DF.step)]
    assert KD.diffusers_class_name() == "DPMSolverSinglestepScheduler"


@pytest.mark.parametrize("config", [{}, dict(solver_order=3), dict(algorithm_type="sde-dpmsolver++"),
                                    dict(solver_order=3, lower_order_final=True, final_sigmas_type="sigma_min")])
def test_state_follows_diffusers_step_by_step(config):
    # model_outputs (the converted outputs, oldest first), sample (the group's first sample: the
    # caller's tensor itself) and the step index, after every step.
    df, kd = DF(**config), KD(**config)
    for s in (df, kd):
        s.set_timesteps(7)
    assert kd.order_list == df.order_list and kd.config.lower_order_final == df.config.lower_order_final
    assert torch.equal(kd.sigmas, df.sigmas) and torch.equal(kd.timesteps, df.timesteps)
    assert kd.sample is None and kd.model_outputs == [None] * kd.config.solver_order
    x_df = x_kd = initial_sample()
    g_df, g_kd = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t_df, t_kd in zip(df.timesteps, kd.timesteps):
        x_df_in, x_kd_in = x_df, x_kd
        x_df = df.step(dummy_model(x_df, t_df), t_df, x_df, generator=g_df).prev_sample
        x_kd = kd.step(dummy_model(x_kd, t_kd), t_kd, x_kd, generator=g_kd).prev_sample
        assert kd.step_index == df.step_index
        assert (df.sample is x_df_in) == (kd.sample is x_kd_in)  # kept by reference, not copied
        assert parity_error(kd.sample, df.sample) < 1e-5
        for a, b in zip(kd.model_outputs, df.model_outputs):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and parity_error(a, b) < 1e-5
    assert parity_error(x_kd, x_df) < 1e-5


@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
def test_order_list_and_lower_order_final_like_diffusers(solver_order, lower_order_final, final_sigmas_type):
    config = dict(solver_order=solver_order, lower_order_final=lower_order_final, final_sigmas_type=final_sigmas_type)
    df, kd = DF(**config), KD(**config)
    assert kd.order_list == df.order_list  # of the training schedule, before set_timesteps
    for steps in (*STEPS, 4, 6, 7, 15, 30):
        for s in (df, kd):
            s.set_timesteps(steps)
        # diffusers sets lower_order_final=True in the config for uneven counts and a zero final sigma
        assert kd.config.lower_order_final == df.config.lower_order_final
        assert kd.order_list == df.order_list and len(kd.order_list) == steps
        assert kd.get_order_list(steps) == df.get_order_list(steps)


def test_attributes_like_diffusers():
    df, kd = DF(), KD()
    assert len(kd) == len(df) == 1000
    assert kd.order == df.order == 1 and kd.init_noise_sigma == df.init_noise_sigma == 1.0
    assert kd.step_index is None and kd.begin_index is None and kd.num_inference_steps is None
    assert torch.equal(kd.timesteps, df.timesteps) and torch.allclose(kd.sigmas, df.sigmas)
    kd.set_timesteps(10, device="cpu")
    x = initial_sample()
    assert kd.scale_model_input(x, kd.timesteps[0]) is x
    kd.set_begin_index(3)
    assert kd.begin_index == 3
    assert "DPMSolverSinglestepScheduler" in [c.__name__ for c in kd.compatibles]


def test_return_dict_false_gives_a_one_entry_tuple():
    kd = KD()
    kd.set_timesteps(4)
    x = initial_sample()
    out = kd.step(dummy_model(x, kd.timesteps[0]), kd.timesteps[0], x, None, False)  # diffusers' positions
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == x.shape
    u, c = dummy_cfg(x, kd.timesteps[1])
    out = kd.step_cfg(u, c, 2.0, kd.timesteps[1], out[0], return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1


@pytest.mark.parametrize("begin_index", [1, 2, 4, 5])
@pytest.mark.parametrize("solver_order", [2, 3])
def test_set_begin_index_starts_mid_group_like_diffusers(begin_index, solver_order):
    # img2img: the first step may be the second or third of a group, with no outputs before it;
    # diffusers lowers its order, and so does kdfast.
    outs = []
    for s in (DF(solver_order=solver_order), KD(solver_order=solver_order)):
        s.set_timesteps(12)
        s.set_begin_index(begin_index)
        y, gen = initial_sample(), torch.Generator().manual_seed(0)
        for t in s.timesteps[begin_index:]:
            y = s.step(dummy_model(y, t), t, y, generator=gen).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_model_outputs_and_sample_set_from_outside():
    # resume mid-group with the outputs and group start a caller supplies, as diffusers allows
    x = initial_sample()
    past = [initial_sample(seed=s) * 0.3 for s in (1, 2, 3)]
    outs = []
    for s in (DF(solver_order=3), KD(solver_order=3)):
        s.set_timesteps(9)
        s.set_begin_index(5)  # order_list[5] == 3
        s.model_outputs = [p.clone() for p in past]
        s.sample = x + 0.1
        y = x
        for t in s.timesteps[5:]:
            y = s.step(dummy_model(y, t), t, y).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_save_load_and_from_config_round_trips(tmp_path):
    kd = KD(solver_order=3, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++", **SD)
    kd.save_pretrained(tmp_path)
    again = KD.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)  # diffusers loads what kdfast saved ...
    assert settings(df.config) == settings(kd.config)
    df.save_pretrained(tmp_path / "df")
    back = KD.from_pretrained(tmp_path / "df")  # ... and kdfast what diffusers saved
    assert settings(back.config) == settings(df.config)
    x = initial_sample()
    assert parity_error(run_loop(back, 10, x), run_loop(df, 10, x)) < 1e-5
    assert settings(KD.from_config(DF(solver_order=1).config).config) == settings(DF(solver_order=1).config)


def test_from_config_of_a_multistep_scheduler_like_diffusers():
    # diffusers lists DPMSolverMultistep among the compatibles: its config builds a singlestep
    # scheduler, keeping the keys singlestep does not take (timestep_spacing, euler_at_final, ...).
    multi = diffusers.DPMSolverMultistepScheduler(solver_order=3, timestep_spacing="trailing", **SD)
    df, kd = DF.from_config(multi.config), KD.from_config(multi.config)
    assert settings(kd.config) == settings(df.config)
    assert kd.config.lower_order_final is False  # a default there: singlestep's own default
    assert kd.config.timestep_spacing == "trailing"  # kept, unused, as diffusers keeps it
    x = initial_sample()
    assert parity_error(run_loop(kd, 9, x), run_loop(df, 9, x)) < 1e-5
    back = DPMSolverMultistepScheduler.from_config(kd.config)
    assert back.config.timestep_spacing == "trailing" and back.config.solver_order == 3


def test_add_noise_matches():
    for config in ({}, dict(use_flow_sigmas=True, prediction_type="flow_prediction")):
        df, kd = DF(**config), KD(**config)
        df.set_timesteps(20)
        kd.set_timesteps(20)
        x, n = initial_sample(), initial_sample(seed=5)
        torch.testing.assert_close(kd.add_noise(x, n, kd.timesteps[[3, 7]]), df.add_noise(x, n, df.timesteps[[3, 7]]))
        df.set_begin_index(4)
        kd.set_begin_index(4)
        torch.testing.assert_close(kd.add_noise(x, n, kd.timesteps[[4, 4]]), df.add_noise(x, n, df.timesteps[[4, 4]]))


def test_convert_model_output_matches_diffusers():
    for config in (dict(solver_order=3), dict(thresholding=True, prediction_type="sample", sample_max_value=1.5),
                   dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="v_prediction"),
                   dict(variance_type="learned_range")):
        outs = []
        for s in (DF(**config), KD(**config)):
            s.set_timesteps(10)
            x = initial_sample((2, 3, 8, 8))
            for t in s.timesteps[:2]:
                x = s.step(dummy_model(x, t), t, x).prev_sample
            m = dummy_model(x, s.timesteps[2])
            if config.get("variance_type"):
                m = torch.cat([m, m], dim=1)
            outs.append(s.convert_model_output(m, sample=x))
        assert parity_error(outs[1], outs[0]) < 1e-5
    kd = KD()
    kd.set_timesteps(10)
    kd.set_begin_index(0)
    with pytest.raises(ValueError, match="missing `sample`"):
        kd.convert_model_output(x, x)  # diffusers reads a lone positional as the timestep


def test_sde_noise_follows_the_generator_draw_for_draw():
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=3)
    x = initial_sample()
    # a list of generators (one per batch entry), as pipelines pass them
    outs = []
    for s in (DF(**config), KD(**config)):
        s.set_timesteps(6)
        gens, y = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)], x
        for t in s.timesteps:
            y = s.step(dummy_model(y, t), t, y, generator=gens).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5
    # variance_noise (kdfast only) given the draws diffusers makes reproduces the generator's run
    kd, ref = KD(**config), KD(**config)
    for s in (kd, ref):
        s.set_timesteps(6)
    g_ref, g_draw = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = b = x
    for t in kd.timesteps:
        a = ref.step(dummy_model(a, t), t, a, generator=g_ref).prev_sample
        noise = _real_randn(x.shape, generator=g_draw, dtype=torch.float32)
        b = kd.step(dummy_model(b, t), t, b, variance_noise=noise).prev_sample
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="generator or variance_noise"):
        kd.set_timesteps(6)
        kd.step(x, kd.timesteps[0], x, generator=g_ref, variance_noise=x)
    # float16: drawn in float16 as diffusers draws it (not float32 then cast)
    assert_loop_parity(config, 6, dtype=torch.float16)


@pytest.mark.parametrize("config", [dict(prediction_type="sample"), dict(prediction_type="epsilon"),
                                    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
                                    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                                         prediction_type="v_prediction")])
@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16])
def test_model_outputs_keep_the_dtype_diffusers_gives_them(config, model_dtype):
    # A float32 sample and a half-precision model: diffusers keeps the model output's dtype when
    # the solver's quantity is the model output itself (x0 of a sample model, epsilon of an
    # epsilon model), else the promoted one.
    config = dict(config, solver_order=3)
    outs = []
    for s, dtype in ((DF(**config), model_dtype), (KD(**config), model_dtype), (DF(**config), torch.float32)):
        s.set_timesteps(5)
        x = initial_sample()
        for t in s.timesteps[:3]:
            x = s.step(dummy_model(x, t).to(dtype), t, x).prev_sample
        outs.append((x, s.model_outputs))
    (expected, df_outputs), (got, kd_outputs), (truth, _) = outs
    assert [m.dtype for m in kd_outputs] == [m.dtype for m in df_outputs]
    assert got.dtype == expected.dtype == torch.float32
    # the half-precision rule (kdfast keeps the current output in float32 where diffusers may round it)
    assert parity_error(got, truth) <= 2 * parity_error(expected, truth) + 1e-4


def test_float64_sde_draws_in_float64_like_diffusers():
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=2)
    x = initial_sample(dtype=torch.float64)
    got, expected = run_loop(KD(**config), 10, x), run_loop(DF(**config), 10, x)
    assert got.dtype == torch.float64 and parity_error(got, expected) < 1e-5


def test_copies_continue_like_the_original():
    s = KD(solver_order=3, algorithm_type="sde-dpmsolver++")
    s.set_timesteps(8)
    x = initial_sample()
    for t in s.timesteps[:4]:  # mid-group: the copy needs model_outputs and sample
        x = s.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    for twin in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert twin.order_list == s.order_list and twin.sample is not None
        ref = copy.deepcopy(s)
        a = b = x
        for i, (t_ref, t_twin) in enumerate(zip(ref.timesteps[4:], twin.timesteps[4:])):
            a = ref.step(dummy_model(a, t_ref), t_ref, a, generator=torch.Generator().manual_seed(i)).prev_sample
            b = twin.step(dummy_model(b, t_twin), t_twin, b, generator=torch.Generator().manual_seed(i)).prev_sample
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# ---------------------------------------------------------------- the fused step path


@pytest.mark.parametrize("config", [
    {}, dict(solver_order=3, solver_type="heun"), dict(algorithm_type="sde-dpmsolver++", solver_order=3),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3),
    dict(thresholding=True, prediction_type="sample", sample_max_value=1.5, solver_order=3),
    dict(variance_type="learned", solver_order=2),
])
def test_each_step_is_one_fused_call_without_host_reads(config, monkeypatch):
    df, kd = DF(**config), KD(**config)
    for s in (df, kd):
        s.set_timesteps(7)
    x = y = initial_sample((2, 3, 8, 8))
    g_df, g_kd = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    calls = []
    real = base.fused_step

    def model(x, t):
        m = dummy_model(x, t)
        return torch.cat([m, m], dim=1) if config.get("variance_type") else m

    for t_df, t in zip(df.timesteps, kd.timesteps):
        y = df.step(model(y, t_df), t_df, y, generator=g_df).prev_sample
        m = model(x, t)
        with monkeypatch.context() as patch, no_host_reads():
            patch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
            calls.clear()
            x = kd.step(m, t, x, generator=g_kd).prev_sample
            assert len(calls) == 1
    assert parity_error(x, y) < 1e-5


# ---------------------------------------------------------------- bad input


def test_bad_config_values_are_named():
    for kwargs, match in [
        (dict(algorithm_type="sde-dpmsolver"), "algorithm_type='sde-dpmsolver'"),
        (dict(solver_type="euler"), "solver_type='euler'"),
        (dict(prediction_type="eps"), "prediction_type='eps'"),
        (dict(final_sigmas_type="one"), "final_sigmas_type='one'"),
        (dict(beta_schedule="cosine"), "beta_schedule='cosine'"),
        (dict(solver_order=4), "solver_order must be 1, 2 or 3"),
        (dict(solver_order=0), "solver_order must be 1, 2 or 3"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), "Only one of"),
        (dict(algorithm_type="dpmsolver"), "final_sigmas_type 'zero' is not supported"),
        (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="flow_prediction"),
         "flow_prediction"),
    ]:
        with pytest.raises(ValueError, match=match):
            KD(**kwargs)
    # diffusers' aliases
    assert KD(algorithm_type="deis").config.algorithm_type == "dpmsolver++"
    assert KD(solver_type="bh2").config.solver_type == "midpoint"


def test_bad_set_timesteps_arguments_are_named():
    kd = KD()
    with pytest.raises(ValueError, match="exactly one of num_inference_steps or timesteps"):
        kd.set_timesteps()
    with pytest.raises(ValueError, match="exactly one of num_inference_steps or timesteps"):
        kd.set_timesteps(5, timesteps=[900, 500])
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        kd.set_timesteps(0)
    with pytest.raises(ValueError, match="timesteps must be a non-empty 1-D"):
        kd.set_timesteps(timesteps=[])
    with pytest.raises(ValueError, match="Cannot pass timesteps together with karras"):
        KD(use_karras_sigmas=True).set_timesteps(timesteps=[900, 500])


def test_bad_step_input_is_named():
    kd = KD()
    x = initial_sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, 999, x)
    kd.set_timesteps(5)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(TypeError, match="bogus_option"):
        kd.step(x, kd.timesteps[0], x, bogus_option=1)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), kd.timesteps[0], x)
    assert kd.step_index in (None, 0)
    x = kd.step(dummy_model(x, kd.timesteps[0]), kd.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match=r"does not match the shape \(2, 4, 8, 8\) of the group's first sample"):
        kd.step(x[:1], kd.timesteps[1], x[:1])  # the second step of a group reads self.sample
    for t in kd.timesteps[1:]:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)
    kd = KD()
    kd.set_timesteps(6)
    kd.set_begin_index(1)  # order 2, history given from outside but no group start
    kd.model_outputs = [x, x]
    with pytest.raises(ValueError, match=r"needs the sample of its group's first step \(self.sample\)"):
        kd.step(x, kd.timesteps[1], x)
