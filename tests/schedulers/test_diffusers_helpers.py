"""diffusers' helper methods on kdfast's schedulers: the unfused update rules
(``dpm_solver_first_order_update``, ``multistep_uni_p_bh_update``, ...) that inversion and
editing code calls directly, and the schedule helpers (``_convert_to_karras``, ...).

The reference is diffusers' own helper with its sigmas made float64: the same sigma values,
its coefficients computed without float32 rounding (in float32, diffusers' DEIS and SA-Solver
coefficients lose up to 1e-5 to cancellation)."""
import inspect
import warnings

import numpy as np
import pytest
import torch

import kdfast.schedulers as K
from parity import diffusers, dummy_model, initial_sample, parity_error

SHAPE = (2, 3, 4, 4)
FAILURES = (ValueError, RuntimeError, ZeroDivisionError, AssertionError, IndexError)


def inputs(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    names = ("sample", "noise", "new", "last", "o0", "o1", "o2", "o3", "o4")
    return {name: torch.randn(SHAPE, generator=gen) for name in names}


def outputs_oldest_first(t: dict) -> list:
    return [t["o4"], t["o3"], t["o2"], t["o1"], t["o0"]]


def compare(name: str, config: dict, call, steps: int = 8, first: int = 0) -> int:
    """Call ``call(scheduler, tensors)`` at every step index on kdfast's scheduler and on
    diffusers' (float64 sigmas); the results agree wherever diffusers' is finite, and kdfast's
    is finite or a clear ValueError where it is not. Returns how many were compared (from step
    index ``first``)."""
    ours, theirs = getattr(K, name)(**config), getattr(diffusers, name)(**config)
    for s in (ours, theirs):
        s.set_timesteps(steps)
    theirs.sigmas = theirs.sigmas.double()
    compared = 0
    for i in range(first, steps):
        t = inputs(i)
        for s in (ours, theirs):
            s._step_index = i
            s.model_outputs = outputs_oldest_first(t)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = call(theirs, t)
        except FAILURES:
            expected = None
        if expected is None or not torch.isfinite(expected).all():
            try:
                got = call(ours, t)
            except ValueError as exc:
                assert "no finite update" in str(exc)
            else:
                assert torch.isfinite(got).all(), f"{name} {config} step {i}"
            continue
        got = call(ours, t)
        assert got.dtype == expected.dtype
        err = parity_error(got, expected)
        assert err < 2e-6, f"{name} {config} step {i}: {err:.2e}"
        compared += 1
    return compared


def dpm_call(order: int, name: str = "multistep", noise: bool = True):
    def call(s, t):
        outputs = outputs_oldest_first(t)
        if order == 1:
            return s.dpm_solver_first_order_update(t["o0"], sample=t["sample"], noise=t["noise"])
        method = getattr(s, f"{name}_dpm_solver_{'second' if order == 2 else 'third'}_order_update")
        return method(outputs, sample=t["sample"], **({"noise": t["noise"]} if noise else {}))
    return call


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_multistep_updates_match_diffusers(algorithm, solver_type, order):
    if algorithm == "sde-dpmsolver" and order == 3:
        pytest.skip("diffusers defines no third-order sde-dpmsolver update")
    config = dict(algorithm_type=algorithm, solver_type=solver_type, solver_order=3,
                  final_sigmas_type="zero" if algorithm.endswith("++") else "sigma_min")
    assert compare("DPMSolverMultistepScheduler", config, dpm_call(order)) >= 8 - order


@pytest.mark.parametrize("name, config", [
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)),
    ("DPMSolverMultistepInverseScheduler", dict(algorithm_type="dpmsolver++", solver_order=3)),
    ("DPMSolverMultistepInverseScheduler", dict(algorithm_type="dpmsolver", solver_order=3, solver_type="heun")),
    ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=2)),
    ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=3, solver_type="heun")),
])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_variants_updates_match_diffusers(name, config, order):
    if order > config.get("solver_order", 2):
        pytest.skip("diffusers defines no third-order update for it")
    edm = name.startswith("EDM")  # (diffusers' EDM third-order helper takes no noise)
    assert compare(name, config, dpm_call(order, noise=not (edm and order == 3))) >= 4


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver", "sde-dpmsolver++"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_singlestep_updates_match_diffusers(algorithm, solver_type, order):
    config = dict(algorithm_type=algorithm, solver_type=solver_type, solver_order=3, lower_order_final=True,
                  final_sigmas_type="sigma_min" if algorithm == "dpmsolver" else "zero")
    assert compare("DPMSolverSinglestepScheduler", config, dpm_call(order, "singlestep")) >= 8 - order

    def dispatch(s, t):
        return s.singlestep_dpm_solver_update(outputs_oldest_first(t), sample=t["sample"], order=order,
                                              noise=t["noise"])
    assert compare("DPMSolverSinglestepScheduler", config, dispatch) >= 8 - order


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_singlestep_third_order_with_a_repeated_node_matches_diffusers(solver_type):
    # exponential sigmas end at sigma_min and final_sigmas_type="sigma_min" repeats it: at step 0
    # the update wraps around to those two; diffusers' midpoint rule never reads the repeated
    # node's difference quotient and is finite there (heun's is NaN)
    config = dict(use_exponential_sigmas=True, solver_order=3, final_sigmas_type="sigma_min", solver_type=solver_type)
    assert compare("DPMSolverSinglestepScheduler", config, dpm_call(3, "singlestep")) >= 6


