"""kdfast's PiflowScheduler against diffusers' (distilled Kandinsky 6): schedules, whole loops,
dtypes, the exactness of the collapsed step, step indexing, errors, configs and host reads."""
import copy
import pickle

import numpy as np
import pytest
import torch

import kdfast
from kdfast.schedulers.piflow import PiflowScheduler, _rollout_weights, _schedule
from parity import diffusers, initial_sample, no_host_reads, parity_error, settings

DF = diffusers.PiflowScheduler
KD = PiflowScheduler

# 4-D images, 5-D video (Kandinsky's [batch, frames, height, width, 16]), 3-D audio ([batch, length, channels])
SHAPES = [(2, 6, 5, 4), (2, 3, 4, 5, 16), (3, 7, 3)]


def widened(x: torch.Tensor, t, n_grid: int) -> torch.Tensor:
    """A deterministic widened output: ``n_grid`` different predictions per channel, in the last dimension,
    each a function of x and t (a mistake in x, t, a grid index or a channel shows up)."""
    tf = float(t) / 1000.0
    xf = x.float()
    grid = [torch.sin(1.3 * xf + tf + 0.37 * g) * 0.6 + 0.1 * xf * (1.0 - tf) + 0.05 * g for g in range(n_grid)]
    return torch.cat(grid, dim=-1).to(x.dtype)


def run(scheduler, steps, x, output_dtype=None, begin_index=None, start=0, **model_kwargs):
    """A pipeline's loop (Kandinsky 6's): the widened output, then ``step``."""
    scheduler.set_timesteps(steps)
    if begin_index is not None:
        scheduler.set_begin_index(begin_index)
    for t in scheduler.timesteps[start:]:
        m = widened(x, t, scheduler.config.n_grid)
        x = scheduler.step(m if output_dtype is None else m.to(output_dtype), t, x).prev_sample
    return x


CONFIGS = [
    {},                                                                  # shift 5, n_grid 10, 128 substeps, 0.5
    dict(shift=3.0, n_grid=3, num_policy_substeps=7),
    dict(shift=1.0, n_grid=2, final_step_size_scale=1.0),
    dict(shift=5.0, n_grid=10, num_policy_substeps=1),
    dict(shift=3.0, n_grid=10, final_step_size_scale=1.0, num_policy_substeps=128),
    dict(shift=1.0, n_grid=3, num_policy_substeps=128, final_step_size_scale=0.5),
    dict(shift=5.0, n_grid=2, num_policy_substeps=7, eps=1e-3),
    dict(shift=2.5, n_grid=4, num_policy_substeps=13, final_step_size_scale=0.3, num_train_timesteps=500),
]


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_loops_match_diffusers(config, steps):
    for shape in SHAPES:
        df, kd = DF(**config), KD.from_config(DF(**config).config)
        x = initial_sample(shape)
        expected, got = run(df, steps, x), run(kd, steps, x)
        assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape
        assert torch.isfinite(got).all()
        err = parity_error(got, expected)
        assert err <= 1e-5, (config, steps, shape, err)
        assert kd.step_index == df.step_index == steps


@pytest.mark.parametrize("config", CONFIGS[:4], ids=[str(c) for c in CONFIGS[:4]])
def test_schedule_equals_diffusers_bit_for_bit(config):
    kd, df = KD(**config), DF(**config)
    for n in (1, 2, 4, 7, 30):
        kd.set_timesteps(n)
        df.set_timesteps(n)
        for a, b in ((kd.timesteps, df.timesteps), (kd.sigmas, df.sigmas),
                     (kd._piflow_raw_timesteps, df._piflow_raw_timesteps)):
            assert a.dtype == b.dtype == torch.float32 and a.device == b.device and torch.equal(a, b), n
        assert kd.num_inference_steps == df.num_inference_steps == n
        assert kd.step_index is df.step_index is None and kd.begin_index is df.begin_index is None
    for name in ("n_grid", "eps", "final_step_size_scale", "num_policy_substeps"):
        assert getattr(kd, name) == getattr(df, name) and type(getattr(kd, name)) is type(getattr(df, name))
    assert len(kd) == len(df) == kd.config.num_train_timesteps and kd.order == df.order == 1


