import itertools
import re

import pytest
import torch

from kdfast.schedulers import DPMSolverMultistepScheduler
from parity import (
    assert_parity, diffusers, dummy_model, initial_sample, no_host_reads, parity_error, run_loop, settings)

DF = diffusers.DPMSolverMultistepScheduler


@pytest.mark.parametrize("algorithm_type,solver_order,solver_type", [
    c for c in itertools.product(("dpmsolver++", "sde-dpmsolver++"), (1, 2, 3), ("midpoint", "heun"))
])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parity_orders_and_algorithms(algorithm_type, solver_order, solver_type, prediction_type):
    assert_parity(DPMSolverMultistepScheduler, DF, dict(algorithm_type=algorithm_type, solver_order=solver_order,
                                                        solver_type=solver_type, prediction_type=prediction_type), steps=20)


@pytest.mark.parametrize("algorithm_type,solver_order", [("dpmsolver", 1), ("dpmsolver", 2), ("dpmsolver", 3),
                                                          ("sde-dpmsolver", 1), ("sde-dpmsolver", 2)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parity_noise_prediction_algorithms(algorithm_type, solver_order, prediction_type):
    assert_parity(DPMSolverMultistepScheduler, DF, dict(algorithm_type=algorithm_type, solver_order=solver_order,
                                                        prediction_type=prediction_type, final_sigmas_type="sigma_min"),
                  steps=12)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler"])
def test_third_order_steps_diffusers_lacks_are_refused_where_reached(name):
    # sde-dpmsolver's (EDM: sde-dpmsolver++'s) third order: diffusers fails at that step; this
    # ran second order, or (EDM) an update of its own, without a word
    from kdfast import schedulers as K
    config = dict(solver_order=3, algorithm_type="sde-dpmsolver" if name.startswith("DPM") else "sde-dpmsolver++",
                  **({"final_sigmas_type": "sigma_min"} if name.startswith("DPM") else {}))
    with pytest.raises((AssertionError, UnboundLocalError)):
        run_loop(getattr(diffusers, name)(**config), 8, initial_sample())
    kd = getattr(K, name)(**config)
    with pytest.raises(ValueError, match=re.escape(f"solver_order=3 with algorithm_type='{config['algorithm_type']}'")
                       + ".*step 2"):
        run_loop(kd, 8, initial_sample())
    assert kd.step_index == 2  # nothing of the failed step was kept
    # with 4 steps or fewer, lower_order_final never reaches third order: as diffusers
    assert_parity(getattr(K, name), getattr(diffusers, name), config, steps=4)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_parity_sigma_schedules(sigmas, steps):
    # begin_index=0: some of these schedules repeat a timestep near the end, where diffusers'
    # value lookup crashes (see test_duplicate_timesteps_do_not_break_the_step_index).
    assert_parity(DPMSolverMultistepScheduler, DF, {sigmas: True, "beta_schedule": "scaled_linear",
                                                    "beta_start": 0.00085, "beta_end": 0.012}, steps=steps,
                  begin_index=0)


def test_duplicate_timesteps_do_not_break_the_step_index():
    config = dict(use_beta_sigmas=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x = initial_sample()
    with pytest.raises(IndexError):  # diffusers finds the repeated timestep by value and runs off the end
        run_loop(DF(**config), 50, x)
    got = run_loop(DPMSolverMultistepScheduler(**config), 50, x)  # kdfast knows which element it was given
    expected = run_loop(DF(**config), 50, x, begin_index=0)
    assert parity_error(got, expected) < 1e-5


@pytest.mark.parametrize("algorithm_type", ["sde-dpmsolver", "sde-dpmsolver++"])
@pytest.mark.parametrize("steps", [2, 17])
def test_parity_sde_with_lu_lambdas_ending_at_sigma_min(algorithm_type, steps):
    # lu lambdas end at sigma_min, which final_sigmas_type="sigma_min" appends again, a few
    # float32 ulps off: that zero-length last step must add no noise, not refuse to run.
    assert_parity(DPMSolverMultistepScheduler, DF, dict(beta_schedule="squaredcos_cap_v2", use_lu_lambdas=True,
                                                        final_sigmas_type="sigma_min", algorithm_type=algorithm_type),
                  steps=steps, begin_index=0)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final,euler_at_final", [(True, False), (False, False), (False, True)])
def test_parity_spacing_and_final_step(spacing, final_sigmas_type, lower_order_final, euler_at_final):
    assert_parity(DPMSolverMultistepScheduler, DF, dict(timestep_spacing=spacing, steps_offset=1,
                                                        final_sigmas_type=final_sigmas_type, solver_order=3,
                                                        lower_order_final=lower_order_final,
                                                        euler_at_final=euler_at_final), steps=10)


@pytest.mark.parametrize("solver_order", [2, 3])
def test_parity_dynamic_thresholding(solver_order):
    assert_parity(DPMSolverMultistepScheduler, DF, dict(thresholding=True, sample_max_value=1.5,
                                                        dynamic_thresholding_ratio=0.9, solver_order=solver_order,
                                                        prediction_type="sample"), steps=20)
    assert_parity(DPMSolverMultistepScheduler, DF, dict(thresholding=True, algorithm_type="dpmsolver",
                                                        final_sigmas_type="sigma_min", sample_max_value=2.0), steps=15)


@pytest.mark.parametrize("config", [
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(lambda_min_clipped=-5.1, variance_type=None, beta_schedule="squaredcos_cap_v2"),
])
def test_parity_other_configs(config):
    assert_parity(DPMSolverMultistepScheduler, DF, config, steps=20, begin_index=0)


def test_parity_custom_timesteps():
    assert_parity(DPMSolverMultistepScheduler, DF, {}, steps=None, timesteps=[999, 850, 700, 500, 320, 160, 40, 5])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype_and_matches(dtype):
    assert_parity(DPMSolverMultistepScheduler, DF, dict(solver_order=2), steps=20, dtype=dtype)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
def test_fused_guidance_matches_diffusers_guidance(algorithm_type):
    assert_parity(DPMSolverMultistepScheduler, DF, dict(algorithm_type=algorithm_type), steps=20, guidance_scale=2.0)


def test_model_outputs_set_from_outside():
    df, kd = DF(solver_order=3), DPMSolverMultistepScheduler(solver_order=3)
    x = initial_sample()
    past = [initial_sample(seed=s) * 0.3 for s in (1, 2, 3)]
    for s in (df, kd):  # resume mid-schedule with a third-order history supplied by the caller
        s.set_timesteps(10)
        s.set_begin_index(5)
        s.model_outputs = [p.clone() for p in past]
        s.lower_order_nums = 3
    outs = []
    for s in (df, kd):
        y = x
        for t in s.timesteps[5:9]:
            y = s.step(dummy_model(y, t), t, y).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = DPMSolverMultistepScheduler(solver_order=3, use_karras_sigmas=True, beta_schedule="scaled_linear")
    kd.save_pretrained(tmp_path)
    again = DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    # diffusers loads what kdfast saved, and kdfast loads diffusers' config
    df = DF.from_pretrained(tmp_path)
    assert df.config.solver_order == 3 and df.config.use_karras_sigmas
    df.save_pretrained(tmp_path / "df")
    back = DPMSolverMultistepScheduler.from_pretrained(tmp_path / "df")
    assert back.config.solver_order == 3
    x = initial_sample()
    assert parity_error(run_loop(back, 10, x), run_loop(df, 10, x)) < 1e-5


def test_from_config_of_another_scheduler_ignores_foreign_keys():
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    kd = DPMSolverMultistepScheduler.from_config(euler.config)
    assert kd.config.beta_schedule == "scaled_linear" and kd.config.beta_end == 0.012


def test_set_begin_index_and_img2img_start():
    df, kd = DF(), DPMSolverMultistepScheduler()
    x = initial_sample()
    outs = []
    for s in (df, kd):
        s.set_timesteps(20)
        s.set_begin_index(8)
        y = x
        for t in s.timesteps[8:]:
            y = s.step(dummy_model(y, t), t, y).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_add_noise_matches():
    df, kd = DF(), DPMSolverMultistepScheduler()
    df.set_timesteps(20)
    kd.set_timesteps(20)
    x, n = initial_sample(), initial_sample(seed=5)
    t = df.timesteps[[3, 7]]
    torch.testing.assert_close(kd.add_noise(x, n, t), df.add_noise(x, n, t))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="algorithm_type='nope'"):
        DPMSolverMultistepScheduler(algorithm_type="nope")
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        DPMSolverMultistepScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DPMSolverMultistepScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="Only one of"):
        DPMSolverMultistepScheduler(use_karras_sigmas=True, use_beta_sigmas=True)


def test_bad_step_input():
    kd = DPMSolverMultistepScheduler()
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
    for t in kd.timesteps:
        x = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, 0, x)


