import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.ddpm import DDPMScheduler
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

DF = diffusers.DDPMScheduler
FIXED = ["fixed_small", "fixed_small_log", "fixed_large"]


def learned_model(x: torch.Tensor, t) -> torch.Tensor:
    """[prediction, variance] channels: a log-variance fraction in [-1, 1] (learned_range) or,
    for ``learned``, a positive variance."""
    tf = float(t) / 1000.0
    return torch.cat([dummy_model(x, t), torch.tanh(0.7 * x.float() - tf).to(x.dtype)], dim=1)


def learned_loop(scheduler, steps, x, seed=0, guidance_scale=None, fused=False, make=learned_model, **set_kwargs):
    """Like parity.run_loop, with a model that predicts the variance too; returns every step's output."""
    if steps is not None:
        scheduler.set_timesteps(steps, **set_kwargs)
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for t in scheduler.timesteps:
        if guidance_scale is None:
            out = scheduler.step(make(x, t), t, x, generator=gen)
        else:
            u, c = make(x, t), make(0.97 * x + 0.02, t)
            if fused:
                out = scheduler.step_cfg(u, c, guidance_scale, t, x, generator=gen)
            else:
                out = scheduler.step(u + guidance_scale * (c - u), t, x, generator=gen)
        x = out.prev_sample
        outs.append((out.prev_sample, out.pred_original_sample))
    return outs


def assert_same_outputs(got, expected, tol=1e-5):
    assert len(got) == len(expected)
    for (p, x0), (p_want, x0_want) in zip(got, expected):
        assert p.dtype == p_want.dtype
        assert parity_error(p, p_want) <= tol and parity_error(x0, x0_want) <= tol


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("variance_type", FIXED)
def test_parity_prediction_types_spacings_and_variances(prediction_type, spacing, variance_type):
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1,
                  variance_type=variance_type)
    assert_parity(DDPMScheduler, DF, config, steps=20)