EXACT_CONFIGS = CONFIGS + [dict(eps=0.05, n_grid=5, num_policy_substeps=40),  # eps clamps the sigmas and the last step
                           dict(eps=0.3, n_grid=3, num_policy_substeps=5, shift=2.0),  # the last segment runs backwards
                           dict(eps=1e-9)]  # the policy's raw end, unwarped from float32 sigmas, is clamped at 0


@pytest.mark.parametrize("config", EXACT_CONFIGS, ids=[str(c) for c in EXACT_CONFIGS])
def test_the_collapse_is_exact_in_float64(config):
    # diffusers' rollout on float64 tensors (its scalars stay float32, as in its float32 steps): the same
    # float32 decisions, float64 linear algebra. kdfast's float64 step is the collapsed map, in float64.
    df, kd = DF(**config), KD(**config)
    for n in (1, 3, 8):
        df.set_timesteps(n)
        kd.set_timesteps(n)
        g, c = kd.n_grid, 3
        for i in range(n):
            x = torch.randn(2, 4, c, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            m = torch.randn(2, 4, g * c, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + i))
            expected = df._policy_step(m, x, i)
            kd.set_begin_index(i)
            kd._step_index = None
            got = kd.step(m, kd.timesteps[i], x).prev_sample
            assert got.dtype == expected.dtype == torch.float64
            assert parity_error(got, expected) <= 1e-13, (config, n, i, parity_error(got, expected))


def test_the_weights_are_the_rollout_of_basis_inputs():
    # The step of e_x (x = 1, m = 0) is a; of the g-th grid slot (x = 0, m = 1 there) is w_g: read back
    # from diffusers' own rollout in float64, the weights equal kdfast's
    df = DF(n_grid=4, shift=3.0, num_policy_substeps=20)
    df.set_timesteps(3)
    raw, sigmas, _ = _schedule(3, 3.0, 0.5, 1000)
    for i in range(3):
        raw_dst = raw[i + 1].item() if i < 2 else df.eps
        a, w = _rollout_weights(raw[i].item(), raw_dst, sigmas[i].item(), 3.0, df.eps, 4, 20)
        basis = torch.eye(5, dtype=torch.float64)
        x, m = basis[:, :1].reshape(5, 1, 1), basis[:, 1:].reshape(5, 1, 4)
        got = df._policy_step(m, x, i).reshape(5)
        assert torch.allclose(got, torch.tensor([a, *w], dtype=torch.float64), rtol=1e-13, atol=1e-15), (i, got, a, w)
        # (a real interpolation: several grid points; x - x0 does not depend on x, so a is 1 up to float32's
        # al + be != 1)
        assert (w != 0).sum() >= 2 and abs(a - 1) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [{}, dict(shift=3.0, n_grid=3, num_policy_substeps=7)], ids=["default", "3x7"])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_half_precision_within_twice_diffusers_error(dtype, config, steps):
    # DESIGN.md's rule: against diffusers' fp32 loop, at most ~2x diffusers' own error in that dtype
    shape = (2, 3, 4, 5, 16)
    x = initial_sample(shape, dtype)
    truth = run(DF(**config), steps, x.float())
    expected, got = run(DF(**config), steps, x), run(KD(**config), steps, x)
    assert got.dtype == expected.dtype == dtype and torch.isfinite(got).all()
    err, base = parity_error(got, truth), parity_error(expected, truth)
    assert err <= 2 * base + 1e-4, (err, base)