@pytest.mark.parametrize("config", [{}, dict(use_karras_sigmas=True), dict(prediction_type="v_prediction")])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_updates_match_diffusers(config, order):
    def call(s, t):
        if order == 1:
            return s.deis_first_order_update(t["o0"], sample=t["sample"])
        method = s.multistep_deis_second_order_update if order == 2 else s.multistep_deis_third_order_update
        return method(outputs_oldest_first(t), sample=t["sample"])
    assert compare("DEISMultistepScheduler", dict(solver_order=3, **config), call) >= 8 - order


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
def test_unipc_predictor_and_corrector_match_diffusers(solver_type, predict_x0, order, final_sigmas_type):
    config = dict(solver_type=solver_type, predict_x0=predict_x0, solver_order=3, final_sigmas_type=final_sigmas_type)

    def predictor(s, t):
        return s.multistep_uni_p_bh_update(t["new"], sample=t["sample"], order=order)

    def corrector(s, t):
        return s.multistep_uni_c_bh_update(t["new"], last_sample=t["last"], this_sample=t["sample"], order=order)
    assert compare("UniPCMultistepScheduler", config, predictor) >= 6
    # (diffusers' step corrects from its second step on; at index 0 the corrector would start
    # at sigmas[-1])
    assert compare("UniPCMultistepScheduler", config, corrector, first=1) >= 5


@pytest.mark.parametrize("algorithm", ["data_prediction", "noise_prediction"])
@pytest.mark.parametrize("tau", [0, 0.5, 1.0])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_sasolver_predictor_and_corrector_match_diffusers(algorithm, tau, order):
    config = dict(algorithm_type=algorithm, predictor_order=4, corrector_order=4, prediction_type="v_prediction")

    def predictor(s, t):
        return s.stochastic_adams_bashforth_update(t["new"], sample=t["sample"], noise=t["noise"], order=order,
                                                   tau=tau)

    def corrector(s, t):
        return s.stochastic_adams_moulton_update(t["new"], last_sample=t["last"], last_noise=t["noise"],
                                                 this_sample=t["sample"], order=order, tau=tau)
    assert compare("SASolverScheduler", config, corrector) >= 7
    assert compare("SASolverScheduler", config, predictor) >= 7


def test_the_dpm_update_helpers_give_what_step_gives():
    # the helpers and the fused step evaluate one rule: a loop stepped by hand with
    # convert_model_output and the helpers (as inversion code does) is the stepped loop
    kd = K.DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++")
    by_hand = K.DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++")
    for s in (kd, by_hand):
        s.set_timesteps(10)
    x = y = initial_sample()
    gen = torch.Generator().manual_seed(3)
    for i, t in enumerate(kd.timesteps):
        noise = torch.randn(x.shape, generator=gen)
        x = kd.step(dummy_model(x, t), t, x, variance_noise=noise).prev_sample
        by_hand._step_index = i
        converted = by_hand.convert_model_output(dummy_model(y, t), sample=y)
        by_hand.model_outputs = by_hand.model_outputs[1:] + [converted]
        order = min(i + 1, 3, 10 - i)  # diffusers' warm-up, and lower_order_final below 15 steps
        if order == 1:
            y = by_hand.dpm_solver_first_order_update(converted, sample=y, noise=noise)
        elif order == 2:
            y = by_hand.multistep_dpm_solver_second_order_update(by_hand.model_outputs, sample=y, noise=noise)
        else:
            y = by_hand.multistep_dpm_solver_third_order_update(by_hand.model_outputs, sample=y, noise=noise)
        assert parity_error(y, x) < 5e-6, i


