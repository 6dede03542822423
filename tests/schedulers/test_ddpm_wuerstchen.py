"""DDPMWuerstchenScheduler (Würstchen, Stable Cascade) against diffusers: loops in the pipelines'
calling form, batches at mixed timesteps, half precision, host reads, add_noise, config, errors."""
import copy
import math
import pickle

import pytest
import torch

import kdfast
import kdfast.schedulers.base as base
from kdfast.schedulers.ddpm_wuerstchen import DDPMWuerstchenScheduler
from parity import diffusers, initial_sample, no_host_reads, parity_error, settings

DF = diffusers.DDPMWuerstchenScheduler


def eps_model(x: torch.Tensor, t, cond=None) -> torch.Tensor:
    """A noise prediction consistent with a data guess that depends on x and t (per sample), so
    loops stay O(1) as with a real model: any mistake in x, t or the schedule shows up."""
    tf = torch.as_tensor(t).double().reshape(-1).to(x.device).view(-1, *[1] * (x.dim() - 1))
    ac = (torch.cos((tf + 0.008) / 1.008 * math.pi / 2) ** 2).clamp(1e-4, 0.9999)
    xf = x.double()
    x0 = 0.8 * torch.tanh(1.3 * xf + 0.3 * tf) + 0.1 + (0 if cond is None else 0.1 * cond.double())
    return ((xf - ac.sqrt() * x0) / (1 - ac).sqrt()).to(x.dtype)


def cfg_model(x, t):
    return eps_model(x, t), eps_model(0.97 * x + 0.02, t)


def pipeline_timestep(t, x):
    """What Stable Cascade's pipelines pass: ``t.expand(batch).to(dtype)``."""
    return t.expand(x.shape[0]).to(x.dtype)


def wloop(scheduler, x, steps=10, seed=0, guidance_scale=None, fused=False, form=pipeline_timestep, generator=None,
          **set_kwargs):
    """Stable Cascade's loop: set_timesteps, then a step from every timestep but the last."""
    if steps is not None:
        scheduler.set_timesteps(steps, **set_kwargs)
    else:
        scheduler.set_timesteps(**set_kwargs)
    gen = torch.Generator().manual_seed(seed) if generator is None else generator
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:-1]:
        ratio = form(t, x)
        if guidance_scale is None:
            m = eps_model(scheduler.scale_model_input(x, ratio), ratio)
            x = scheduler.step(model_output=m, timestep=ratio, sample=x, generator=gen).prev_sample
        else:
            u, c = cfg_model(x, ratio)
            if fused:
                x = scheduler.step_cfg(u, c, guidance_scale, ratio, x, generator=gen).prev_sample
            else:
                x = scheduler.step(torch.lerp(u, c, guidance_scale), ratio, x, generator=gen).prev_sample
    return x


def assert_loop_parity(config, steps=10, shape=(2, 4, 8, 8), tol=1e-5, **kwargs):
    x = initial_sample(shape)
    df, kd = DF(**config), DDPMWuerstchenScheduler(**config)
    want = wloop(df, x, steps, **kwargs)
    got = wloop(kd, x, steps, **kwargs)
    assert torch.equal(kd.timesteps.cpu().double(), df.timesteps.cpu().double())
    assert got.dtype == want.dtype and torch.isfinite(got).all()
    err = parity_error(got, want)
    assert err <= tol, f"{config} steps={steps}: parity error {err:.3e}"
    return got, want


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("s", [0.008, 0.03])
@pytest.mark.parametrize("scaler", [0.5, 1.0, 1.7, 2.0])
def test_parity_scalers_offsets_and_steps(scaler, s, steps):
    got, want = assert_loop_parity(dict(scaler=scaler, s=s), steps)
    # the noise follows the generator
    other = wloop(DDPMWuerstchenScheduler(scaler=scaler, s=s), initial_sample(), steps, seed=1)
    assert parity_error(other, got) > 1e-3


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 3, 7, 5), (5, 16), (4, 2, 3, 3, 2)])
def test_parity_batch_sizes_and_shapes(shape):
    assert_loop_parity(dict(scaler=1.3), 20, shape=shape)