@pytest.mark.parametrize("sample_dtype, output_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float64), (torch.float32, torch.float64)])
def test_mixed_dtypes_compute_in_float32_like_diffusers(sample_dtype, output_dtype):
    # diffusers widens the sample to float32 and combines it with the model output as it comes (a bf16
    # output of a Kandinsky transformer with float32 latents); the result has the sample's dtype
    x = initial_sample((2, 3, 4, 5, 16), sample_dtype)
    tol = 1e-5 if sample_dtype == torch.float32 else torch.finfo(sample_dtype).eps
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(4)
    for t_kd, t_df in zip(kd.timesteps, df.timesteps):  # step by step, from the same inputs
        m = widened(x, t_kd, 10).to(output_dtype)
        got, expected = kd.step(m, t_kd, x).prev_sample, df.step(m, t_df, x).prev_sample
        assert got.dtype == expected.dtype == sample_dtype
        assert parity_error(got, expected) <= tol, parity_error(got, expected)
    # whole loops: a rounding of the output can flip with the sample's last bit, so the loops are held to the
    # tolerance rule against the float32 loop
    truth = run(DF(), 4, x.float())
    got, expected = run(KD(), 4, x, output_dtype=output_dtype), run(DF(), 4, x, output_dtype=output_dtype)
    assert got.dtype == expected.dtype == sample_dtype
    err, base = parity_error(got, truth), parity_error(expected, truth)
    assert err <= 2 * base + 1e-5, (err, base)


def test_float64_samples_step_in_float64():
    x = initial_sample((2, 3, 4, 5, 16), torch.float64)
    expected, got = run(DF(), 4, x), run(KD(), 4, x)
    assert got.dtype == expected.dtype == torch.float64
    # diffusers rounds the sample to float32 before each step (float64 otherwise); kdfast does not
    assert parity_error(got, expected) <= 1e-6
    assert parity_error(got, run(DF(), 4, x.float()).double()) <= 1e-5


def test_noncontiguous_inputs():
    # the super-resolution pipeline's latents are a permuted view; outputs may be slices of a bigger one
    base = initial_sample((2, 16, 3, 4, 5))
    x = base.permute(0, 2, 3, 4, 1)  # [2, 3, 4, 5, 16], channels not innermost in memory
    assert not x.is_contiguous()
    outs = []
    for cls in (DF, KD):
        s = cls()
        s.set_timesteps(3)
        y = x
        for t in s.timesteps:
            big = torch.cat([widened(y, t, 10), torch.zeros(*y.shape[:-1], 7)], dim=-1)
            y = s.step(big[..., :160], t, y).prev_sample  # a strided slice of a wider tensor
        outs.append(y)
    assert parity_error(outs[1], outs[0]) <= 1e-5


def test_fused_guidance_equals_guidance_outside():
    x = initial_sample((2, 3, 4, 5, 16))
    kd, plain, df = KD(), KD(), DF()
    for s in (kd, plain, df):
        s.set_timesteps(4)
    y_fused = y_plain = y_df = x
    for t_kd, t_df in zip(kd.timesteps, df.timesteps):
        u, c = widened(y_fused, t_kd, 10), widened(0.97 * y_fused + 0.02, t_kd, 10)
        y_fused = kd.step_cfg(u, c, 4.5, t_kd, y_fused).prev_sample
        u, c = widened(y_plain, t_kd, 10), widened(0.97 * y_plain + 0.02, t_kd, 10)
        y_plain = plain.step(u + 4.5 * (c - u), t_kd, y_plain).prev_sample
        u, c = widened(y_df, t_df, 10), widened(0.97 * y_df + 0.02, t_df, 10)
        y_df = df.step(u + 4.5 * (c - u), t_df, y_df).prev_sample
    assert parity_error(y_fused, y_plain) <= 1e-5 and parity_error(y_fused, y_df) <= 1e-5
    assert kd.step_index == 4
    # an output whose guidance weight is 0 is not read: uncond at scale 1, cond at scale 0
    kd.set_timesteps(2)
    t = kd.timesteps[0]
    m, nan = widened(x, t, 10), torch.full((2, 3, 4, 5, 160), float("nan"))
    a = kd.step_cfg(nan, m, 1.0, t, x).prev_sample
    kd.set_timesteps(2)
    b = kd.step_cfg(m, nan, 0.0, t, x).prev_sample
    kd.set_timesteps(2)
    assert torch.equal(a, b) and torch.equal(a, kd.step(m, t, x).prev_sample)
    # half-precision halves of one batched forward
    kd.set_timesteps(2)
    both = widened(torch.cat([x, 0.5 * x]), t, 10).half()
    got = kd.step_cfg(*both.chunk(2), 2.0, t, x).prev_sample
    u, c = both.float().chunk(2)
    kd.set_timesteps(2)
    assert got.dtype == torch.float32 and parity_error(got, kd.step(u + 2.0 * (c - u), t, x).prev_sample) <= 1e-6


@pytest.mark.parametrize("n_grid", [64, 65, 129])
def test_grids_beyond_the_kernels_weights(n_grid):
    # the kernels take 128 grid weights: a guided step of 65 grid points (130 weights), or an
    # unguided one of 129, is stepped by grid_combination's reference; the same values either way
    x = initial_sample((1, 2, 3, 8))
    kd, df = KD(n_grid=n_grid, num_policy_substeps=32), DF(n_grid=n_grid, num_policy_substeps=32)
    for s in (kd, df):
        s.set_timesteps(3)
    y_kd = y_df = x
    for t_kd, t_df in zip(kd.timesteps, df.timesteps):
        u, c = widened(y_kd, t_kd, n_grid), widened(0.97 * y_kd + 0.02, t_kd, n_grid)
        y_kd = kd.step_cfg(u, c, 3.0, t_kd, y_kd).prev_sample
        u, c = widened(y_df, t_df, n_grid), widened(0.97 * y_df + 0.02, t_df, n_grid)
        y_df = df.step(u + 3.0 * (c - u), t_df, y_df).prev_sample
    assert parity_error(y_kd, y_df) <= 1e-5


def test_outputs_and_tuples_like_diffusers():
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(3)
    x = initial_sample((2, 6, 5, 4))
    m = widened(x, 900, 10)
    got = kd.step(m, kd.timesteps[0], x, return_dict=False)
    want = df.step(m, df.timesteps[0], x, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want) == 1 and parity_error(got[0], want[0]) <= 1e-6
    out, out_df = kd.step(m, kd.timesteps[1], x), df.step(m, df.timesteps[1], x)
    assert list(out.keys()) == list(out_df.keys()) == ["prev_sample"]
    assert out[0] is out.prev_sample and out["prev_sample"] is out.prev_sample
    assert type(out).__name__ == type(out_df).__name__ == "PiflowSchedulerOutput"
    a = kd.step(m, kd.timesteps[2], x, False)  # return_dict by position, diffusers' order
    assert isinstance(a, tuple) and parity_error(a[0], df.step(m, df.timesteps[2], x, False)[0]) <= 1e-6


def test_step_index_and_begin_index_like_diffusers():
    x = initial_sample((2, 6, 5, 4))

    def loop(s, start, begin_index=None, as_value=False):
        s.set_timesteps(6)
        if begin_index is not None:
            s.set_begin_index(begin_index)
        seen, y = [s.step_index], x
        for t in s.timesteps[start:]:
            y = s.step(widened(y, t, 10), float(t) if as_value else t, y).prev_sample
            seen.append(s.step_index)
        return y, seen, s.begin_index

    for args in ((0,), (3,), (3, 3), (2, None, True), (5, 5, True), (4, 1)):
        got, expected = loop(KD(), *args), loop(DF(), *args)
        assert got[1] == expected[1] and got[2] == expected[2], args
        assert parity_error(got[0], expected[0]) <= 1e-5, args
    # set_timesteps starts a new loop
    kd = KD()
    kd.set_timesteps(4)
    kd.set_begin_index(2)
    kd.step(widened(x, 0, 10), kd.timesteps[0], x)
    assert kd.step_index == 3
    kd.set_timesteps(4)
    assert kd.step_index is None and kd.begin_index is None


def test_a_copy_is_stepped_with_the_originals_timesteps():
    # Kandinsky's pipeline deep-copies the scheduler for audio and steps it with the video schedule's t
    x = initial_sample((2, 7, 3))
    outs = []
    for cls in (DF, KD):
        s = cls(n_grid=2)
        s.set_timesteps(4)
        twin = copy.deepcopy(s)
        y = x
        for t in s.timesteps:
            y = twin.step(widened(y, t, 2), t, y).prev_sample
        outs.append((y, twin.step_index, s.step_index))
    assert outs[0][1:] == outs[1][1:] == (4, None) and parity_error(outs[1][0], outs[0][0]) <= 1e-5


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    s = KD(n_grid=3)
    s.set_timesteps(5)
    x = initial_sample((2, 6, 5, 4))
    for t in s.timesteps[:2]:
        x = s.step(widened(x, t, 3), t, x).prev_sample
    twin = copy.deepcopy(s) if how == "deepcopy" else pickle.loads(pickle.dumps(s))
    assert twin.step_index == s.step_index == 2
    for i in range(2, 5):
        a = s.step(widened(x, 1, 3), s.timesteps[i], x).prev_sample
        b = twin.step(widened(x, 1, 3), twin.timesteps[i], x).prev_sample
        assert torch.equal(a, b)
        x = a


def test_assigned_timesteps_are_looked_up_like_diffusers():
    # diffusers finds the step's index in the timesteps it holds now (weights by that index)
    outs = []
    for cls in (DF, KD):
        s = cls()
        s.set_timesteps(6)
        s.timesteps = s.timesteps[2:]
        x = initial_sample((2, 6, 5, 4))
        for t in s.timesteps:
            x = s.step(widened(x, t, 10), t, x).prev_sample
        outs.append((x, s.step_index))
    assert outs[0][1] == outs[1][1] == 4 and parity_error(outs[1][0], outs[0][0]) <= 1e-5


def test_a_repeated_timestep_is_its_second_match_like_diffusers():
    outs = []
    for cls in (DF, KD):
        s = cls()
        s.set_timesteps(4)
        t = s.timesteps.tolist()
        s.timesteps = torch.tensor([t[0], t[1], t[1], t[3]])
        x = initial_sample((2, 6, 5, 4))
        for v in (t[1], t[3]):  # numbers: compared by value
            x = s.step(widened(x, v, 10), v, x).prev_sample
        outs.append((x, s.step_index))
    assert outs[0][1] == outs[1][1] == 4 and parity_error(outs[1][0], outs[0][0]) <= 1e-5


def test_timestep_forms_are_found_like_diffusers():
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(5)
    x = initial_sample((2, 6, 5, 4))
    m = widened(x, 500, 10)
    for i in range(5):
        v = float(df.timesteps[i])
        for make in (lambda s: s.timesteps[i], lambda s: v, lambda s: torch.tensor(v), lambda s: np.float32(v),
                     lambda s: torch.tensor([v]), lambda s: torch.tensor(v, dtype=torch.float64),
                     lambda s: v + 1e-5):  # (diffusers compares in float32: within rounding is a match)
            outs = []
            for s in (kd, df):
                s._step_index = None
                outs.append(s.step(m, make(s), x).prev_sample)
            assert kd.step_index == df.step_index == i + 1, (i, make(kd))
            assert parity_error(outs[0], outs[1]) <= 1e-6
    kd._step_index = None
    kd.step(m, kd.timesteps[3].expand(2), x)  # (kdfast: an element expanded to the batch too)
    assert kd.step_index == 4


def test_step_path_makes_no_host_reads():
    kd = KD()
    kd.set_timesteps(4)
    x = initial_sample((2, 3, 4, 5, 16))
    for k, t in enumerate(list(kd.timesteps)):  # no begin index: the first timestep is found by its address
        u, c = widened(x, t, 10), widened(0.5 * x, t, 10).bfloat16()
        with no_host_reads("cpu", "numpy"):
            if k % 2:
                x = kd.step_cfg(u, c, 3.0, t.expand(2), x).prev_sample
            else:
                x = kd.step(u, t, x, return_dict=False)[0]
    assert kd.step_index == 4 and torch.isfinite(x).all()


def test_gradients_are_the_weights():
    kd = KD(n_grid=3)
    kd.set_timesteps(2)
    x = initial_sample((1, 2, 4)).requires_grad_(True)
    m = widened(x.detach(), 0, 3).requires_grad_(True)
    kd.step(m, kd.timesteps[0], x).prev_sample.sum().backward()
    a, *w = kd._coefs[0].tolist()
    assert torch.allclose(x.grad, torch.full_like(x, a))
    expected = torch.cat([torch.full((1, 2, 4), w[g]) for g in range(3)], dim=-1)
    assert torch.allclose(m.grad, expected)


def test_zero_weight_grid_points_are_not_read():
    # One substep from t = 1 lands on the last grid point: the others have weight 0 (diffusers reads the
    # one before with weight 0: a NaN there is its NaN, not kdfast's)
    kd = KD(num_policy_substeps=1)
    kd.set_timesteps(1)
    assert np.flatnonzero(kd._coefs[0][1:]).tolist() == [9]
    x = initial_sample((2, 6, 5, 4))
    m = widened(x, 1000, 10)
    m[..., :36] = float("nan")
    assert torch.isfinite(kd.step(m, kd.timesteps[0], x).prev_sample).all()
    # guided at scale 1 the unconditional output has weight 0 everywhere: not read at all
    kd.set_timesteps(1)
    assert torch.isfinite(kd.step_cfg(torch.full_like(m, float("nan")), m.nan_to_num(), 1.0, kd.timesteps[0],
                                      x).prev_sample).all()


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_fused_pass_per_step(monkeypatch, guided, dtype, unemulated_backends):
    # a step is one grid_combination kernel call, with the step's weights as its coefficients
    from kdfast.ops.grid_combination import combination_op
    calls = []
    real = combination_op._impls["cpu"]
    monkeypatch.setitem(combination_op._impls, "cpu", lambda *a: calls.append(a[2]) or real(*a))
    combination_op._cache.clear()
    try:
        kd = KD()
        kd.set_timesteps(4)
        x = initial_sample((2, 3, 4, 5, 16)).to(dtype)
        for i, t in enumerate(kd.timesteps):
            u = widened(x.float(), t, 10).to(dtype)
            x = kd.step_cfg(u, 0.5 * u, 2.5, t, x).prev_sample if guided else kd.step(u, t, x).prev_sample
            assert len(calls) == i + 1
            row = kd._coefs[i]
            expect = np.concatenate((row[:1], row[1:] * -1.5, row[1:] * 2.5)) if guided else row
            assert np.array_equal(calls[-1].numpy(), expect.astype(np.float32))
    finally:
        combination_op._cache.clear()


@pytest.mark.parametrize("guided", [False, True])
def test_kdfast_sample_runs_the_loop(guided):
    # kdfast.sample passes the denoiser's widened output (both halves of a guided batch) to step / step_cfg
    def denoiser(x, t, cond=None):
        m = widened(x, t, 10)
        return m if cond is None else m + 0.1 * cond.repeat(*([1] * (x.dim() - 1)), 10)

    x = initial_sample((2, 3, 4, 5, 16))
    cond, uncond = torch.full_like(x, 0.5), torch.zeros_like(x)
    kd = KD()
    kd.set_timesteps(4)
    if guided:
        got = kdfast.sample(denoiser, x, kd, guidance_scale=3.0, cond=cond, uncond=uncond, disable=True)
    else:
        got = kdfast.sample(denoiser, x, kd, disable=True)
    df = DF()
    df.set_timesteps(4)
    y = x
    for t in df.timesteps:
        if guided:
            u, c = denoiser(y, t, uncond), denoiser(y, t, cond)
            m = u + 3.0 * (c - u)
        else:
            m = denoiser(y, t)
        y = df.step(m, t, y).prev_sample
    assert parity_error(got, y) <= 1e-5


def test_save_load_and_config_keys_like_diffusers(tmp_path):
    assert list(settings(KD().config)) == list(settings(DF().config))
    assert settings(KD().config) == settings(DF().config)
    kd = KD(num_train_timesteps=500, shift=3.0, n_grid=4, eps=1e-5, final_step_size_scale=0.75, num_policy_substeps=64)
    kd.save_pretrained(tmp_path)
    assert settings(KD.from_pretrained(tmp_path).config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert settings(df.config) == settings(kd.config)
    df.save_pretrained(tmp_path / "df")
    assert settings(KD.from_pretrained(tmp_path / "df").config) == settings(kd.config)
    again = KD.from_config(df.config)
    assert (again.n_grid, again.eps, again.final_step_size_scale, again.num_policy_substeps) == (4, 1e-5, 0.75, 64)
    x = initial_sample((2, 6, 5, 4))
    assert parity_error(run(again, 3, x), run(DF.from_config(df.config), 3, x)) <= 1e-5
    assert KD.from_config(DF(shift=2.0).config).config.shift == 2.0
    assert KD.diffusers_class_name() == "PiflowScheduler" and DF in kd.compatibles


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_grid=1), "requires n_grid >= 2"),
    (dict(eps=0.0), "requires eps > 0"),
    (dict(eps=-1e-6), "requires eps > 0"),
    (dict(final_step_size_scale=0.0), "requires 0 < final_step_size_scale <= 1"),
    (dict(final_step_size_scale=1.5), "requires 0 < final_step_size_scale <= 1"),
    (dict(num_policy_substeps=0), "requires num_policy_substeps >= 1"),
])
def test_constructor_errors_like_diffusers(kwargs, match):
    for cls in (DF, KD):
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_grid=2.5), "n_grid must be an integer"),
    (dict(n_grid=True), "n_grid must be an integer"),
    (dict(num_policy_substeps=7.5), "num_policy_substeps must be an integer"),
    (dict(num_train_timesteps=0), "num_train_timesteps must be an integer >= 1"),
    (dict(shift=0.0), "shift must be > 0"),
    (dict(shift=-2.0), "shift must be > 0"),
    (dict(shift=float("nan")), "shift must be a finite number"),
    (dict(shift="5"), "shift must be a finite number"),
    (dict(eps=float("inf")), "eps must be a finite number"),
    (dict(final_step_size_scale=float("nan")), "final_step_size_scale"),
])
def test_constructor_refuses_what_diffusers_takes_wrongly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KD(**kwargs)


