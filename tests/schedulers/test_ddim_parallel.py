import copy
import functools
import inspect
import json
import pickle

import numpy as np
import pytest
import torch

import kdfast.schedulers.base as base
from kdfast.schedulers.ddim import DDIMScheduler
from kdfast.schedulers.ddpm_parallel import DDPMParallelScheduler
from kdfast.schedulers.ddim_parallel import DDIMParallelScheduler
from paradigms import batch_inputs, mixed_timesteps, stepwise_mean
from parity import (
    assert_parity, diffusers, dummy_cfg, dummy_model, initial_sample, no_host_reads, parity_error, run_loop,
    settings)

DF = diffusers.DDIMParallelScheduler


def with_step_kwargs(cls, **fixed):
    """``cls`` whose step (and step_cfg) always get ``fixed`` keyword arguments (run_loop passes none)."""
    body = {"step": lambda self, *a, **k: cls.step(self, *a, **{**fixed, **k})}
    if hasattr(cls, "step_cfg"):
        body["step_cfg"] = lambda self, *a, **k: cls.step_cfg(self, *a, **{**fixed, **k})
    return type(cls.__name__, (cls,), body)


# --------------------------------------------------------------------------- step (DDIM's)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_step_loop_parity(prediction_type, spacing, eta):
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1)
    assert_parity(with_step_kwargs(DDIMParallelScheduler, eta=eta), with_step_kwargs(DF, eta=eta), config, steps=20)


@pytest.mark.parametrize("config", [
    dict(clip_sample=False),
    dict(clip_sample_range=0.5, prediction_type="v_prediction"),
    dict(set_alpha_to_one=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
])
def test_step_loop_parity_configs(config):
    assert_parity(DDIMParallelScheduler, DF, config, steps=15)
    kw = dict(eta=0.8, use_clipped_model_output=True)
    assert_parity(with_step_kwargs(DDIMParallelScheduler, **kw), with_step_kwargs(DF, **kw), config, steps=15)


@pytest.mark.parametrize("config", [{}, dict(thresholding=True, sample_max_value=1.5),
                                    dict(prediction_type="v_prediction", clip_sample=False)])
def test_step_cfg_fuses_guidance(config, monkeypatch):
    assert_parity(with_step_kwargs(DDIMParallelScheduler, eta=0.5), with_step_kwargs(DF, eta=0.5), config, steps=10,
                  guidance_scale=2.0)
    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(1) or real(*a))
    kd = DDIMParallelScheduler(**config)
    kd.set_timesteps(5)
    x = initial_sample()
    for t in kd.timesteps:
        u, c = dummy_cfg(x, t)
        calls.clear()
        x = kd.step_cfg(u, c, 2.0, t, x).prev_sample
        assert len(calls) == 1
        calls.clear()
        x = kd.step(u, t, x).prev_sample
        assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config,eta", [({}, 0.0), (dict(prediction_type="v_prediction", clip_sample=False), 0.5),
                                        (dict(thresholding=True, sample_max_value=2.0), 0.0)])
def test_step_half_precision_keeps_dtype_and_matches(dtype, config, eta):
    assert_parity(with_step_kwargs(DDIMParallelScheduler, eta=eta), with_step_kwargs(DF, eta=eta), config, steps=15,
                  dtype=dtype)


def test_step_path_needs_no_host_read():
    kd = DDIMParallelScheduler(thresholding=True)
    kd.set_timesteps(8)
    x, gen = initial_sample(), torch.Generator().manual_seed(0)
    for t in list(kd.timesteps):
        u, c = dummy_cfg(x, t)
        with no_host_reads():
            x = kd.step_cfg(u, c, 2.0, t, x, eta=0.5, generator=gen).prev_sample
            x = kd.step(u, t, x, use_clipped_model_output=True).prev_sample
    assert torch.isfinite(x).all()