@pytest.mark.parametrize("timesteps", [
    [1.0, 0.9, 0.6, 0.33, 0.1, 0.0],
    [0.9, 0.5, 0.2],  # not ending at 0: the last step adds noise too
    torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]),
    torch.tensor([1.0, 0.8, 0.55, 0.3, 0.05, 0.0], dtype=torch.float64),  # kept float64, as in diffusers
    [0.7, 0.0],
])
@pytest.mark.parametrize("scaler", [0.7, 1.0, 2.5])
def test_parity_custom_timesteps(timesteps, scaler):
    got, _ = assert_loop_parity(dict(scaler=scaler), None, timesteps=timesteps)
    kd = DDPMWuerstchenScheduler(scaler=scaler)
    kd.set_timesteps(timesteps=timesteps)
    if isinstance(timesteps, torch.Tensor):
        assert kd.timesteps is timesteps  # diffusers keeps the tensor it is given
    else:
        assert kd.timesteps.dtype == torch.float32
    assert kd.num_inference_steps == len(timesteps) - 1


@pytest.mark.parametrize("form", ["element", "pipeline", "number", "cpu copy"])
def test_every_timestep_form_gives_the_pipeline_result(form):
    forms = {"element": lambda t, x: t, "pipeline": pipeline_timestep, "number": lambda t, x: float(t),
             "cpu copy": lambda t, x: t.expand(x.shape[0]).clone()}
    want = wloop(DF(scaler=1.5), initial_sample(), 12)
    got = wloop(DDPMWuerstchenScheduler(scaler=1.5), initial_sample(), 12, form=forms[form])
    assert parity_error(got, want) <= 1e-5


@pytest.mark.parametrize("value", [0.75, 0.65, 0.15, 0.05, 0.98])
def test_a_timestep_off_the_schedule_steps_from_the_nearest_first_on_a_tie(value):
    # 0.75 and 0.05 are ties in float32 (0.8 / 0.7, 0.1 / 0): diffusers' argmin takes the first
    df, kd = DF(), DDPMWuerstchenScheduler()
    for s in (df, kd):
        s.set_timesteps(10)
    x = initial_sample((2, 3, 4, 4))
    t = torch.tensor([value, value])
    assert torch.equal(kd.previous_timestep(t), df.previous_timestep(t))
    outs = [s.step(eps_model(x, t), t, x, generator=torch.Generator().manual_seed(1)).prev_sample for s in (df, kd)]
    # (0.05 -> 0: alpha = 0.998, whose 1 - alpha diffusers forms in float32, 4e-5 relative)
    assert parity_error(outs[1], outs[0]) <= 1e-5


def test_off_schedule_lookups_are_remembered_within_a_bound():
    # a training loop steps at a random t each batch: the lookups kept one entry per value
    kd = DDPMWuerstchenScheduler()
    kd.set_timesteps(10)
    df = DF()
    df.set_timesteps(10)
    values = torch.rand(3000, generator=torch.Generator().manual_seed(0)) * 0.85 + 0.12
    for v in values.tolist():
        t = torch.tensor([v])
        assert torch.equal(kd.previous_timestep(t), df.previous_timestep(t)), v
    assert len(kd._nearest_cache[2]) <= 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scaler", [0.3, 1.0, 1.5, 3.0])