def test_the_sasolver_update_helpers_give_what_step_gives():
    # diffusers' step: the corrector (from the second step on), then the predictor, each from
    # the helpers; predictor order 4 reads four outputs
    config = dict(predictor_order=4, corrector_order=3, tau_func=lambda t: 0.7)
    kd, by_hand = K.SASolverScheduler(**config), K.SASolverScheduler(**config)
    for s in (kd, by_hand):
        s.set_timesteps(8)
    x = y = initial_sample()
    gen = torch.Generator().manual_seed(5)
    last = None
    for i, t in enumerate(kd.timesteps):
        noise = torch.randn(x.shape, generator=gen)
        x = kd.step(dummy_model(x, t), t, x, variance_noise=noise).prev_sample
        by_hand._step_index = i
        converted = by_hand.convert_model_output(dummy_model(y, t), sample=y)
        if last is not None:
            y = by_hand.stochastic_adams_moulton_update(converted, last_sample=last[0], last_noise=last[1],
                                                        this_sample=y, order=min(i + 1, 3), tau=0.7)
        by_hand.model_outputs = by_hand.model_outputs[1:] + [converted]
        last = (y, noise)
        y = by_hand.stochastic_adams_bashforth_update(converted, sample=y, noise=noise, order=min(i + 1, 4, 8 - i),
                                                      tau=0.7)
        assert parity_error(y, x) < 5e-6, i


@pytest.mark.parametrize("predict_x0", [True, False])
def test_the_unipc_update_helpers_give_what_step_gives(predict_x0):
    # diffusers' step: the corrector (from the second step on), then the predictor
    kd = K.UniPCMultistepScheduler(solver_order=3, predict_x0=predict_x0)
    by_hand = K.UniPCMultistepScheduler(solver_order=3, predict_x0=predict_x0)
    for s in (kd, by_hand):
        s.set_timesteps(8)
    x = y = initial_sample()
    last, last_order = None, None
    for i, t in enumerate(kd.timesteps):
        x = kd.step(dummy_model(x, t), t, x).prev_sample
        by_hand._step_index = i
        converted = by_hand.convert_model_output(dummy_model(y, t), sample=y)
        if last is not None:
            y = by_hand.multistep_uni_c_bh_update(converted, last_sample=last, this_sample=y, order=last_order)
        by_hand.model_outputs = by_hand.model_outputs[1:] + [converted]
        last, last_order = y, min(i + 1, 3, 8 - i)  # warm-up, and lower_order_final
        y = by_hand.multistep_uni_p_bh_update(converted, sample=y, order=last_order)
        assert parity_error(y, x) < 5e-6, i


def test_update_helpers_keep_diffusers_dtypes():
    kd = K.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    kd.set_timesteps(10)
    kd.set_begin_index(3)
    kd._step_index = 3
    x = initial_sample(SHAPE, torch.float16)
    m = x.float()
    # promoted as diffusers' arithmetic promotes: float16 sample, float32 output and noise
    assert kd.dpm_solver_first_order_update(m, sample=x, noise=m).dtype == torch.float32
    assert kd.dpm_solver_first_order_update(x, sample=x, noise=x).dtype == torch.float16
    # the last step into sigma 0: the sample's coefficient is 0, and it still promotes, as in diffusers
    last = K.DPMSolverMultistepScheduler()
    last.set_timesteps(10)
    last._step_index = 9
    assert last.dpm_solver_first_order_update(x, sample=m).dtype == torch.float32
    uni = K.UniPCMultistepScheduler()
    uni.set_timesteps(10)
    uni._step_index = 3
    uni.model_outputs = [m, m]
    # UniPC casts its result to the sample's dtype, as diffusers does
    assert uni.multistep_uni_p_bh_update(m, sample=x, order=2).dtype == torch.float16
    assert uni.multistep_uni_c_bh_update(m, last_sample=x, this_sample=x, order=2).dtype == torch.float16


