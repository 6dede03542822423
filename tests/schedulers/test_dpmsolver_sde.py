import copy
import math
import pickle
import warnings

import pytest
import torch

import diffusers.schedulers.scheduling_dpmsolver_sde as df_module
import kdfast.sampling as kd_module
import kdfast.schedulers.base as base
from kdfast.schedulers.dpmsolver_sde import DPMSolverSDEScheduler
from parity import diffusers, dummy_cfg, dummy_model, initial_sample, parity_error, settings

DF = diffusers.DPMSolverSDEScheduler
SEED = dict(noise_sampler_seed=7)
SD = dict(beta_schedule="scaled_linear", **SEED)


@pytest.fixture(autouse=True)
def _quiet_tree_warnings():
    # diffusers' Brownian tree warns when a query time is clamped into its (rounded) interval;
    # kdfast's sampler silences that clamp, which is what both want
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Should have t[ab]", category=UserWarning)
        yield


def loop(s, steps, x, begin_index=None, guidance_scale=None, fused_cfg=False, **step_kwargs):
    """Every step's sample (diffusers' step takes no generator: the noise is the tree's)."""
    s.set_timesteps(steps)
    start = 0
    if begin_index is not None:
        s.set_begin_index(begin_index)
        start = begin_index
    x = x * (s.sigmas[start] if begin_index is not None else s.init_noise_sigma)
    out = []
    for t in s.timesteps[start:]:
        inp = s.scale_model_input(x, t)
        if guidance_scale is None:
            x = s.step(dummy_model(inp, t), t, x, **step_kwargs).prev_sample
        else:
            u, c = dummy_cfg(inp, t)
            if fused_cfg:
                x = s.step_cfg(u, c, guidance_scale, t, x, **step_kwargs).prev_sample
            else:
                x = s.step(u + guidance_scale * (c - u), t, x, **step_kwargs).prev_sample
        out.append(x)
    return out


def assert_parity(config, steps, x=None, tol=1e-5, **kwargs):
    x = initial_sample() if x is None else x
    kd, df = DPMSolverSDEScheduler(**config), DF(**config)
    got, expected = loop(kd, steps, x, **kwargs), loop(df, steps, x, **kwargs)
    assert kd.timesteps.dtype == df.timesteps.dtype == torch.float64
    assert torch.equal(kd.timesteps, df.timesteps) and torch.equal(kd.sigmas, df.sigmas)
    assert len(got) == len(expected) == 2 * steps - 1 - (kwargs.get("begin_index") or 0)
    for a, b in zip(got, expected):
        assert a.dtype == x.dtype and torch.isfinite(a).all()
        assert parity_error(a, b) <= tol, f"{config} steps={steps}: parity error {parity_error(a, b):.3e}"
    return got, expected


def float64_truth(config, steps, x):
    """diffusers' loop in float64 (sigmas and samples), with the noise its float32 loop draws."""
    drawn, real = [], df_module.BrownianTreeNoiseSampler

    class Recording(real):
        def __call__(self, *args):
            drawn.append(super().__call__(*args))
            return drawn[-1]

    class Replaying:
        def __init__(self, *args, **kwargs):
            self.draws = iter(drawn)

        def __call__(self, *args):
            return next(self.draws).double()

    df_module.BrownianTreeNoiseSampler = Recording
    try:
        loop(DF(**config), steps, x)
        df_module.BrownianTreeNoiseSampler = Replaying
        df = DF(**config)
        df.set_timesteps(steps)
        df.sigmas = df.sigmas.double()
        y = x.double() * df.init_noise_sigma
        for t in df.timesteps:
            y = df.step(dummy_model(df.scale_model_input(y, t), t), t, y).prev_sample
        return y
    finally:
        df_module.BrownianTreeNoiseSampler = real


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_parity_prediction_types_and_spacings(prediction_type, spacing, steps):
    assert_parity(dict(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1, **SD), steps)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_parity_sigma_schedules(sigmas, steps):
    assert_parity({sigmas: True, **SD}, steps)