def test_step_outputs_and_tuples_like_diffusers():
    df, kd = DF(clip_sample_range=0.7), DDIMParallelScheduler(clip_sample_range=0.7)
    for s in (df, kd):
        s.set_timesteps(5)
    x = initial_sample()
    for t in kd.timesteps:
        m = dummy_model(x, t)
        want = df.step(m, t, x, eta=0.5, variance_noise=x, return_dict=False)
        prev, x0 = kd.step(m, t, x, eta=0.5, variance_noise=x, return_dict=False)
        assert parity_error(prev, want[0]) < 1e-5 and parity_error(x0, want[1]) < 1e-5
        out = kd.step(m, t, x, eta=0.5, variance_noise=x)
        assert parity_error(out.pred_original_sample, want[1]) < 1e-5 and out["prev_sample"] is out.prev_sample
        x = prev
    with pytest.raises(TypeError, match="bogus"):
        kd.step(x, kd.timesteps[0], x, bogus=1)


# --------------------------------------------------------------------------- batch_step_no_noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("clipping", [dict(clip_sample=False), dict(clip_sample=True, clip_sample_range=0.8),
                                      dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_batch_step_parity_over_mixed_timesteps(prediction_type, spacing, clipping, use_clipped):
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1, **clipping)
    df, kd = DF(**config), DDIMParallelScheduler(**config)
    for s in (df, kd):
        s.set_timesteps(12)
    t = mixed_timesteps(kd)
    m, x = batch_inputs(t, scale=2.0, model_scale=2.5)  # (some x0 outside [-1, 1]: the clipping matters)
    expected = df.batch_step_no_noise(m, t, x, use_clipped_model_output=use_clipped)
    got = kd.batch_step_no_noise(m, t, x, use_clipped_model_output=use_clipped)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert parity_error(got, expected) <= 1e-5
    # every sample gets exactly what step() gives it: a ParaDiGMS loop converges to the sequential one
    assert torch.equal(got, stepwise_mean(kd, m, t, x, use_clipped_model_output=use_clipped))
    if clipping.get("clip_sample") is False or use_clipped:
        return
    unclipped = DDIMParallelScheduler(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1,
                                      clip_sample=False)
    unclipped.set_timesteps(12)
    assert parity_error(unclipped.batch_step_no_noise(m, t, x), got) > 1e-3  # the clipping did something


def test_batch_step_timestep_forms():
    df, kd = DF(), DDIMParallelScheduler()
    for s in (df, kd):
        s.set_timesteps(10)
    t = torch.tensor([900, 800, 700, 700, 1, 0])  # (1: off the schedule)
    m, x = batch_inputs(t, shape=(6, 2, 3, 3))
    expected = df.batch_step_no_noise(m, t, x)
    forms = [t.tolist(), tuple(t.tolist()), t.numpy(), t.to(torch.int32), t.reshape(3, 2), t.double(),
             [torch.tensor(v) for v in t.tolist()], t.reshape(2, 3).t().contiguous().t()]
    for form in forms:
        assert torch.equal(kd.batch_step_no_noise(m, form, x), kd.batch_step_no_noise(m, t, x)), form
    assert parity_error(kd.batch_step_no_noise(m, t, x), expected) <= 1e-5
    # one timestep serves the whole batch, as diffusers' broadcasting does
    one = kd.batch_step_no_noise(m, 700, x)
    for form in (torch.tensor(700), torch.tensor([700]), kd.timesteps[2], np.int64(700), [700], 700.0):
        assert torch.equal(kd.batch_step_no_noise(m, form, x), one), form
    assert parity_error(one, df.batch_step_no_noise(m, torch.tensor(700), x)) <= 1e-5
    # unordered, interleaved timesteps: each sample at its own
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    got = kd.batch_step_no_noise(m[perm], t[perm], x[perm])
    assert torch.equal(got, kd.batch_step_no_noise(m, t, x)[perm])
    # views of the schedule: slices, elements, expanded windows (ParaDiGMS' block_t without the copy)
    window = kd.timesteps[2:5, None].expand(-1, 2)
    m2, x2 = batch_inputs(window.reshape(-1), shape=(6, 2, 3, 3))
    assert torch.equal(kd.batch_step_no_noise(m2, window, x2), kd.batch_step_no_noise(m2, window.tolist(), x2))
    assert parity_error(kd.batch_step_no_noise(m2, window, x2),
                        df.batch_step_no_noise(m2, window.reshape(-1).clone(), x2)) <= 1e-5
    every_other = kd.timesteps[::2]
    m3, x3 = batch_inputs(every_other, shape=(5, 2, 3, 3))
    assert torch.equal(kd.batch_step_no_noise(m3, every_other, x3),
                       kd.batch_step_no_noise(m3, every_other.tolist(), x3))
    # an empty batch
    empty = torch.zeros(0, 2, 3, 3)
    assert kd.batch_step_no_noise(empty, torch.zeros(0, dtype=torch.int64), empty).shape == empty.shape
    # in the dtype any batch gets: a half-precision sample promoted with a float32 model output
    for kind in (DDIMParallelScheduler, DDPMParallelScheduler):
        s = kind()
        s.set_timesteps(10)
        for b in (0, 2):
            out = s.batch_step_no_noise(torch.zeros(b, 2, 3, 3), s.timesteps[1:1 + b], torch.zeros(b, 2, 3, 3).half())
            assert out.dtype == torch.float32, (kind, b)


