import itertools
import re
import warnings

import numpy as np
import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler
from kdfast.schedulers.dpmsolver_multistep_inverse import DPMSolverMultistepInverseScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

KD = DPMSolverMultistepInverseScheduler


class DF(diffusers.DPMSolverMultistepInverseScheduler):
    """diffusers' class, with the ``set_begin_index`` it lacks (run_loop's ``begin_index``): its
    value lookup of a repeated first timestep starts at the second match and runs off the end."""

    def set_begin_index(self, begin_index=0):
        self._step_index = begin_index


@pytest.fixture(autouse=True)
def _quiet_deprecations():
    with warnings.catch_warnings():  # diffusers deprecates algorithm_type dpmsolver / sde-dpmsolver
        warnings.simplefilter("ignore", FutureWarning)
        yield


def loop(scheduler, steps, x, noises=None, float64=False):
    """A loop from the first timestep, the SDE noise given (``noises``, float32 draws); with
    ``float64``, diffusers' loop computed in float64 (its sigmas are float32 numbers): the truth
    that both libraries' float32 loops approximate."""
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)
    if float64:
        scheduler.sigmas, x = scheduler.sigmas.double(), x.double()
    for i, t in enumerate(scheduler.timesteps):
        noise = {} if noises is None else {"variance_noise": noises[i].to(x.dtype)}
        x = scheduler.step(dummy_model(x, t), t, x, **noise).prev_sample
    return x


def assert_conditioned_parity(config, steps):
    """For loops whose first steps multiply float32 rounding by sigma_1 / sigma_0 (up to 10^4
    here), where diffusers' own error exceeds 1e-5: kdfast's error against the float64 truth is
    at most 2x diffusers' (the tolerance rule of DESIGN.md)."""
    x = initial_sample()
    gen = torch.Generator().manual_seed(0)
    noises = [torch.randn(x.shape, generator=gen) for _ in range(steps + 1)]
    got = loop(KD(**config), steps, x, noises)
    expected = loop(DF(**config), steps, x, noises)
    truth = loop(DF(**config), steps, x, noises, float64=True)
    err, own = parity_error(got, truth), parity_error(expected, truth)
    assert torch.isfinite(got).all() and err <= 2 * own + 1e-6, (err, own)
    assert parity_error(got, expected) <= 1e-4


@pytest.mark.parametrize("algorithm_type,solver_order,solver_type", list(
    itertools.product(("dpmsolver++", "dpmsolver"), (1, 2, 3), ("midpoint", "heun"))))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [8, 20])
def test_parity_orders_and_algorithms(algorithm_type, solver_order, solver_type, prediction_type, steps):
    config = dict(algorithm_type=algorithm_type, solver_order=solver_order, solver_type=solver_type,
                  prediction_type=prediction_type)
    if algorithm_type == "dpmsolver++" and prediction_type == "v_prediction":
        # x0 = alpha x - sigma v, then (sigma_1 / sigma_0) x - (...) x0 from sigma_0 = 0.01:
        # diffusers' own float32 error is 0.5-1.5e-5 at every step count (kdfast's 1-5e-6)
        assert_conditioned_parity(config, steps)
    else:
        assert_parity(KD, DF, config, steps=steps)


@pytest.mark.parametrize("algorithm_type,prediction_type,solver_order", [
    *itertools.product(("dpmsolver++", "sde-dpmsolver++"), ("flow_prediction", "epsilon"), (1, 2)),
    ("dpmsolver++", "flow_prediction", 3), ("dpmsolver", "epsilon", 2), ("sde-dpmsolver", "epsilon", 2)])