@pytest.mark.parametrize("steps", [1, 7, 50])
@pytest.mark.parametrize("config", [
    dict(clip_sample=False),
    dict(clip_sample=True, clip_sample_range=0.5, prediction_type="v_prediction"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(rescale_betas_zero_snr=True, timestep_spacing="linspace", clip_sample=True),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", variance_type="fixed_large"),
    dict(beta_schedule="sigmoid", variance_type="fixed_small_log"),
    dict(beta_schedule="laplace", timestep_spacing="trailing"),
    dict(trained_betas=[0.0001 + 0.0002 * k for k in range(100)], num_train_timesteps=100),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
])
def test_parity_configs_and_step_counts(config, steps):
    assert_parity(DDPMScheduler, DF, config, steps=steps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_thresholding_matches_and_does_something(prediction_type):
    config = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                  prediction_type=prediction_type)
    got, _ = assert_parity(DDPMScheduler, DF, config, steps=20)
    plain = run_loop(DDPMScheduler(prediction_type=prediction_type, clip_sample=False), 20, initial_sample())
    if prediction_type == "epsilon":  # (the dummy model's direct x0 stays inside [-1, 1])
        assert parity_error(got, plain) > 1e-3


def test_full_training_chain_without_set_timesteps_like_diffusers():
    # diffusers steps t = 999 ... 0 with prev = t - 1 before set_timesteps (its own tests do)
    config = dict(num_train_timesteps=300, variance_type="fixed_large")
    outs = []
    for cls in (DF, DDPMScheduler):
        s = cls(**config)
        assert s.num_inference_steps is None and len(s.timesteps) == 300
        x, gen = initial_sample((1, 2, 4, 4)), torch.Generator().manual_seed(0)
        for t in s.timesteps:
            x = s.step(dummy_model(x, t), t, x, generator=gen).prev_sample
        outs.append(x)
    assert parity_error(outs[1], outs[0]) < 1e-5
    assert DDPMScheduler(**config).previous_timestep(120) == 119


@pytest.mark.parametrize("timesteps", [[999, 800, 501, 250, 30, 3], [640], [999, 0]])
def test_custom_timesteps_match_diffusers(timesteps):
    got, _ = assert_parity(DDPMScheduler, DF, {}, steps=None, timesteps=timesteps)
    kd, df = DDPMScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(timesteps=timesteps)
    assert kd.custom_timesteps and df.custom_timesteps
    assert kd.num_inference_steps is None and df.num_inference_steps is None  # diffusers leaves it alone
    for t in kd.timesteps:
        assert int(kd.previous_timestep(t)) == int(df.previous_timestep(t))
    kd.set_timesteps(10)
    assert not kd.custom_timesteps and kd.num_inference_steps == 10


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
@pytest.mark.parametrize("config", [dict(), dict(prediction_type="v_prediction", clip_sample=False),
                                    dict(thresholding=True, sample_max_value=1.5)])
@pytest.mark.parametrize("steps", [1, 9])
def test_learned_variances_match_diffusers(variance_type, config, steps):
    config = dict(config, variance_type=variance_type)

    def make(x, t):  # learned: a variance (positive here; see the NaN test for a negative one)
        m = learned_model(x, t)
        if variance_type == "learned":
            m[:, 4:] = 0.05 * (m[:, 4:] + 1.1)
        return m

    expected = learned_loop(DF(**config), steps, initial_sample(), make=make)
    got = learned_loop(DDPMScheduler(**config), steps, initial_sample(), make=make)
    assert_same_outputs(got, expected)
    if steps == 1:  # (timestep 0: no noise, no variance)
        return
    # the variance half matters: another variance, another result
    other = learned_loop(DDPMScheduler(**config), steps, initial_sample(),
                         make=lambda x, t: torch.cat([make(x, t)[:, :4], 0.5 * make(x, t)[:, 4:]], 1))
    assert parity_error(other[0][0], got[0][0]) > 1e-4


def test_learned_variance_guidance_fused_equals_unfused():
    for variance_type in ("learned_range", "learned"):
        def make(x, t, variance_type=variance_type):  # (learned: a variance that stays positive when guided)
            m = learned_model(x, t)
            return m if variance_type == "learned_range" else torch.cat([m[:, :4], 0.1 + 0.01 * m[:, 4:]], 1)

        unfused = learned_loop(DF(variance_type=variance_type), 8, initial_sample(), guidance_scale=2.5, make=make)
        fused = learned_loop(DDPMScheduler(variance_type=variance_type), 8, initial_sample(), guidance_scale=2.5,
                             fused=True, make=make)
        assert_same_outputs(fused, unfused)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_learned_variance_half_precision_keeps_dtype(dtype):
    x = initial_sample(dtype=dtype)
    truth = learned_loop(DF(variance_type="learned_range"), 6, x.float())
    expected = learned_loop(DF(variance_type="learned_range"), 6, x)
    got = learned_loop(DDPMScheduler(variance_type="learned_range"), 6, x)
    assert got[-1][0].dtype == dtype
    err, base_err = parity_error(got[-1][0], truth[-1][0]), parity_error(expected[-1][0], truth[-1][0])
    assert err <= 2 * base_err + 1e-4


def test_where_diffusers_gives_nan_kdfast_stays_finite():
    x = initial_sample()
    # fixed_large_log: diffusers takes sqrt(log(beta_t)) (negative): every noised step is NaN
    df = run_loop(DF(variance_type="fixed_large_log"), 10, x)
    assert torch.isnan(df).all()
    kd = run_loop(DDPMScheduler(variance_type="fixed_large_log"), 10, x)
    assert torch.isfinite(kd).all()
    # ... kdfast uses the scale the log-variance stands for: exp(0.5 * log(beta_t)), fixed_large's
    assert parity_error(kd, run_loop(DF(variance_type="fixed_large"), 10, x)) < 1e-5
    # learned: a negative predicted variance gives NaN in diffusers (v ** 0.5); kdfast clamps it at 0
    signed = learned_loop(DF(variance_type="learned"), 4, x)
    assert torch.isnan(signed[0][0]).any()
    got = learned_loop(DDPMScheduler(variance_type="learned"), 4, x)
    assert all(torch.isfinite(p).all() for p, _ in got)
    clamped = learned_loop(DF(variance_type="learned"), 4, x,
                           make=lambda x, t: torch.cat([learned_model(x, t)[:, :4],
                                                        learned_model(x, t)[:, 4:].clamp(min=0)], 1))
    assert_same_outputs(got, clamped)


@pytest.mark.parametrize("cls_name", ["DDPMScheduler", "DDPMParallelScheduler"])
def test_fixed_large_log_adds_no_noise_where_beta_is_1_like_diffusers(cls_name):
    # At the first step of a zero-terminal-SNR schedule beta_t = 1: diffusers' sqrt(log(beta_t))
    # is 0 there, finite, and kdfast agrees (its exp(0.5 * log(beta_t)) would be 1).
    import kdfast.schedulers
    config = dict(variance_type="fixed_large_log", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  clip_sample=True)
    for steps in (1, 4):
        x = initial_sample()
        df, kd = getattr(diffusers, cls_name)(**config), getattr(kdfast.schedulers, cls_name)(**config)
        for s in (df, kd):
            s.set_timesteps(steps)
        t = df.timesteps[0]
        expected = df.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(3)).prev_sample
        got = kd.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(3)).prev_sample
        assert torch.isfinite(expected).all() and parity_error(got, expected) < 1e-5, steps