def test_timestep_lookup_needs_no_host_read():
    kd = DPMSolverMultistepScheduler()
    kd.set_timesteps(10)
    x = initial_sample()
    ts = list(kd.timesteps)

    outs = []
    for t in ts:
        m = dummy_model(x, t)
        with no_host_reads():
            x = kd.step(m, t, x).prev_sample
        outs.append(x)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("config", [{}, {"solver_order": 3}, {"algorithm_type": "sde-dpmsolver++"},
                                    {"algorithm_type": "dpmsolver", "solver_type": "heun",
                                     "final_sigmas_type": "sigma_min"}])
def test_as_many_steps_as_training_timesteps_stays_finite_where_diffusers_gives_nan(config):
    # linspace over 1000 training timesteps takes one sigma twice (a zero-length step); the
    # multistep updates divide by that step's length: NaN in diffusers from there on.
    # kdfast takes the highest order defined there and equals diffusers up to it.
    df, kd = DF(**config), DPMSolverMultistepScheduler(**config)
    x = initial_sample((1, 1, 4, 4))
    paths = []
    for s in (df, kd):
        s.set_timesteps(1000)
        gen, y, path = torch.Generator().manual_seed(0), x, []
        for t in s.timesteps:
            y = s.step(dummy_model(y, t), t, y, generator=gen).prev_sample
            path.append(y)
        paths.append(path)
    df_path, kd_path = paths
    assert torch.equal(kd.sigmas, df.sigmas)
    zero_length = [i for i in range(len(kd.timesteps)) if kd.sigmas[i] == kd.sigmas[i + 1]]
    assert len(zero_length) == 1
    assert not torch.isfinite(df_path[-1]).all() and all(torch.isfinite(y).all() for y in kd_path)
    first_nan = next(i for i, y in enumerate(df_path) if not torch.isfinite(y).all())
    assert zero_length[0] <= first_nan <= zero_length[0] + 2  # (the step itself, or the next ones)
    # (500 float32 steps: their rounding adds up beyond the 1e-5 of a 50-step loop)
    assert parity_error(kd_path[first_nan - 1], df_path[first_nan - 1]) <= 1e-4
