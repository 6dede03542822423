"""CapturedSampler: capture a whole loop once, replay it for new inputs.

A real capture needs a GPU (tests marked ``gpu``). On the CPU, ``_capture`` is replaced by a
stand-in whose "replay" runs the captured closure again (the ``eager_capture`` fixture in
conftest.py): what that checks is the plumbing a
real graph depends on, that every input reaches the loop only through the sampler's own
buffers (a replay with new inputs gives the eager result for those inputs), that scheduler
state is put back before the capture, and that reseeding reproduces stochastic draws.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kdfast
from kdfast import sampling as S
from kdfast.schedulers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

SHAPE = (2, 4, 6, 6)


def denoiser(x, sigma, cond=None):
    s = sigma.float().reshape(-1, 1, 1, 1)
    out = x / (1 + s * s) + 0.5 * s / torch.sqrt(1 + s * s) * torch.sin(1.3 * x / torch.sqrt(1 + s * s))
    if cond is not None:
        out = out + 0.3 * cond.float() * torch.cos(0.7 * x)
    return out.to(x.dtype)


def unet_like(x, t, cond=None):
    """A scheduler-path model: raw output from the scaled input and the timestep tensor."""
    out = 0.4 * torch.tanh(x) + 0.01 * t.float().reshape(-1, 1, 1, 1) / 1000.0
    if cond is not None:
        out = out + 0.2 * cond.float().reshape(-1, 1, 1, 1)
    return out


def noise(seed, shape=SHAPE, scale=10.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc", "heun"])
def test_replay_with_new_inputs_equals_eager(eager_capture, sampler):
    sigmas = S.get_sigmas_karras(8, 0.03, 14.6)
    cond, uncond = torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)
    loop = kdfast.CapturedSampler(denoiser, noise(0), sigmas, sampler=sampler, guidance_scale=3.0,
                                  cond=cond, uncond=uncond)
    for seed, c in ((1, cond), (2, -cond), (3, None)):
        x = noise(seed)
        got = loop(x, cond=c)
        used = -cond if seed >= 2 else cond  # cond=None keeps the last one
        want = S.sample(denoiser, x, sigmas, sampler=sampler, guidance_scale=3.0, cond=used, uncond=uncond,
                        disable=True)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert eager_capture[0].replays == 3


def test_replay_returns_a_new_tensor(eager_capture):
    sigmas = S.get_sigmas_karras(4, 0.03, 14.6)
    loop = kdfast.CapturedSampler(denoiser, noise(0), sigmas)
    first = loop(noise(1))
    second = loop(noise(2))
    assert not torch.equal(first, second)
    torch.testing.assert_close(first, S.sample(denoiser, noise(1), sigmas, disable=True), rtol=0, atol=0)


def test_scheduler_loop_replays_from_its_start(eager_capture):
    sched = DPMSolverMultistepScheduler(prediction_type="epsilon")
    sched.set_timesteps(6)
    y = torch.tensor([1.0, 2.0])
    loop = kdfast.CapturedSampler(unet_like, noise(0, scale=1.0), sched, guidance_scale=2.0, cond=y,
                                  uncond=torch.zeros(2))
    for seed in (4, 5):
        x = noise(seed, scale=1.0)
        ref = DPMSolverMultistepScheduler(prediction_type="epsilon")
        ref.set_timesteps(6)
        want = S.sample(unet_like, x, ref, guidance_scale=2.0, cond=y, uncond=torch.zeros(2), disable=True)
        torch.testing.assert_close(loop(x), want, rtol=0, atol=0)


def test_seed_reproduces_stochastic_draws(eager_capture):
    sigmas = S.get_sigmas_karras(6, 0.03, 14.6)
    gen = torch.Generator().manual_seed(0)
    loop = kdfast.CapturedSampler(denoiser, noise(0), sigmas, sampler="euler_ancestral", generator=gen)
    a = loop(noise(1), seed=11)
    b = loop(noise(1), seed=11)
    c = loop(noise(1))  # the generator moved on: new draws
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    want = S.sample(denoiser, noise(1), sigmas, sampler="euler_ancestral",
                    generator=torch.Generator().manual_seed(11), disable=True)
    torch.testing.assert_close(a, want, rtol=0, atol=0)

    sched = EulerAncestralDiscreteScheduler()
    sched.set_timesteps(5)
    loop = kdfast.CapturedSampler(unet_like, noise(0, scale=1.0), sched, generator=torch.Generator())
    ref = EulerAncestralDiscreteScheduler()
    ref.set_timesteps(5)
    want = S.sample(unet_like, noise(2, scale=1.0), ref, generator=torch.Generator().manual_seed(5), disable=True)
    torch.testing.assert_close(loop(noise(2, scale=1.0), seed=5), want, rtol=0, atol=0)
    # a seed that is not an integer is refused (int() read 1.9, "1" and True as seed 1)
    for bad in (1.9, "1", True, 2**64):
        with pytest.raises(ValueError, match="seed must be an integer"):
            loop(noise(2, scale=1.0), seed=bad)
    torch.testing.assert_close(loop(noise(2, scale=1.0), seed=np.int64(5)), want, rtol=0, atol=0)
    loop(noise(2, scale=1.0), seed=2**64 - 1)  # (torch's whole range: random.getrandbits(64))


def test_bad_replay_inputs_raise(eager_capture):
    sigmas = S.get_sigmas_karras(4, 0.03, 14.6)
    loop = kdfast.CapturedSampler(denoiser, noise(0), sigmas, guidance_scale=2.0, cond=torch.ones(2, 4, 1, 1),
                                  uncond=torch.zeros(2, 4, 1, 1))
    with pytest.raises(ValueError, match=r"x must match the captured \(2, 4, 6, 6\)"):
        loop(noise(1, shape=(3, 4, 6, 6)))
    with pytest.raises(ValueError, match="x must match"):
        loop(noise(1).double())
    with pytest.raises(ValueError, match="cond must match"):
        loop(cond=[1.0, 2.0])
    plain = kdfast.CapturedSampler(denoiser, noise(0), sigmas)
    with pytest.raises(ValueError, match="cond was not a tensor when the loop was captured"):
        plain(cond=torch.ones(2, 4, 1, 1))


def test_extra_args_are_read_in_place(eager_capture):
    """Tensors in extra_args are read from their memory at each replay: copy_ changes them."""
    sigmas = S.get_sigmas_karras(4, 0.03, 14.6)
    shift = torch.zeros(2, 4, 1, 1)

    def shifted(x, sigma, shift):
        return denoiser(x, sigma) + shift

    loop = kdfast.CapturedSampler(shifted, noise(0), sigmas, extra_args={"shift": shift})
    first = loop(noise(1))
    shift.copy_(torch.full_like(shift, 0.25))
    second = loop(noise(1))
    want = S.sample(shifted, noise(1), sigmas, extra_args={"shift": shift}, disable=True)
    torch.testing.assert_close(second, want, rtol=0, atol=0)
    assert not torch.equal(first, second)


def test_float64_latents_are_refused_by_name():
    sigmas = S.get_sigmas_karras(4, 0.03, 14.6, device="cpu").double()
    with pytest.raises(ValueError, match="^CapturedSampler takes float32, float16 or bfloat16 latents, got float64"):
        kdfast.CapturedSampler(denoiser, noise(0).double(), sigmas)
    with pytest.raises(ValueError, match="^cuda_graph=True takes float32"):
        S.sample(denoiser, noise(0).double(), sigmas, cuda_graph=True, disable=True)


def test_needs_cuda_tensors():
    with pytest.raises(ValueError, match="^CapturedSampler needs CUDA tensors"):  # names what the user called
        kdfast.CapturedSampler(denoiser, noise(0), S.get_sigmas_karras(4, 0.03, 14.6))
    with pytest.raises(ValueError, match="unknown sampler"):  # argument errors come first
        kdfast.CapturedSampler(denoiser, noise(0), S.get_sigmas_karras(4, 0.03, 14.6), sampler="nope")


@pytest.mark.parametrize("name", ["DPMSolverSDEScheduler", "CosineDPMSolverMultistepScheduler"])
def test_brownian_tree_schedulers_are_refused_up_front(name):
    # torchsde draws their noise on the host: refused before any capture (or any model call) starts
    import kdfast.schedulers as K

    sched = getattr(K, name)()
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="^CapturedSampler: its noise comes from a torchsde Brownian tree"):
        kdfast.CapturedSampler(lambda x, t: pytest.fail("called the model"), noise(0), sched)
    with pytest.raises(ValueError, match="^cuda_graph=True: its noise comes from a torchsde Brownian tree"):
        S.sample(lambda x, t: pytest.fail("called the model"), noise(0), sched, cuda_graph=True)
    assert sched.step_index is None


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde"])
def test_gpu_replays_equal_eager(sampler):
    sigmas = S.get_sigmas_karras(10, 0.03, 14.6, device="cuda")
    cond, uncond = torch.ones(2, 4, 1, 1, device="cuda"), torch.zeros(2, 4, 1, 1, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    loop = kdfast.CapturedSampler(denoiser, noise(0).cuda(), sigmas, sampler=sampler, guidance_scale=3.0,
                                  cond=cond, uncond=uncond, generator=gen)
    for seed in (1, 2):
        x = noise(seed).cuda()
        got = loop(x, cond=cond * seed, seed=100 + seed)
        want = S.sample(denoiser, x, sigmas, sampler=sampler, guidance_scale=3.0, cond=cond * seed, uncond=uncond,
                        generator=torch.Generator("cuda").manual_seed(100 + seed), disable=True)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_gpu_scheduler_replays_equal_eager():
    sched = DPMSolverMultistepScheduler(prediction_type="epsilon")
    sched.set_timesteps(12, device="cuda")
    y = torch.tensor([1.0, 2.0], device="cuda")
    u = torch.zeros(2, device="cuda")
    loop = kdfast.CapturedSampler(unet_like, noise(0, scale=1.0).cuda(), sched, guidance_scale=2.0, cond=y,
                                  uncond=u)
    for seed in (1, 2):
        x = noise(seed, scale=1.0).cuda()
        ref = DPMSolverMultistepScheduler(prediction_type="epsilon")
        ref.set_timesteps(12, device="cuda")
        want = S.sample(unet_like, x, ref, guidance_scale=2.0, cond=y, uncond=u, disable=True)
        torch.testing.assert_close(loop(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_gpu_capture_on_a_gpu_that_is_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    device = f"cuda:{torch.cuda.device_count() - 1}"
    sigmas = S.get_sigmas_karras(6, 0.03, 14.6, device=device)
    with torch.cuda.device(0):
        loop = kdfast.CapturedSampler(denoiser, noise(0).to(device), sigmas)
        for seed in (1, 2):
            x = noise(seed).to(device)
            want = S.sample(denoiser, x, sigmas, disable=True)
            torch.testing.assert_close(loop(x), want, rtol=1e-6, atol=1e-6)


def test_capture_warms_up_the_whole_loop_before_recording(monkeypatch):
    """The real ``_capture`` (CUDA calls replaced by recorders): one whole eager run, the state
    reset, the RNG put back, then the recorded run. A warm-up of the first steps only would
    leave later steps' kernels (a Triton specialisation of the last step) to compile during
    capture, which fails."""
    events = []

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            events.append("wait")

    class Graph:
        def register_generator_state(self, gen):
            events.append("register")

    class Context:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            events.append(f"enter {self.name}")

        def __exit__(self, *exc):
            events.append(f"exit {self.name}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: Context("side stream"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    streams = []
    monkeypatch.setattr(torch.cuda, "graph", lambda g, stream=None: streams.append(stream) or Context("graph"))
    monkeypatch.setattr(torch.cuda, "device", lambda d: Context(f"device {d}"))
    monkeypatch.setattr(torch.cuda, "default_generators", [object()])
    gen = torch.Generator().manual_seed(3)
    start = gen.get_state()

    def run(*args, **kwargs):
        events.append(("run", args, kwargs))
        torch.randn(4, generator=gen)  # a stochastic sampler draws
        return torch.zeros(2)

    graph, out = S._capture(run, torch.zeros(2), gen, lambda: events.append("reset"))
    runs = [e for e in events if isinstance(e, tuple)]
    assert runs == [("run", (), {}), ("run", (), {})]  # whole loops, no partial warm-up
    order = [e if isinstance(e, str) else "run" for e in events]
    assert order.index("enter side stream") < order.index("run") < order.index("exit side stream") \
        < order.index("reset") < order.index("enter graph")
    # all of it on x's device, whichever is current, and captured on a stream made there (torch's
    # default capture stream belongs to the device current at the process's first capture: with
    # x elsewhere the loop ran eagerly during capture and the graph replayed stale output)
    assert order[0] == "enter device cpu" and order[-1] == "exit device cpu"
    assert len(streams) == 1 and isinstance(streams[0], Stream)
    assert torch.equal(gen.get_state(), start)  # the first replay draws what the eager loop would
    assert isinstance(graph, Graph) and torch.equal(out, torch.zeros(2))