def test_update_helpers_refuse_bad_calls_by_name():
    kd = K.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    x = initial_sample(SHAPE)
    with pytest.raises(ValueError, match="needs a step index"):
        kd.dpm_solver_first_order_update(x, sample=x, noise=x)
    kd.set_timesteps(10)
    kd._step_index = 2
    with pytest.raises(ValueError, match="missing `sample`"):
        kd.dpm_solver_first_order_update(x, noise=x)
    with pytest.raises(ValueError, match="`noise` is required by algorithm_type='sde-dpmsolver"):
        kd.dpm_solver_first_order_update(x, sample=x)
    with pytest.raises(ValueError, match="the last 2 converted model outputs, got a list of 1"):
        kd.multistep_dpm_solver_second_order_update([x], sample=x, noise=x)
    with pytest.raises(ValueError, match=r"needs `model_output_list\[-2\]`, which is None"):
        kd.multistep_dpm_solver_second_order_update([None, x], sample=x, noise=x)
    with pytest.raises(TypeError, match="unexpected keyword arguments: smaple"):
        kd.dpm_solver_first_order_update(x, smaple=x, noise=x)
    kd._step_index = 10
    with pytest.raises(IndexError, match="past the end of the 10-step schedule"):
        kd.dpm_solver_first_order_update(x, sample=x, noise=x)
    uni = K.UniPCMultistepScheduler()
    uni.set_timesteps(10)
    uni._step_index = 2
    with pytest.raises(ValueError, match="missing `order`"):
        uni.multistep_uni_p_bh_update(x, sample=x)
    with pytest.raises(ValueError, match=r"order must be one of \(1, 2, 3\), got 4"):
        uni.multistep_uni_p_bh_update(x, sample=x, order=4)
    uni.set_timesteps(1)
    uni._step_index, uni.model_outputs = 0, [x, x, x]
    with pytest.raises(IndexError, match=r"reads sigmas\[-3\], before the start of the 1-step schedule"):
        uni.multistep_uni_c_bh_update(x, last_sample=x, this_sample=x, order=3)
    sa = K.SASolverScheduler()
    sa.set_timesteps(10)
    sa._step_index = 2
    with pytest.raises(ValueError, match="order must be one of"):
        sa.stochastic_adams_bashforth_update(x, sample=x, noise=x, order=5, tau=1)
    with pytest.raises(ValueError, match="tau must be a finite number"):
        sa.stochastic_adams_bashforth_update(x, sample=x, noise=x, order=1, tau=float("nan"))


def test_update_helpers_take_diffusers_deprecated_positional_forms():
    kd = K.DPMSolverMultistepScheduler()
    kd.set_timesteps(10)
    kd._step_index = 4
    x, m = initial_sample(SHAPE), initial_sample(SHAPE, seed=1)
    expected = kd.dpm_solver_first_order_update(m, sample=x)
    t = kd.timesteps[4]
    with pytest.warns(FutureWarning, match="passing `timestep` is deprecated"):
        assert torch.equal(kd.dpm_solver_first_order_update(m, t, kd.timesteps[5], x), expected)
    uni = K.UniPCMultistepScheduler()
    uni.set_timesteps(10)
    uni._step_index = 4
    uni.model_outputs = [m, m * 0.5]
    expected = uni.multistep_uni_c_bh_update(m, last_sample=x, this_sample=x, order=2)
    with pytest.warns(FutureWarning, match="passing `this_timestep` is deprecated"):
        assert torch.equal(uni.multistep_uni_c_bh_update(m, t, x, x, 2), expected)


def test_unipc_predictor_with_solver_p_delegates_like_diffusers():
    config = dict(solver_order=2)
    ours, theirs = K.UniPCMultistepScheduler(**config), diffusers.UniPCMultistepScheduler(**config)
    ours.solver_p, theirs.solver_p = K.DDIMScheduler(), diffusers.DDIMScheduler()
    x, m = initial_sample(SHAPE), initial_sample(SHAPE, seed=1)
    for s in (ours, theirs):
        s.set_timesteps(10)
        s.solver_p.set_timesteps(10)
        s.step(m, s.timesteps[0], x)
    got = ours.multistep_uni_p_bh_update(m, sample=x, order=2)
    expected = theirs.multistep_uni_p_bh_update(m, sample=x, order=2)
    assert parity_error(got, expected) < 1e-6


