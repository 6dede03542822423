"""kdfast's HeliosDMDScheduler against diffusers': the DMD schedule, the distilled pyramid pipeline's
loop (start points as the re-noising tensors, amplified first chunks), dtypes, the lookups of the
step's sigmas without host reads (own and foreign schedules), one fused pass per step, outputs,
configs and errors."""
import copy
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.schedulers import base, helios
from kdfast.schedulers.helios import HeliosDMDScheduler, HeliosDMDSchedulerOutput
from parity import diffusers, dummy_model, initial_sample, no_host_reads, parity_error, settings

DF = diffusers.HeliosDMDScheduler
KD = HeliosDMDScheduler
SHAPE = (2, 4, 3, 8, 8)  # video latents [batch, channels, frames, height, width]


def dmd_kwargs(s, i, start, timesteps):
    """What pipeline_helios_pyramid passes to a distilled model's step."""
    return dict(cur_sampling_step=i, dmd_noisy_tensor=start, dmd_sigmas=s.sigmas, dmd_timesteps=s.timesteps,
                all_timesteps=timesteps)


def stage_loop(s, x, n, *set_args, output_dtype=None, guidance=None, **set_kwargs):
    """One stage of the distilled pipeline: the stage's first latents are its re-noising tensor."""
    s.set_timesteps(n, *set_args, **set_kwargs)
    timesteps, start = s.timesteps, x
    for i, t in enumerate(timesteps):
        m = dummy_model(x, t)
        if guidance is not None:
            m = m + guidance * (dummy_model(0.97 * x + 0.02, t) - m)
        x = s.step(m if output_dtype is None else m.to(output_dtype), t, x, return_dict=False,
                   **dmd_kwargs(s, i, start, timesteps))[0]
    return x


def pyramid_loop(s, x, steps, mu=None, amplify=False):
    """pipeline_helios_pyramid's distilled loop: each stage's schedule (the first chunk amplified), the
    latents upsampled 2x and renoised between stages, each stage's start point re-noising its steps."""
    start_points = [x]
    for stage, n in enumerate(steps):
        s.set_timesteps(n, stage, mu=mu, is_amplify_first_chunk=amplify)
        timesteps = s.timesteps
        if stage > 0:
            b, c, f, h, w = x.shape
            x = F.interpolate(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), size=(2 * h, 2 * w), mode="nearest")
            x = x.reshape(b, f, c, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)
            ori_sigma = 1 - s.ori_start_sigmas[stage]
            gamma = s.config.gamma
            alpha = 1 / (math.sqrt(1 + (1 / gamma)) * (1 - ori_sigma) + ori_sigma)
            beta = alpha * (1 - ori_sigma) / math.sqrt(gamma)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + stage))
            x = alpha * x + beta * noise
            start_points.append(x)
        for i, t in enumerate(timesteps):
            kwargs = dmd_kwargs(s, i, start_points[stage], timesteps)
            x = s.step(dummy_model(x, t), t, x, return_dict=False, **kwargs)[0]
    return x


# ---------------------------------------------------------------- schedule


SCHEDULE_CASES = [
    (dict(), dict(stage_index=0)), (dict(), dict(stage_index=2, is_amplify_first_chunk=True)),
    (dict(shift=3.0), dict(stage_index=1)),
    (dict(use_dynamic_shifting=True), dict(stage_index=1, mu=0.8)),
    (dict(use_dynamic_shifting=True, time_shift_type="exponential"), dict(stage_index=2, mu=1.1)),
    (dict(stages=1), dict()), (dict(stages=1, shift=3.0), dict(is_amplify_first_chunk=True)),
    (dict(stages=1, use_dynamic_shifting=True), dict(mu=0.9)),
    (dict(stages=1), dict(sigmas=np.linspace(0.999, 0.0, 8)[:-1])),
]