@pytest.mark.parametrize("config", [
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist(), prediction_type="v_prediction"),
    dict(num_train_timesteps=500, timestep_spacing="trailing"),
    dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2"),
])
def test_parity_other_configs(config):
    assert_parity(dict(config, **SEED), 12)


@pytest.mark.parametrize("steps", [2, 5])
def test_cosine_v_prediction_is_held_to_the_float64_loop(steps):
    # squaredcos_cap_v2 starts at sigma ~2e4; with v-prediction diffusers' float32 coefficient
    # and x0 arithmetic leaves its loop 4e-5..1.4e-4 off the float64 loop (same noise), above
    # the 1e-5 bound. kdfast's coefficients are float64: it is held to the float64 loop.
    config = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", **SEED)
    x = initial_sample()
    truth = float64_truth(config, steps, x)
    df_err = parity_error(loop(DF(**config), steps, x)[-1], truth)
    kd_err = parity_error(loop(DPMSolverSDEScheduler(**config), steps, x)[-1], truth)
    assert df_err > 1e-5 and kd_err <= 1e-5, (df_err, kd_err)


def test_float64_truth_agrees_elsewhere():
    # the same check where diffusers' float32 loop is itself within 1e-5 of the float64 one
    config = dict(use_karras_sigmas=True, **SD)
    x = initial_sample()
    truth = float64_truth(config, 6, x)
    assert parity_error(loop(DF(**config), 6, x)[-1], truth) <= 1e-5
    assert parity_error(loop(DPMSolverSDEScheduler(**config), 6, x)[-1], truth) <= 1e-5


@pytest.mark.parametrize("s_noise", [0.0, 0.5, 1.3])
def test_parity_s_noise(s_noise):
    got, _ = assert_parity(SD, 6, s_noise=s_noise)
    if s_noise != 1.0:
        plain = loop(DPMSolverSDEScheduler(**SD), 6, initial_sample())
        assert parity_error(got[-1], plain[-1]) > 1e-3


def test_sample_prediction_is_supported():
    # diffusers raises NotImplementedError; kdfast takes x0 = model output in both stages
    with pytest.raises(NotImplementedError):
        loop(DF(prediction_type="sample", **SEED), 4, initial_sample())
    kd = DPMSolverSDEScheduler(prediction_type="sample", **SEED)
    kd.set_timesteps(4)
    x, m1, m2, n1, n2 = (initial_sample(seed=k) for k in range(5))
    s, s_next = kd.sigmas[0].item(), kd.sigmas[1].item()
    s_mid = math.sqrt(s * s_next)
    mid = kd.step(m1, kd.timesteps[0], x, variance_noise=n1).prev_sample
    assert kd.mid_point_sigma.item() == pytest.approx(s_mid, rel=1e-6)
    got = kd.step(m2, kd.timesteps[1], mid, variance_noise=n2).prev_sample

    def ancestral(x, x0, sigma, sigma_to, noise):  # DPM-Solver++(1) to sigma_down, plus sigma_up of noise
        up = sigma_to * math.sqrt(1 - (sigma_to / sigma) ** 2)
        down = math.sqrt(sigma_to**2 - up**2)
        return down / sigma * x.double() + (1 - down / sigma) * x0.double() + up * noise.double()

    assert parity_error(mid, ancestral(x, m1, s, s_mid, n1)) < 1e-6
    assert parity_error(got, ancestral(x, m2, s, s_next, n2)) < 1e-6


def test_noise_comes_from_the_seeded_tree():
    x = initial_sample()
    a = loop(DPMSolverSDEScheduler(noise_sampler_seed=1), 5, x)[-1]
    b = loop(DPMSolverSDEScheduler(noise_sampler_seed=2), 5, x)[-1]
    assert parity_error(a, b) > 1e-3
    assert parity_error(a, loop(DPMSolverSDEScheduler(noise_sampler_seed=1), 5, x)[-1]) == 0
    assert parity_error(a, loop(DF(noise_sampler_seed=1), 5, x)[-1]) < 1e-5
    kd = DPMSolverSDEScheduler(noise_sampler_seed=1)
    loop(kd, 5, x.to(torch.float16))
    assert isinstance(kd.noise_sampler.sampler, kd_module.BrownianTreeNoiseSampler)
    assert kd.noise_sampler.sampler.trees[0].dtype == torch.float16  # built like the sample, as diffusers builds it
    kd.set_timesteps(5)
    assert kd.noise_sampler is None  # a new schedule, a new tree at its first step