@pytest.mark.parametrize("config", [dict(), dict(prediction_type="v_prediction", predict_x0=False),
                                    dict(solver_type="bh1", use_dynamic_shifting=True)])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_helios_predictor_and_corrector_match_diffusers(config, order):
    ours, theirs = K.HeliosScheduler(**config), diffusers.HeliosScheduler(**config)
    for s in (ours, theirs):
        s.set_timesteps(6, 1, mu=0.8 if config.get("use_dynamic_shifting") else None)
    for i in range(1, 6):
        t = inputs(i)
        for s in (ours, theirs):
            s._step_index = i
            s.model_outputs = outputs_oldest_first(t)[2:]
        f64 = torch.float64  # (diffusers' Helios solves in its sigmas' dtype; they are float64 here)
        explicit = dict(sigma=torch.tensor(0.61, dtype=f64), sigma_next=torch.tensor(0.47, dtype=f64))
        for kwargs in ({}, explicit):
            got = ours.multistep_uni_p_bh_update(t["new"], sample=t["sample"], order=order, **kwargs)
            expected = theirs.multistep_uni_p_bh_update(t["new"], sample=t["sample"], order=order, **kwargs)
            assert parity_error(got, expected) < 2e-6
        explicit = dict(sigma_before=torch.tensor(0.61, dtype=f64), sigma=torch.tensor(0.47, dtype=f64))
        for kwargs in ({}, explicit):
            got = ours.multistep_uni_c_bh_update(t["new"], last_sample=t["last"], this_sample=t["sample"],
                                                 order=order, **kwargs)
            expected = theirs.multistep_uni_c_bh_update(t["new"], last_sample=t["last"], this_sample=t["sample"],
                                                        order=order, **kwargs)
            assert parity_error(got, expected) < 2e-6
    with pytest.raises(ValueError, match="pass both sigmas of the update or neither"):
        ours.multistep_uni_p_bh_update(t["new"], sample=t["sample"], order=1, sigma=torch.tensor(0.5))
    ours.solver_p = K.DDIMScheduler()  # (refused at construction by kdfast's Helios)
    with pytest.raises(ValueError, match="solver_p is not supported"):
        ours.multistep_uni_p_bh_update(t["new"], sample=t["sample"], order=1)


def test_sasolver_coefficient_helpers_match_diffusers():
    lambdas = [torch.tensor(v, dtype=torch.float64) for v in (-0.8, -1.3, -2.0, -2.9)]
    start, end, tau = torch.tensor(-1.3, dtype=torch.float64), torch.tensor(-0.8, dtype=torch.float64), 0.7
    for algorithm in ("data_prediction", "noise_prediction"):
        ours = K.SASolverScheduler(algorithm_type=algorithm)
        theirs = diffusers.SASolverScheduler(algorithm_type=algorithm)
        for order in range(4):
            for method, extra in (("get_coefficients_exponential_negative", ()),
                                  ("get_coefficients_exponential_positive", (tau,))):
                got = getattr(ours, method)(order, start, end, *extra)
                torch.testing.assert_close(got, getattr(theirs, method)(order, start, end, *extra), rtol=1e-13, atol=0)
            got = ours.lagrange_polynomial_coefficient(order, lambdas[:order + 1])
            expected = theirs.lagrange_polynomial_coefficient(order, lambdas[:order + 1])
            np.testing.assert_allclose(np.array(got, dtype=float), np.array(expected, dtype=float), rtol=1e-13)
        for order in range(1, 5):
            got = ours.get_coefficients_fn(order, start, end, lambdas[:order], tau)
            expected = theirs.get_coefficients_fn(order, start, end, lambdas[:order], tau)
            np.testing.assert_allclose(np.array(got, dtype=float), np.array(expected, dtype=float), rtol=1e-12)
    with pytest.raises(ValueError, match="order must be 0, 1, 2 or 3"):
        ours.get_coefficients_exponential_negative(4, start, end)