def test_zero_snr_epsilon_first_step():
    # alphas_cumprod[999] == 0: x0 = (x - eps) / 0 is infinite (diffusers returns inf/NaN, kdfast
    # raises saying why); clipped or thresholded, both are finite and agree.
    config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    assert_parity(DDPMScheduler, DF, dict(config, clip_sample=True), steps=10)
    x = initial_sample()
    # thresholded, diffusers' quantile interpolates between infinities: NaN. kdfast's x0 is
    # +-2**100 (x - eps) there (see epsilon_x0_coefficients): its quantile is finite, the
    # threshold sample_max_value, and x0 = sign(x - eps), what clipping to [-1, 1] gives.
    df, kd = DF(**config, thresholding=True), DDPMScheduler(**config, thresholding=True)
    clipped = DDPMScheduler(**config, clip_sample=True)
    firsts = []
    for s in (df, kd, clipped):
        s.set_timesteps(10)
        firsts.append(s.step(dummy_model(x, 999), s.timesteps[0], x, generator=torch.Generator().manual_seed(0)))
    assert torch.isnan(firsts[0].prev_sample).all()
    assert torch.isfinite(firsts[1].prev_sample).all()
    assert torch.equal(firsts[1].pred_original_sample, firsts[2].pred_original_sample)
    assert parity_error(firsts[1].prev_sample, firsts[2].prev_sample) < 1e-6
    assert torch.isfinite(run_loop(DDPMScheduler(**config, thresholding=True), 10, x)).all()
    s = DF(**config, clip_sample=False)
    s.set_timesteps(10)
    out = s.step(dummy_model(x, 999), s.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(out.prev_sample).all()
    s = DDPMScheduler(**config, clip_sample=False)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match=r"alphas_cumprod\[999\] is 0 \(rescale_betas_zero_snr=True\)"):
        s.step(dummy_model(x, 999), s.timesteps[0], x, generator=torch.Generator().manual_seed(0))