def test_alpha_cumprod_is_bit_identical_to_diffusers(scaler, dtype):
    kd, df = DDPMWuerstchenScheduler(scaler=scaler, s=0.011), DF(scaler=scaler, s=0.011)
    t = torch.linspace(0, 1, 1001).to(dtype)
    assert torch.equal(kd._alpha_cumprod(t, "cpu"), df._alpha_cumprod(t, "cpu"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scaler", [0.6, 1.0, 2.0])
def test_half_precision_keeps_dtype_and_matches(dtype, scaler):
    # Pipelines pass t.expand(batch).to(dtype): both round the timestep to dtype; the truth is fp32
    x = initial_sample()
    truth = wloop(DF(scaler=scaler), x, 20)
    same_dtype = wloop(DF(scaler=scaler), x.to(dtype), 20)
    got = wloop(DDPMWuerstchenScheduler(scaler=scaler), x.to(dtype), 20)
    assert got.dtype == same_dtype.dtype == dtype and torch.isfinite(got).all()
    err, base_err = parity_error(got, truth), parity_error(same_dtype, truth)
    assert err <= 2 * base_err + 1e-4, (err, base_err)


def test_half_precision_timesteps_are_rounded_as_in_diffusers():
    # One step from a bf16 timestep: alpha_cumprod of the rounded value (0.80078125, not 0.8),
    # computed in bf16 where diffusers' scaler > 1 branch computes in the timestep's dtype
    x = initial_sample((2, 3, 4, 4))
    for scaler in (1.0, 2.0):
        df, kd = DF(scaler=scaler), DDPMWuerstchenScheduler(scaler=scaler)
        outs = []
        for s in (df, kd):
            s.set_timesteps(10)
            t = s.timesteps[2].expand(2).to(torch.bfloat16)
            m = eps_model(x, t.float())
            outs.append(s.step(m, t, x, generator=torch.Generator().manual_seed(0)).prev_sample)
        assert parity_error(outs[1], outs[0]) <= 1e-6
        exact = kd.step(m, kd.timesteps[2], x, generator=torch.Generator().manual_seed(0)).prev_sample
        assert parity_error(outs[1], exact) > 1e-4  # (the rounding matters: a wrong dtype would show)


@pytest.mark.parametrize("config", [dict(), dict(scaler=0.5), dict(scaler=2.0, s=0.02)])
def test_float64_keeps_float64_and_matches(config):
    x = initial_sample().double()
    float32_t = lambda t, x: t.expand(x.shape[0])  # noqa: E731
    for form in (pipeline_timestep, float32_t):  # float64 timesteps, float32 ones
        want = wloop(DF(**config), x, 20, form=form)
        got = wloop(DDPMWuerstchenScheduler(**config), x, 20, form=form)
        assert got.dtype == torch.float64 and torch.isfinite(got).all()
        if torch.isnan(want).any():
            # t = 1 in float64 and 0.95 in float32 both sit at alpha_cumprod's floor 1e-4: rounding
            # makes it rise from 1e-4 to float32(1e-4), and diffusers' noise scale sqrt(-2.5e-8) NaN
            assert form is pipeline_timestep and config.get("scaler") == 2.0
            want = wloop(DF(**config), x, 20, form=float32_t)
            assert parity_error(got, want) <= 1e-5
        else:
            assert parity_error(got, want) <= 2e-6  # (diffusers' coefficients are float32)


def test_model_output_dtype_is_the_result_dtype():
    # diffusers returns pred.to(model_output.dtype)
    x = initial_sample((2, 3, 4, 4))
    outs = []
    for s in (DF(), DDPMWuerstchenScheduler()):
        s.set_timesteps(8)
        t = s.timesteps[1].expand(2)
        outs.append(s.step(eps_model(x, t).half(), t, x, generator=torch.Generator().manual_seed(0)).prev_sample)
    assert outs[0].dtype == outs[1].dtype == torch.float16
    assert parity_error(outs[1], outs[0]) <= 1e-3


# ---------------------------------------------------------------- batches at mixed timesteps


def test_a_batch_at_mixed_timesteps_is_one_pass_with_a_row_per_sample(monkeypatch):
    calls, one_row = [], []  # the kernel calls with a row per sample, and with one row
    real_base = base.fused_step
    monkeypatch.setattr(base, "fused_step",
                        lambda *a: (calls if a[2].dim() == 2 else one_row).append(a[2]) or real_base(*a))
    df, kd = DF(scaler=1.4), DDPMWuerstchenScheduler(scaler=1.4)
    for s in (df, kd):
        s.set_timesteps(10)
    # prev comes from timestep[0] (0.8 -> 0.7) for every sample, as in diffusers
    t = torch.tensor([0.8, 0.78, 0.75, 0.71, 0.8, 0.7])
    x = initial_sample((6, 3, 5, 5))
    m = eps_model(x, t)
    want = df.step(m, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
    got = kd.step(m, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
    assert parity_error(got, want) <= 1e-6
    assert len(calls) == 1 and calls[0].shape == (6, 29) and not one_row
    rows = calls[0]
    assert torch.equal(rows[0], rows[4]) and not torch.equal(rows[0], rows[1])
    # each sample reads its own row: the same as in a batch of two led by timestep 0.8 (same prev)
    noise = initial_sample((6, 3, 5, 5), seed=2)
    together = kd.step(m, t, x, variance_noise=noise).prev_sample
    for i in (1, 2, 3):
        pair = [0, i]
        two = kd.step(m[pair], t[pair], x[pair], variance_noise=noise[pair]).prev_sample
        assert torch.equal(two[1], together[i])
    calls.clear()
    # a batch at one timestep: one call with one row
    calls.clear()
    kd.step(m, kd.timesteps[2].expand(6), x)
    assert not calls and one_row[-1].dim() == 1


def test_mixed_timesteps_from_a_slice_of_the_schedule_and_a_generator_list():
    df, kd = DF(), DDPMWuerstchenScheduler()
    for s in (df, kd):
        s.set_timesteps(10)
    x = initial_sample((2, 3, 4, 4))
    outs = []
    for s in (df, kd):
        t = s.timesteps[3:5]  # 0.7 and 0.6: both step to 0.6 (the second by zero)
        gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
        outs.append(s.step(eps_model(x, t), t, x, generator=gens).prev_sample)
    assert parity_error(outs[1], outs[0]) <= 1e-6
    torch.testing.assert_close(outs[1][1], x[1])  # t == prev: alpha = 1, no noise


def test_a_sample_below_the_previous_timestep_is_refused_where_diffusers_gives_nan():
    df, kd = DF(), DDPMWuerstchenScheduler()
    for s in (df, kd):
        s.set_timesteps(10)
    t = torch.tensor([0.8, 0.6])  # prev = 0.7 (from 0.8): 0.6 lies below it
    x = initial_sample((2, 3, 4, 4))
    assert torch.isnan(df.step(eps_model(x, t), t, x).prev_sample[1]).all()
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(ValueError, match=r"timestep 0\.6 .* below the step's previous timestep 0\.7"):
        kd.step(eps_model(x, t), t, x, generator=gen)
    assert torch.equal(gen.get_state(), state)  # refused before the draw


# ---------------------------------------------------------------- host reads


def test_no_host_reads_when_the_timestep_is_a_view_of_the_schedule():
    x = initial_sample()
    want = wloop(DDPMWuerstchenScheduler(), x, 10)
    kd = DDPMWuerstchenScheduler()
    kd.set_timesteps(10)
    forms = [pipeline_timestep, lambda t, x: t, lambda t, x: t.expand(x.shape[0]).to(torch.float32)]
    for form in forms:
        gen = torch.Generator().manual_seed(0)
        y = x
        with no_host_reads("cpu", "numpy"):
            for t in kd.timesteps[:-1]:
                ratio = form(t, y)
                y = kd.step(eps_model(y, t.detach().clone()), ratio, y, generator=gen).prev_sample
                kd.previous_timestep(ratio)
        assert torch.equal(y, want)
    with no_host_reads("cpu", "numpy"):
        u, c = cfg_model(x, torch.tensor(0.5))
        kd.step_cfg(u, c, 3.0, kd.timesteps[3:5], x)  # a slice: mixed timesteps, still no read


def test_a_timestep_on_the_host_is_read_from_memory():
    x = initial_sample(dtype=torch.bfloat16)
    want = wloop(DDPMWuerstchenScheduler(scaler=2.0), x, 10)
    kd = DDPMWuerstchenScheduler(scaler=2.0)
    kd.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    y = x
    with no_host_reads("cpu"):  # bf16 copies on the CPU, their coefficients made on first use
        for t in kd.timesteps[:-1]:
            ratio = pipeline_timestep(t, y)
            y = kd.step(eps_model(y, ratio), ratio, y, generator=gen).prev_sample
    assert torch.equal(y, want)


def test_a_timestep_copied_to_a_device_is_read_once_per_step(monkeypatch):
    # (a meta tensor stands in for one on a GPU: its values can only come back through .cpu())
    x = initial_sample(dtype=torch.bfloat16)
    want = wloop(DDPMWuerstchenScheduler(), x, 8)  # (and the coefficients of the bf16 timesteps made)
    kd = DDPMWuerstchenScheduler()
    kd.set_timesteps(8)
    reads, copies = [], []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: (reads.append(1) or copies[-1].reshape(self.shape))
                        if self.is_meta else real_cpu(self, *a, **k))
    gen = torch.Generator().manual_seed(0)
    y = x
    for i, t in enumerate(kd.timesteps[:-1]):
        ratio = pipeline_timestep(t, y)
        on_device = ratio.to("meta")
        copies.append(ratio)
        m = eps_model(y, ratio)
        with no_host_reads():
            y = kd.step(m, on_device, y, generator=gen).prev_sample
        assert len(reads) == i + 1
    assert torch.equal(y, want)


def test_one_fused_pass_per_step(monkeypatch):
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a[7]) or real(*a))
    kd = DDPMWuerstchenScheduler()
    wloop(kd, initial_sample(), 6)
    assert len(calls) == 6
    # the last step (to 0) reads no noise (its coefficient is 0); the others do
    assert all(n is not None for n in calls[:-1]) and calls[-1] is None


# ---------------------------------------------------------------- noise


def test_the_generator_is_used_as_diffusers_uses_it_every_step_the_last_included():
    gens = []
    for cls in (DF, DDPMWuerstchenScheduler):
        gen = torch.Generator().manual_seed(4)
        wloop(cls(), initial_sample(), 5, generator=gen)
        gens.append(gen.get_state())
    assert torch.equal(gens[0], gens[1])
    # the last step alone draws too (its noise is multiplied by 0)
    kd = DDPMWuerstchenScheduler()
    kd.set_timesteps(5)
    gen = torch.Generator().manual_seed(4)
    x = initial_sample()
    kd.step(eps_model(x, kd.timesteps[-2]), kd.timesteps[-2], x, generator=gen)
    assert not torch.equal(gen.get_state(), torch.Generator().manual_seed(4).get_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variance_noise_is_the_drawn_noise(dtype):
    kd = DDPMWuerstchenScheduler()
    kd.set_timesteps(10)
    x = initial_sample(dtype=dtype)
    t = kd.timesteps[4]
    m = eps_model(x, t)
    drawn = kd.step(m, t, x, generator=torch.Generator().manual_seed(9)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=dtype)  # (diffusers' draw)
    given = kd.step(m, t, x, variance_noise=noise).prev_sample
    assert torch.equal(given, drawn)
    doubled = kd.step(m, t, x, variance_noise=2 * noise).prev_sample
    assert parity_error(doubled, drawn) > 1e-2
    with pytest.raises(ValueError, match="both generator and variance_noise"):
        kd.step(m, t, x, generator=torch.Generator(), variance_noise=noise)
    with pytest.raises(ValueError, match=r"variance_noise must be a tensor of shape \(2, 4, 8, 8\)"):
        kd.step(m, t, x, variance_noise=noise[:1])


def test_a_list_of_generators_draws_per_sample_like_diffusers():
    outs = []
    for cls in (DF, DDPMWuerstchenScheduler):
        gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
        s = cls()
        s.set_timesteps(6)
        x = initial_sample()
        for t in s.timesteps[:-1]:
            r = pipeline_timestep(t, x)
            x = s.step(eps_model(x, r), r, x, generator=gens).prev_sample
        outs.append(x)
    assert parity_error(outs[1], outs[0]) <= 1e-5
    kd = DDPMWuerstchenScheduler()
    kd.set_timesteps(4)
    x = initial_sample()
    with pytest.raises(ValueError, match="generator: got a list of 3 generators for a batch of 2"):
        kd.step(eps_model(x, kd.timesteps[0]), kd.timesteps[0], x, generator=[torch.Generator()] * 3)


# ---------------------------------------------------------------- guidance, outputs, loops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_cfg_equals_step_on_the_guided_output(dtype):
    x = initial_sample(dtype=dtype)
    want = wloop(DF(scaler=1.2), x, 12, guidance_scale=4.0)
    got = wloop(DDPMWuerstchenScheduler(scaler=1.2), x, 12, guidance_scale=4.0, fused=True)
    unfused = wloop(DDPMWuerstchenScheduler(scaler=1.2), x, 12, guidance_scale=4.0)
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert parity_error(got, want) <= 1e-5 and parity_error(unfused, want) <= 1e-5
    else:  # (the fused guidance is computed in fp32, diffusers' lerp in bf16)
        truth = wloop(DF(scaler=1.2), x.float(), 12, guidance_scale=4.0)
        assert parity_error(got, truth) <= 2 * parity_error(want, truth) + 1e-4


def test_outputs_and_tuple_like_diffusers():
    x = initial_sample()
    outs = []
    for s in (DF(), DDPMWuerstchenScheduler()):
        s.set_timesteps(4)
        t = pipeline_timestep(s.timesteps[1], x)
        outs.append(s.step(eps_model(x, t), t, x, generator=torch.Generator().manual_seed(0), return_dict=False))
        # positional, as diffusers orders them: (model_output, timestep, sample, generator, return_dict)
        assert isinstance(s.step(eps_model(x, t), t, x, None, False), tuple)
    assert isinstance(outs[1], tuple) and len(outs[1]) == len(outs[0]) == 1
    assert parity_error(outs[1][0], outs[0][0]) <= 1e-6
    kd = DDPMWuerstchenScheduler()
    kd.set_timesteps(4)
    out = kd.step(eps_model(x, kd.timesteps[0]), kd.timesteps[0], x)
    assert list(out.keys()) == ["prev_sample"] and out[0] is out.prev_sample is out["prev_sample"]
    assert kd.scale_model_input(x, kd.timesteps[0]) is x and kd.init_noise_sigma == 1.0


def test_previous_timestep_matches_diffusers():
    df, kd = DF(), DDPMWuerstchenScheduler()
    for s in (df, kd):
        s.set_timesteps(7)
    for i in range(7):
        for form in (lambda t: t.expand(3), lambda t: t.expand(3).to(torch.bfloat16), lambda t: t[None] - 0.01):
            want, got = df.previous_timestep(form(df.timesteps[i])), kd.previous_timestep(form(kd.timesteps[i]))
            assert got.shape == want.shape and torch.equal(got, want)
    assert kd.previous_timestep(kd.timesteps[2]).data_ptr() == kd.timesteps[3].data_ptr()  # (a view, no copy)
    with pytest.raises(IndexError):
        df.previous_timestep(df.timesteps[-1:])
    with pytest.raises(ValueError, match="last one"):
        kd.previous_timestep(kd.timesteps[-1:])


def test_kdfast_sample_runs_the_pipeline_loop():
    x = initial_sample()
    for guided in (False, True):
        kwargs = dict(guidance_scale=3.0, cond=torch.full_like(x, 0.5), uncond=torch.zeros_like(x)) if guided else {}
        s = DDPMWuerstchenScheduler(scaler=1.5)
        s.set_timesteps(6)
        got = kdfast.sample(eps_model, x, s, generator=torch.Generator().manual_seed(7), disable=True, **kwargs)
        by_hand = DDPMWuerstchenScheduler(scaler=1.5)
        by_hand.set_timesteps(6)
        gen = torch.Generator().manual_seed(7)
        y = x
        for t in by_hand.timesteps[:-1]:
            if guided:
                u, c = eps_model(y, t, cond=kwargs["uncond"]), eps_model(y, t, cond=kwargs["cond"])
                y = by_hand.step(u + 3.0 * (c - u), t, y, generator=gen).prev_sample
            else:
                y = by_hand.step(eps_model(y, t), t, y, generator=gen).prev_sample
        assert parity_error(got, y) <= 1e-6


def test_copies_continue_like_the_original():
    kd = DDPMWuerstchenScheduler(scaler=1.3)
    kd.set_timesteps(8)
    want = wloop(kd, initial_sample(), None, timesteps=kd.timesteps)
    for clone in (copy.deepcopy(kd), pickle.loads(pickle.dumps(kd))):
        got = wloop(clone, initial_sample(), None, timesteps=clone.timesteps)
        assert torch.equal(got, want)


def test_an_assigned_schedule_is_checked_and_followed():
    kd, df = DDPMWuerstchenScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(4)
        s.timesteps = torch.tensor([1.0, 0.6, 0.3, 0.0])
    x = initial_sample()
    outs = []
    for s in (df, kd):
        y, gen = x, torch.Generator().manual_seed(0)
        for t in s.timesteps[:-1]:
            r = pipeline_timestep(t, y)
            y = s.step(eps_model(y, r), r, y, generator=gen).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) <= 1e-5
    with pytest.raises(ValueError, match="strictly descending"):
        kd.timesteps = [0.3, 0.6]


def test_timesteps_edited_in_place_are_followed_like_diffusers():
    # scheduler.timesteps[1] -= 0.05 changes the tensor, not the attribute: no setter runs
    outs = []
    for cls in (DF, DDPMWuerstchenScheduler):
        s = cls(scaler=1.3)
        s.set_timesteps(10)
        s.timesteps[1] -= 0.05
        y, gen = initial_sample(), torch.Generator().manual_seed(0)
        for t in s.timesteps[:-1]:
            r = pipeline_timestep(t, y)
            y = s.step(eps_model(y, r), r, y, generator=gen).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) <= 1e-5
    assert parity_error(outs[1], wloop(DDPMWuerstchenScheduler(scaler=1.3), initial_sample(), 10)) > 1e-3