def test_a_none_seed_is_drawn_from_the_global_generator_like_diffusers():
    # at the first step (not in set_timesteps), whatever the schedule: a 1-step schedule (one
    # Euler step, no noise) draws it too
    x = initial_sample()
    outs, after = [], []
    for steps, global_seed in ((4, 11), (4, 12), (1, 13)):
        for s in (DPMSolverSDEScheduler(), DF()):
            s.set_timesteps(steps)
            torch.manual_seed(global_seed)
            y = x * s.init_noise_sigma
            for t in s.timesteps:
                y = s.step(dummy_model(s.scale_model_input(y, t), t), t, y).prev_sample
            outs.append(y)
            after.append(torch.randn(4))
    assert parity_error(outs[0], outs[1]) < 1e-5 and parity_error(outs[2], outs[3]) < 1e-5
    assert parity_error(outs[0], outs[2]) > 1e-3  # another global seed, another tree
    for k in (0, 2, 4):
        assert torch.equal(after[k], after[k + 1])


def test_a_list_of_seeds_gives_one_tree_per_sample_like_diffusers():
    config = dict(noise_sampler_seed=[3, 4])
    x = initial_sample()
    got, expected = loop(DPMSolverSDEScheduler(**config), 5, x), loop(DF(**config), 5, x)
    assert parity_error(got[-1], expected[-1]) < 1e-5
    # sample 1 with seed 4 is sample 0 of a batch seeded [4, 3]
    swapped = loop(DPMSolverSDEScheduler(noise_sampler_seed=[4, 3]), 5, x.flip(0))
    assert parity_error(got[-1][1], swapped[-1][0]) < 1e-6


def test_noise_is_drawn_at_diffusers_times_bit_for_bit():
    # the tree is queried at the float32 sigma_fn(t_fn(sigma)) values diffusers computes: the
    # drawn noise is the same tensor
    draws = []
    for module, cls in ((kd_module, DPMSolverSDEScheduler), (df_module, DF)):
        real = module.BrownianTreeNoiseSampler
        calls = []

        class Recording(real):
            def __call__(self, *args):
                out = super().__call__(*args)
                calls.append(out)
                return out

        module.BrownianTreeNoiseSampler = Recording
        try:
            loop(cls(use_karras_sigmas=True, **SD), 6, initial_sample())
        finally:
            module.BrownianTreeNoiseSampler = real
        draws.append(calls)
    assert len(draws[0]) == len(draws[1]) == 10  # 5 steps of 2 stages; the last step (Euler) draws none
    for a, b in zip(*draws):
        assert torch.equal(a, b)


def test_variance_noise_replaces_the_draw():
    kd = DPMSolverSDEScheduler(**SD)
    x = initial_sample()

    def first_steps(noises=None, **step_kwargs):
        kd.set_timesteps(6)
        y, drawn = x * kd.init_noise_sigma, []
        for k, t in enumerate(kd.timesteps[:4]):
            m = dummy_model(kd.scale_model_input(y, t), t)
            stage = 1 if kd.state_in_first_order else 2
            noise = None if noises is None else noises[k]
            y = kd.step(m, t, y, variance_noise=noise, **step_kwargs).prev_sample
            drawn.append(kd.noise_sampler(*kd._noise_times(k, stage)))  # what the tree draws there
        return y, drawn

    from_tree, drawn = first_steps()
    assert torch.equal(first_steps(drawn)[0], from_tree)
    no_noise = first_steps([torch.zeros_like(x)] * 4)[0]
    assert torch.equal(no_noise, first_steps(s_noise=0.0)[0]) and parity_error(no_noise, from_tree) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [SD, dict(prediction_type="v_prediction", use_karras_sigmas=True, **SEED)])
