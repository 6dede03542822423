import copy
import types

import pytest
import torch

import kdfast
from kdfast.schedulers import convert, from_diffusers, patch_pipeline, supported

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("name", supported())
def test_from_diffusers_maps_every_supported_class(name):
    if name == "FlowMatchHeunDiscreteScheduler":
        config = dict(shift=3.0)
    elif name.startswith("FlowMatch"):  # flow matching: no beta schedule
        config = dict(shift=3.0, use_dynamic_shifting=True)
    elif name.startswith("EDM"):  # EDM: sigmas, no betas
        config = dict(sigma_max=40.0, sigma_schedule="exponential")
    elif name == "SCMScheduler":  # TrigFlow: no betas
        config = dict(sigma_data=0.7)
    elif name == "CMStochasticIterativeScheduler":  # Karras sigmas
        config = dict(sigma_max=40.0, rho=5.0)
    elif name in ("FlowMapEulerDiscreteScheduler", "IPNDMScheduler"):  # no beta_schedule
        config = dict(num_train_timesteps=500)
    elif name == "CosineDPMSolverMultistepScheduler":  # Stable Audio's sigmas
        config = dict(sigma_max=300.0, sigma_schedule="karras")
    elif name == "LTXEulerAncestralRFScheduler":  # a flow schedule set later
        config = dict(eta=0.5)
    elif name == "DDPMWuerstchenScheduler":  # a continuous cosine schedule
        config = dict(scaler=2.0, s=0.01)
    elif name == "PiflowScheduler":  # a distilled flow schedule
        config = dict(shift=3.0, n_grid=4)
    elif name.startswith("Helios"):  # a pyramid of flow stages
        config = dict(stages=2, stage_range=[0, 0.5, 1], gamma=0.5)
    else:
        config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    df = getattr(diffusers, name)(**config)
    kd = from_diffusers(df)
    assert type(kd) is getattr(kdfast.schedulers, name)
    assert {k: kd.config[k] for k in config} == config


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_from_diffusers_keeps_the_settings_a_pipeline_corrected(name):
    # Stable Diffusion's pipelines replace an outdated scheduler's config with steps_offset=1
    # and clip_sample=False but leave _use_default_values listing both; from_config drops the
    # keys listed there, which gave the patched pipeline another schedule (and clipping).
    from diffusers.configuration_utils import FrozenDict

    df = getattr(diffusers, name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  timestep_spacing="leading")
    assert "steps_offset" in df.config["_use_default_values"]
    corrected = dict(df.config, steps_offset=1, **({"clip_sample": False} if "clip_sample" in df.config else {}))
    df._internal_dict = FrozenDict(corrected)
    kd = from_diffusers(df)
    assert kd.config["steps_offset"] == 1 and kd.config.get("clip_sample", False) is False
    df.set_timesteps(10)
    kd.set_timesteps(10)
    assert torch.equal(kd.timesteps, df.timesteps) and int(df.timesteps[-1]) == 1


def test_unsupported_scheduler_is_named():
    with pytest.raises(ValueError, match="RePaintScheduler"):
        from_diffusers(diffusers.RePaintScheduler())
    with pytest.raises(TypeError, match="has no scheduler"):
        patch_pipeline(object())


@pytest.mark.parametrize("name,match", [
    ("CogVideoXDPMScheduler", "call it as a DDIM step"),  # CogVideoX pipelines call step() in the DPM form
    ("DDPMWuerstchenScheduler", "step from the schedule's final 0"),  # Stable Cascade's loop
])
def test_pipelines_that_check_the_scheduler_class_are_not_patched(name, match):
    # These pipelines choose their loop for diffusers' own class only
    pipe = types.SimpleNamespace(scheduler=getattr(diffusers, name)())
    with pytest.raises(ValueError, match=match):
        patch_pipeline(pipe)
    assert type(pipe.scheduler) is getattr(diffusers, name)  # left as it was
    assert type(from_diffusers(pipe.scheduler)) is getattr(kdfast.schedulers, name)