@pytest.mark.parametrize("steps", [6, 12])
def test_parity_flow_sigmas_and_sde_noise(algorithm_type, prediction_type, solver_order, steps):
    # diffusers' inverse scheduler keeps the forward, descending flow schedule, where its SDE
    # variants are defined: the noise is drawn as diffusers draws it, from the same generator.
    config = dict(use_flow_sigmas=True, flow_shift=3.0, algorithm_type=algorithm_type,
                  prediction_type=prediction_type, solver_order=solver_order)
    got, _ = assert_parity(KD, DF, config, steps=steps)
    if algorithm_type.startswith("sde"):
        other = run_loop(KD(**config), steps, initial_sample(), seed=1)
        assert parity_error(other, got) > 1e-3  # the noise follows the generator


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("steps", [5, 10, 25, 50])
def test_parity_sigma_schedules(sigmas, steps):
    # begin_index=0: exponential and beta timesteps may repeat the first one (see
    # test_a_repeated_first_timestep_does_not_break_the_step_index)
    assert_parity(KD, DF, {sigmas: True, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                  steps=steps, begin_index=0)


@pytest.mark.parametrize("config,steps", [
    (dict(use_beta_sigmas=True), 5), (dict(use_beta_sigmas=True), 10), (dict(use_exponential_sigmas=True), 5),
    (dict(use_karras_sigmas=True, solver_order=3), 5), ({}, 1), ({}, 2), (dict(prediction_type="v_prediction"), 3),
    (dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"), 25),
    (dict(use_flow_sigmas=True, flow_shift=3.0, algorithm_type="sde-dpmsolver", prediction_type="v_prediction"), 6),
])
def test_parity_of_ill_conditioned_loops_against_the_float64_truth(config, steps):
    # (sigma 0.01 to 7.9 in the first beta step: diffusers' own float32 error is up to 6e-5 here)
    assert_conditioned_parity(config, steps)


def test_a_repeated_first_timestep_does_not_break_the_step_index():
    config = dict(use_exponential_sigmas=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x = initial_sample()
    kd = KD(**config)
    kd.set_timesteps(20)
    assert kd.timesteps[0] == kd.timesteps[1] == 0  # (0.0 and 0.4 truncated)
    with pytest.raises(IndexError):  # diffusers finds the repeated value at its second match
        run_loop(DF(**config), 20, x)
    got = run_loop(KD(**config), 20, x)  # kdfast knows which element it was given
    assert parity_error(got, run_loop(DF(**config), 20, x, begin_index=0)) <= 1e-5


@pytest.mark.parametrize("spacing,lower_order_final,euler_at_final,steps", [
    *itertools.product(("linspace", "leading"), (True, False), (False, True), (9, 16)),
    # trailing ends at the noisiest timestep, whose sigma set_timesteps appends again: a last step of
    # length zero, where diffusers' third order is NaN (see test_zero_length_last_step_...)
    ("trailing", True, False, 10), ("trailing", False, True, 10), ("trailing", False, True, 16),
    ("linspace", True, False, 14), ("linspace", True, False, 15)])  # (lower_order_final: below 15 steps)
def test_parity_spacing_and_final_step(spacing, lower_order_final, euler_at_final, steps):
    assert_parity(KD, DF, dict(timestep_spacing=spacing, steps_offset=1, solver_order=3,
                               lower_order_final=lower_order_final, euler_at_final=euler_at_final), steps=steps)


@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_parity_dynamic_thresholding(solver_order):
    got, _ = assert_parity(KD, DF, dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9,
                                        solver_order=solver_order, prediction_type="sample"), steps=15)
    plain = run_loop(KD(solver_order=solver_order, prediction_type="sample"), 15, initial_sample())
    assert parity_error(got, plain) > 1e-3  # the thresholding did something
    assert_parity(KD, DF, dict(thresholding=True, algorithm_type="dpmsolver", sample_max_value=2.0,
                               solver_order=solver_order), steps=15)


@pytest.mark.parametrize("config", [
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="leading", steps_offset=1),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"),
    dict(trained_betas=np.linspace(0.0001, 0.02, 1000).tolist()),
    dict(num_train_timesteps=500, solver_order=3),
    dict(algorithm_type="deis", solver_type="bh2"),  # normalised to dpmsolver++ / midpoint, as in diffusers
])
def test_parity_other_configs(config):
    assert_parity(KD, DF, config, steps=10)


def test_learned_variance_outputs_keep_the_mean():
    outs = []
    for s in (DF(variance_type="learned_range"), KD(variance_type="learned_range")):
        s.set_timesteps(8)
        x = initial_sample((2, 3, 8, 8))
        for t in s.timesteps:
            m = dummy_model(x, t)
            x = s.step(torch.cat([m, -m], dim=1), t, x).prev_sample  # [mean, variance] channels
        outs.append(x)
    assert parity_error(outs[1], outs[0]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(solver_order=2), dict(solver_order=3, prediction_type="v_prediction"),
                                    dict(use_flow_sigmas=True, algorithm_type="sde-dpmsolver++",
                                         prediction_type="flow_prediction")])