# ------------------------------------------------------------------------ schedule helpers


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler",
                                  "DEISMultistepScheduler", "SASolverScheduler", "LMSDiscreteScheduler",
                                  "DPMSolverSDEScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_sigma_spacing_helpers_match_diffusers(name):
    config = {"sigma_min": 0.05, "sigma_max": 40.0} if name == "EulerDiscreteScheduler" else {}
    ours, theirs = getattr(K, name)(**config), getattr(diffusers, name)(**config)
    sigmas = torch.linspace(14.6, 0.03, 50)
    for s in (ours, theirs):
        s.set_timesteps(12)
    for method in ("_convert_to_karras", "_convert_to_exponential", "_convert_to_beta"):
        # (diffusers' LMS and DPM-SDE take their step count for Karras sigmas from num_inference_steps)
        steps = () if name in ("LMSDiscreteScheduler", "DPMSolverSDEScheduler") and method == "_convert_to_karras" \
            else (12,)
        got, expected = getattr(ours, method)(sigmas, *steps), getattr(theirs, method)(sigmas, *steps)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-12, err_msg=method)
    if name != "FlowMatchEulerDiscreteScheduler":  # (flow matching maps sigma to t linearly)
        log_sigmas = np.log(np.linspace(0.03, 14.6, 1000))
        s = np.array([0.5, 3.0, 14.0])
        np.testing.assert_allclose(ours._sigma_to_t(s, log_sigmas), theirs._sigma_to_t(s, log_sigmas), rtol=1e-12)
        # tensors in, a tensor out (of their dtype), as diffusers' arithmetic gives
        got = ours._sigma_to_t(torch.tensor(s), torch.tensor(log_sigmas))
        expected = theirs._sigma_to_t(torch.tensor(s), torch.tensor(log_sigmas))
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


# Every scheduler with a use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas option
SPACED = [name for name in K.supported() if "use_karras_sigmas" in inspect.signature(getattr(K, name)).parameters]


@pytest.mark.parametrize("name", SPACED)
@pytest.mark.parametrize("spacing", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_spaced_schedules_read_the_configs_sigma_range_as_diffusers_does(name, spacing):
    """A sigma_min / sigma_max in the config (as EDM-style pipelines' configs carry, reaching a
    drop-in through from_config) bounds the spaced sigmas where diffusers' reads them: DPM-Solver,
    DEIS and SA-Solver ignored them; LMS and DPM-SDE ignore them for Karras sigmas, as diffusers."""
    config = {spacing: True, "sigma_min": 0.03, "sigma_max": 20.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(diffusers, name).from_config(config)
    ours = getattr(K, name).from_config(config)
    for s in (ours, theirs):
        s.set_timesteps(8)
    if name == "DPMSolverMultistepInverseScheduler":
        # diffusers descends from sigma_max to sigma_min here (no inversion); kdfast climbs
        torch.testing.assert_close(ours.sigmas[:-1], torch.flip(theirs.sigmas[:-1], [0]), rtol=1e-6, atol=0)
        assert ours.sigmas[0] == pytest.approx(0.03) and ours.sigmas[-1] == pytest.approx(20.0)
        return
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.timesteps.double(), theirs.timesteps.double(), rtol=1e-6, atol=1e-6)

def test_lu_lambdas_and_alpha_sigma_helpers_match_diffusers():
    ours, theirs = K.DPMSolverMultistepScheduler(), diffusers.DPMSolverMultistepScheduler()
    lambdas = torch.linspace(4.0, -5.0, 30)
    np.testing.assert_allclose(ours._convert_to_lu(lambdas, 9), theirs._convert_to_lu(lambdas, 9), rtol=1e-12)
    sigma = torch.tensor([0.1, 1.0, 20.0])
    for a, b in zip(ours._sigma_to_alpha_sigma_t(sigma), theirs._sigma_to_alpha_sigma_t(sigma)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
    ours, theirs = K.UniPCMultistepScheduler(**flow), diffusers.UniPCMultistepScheduler(**flow)
    for a, b in zip(ours._sigma_to_alpha_sigma_t(sigma / 30), theirs._sigma_to_alpha_sigma_t(sigma / 30)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    edm, edm_df = K.EDMDPMSolverMultistepScheduler(), diffusers.EDMDPMSolverMultistepScheduler()
    assert [int(edm._sigma_to_alpha_sigma_t(sigma)[0])] == [int(edm_df._sigma_to_alpha_sigma_t(sigma)[0])] == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_threshold_sample_matches_diffusers(dtype):
    config = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    x = (initial_sample((3, 4, 5, 5)) * 2).to(dtype)
    for name in ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                 "LCMScheduler", "TCDScheduler", "DEISMultistepScheduler", "SASolverScheduler",
                 "DPMSolverSinglestepScheduler", "EDMDPMSolverMultistepScheduler"):
        got = getattr(K, name)(**config)._threshold_sample(x)
        expected = getattr(diffusers, name)(**config)._threshold_sample(x)
        assert got.dtype == expected.dtype == dtype
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 if dtype != torch.float16 else 1e-3)


def test_flow_shift_helpers_match_diffusers():
    for name, config in [("FlowMatchEulerDiscreteScheduler", dict(shift_terminal=0.1)),
                         ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                          shift_terminal=0.1, time_shift_type="linear"))]:
        ours, theirs = getattr(K, name)(**config), getattr(diffusers, name)(**config)
        t = np.linspace(0.95, 0.05, 7)
        for exponent in (1.0, 0.6):
            np.testing.assert_allclose(ours.time_shift(0.7, exponent, t), theirs.time_shift(0.7, exponent, t),
                                       rtol=1e-15)
        np.testing.assert_allclose(ours.stretch_shift_to_terminal(t), theirs.stretch_shift_to_terminal(t), rtol=1e-15)


