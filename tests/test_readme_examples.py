"""The README's Python examples run as written.

Each ```python block of README.md is executed with small stand-ins for the names it takes from
its surroundings (a pipeline, a UNet, a denoiser, a tiny language model, ...). The blocks
written for a GPU (``device="cuda"``, ``cuda_graph=True``, :class:`kdfast.CapturedSampler`)
run as written where CUDA is available (tests marked ``gpu``) and, on the CPU, with the
device and graph capture swapped out. A renamed function, a changed argument or a wrong
return type in the README fails here.
"""
from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

import kdfast

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def block(first_line: str) -> str:
    """The README block that starts with ``first_line`` (exactly one)."""
    found = [b for b in BLOCKS if b.startswith(first_line)]
    assert len(found) == 1, f"README has {len(found)} python blocks starting with {first_line!r}"
    return found[0]


def on_cpu(code: str) -> str:
    return code.replace('device="cuda"', 'device="cpu"').replace("cuda_graph=True", "cuda_graph=False")


def run(code: str, **names) -> dict:
    namespace = {"torch": torch, "kdfast": kdfast, **names}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_every_python_block_is_covered():
    covered = ("import kdfast\npipe.scheduler", "pipe.scheduler = kdfast.schedulers.FlowMatch",
               "sched = kdfast.schedulers.DPMSolverMultistepScheduler", "sigmas = kdfast.sampling.get_sigmas_karras",
               "loop = kdfast.CapturedSampler", "import kdfast\n\nfast_unet",
               "from kdfast.losses import FusedLinearKDLoss", "from kdfast.losses import kd_loss",
               "from kdfast.losses import diffusion as dl")
    assert len(BLOCKS) == len(covered), "a README python block was added: give it a test here"
    for start in covered:
        block(start)


# --------------------------------------------------------------------------- schedulers

