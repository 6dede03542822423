"""What ParaDiGMS' batch step does alike in the DDIM and DDPM parallel schedulers: one fused pass
over a batch at mixed timesteps, half precision, and no host reads of timesteps it already knows.
Each scheduler's own parity with diffusers is in test_ddim_parallel.py / test_ddpm_parallel.py."""
import warnings

import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.ddim_parallel import DDIMParallelScheduler
from kdfast.schedulers.ddpm_parallel import DDPMParallelScheduler
from paradigms import batch_inputs, mixed_timesteps, stepwise_mean
from parity import diffusers, no_host_reads, parity_error

SCHEDULERS = [(DDIMParallelScheduler, diffusers.DDIMParallelScheduler),
              (DDPMParallelScheduler, diffusers.DDPMParallelScheduler)]
IDS = ["ddim", "ddpm"]


_SHARED_CONFIGS = [
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=True),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    dict(trained_betas=[0.0001 + 0.0002 * k for k in range(100)], num_train_timesteps=100),
]
CONFIG_CASES = (
    [(DDIMParallelScheduler, c) for c in _SHARED_CONFIGS + [dict(beta_schedule="squaredcos_cap_v2",
                                                                 num_train_timesteps=500)]]
    + [(DDPMParallelScheduler, c) for c in _SHARED_CONFIGS + [dict(beta_schedule="sigmoid", num_train_timesteps=500),
                                                              dict(beta_schedule="laplace",
                                                                   variance_type="fixed_large")]])


@pytest.mark.parametrize("cls,config", CONFIG_CASES,
                         ids=[f"{'ddim' if c is DDIMParallelScheduler else 'ddpm'}-{i}" for i, (c, _) in
                              enumerate(CONFIG_CASES)])
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_batch_step_parity_configs_and_step_counts(cls, config, steps):
    df, kd = getattr(diffusers, cls.__name__)(**config), cls(**config)
    for s in (df, kd):
        s.set_timesteps(steps)
    T = len(kd.alphas_cumprod)
    t = mixed_timesteps(kd, off_schedule=T // 2 + 1)
    m, x = batch_inputs(t)
    got = kd.batch_step_no_noise(m, t, x)
    assert torch.isfinite(got).all()
    assert parity_error(got, df.batch_step_no_noise(m, t, x)) <= 1e-5
    # each sample as step() steps it alone (DDPM's step takes only the schedule's timesteps, so
    # it is compared on the schedule)
    if cls is DDPMParallelScheduler:
        t = mixed_timesteps(kd, off_schedule=None)
    assert torch.equal(kd.batch_step_no_noise(m, t, x), stepwise_mean(kd, m, t, x))


@pytest.mark.parametrize("cls", [DDIMParallelScheduler, DDPMParallelScheduler], ids=IDS)
@pytest.mark.parametrize("config", [dict(), dict(thresholding=True), dict(clip_sample=True, clip_sample_range=0.7),
                                    dict(prediction_type="v_prediction", clip_sample=False)])
def test_one_fused_pass_for_a_batch_at_mixed_timesteps(cls, config, monkeypatch):
    calls, cats = [], []
    real_step, real_cat = base.fused_step, torch.cat
    # (the kernel calls with a row per sample; a one-row call is the scheduler's plain step)
    monkeypatch.setattr(base, "fused_step", lambda *a: (a[2].dim() == 2 and calls.append(a[2])) or real_step(*a))
    kd = cls(**config)
    kd.set_timesteps(10)
    t = kd.timesteps[1:5, None].repeat(1, 3).flatten()  # a ParaDiGMS window: 4 timesteps x 3 images
    m, x = batch_inputs(t, shape=(12, 2, 3, 3))
    with monkeypatch.context() as patch:
        patch.setattr(torch, "cat", lambda ts, *a, **k: cats.append(ts[0].dim()) or real_cat(ts, *a, **k))
        out = kd.batch_step_no_noise(m, t, x)
    # one kernel call with a coefficient row per sample, no copy of the batch (only per-run
    # threshold scales, 1-D, are joined)
    assert len(calls) == 1 and calls[0].shape == (12, 29)
    assert cats == ([1] if config.get("thresholding") else [])
    # each sample's row is the one its timestep's step uses, and gives what it gives alone
    for i in (0, 3, 11):
        alone = kd.batch_step_no_noise(m[i:i + 1], t[i], x[i:i + 1])
        assert torch.equal(out[i:i + 1], alone)
    assert not torch.equal(calls[0][0], calls[0][3])
    # a batch at one timestep: one call with the step's own row, no table built
    calls.clear()
    single = kd.batch_step_no_noise(m, kd.timesteps[3], x)
    assert len(calls) == 0  # (through the scheduler's _fused, with one row)
    assert torch.equal(single[6:9], out[6:9])


@pytest.mark.parametrize("cls,df_cls", SCHEDULERS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(), dict(prediction_type="v_prediction", clip_sample=False),
                                    dict(thresholding=True, sample_max_value=2.0, prediction_type="sample")])