def test_get_config_dict_is_diffusers_deprecated_load_config(tmp_path):
    K.DDIMScheduler(clip_sample=False).save_pretrained(tmp_path)
    with pytest.warns(FutureWarning, match="get_config_dict is deprecated"):
        config = K.DDIMScheduler.get_config_dict(tmp_path)
    assert config == K.DDIMScheduler.load_config(tmp_path)


# ------------------------------------------------------------------------ the surface


# (registers a class for the Hub's remote code: a custom diffusers model's business)
HUB_ONLY = {"register_for_auto_class"}


SCHEDULE_HELPERS = ("_convert_to_karras", "_convert_to_exponential", "_convert_to_beta", "_convert_to_lu",
                    "_sigma_to_t", "_sigma_to_alpha_sigma_t", "_threshold_sample", "time_shift",
                    "stretch_shift_to_terminal")


@pytest.mark.parametrize("name", sorted(K.supported()))
def test_every_public_method_of_diffusers_exists_with_its_parameters(name):
    theirs = getattr(diffusers, name, None)
    if theirs is None:
        pytest.skip(f"this diffusers has no {name}")
    ours = getattr(K, name)
    for method in dir(theirs):
        if method.startswith("_") or method in HUB_ONLY or not callable(getattr(theirs, method)):
            continue
        assert hasattr(ours, method), f"{name}.{method}"
        if method.endswith("_update"):
            ours_params = list(inspect.signature(getattr(ours, method)).parameters)
            theirs_params = list(inspect.signature(getattr(theirs, method)).parameters)
            assert ours_params == theirs_params, f"{name}.{method}"
    # the schedule helpers pipelines call: where diffusers has one, kdfast's takes the same
    # parameters (flow schedulers' _sigma_to_t takes a sigma alone, LMS' _convert_to_karras no
    # step count); helpers diffusers' class lacks may be inherited, but must work (Helios has no
    # shift_terminal, so no stretch_shift_to_terminal)
    for method in SCHEDULE_HELPERS:
        if hasattr(theirs, method):
            assert hasattr(ours, method), f"{name}.{method}"
            assert list(inspect.signature(getattr(ours, method)).parameters) == \
                list(inspect.signature(getattr(theirs, method)).parameters), f"{name}.{method}"
    if "shift_terminal" not in inspect.signature(ours.__init__).parameters:
        assert not hasattr(ours, "stretch_shift_to_terminal"), name
    assert hasattr(ours(), "multistep_dpm_solver_third_order_update") == \
        hasattr(theirs, "multistep_dpm_solver_third_order_update"), name  # (Cosine's inherited one is hidden)