def test_batch_step_follows_an_edited_schedule():
    kd = DDIMParallelScheduler(clip_sample=False)
    kd.set_timesteps(10)
    window = kd.timesteps[1:4]
    m, x = batch_inputs(window.clone())
    x, m = x[:3], m[:3]
    before = kd.batch_step_no_noise(m, window, x)
    kd.timesteps[2] = 555  # in place: the host copy is read back
    after = kd.batch_step_no_noise(m, window, x)
    assert torch.equal(after, kd.batch_step_no_noise(m, [800, 555, 600], x))
    assert not torch.equal(after, before)


def test_views_of_memory_around_the_schedule_are_read_not_looked_up():
    # an assigned schedule may itself be a view; a view of the same memory that holds elements that are
    # not the schedule's (between its strided elements, past its end) is read like any host tensor
    kd = DDIMParallelScheduler(clip_sample=False)
    kd.set_timesteps(10)
    memory = torch.arange(950, -1, -50)  # 950, 900, ..., 0
    kd.timesteps = memory[:10:2]  # 950, 850, 750, 650, 550
    m, x = batch_inputs(torch.tensor([900, 850, 800]))
    m, x = m[:3], x[:3]
    for view, values in ((memory[2:5], [850, 800, 750]), (memory[2:7:2], [850, 750, 650]),
                         (memory[6:11:2], [650, 550, 450]), (memory[8:13:2], [550, 450, 350]),
                         (memory[0:3:2], [950, 850])):
        n = len(values)
        assert torch.equal(kd.batch_step_no_noise(m[:n], view, x[:n]), kd.batch_step_no_noise(m[:n], values, x[:n]))
    # bfloat16 timesteps (numpy has no bfloat16): their values, exactly
    exact = torch.tensor([896.0, 512.0, 0.0], dtype=torch.bfloat16)
    assert torch.equal(kd.batch_step_no_noise(m, exact, x), kd.batch_step_no_noise(m, [896, 512, 0], x))


def test_set_alpha_to_one_false_ends_where_step_ends():
    # diffusers' batch_step_no_noise ends the last step at alpha_cumprod 1 whatever set_alpha_to_one says;
    # its step (and kdfast's both) at final_alpha_cumprod = alphas_cumprod[0]
    config = dict(set_alpha_to_one=False, clip_sample=False)
    df, kd = DF(**config), DDIMParallelScheduler(**config)
    for s in (df, kd):
        s.set_timesteps(10)
    t = torch.tensor([901, 1, 1])
    m, x = batch_inputs(t, shape=(3, 2, 4, 4))
    got = kd.batch_step_no_noise(m, t, x)
    df_steps = torch.cat([df.step(m[i:i + 1], int(t[i]), x[i:i + 1]).prev_sample for i in range(3)])
    assert parity_error(got, df_steps) <= 1e-5
    df_batch = df.batch_step_no_noise(m, t, x)
    assert parity_error(got[:1], df_batch[:1]) <= 1e-5  # not the last step: the same
    assert parity_error(got[1:], df_batch[1:]) > 1e-4  # diffusers' batch disagrees with its own step


