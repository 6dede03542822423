import numpy as np
import pytest
import torch

from kdfast.schedulers import FlowMatchEulerDiscreteScheduler
from parity import assert_parity, diffusers, dummy_model, initial_sample, parity_error, run_loop, settings

DF = diffusers.FlowMatchEulerDiscreteScheduler
FLUX = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)


@pytest.mark.parametrize("config", [
    {},
    dict(shift=3.0),                                                  # SD3
    dict(shift=3.0, use_karras_sigmas=True),
    dict(shift=2.0, use_exponential_sigmas=True),
    dict(shift=2.0, use_beta_sigmas=True),
    dict(shift=1.0, shift_terminal=0.1),                              # LTX-Video
    dict(invert_sigmas=True),                                          # Mochi
])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_parity(config, steps):
    if steps == 1 and "shift_terminal" in config:
        # one step has nothing to stretch: diffusers divides by zero and gets NaN sigmas
        with pytest.raises(ValueError, match="non-finite sigmas"):
            FlowMatchEulerDiscreteScheduler(**config).set_timesteps(1)
        return
    assert_parity(FlowMatchEulerDiscreteScheduler, DF, config, steps=steps)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("mu", [0.5, 1.15])
def test_parity_dynamic_shifting(time_shift_type, mu):
    config = dict(FLUX, time_shift_type=time_shift_type)
    assert_parity(FlowMatchEulerDiscreteScheduler, DF, config, steps=20, mu=mu)
    # the Flux pipeline passes its own sigmas with mu
    sigmas = np.linspace(1.0, 1 / 20, 20).tolist()
    assert_parity(FlowMatchEulerDiscreteScheduler, DF, config, steps=20, mu=mu, sigmas=sigmas)