def _tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def _prompted_pipeline():
    """A diffusers pipeline called like a text-to-image one, ``pipe(prompt, num_inference_steps=...)``."""
    diffusers = pytest.importorskip("diffusers")

    class PromptedPipeline(diffusers.DDPMPipeline):
        def __call__(self, prompt, num_inference_steps=50):
            return super().__call__(batch_size=1, num_inference_steps=num_inference_steps,
                                    generator=torch.Generator().manual_seed(0), output_type="np")

    pipe = PromptedPipeline(unet=_tiny_unet(), scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_drop_in_example(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pipe = _prompted_pipeline()
    with torch.no_grad():
        ns = run(block("import kdfast\npipe.scheduler"), pipe=pipe, prompt="a digit")
    assert isinstance(pipe.scheduler, kdfast.schedulers.DPMSolverMultistepScheduler)
    assert ns["image"].shape == (8, 8, 1) and torch.isfinite(torch.as_tensor(ns["image"])).all()
    pipe.save_pretrained(tmp_path)  # saves the diffusers scheduler of the same config, as the comment says
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is diffusers.DPMSolverMultistepScheduler


def test_the_flow_matching_drop_in_example():
    diffusers = pytest.importorskip("diffusers")
    pipe = types.SimpleNamespace(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    run(block("pipe.scheduler = kdfast.schedulers.FlowMatch"), pipe=pipe)
    assert isinstance(pipe.scheduler, kdfast.schedulers.FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0


def _conditional_unet():
    """``unet(x, t, encoder_hidden_states=emb).sample``: an input-dependent stand-in."""
    def unet(x, t, encoder_hidden_states):
        out = torch.tanh(0.5 * x + 1e-3 * t) + 0.1 * encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return types.SimpleNamespace(sample=out)
    return unet


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_guided_step_example(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    code = block("sched = kdfast.schedulers.DPMSolverMultistepScheduler")
    x = torch.randn(1, 4, 8, 8, device=device)
    emb = torch.stack([torch.zeros(3, 5), torch.ones(3, 5)]).to(device)  # uncond, cond
    ns = run(code if device == "cuda" else on_cpu(code), unet=_conditional_unet(), x=x, emb=emb)
    assert ns["x"].shape == x.shape and torch.isfinite(ns["x"]).all() and not torch.equal(ns["x"], x)


# --------------------------------------------------------------------------- whole loops

def _denoiser(x, sigma, cond):
    return x / (1 + sigma.view(-1, 1, 1, 1) ** 2) + 0.1 * cond.view(-1, 1, 1, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_whole_loop_example(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    code = block("sigmas = kdfast.sampling.get_sigmas_karras")
    c, u = torch.ones(2, device=device), torch.zeros(2, device=device)
    ns = run(code if device == "cuda" else on_cpu(code), denoiser=_denoiser, shape=(2, 4, 8, 8), c=c, u=u)
    assert ns["x"].shape == (2, 4, 8, 8) and torch.isfinite(ns["x"]).all()


@pytest.mark.gpu
def test_the_captured_sampler_example():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    sigmas = kdfast.sampling.get_sigmas_karras(10, sigma_min=0.03, sigma_max=14.6, device="cuda")
    x = torch.randn(2, 4, 8, 8, device="cuda") * sigmas[0]
    c, u = torch.ones(2, device="cuda"), torch.zeros(2, device="cuda")
    prompts = [torch.full((2,), float(k), device="cuda") for k in range(3)]
    ns = run(block("loop = kdfast.CapturedSampler"), denoiser=_denoiser, x=x, sigmas=sigmas, c=c, u=u,
             prompts=prompts)
    assert ns["images"].shape == x.shape and torch.isfinite(ns["images"]).all()
    # a replay from a known start equals the eager loop from it
    eager = kdfast.sample(_denoiser, x, sigmas, sampler="dpmpp_2m", guidance_scale=5.0, cond=prompts[-1], uncond=u,
                          disable=True)
    torch.testing.assert_close(ns["loop"](x, cond=prompts[-1]), eager, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- inference

def test_the_teacher_inference_example():
    from kdfast.models.unet import UNet, UNetConfig

    pipe = types.SimpleNamespace(unet=_tiny_unet())
    teacher_unet = UNet(UNetConfig(sample_size=8, base_channels=8, channel_mults=(1, 2), time_embed_dim=16,
                                   norm_groups=4)).eval()
    norm = torch.nn.GroupNorm(32, 64)
    h, emb = torch.randn(2, 64, 4, 4), torch.randn(2, 64)
    with torch.no_grad():
        ns = run(block("import kdfast\n\nfast_unet"), pipe=pipe, teacher_unet=teacher_unet, norm=norm, h=h, emb=emb)
    expected = torch.nn.functional.silu(norm(h + emb[:, :, None, None]))
    torch.testing.assert_close(ns["y"], expected, rtol=1e-5, atol=1e-5)
    assert pipe.unet is ns["fast_unet"] and isinstance(ns["fast"], torch.nn.Module)


# --------------------------------------------------------------------------- losses

def test_the_fused_linear_kd_example():
    transformers = pytest.importorskip("transformers")

    def tiny_lm(hidden):
        torch.manual_seed(hidden)
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        return transformers.LlamaForCausalLM(config)

    student, teacher = tiny_lm(16), tiny_lm(32)
    input_ids = torch.randint(0, 64, (2, 6))
    labels = torch.randint(0, 64, (2, 6))
    ns = run(block("from kdfast.losses import FusedLinearKDLoss"), student=student, teacher=teacher,
             input_ids=input_ids, labels=labels)
    assert ns["loss"].dim() == 0 and torch.isfinite(ns["loss"])
    assert student.lm_head.weight.grad is not None and teacher.lm_head.weight.grad is None


def test_the_kd_loss_example():
    student_logits = torch.randn(8, 50, requires_grad=True)
    ns = run(block("from kdfast.losses import kd_loss"), student_logits=student_logits,
             teacher_logits=torch.randn(8, 50), labels=torch.tensor([1, 2, -100, 4, 5, 6, 7, 8]))
    assert ns["loss"].dim() == 0 and torch.isfinite(ns["loss"])


def test_the_diffusion_losses_example():
    torch.manual_seed(0)
    batch = 3
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)

    def net(scale):
        return lambda x, t: torch.tanh(scale * x) + 1e-4 * t.view(-1, 1, 1, 1)

    student = net(0.5)
    x0, noise = torch.randn(batch, 2, 4, 4), torch.randn(batch, 2, 4, 4)
    t = torch.tensor([999, 500, 20])
    names = dict(student=lambda x, t: student(x, t).requires_grad_(), ema_student=net(0.6), teacher=net(0.7),
                 x_t1=torch.randn(batch, 2, 4, 4), x_t0=torch.randn(batch, 2, 4, 4), t1=t, t0=t - 10,
                 lam=torch.rand(batch), x=torch.randn(batch, 2, 4, 4, requires_grad=True),
                 x0_real=torch.randn(batch, 2, 4, 4), x0_fake=torch.randn(batch, 2, 4, 4),
                 alphas_cumprod=alphas_cumprod, t=t, step=10, x0=x0, noise=noise)
    ns = run(block("from kdfast.losses import diffusion as dl"), **names)
    assert ns["x_s"].shape == x0.shape and ns["loss"].dim() == 0 and torch.isfinite(ns["loss"])