@pytest.mark.parametrize("steps", [2, 10])
def test_half_precision_keeps_dtype_and_matches(dtype, config, steps):
    # the rule: at most 2x diffusers' own error in that dtype against its float32 loop
    x = initial_sample()
    truth = loop(DF(**config), steps, x)[-1]
    got = loop(DPMSolverSDEScheduler(**config), steps, x.to(dtype))
    expected = loop(DF(**config), steps, x.to(dtype))
    assert all(g.dtype == dtype for g in got) and expected[-1].dtype == dtype
    err, base_err = parity_error(got[-1], truth), parity_error(expected[-1], truth)
    assert err <= 2 * base_err + 1e-4, (err, base_err)


@pytest.mark.parametrize("config", [SD, dict(use_karras_sigmas=True, prediction_type="v_prediction", **SEED)])
def test_fused_guidance_matches_diffusers_guidance(config):
    x = initial_sample()
    fused = loop(DPMSolverSDEScheduler(**config), 8, x, guidance_scale=2.5, fused_cfg=True)
    unfused = loop(DPMSolverSDEScheduler(**config), 8, x, guidance_scale=2.5)
    expected = loop(DF(**config), 8, x, guidance_scale=2.5)
    for a, b, c in zip(fused, unfused, expected):
        assert parity_error(a, b) < 1e-6 and parity_error(a, c) < 1e-5


def test_one_fused_call_per_stage_and_x0_when_read(monkeypatch):
    kd, df = DPMSolverSDEScheduler(**SD), DF(**SD)
    for s in (kd, df):
        s.set_timesteps(4)
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    x_kd = x_df = initial_sample() * df.init_noise_sigma
    for k, (t_kd, t_df) in enumerate(zip(kd.timesteps, df.timesteps)):
        prev, x0 = df.step(dummy_model(df.scale_model_input(x_df, t_df), t_df), t_df, x_df, return_dict=False)
        calls.clear()
        inp = kd.scale_model_input(x_kd, t_kd)
        if k % 3 == 2:
            # step_cfg with guidance 0 takes the unconditional output: the same model output as diffusers'
            out = kd.step_cfg(dummy_model(inp, t_kd), dummy_model(0.5 * inp, t_kd), 0.0, t_kd, x_kd,
                              return_dict=False)
        elif k % 3 == 1:
            out = kd.step(dummy_model(inp, t_kd), t_kd, x_kd, return_pred_original_sample=True)
            assert len(calls) == 1  # written by the step itself
            out = out.to_tuple()
        else:
            out = kd.step(dummy_model(inp, t_kd), t_kd, x_kd, return_dict=False)
        assert len(calls) == 1 and isinstance(out, tuple) and len(out) == 2
        x_kd = out[0]  # what pipelines read: no second kernel call
        assert len(calls) == 1
        got_prev, got_x0 = out
        assert len(calls) == (1 if k % 3 == 1 else 2) and got_prev is x_kd
        assert parity_error(got_x0, x0) < 1e-5 and parity_error(got_prev, prev) < 1e-5
        x_df = prev


def test_two_stages_and_state():
    df, kd = DF(**SD), DPMSolverSDEScheduler(**SD)
    for s in (df, kd):
        s.set_timesteps(5)
    assert kd.order == df.order == 2 and len(kd.timesteps) == 9 and len(kd.sigmas) == 10
    x = initial_sample() * kd.init_noise_sigma
    t_kd, t_df = kd.timesteps[0], df.timesteps[0]
    assert kd.state_in_first_order and kd.mid_point_sigma is None
    y_kd = kd.step(dummy_model(kd.scale_model_input(x, t_kd), t_kd), t_kd, x).prev_sample
    y_df = df.step(dummy_model(df.scale_model_input(x, t_df), t_df), t_df, x).prev_sample
    assert not kd.state_in_first_order and kd.sample is x  # the first stage's input is kept, not copied
    assert torch.equal(kd.mid_point_sigma, df.mid_point_sigma) and kd.mid_point_sigma.dtype == torch.float32
    # the second stage's model input is scaled with the midpoint's sigma, bit for bit
    assert torch.equal(kd.scale_model_input(y_kd, kd.timesteps[1]), df.scale_model_input(y_kd, df.timesteps[1]))
    kd.step(dummy_model(y_kd, kd.timesteps[1]), kd.timesteps[1], y_kd)
    df.step(dummy_model(y_df, df.timesteps[1]), df.timesteps[1], y_df)
    assert kd.state_in_first_order and kd.sample is None and kd.mid_point_sigma is None
    assert kd.step_index == df.step_index == 2