@pytest.mark.parametrize("config, kwargs", SCHEDULE_CASES, ids=[f"{c}-{k}" for c, k in SCHEDULE_CASES])
def test_schedule_equals_diffusers_bit_for_bit(config, kwargs):
    kd, df = KD(**config), DF(**config)
    for name in ("timestep_ratios", "start_sigmas", "end_sigmas", "ori_start_sigmas"):
        assert getattr(kd, name) == getattr(df, name), name
    for name in ("timesteps_per_stage", "sigmas_per_stage"):
        got, want = getattr(kd, name), getattr(df, name)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert (kd.sigma_min, kd.sigma_max, kd.gamma) == (df.sigma_min, df.sigma_max, df.gamma)
    for n in (1, 2, 7):
        kd.set_timesteps(n, **kwargs)
        df.set_timesteps(n, **kwargs)
        for a, b in ((kd.timesteps, df.timesteps), (kd.sigmas, df.sigmas)):
            assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), (n, a, b)
        assert kd.num_inference_steps == df.num_inference_steps
        assert kd.step_index is df.step_index is None and kd.begin_index is df.begin_index is None


# ---------------------------------------------------------------- parity


CONFIGS = [{}, dict(shift=5.0), dict(use_dynamic_shifting=True),
           dict(use_dynamic_shifting=True, time_shift_type="exponential"),
           dict(gamma=0.5, stages=2, stage_range=[0, 0.4, 1])]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("amplify", [False, True])
def test_distilled_pyramid_loops_match_diffusers(config, amplify):
    mu = 0.9 if config.get("use_dynamic_shifting") else None
    stages = config.get("stages", 3)
    for steps in ([1] * stages, [2, 3, 4][:stages], [10] * stages):
        df = DF(**config)
        kd = KD.from_config(df.config)
        x = initial_sample((1, 4, 2, 4, 4))
        expected, got = pyramid_loop(df, x, steps, mu, amplify), pyramid_loop(kd, x, steps, mu, amplify)
        assert got.shape == expected.shape and got.dtype == expected.dtype == torch.float32
        err = parity_error(got, expected)
        assert err <= 1e-5, (config, steps, err)


STAGE1 = [({}, {}), (dict(shift=3.0), {}), (dict(use_dynamic_shifting=True), dict(mu=1.0)),
          ({}, dict(sigmas=np.linspace(0.999, 0.0, 9)[:-1])), ({}, dict(is_amplify_first_chunk=True))]


@pytest.mark.parametrize("config, kwargs", STAGE1, ids=[f"{c}-{k}" for c, k in STAGE1])
def test_single_stage_loops_match_diffusers(config, kwargs):
    x = initial_sample(SHAPE)
    n = 7 if "sigmas" in kwargs else 8
    expected = stage_loop(DF(stages=1, **config), x, n, **kwargs)
    got = stage_loop(KD(stages=1, **config), x, n, **kwargs)
    assert parity_error(got, expected) <= 1e-5


def test_the_step_is_diffusers_float64_x0_then_renoised():
    # one step from the same inputs, at each position of a schedule: x0 (diffusers: float64, rounded to the
    # model output's dtype) renoised to the next timestep, the last step x0 itself
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(4, 1, is_amplify_first_chunk=True)
    x, noise = initial_sample(SHAPE), initial_sample(SHAPE, seed=5)
    for i, (t_kd, t_df) in enumerate(zip(kd.timesteps, df.timesteps)):
        m = dummy_model(x, t_kd)
        got = kd.step(m, t_kd, x, **dmd_kwargs(kd, i, noise, kd.timesteps)).prev_sample
        want = df.step(m, t_df, x, **dmd_kwargs(df, i, noise, df.timesteps)).prev_sample
        assert parity_error(got, want) <= 1e-6, i
        sigma = df.sigmas[i].item()
        x0 = x.double() - sigma * m.double()
        if i < len(df.timesteps) - 1:
            nxt = df.sigmas[i + 1].item()
            assert parity_error(got, (1 - nxt) * x0 + nxt * noise.double()) <= 1e-6
        else:
            assert parity_error(got, x0) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_diffusers_error(dtype):
    x = initial_sample(SHAPE)
    for stage in (0, 2):
        truth = stage_loop(DF(), x.double(), 6, stage)
        expected, got = stage_loop(DF(), x.to(dtype), 6, stage), stage_loop(KD(), x.to(dtype), 6, stage)
        assert got.dtype == expected.dtype == dtype
        err, base_err = parity_error(got, truth), parity_error(expected, truth)
        assert err <= 2 * base_err, (err, base_err)