# ---------------------------------------------------------------- add_noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scaler", [0.5, 1.0, 1.5, 2.0])
def test_add_noise_is_bit_identical_to_diffusers(scaler, dtype):
    x, n = initial_sample(dtype=dtype), initial_sample(dtype=dtype, seed=1)
    df, kd = DF(scaler=scaler), DDPMWuerstchenScheduler(scaler=scaler)
    for t in (torch.tensor([0.3, 0.9]), torch.tensor([0.55]), torch.tensor([0.0, 1.0]),
              torch.tensor([0.25, 0.7]).to(dtype)):
        want, got = df.add_noise(x, n, t), kd.add_noise(x, n, t)
        assert got.dtype == want.dtype == dtype and torch.equal(got, want)


def test_add_noise_stays_finite_where_diffusers_gives_nan():
    x, n = initial_sample(), initial_sample(seed=1)
    for scaler, outside, edge in ((0.5, -0.1, 0.0), (1.5, 1.2, 1.0)):
        df, kd = DF(scaler=scaler), DDPMWuerstchenScheduler(scaler=scaler)
        t = torch.tensor([outside, 0.5])
        assert torch.isnan(df.add_noise(x, n, t)[0]).all()
        got = kd.add_noise(x, n, t)
        assert torch.equal(got, kd.add_noise(x, n, torch.tensor([edge, 0.5])))  # the limit of the schedule
    # an integer scaler: diffusers is finite there, and so is kdfast, with the same values
    t = torch.tensor([1.2, 0.5])
    assert torch.equal(DDPMWuerstchenScheduler(scaler=2.0).add_noise(x, n, t), DF(scaler=2.0).add_noise(x, n, t))


