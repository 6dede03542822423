import copy
import logging
import pickle

import numpy as np
import pytest
import torch

from kdfast.schedulers.ltx_euler_ancestral_rf import LTXEulerAncestralRFScheduler
from parity import (assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error,
                    run_loop, settings)

DF = diffusers.LTXEulerAncestralRFScheduler
FLOW = diffusers.FlowMatchEulerDiscreteScheduler
K = LTXEulerAncestralRFScheduler
SIGMAS = [1.0, 0.975, 0.909, 0.725, 0.421, 0.1, 0.0]  # LTX-Video's distilled ComfyUI-style schedule


@pytest.fixture(autouse=True)
def _quiet_schedule_warnings():
    # both libraries warn about a nonzero terminal sigma and a mismatched step count; tests use them on purpose
    names = ("kdfast.schedulers.ltx_euler_ancestral_rf", "diffusers.schedulers.scheduling_ltx_euler_ancestral_rf")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    yield
    for n, level in zip(names, levels):
        logging.getLogger(n).setLevel(level)


def ltx_from_flow(**flow_config):
    """diffusers' LTX scheduler made from a flow-matching config (how a pipeline swaps it in):
    the flow keys stay in its config and shape its schedule."""
    ltx = {k: flow_config.pop(k) for k in ("eta", "s_noise") if k in flow_config}
    return DF.from_config(FLOW(**flow_config).config, **ltx)


ltx_from_flow.__name__ = "LTXEulerAncestralRFScheduler.from_config(FlowMatchEulerDiscreteScheduler)"


@pytest.mark.parametrize("config", [
    {},
    dict(eta=0.0),                      # deterministic (DDIM-like)
    dict(eta=0.5, s_noise=0.7),
    dict(s_noise=0.0),                  # eta > 0 but no noise: no rescale either, as in diffusers
    dict(eta=-0.3),                     # sigma_down above sigma_next, no noise
    dict(eta=2.0, s_noise=1.3),         # sigma_down below 0: the renoise clamp
    dict(num_train_timesteps=500),
])
@pytest.mark.parametrize("steps", [1, 2, 5, 30])
def test_parity(config, steps):
    assert_parity(K, DF, config, steps=steps)


@pytest.mark.parametrize("flow_config", [
    dict(shift=3.0),
    dict(shift=1.0, shift_terminal=0.1, eta=0.6),             # LTX-Video's own
    dict(shift=3.0, use_karras_sigmas=True),
    dict(shift=2.0, use_exponential_sigmas=True),
    dict(shift=2.0, use_beta_sigmas=True, s_noise=0.5),
])
@pytest.mark.parametrize("steps", [2, 8, 25])
def test_parity_with_flow_matching_schedules(flow_config, steps):
    assert_parity(K, ltx_from_flow, flow_config, steps=steps)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_parity_dynamic_shifting_needs_mu(time_shift_type):
    flow = dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                max_image_seq_len=4096, shift_terminal=0.1, time_shift_type=time_shift_type)
    assert_parity(K, ltx_from_flow, flow, steps=12, mu=1.6)
    with pytest.raises(ValueError, match="mu"):
        K.from_config(ltx_from_flow(**flow).config).set_timesteps(12)


@pytest.mark.parametrize("config", [{}, dict(eta=0.4, s_noise=0.9)])
@pytest.mark.parametrize("as_tensor, alias", [(False, False), (True, False), (False, True)])
def test_parity_explicit_sigmas(config, as_tensor, alias):
    # ComfyUI-style: the schedule, terminal 0 included; timesteps are sigmas * 1000, the terminal
    # one too, and the loop's last step (there) returns the sample itself
    sigmas = torch.tensor(SIGMAS) if as_tensor else list(SIGMAS)
    kwargs = dict(timesteps=sigmas) if alias else dict(sigmas=sigmas)
    got, _ = assert_parity(K, DF, config, steps=None, **kwargs)
    kd = K(**config)
    kd.set_timesteps(**kwargs)
    assert kd.num_inference_steps == len(SIGMAS) - 1 and len(kd.timesteps) == len(SIGMAS)
    assert torch.equal(kd.timesteps, torch.tensor(SIGMAS) * 1000.0)


def test_parity_explicit_sigmas_with_a_step_count_and_no_terminal_zero(caplog):
    # a mismatched num_inference_steps is overridden (with a warning); a schedule not ending at 0
    # ends where it ends, noisy, as in diffusers
    assert_parity(K, DF, {}, steps=3, sigmas=SIGMAS)
    assert_parity(K, DF, {}, steps=None, sigmas=[1.0, 0.8, 0.5, 0.3])
    logging.getLogger("kdfast.schedulers.ltx_euler_ancestral_rf").setLevel(logging.WARNING)
    with caplog.at_level(logging.WARNING, logger="kdfast.schedulers.ltx_euler_ancestral_rf"):
        kd = K()
        kd.set_timesteps(5, sigmas=[1.0, 0.8, 0.5, 0.3])
    assert "terminal sigma should be 0.0" in caplog.text and "num_inference_steps=5" in caplog.text
    assert kd.num_inference_steps == 3