def test_result_dtypes_are_diffusers():
    # the re-noised sample has the noise's dtype, the last step's x0 the model output's
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(2, 0)
    x = initial_sample(SHAPE)
    for noise_dtype, out_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                   (torch.float16, torch.float16)):
        noise = initial_sample(SHAPE, seed=3).to(noise_dtype)
        for i in range(2):
            m = dummy_model(x, 900).to(out_dtype)
            got = kd.step(m, kd.timesteps[i], x, **dmd_kwargs(kd, i, noise, kd.timesteps)).prev_sample
            want = df.step(m, df.timesteps[i], x, **dmd_kwargs(df, i, noise, df.timesteps)).prev_sample
            assert got.dtype == want.dtype == (noise_dtype if i == 0 else out_dtype)
            # (diffusers rounds x0 to the model output's dtype first; kdfast does not)
            assert parity_error(got, want) <= 4 * max(torch.finfo(noise_dtype).eps, torch.finfo(out_dtype).eps)


def test_float64_samples_step_in_float64():
    x = initial_sample(SHAPE, torch.float64)
    expected, got = stage_loop(DF(), x, 5, 1), stage_loop(KD(), x, 5, 1)
    assert got.dtype == expected.dtype == torch.float64 and parity_error(got, expected) <= 1e-12


def test_any_rank_gives_the_video_values():
    # diffusers' sigma is [batch, 1, 1, 1, 1]: only 5-D latents keep their shape there; kdfast steps any rank
    x5 = initial_sample((2, 4, 3, 8, 8))
    expected = stage_loop(DF(), x5, 4, 1)
    for shape in ((2, 4, 24, 8), (2, 768)):
        got = stage_loop(KD(), x5.reshape(shape), 4, 1)  # (the model is elementwise: the same values)
        assert got.shape == shape and parity_error(got.reshape(x5.shape), expected) <= 1e-6


def test_diffusers_helpers_match():
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(5, 1)
    x, noise = initial_sample(SHAPE), initial_sample(SHAPE, seed=2)
    m = dummy_model(x, 800)
    t = torch.full((2,), 700, dtype=torch.long)
    assert torch.equal(kd.convert_flow_pred_to_x0(m, x, t, kd.sigmas, kd.timesteps),
                       df.convert_flow_pred_to_x0(m, x, t, df.sigmas, df.timesteps))
    assert torch.equal(kd.add_noise(x, noise, t, kd.sigmas, kd.timesteps),
                       df.add_noise(x, noise, t, df.sigmas, df.timesteps))
    assert kd.time_shift(0.8, 1.0, 0.5) == df.time_shift(0.8, 1.0, 0.5)


# ---------------------------------------------------------------- lookups and host reads


def test_the_pipeline_loop_makes_no_host_reads():
    kd = KD(use_dynamic_shifting=True)
    x = initial_sample(SHAPE)
    for stage in range(3):
        kd.set_timesteps(3, stage, mu=0.9, is_amplify_first_chunk=stage == 0)
        timesteps, start = kd.timesteps, x
        for i, t in enumerate(timesteps):
            u, c = dummy_model(x, t), dummy_model(0.5 * x, t).bfloat16()
            with no_host_reads("cpu", "numpy"):
                if i % 2:
                    x = kd.step_cfg(u, c, 2.0, t, x, **dmd_kwargs(kd, i, start, timesteps)).prev_sample
                else:
                    x = kd.step(u, t, x, return_dict=False, **dmd_kwargs(kd, i, start, timesteps))[0]
    assert torch.isfinite(x).all() and kd.step_index is None


FOREIGN = {
    "copies": lambda s: dict(dmd_sigmas=s.sigmas.clone(), dmd_timesteps=s.timesteps.clone()),
    "float32 copies": lambda s: dict(dmd_sigmas=s.sigmas.float(), dmd_timesteps=s.timesteps.float()),
    "own sigmas, copied timesteps": lambda s: dict(dmd_sigmas=s.sigmas, dmd_timesteps=s.timesteps.clone()),
    "other sigmas, own timesteps": lambda s: dict(dmd_sigmas=s.sigmas * 0.5),
    "all_timesteps copied": lambda s: dict(all_timesteps=s.timesteps.clone()),
    "all_timesteps as a list": lambda s: dict(all_timesteps=s.timesteps.tolist()),
    "another schedule": lambda s: dict(dmd_sigmas=s.sigmas.flip(0), dmd_timesteps=s.timesteps.flip(0) * 0.5),
}