def test_add_noise_errors_name_the_argument():
    kd = DDPMWuerstchenScheduler()
    x = initial_sample()
    with pytest.raises(ValueError, match="noise shape"):
        kd.add_noise(x, x[:1], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="timesteps: got 3 timesteps for a batch of 2"):
        kd.add_noise(x, x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(TypeError, match="timesteps"):
        kd.add_noise(x, x, "0.5")
    with pytest.raises(TypeError, match="timesteps must hold timestep ratios"):
        kd.add_noise(x, x, torch.tensor([True, False]))


# ---------------------------------------------------------------- config


def test_config_attributes_and_round_trips(tmp_path):
    df, kd = DF(scaler=1.5, s=0.02), DDPMWuerstchenScheduler(scaler=1.5, s=0.02)
    assert settings(kd.config) == settings(df.config) == {"scaler": 1.5, "s": 0.02}
    assert set(DDPMWuerstchenScheduler().config) == set(DF().config)
    assert kd.scaler == df.scaler and torch.equal(kd.s, df.s)
    assert torch.equal(kd._init_alpha_cumprod, df._init_alpha_cumprod)
    t = torch.linspace(0, 1, 11)
    assert torch.equal(kd._alpha_cumprod(t, "cpu"), df._alpha_cumprod(t, "cpu"))
    assert DDPMWuerstchenScheduler.diffusers_class_name() == "DDPMWuerstchenScheduler"
    # diffusers' config -> kdfast, kdfast's saved config -> diffusers and back
    assert settings(DDPMWuerstchenScheduler.from_config(df.config).config) == settings(df.config)
    kd.save_pretrained(tmp_path / "kd")
    loaded = DF.from_pretrained(tmp_path / "kd")
    assert settings(loaded.config) == settings(df.config)
    df.save_pretrained(tmp_path / "df")
    again = DDPMWuerstchenScheduler.from_pretrained(tmp_path / "df")
    assert settings(again.config) == settings(df.config) and again.scaler == 1.5
    assert type(DDPMWuerstchenScheduler.from_config(kd.config, scaler=0.5)).__name__ == "DDPMWuerstchenScheduler"
    assert DDPMWuerstchenScheduler.from_config(kd.config, scaler=0.5).scaler == 0.5
    # defaults left as defaults, as diffusers records them
    assert DDPMWuerstchenScheduler(scaler=2.0).config["_use_default_values"] == ["s"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(scaler=0.0), "scaler must be > 0"),
    (dict(scaler=-1.0), "scaler must be > 0"),
    (dict(scaler=float("nan")), "scaler must be a finite number"),
    (dict(scaler="2"), "scaler must be a finite number"),
    (dict(s=-0.1), "s must be >= 0"),
    (dict(s=float("inf")), "s must be a finite number"),
])
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDPMWuerstchenScheduler(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(), ValueError, "pass num_inference_steps or timesteps"),
    (dict(num_inference_steps=4, timesteps=[1.0, 0.0]), ValueError, "not both"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an integer >= 1"),
    (dict(num_inference_steps=2.5), ValueError, "num_inference_steps must be an integer >= 1"),
    (dict(timesteps=[0.5]), ValueError, "at least 2 timesteps"),
    (dict(timesteps=[[1.0, 0.0]]), ValueError, "1-D"),
    (dict(timesteps=[0.2, 0.5, 0.0]), ValueError, "strictly descending"),
    (dict(timesteps=[0.5, 0.5, 0.0]), ValueError, "strictly descending"),
    (dict(timesteps=[1.2, 0.0]), ValueError, r"ratios in \[0, 1\], got timesteps\[0\] = 1.2"),
    (dict(timesteps=[1.0, float("nan")]), ValueError, r"ratios in \[0, 1\]"),
    (dict(timesteps=torch.tensor([True, False])), TypeError, "timesteps must hold timestep ratios"),
])
def test_set_timesteps_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        DDPMWuerstchenScheduler().set_timesteps(**kwargs)