def picard_loop(scheduler, x, window, tolerance=0.0, max_sweeps=100):
    """ParaDiGMS (Shih et al. 2023) as diffusers' pipeline runs it, for a deterministic scheduler:
    a sliding window of timesteps whose samples are refined together by Picard iterations, each one
    batch_step_no_noise over the window."""
    ts = scheduler.timesteps
    n = len(ts)
    buf = torch.stack([x] * (n + 1))
    begin, end, sweeps = 0, min(window, n), 0
    while begin < n:
        block_t = ts[begin:end, None].repeat(1, x.shape[0])
        block = buf[begin:end]
        m = torch.stack([dummy_model(block[i], ts[begin + i]) for i in range(end - begin)])
        denoised = scheduler.batch_step_no_noise(m.flatten(0, 1), block_t.flatten(0, 1), block.flatten(0, 1))
        new = buf[begin][None] + torch.cumsum(denoised.reshape(block.shape) - block, dim=0)
        error = (new - buf[begin + 1:end + 1]).flatten(1).abs().amax(dim=1)
        over = (error > tolerance).int()
        ind = int(torch.argmax(torch.cat([over, torch.ones(1, dtype=torch.int32)])))
        buf[begin + 1:end + 1] = new
        new_begin = begin + min(1 + ind, window)
        new_end = min(new_begin + window, n)
        buf[end:new_end + 1] = buf[end][None]
        begin, end, sweeps = new_begin, new_end, sweeps + 1
        assert sweeps <= max_sweeps
    return buf[-1], sweeps


@pytest.mark.parametrize("config", [dict(set_alpha_to_one=False, thresholding=True, sample_max_value=1.5),
                                    dict(prediction_type="v_prediction", timestep_spacing="trailing")])
def test_paradigms_loop_converges_to_the_sequential_loop(config):
    # (tolerance 0: the window moves on where the Picard iterations have reached their fixed point)
    x = initial_sample((2, 3, 4, 4))
    sequential = run_loop(DF(**config), 12, x)
    kd = DDIMParallelScheduler(**config)
    kd.set_timesteps(12)
    parallel, _ = picard_loop(kd, x, window=5)
    assert parity_error(parallel, sequential) <= 1e-5
    df = DF(**config)
    df.set_timesteps(12)
    df_parallel, _ = picard_loop(df, x, window=5)
    if not config.get("set_alpha_to_one", True):  # diffusers' own parallel loop ends elsewhere
        assert parity_error(df_parallel, sequential) > 1e-4
    else:
        assert parity_error(df_parallel, sequential) <= 1e-5
        # with a tolerance, fewer sweeps than steps, and close
        kd.set_timesteps(12)
        loose, sweeps = picard_loop(kd, x, window=5, tolerance=1e-3)
        assert sweeps < 12 and parity_error(loose, sequential) < 1e-3
    assert kd._is_ode_scheduler and DF._is_ode_scheduler


@functools.lru_cache(maxsize=None)
def tiny_unet_and_vae():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=4).eval()
    return unet, vae