class _BranchingPipeline:
    """A pipeline whose loop branches on its scheduler's class, as Bria's and LEDITS++' do."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.checked_in_init = isinstance(scheduler, diffusers.UniPCMultistepScheduler)  # (before any patching)

    def __call__(self):
        return "ddim" if isinstance(self.scheduler, (diffusers.DDIMScheduler, diffusers.PNDMScheduler)) else "other"


class _SubclassedPipeline(_BranchingPipeline):
    pass


def _uninitialised(pipeline, scheduler):
    pipe = pipeline.__new__(pipeline)  # (the class's code is what is read; no components needed)
    pipe.__dict__["scheduler"] = scheduler
    return pipe


@pytest.mark.parametrize("pipeline, scheduler, config, refused", [
    (_BranchingPipeline, "DDIMScheduler", {}, True),
    (_SubclassedPipeline, "PNDMScheduler", {}, True),  # a base class's __call__
    (_BranchingPipeline, "UniPCMultistepScheduler", {}, False),  # tested in __init__ only
    (_BranchingPipeline, "EulerDiscreteScheduler", {}, False),  # never tested
    ("StableDiffusionXLPipeline", "EulerDiscreteScheduler", {}, False),
    ("BriaPipeline", "DDIMScheduler", {}, True),  # another timestep schedule
    ("BriaPipeline", "FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True), True),  # no mu
    ("BriaPipeline", "FlowMatchEulerDiscreteScheduler", {}, False),  # the same loop either way
    ("LEditsPPPipelineStableDiffusion", "DDIMScheduler", {}, True),
    ("HiDreamImagePipeline", "UniPCMultistepScheduler", {}, False),
])
def test_pipelines_that_branch_on_the_scheduler_class_are_refused(pipeline, scheduler, config, refused):
    # A kdfast scheduler is not an instance of diffusers' class: a pipeline testing for it would
    # take the other branch (Bria with DDIM asked DDIM for custom sigmas, with dynamic shifting
    # set no mu), so it is refused, saying where it tests; others are patched
    cls = getattr(diffusers, pipeline) if isinstance(pipeline, str) else pipeline
    pipe = _uninitialised(cls, getattr(diffusers, scheduler)(**config))
    if refused:
        with pytest.raises(ValueError, match=rf"tests its scheduler's class \(isinstance\(scheduler, {scheduler}\) at "):
            patch_pipeline(pipe)
        assert type(pipe.scheduler) is getattr(diffusers, scheduler)  # left as it was
    elif isinstance(pipeline, str):  # (an uninitialised diffusers pipeline cannot take a new component)
        assert convert._class_test_refusal(pipe) is None
    else:
        patch_pipeline(pipe)
        assert type(pipe.scheduler) is getattr(kdfast.schedulers, scheduler)


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def float64_ddim_images(unet, eta, seed, steps=10):
    """The same DDIM loop in float64 (from the pipeline's fp32 initial noise), post-processed
    like DDIMPipeline: the truth both fp32 runs are measured against."""
    net = copy.deepcopy(unet).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 1, 8, 8), generator=gen).double()
    sched = diffusers.DDIMScheduler(clip_sample=True)
    sched.set_timesteps(steps)
    with torch.no_grad():
        for t in sched.timesteps:
            # the pipeline's noise: float32 draws (a float64 draw would give other numbers)
            noise = torch.randn(x.shape, generator=gen).double() if eta else None
            x = sched.step(net(x, t).sample, t, x, eta=eta, variance_noise=noise).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_patched_diffusers_pipeline_gives_the_same_images(eta):
    # A real diffusers pipeline (random tiny UNet, no download), patched after construction
    # (DDIMPipeline converts whatever scheduler it is given into diffusers' own DDIM).
    unet = tiny_unet()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    seeds = (3, 4, 5, 6)
    with torch.no_grad():
        expected = [pipe(batch_size=2, num_inference_steps=10, eta=eta, output_type="np",
                         generator=torch.Generator().manual_seed(seed)).images for seed in seeds]
        patch_pipeline(pipe)
        assert isinstance(pipe.scheduler, kdfast.schedulers.DDIMScheduler)
        got = [pipe(batch_size=2, num_inference_steps=10, eta=eta, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images for seed in seeds]
    assert got[0].shape == expected[0].shape == (2, 8, 8, 1)
    # The random network amplifies fp32 rounding over the loop (diffusers' own fp32 run is
    # ~1e-4 off float64, by an amount that changes with the thread count), so: over a few
    # seeds, kdfast at most 2x as far from float64 as diffusers itself.
    truths = [float64_ddim_images(unet, eta, seed) for seed in seeds]
    err = sum(abs(g - t).max() for g, t in zip(got, truths))
    base = sum(abs(e - t).max() for e, t in zip(expected, truths))
    assert err <= 2 * base + 1e-6, (err, base)
    assert max(abs(g - e).max() for g, e in zip(got, expected)) < 1e-3