def test_step_errors_name_the_argument():
    kd = DDPMWuerstchenScheduler()
    x = initial_sample()
    m = eps_model(x, 0.5)
    with pytest.raises(ValueError, match="call set_timesteps"):
        kd.step(m, torch.tensor([0.5, 0.5]), x)
    kd.set_timesteps(5)
    t = kd.timesteps[1]
    with pytest.raises(ValueError, match="model_output shape"):
        kd.step(m[:1], t, x)
    with pytest.raises(ValueError, match="batch dimension"):
        kd.step(torch.tensor(0.5), t, torch.tensor(0.5))
    with pytest.raises(ValueError, match="timestep: got 3 timesteps for a batch of 2"):
        kd.step(m, t.expand(3), x)
    with pytest.raises(ValueError, match=r"timestep must hold ratios in \[0, 1\], got 1.5"):
        kd.step(m, torch.tensor([1.5, 0.5]), x)
    with pytest.raises(TypeError, match="timestep must hold timestep ratios"):
        kd.step(m, torch.tensor([True, True]), x)
    with pytest.raises(TypeError, match="timestep must be a tensor"):
        kd.step(m, "0.5", x)
    with pytest.raises(ValueError, match="empty"):
        kd.step(m, torch.tensor([]), x)
    with pytest.raises(TypeError, match="bogus_option"):
        kd.step(m, t, x, bogus_option=1)
    with pytest.raises(TypeError, match="bogus_option"):
        kd.step_cfg(m, m, 2.0, t, x, bogus_option=1)
    with pytest.raises(ValueError, match="^cond shape"):
        kd.step_cfg(m, m[:1], 2.0, t, x)