@pytest.mark.parametrize("foreign", sorted(FOREIGN))
def test_foreign_schedules_are_looked_up_on_the_device_without_host_reads(monkeypatch, foreign):
    # tensors that are not this scheduler's own: diffusers' argmin lookups, run as tensor operations on the
    # sample's device; the coefficients a row per sample there. Same values as diffusers, no host read
    rows = []
    real = helios.fused_step
    monkeypatch.setattr(helios, "fused_step", lambda *a: rows.append(a[2]) or real(*a))
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(4, 1)
    x, noise = initial_sample(SHAPE), initial_sample(SHAPE, seed=4)
    for i in range(4):
        m = dummy_model(x, 500)
        kw_kd = {**dmd_kwargs(kd, i, noise, kd.timesteps), **FOREIGN[foreign](kd)}
        kw_df = {**dmd_kwargs(df, i, noise, df.timesteps), **FOREIGN[foreign](df)}
        with no_host_reads("cpu", "numpy"):
            got = kd.step(m, kd.timesteps[i], x, **kw_kd).prev_sample
        want = df.step(m, df.timesteps[i], x, **kw_df).prev_sample
        assert parity_error(got, want) <= 1e-6, i
        x = want
    # (a list holds host values, and the last step reads no all_timesteps entry: the table's rows there)
    expected_rows = {"all_timesteps as a list": 0, "all_timesteps copied": 3}.get(foreign, 4)
    assert len(rows) == expected_rows and all(r.shape == (2, 29) for r in rows)


@pytest.mark.parametrize("form", ["number", "float32 tensor", "off the schedule", "expanded"])
def test_timestep_forms_give_diffusers_lookup(form):
    # diffusers truncates the timestep to an integer and takes the nearest schedule entry
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(5, 0)
    x, noise = initial_sample(SHAPE), initial_sample(SHAPE, seed=4)
    m = dummy_model(x, 700)
    for i in range(5):
        v = df.timesteps[i].item()
        t = {"number": v, "float32 tensor": torch.tensor(v, dtype=torch.float32), "off the schedule": v - 37.6,
             "expanded": None}[form]
        got = kd.step(m, kd.timesteps[i].expand(2) if t is None else t, x,
                      **dmd_kwargs(kd, i, noise, kd.timesteps)).prev_sample
        want = df.step(m, df.timesteps[i] if t is None else t, x, **dmd_kwargs(df, i, noise, df.timesteps)).prev_sample
        assert parity_error(got, want) <= 1e-6, (form, i)


def test_timesteps_within_an_integer_are_found_as_diffusers_finds_them():
    # closely spaced timesteps: the truncated timestep can be nearest to another entry, in either lookup
    s_kd, s_df = KD(stages=1), DF(stages=1)
    sigmas = np.array([0.9, 0.8005, 0.8, 0.7996, 0.5, 0.3], dtype=np.float64)
    for s in (s_kd, s_df):
        s.set_timesteps(5, sigmas=sigmas)
    x = initial_sample(SHAPE)
    noise = initial_sample(SHAPE, seed=9)
    for i in range(len(s_df.timesteps)):
        m = dummy_model(x, 500)
        got = s_kd.step(m, s_kd.timesteps[i], x, **dmd_kwargs(s_kd, i, noise, s_kd.timesteps)).prev_sample
        want = s_df.step(m, s_df.timesteps[i], x, **dmd_kwargs(s_df, i, noise, s_df.timesteps)).prev_sample
        assert parity_error(got, want) <= 1e-6, i