def test_set_timesteps_errors():
    for cls in (DF, KD):
        for kwargs in (dict(sigmas=[1.0, 0.5]), dict(mu=0.5), dict(timesteps=[999.0])):
            with pytest.raises(ValueError, match="only supports its configured distilled timestep schedule"):
                cls().set_timesteps(2, **kwargs)
        for n in (None, 0, -1):
            with pytest.raises(ValueError, match="num_inference_steps must be positive"):
                cls().set_timesteps(n)
    for n in (2.5, "4", True):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
            KD().set_timesteps(n)


def test_step_errors():
    x = initial_sample((2, 6, 5, 4))
    m = widened(x, 0, 10)
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(3)
    # diffusers' errors, the same in both
    for bad in (3, True, torch.tensor(5), torch.tensor(5, dtype=torch.int32)):
        for s in (kd, df):
            with pytest.raises(ValueError, match="Passing integer indices as timesteps"):
                s.step(m, bad, x)
    for s in (kd, df):
        with pytest.raises(ValueError, match="timestep 123.0 is not in the Piflow schedule"):
            s.step(m, 123.0, x)
        with pytest.raises(ValueError, match="must match sample shape except for the output channels"):
            s.step(m[:1], s.timesteps[0], x)
        with pytest.raises(ValueError, match="must match sample shape except for the output channels"):
            s.step(m[None], s.timesteps[0], x)
        with pytest.raises(ValueError, match=r"channels 39 are not divisible by n_grid=10"):
            s.step(m[..., :39], s.timesteps[0], x)
        with pytest.raises(ValueError, match=r"channels do not match the sample: expected 40, got 50"):
            s.step(torch.cat([m, m[..., :10]], -1), s.timesteps[0], x)
    assert kd.step_index is None  # a refused step changes nothing (diffusers: its index is set)
    # kdfast's own, naming the argument
    for bad in (np.int64(3), torch.tensor(3, dtype=torch.int16), torch.tensor(True)):
        with pytest.raises(ValueError, match="Passing integer indices as timesteps"):
            kd.step(m, bad, x)
    with pytest.raises(ValueError, match=r"timestep must be one value .* shape \(2,\)"):
        kd.step(m, torch.tensor([999.0, 500.0]), x)
    with pytest.raises(ValueError, match="timestep is an empty tensor"):
        kd.step(m, torch.tensor([]), x)
    with pytest.raises(TypeError, match="timestep must be a tensor or a number, got str"):
        kd.step(m, "999", x)
    with pytest.raises(TypeError, match="sample must be a torch.Tensor"):
        kd.step(m, kd.timesteps[0], x.numpy())
    with pytest.raises(TypeError, match="model_output must be a torch.Tensor"):
        kd.step(None, kd.timesteps[0], x)
    with pytest.raises(TypeError, match="sample must be float16, bfloat16, float32 or float64, got torch.int64"):
        kd.step(m, kd.timesteps[0], x.long())
    with pytest.raises(TypeError, match="model_output must be float16, bfloat16, float32 or float64"):
        kd.step(m.to(torch.int32), kd.timesteps[0], x)
    with pytest.raises(ValueError, match="sample must have a batch and a channel dimension"):
        kd.step(m[0, 0, 0], kd.timesteps[0], x[0, 0, 0])
    with pytest.raises(ValueError, match="model_output must be on cpu like sample, got meta"):
        kd.step(m.to("meta"), kd.timesteps[0], x)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        kd.step_cfg(m, m, float("nan"), kd.timesteps[0], x)
    with pytest.raises(ValueError, match="Piflow cond channels 39 are not divisible"):
        kd.step_cfg(m, m[..., :39], 2.0, kd.timesteps[0], x)
    for call in (lambda: kd.step(m, kd.timesteps[0], x, bogus_option=1),
                 lambda: kd.step_cfg(m, m, 2.0, kd.timesteps[0], x, bogus_option=1)):
        with pytest.raises(TypeError, match="bogus_option"):
            call()
    with pytest.raises(TypeError, match="bogus_option"):
        df.step(m, df.timesteps[0], x, bogus_option=1)
    assert kd.step_index is None
    # past the end, as in diffusers
    for s in (kd, df):
        s.set_timesteps(3)
        s.set_begin_index(3)
        with pytest.raises(RuntimeError, match="called after the schedule was exhausted"):
            s.step(m, s.timesteps[0], x)
    # before set_timesteps (diffusers: the timestep is not found in its empty schedule)
    with pytest.raises(ValueError, match="is not in the Piflow schedule"):
        DF().step(m, 999.0, x)
    for s in (KD(), KD()):
        s.set_begin_index(0)
        with pytest.raises(ValueError, match=r"call set_timesteps\(...\) before step"):
            s.step(m, 999.0, x)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_loop_without_syncs_and_as_a_cuda_graph():
    kd = KD()
    kd.set_timesteps(4, device="cuda")
    x = initial_sample((2, 3, 4, 5, 16)).cuda()
    cond, uncond = torch.full_like(x, 0.5), torch.zeros_like(x)
    grid = torch.arange(10, device="cuda", dtype=torch.float32).repeat_interleave(16)

    def denoiser(x, t, cond=None):  # capturable: t stays a device tensor
        m = torch.sin(1.3 * x.repeat(*([1] * (x.dim() - 1)), 10) + grid + t.float() / 1000) * 0.6
        return m if cond is None else m + 0.1 * cond.repeat(*([1] * (x.dim() - 1)), 10)

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = kdfast.sample(denoiser, x, kd, guidance_scale=3.0, cond=cond, uncond=uncond, disable=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    kd.set_timesteps(4, device="cuda")
    graphed = kdfast.sample(denoiser, x, kd, guidance_scale=3.0, cond=cond, uncond=uncond, cuda_graph=True)
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
    kd.set_timesteps(4)  # the CPU loop computes the same
    grid = grid.cpu()
    cpu = kdfast.sample(denoiser, x.cpu(), kd, guidance_scale=3.0, cond=cond.cpu(), uncond=uncond.cpu(),
                        disable=True)
    assert parity_error(eager.cpu(), cpu) <= 1e-5