def paradigms_latents(scheduler, guidance_scale=3.0, parallel=4, steps=10):
    """The latents diffusers' ParaDiGMS pipeline makes with ``scheduler`` (a tiny random UNet, given
    prompt embeddings: no text encoder)."""
    module = pytest.importorskip("diffusers.pipelines.deprecated.stable_diffusion_variants."
                                 "pipeline_stable_diffusion_paradigms")
    unet, vae = tiny_unet_and_vae()
    pipe = module.StableDiffusionParadigmsPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(2, 1, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], guidance_scale=guidance_scale,
                    num_inference_steps=steps, parallel=parallel, height=16, width=16, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def test_in_diffusers_paradigms_pipeline():
    # (v-prediction without clipping: with a random UNet, an epsilon model's clipped x0 makes the loop
    # chaotic, and 1e-8 differences per step grow to 1e-4 in diffusers' own step loops too)
    config = dict(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")
    expected = paradigms_latents(DF(**config))
    got = paradigms_latents(DDIMParallelScheduler(**config))
    assert torch.isfinite(got).all() and parity_error(got, expected) <= 1e-5


# --------------------------------------------------------------------------- errors, NaN, config


def test_bad_batch_input_is_named():
    kd = DDIMParallelScheduler()
    x = initial_sample((4, 2, 3, 3))
    t = torch.tensor([901, 801, 701, 1])
    with pytest.raises(ValueError, match="set_timesteps"):
        kd.batch_step_no_noise(x, t, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        DF().batch_step_no_noise(x, t, x)
    kd.set_timesteps(10)
    with pytest.raises(ValueError, match="timesteps: got 3 timesteps for a batch of 4"):
        kd.batch_step_no_noise(x, t[:3], x)
    with pytest.raises(ValueError, match="timesteps: got 5 timesteps for a batch of 4"):
        kd.batch_step_no_noise(x, [1, 2, 3, 4, 5], x)
    with pytest.raises(IndexError, match=r"timesteps\[2\] = 1000 is outside the training schedule \[0, 1000\)"):
        kd.batch_step_no_noise(x, torch.tensor([901, 801, 1000, 1]), x)
    with pytest.raises(IndexError, match=r"timesteps\[3\] = -1 is outside"):
        kd.batch_step_no_noise(x, torch.tensor([901, 801, 701, -1]), x)  # (diffusers wraps it)
    with pytest.raises(ValueError, match=r"integer training timesteps, got 700.5 at index 2"):
        kd.batch_step_no_noise(x, torch.tensor([901.0, 801.0, 700.5, 1.0]), x)
    with pytest.raises(ValueError, match=r"integer training timesteps, got nan"):
        kd.batch_step_no_noise(x, [901, 801, float("nan"), 1], x)
    for bad in (t.bool(), t.to(torch.complex64)):
        with pytest.raises(TypeError, match=f"timesteps must hold integer training timesteps, got a {bad.dtype} "):
            kd.batch_step_no_noise(x, bad, x)
    with pytest.raises(TypeError, match="timesteps must hold integer training timesteps, got values of dtype bool"):
        kd.batch_step_no_noise(x, [True, False, True, False], x)
    with pytest.raises(TypeError, match="timesteps must be a tensor, a sequence or a number"):
        kd.batch_step_no_noise(x, "901", x)
    with pytest.raises(ValueError, match="eta must be 0"):
        kd.batch_step_no_noise(x, t, x, eta=0.5)
    df = DF()
    df.set_timesteps(10)
    with pytest.raises(AssertionError):  # diffusers' refusal says nothing
        df.batch_step_no_noise(x, t, x, eta=0.5)
    with pytest.raises(ValueError, match="eta must be 0"):
        kd.batch_step_no_noise(x, t, x, eta=float("nan"))
    kd.batch_step_no_noise(x, t, x, eta=0)
    with pytest.raises(ValueError, match="does not match sample shape"):
        kd.batch_step_no_noise(x[:3], t, x)
    with pytest.raises(TypeError, match="model_output and sample must be torch.Tensor"):
        kd.batch_step_no_noise(x.numpy(), t, x)
    with pytest.raises(ValueError, match="sample must have a batch dimension"):
        kd.batch_step_no_noise(x[0, 0, 0, 0], t, x[0, 0, 0, 0])
    with pytest.raises(TypeError, match="sample must be float32"):
        kd.batch_step_no_noise(x.int(), t, x.int())
    with pytest.raises(TypeError, match="model_output must be float32"):
        kd.batch_step_no_noise(x.int(), t, x)


def test_where_diffusers_gives_inf_or_nan_kdfast_raises_or_stays_finite():
    zero_snr = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    t = torch.tensor([999, 999, 899, 0])
    m, x = batch_inputs(t, shape=(4, 2, 3, 3))
    # epsilon at alphas_cumprod 0 without clipping: x0 is infinite; diffusers returns inf/NaN, kdfast says why
    df, kd = DF(**zero_snr, clip_sample=False), DDIMParallelScheduler(**zero_snr, clip_sample=False)
    for s in (df, kd):
        s.set_timesteps(10)
    assert not torch.isfinite(df.batch_step_no_noise(m, t, x)[:2]).any()
    assert not torch.isfinite(df.step(m, 999, x).prev_sample).all()
    with pytest.raises(ValueError, match=r"timestep 999: alphas_cumprod\[999\] is 0 \(rescale_betas_zero_snr=True\)"):
        kd.batch_step_no_noise(m, t, x)
    with pytest.raises(ValueError, match="prediction_type='epsilon' defines no x0"):
        kd.step(m, kd.timesteps[0], x)
    assert torch.isfinite(kd.batch_step_no_noise(m[2:], t[2:], x[2:])).all()  # the other timesteps step
    # clipped, both are finite and agree (kdfast's x0 is +-2**100 (x - eps) there, clipped to +-1)
    df, kd = DF(**zero_snr), DDIMParallelScheduler(**zero_snr)
    for s in (df, kd):
        s.set_timesteps(10)
    got = kd.batch_step_no_noise(m, t, x)
    assert torch.isfinite(got).all() and parity_error(got, df.batch_step_no_noise(m, t, x)) <= 1e-5
    # where x == eps exactly, diffusers' x0 is 0/0 = NaN; kdfast's is 0
    got = kd.batch_step_no_noise(x, t, x)
    assert torch.isnan(df.batch_step_no_noise(x, t, x)[:2]).all() and torch.isfinite(got).all()
    # eta > 1: the direction's variance 1 - alpha_prev - std^2 is negative; diffusers' step is NaN
    kd = DDIMParallelScheduler(clip_sample=False)
    df = DF(clip_sample=False)
    for s in (df, kd):
        s.set_timesteps(10)
    assert torch.isnan(df.step(m, 501, x, eta=1.5, variance_noise=x).prev_sample).all()
    with pytest.raises(ValueError, match=r"timestep 501: the step's coefficients are not finite.*eta must be <= 1"):
        kd.step(m, 501, x, eta=1.5, variance_noise=x)
    assert torch.isfinite(kd.step(m, 501, x, eta=1.0, variance_noise=x).prev_sample).all()
    # a negative eta shrinks the direction term and adds no noise, as in diffusers
    assert parity_error(kd.step(m, 501, x, eta=-0.5).prev_sample, df.step(m, 501, x, eta=-0.5).prev_sample) <= 1e-5
    with pytest.raises(ValueError, match="eta must be a finite"):
        kd.step(m, 501, x, eta=float("nan"))
    # a zero beta: 1 - alphas_cumprod[0] = 0; sample prediction's epsilon is (x - x0) / 0
    betas = [0.0] + [0.01] * 99
    df = DF(trained_betas=betas, num_train_timesteps=100, prediction_type="sample", clip_sample=False)
    kd = DDIMParallelScheduler.from_config(df.config)
    for s in (df, kd):
        s.set_timesteps(10)
    t0 = torch.tensor([0, 50])
    assert not torch.isfinite(df.batch_step_no_noise(m[:2], t0, x[:2])[0]).all()
    with pytest.raises(ValueError, match="timestep 0: the step's coefficients are not finite"):
        kd.batch_step_no_noise(m[:2], t0, x[:2])


def test_config_round_trip_and_drop_in(tmp_path):
    df = DF(clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    kd = DDIMParallelScheduler.from_config(df.config)
    assert settings(kd.config) == settings(df.config)
    kd.save_pretrained(tmp_path)
    again = DDIMParallelScheduler.from_pretrained(tmp_path)
    assert settings(again.config) == settings(kd.config)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "DDIMParallelScheduler"
    back = DF.from_pretrained(tmp_path)
    assert settings(back.config) == settings(df.config)
    x = initial_sample()
    assert parity_error(run_loop(again, 10, x), run_loop(back, 10, x)) < 1e-5
    # the same constructor arguments and methods as diffusers'
    assert list(inspect.signature(DDIMParallelScheduler.__init__).parameters) == \
        list(inspect.signature(DF.__init__).parameters)
    for name in ("step", "batch_step_no_noise"):
        ours = list(inspect.signature(getattr(DDIMParallelScheduler, name)).parameters)
        theirs = list(inspect.signature(getattr(DF, name)).parameters)
        assert ours[:len(theirs)] == theirs, name
    # from another scheduler's config, and to DDIM and back
    kd = DDIMParallelScheduler.from_config(diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear").config)
    assert kd.config.beta_schedule == "scaled_linear"
    assert DDIMScheduler.from_config(kd.config).config.beta_schedule == "scaled_linear"
    assert DF in kd.compatibles and diffusers.DDIMScheduler in kd.compatibles
    assert len(kd) == 1000 and kd.order == 1 and kd.init_noise_sigma == 1.0


def test_get_variance_like_diffusers():
    kd, df = DDIMParallelScheduler(), DF()
    for s in (kd, df):
        s.set_timesteps(20)
    for t in list(df.timesteps) + [500, 0]:
        a, b = kd._get_variance(t), df._get_variance(t)  # ParaDiGMS' pipeline passes the timestep alone
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(kd._get_variance(500, 480), df._get_variance(500, 480))
    t = torch.tensor([[999], [500], [50], [49], [0]])
    prev = t - 50  # (to 0: alphas_cumprod[0]; below it: 1)
    assert torch.equal(kd._batch_get_variance(t, prev), df._batch_get_variance(t, prev))
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMParallelScheduler()._get_variance(500)
    # set_alpha_to_one=False: below timestep 0, final_alpha_cumprod, as _get_variance
    kd = DDIMParallelScheduler(set_alpha_to_one=False)
    kd.set_timesteps(20)
    got = kd._batch_get_variance(torch.tensor([30, 20]), torch.tensor([-20, 0]))
    assert torch.equal(got, torch.stack([kd._get_variance(30, -20), kd._get_variance(20, 0)]))


def test_channels_last_and_autograd_like_diffusers():
    df, kd = DF(), DDIMParallelScheduler()
    for s in (df, kd):
        s.set_timesteps(10)
    t = mixed_timesteps(kd)
    m, x = batch_inputs(t, scale=2.0)
    expected = df.batch_step_no_noise(m, t, x)
    last = kd.batch_step_no_noise(m.to(memory_format=torch.channels_last), t, x.to(memory_format=torch.channels_last))
    assert parity_error(last, expected) <= 1e-5
    grads = []
    for s in (df, kd):
        mg, xg = m.clone().requires_grad_(), x.clone().requires_grad_()
        (s.batch_step_no_noise(mg, t, xg) * torch.linspace(-1, 1, x.numel()).reshape(x.shape)).sum().backward()
        grads.append((mg.grad, xg.grad))
    assert parity_error(grads[1][0], grads[0][0]) <= 1e-5 and parity_error(grads[1][1], grads[0][1]) <= 1e-5


def test_copies_pickles_and_compiles():
    kd = DDIMParallelScheduler(clip_sample=False)
    kd.set_timesteps(8)
    t = kd.timesteps[1:4, None].repeat(1, 3).flatten()
    m, x = batch_inputs(t)
    want = kd.batch_step_no_noise(m, t, x)
    for other in (copy.deepcopy(kd), pickle.loads(pickle.dumps(kd))):
        assert torch.equal(other.batch_step_no_noise(m, t, x), want)
        window = other.timesteps[1:4, None].expand(-1, 3)  # the copy's own schedule
        assert torch.equal(other.batch_step_no_noise(m, window, x), want)

    @torch.compile(backend="eager")
    def compiled(m, x):
        return kd.batch_step_no_noise(m, t, x) * 1.0

    assert torch.equal(compiled(m, x), want)


def test_one_timestep_for_an_empty_batch_is_refused():
    s = DDIMParallelScheduler()
    s.set_timesteps(10)
    x = torch.zeros(0, 3, 4, 4)
    with pytest.raises(ValueError, match="for a batch of 0 samples"):
        s.batch_step_no_noise(x, int(s.timesteps[0]), x)