@pytest.mark.parametrize("all_timesteps", ["list", "tensor"])
def test_the_renoising_lookup_is_in_the_timesteps_dtype_like_diffusers(all_timesteps):
    # diffusers' add_noise subtracts the integer timestep from the float32 schedule in float32 (its x0 lookup
    # in float64): here |1999.7 - 1000| and |0.30005 - 1000| tie in float32, and the first entry wins
    sigmas = np.array([1.9996999502182007, 0.00030004949076101184, 0.5], dtype=np.float32)
    kd, df = KD(stages=1), DF(stages=1)
    for s in (kd, df):
        s.set_timesteps(2, sigmas=sigmas)
        assert s.timesteps.dtype == torch.float32
    x, noise = initial_sample(SHAPE), initial_sample(SHAPE, seed=4)
    m = dummy_model(x, 500)
    outs = []
    for s in (kd, df):
        nxt = [s.timesteps[0].item(), 1000.0]
        kwargs = {**dmd_kwargs(s, 0, noise, s.timesteps),
                  "all_timesteps": nxt if all_timesteps == "list" else torch.tensor(nxt)}
        outs.append(s.step(m, s.timesteps[0], x, **kwargs).prev_sample)
    sigma = df.sigmas[0].item()  # (the tie's first entry, not the nearer second)
    assert parity_error(outs[1], (1 - sigma) * (x.double() - sigma * m.double()) + sigma * noise.double()) <= 1e-6
    assert parity_error(outs[0], outs[1]) <= 1e-6


def test_one_fused_pass_per_step(monkeypatch):
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(helios, "fused_step", lambda *a: calls.append(a) or real(*a))
    kd = KD()
    x = initial_sample(SHAPE)
    total = 0
    for stage in range(3):
        kd.set_timesteps(3, stage)
        timesteps, start = kd.timesteps, x
        for i, t in enumerate(timesteps):
            x = kd.step(dummy_model(x, t), t, x, **dmd_kwargs(kd, i, start, timesteps)).prev_sample
            total += 1
            assert len(calls) == total
            # the start point is read as noise except at the last step; the coefficients are a CPU row
            assert (calls[-1][7] is start) == (i < 2) and calls[-1][2].shape == (29,)
    with no_host_reads():  # (the table's rows are float32 CPU tensors, made in set_timesteps)
        assert all(c[2].dtype == torch.float32 for c in calls)


@pytest.mark.parametrize("guided", [False, True])
def test_kdfast_sample_runs_the_pipeline_loop(guided):
    # kdfast.sample passes the pipeline's arguments, the loop's first sample as the stage's start point
    def model(x, t, cond=None):
        m = dummy_model(x, t)
        return m if cond is None else m + 0.1 * cond

    x = initial_sample(SHAPE)
    kwargs = dict(guidance_scale=3.0, cond=torch.full_like(x, 0.5), uncond=torch.zeros_like(x)) if guided else {}
    kd = KD()
    kd.set_timesteps(4, 1)
    got = kdfast.sample(model, x, kd, disable=True, **kwargs)
    df = DF()
    df.set_timesteps(4, 1)
    y = x
    for i, t in enumerate(df.timesteps):
        if guided:
            u, c = model(y, t, kwargs["uncond"]), model(y, t, kwargs["cond"])
            m = u + 3.0 * (c - u)
        else:
            m = model(y, t)
        y = df.step(m, t, y, **dmd_kwargs(df, i, x, df.timesteps)).prev_sample
    assert parity_error(got, y) <= 1e-5


# ---------------------------------------------------------------- outputs, copies, config