def test_noise_follows_the_generator_draw_for_draw():
    x = initial_sample()
    a = run_loop(DDPMScheduler(), 10, x, seed=1)
    b = run_loop(DDPMScheduler(), 10, x, seed=2)
    assert parity_error(a, b) > 1e-3  # another seed, another result
    assert parity_error(a, run_loop(DF(), 10, x, seed=1)) < 1e-5  # the same seed, diffusers' result
    # the same draws: no noise (and no draw) at t == 0, as in diffusers
    for spacing in ("linspace", "leading"):
        gens = []
        for cls in (DF, DDPMScheduler):
            s = cls(timestep_spacing=spacing)
            s.set_timesteps(5)
            g = torch.Generator().manual_seed(3)
            y = x
            for t in s.timesteps:
                y = s.step(dummy_model(y, t), t, y, generator=g).prev_sample
            gens.append(g.get_state())
        assert torch.equal(gens[0], gens[1])
    # a list of generators: one per batch entry, as diffusers' randn_tensor draws them
    outs = []
    for cls in (DF, DDPMScheduler):
        s = cls()
        s.set_timesteps(4)
        gens, y = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)], x
        for t in s.timesteps:
            y = s.step(dummy_model(y, t), t, y, generator=gens).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) < 1e-5


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_noise_is_drawn_with_diffusers_call(monkeypatch, variance_type, dtype):
    # the same torch.randn calls (shape, dtype, device, generator): on a GPU a float16 draw is not
    # a float32 draw rounded, so the dtype must be the model output's, as in diffusers
    real = torch.randn
    draws, gen = [], torch.Generator()

    def recording(*args, **kwargs):
        draws[-1].append((tuple(args[0]), kwargs.get("dtype"), torch.device(kwargs.get("device", "cpu")),
                          kwargs.get("generator") is gen))
        return real(*args, **kwargs)

    make = learned_model if variance_type == "learned_range" else dummy_model
    x0 = initial_sample(dtype=dtype)
    monkeypatch.setattr(torch, "randn", recording)
    for cls in (DF, DDPMScheduler):
        draws.append([])
        s = cls(variance_type=variance_type, timestep_spacing="linspace")
        s.set_timesteps(4)
        x, gen = x0, gen.manual_seed(0)
        for t in s.timesteps:
            x = s.step(make(x, t), t, x, generator=gen).prev_sample
    assert draws[0] == draws[1] and len(draws[0]) == 3  # (none at t == 0)
    assert draws[0][0] == ((2, 4, 8, 8), dtype, torch.device("cpu"), True)


def test_variance_noise_is_the_drawn_noise():
    kd = DDPMScheduler()
    kd.set_timesteps(10)
    x, m = initial_sample(), initial_sample(seed=1)
    t = kd.timesteps[2]
    drawn = kd.step(m, t, x, generator=torch.Generator().manual_seed(4)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(kd.step(m, t, x, variance_noise=noise).prev_sample, drawn)
    with pytest.raises(ValueError, match="Cannot pass both generator and variance_noise"):
        kd.step(m, t, x, generator=torch.Generator(), variance_noise=noise)
    with pytest.raises(ValueError, match="variance_noise must be a tensor of shape"):
        kd.step(m, t, x, variance_noise=noise[:1])
    # at t == 0 there is no noise term: neither is used
    kd.set_timesteps(timesteps=[10, 0])
    assert torch.equal(kd.step(m, 0, x, variance_noise=noise).prev_sample, kd.step(m, 0, x).prev_sample)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(), dict(prediction_type="v_prediction", clip_sample=False,
                                                 variance_type="fixed_large"),
                                    dict(thresholding=True, sample_max_value=2.0)])
def test_half_precision_keeps_dtype_and_matches(dtype, config):
    assert_parity(DDPMScheduler, DF, config, steps=20, dtype=dtype)


@pytest.mark.parametrize("config", [{}, dict(clip_sample=False, variance_type="fixed_large"),
                                    dict(thresholding=True, sample_max_value=1.5),
                                    dict(prediction_type="v_prediction")])
def test_fused_guidance_matches_diffusers_guidance(config):
    assert_parity(DDPMScheduler, DF, config, steps=20, guidance_scale=2.0)