def test_batch_step_half_precision_keeps_dtype_and_matches(cls, df_cls, dtype, config):
    df, kd = df_cls(**config), cls(**config)
    for s in (df, kd):
        s.set_timesteps(12)
    t = mixed_timesteps(kd)
    m, x = batch_inputs(t, dtype=dtype, scale=1.5)
    got = kd.batch_step_no_noise(m, t, x)
    assert got.dtype == dtype  # (diffusers' promotes to float32: its coefficients are float32 tensors)
    truth = df.batch_step_no_noise(m.float(), t, x.float())
    same_dtype = df.batch_step_no_noise(m, t, x).to(dtype)
    err, base_err = parity_error(got, truth), parity_error(same_dtype, truth)
    assert err <= 2 * base_err + 1e-4, (err, base_err)
    # float64 too, in float64
    got64 = kd.batch_step_no_noise(m.double(), t, x.double())
    assert got64.dtype == torch.float64 and parity_error(got64, truth) <= 1e-5


@pytest.mark.parametrize("cls", [DDIMParallelScheduler, DDPMParallelScheduler], ids=IDS)
def test_batch_step_needs_no_host_read_for_host_or_schedule_timesteps(cls):
    kd = cls(thresholding=True)
    kd.set_timesteps(10)
    t = mixed_timesteps(kd)
    m, x = batch_inputs(t)
    want = kd.batch_step_no_noise(m, t, x)
    window = kd.timesteps[2:5, None].expand(-1, 3)
    want_window = kd.batch_step_no_noise(m, window.tolist(), x)
    want_one = kd.batch_step_no_noise(m, int(kd.timesteps[4]), x)
    # views of the schedule: the values come from its host copy; nothing of any tensor is read
    with no_host_reads("cpu", "numpy"):
        got_window = kd.batch_step_no_noise(m, window, x)
        got_one = kd.batch_step_no_noise(m, kd.timesteps[4], x)
        got_list = kd.batch_step_no_noise(m, list(kd.timesteps[:9]), x)
    # a tensor on the host: numpy reads its memory in place (no copy, no device sync)
    with no_host_reads("cpu"):
        got = kd.batch_step_no_noise(m, t, x)
    assert torch.equal(got, want) and torch.equal(got_window, want_window) and torch.equal(got_one, want_one)
    assert torch.equal(got_list, kd.batch_step_no_noise(m, kd.timesteps[:9].tolist(), x))


@pytest.mark.parametrize("cls", [DDIMParallelScheduler, DDPMParallelScheduler], ids=IDS)
def test_timesteps_on_a_device_are_read_once(cls, monkeypatch):
    # (a meta tensor stands in for one on a GPU: its values can only come back through .cpu())
    kd = cls()
    kd.set_timesteps(10)
    t = mixed_timesteps(kd)
    m, x = batch_inputs(t)
    want = kd.batch_step_no_noise(m, t, x)  # (and the coefficients of its timesteps made, on the host)
    reads = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: (reads.append(1) or t.clone()) if self.is_meta
                        else real_cpu(self, *a, **k))
    with no_host_reads():
        got = kd.batch_step_no_noise(m, t.to("meta"), x)
    assert len(reads) == 1
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [DDIMParallelScheduler, DDPMParallelScheduler], ids=IDS)
@pytest.mark.parametrize("config", [dict(clip_sample=False), dict(thresholding=True)])
def test_gpu_batch_step_syncs_only_to_read_device_timesteps(cls, config):
    kd = cls(**config)
    kd.set_timesteps(10, device="cuda")
    t = mixed_timesteps(kd)
    m, x = batch_inputs(t)
    cpu = kd.batch_step_no_noise(m, t, x)
    m, x = m.cuda(), x.cuda()
    window = kd.timesteps[2:5, None].expand(-1, 3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = kd.batch_step_no_noise(m, t, x)  # host timesteps: the rows go over without a sync
        kd.batch_step_no_noise(m, window, x)  # a view of the schedule on the GPU
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert parity_error(got.cpu(), cpu) <= 1e-5
    on_device = t.cuda()  # a copy on the GPU, not a view of the schedule: read back once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = kd.batch_step_no_noise(m, on_device, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1
    assert torch.equal(again, got)