def test_outputs_and_tuples_like_diffusers():
    kd, df = KD(), DF()
    for s in (kd, df):
        s.set_timesteps(2, 0)
    x = initial_sample(SHAPE)
    m = dummy_model(x, 900)
    got = kd.step(m, kd.timesteps[0], x, None, False, **dmd_kwargs(kd, 0, x, kd.timesteps))
    want = df.step(m, df.timesteps[0], x, None, False, **dmd_kwargs(df, 0, x, df.timesteps))
    assert isinstance(got, tuple) and len(got) == len(want) == 1 and parity_error(got[0], want[0]) <= 1e-6
    out = kd.step(m, kd.timesteps[1], x, **dmd_kwargs(kd, 1, x, kd.timesteps))
    out_df = df.step(m, df.timesteps[1], x, **dmd_kwargs(df, 1, x, df.timesteps))
    assert type(out).__name__ == type(out_df).__name__ == "HeliosDMDSchedulerOutput"
    assert isinstance(out, HeliosDMDSchedulerOutput) and list(out.keys()) == list(out_df.keys()) == ["prev_sample"]
    assert out[0] is out.prev_sample and out.to_tuple() == (out.prev_sample,)
    assert kd.step_index is df.step_index is None  # (diffusers' DMD step keeps no index)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_step_like_the_original(how):
    kd = KD()
    kd.set_timesteps(3, 1)
    twin = copy.deepcopy(kd) if how == "deepcopy" else pickle.loads(pickle.dumps(kd))
    x = initial_sample(SHAPE)
    for i in range(3):
        m = dummy_model(x, 500)
        a = kd.step(m, kd.timesteps[i], x, **dmd_kwargs(kd, i, x, kd.timesteps)).prev_sample
        b = twin.step(m, twin.timesteps[i], x, **dmd_kwargs(twin, i, x, twin.timesteps)).prev_sample
        assert torch.equal(a, b)


def test_assigned_and_edited_schedules_are_followed_like_diffusers():
    x, noise = initial_sample(SHAPE), initial_sample(SHAPE, seed=1)
    outs = []
    for cls in (DF, KD):
        s = cls()
        s.set_timesteps(4, 1)
        s.sigmas = s.sigmas * 0.9
        y = x
        for i in range(4):
            if i == 2:
                s.sigmas[3] = 0.1  # edited in place
                s.timesteps[3] = 400.0
            t = s.timesteps[i]
            y = s.step(dummy_model(y, t), t, y, **dmd_kwargs(s, i, noise, s.timesteps)).prev_sample
        outs.append(y)
    assert parity_error(outs[1], outs[0]) <= 1e-6


def test_config_keys_defaults_and_round_trips(tmp_path):
    assert list(settings(KD().config)) == list(settings(DF().config))
    assert settings(KD().config) == settings(DF().config)
    kd = KD(num_train_timesteps=800, shift=2.0, stages=2, stage_range=[0, 0.4, 1], gamma=0.25,
            use_dynamic_shifting=True, time_shift_type="exponential")
    kd.save_pretrained(tmp_path)
    assert settings(KD.from_pretrained(tmp_path).config) == settings(kd.config)
    df = DF.from_pretrained(tmp_path)
    assert settings(df.config) == settings(kd.config)
    df.save_pretrained(tmp_path / "df")
    again = KD.from_pretrained(tmp_path / "df")
    assert settings(again.config) == settings(kd.config)
    assert KD.diffusers_class_name() == "HeliosDMDScheduler" and DF in kd.compatibles
    # (the DMD scheduler takes the config of a HeliosScheduler; its UniPC keys stay unused, as in diffusers)
    helios_config = diffusers.HeliosScheduler(stages=2, stage_range=[0, 0.5, 1]).config
    assert settings(KD.from_config(helios_config).config)["stages"] == DF.from_config(helios_config).config.stages