def test_half_precision_keeps_dtype_and_matches(dtype, config):
    assert_parity(KD, DF, config, steps=12, dtype=dtype)


@pytest.mark.parametrize("config", [{}, dict(solver_order=3, algorithm_type="dpmsolver"),
                                    dict(use_flow_sigmas=True, algorithm_type="sde-dpmsolver++",
                                         prediction_type="flow_prediction")])
def test_fused_guidance_matches_guidance_combined_outside(config):
    got, _ = assert_parity(KD, DF, config, steps=12, guidance_scale=2.5)
    unfused = run_loop(KD(**config), 12, initial_sample(), guidance_scale=2.5, fused_cfg=False)
    assert parity_error(got, unfused) <= 1e-6
    assert parity_error(got, run_loop(KD(**config), 12, initial_sample())) > 1e-3


@pytest.mark.parametrize("config", [dict(solver_order=3, thresholding=True, prediction_type="sample"),
                                    dict(use_flow_sigmas=True, algorithm_type="sde-dpmsolver++")])
def test_one_fused_pass_per_step_and_no_host_reads(monkeypatch, config):
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(1) or real(*a))
    kd = KD(**config)
    kd.set_timesteps(10)
    x = initial_sample()
    outputs = [dummy_cfg(x, t) for t in kd.timesteps]
    gen = torch.Generator().manual_seed(0)
    with no_host_reads():
        for t, (u, c) in zip(kd.timesteps, outputs):
            x = kd.step_cfg(u, c, 2.0, t, x, generator=gen).prev_sample
    assert len(calls) == 10 and torch.isfinite(x).all() and kd.step_index == 10


def test_model_outputs_set_from_outside():
    df, kd = DF(solver_order=3), KD(solver_order=3)
    x = initial_sample()
    past = [initial_sample(seed=s) * 0.3 for s in (1, 2, 3)]
    outs = []
    for s in (df, kd):  # resume mid-schedule with a third-order history supplied by the caller
        s.set_timesteps(20)
        s.set_begin_index(5)
        s.model_outputs = [p.clone() for p in past]
        s.lower_order_nums = 3
        y = x
        for t in s.timesteps[5:9]:
            y = s.step(dummy_model(y, t), t, y).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) <= 1e-5


def test_convert_model_output_and_add_noise_match():
    for config in (dict(thresholding=True, prediction_type="sample", sample_max_value=1.5),
                   dict(algorithm_type="dpmsolver", prediction_type="v_prediction")):
        outs = []
        for s in (DF(**config), KD(**config)):
            s.set_timesteps(10)
            x = initial_sample()
            for t in s.timesteps[:2]:
                x = s.step(dummy_model(x, t), t, x).prev_sample
            outs.append(s.convert_model_output(dummy_model(x, s.timesteps[2]), sample=x))
        assert parity_error(outs[1], outs[0]) <= 1e-5
    df, kd = DF(), KD()
    for s in (df, kd):
        s.set_timesteps(20)
    x, n = initial_sample(), initial_sample(seed=5)
    t = df.timesteps[[3, 7]]
    torch.testing.assert_close(kd.add_noise(x, n, t), df.add_noise(x, n, t))


def _exact(x, sigma, x_star):
    """Epsilon of a model exact for a one-point data set {x_star}, at VP noise level sigma."""
    alpha = (1 + sigma**2) ** -0.5
    return (x - alpha * x_star) / (sigma * alpha)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("steps", [10, 25])