def test_schedules_equal_diffusers_bit_for_bit():
    for config, kwargs in ((dict(shift=3.0), dict(num_inference_steps=28)),
                           (FLUX, dict(num_inference_steps=20, mu=0.9)),
                           (dict(shift=3.0), dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1])),
                           (dict(shift=3.0), dict(timesteps=[1000.0, 750.0, 500.0, 250.0])),
                           (dict(shift=3.0), dict(sigmas=[1.0, 0.7, 0.4], timesteps=[999.0, 700.0, 400.0])),
                           (dict(shift_terminal=0.05, use_karras_sigmas=True), dict(num_inference_steps=9))):
        df, kd = DF(**config), FlowMatchEulerDiscreteScheduler(**config)
        df.set_timesteps(**kwargs)
        kd.set_timesteps(**kwargs)
        assert torch.equal(kd.sigmas, df.sigmas.float()), (config, kwargs)
        assert torch.equal(kd.timesteps, df.timesteps.float()), (config, kwargs)
    # the training schedule of __init__ too
    df, kd = DF(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert torch.equal(kd.sigmas, df.sigmas) and torch.equal(kd.timesteps, df.timesteps)
    assert (kd.sigma_min, kd.sigma_max) == (df.sigma_min, df.sigma_max)


def test_custom_sigmas_and_timesteps_loop():
    for kwargs in (dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1]), dict(timesteps=[1000.0, 750.0, 500.0, 250.0])):
        assert_parity(FlowMatchEulerDiscreteScheduler, DF, dict(shift=3.0), steps=None, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    assert_parity(FlowMatchEulerDiscreteScheduler, DF, dict(shift=3.0), steps=20, dtype=dtype)


def test_fp32_step_is_bit_identical_to_diffusers():
    # x + dt * v in fp32 with diffusers' float32 dt: the same rounding, not just 1e-5
    df, kd = DF(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    expected = run_loop(df, 12, initial_sample())
    got = run_loop(kd, 12, initial_sample())
    assert torch.equal(got, expected)


def test_guidance_fused():
    assert_parity(FlowMatchEulerDiscreteScheduler, DF, dict(shift=3.0), steps=12, guidance_scale=4.5)
    assert_parity(FlowMatchEulerDiscreteScheduler, DF, dict(stochastic_sampling=True), steps=12, guidance_scale=3.0)


def test_stochastic_sampling_draws_like_diffusers():
    config = dict(shift=3.0, stochastic_sampling=True)
    got, expected = assert_parity(FlowMatchEulerDiscreteScheduler, DF, config, steps=10)
    other = run_loop(FlowMatchEulerDiscreteScheduler(**config), 10, initial_sample(), seed=1)
    assert parity_error(other, got) > 1e-3  # the draws follow the generator
    kd = FlowMatchEulerDiscreteScheduler(**config)
    kd.set_timesteps(4)
    x, v = initial_sample(), initial_sample(seed=1)
    noise = initial_sample(seed=2)
    out = kd.step(v, kd.timesteps[0], x, variance_noise=noise).prev_sample
    s, s_next = kd.sigmas[0], kd.sigmas[1]
    torch.testing.assert_close(out, (1 - s_next) * (x - s * v) + s_next * noise)


def test_per_token_timesteps_match_diffusers():
    df, kd = DF(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    for s in (df, kd):
        s.set_timesteps(8)
    x = initial_sample((2, 16, 4))
    v = initial_sample((2, 16, 4), seed=1)
    # tokens at the current step's timestep, some (conditioning tokens) already further along
    per_token = df.timesteps[2].expand(2, 16).clone()
    per_token[:, :4] = df.timesteps[5]
    for s in (df, kd):
        s.set_begin_index(2)
    a = df.step(v, df.timesteps[2], x, per_token_timesteps=per_token).prev_sample
    b = kd.step(v, kd.timesteps[2], x, per_token_timesteps=per_token).prev_sample
    assert b.dtype == a.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert kd.step_index == df.step_index == 3


def _per_token_case(df, kd, steps=8, shape=(2, 16, 4)):
    for s in (df, kd):
        s.set_timesteps(steps)
    x, v = initial_sample(shape), initial_sample(shape, seed=1)
    per_token = df.timesteps[2].expand(shape[:2]).clone()
    per_token[:, :4] = df.timesteps[5]  # conditioning tokens further along
    per_token[1, 5] = df.timesteps[-1]  # one at the last timestep: its lower sigma is 0
    per_token[0, 6] = df.timesteps[3] + 0.0005  # within diffusers' 1e-6 of a schedule sigma: not below it
    for s in (df, kd):
        s.set_begin_index(2)
    return x, v, per_token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_stochastic_and_half_precision_match_diffusers(dtype):
    for config in (dict(shift=3.0), dict(shift=3.0, stochastic_sampling=True)):
        df, kd = DF(**config), FlowMatchEulerDiscreteScheduler(**config)
        x, v, per_token = _per_token_case(df, kd)
        x, v = x.to(dtype), v.to(dtype)
        a = df.step(v, df.timesteps[2], x, per_token_timesteps=per_token,
                    generator=torch.Generator().manual_seed(3)).prev_sample
        b = kd.step(v, kd.timesteps[2], x, per_token_timesteps=per_token,
                    generator=torch.Generator().manual_seed(3)).prev_sample
        assert b.dtype == a.dtype == torch.float32  # diffusers upcasts the sample on this path
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_per_token_step_is_one_fused_pass_without_host_reads(monkeypatch):
    import kdfast.schedulers.flow_match_euler_discrete as module
    from parity import no_host_reads

    df, kd = DF(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    x, v, per_token = _per_token_case(df, kd)
    calls = []
    real = module.fused_step
    monkeypatch.setattr(module, "fused_step", lambda *a: calls.append(a[2].shape) or real(*a))
    with no_host_reads():
        got = kd.step(v, kd.timesteps[2], x, per_token_timesteps=per_token).prev_sample
    assert calls == [(32, 29)]  # one pass, a coefficient row per token
    torch.testing.assert_close(got, df.step(v, df.timesteps[2], x, per_token_timesteps=per_token).prev_sample,
                               rtol=0, atol=0)


def test_per_token_step_cfg_is_the_step_of_the_guided_output():
    kd = FlowMatchEulerDiscreteScheduler(shift=3.0)
    df = DF(shift=3.0)
    x, u, per_token = _per_token_case(df, kd)
    c = initial_sample(x.shape, seed=4)
    guided = kd.step_cfg(u, c, 4.0, kd.timesteps[2], x, per_token_timesteps=per_token).prev_sample
    kd.set_begin_index(2)
    kd._step_index = None
    expected = kd.step(u + 4.0 * (c - u), kd.timesteps[2], x, per_token_timesteps=per_token).prev_sample
    torch.testing.assert_close(guided, expected, rtol=2e-6, atol=2e-6)


def test_per_token_bad_input_is_named():
    kd = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x, v, per_token = _per_token_case(DF(shift=3.0), kd)
    for bad, exc, match in ((per_token[:, :5], ValueError, "does not match the sample's tokens"),
                            (per_token[None], ValueError, "at most 2-D"),
                            (per_token.long(), TypeError, "floating tensor"),
                            ([1.0], TypeError, "floating tensor")):
        with pytest.raises(exc, match=match):
            kd.step(v, kd.timesteps[2], x, per_token_timesteps=bad)


def test_scale_noise_matches_diffusers():
    df, kd = DF(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    for s in (df, kd):
        s.set_timesteps(10)
    x, noise = initial_sample(), initial_sample(seed=1)
    t = df.timesteps[[3, 6]]
    torch.testing.assert_close(kd.scale_noise(x, kd.timesteps[[3, 6]], noise), df.scale_noise(x, t, noise),
                               rtol=0, atol=0)
    for s in (df, kd):  # img2img: begin_index set
        s.set_begin_index(4)
    torch.testing.assert_close(kd.scale_noise(x, kd.timesteps[4:5].expand(2), noise),
                               df.scale_noise(x, df.timesteps[4:5].expand(2), noise), rtol=0, atol=0)


def test_shift_api_and_time_shift():
    kd = FlowMatchEulerDiscreteScheduler(shift=3.0)
    df = DF(shift=3.0)
    assert kd.shift == 3.0
    kd.set_shift(5.0)
    df.set_shift(5.0)
    kd.set_timesteps(10)
    df.set_timesteps(10)
    assert torch.equal(kd.sigmas, df.sigmas)
    t = np.linspace(0.1, 1.0, 5)
    np.testing.assert_array_equal(kd.time_shift(0.7, 1.0, t), df.time_shift(0.7, 1.0, t))


def test_config_round_trip_and_from_diffusers(tmp_path):
    df = DF(**FLUX)
    kd = FlowMatchEulerDiscreteScheduler.from_config(df.config)
    assert settings(kd.config) == settings(df.config)
    kd.save_pretrained(tmp_path)
    again = DF.from_pretrained(tmp_path)
    assert settings(again.config) == settings(df.config)
    from kdfast.schedulers import from_diffusers

    assert isinstance(from_diffusers(df), FlowMatchEulerDiscreteScheduler)
    assert DF in kd.compatibles


def test_kdfast_sample_with_the_scheduler():
    import kdfast

    kd = FlowMatchEulerDiscreteScheduler(shift=3.0)
    kd.set_timesteps(10)
    x = initial_sample()
    got = kdfast.sample(lambda x, t: dummy_model(x, t), x, kd, disable=True)
    expected = run_loop(DF(shift=3.0), 10, x)
    assert parity_error(got, expected) <= 1e-6
    kd.set_timesteps(10)
    cond, uncond = torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)
    guided = kdfast.sample(lambda x, t, cond: dummy_model(x + 0.1 * cond, t), x, kd, guidance_scale=3.0, cond=cond,
                           uncond=uncond, disable=True)
    df = DF(shift=3.0)
    df.set_timesteps(10)
    y = x
    for t in df.timesteps:
        u, c = dummy_model(y, t), dummy_model(y + 0.1, t)
        y = df.step(u + 3.0 * (c - u), t, y).prev_sample
    assert parity_error(guided, y) <= 1e-5


def test_bad_input():
    kd = FlowMatchEulerDiscreteScheduler(**FLUX)
    with pytest.raises(ValueError, match="mu"):
        kd.set_timesteps(10)
    with pytest.raises(ValueError, match="same length"):
        FlowMatchEulerDiscreteScheduler().set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0])
    with pytest.raises(ValueError, match="num_inference_steps"):
        FlowMatchEulerDiscreteScheduler().set_timesteps(3, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="time_shift_type"):
        FlowMatchEulerDiscreteScheduler(time_shift_type="cubic")
    with pytest.raises(ValueError, match="Only one"):
        FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    kd = FlowMatchEulerDiscreteScheduler()
    kd.set_timesteps(4)
    x = initial_sample()
    with pytest.raises(ValueError, match="integer"):
        kd.step(x, 3, x)
    with pytest.raises(ValueError, match="shape"):
        kd.step(x[:1], kd.timesteps[0], x)
    for t in kd.timesteps:
        x = kd.step(x, t, x).prev_sample
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)


def test_step_api_contract():
    import copy
    import pickle

    kd = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    kd.set_timesteps(6)
    x = initial_sample()
    t = kd.timesteps[0]
    with pytest.raises(TypeError, match="bogus_option"):
        kd.step_cfg(x, x, 2.0, t, x, bogus_option=1)
    assert kd.step_index is None
    out = kd.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(0))
    assert list(out.keys()) == ["prev_sample"] and len(out.to_tuple()) == 1
    assert kd.step(dummy_model(x, t), kd.timesteps[1], x, return_dict=False)[0].shape == x.shape
    for clone in (copy.deepcopy(kd), pickle.loads(pickle.dumps(kd))):
        assert clone.step_index == kd.step_index == 2
        a = clone.step(dummy_model(x, t), clone.timesteps[2], x, generator=torch.Generator().manual_seed(1))
        b = copy.deepcopy(kd).step(dummy_model(x, t), kd.timesteps[2], x, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=0)