@pytest.mark.parametrize("config", [SD, dict(use_karras_sigmas=True), dict(use_beta_sigmas=True),
                                    dict(timestep_spacing="leading", steps_offset=1),
                                    dict(timestep_spacing="trailing")])
def test_schedule_state_matches(config):
    df, kd = DF(**config), DPMSolverSDEScheduler(**config)
    for steps in (None, 1, 2, 13):
        if steps:
            for s in (df, kd):
                s.set_timesteps(steps)
        assert kd.timesteps.dtype == df.timesteps.dtype == torch.float64
        assert torch.equal(kd.timesteps, df.timesteps) and torch.equal(kd.sigmas, df.sigmas)
        assert kd.sigmas.dtype == torch.float32 and kd.sigmas.device.type == "cpu"
        assert torch.equal(torch.as_tensor(kd.init_noise_sigma), torch.as_tensor(df.init_noise_sigma))
        assert kd.num_inference_steps == df.num_inference_steps
    assert len(kd) == len(df) and kd.sample is None and kd.step_index is None and kd.begin_index is None
    assert kd.noise_sampler is None and kd.noise_sampler_seed == df.noise_sampler_seed
    assert kd.use_karras_sigmas == df.use_karras_sigmas


def test_schedule_without_set_timesteps_matches_diffusers():
    outs = []
    for s in (DF(**SD), DPMSolverSDEScheduler(**SD)):
        assert s.num_inference_steps == 1000
        y = initial_sample() * s.init_noise_sigma
        for t in s.timesteps[:6]:
            y = s.step(dummy_model(s.scale_model_input(y, t), t), t, y).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_set_begin_index_and_img2img_start():
    # diffusers' img2img pipelines start at t_start * order: a first stage
    x = initial_sample()
    assert_parity(SD, 10, x, begin_index=3 * 2)


def test_odd_start_is_finite_where_diffusers_gives_nan():
    # An odd start index puts the first stages between two equal sigmas (the doubled schedule):
    # zero-length steps, whose noise diffusers draws over an empty interval, 0 / 0 = NaN. kdfast
    # takes no noise there (sigma_up = 0) and its steps are the limit: the sample stays.
    x = initial_sample()
    kd = DPMSolverSDEScheduler(**SD)
    got, expected = loop(kd, 6, x, begin_index=3), loop(DF(**SD), 6, x, begin_index=3)
    assert torch.isnan(expected[0]).all() and all(torch.isfinite(g).all() for g in got)
    assert torch.equal(got[-1], x * kd.sigmas[3])


def test_zero_sigma_where_diffusers_gives_nan():
    # beta_start=0: the training sigma of timestep 0 is 0, and so is the last step's; diffusers
    # divides 0 by 0 there (NaN). kdfast's Euler step takes the limit; earlier steps match.
    x = initial_sample()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # diffusers' log(0)
        expected = loop(DF(beta_start=0.0, **SEED), 6, x)
        got = loop(DPMSolverSDEScheduler(beta_start=0.0, **SEED), 6, x)
    assert torch.isnan(expected[-1]).all() and all(torch.isfinite(g).all() for g in got)
    first_nan = next(k for k, e in enumerate(expected) if torch.isnan(e).any())
    assert first_nan == len(expected) - 2
    for a, b in zip(got[:first_nan], expected[:first_nan]):
        assert parity_error(a, b) < 1e-5
    assert torch.equal(got[-1], got[-2])  # steps from sigma 0 to 0 have zero length