def test_fused_guidance_equals_unfused_step():
    kd = DDPMScheduler()
    kd.set_timesteps(10)
    x = initial_sample()
    for t in kd.timesteps[:4]:
        u, c = dummy_cfg(x, t)
        noise = initial_sample(seed=int(t))
        fused = kd.step_cfg(u, c, 3.0, t, x, variance_noise=noise)
        plain = kd.step(u + 3.0 * (c - u), t, x, variance_noise=noise)
        assert parity_error(fused.prev_sample, plain.prev_sample) < 1e-6
        assert parity_error(fused.pred_original_sample, plain.pred_original_sample) < 1e-6
        x = fused.prev_sample


@pytest.mark.parametrize("config", [dict(thresholding=True, sample_max_value=1.5), dict(clip_sample_range=0.7),
                                    dict(prediction_type="v_prediction", clip_sample=False)])
def test_pred_original_sample_and_tuples_like_diffusers(config):
    df, kd = DF(**config), DDPMScheduler(**config)
    for s in (df, kd):
        s.set_timesteps(5)
    x = initial_sample()
    for t_df, t_kd in zip(df.timesteps, kd.timesteps):
        m = dummy_model(x, t_df)
        expected = df.step(m, t_df, x, generator=torch.Generator().manual_seed(int(t_df)))
        lazy = kd.step(m, t_kd, x, generator=torch.Generator().manual_seed(int(t_df)))
        eager = kd.step(m, t_kd, x, generator=torch.Generator().manual_seed(int(t_df)),
                        return_pred_original_sample=True)
        for out in (lazy, eager):
            assert parity_error(out.prev_sample, expected.prev_sample) < 1e-5
            assert parity_error(out.pred_original_sample, expected.pred_original_sample) < 1e-5
        prev, x0 = kd.step(m, t_kd, x, generator=torch.Generator().manual_seed(int(t_df)), return_dict=False)
        want = df.step(m, t_df, x, generator=torch.Generator().manual_seed(int(t_df)), return_dict=False)
        assert isinstance(want, tuple) and len(want) == 2
        assert parity_error(prev, want[0]) < 1e-5 and parity_error(x0, want[1]) < 1e-5
        x = expected.prev_sample


def test_img2img_style_partial_loop_matches():
    # DDPM has no set_begin_index in diffusers: pipelines noise the image to a timestep of the
    # schedule with add_noise and loop over the rest of it
    x0, noise = initial_sample(), initial_sample(seed=3)
    outs = []
    for cls in (DF, DDPMScheduler):
        s = cls()
        s.set_timesteps(20)
        start = s.timesteps[7:]
        x = s.add_noise(x0, noise, start[:1].repeat(2))
        gen = torch.Generator().manual_seed(0)
        for t in start:
            x = s.step(dummy_model(x, t), t, x, generator=gen).prev_sample
        outs.append(x)
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_assigned_timesteps_are_followed():
    # pipelines and users may assign a schedule: the previous timestep follows it
    outs = []
    for cls in (DF, DDPMScheduler):
        s = cls()
        s.set_timesteps(20)
        s.timesteps = s.timesteps[::3].clone()
        x, gen = initial_sample(), torch.Generator().manual_seed(0)
        for t in s.timesteps:
            x = s.step(dummy_model(x, t), t, x, generator=gen).prev_sample
        outs.append(x)
    assert parity_error(outs[1], outs[0]) < 1e-5