def test_a_step_from_the_last_timestep_is_refused_where_diffusers_fails():
    df, kd = DF(), DDPMWuerstchenScheduler()
    for s in (df, kd):
        s.set_timesteps(5)
    x = initial_sample()
    with pytest.raises(IndexError):
        df.step(eps_model(x, 0.0), df.timesteps[-1:].expand(2), x)
    for t in (kd.timesteps[-1], torch.tensor([0.05, 0.05])):  # the last, or nearest to it
        with pytest.raises(ValueError, match="nearest to it is its last one"):
            kd.step(eps_model(x, 0.0), t, x)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_pipeline_loop_syncs_only_to_read_a_copied_timestep():
    import warnings

    noises = [initial_sample(seed=10 + i) for i in range(8)]

    def run(device, dtype, syncs=None):
        kd = DDPMWuerstchenScheduler(scaler=1.5)
        kd.set_timesteps(8, device=device)
        y = initial_sample().to(device, dtype)
        for t, n in zip(kd.timesteps[:-1], noises):
            ratio = pipeline_timestep(t, y)  # fp32: a view of the schedule; bf16: a copy on the device
            m = eps_model(y, ratio)
            if syncs is None:
                y = kd.step(m, ratio, y, variance_noise=n.to(device, dtype)).prev_sample
                continue
            noise = n.to(device, dtype)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(syncs)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    y = kd.step(m, ratio, y, variance_noise=noise).prev_sample
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if syncs == "warn":
                assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1
        return y

    cpu = run("cpu", torch.float32)
    assert parity_error(run("cuda", torch.float32, syncs="error").cpu(), cpu) <= 1e-5
    cpu16 = run("cpu", torch.bfloat16)
    assert parity_error(run("cuda", torch.bfloat16, syncs="warn").cpu(), cpu16) <= 5e-2  # (a bf16 ulp or two a step)