def test_add_noise_matches():
    df, kd = DF(), DPMSolverSDEScheduler()
    df.set_timesteps(20)
    kd.set_timesteps(20)
    x, n = initial_sample(), initial_sample(seed=5)
    t = df.timesteps[[0, 7]]
    assert torch.equal(kd.add_noise(x, n, t), df.add_noise(x, n, t))
    for s in (df, kd):
        s.set_begin_index(6)
    assert torch.equal(kd.add_noise(x, n, t), df.add_noise(x, n, t))


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = DPMSolverSDEScheduler(use_karras_sigmas=True, noise_sampler_seed=123, timestep_spacing="trailing",
                               beta_schedule="scaled_linear")
    kd.save_pretrained(tmp_path)
    again = DPMSolverSDEScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert df.config.use_karras_sigmas and df.config.noise_sampler_seed == 123 and df.noise_sampler_seed == 123
    df.save_pretrained(tmp_path / "df")
    back = DPMSolverSDEScheduler.from_pretrained(tmp_path / "df")
    assert back.config.noise_sampler_seed == 123 and back.noise_sampler_seed == 123
    x = initial_sample()
    assert parity_error(loop(back, 6, x)[-1], loop(df, 6, x)[-1]) < 1e-5
    assert "DPMSolverSDEScheduler" in [c.__name__ for c in kd.compatibles]
    # a pipeline's other Karras scheduler config works as is (foreign keys ignored)
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", sigma_min=0.1)
    other = DPMSolverSDEScheduler.from_config(euler.config)
    assert other.config.beta_schedule == "scaled_linear" and other.noise_sampler_seed is None


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        DPMSolverSDEScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DPMSolverSDEScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        DPMSolverSDEScheduler(beta_schedule="exp")
    with pytest.raises(ValueError, match="Only one of"):
        DPMSolverSDEScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    for seed in (-1, 1.5, "7", [1, None]):
        with pytest.raises(ValueError, match="noise_sampler_seed"):
            DPMSolverSDEScheduler(noise_sampler_seed=seed)