# ---------------------------------------------------------------- errors


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="prediction_type='epsilon' is not supported"):
        KD(prediction_type="epsilon")
    with pytest.raises(ValueError, match="time_shift_type='cosine' is not supported"):
        KD(time_shift_type="cosine")
    with pytest.raises(ValueError, match=r"stage_index must be given \(0 to 2\)"):
        KD().set_timesteps(3)
    with pytest.raises(ValueError, match="at least 2: the DMD schedule drops the last"):
        KD(stages=1).set_timesteps(1, sigmas=[0.5])
    kd = KD()
    kd.set_timesteps(2, 0)
    x = initial_sample(SHAPE)
    m = dummy_model(x, 900)
    t = kd.timesteps[0]
    good = dmd_kwargs(kd, 0, x, kd.timesteps)
    for change, error, match in [
        (dict(dmd_sigmas=None), ValueError, "dmd_sigmas must be a 1-D tensor"),
        (dict(dmd_timesteps=kd.timesteps[None]), ValueError, "dmd_timesteps must be a 1-D tensor"),
        (dict(all_timesteps=None), ValueError, "all_timesteps must be the loop's timesteps"),
        (dict(cur_sampling_step=1.0), ValueError, "cur_sampling_step must be the loop's step index"),
        (dict(dmd_noisy_tensor=None), TypeError, "dmd_noisy_tensor must be a torch.Tensor"),
        (dict(dmd_noisy_tensor=x[:1]), ValueError, r"dmd_noisy_tensor must have the shape of sample"),
        (dict(dmd_noisy_tensor=x.to("meta")), ValueError, "dmd_noisy_tensor must be on cpu like sample"),
        (dict(dmd_noisy_tensor=x.long()), TypeError, "dmd_noisy_tensor must be a floating tensor"),
    ]:
        with pytest.raises(error, match=match):
            kd.step(m, t, x, **{**good, **change})
    with pytest.raises(ValueError, match="timestep must be given"):
        kd.step(m, None, x, **good)
    with pytest.raises(ValueError, match=r"timestep must be one value, got a tensor of shape \(2,\)"):
        kd.step(m, kd.timesteps[:2], x, **good)
    with pytest.raises(ValueError, match="model_output must have the shape of sample"):
        kd.step(m[:1], t, x, **good)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        kd.step(m, t, x, eta=0.0, **good)
    # the last step needs no noise tensor
    last = dmd_kwargs(kd, 1, None, kd.timesteps)
    assert torch.isfinite(kd.step(m, kd.timesteps[1], x, **last).prev_sample).all()


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_pipeline_loop_without_syncs():
    x = initial_sample(SHAPE)
    outs = []
    for device in ("cpu", "cuda"):
        kd = KD(use_dynamic_shifting=True)
        y = x.to(device)
        for stage in range(3):
            kd.set_timesteps(3, stage, device=device, mu=0.9, is_amplify_first_chunk=stage == 0)
            timesteps, start = kd.timesteps, y
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if device == "cuda" else 0)
            try:
                for i, t in enumerate(timesteps):
                    u = torch.sin(1.3 * y + t.float() / 1000) * 0.6
                    y = kd.step_cfg(u, 0.5 * u, 2.0, t, y, **dmd_kwargs(kd, i, start, timesteps)).prev_sample
                    # foreign (copied) schedules: looked up on the device, still no sync
                    y = kd.step(u, t, y, **{**dmd_kwargs(kd, i, start, timesteps),
                                            "dmd_sigmas": kd.sigmas.clone(), "dmd_timesteps": kd.timesteps.clone()}
                                ).prev_sample
            finally:
                torch.cuda.set_sync_debug_mode(0)
        outs.append(y.cpu())
    assert parity_error(outs[1], outs[0]) <= 1e-5


@pytest.mark.parametrize("own_schedule", [True, False])
def test_a_half_sample_with_wider_inputs_is_stepped_in_their_dtype(own_schedule):
    # diffusers' arithmetic runs in the widest input dtype: a float16 sample with float32 model
    # output and start latents must not be rounded to float16 first (the copied-sigmas path did,
    # 1e4x further from float64 than diffusers), and float64 inputs are taken, as diffusers takes them
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=gen).half()
    m, start = torch.sin(x.float()), torch.randn(2, 4, 3, 8, 8, generator=gen)

    def step(cls, i, *inputs):
        s = cls()
        s.set_timesteps(4, stage_index=1)
        sig, ts = (s.sigmas, s.timesteps) if own_schedule else (s.sigmas.clone(), s.timesteps.clone())
        sample, model, noise = inputs
        return s.step(model, s.timesteps[i], sample, cur_sampling_step=i, dmd_noisy_tensor=noise, dmd_sigmas=sig,
                      dmd_timesteps=ts, all_timesteps=s.timesteps).prev_sample

    for i in (1, 3):
        truth = step(DF, i, x.double(), m.double(), start.double())
        ours, theirs = step(KD, i, x, m, start), step(DF, i, x, m, start)
        assert ours.dtype == theirs.dtype
        assert (ours.double() - truth).abs().max() <= 2 * (theirs.double() - truth).abs().max() + 1e-7
    x32 = x.float()
    for inputs in ((x32, m, start.double()), (x32, m.double(), start)):
        assert step(KD, 0, *inputs).dtype == step(DF, 0, *inputs).dtype