def test_schedules_equal_diffusers_bit_for_bit():
    def flow(**config):
        return lambda cls: cls.from_config(FLOW(**config).config)

    for make, kwargs in ((lambda c: c(), dict(num_inference_steps=28)),
                         (flow(shift=3.0, shift_terminal=0.1), dict(num_inference_steps=9)),
                         (flow(use_dynamic_shifting=True), dict(num_inference_steps=7, mu=1.2)),
                         (lambda c: c(num_train_timesteps=700), dict(sigmas=SIGMAS)),
                         (lambda c: c(), dict(timesteps=torch.tensor([0.9, 0.3, 0.0], dtype=torch.float64)))):
        df, kd = make(DF), make(K)
        df.set_timesteps(**kwargs)
        kd.set_timesteps(**kwargs)
        assert torch.equal(kd.sigmas, df.sigmas) and kd.sigmas.dtype == df.sigmas.dtype == torch.float32, kwargs
        assert torch.equal(kd.timesteps, df.timesteps) and kd.timesteps.dtype == df.timesteps.dtype, kwargs
        assert kd.num_inference_steps == df.num_inference_steps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [{}, dict(eta=0.5)])
def test_low_precision(dtype, config):
    assert_parity(K, DF, config, steps=15, dtype=dtype)
    assert_parity(K, DF, config, steps=None, dtype=dtype, sigmas=SIGMAS)


def test_float64_sample():
    # diffusers steps in float32 and casts back; kdfast steps a float64 sample in float64
    df, kd = DF(), K()
    got, expected = run_loop(kd, 10, initial_sample().double()), run_loop(df, 10, initial_sample().double())
    assert got.dtype == expected.dtype == torch.float64
    assert parity_error(got, expected) <= 1e-5


def test_guidance_fused():
    assert_parity(K, DF, dict(eta=0.7), steps=12, guidance_scale=4.0)
    # the fused step equals the step on the guidance combined outside
    a, b = K(), K()
    for s in (a, b):
        s.set_timesteps(6)
    x = y = initial_sample()
    for t in a.timesteps:
        u, c = dummy_cfg(x, t)
        x = a.step_cfg(u, c, 3.5, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        u, c = dummy_cfg(y, t)
        y = b.step(u + 3.5 * (c - u), t, y, generator=torch.Generator().manual_seed(1)).prev_sample
    assert parity_error(x, y) <= 1e-6


def test_noise_is_drawn_as_diffusers_draws_it():
    # the same generator gives diffusers' samples; another seed others
    got, _ = assert_parity(K, DF, {}, steps=10)
    other = run_loop(K(), 10, initial_sample(), seed=1)
    assert parity_error(other, got) > 1e-3
    # a list of generators draws per sample, as diffusers' randn_tensor
    outs = []
    for cls in (DF, K):
        s = cls()
        s.set_timesteps(5)
        gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
        x = initial_sample()
        for t in s.timesteps:
            x = s.step(dummy_model(x, t), t, x, generator=gens).prev_sample
        outs.append(x)
    assert parity_error(outs[1], outs[0]) <= 1e-5
    # draws only where diffusers draws (not into the last sigma, where x0 is returned, nor without
    # eta or s_noise): the generator ends a loop where diffusers' does
    for config in ({}, dict(eta=0.0), dict(s_noise=0.0)):
        states = []
        for cls in (DF, K):
            s = cls(**config)
            s.set_timesteps(4)
            gen = torch.Generator().manual_seed(6)
            x = initial_sample()
            for t in s.timesteps:
                x = s.step(dummy_model(x, t), t, x, generator=gen).prev_sample
            states.append(gen.get_state())
        assert torch.equal(states[0], states[1]), config
    # diffusers draws even where the noise scale is 0 (eta 3 puts sigma_down at -0.17: the
    # renoise clamp): the generator state advances the same, and the step is the same
    for cls in (DF, K):
        s = cls(eta=3.0)
        s.set_timesteps(sigmas=[1.0, 0.1, 0.0])
        gen = torch.Generator().manual_seed(4)
        x = initial_sample()
        outs.append(s.step(dummy_model(x, s.timesteps[0]), s.timesteps[0], x, generator=gen).prev_sample)
        outs.append(torch.randn(3, generator=gen))
    assert parity_error(outs[4], outs[2]) <= 1e-6 and torch.equal(outs[3], outs[5])
    assert not s._table.plans[0].uses("noise")


def test_variance_noise_replaces_the_draw():
    df, kd = DF(eta=0.8), K(eta=0.8)
    for s in (df, kd):
        s.set_timesteps(4)
    x = y = initial_sample()
    for t in kd.timesteps:
        gen = torch.Generator().manual_seed(int(t))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))
        x = df.step(dummy_model(x, t), t, x, generator=gen).prev_sample
        y = kd.step(dummy_model(y, t), t, y, variance_noise=noise).prev_sample
    assert parity_error(y, x) <= 1e-5