def test_bad_step_input():
    kd = DPMSolverSDEScheduler(**SD)
    x = initial_sample()
    for bad in (0, 2.5, None):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
            kd.set_timesteps(bad)
    kd.set_timesteps(3)
    t = kd.timesteps[0]
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], t, x)
    with pytest.raises(TypeError, match="unexpected keyword argument 'generator'"):
        kd.step(x, t, x, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator: DPMSolverSDEScheduler takes none.*from a Brownian tree"):
        kd.step_cfg(x, x, 2.0, t, x, generator=torch.Generator())
    with pytest.raises(ValueError, match="s_noise must be a finite number"):
        kd.step(x, t, x, s_noise=float("nan"))
    with pytest.raises(TypeError, match="unexpected step arguments: eta"):
        kd.step_cfg(x, x, 2.0, t, x, eta=1.0)
    with pytest.raises(ValueError, match=r"noise must have the shape of sample \(2, 4, 8, 8\)"):
        kd.step(x, t, x, variance_noise=x[:1])
    kd.set_timesteps(3)
    y = kd.step(dummy_model(x, t), t, x).prev_sample
    with pytest.raises(ValueError, match="does not match the first stage's sample shape"):
        kd.step(y[:1], kd.timesteps[1], y[:1])
    for t in kd.timesteps[1:]:
        y = kd.step(dummy_model(y, t), t, y).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(y, kd.timesteps[-1], y)


def test_host_reads_only_in_the_brownian_tree(monkeypatch):
    # The step reads nothing back from tensors itself; torchsde compares and bisects times on
    # the host, so building and querying the tree may (as diffusers' does: no CUDA graph).
    state = {"in_tree": 0}
    real = kd_module.BrownianTreeNoiseSampler

    class Allowed(real):
        def __init__(self, *args, **kwargs):
            state["in_tree"] += 1
            try:
                super().__init__(*args, **kwargs)
            finally:
                state["in_tree"] -= 1

        def __call__(self, *args):
            state["in_tree"] += 1
            try:
                return super().__call__(*args)
            finally:
                state["in_tree"] -= 1

    monkeypatch.setattr(kd_module, "BrownianTreeNoiseSampler", Allowed)

    def guarded(original):
        def call(self, *args, **kwargs):
            if not state["in_tree"]:
                raise AssertionError("host read on the step path")
            return original(self, *args, **kwargs)
        return call

    kd = DPMSolverSDEScheduler(use_karras_sigmas=True, **SD)
    kd.set_timesteps(5)
    x = initial_sample() * kd.init_noise_sigma
    for k, t in enumerate(kd.timesteps):  # no begin index: the first timestep is looked up
        m = dummy_model(kd.scale_model_input(x, t), t)
        with pytest.MonkeyPatch.context() as patch:
            for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
                patch.setattr(torch.Tensor, name, guarded(getattr(torch.Tensor, name)))
            if k % 2:
                x = kd.step_cfg(m, m * 0.9, 1.5, t, x, s_noise=0.8).prev_sample
            else:
                x = kd.step(m, t, x, return_dict=False)[0]
    assert torch.isfinite(x).all() and isinstance(kd.noise_sampler.sampler, Allowed)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    # A copy between the two stages keeps the first stage's sample and draws the same noise:
    # its Brownian tree is built again from the seed (diffusers' copies fail here: torchsde's
    # tree breaks under deepcopy, and diffusers' sampler holds a lambda, which does not pickle).
    def first_steps(s):
        s.set_timesteps(6)
        x = initial_sample() * s.init_noise_sigma
        for t in s.timesteps[:3]:
            x = s.step(dummy_model(s.scale_model_input(x, t), t), t, x).prev_sample
        assert not s.state_in_first_order
        return x

    def copied(s):
        return copy.deepcopy(s) if how == "deepcopy" else pickle.loads(pickle.dumps(s))

    df = DF(**SD)
    x = first_steps(df)
    with pytest.raises(KeyError if how == "deepcopy" else pickle.PicklingError):
        copied(df).step(dummy_model(x, df.timesteps[3]), df.timesteps[3], x)

    s = DPMSolverSDEScheduler(**dict(SD, noise_sampler_seed=None))  # the seed drawn at the first step is kept
    x = first_steps(s)
    twin = copied(s)
    assert dict(twin.config) == dict(s.config) and torch.equal(twin.sample, s.sample)
    for t in s.timesteps[3:]:
        m = dummy_model(s.scale_model_input(x, t), t)
        assert torch.equal(twin.scale_model_input(x, t), s.scale_model_input(x, t))
        a, b = s.step(m, t, x).prev_sample, twin.step(m, t, x).prev_sample
        assert torch.equal(a, b)
        x = a


def test_a_loop_under_inference_mode_equals_one_under_no_grad():
    outs = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            s = DPMSolverSDEScheduler(**SD)
            s.set_timesteps(5)
            x = initial_sample() * s.init_noise_sigma
            x0 = []
            for t in s.timesteps:
                out = s.step(dummy_model(s.scale_model_input(x, t), t), t, x)
                x = out.prev_sample
                x0.append(out.pred_original_sample)
            outs.append((x, x0))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_an_unknown_step_keyword_is_an_error_like_diffusers():
    s = DPMSolverSDEScheduler(**SD)
    s.set_timesteps(3)
    x = initial_sample()
    t = s.timesteps[0]
    for call in (lambda: s.step(x, t, x, bogus_option=1), lambda: s.step_cfg(x, x, 2.0, t, x, bogus_option=1),
                 lambda: DF(**SD).step(x, t, x, bogus_option=1)):
        with pytest.raises(TypeError, match="bogus_option"):
            call()
    assert s.step_index is None and s.noise_sampler is None  # nothing was stepped


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_with_a_seed_list_continue_like_the_original(how):
    # one Brownian tree per batch item: a copy must rebuild the per-item trees, not one tree
    s = DPMSolverSDEScheduler(beta_schedule="scaled_linear", noise_sampler_seed=[3, 4])
    s.set_timesteps(6)
    x = initial_sample() * s.init_noise_sigma
    assert x.shape[0] == 2
    for t in s.timesteps[:3]:
        x = s.step(dummy_model(s.scale_model_input(x, t), t), t, x).prev_sample
    twin = copy.deepcopy(s) if how == "deepcopy" else pickle.loads(pickle.dumps(s))
    for t in s.timesteps[3:]:
        m = dummy_model(s.scale_model_input(x, t), t)
        a, b = s.step(m, t, x).prev_sample, twin.step(m, t, x).prev_sample
        assert torch.equal(a, b)
        x = a