def test_captured_loop_replays_the_scheduler(eager_capture):
    import kdfast

    def velocity(x, t, cond=None):
        out = dummy_model(x, t)
        return out if cond is None else out + 0.2 * cond

    cond, uncond = torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)
    kd = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    kd.set_timesteps(6)
    loop = kdfast.CapturedSampler(velocity, initial_sample(), kd, guidance_scale=3.5, cond=cond, uncond=uncond,
                                  generator=torch.Generator())
    for seed in (1, 2):
        ref = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
        ref.set_timesteps(6)
        want = kdfast.sample(velocity, initial_sample(seed=seed), ref, guidance_scale=3.5, cond=cond, uncond=uncond,
                             generator=torch.Generator().manual_seed(seed + 10), disable=True)
        got = loop(initial_sample(seed=seed), seed=seed + 10)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("stochastic", [False, True])
def test_gpu_loop_without_syncs_and_as_a_cuda_graph(stochastic):
    import kdfast

    kd = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
    kd.set_timesteps(8, device="cuda")
    x = initial_sample().cuda()
    cond, uncond = torch.ones(2, 4, 1, 1, device="cuda"), torch.zeros(2, 4, 1, 1, device="cuda")

    def velocity(x, t, cond=None):
        # dummy_model's formula with the timestep kept on the device (its float(t) is a host read)
        tf, xf = t.float() / 1000.0, x.float()
        return (torch.sin(1.3 * xf + tf) * 0.6 + 0.1 * xf * (1.0 - tf) + 0.05 * tf).to(x.dtype) + 0.2 * cond

    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = kdfast.sample(velocity, x, kd, guidance_scale=3.0, cond=cond, uncond=uncond,
                              generator=torch.Generator("cuda").manual_seed(0), disable=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    kd.set_timesteps(8, device="cuda")
    graphed = kdfast.sample(velocity, x, kd, guidance_scale=3.0, cond=cond, uncond=uncond,
                            generator=torch.Generator("cuda").manual_seed(0), cuda_graph=True)
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
    if not stochastic:  # the CPU loop computes the same
        kd.set_timesteps(8)
        cpu = kdfast.sample(velocity, x.cpu(), kd, guidance_scale=3.0, cond=cond.cpu(), uncond=uncond.cpu(),
                            disable=True)
        assert parity_error(eager.cpu(), cpu) <= 1e-5


def test_steps_on_the_training_schedule_before_set_timesteps():
    # diffusers steps on the schedule __init__ sets (no final sigma: its last timestep has no step)
    df, kd = DF(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    x = initial_sample()
    a = b = x
    for t_df, t_kd in list(zip(df.timesteps, kd.timesteps))[:5]:
        a = df.step(dummy_model(a, t_df), t_df, a).prev_sample
        b = kd.step(dummy_model(b, t_kd), t_kd, b).prev_sample
    assert parity_error(b, a) <= 1e-6
    kd = FlowMatchEulerDiscreteScheduler()
    kd.set_begin_index(len(kd.timesteps) - 1)
    with pytest.raises(IndexError, match="past the end"):
        kd.step(x, kd.timesteps[-1], x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_per_token_step_without_syncs_matches_diffusers(dtype):
    # a row of coefficients per token: thousands of small samples (4 channels) in one launch
    df, kd = DF(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    x, v, per_token = _per_token_case(df, kd, shape=(2, 3000, 4))
    x, v, per_token = x.to("cuda", dtype), v.to("cuda", dtype), per_token.cuda()
    kd.set_timesteps(8, device="cuda")
    df.set_timesteps(8, device="cuda")
    for s in (df, kd):
        s.set_begin_index(2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = kd.step(v, kd.timesteps[2], x, per_token_timesteps=per_token).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = df.step(v, df.timesteps[2], x, per_token_timesteps=per_token).prev_sample
    # (nvcc may contract the kernel's multiply-add into an FMA: within a rounding of diffusers')
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