def test_one_fused_pass_per_step_and_no_host_reads(monkeypatch):
    import kdfast.schedulers.base as base

    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(1) or real(*a))
    for kwargs, n_steps in ((dict(num_inference_steps=6), 6), (dict(sigmas=SIGMAS), len(SIGMAS) - 1)):
        calls.clear()
        kd = K(eta=0.6)
        kd.set_timesteps(**kwargs)
        x = initial_sample()
        outputs = [dummy_model(x, t) for t in kd.timesteps]
        gen = torch.Generator().manual_seed(0)
        last = None
        with no_host_reads():
            for t, o in zip(kd.timesteps, outputs):
                last = x
                x = kd.step(o, t, x, generator=gen).prev_sample
                u = kd.step_index
        assert len(calls) == n_steps and torch.isfinite(x).all()
        # the explicit schedule's terminal timestep is past the last sigma: the sample comes back, no kernel
        assert (x is last) == ("sigmas" in kwargs) and u == n_steps


def test_return_dict_false_and_device():
    outs = []
    for cls in (K, DF):
        s = cls(eta=0.5)
        s.set_timesteps(3, device="cpu")
        assert s.timesteps.device.type == "cpu" and s.sigmas.device.type == "cpu"
        x = initial_sample()
        for t in s.timesteps:
            out = s.step(dummy_model(x, t), t, x, torch.Generator().manual_seed(2), False)
            assert isinstance(out, tuple) and len(out) == 1
            x = out[0]
        outs.append(x)
        assert tuple(s._sigma_broadcast(torch.tensor([2.0]), x).shape) == (1, 1, 1, 1)
    assert parity_error(outs[0], outs[1]) <= 1e-5


def test_past_the_end_returns_the_sample_like_diffusers():
    for s in (DF(), K()):
        s.set_timesteps(2)
        x = initial_sample()
        for t in s.timesteps:
            x = s.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        again = s.step(x, s.timesteps[-1], x)
        assert again.prev_sample is x and s.step_index == 2
        assert s.step(x, s.timesteps[-1], x, return_dict=False)[0] is x


def test_a_begin_index_past_the_end_like_diffusers():
    for s in (DF(), K()):
        s.set_timesteps(4)
        s.set_begin_index(9)
        x = initial_sample()
        assert s.step(x, s.timesteps[0], x).prev_sample is x and s.step_index == 4


def test_begin_index_and_repeated_timesteps_like_diffusers():
    sigmas = [1.0, 0.8, 0.8, 0.5, 0.2, 0.0]  # a repeated value: a lookup takes its second match
    for start in (0, 1, 3):
        outs = []
        for cls in (DF, K):
            s = cls()
            s.set_timesteps(sigmas=sigmas)
            if start == 3:
                s.set_begin_index(start)
            x = initial_sample()
            first = s.timesteps[start] if start != 1 else float(s.timesteps[start])  # a value finds it too
            for k, t in enumerate(s.timesteps[start:]):
                x = s.step(dummy_model(x, t), first if k == 0 else t, x,
                           generator=torch.Generator().manual_seed(k)).prev_sample
            outs.append((x, s.step_index))
        assert parity_error(outs[1][0], outs[0][0]) <= 1e-5 and outs[0][1] == outs[1][1], start
    kd = K()
    kd.set_timesteps(sigmas=sigmas)
    assert kd.index_for_timestep(kd.timesteps[1]) == 1  # an element: its own position
    assert kd.index_for_timestep(800.0) == 2 == DF.index_for_timestep(kd, kd.timesteps[1])