def test_inversion_then_dpm_solver_returns_to_the_start(algorithm_type, solver_order, steps):
    # For a model exact for a one-point data set, every DPM-Solver update is exact (x0 stays
    # put, epsilon is constant along the path): the forward scheduler, ending at the same
    # least noisy sigma, brings the inverted noise back to the start.
    config = dict(algorithm_type=algorithm_type, solver_order=solver_order)
    inv, fwd = KD(**config), DPMSolverMultistepScheduler(final_sigmas_type="sigma_min", **config)
    inv.set_timesteps(steps)
    fwd.set_timesteps(steps)
    assert inv.sigmas[0] == fwd.sigmas[-1] and inv.sigmas[-1] == fwd.sigmas[0]
    x_star, eps0 = initial_sample(seed=1).double().clamp(-1, 1), initial_sample(seed=2).double()
    sigma0 = inv.sigmas[0].double()
    start = ((x_star + sigma0 * eps0) / (1 + sigma0**2) ** 0.5).float()
    x = start
    for i, t in enumerate(inv.timesteps):
        x = inv.step(_exact(x.double(), inv.sigmas[i].double(), x_star).float(), t, x).prev_sample
    top = inv.sigmas[-1].double()
    assert parity_error(x, (x_star + top * eps0) / (1 + top**2) ** 0.5) < 1e-4  # on the exact path
    for i, t in enumerate(fwd.timesteps):
        x = fwd.step(_exact(x.double(), fwd.sigmas[i].double(), x_star).float(), t, x).prev_sample
    assert parity_error(x, start) < 1e-4


def test_config_round_trip_and_save_load(tmp_path):
    kd = KD(solver_order=3, use_karras_sigmas=True, beta_schedule="scaled_linear", lambda_min_clipped=-5.0)
    assert sorted(settings(kd.config)) == sorted(settings(DF().config))
    kd.save_pretrained(tmp_path)
    again = KD.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)  # diffusers loads what kdfast saved, and kdfast diffusers'
    assert settings(df.config) == settings(kd.config)
    df.save_pretrained(tmp_path / "df")
    back = KD.from_pretrained(tmp_path / "df")
    assert settings(back.config) == settings(kd.config)
    x = initial_sample()
    assert parity_error(run_loop(back, 10, x, begin_index=0), run_loop(df, 10, x, begin_index=0)) <= 1e-5
    # pipelines make the inverse scheduler from the forward one's config (its extra keys stay, unused)
    forward = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", final_sigmas_type="sigma_min",
                                                    use_lu_lambdas=False)
    inv, unused = KD.from_config(forward.config, return_unused_kwargs=True)
    assert inv.config.beta_schedule == "scaled_linear" and "final_sigmas_type" in unused
    assert parity_error(run_loop(inv, 10, x), run_loop(DF.from_config(forward.config), 10, x)) <= 1e-5