def test_save_load_and_from_config_round_trip(tmp_path):
    kd = DDPMScheduler(variance_type="learned_range", clip_sample=False, steps_offset=1, timestep_spacing="trailing",
                       beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    kd.save_pretrained(tmp_path)
    again = DDPMScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert df.config.variance_type == "learned_range" and df.config.timestep_spacing == "trailing"
    df.save_pretrained(tmp_path / "df")
    back = DDPMScheduler.from_pretrained(tmp_path / "df")
    assert settings(back.config) == settings(kd.config)
    plain = DF(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large")
    kd = DDPMScheduler.from_config(plain.config)
    x = initial_sample()
    assert parity_error(run_loop(kd, 10, x), run_loop(plain, 10, x)) < 1e-5
    assert DF in kd.compatibles and diffusers.DDIMScheduler in kd.compatibles
    assert DDPMScheduler.from_config(diffusers.DDIMScheduler(beta_schedule="scaled_linear").config) \
        .config.beta_schedule == "scaled_linear"
    assert len(kd) == 1000 and kd.order == 1 and kd.init_noise_sigma == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_noise_and_velocity_are_bit_identical(dtype):
    df, kd = DF(beta_schedule="scaled_linear"), DDPMScheduler(beta_schedule="scaled_linear")
    x, n = initial_sample(dtype=dtype), initial_sample(dtype=dtype, seed=5)
    for t in (torch.tensor([3, 999]), torch.tensor([500]), torch.tensor(17), torch.tensor([0, 1], dtype=torch.int32)):
        assert torch.equal(kd.add_noise(x, n, t), df.add_noise(x, n, t))
        assert torch.equal(kd.get_velocity(x, n, t), df.get_velocity(x, n, t))
    assert torch.equal(kd.alphas_cumprod, df.alphas_cumprod) and torch.equal(kd.betas, df.betas)
    with pytest.raises(IndexError, match="timesteps must be integer"):
        kd.add_noise(x, n, torch.tensor([3.0, 5.0]))
    with pytest.raises(ValueError, match="timesteps: got 3 timesteps for a batch of 2"):
        kd.add_noise(x, n, torch.tensor([1, 2, 3]))


def test_one_kernel_call_per_step(monkeypatch):
    calls = []
    real = base.fused_step

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(base, "fused_step", counted)
    for config in (dict(), dict(thresholding=True), dict(variance_type="fixed_small_log", clip_sample=False)):
        s = DDPMScheduler(**config)
        s.set_timesteps(6)
        x, gen = initial_sample(), torch.Generator().manual_seed(0)
        for t in s.timesteps:
            calls.clear()
            u, c = dummy_cfg(x, t)
            x = s.step(u, t, x, generator=gen).prev_sample
            assert len(calls) == 1
            calls.clear()
            x = s.step_cfg(u, c, 2.0, t, x, generator=gen).prev_sample
            assert len(calls) == 1
    s = DDPMScheduler(variance_type="learned_range")  # the torch-computed noise term, the same single pass
    s.set_timesteps(3)
    x = initial_sample()
    calls.clear()
    s.step(learned_model(x, s.timesteps[0]), s.timesteps[0], x)
    assert len(calls) == 1


def test_step_path_needs_no_host_read():
    for config in (dict(thresholding=True), dict(variance_type="fixed_large", clip_sample=False)):
        kd = DDPMScheduler(**config)
        kd.set_timesteps(10)
        x = initial_sample()
        gen = torch.Generator().manual_seed(0)

        for t in list(kd.timesteps):
            u, c = dummy_cfg(x, t)
            with no_host_reads():
                x = kd.step_cfg(u, c, 2.0, t, x, generator=gen).prev_sample
                x = kd.step(u, t, x, generator=gen).prev_sample
        assert torch.isfinite(x).all()


def test_bad_config_values_are_named():
    for key, value in (("variance_type", "fixed"), ("prediction_type", "flow_prediction"),
                       ("timestep_spacing", "uniform"), ("beta_schedule", "cosine")):
        with pytest.raises(ValueError, match=f"{key}={value!r}"):
            DDPMScheduler(**{key: value})
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        DDPMScheduler(dynamic_thresholding_ratio=1.5)
    with pytest.raises(ValueError, match="clip_sample_range"):
        DDPMScheduler(clip_sample_range=-1.0)
    kd = DDPMScheduler()
    kd.set_timesteps(4)
    kd.variance_type = "unknown"  # diffusers reads the attribute, not the config
    x = initial_sample()
    with pytest.raises(ValueError, match="variance_type='unknown'"):
        kd.step(x, kd.timesteps[0], x)


def test_bad_schedules_are_named():
    kd = DDPMScheduler()
    with pytest.raises(ValueError, match="cannot be larger"):
        kd.set_timesteps(1001)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        kd.set_timesteps(0)
    with pytest.raises(ValueError, match="Can only pass one"):
        kd.set_timesteps(10, timesteps=[10, 5])
    with pytest.raises(ValueError, match="Must pass exactly one"):
        kd.set_timesteps()
    with pytest.raises(ValueError, match="descending"):
        kd.set_timesteps(timesteps=[10, 10, 5])
    with pytest.raises(ValueError, match="must start before"):
        kd.set_timesteps(timesteps=[1000, 5])
    with pytest.raises(ValueError, match="timesteps must be >= 0"):
        kd.set_timesteps(timesteps=[10, -3])
    with pytest.raises(ValueError, match="non-empty"):
        kd.set_timesteps(timesteps=[])


def test_bad_step_input():
    kd = DDPMScheduler()
    x = initial_sample()
    kd.set_timesteps(5)
    t = kd.timesteps[0]
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(x[:1], t, x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        kd.step_cfg(x, x, float("nan"), t, x)
    # a float timestep indexes alphas_cumprod in diffusers: an IndexError there, and here
    for bad in (800.0, torch.tensor(800.0)):
        with pytest.raises(IndexError):
            DF().step(x, bad, x)
        with pytest.raises(IndexError, match="timestep must be an integer"):
            kd.step(x, bad, x)
    with pytest.raises(IndexError, match="timestep 501 is not one of the schedule's 5 timesteps"):
        kd.step(x, 501, x)  # diffusers: IndexError too (past the end of its lookup)
    with pytest.raises(IndexError, match="outside the training schedule"):
        DDPMScheduler().step(x, 1000, x)
    with pytest.raises(TypeError, match="s_churn"):
        kd.step(x, t, x, s_churn=1.0)
    learned = DDPMScheduler(variance_type="learned_range")
    learned.set_timesteps(5)
    with pytest.raises(ValueError, match="variance_type='learned_range': model_output must hold"):
        learned.step(x, learned.timesteps[0], x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.step(torch.cat([x, x], 1), t, x)  # a variance half with a fixed variance type


def test_previous_timestep_and_get_variance_like_diffusers():
    for variance_type in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"):
        kd, df = DDPMScheduler(variance_type=variance_type), DF(variance_type=variance_type)
        for s in (kd, df):
            s.set_timesteps(8)
        for t in df.timesteps:
            assert torch.equal(torch.as_tensor(kd.previous_timestep(t)), torch.as_tensor(df.previous_timestep(t)))
            a, b = kd._get_variance(t), df._get_variance(t)
            assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6, atol=0, equal_nan=True)
    pv = initial_sample(seed=2).tanh()
    kd, df = DDPMScheduler(variance_type="learned_range"), DF(variance_type="learned_range")
    torch.testing.assert_close(kd._get_variance(500, pv), df._get_variance(500, pv))


def test_zero_snr_epsilon_without_clipping_raises_before_drawing_noise():
    # an epsilon model defines no x0 where alphas_cumprod is 0: diffusers' step is inf/NaN there
    config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    df, kd = diffusers.DDPMScheduler(**config), DDPMScheduler(**config)
    for s in (df, kd):
        s.set_timesteps(10)
    x = initial_sample()
    t = int(kd.timesteps[0])
    g_df = torch.Generator().manual_seed(0)
    assert not torch.isfinite(df.step(dummy_model(x, t), t, x, generator=g_df).prev_sample).all()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"prediction_type='epsilon' defines no x0"):
        kd.step(dummy_model(x, t), kd.timesteps[0], x, generator=gen)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn
    kd = DDPMScheduler(**dict(config, clip_sample=True))
    kd.set_timesteps(10)
    assert torch.isfinite(kd.step(dummy_model(x, t), kd.timesteps[0], x, generator=gen).prev_sample).all()