def test_copies_continue_the_same_loop():
    kd = K()
    kd.set_timesteps(6)
    x = initial_sample()
    for t in kd.timesteps[:2]:
        x = kd.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(2)).prev_sample
    outs = []
    for s in (kd, copy.deepcopy(kd), pickle.loads(pickle.dumps(kd))):
        y = x
        for t in s.timesteps[2:]:
            y = s.step(dummy_model(y, t), t, y, generator=torch.Generator().manual_seed(3)).prev_sample
        outs.append(y)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_config_round_trip(tmp_path):
    df = DF(eta=0.4, s_noise=0.8)
    kd = K.from_config(df.config)
    assert settings(kd.config) == settings(df.config)
    kd.save_pretrained(tmp_path)
    assert settings(DF.from_pretrained(tmp_path).config) == settings(df.config)
    assert settings(K.from_pretrained(tmp_path).config) == settings(df.config)
    # from a flow-matching config and back: the flow keys stay in the config, as in diffusers
    flow = FLOW(shift=3.0, shift_terminal=0.1)
    df, kd = DF.from_config(flow.config), K.from_config(flow.config)
    assert settings(kd.config) == settings(df.config) and kd.config.shift == 3.0
    assert settings(FLOW.from_config(kd.config).config) == settings(FLOW.from_config(df.config).config)
    assert [c.__name__ for c in kd.compatibles] == ["LTXEulerAncestralRFScheduler", "FlowMatchEulerDiscreteScheduler"]
    assert len(kd) == 1000 and kd.order == 1


def test_bad_input():
    for name, bad in (("eta", float("nan")), ("s_noise", float("inf")), ("eta", "1"), ("num_train_timesteps", 0)):
        with pytest.raises(ValueError, match=name):
            K(**{name: bad})
    kd = K()
    x = initial_sample()
    assert kd.timesteps is None and kd.sigmas is None  # as diffusers, before set_timesteps
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.step(x, torch.tensor(999.0), x)
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.index_for_timestep(999.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        kd.set_timesteps()
    with pytest.raises(ValueError, match="num_inference_steps"):
        kd.set_timesteps(0)
    with pytest.raises(TypeError, match="`sigmas` must be a list or torch.Tensor"):
        kd.set_timesteps(sigmas=np.array(SIGMAS))  # diffusers refuses numpy arrays too
    with pytest.raises(ValueError, match="`sigmas` must be a 1D tensor"):
        kd.set_timesteps(sigmas=torch.ones(2, 3))
    with pytest.raises(ValueError, match="`timesteps` must hold at least one sigma"):
        kd.set_timesteps(timesteps=[])
    with pytest.raises(ValueError, match="`sigmas` must be finite"):
        kd.set_timesteps(sigmas=[1.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="`sigmas` must be a list of numbers"):
        kd.set_timesteps(sigmas=[1.0, "a"])
    kd.set_timesteps(4)
    t = kd.timesteps[0]
    with pytest.raises(ValueError, match="integer"):
        kd.step(x, 5, x)
    with pytest.raises(ValueError, match="not in `self.timesteps`"):
        kd.step(x, torch.tensor(123.0), x)
    with pytest.raises(ValueError, match="shape"):
        kd.step(x[:1], t, x)
    with pytest.raises(TypeError, match="bogus"):
        kd.step_cfg(x, x, 2.0, t, x, bogus=1)
    with pytest.raises(ValueError, match="guidance_scale"):
        kd.step_cfg(x, x, float("nan"), t, x)
    with pytest.raises(ValueError, match="generator: got a list of 3 generators for a batch of 2"):
        kd.step(x, t, x, generator=[torch.Generator() for _ in range(3)])
    assert kd.step_index in (None, 0)


@pytest.mark.parametrize("sigmas, config", [
    ([0.0, 0.5, 0.1], {}),              # from sigma 0 up: diffusers divides by it
    ([0.6, 0.0, 0.4, 0.0], dict(eta=0.0)),
])
def test_finite_or_a_clear_error_where_diffusers_gives_nan(sigmas, config):
    df, kd = DF(**config), K(**config)
    for s in (df, kd):
        s.set_timesteps(sigmas=sigmas)
    x = initial_sample()
    expected = x
    for t in df.timesteps:
        gen = torch.Generator().manual_seed(0)
        expected = df.step(dummy_model(expected, t), t, expected, generator=gen).prev_sample
    assert not torch.isfinite(expected).all()
    bad = sigmas.index(0.0) if sigmas[0] != 0.0 else 0
    with pytest.raises(ValueError, match=rf"step {bad} \(sigma 0 to .*divides by sigma = 0"):
        for t in kd.timesteps:
            x = kd.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isfinite(x).all() and kd.step_index == bad


def test_mochi_style_inverted_flow_sigmas_raise_where_diffusers_gives_nan():
    df, kd = ltx_from_flow(invert_sigmas=True), K.from_config(ltx_from_flow(invert_sigmas=True).config)
    for s in (df, kd):
        s.set_timesteps(4)
    assert torch.equal(kd.sigmas, df.sigmas) and float(kd.sigmas[0]) == 0.0
    x, t = initial_sample(), kd.timesteps[0]
    assert not torch.isfinite(df.step(dummy_model(x, t), df.timesteps[0], x).prev_sample).all()
    with pytest.raises(ValueError, match="divides by sigma = 0"):
        kd.step(dummy_model(x, t), t, x)