def test_attributes_like_diffusers():
    kd, df = KD(use_karras_sigmas=True), DF(use_karras_sigmas=True)
    assert torch.equal(kd.timesteps, df.timesteps) and kd.timesteps.dtype == df.timesteps.dtype == torch.float32
    for name in ("betas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t", "sigmas"):
        assert torch.equal(getattr(kd, name), getattr(df, name)), name
    assert kd.use_karras_sigmas and not kd.use_beta_sigmas and not kd.use_exponential_sigmas
    assert kd.order == df.order == 1 and len(kd) == 1000 and kd.init_noise_sigma == 1.0
    assert kd.num_inference_steps is None and kd.step_index is None and kd.model_outputs == [None, None]
    for config in ({}, dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2")):
        kd, df = KD(**config), DF(**config)
        kd.set_timesteps(10)
        df.set_timesteps(10)
        assert kd.noisiest_timestep == df.noisiest_timestep and kd.num_inference_steps == df.num_inference_steps
        assert torch.equal(kd.sigmas, df.sigmas) and torch.equal(kd.timesteps, df.timesteps)
    stock = diffusers.DPMSolverMultistepInverseScheduler()  # (DF is a subclass of another name)
    assert {c.__name__ for c in KD().compatibles} == {c.__name__ for c in stock.compatibles}


def test_steps_and_tuple_output():
    kd = KD()
    kd.set_timesteps(5)
    x = initial_sample()
    out = kd.step(dummy_model(x, kd.timesteps[0]), kd.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and kd.step_index == 1 and kd.lower_order_nums == 1
    kd.set_timesteps(5)  # a timestep not in the schedule takes the last step, as in diffusers
    df = DF()
    df.set_timesteps(5)
    for s in (kd, df):
        s.step(x, 501, x)
    assert kd.step_index == df.step_index == 5


def test_as_many_steps_as_training_timesteps_stays_finite_where_diffusers_gives_nan():
    # linspace over 1000 training timesteps repeats one: its sigma is taken twice (a zero-length
    # step), and the next second-order step divides by zero in diffusers (NaN from there on).
    # kdfast takes the highest order defined there; the timesteps and sigmas are diffusers'.
    df, kd = DF(), KD()
    x = initial_sample((1, 1, 4, 4))
    for s in (df, kd):
        s.set_timesteps(1000)
    assert torch.equal(kd.timesteps, df.timesteps) and torch.equal(kd.sigmas, df.sigmas)
    assert len(kd.timesteps) == 999 and len(kd.sigmas) == 1001
    trajectories = []
    for s in (df, kd):
        y, path = x, []
        for t in s.timesteps:
            y = s.step(dummy_model(y, t), t, y).prev_sample
            path.append(y)
        trajectories.append(path)
    df_path, kd_path = trajectories
    assert not torch.isfinite(df_path[-1]).all() and torch.isfinite(kd_path[-1]).all()
    first_nan = next(i for i, y in enumerate(df_path) if not torch.isfinite(y).all())
    assert kd.sigmas[first_nan - 1] == kd.sigmas[first_nan]  # the step after the zero-length one
    assert parity_error(kd_path[first_nan - 1], df_path[first_nan - 1]) <= 1e-5


@pytest.mark.parametrize("config", [dict(use_karras_sigmas=True, solver_type="heun", lower_order_final=False),
                                    dict(use_karras_sigmas=True, solver_order=3, lower_order_final=False),
                                    dict(use_exponential_sigmas=True, solver_order=3, solver_type="heun"),
                                    dict(use_flow_sigmas=True, solver_order=3),
                                    dict(timestep_spacing="trailing", solver_order=3),
                                    dict(timestep_spacing="trailing", solver_type="heun", lower_order_final=False)])
def test_zero_length_last_step_stays_finite_where_diffusers_gives_nan(config):
    # These schedules repeat their last sigma: the last step has length zero, and at second
    # order (heun) or third order diffusers divides 0 by 0. kdfast leaves the sample as it is.
    steps = 16
    expected = run_loop(DF(**config), steps, initial_sample(), begin_index=0)
    assert not torch.isfinite(expected).all()
    kd = KD(**config)
    kd.set_timesteps(steps)
    assert kd.sigmas[-1] == kd.sigmas[-2]
    x = initial_sample()
    for t in kd.timesteps:
        before = x
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    df = DF(**config)  # and every step before it is diffusers'
    df.set_timesteps(steps)
    df.set_begin_index(0)
    y = initial_sample()
    for t in df.timesteps[:-1]:
        y = df.step(dummy_model(y, t), t, y).prev_sample
    assert parity_error(before, y) <= 1e-5


@pytest.mark.parametrize("algorithm_type", ["sde-dpmsolver++", "sde-dpmsolver"])
def test_sde_variants_up_the_noise_schedule_raise_where_diffusers_gives_nan(algorithm_type):
    # Going up the noise schedule (h < 0) the SDE noise variance 1 - exp(-2h) is negative.
    assert torch.isnan(run_loop(DF(algorithm_type=algorithm_type), 10, initial_sample())).all()
    for config in ({}, dict(use_karras_sigmas=True)):
        kd = KD(algorithm_type=algorithm_type, **config)
        with pytest.raises(ValueError, match=re.escape(f"algorithm_type='{algorithm_type}' cannot step up")):
            kd.set_timesteps(10)


@pytest.mark.parametrize("algorithm_type", ["sde-dpmsolver++", "sde-dpmsolver"])
def test_third_order_sde_steps_raise_where_diffusers_fails(algorithm_type):
    config = dict(use_flow_sigmas=True, algorithm_type=algorithm_type, solver_order=3)
    with pytest.raises((AssertionError, UnboundLocalError)):  # diffusers passes no noise to its 3rd order
        run_loop(DF(**config), 8, initial_sample())
    kd = KD(**config)
    with pytest.raises(ValueError, match=re.escape(f"solver_order=3 with algorithm_type='{algorithm_type}'")
                       + ".*step 2"):
        run_loop(kd, 8, initial_sample())
    assert kd.step_index == 2 and kd.lower_order_nums == 2  # nothing of the failed step was kept
    # with 4 steps or fewer, lower_order_final never reaches third order: as diffusers
    assert_parity(KD, DF, config, steps=4)


def test_flow_sigmas_with_spaced_sigmas_are_refused_where_diffusers_gives_nan():
    config = dict(use_flow_sigmas=True, use_karras_sigmas=True)
    assert not torch.isfinite(run_loop(DF(**config), 8, initial_sample(), begin_index=0)).all()
    with pytest.raises(ValueError, match="use_flow_sigmas=True cannot be combined with use_karras_sigmas"):
        KD(**config)


def test_bad_config_values_are_named():
    for name, value in (("algorithm_type", "nope"), ("prediction_type", "eps"), ("solver_type", "rk4"),
                        ("timestep_spacing", "uniform"), ("beta_schedule", "cosine")):
        with pytest.raises(ValueError, match=f"{name}='{value}'"):
            KD(**{name: value})
    with pytest.raises(ValueError, match="solver_order"):
        KD(solver_order=4)
    with pytest.raises(ValueError, match="Only one of"):
        KD(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        KD(dynamic_thresholding_ratio=1.5)
    with pytest.raises(ValueError, match="flow_prediction"):  # diffusers raises in the step
        KD(prediction_type="flow_prediction", algorithm_type="dpmsolver")
    with pytest.raises(TypeError):
        KD(final_sigmas_type="zero")  # the forward scheduler's option: not one of this class


def test_bad_step_input():
    kd = KD()
    x = initial_sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, 0, x)
    for n in (0, None):
        with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
            kd.set_timesteps(n)
    kd.set_timesteps(5)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), kd.timesteps[0], x)
    with pytest.raises(TypeError, match="bogus"):
        kd.step(x, kd.timesteps[0], x, bogus=1)
    with pytest.raises(ValueError, match="generator: got a list of 3 generators for a batch of 2"):
        sde = KD(use_flow_sigmas=True, algorithm_type="sde-dpmsolver++")
        sde.set_timesteps(4)
        sde.step(x, sde.timesteps[0], x, generator=[torch.Generator() for _ in range(3)])
    assert kd.step_index in (None, 0)  # (found from the first timestep; nothing was stepped)
    for t in kd.timesteps:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    import copy
    import pickle

    s = KD(solver_order=3)
    s.set_timesteps(10)
    x = initial_sample()
    for t in s.timesteps[:3]:
        x = s.step(dummy_model(x, t), t, x).prev_sample
    twin = copy.deepcopy(s) if how == "deepcopy" else pickle.loads(pickle.dumps(s))
    assert dict(twin.config) == dict(s.config) and twin.step_index == s.step_index == 3
    for t_s, t_twin in zip(s.timesteps[3:], twin.timesteps[3:]):
        m = dummy_model(x, t_s)
        a, b = s.step(m, t_s, x).prev_sample, twin.step(m, t_twin, x).prev_sample
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        x = a


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sde_noise_is_drawn_in_the_model_output_dtype_like_diffusers(dtype):
    # (diffusers' forward scheduler draws float32 noise; its inverse one draws the model output's dtype)
    config = dict(use_flow_sigmas=True, algorithm_type="sde-dpmsolver++")
    x = initial_sample(dtype=dtype)
    outs = []
    for given in (False, True):
        kd = KD(**config)
        kd.set_timesteps(6)
        t = kd.timesteps[0]
        gen = torch.Generator().manual_seed(3)
        noise = dict(variance_noise=torch.randn(x.shape, generator=gen, dtype=dtype)) if given else dict(generator=gen)
        outs.append(kd.step(dummy_model(x, t), t, x, **noise).prev_sample)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
