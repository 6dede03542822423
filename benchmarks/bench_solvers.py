"""Fused solver steps against diffusers' schedulers, measured side by side in one run.

For each solver and latent shape: host time per step (what a pipeline calls per step,
``scale_model_input`` and ``step``, model output given), warm (steps back to back) and cold
(caches evicted before each step), full 20-step loop time (set_timesteps included), peak
memory of a loop, and full-latent bytes moved per step against the lower bound. diffusers'
traffic is counted from the profiler: every aten op with latent-sized inputs reads them and
writes what it allocates (its latent input, if in place), each at its own dtype's size; views
and no-op conversions, which allocate nothing, move nothing. kdfast's bytes are modelled (the
fused kernel reads each input once and writes each output once), not measured here; Nsight
Compute measures them on a GPU (``ncu_solver_bytes.py``). On a GPU also kernel launches,
copies and host syncs per step, for both.

Then a whole sampling loop of a small UNet (the shipped digits teacher, 10 guided images,
20 DPM-Solver++ 2M steps), end to end: diffusers' scheduler with unfused guidance, kdfast's
eager loop and, on a GPU, kdfast's loop replayed as one CUDA graph. And, where k-diffusion
is installed, its samplers against kdfast.sampling's over the same model outputs (the
``kdiff`` section; ``pip install --no-deps k-diffusion torchsde trampoline torchdiffeq`` is
enough: only its sampling module is loaded). And ParaDiGMS' batch step of the parallel DDIM and
DDPM schedulers, a window of mixed timesteps in one call (the ``paradigms`` section), and flow
matching's per-token step at an LTX-like packed latent (``per_token``).

    python benchmarks/bench_solvers.py                 # all shapes, the UNet loop, k-diffusion
    python benchmarks/bench_solvers.py --quick         # SD-sized latent only, fewer repeats
    python benchmarks/bench_solvers.py --sections unet # the UNet loop only
    python benchmarks/bench_solvers.py --sections kdiff --out benchmarks/results/bench_solvers.json
A full run writes JSON rows to benchmarks/results/bench_solvers.json (a partial one only with
--out); rows of the same device, op, shape and dtype are replaced, all others kept.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
import time
import warnings
from typing import Callable, Dict, Optional

import torch
from _common import (check_device, device_name, int_at_least, k_diffusion_sampling, kdfast_backend, merge_rows,
                     peak_memory_bytes, quartiles, quiet_stderr, recorded_results, sync)

import kdfast
from kdfast import schedulers as kd

SHAPES = {"sd-1x4x64x64": (1, 4, 64, 64), "sd-2x4x128x128": (2, 4, 128, 128), "video-1x16x4x64x64": (1, 16, 4, 64, 64)}
STEPS = 20
SECTIONS = ("steps", "unet", "kdiff", "paradigms", "per_token")
# Solvers whose diffusers step is only meaningful on 5-D (video) latents: Helios' DMD step
# broadcasts a [batch, 1, 1, 1, 1] sigma against a 4-D latent into a 5-D result of other size.
VIDEO_ONLY = {"helios_dmd"}
QUICK_SHAPE = "sd-1x4x64x64"  # the one shape of --quick

# (name, kdfast class name, diffusers class name, config)
SOLVERS = [
    ("dpmpp_2m", "DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", {}),
    ("dpmpp_3m", "DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("sde_dpmpp_2m", "DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("unipc_bh2", "UniPCMultistepScheduler", "UniPCMultistepScheduler", {}),
    ("deis_3", "DEISMultistepScheduler", "DEISMultistepScheduler", {"solver_order": 3}),
    ("ddim", "DDIMScheduler", "DDIMScheduler", {}),
    ("euler", "EulerDiscreteScheduler", "EulerDiscreteScheduler", {}),
    ("euler_a", "EulerAncestralDiscreteScheduler", "EulerAncestralDiscreteScheduler", {}),
    ("heun", "HeunDiscreteScheduler", "HeunDiscreteScheduler", {}),
    ("lcm", "LCMScheduler", "LCMScheduler", {}),
    ("flow_euler", "FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    ("ddpm", "DDPMScheduler", "DDPMScheduler", {}),
    ("dpmpp_2s", "DPMSolverSinglestepScheduler", "DPMSolverSinglestepScheduler", {}),
    ("edm_dpmpp_2m", "EDMDPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler", {}),
    ("tcd", "TCDScheduler", "TCDScheduler", {}),
    ("cm", "CMStochasticIterativeScheduler", "CMStochasticIterativeScheduler", {}),
    ("ipndm", "IPNDMScheduler", "IPNDMScheduler", {}),
    ("ddim_inverse", "DDIMInverseScheduler", "DDIMInverseScheduler", {}),
    ("dpmpp_2m_inverse", "DPMSolverMultistepInverseScheduler", "DPMSolverMultistepInverseScheduler", {}),
    ("cogvideox_ddim", "CogVideoXDDIMScheduler", "CogVideoXDDIMScheduler", {}),
    ("sasolver", "SASolverScheduler", "SASolverScheduler", {}),
    ("ltx_rf", "LTXEulerAncestralRFScheduler", "LTXEulerAncestralRFScheduler", {}),
    ("cosine_dpmpp_2m", "CosineDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler", {}),
    ("wuerstchen", "DDPMWuerstchenScheduler", "DDPMWuerstchenScheduler", {}),
    ("helios_unipc", "HeliosScheduler", "HeliosScheduler", {"stages": 1}),
    ("helios_dmd", "HeliosDMDScheduler", "HeliosDMDScheduler", {"stages": 1}),
]


def step_kwargs(scheduler, gen):
    """Pass the generator to schedulers whose step takes one (diffusers' UniPC/DEIS do not)."""
    return {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}


@functools.lru_cache(maxsize=None)
def pipelines_scale_input(cls: type) -> bool:
    """Whether pipelines call ``scale_model_input`` for schedulers of class ``cls``: where
    diffusers' class of that name has one (kdfast's flow-matching schedulers inherit an identity
    one, which diffusers' flow pipelines, their schedulers having none, never call); a class
    diffusers does not have, where it has one."""
    import diffusers

    return hasattr(getattr(diffusers, cls.__name__, cls), "scale_model_input")


def pipeline_step(scheduler, t, model_output, sample, kwargs, i: int = 0, start=None):
    """What a pipeline calls per step besides the model: ``scale_model_input`` (its result is
    the model's input; the model output is precomputed here; flow-matching schedulers have
    none) and ``step``. Every column (host time, bytes, launches, peak memory) measures exactly this.
    ``i``: the step's position in the loop; ``start``: the loop's first sample (Helios' DMD
    pipeline passes both, with the schedule, to every step: it renoises with the start latent)."""
    if pipelines_scale_input(type(scheduler)):
        scheduler.scale_model_input(sample, t)
    if type(scheduler).__name__ == "HeliosDMDScheduler":
        kwargs = dict(kwargs, cur_sampling_step=i, dmd_noisy_tensor=start, dmd_sigmas=scheduler.sigmas,
                      dmd_timesteps=scheduler.timesteps, all_timesteps=scheduler.timesteps)
    return scheduler.step(model_output, t, sample, **kwargs).prev_sample


def loop_timesteps(scheduler, batch: int) -> list:
    """The timesteps a pipeline steps from: every one of the schedule, except for Stable
    Cascade's Wuerstchen scheduler, stepped from every timestep but the final 0 (the loop's
    end), each as one per sample (``t.expand(batch)``), as its pipelines call it."""
    ts = scheduler.timesteps
    if type(scheduler).__name__ == "DDPMWuerstchenScheduler":
        return [t.expand(batch) for t in ts[:-1]]
    return list(ts)


def prepare_loop(scheduler, x, device) -> tuple:
    """A loop's step keywords (a seeded generator where step takes one) and its timesteps."""
    return step_kwargs(scheduler, torch.Generator(device=device).manual_seed(0)), loop_timesteps(scheduler, x.shape[0])


def run_loop(scheduler, x, outputs, device, set_timesteps: bool = True, prepared: Optional[tuple] = None):
    """One pass over the schedule (model outputs precomputed): the last sample. ``prepared``:
    :func:`prepare_loop`'s result, made before a timed loop (the harness's work is no step's)."""
    if set_timesteps:
        scheduler.set_timesteps(STEPS, device=device)
    kwargs, timesteps = prepare_loop(scheduler, x, device) if prepared is None else prepared
    sample = x
    for i, (t, out) in enumerate(zip(timesteps, outputs)):
        sample = pipeline_step(scheduler, t, out, sample, kwargs, i, x)
    return sample


def time_loop(scheduler, x, outputs, device, set_each_time: bool) -> float:
    """Seconds for one pass over the schedule (model outputs precomputed): the steps alone, or,
    with ``set_each_time``, the whole loop a pipeline runs (``set_timesteps`` included)."""
    prepared = None
    if not set_each_time:
        scheduler.set_timesteps(STEPS, device=device)
        prepared = prepare_loop(scheduler, x, device)
    sync(device)
    t0 = time.perf_counter()
    run_loop(scheduler, x, outputs, device, set_timesteps=set_each_time, prepared=prepared)
    sync(device)
    return time.perf_counter() - t0


def last_level_cache_bytes() -> int:
    """Bytes of last-level cache this process's CPUs use (each cache counted once), from sysfs;
    32 MiB when sysfs does not say."""
    caches = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        folder = f"/sys/devices/system/cpu/cpu{cpu}/cache"
        try:
            entries = [os.path.join(folder, e) for e in os.listdir(folder) if e.startswith("index")]
            best = max(entries, key=lambda e: int(open(os.path.join(e, "level")).read()))
            size = open(os.path.join(best, "size")).read().strip()
            shared = open(os.path.join(best, "shared_cpu_list")).read().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        caches[shared] = int(size.rstrip("KMG")) * scale
    return sum(caches.values()) or 32 * 2**20


class CacheEvictor:
    """Reads a host buffer twice the size of the last-level cache: the scheduler's data and code
    leave the CPU caches, as they do while a model forward runs between real steps. (The timed
    quantity is host time, on a GPU too: the device's L2 does not enter it.)"""

    def __init__(self):
        # at most 256 MiB: a VM that reports one last-level cache per vCPU would sum to gigabytes,
        # read before every cold step
        self.buffer = torch.ones(min(2 * last_level_cache_bytes(), 256 * 2**20) // 4)

    def __call__(self) -> None:
        self.buffer.sum()


def time_steps_cold(scheduler, x, outputs, device, evict: Callable[[], None]) -> float:
    """Seconds of host time for the steps of one pass, each step timed alone right after
    ``evict()`` (the eviction itself untimed; on a GPU the queue is drained before each step)."""
    scheduler.set_timesteps(STEPS, device=device)
    kwargs = step_kwargs(scheduler, torch.Generator(device=device).manual_seed(0))
    total, sample = 0.0, x
    for i, (t, out) in enumerate(zip(loop_timesteps(scheduler, x.shape[0]), outputs)):
        evict()
        sync(device)
        t0 = time.perf_counter()
        sample = pipeline_step(scheduler, t, out, sample, kwargs, i, x)
        total += time.perf_counter() - t0
    sync(device)
    return total


def measure_pair(makes, x, outputs, device, repeats: int, evict: Callable[[], None]):
    """Per-step us (warm and cold) and loop ms of each scheduler, repeats interleaved.

    warm: a loop run right after the same scheduler's previous loop (back-to-back steps);
    cold: every step timed alone after ``evict()`` has pushed the scheduler's data and code out
    of the caches, as a model forward between real steps would. Both schedulers are measured
    under the same conditions.
    """
    scheds = [make() for make in makes]
    for s in scheds:
        time_loop(s, x, outputs, device, True)  # warm-up
    warm, cold, loop = ([[] for _ in scheds] for _ in range(3))
    # The warm and loop repeats first, then the cold ones: a loop timed right after cold steps
    # (each behind an eviction, or any idle gap) runs up to 2x slower on this class of VM while
    # the core comes back up to speed, which is not what back-to-back steps cost.
    for _ in range(repeats):
        for k, s in enumerate(scheds):
            steps = len(loop_timesteps(s, x.shape[0]))
            warm[k].append(time_loop(s, x, outputs, device, False) / steps * 1e6)
            loop[k].append(time_loop(s, x, outputs, device, True) * 1e3)
    for _ in range(repeats):
        for k, s in enumerate(scheds):
            cold[k].append(time_steps_cold(s, x, outputs, device, evict) / len(loop_timesteps(s, x.shape[0])) * 1e6)
    return [(quartiles(warm[k]), quartiles(cold[k]), quartiles(loop[k]), len(loop_timesteps(s, x.shape[0])))
            for k, s in enumerate(scheds)]


def loop_peak_memory(make: Callable, x, outputs, device) -> int:
    """Peak bytes allocated during one 20-step loop (set_timesteps included) of a fresh
    scheduler, above the inputs and model outputs (``_common.peak_memory_bytes``)."""
    sched = make()
    run_loop(sched, x, outputs, device)  # one-time costs (shared coefficient tables, caches) first
    sched = make()
    return peak_memory_bytes(lambda: run_loop(sched, x, outputs, device), device)


# Allocate or draw noise only: both sides draw the same noise, so neither is charged for it.
_NO_TRAFFIC = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::randn", "aten::randn_like",
               "aten::normal_"}
# In-place ops that overwrite their first input without reading it.
_WRITE_ONLY = {"aten::copy_", "aten::fill_", "aten::zero_"}
_ITEMSIZE = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4,
             "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1}


def op_latent_bytes(ev, shape: list, numel: int, default_itemsize: int) -> int:
    """Full-latent bytes one top-level aten op moved: it reads each latent-sized input, at that
    input's dtype size, and writes what it allocated (out of place) or its first input (in
    place). An out-of-place op that allocated nothing returned a view or its own input (a
    ``.to()`` to the same dtype, ``.contiguous()``, ``.reshape()``): it moved nothing."""
    if ev.name in _NO_TRAFFIC:
        return 0
    dtypes = getattr(ev, "input_dtypes", None) or [None] * len(ev.input_shapes)
    latent = [numel * _ITEMSIZE.get(d, default_itemsize) if s == shape else 0
              for s, d in zip(ev.input_shapes, dtypes)]
    if not any(latent):
        return 0
    if ev.name.endswith("_") and not ev.name.endswith("__"):  # in place (not aten::__and__): writes its first input
        written, read = latent[0], sum(latent[1:]) if ev.name in _WRITE_ONLY else sum(latent)
    else:
        written = ev.cpu_memory_usage + getattr(ev, "device_memory_usage", 0)  # its output, at its dtype
        if written <= 0:
            return 0
        read = sum(latent)
    return read + written


def latent_bytes_per_step(make: Callable, x, outputs, device) -> float:
    """Full-latent bytes per step seen by the profiler (``op_latent_bytes`` of each top-level
    aten op in the steps, as pipelines call them: ``scale_model_input`` and ``step``)."""
    from torch.profiler import ProfilerActivity, profile

    sched = make()
    sched.set_timesteps(STEPS, device=device)
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
        probe = torch.empty(1 << 20, dtype=torch.uint8, device=device)  # see the check below
        run_loop(sched, x, outputs, device, set_timesteps=False)
    del probe
    if not any(ev.name == "aten::empty" and ev.cpu_memory_usage + getattr(ev, "device_memory_usage", 0) >= 1 << 20
               for ev in prof.events()):
        # Writes are read from the allocations each op records; a profiler that records none
        # on this device would make every out-of-place op look like a view.
        raise RuntimeError(f"the profiler recorded no allocations on {device}: bytes per step cannot be counted")
    total = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::") or ev.cpu_parent is not None and ev.cpu_parent.name.startswith("aten::"):
            continue  # count top-level aten ops only
        total += op_latent_bytes(ev, list(x.shape), x.numel(), x.element_size())
    return total / len(loop_timesteps(sched, x.shape[0]))


def kdfast_bytes_per_step(name: str, numel: int, itemsize: int, scales_input: bool = False) -> Dict[str, float]:
    """Modelled bytes of kdfast's step and the lower bound for the same step (not measured here;
    ``ncu_solver_bytes.py`` measures the kernel's on a GPU).

    ``step``: the fused kernel, reading each latent-sized input once and writing each output
    once, which is also the lower bound for the step. ``scale_model_input``: the Euler-type
    schedulers' ``sample / sqrt(sigma**2 + 1)``, a separate call (one read, one write) that no
    implementation of the two-call API can avoid. ``modelled`` (kdfast) and ``lower_bound`` are
    their sum, equal by construction; diffusers' measured bytes are compared with it."""
    # Latent-sized tensors per step: reads (x, model output, history, aux, noise) and writes
    # (sample, history entry, aux). Heun alternates a 2-read/2-write and a 4-read/1-write stage;
    # DPM-Solver++ 2S a 2-read and a 4-read stage (the second reads the group's first sample and
    # output), both writing the sample and the converted output. IPNDM reads up to three past
    # outputs: 2, 3, 4, then 5 latents (4.7 over 20 steps), writing the sample and the new entry.
    # SA-Solver's step also reads and writes the predictor sum its next corrector shares (aux):
    # 4.55 reads and 2.95 writes over 20 steps; Cosine DPM-Solver++ reads its noise too.
    # Helios' DMD step reads x, the model output and the start latent it renoises with (the last step
    # the first two): 2.95 reads over 20 steps, one write.
    reads = {"dpmpp_2m": 3, "dpmpp_3m": 4, "sde_dpmpp_2m": 4, "unipc_bh2": 5, "deis_3": 4, "ddim": 2,
             "euler": 2, "euler_a": 3, "heun": 3, "lcm": 3, "flow_euler": 2, "ddpm": 3, "dpmpp_2s": 3,
             "edm_dpmpp_2m": 3, "tcd": 3, "cm": 3, "ipndm": 4.7, "ddim_inverse": 2, "dpmpp_2m_inverse": 3,
             "cogvideox_ddim": 2, "sasolver": 4.55, "ltx_rf": 3, "cosine_dpmpp_2m": 3.85, "wuerstchen": 3,
             "helios_unipc": 5, "helios_dmd": 2.95}[name]
    writes = {"dpmpp_2m": 2, "dpmpp_3m": 2, "sde_dpmpp_2m": 2, "unipc_bh2": 3, "deis_3": 2, "ddim": 1,
              "euler": 1, "euler_a": 1, "heun": 1.5, "lcm": 2, "flow_euler": 1, "ddpm": 1, "dpmpp_2s": 2,
              "edm_dpmpp_2m": 2, "tcd": 2, "cm": 1, "ipndm": 2, "ddim_inverse": 1, "dpmpp_2m_inverse": 2,
              "cogvideox_ddim": 1, "sasolver": 2.95, "ltx_rf": 1, "cosine_dpmpp_2m": 2, "wuerstchen": 1,
              "helios_unipc": 3, "helios_dmd": 1}[name]
    step = (reads + writes) * numel * itemsize
    scale = 2 * numel * itemsize if scales_input else 0
    return {"step": step, "scale_model_input": scale, "modelled": step + scale, "lower_bound": step + scale}


def scales_model_input(scheduler, x, device) -> bool:
    """Whether the scheduler's ``scale_model_input`` does work (a read and a write of the latent
    in the lower bound): not where it returns its input (the base class's, IPNDM's, Wuerstchen's)."""
    scheduler.set_timesteps(STEPS, device=device)
    return scheduler.scale_model_input(x, scheduler.timesteps[0]) is not x


def launches_and_syncs(make: Callable, x, outputs, device) -> Optional[Dict[str, float]]:
    """Per step on a GPU: kernels launched, memory copies/sets, and host syncs (the
    synchronizing calls torch's sync debug mode reports). None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sched = make()
    sched.set_timesteps(STEPS, device=device)
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.cuda.set_sync_debug_mode("warn")
            try:  # scale_model_input and step, as in the host-time columns
                run_loop(sched, x, outputs, device, set_timesteps=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize(device)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    kernels = copies = 0
    busy_us = 0.0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if ev.name.startswith(("Memcpy", "Memset")) or "memcpy" in ev.name.lower():
            copies += 1
        else:
            kernels += 1
        busy_us += ev.time_range.elapsed_us()
    n = len(loop_timesteps(sched, x.shape[0]))
    # GPU time per step: with the lower-bound bytes it gives the effective bandwidth, which
    # bounds how far above the lower bound the real traffic can be.
    return {"kernels": kernels / n, "copies": copies / n, "syncs": syncs / n, "gpu_us": busy_us / n}


def unet_loop(device, repeats: int, steps: int = STEPS, guidance: float = 1.2) -> list:
    """The whole loop of a small UNet (10 guided images), end to end, kdfast (the UNet's
    inference form, the fused solver step) vs diffusers (the UNet as saved, diffusers' step)."""
    from kdfast.demo import _anchor_sample
    from kdfast.train.teacher import load_teacher

    teacher = load_teacher(device=device)
    key = "dpmsolver++"
    runs = {
        "diffusers": lambda: _anchor_sample(teacher, key, 1, steps, guidance, seed=0)[0],
        "kdfast": lambda: teacher.sample(1, steps, guidance, scheduler=key, seed=0)[0],
    }
    if device.type == "cuda":
        runs["kdfast_cuda_graph"] = lambda: teacher.sample(1, steps, guidance, scheduler=key, seed=0,
                                                           cuda_graph=True)[0]
    results = {name: run() for name, run in runs.items()}  # warm-up (and the capture)
    times = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved: every variant sees the same machine state
        for name, run in runs.items():
            sync(device)
            t0 = time.perf_counter()
            run()  # returns images on the CPU: the loop has finished
            times[name].append((time.perf_counter() - t0) * 1e3)
    # A replay allocates nothing the allocator's peak would see (its buffers stay in the graph's
    # private pool, reserved at capture): no peak is recorded for it rather than a false one.
    peaks = {name: None if name == "kdfast_cuda_graph" else peak_memory_bytes(run, device)
             for name, run in runs.items()}
    ref = quartiles(times["diffusers"])
    rows = []
    print(f"\nwhole loop, digits teacher UNet on {device_name(device)}: 10 images (guided, batch 20 per UNet call), "
          f"{steps} DPM-Solver++ 2M steps, ms per loop")
    for name in runs:
        q = quartiles(times[name])
        diff = float((results[name] - results["diffusers"]).abs().max())
        rows.append({"op": f"unet_loop:{name}", "candidate": name,
                     "backend": kdfast_backend("solver_step", device) if name.startswith("kdfast") else None,
                     "shape": [10, 1, 16, 16], "dtype": "float32",
                     "device": device_name(device), "steps": steps, "loop_ms": q, "peak_memory_bytes": peaks[name],
                     "anchor": "diffusers loop (the UNet as saved, diffusers DPMSolverMultistepScheduler, unfused "
                               "guidance); kdfast's loop runs the UNet's inference form (UNet.for_inference())",
                     "anchor_loop_ms": ref, "anchor_peak_memory_bytes": peaks["diffusers"],
                     "speedup_loop": ref["median"] / q["median"], "max_abs_diff": diff})
        print(f"  {name:<20}{q['median']:>10.2f} ms  [{q['q1']:.2f}, {q['q3']:.2f}]  x{ref['median'] / q['median']:5.2f}"
              + (f"  peak {peaks[name] / 2**20:6.2f} MiB" if peaks[name] is not None else "  peak (graph pool)")
              + f"  max |diff| to diffusers {diff:.1e}")
    return rows


class _ReplayModel:
    """A denoiser returning precomputed outputs in turn (both samplers call it equally often)."""

    def __init__(self, outputs):
        self.outputs, self.calls = outputs, 0

    def __call__(self, x, sigma, **kwargs):
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return out


class _ReplayNoise(_ReplayModel):
    """A noise sampler returning precomputed noise in turn: the stochastic samplers' results can
    then be compared (their timed runs draw fresh noise, the same cost on both sides)."""

    def __call__(self, sigma, sigma_next):
        return super().__call__(None, sigma)


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max(1, max |theirs|); results of different shapes are not compared
    (a difference would broadcast and look like agreement)."""
    if ours.shape != theirs.shape:
        raise ValueError(f"results of different shapes: {tuple(ours.shape)} and {tuple(theirs.shape)}")
    a, b = ours.double(), theirs.double()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def k_diffusion_loops(device, dtype, repeats: int, shape=(1, 4, 64, 64)) -> list:
    """kdfast.sampling's samplers against k-diffusion's, same sigmas and model outputs."""
    kds = k_diffusion_sampling()
    if kds is None:
        print("\nk-diffusion is not installed: its comparison is skipped "
              "(pip install --no-deps k-diffusion torchsde trampoline torchdiffeq)")
        return []
    import kdfast.sampling as kd

    g = torch.Generator().manual_seed(0)
    sigmas = kd.get_sigmas_karras(STEPS, 0.0292, 14.6146, device=device)
    x = (torch.randn(shape, generator=g) * float(sigmas[0])).to(device=device, dtype=dtype)
    outputs = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) * 0.5 for _ in range(2 * STEPS)]
    noises = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(2 * STEPS)]

    def gaussian(sigma, sigma_next):  # the same noise source for both (k-diffusion's SDE default is a Brownian tree)
        return torch.randn(shape, device=device, dtype=dtype)

    cases = [("euler", {}), ("heun", {}), ("lms", {}), ("dpmpp_2m", {}), ("euler_ancestral", {"noise_sampler": gaussian}),
             ("dpm_2_ancestral", {"noise_sampler": gaussian}), ("dpmpp_2s_ancestral", {"noise_sampler": gaussian}),
             ("dpmpp_sde", {"noise_sampler": gaussian}), ("dpmpp_2m_sde", {"noise_sampler": gaussian}),
             ("dpmpp_3m_sde", {"noise_sampler": gaussian})]
    rows = []
    print(f"\nkdfast.sampling vs k-diffusion samplers, {'x'.join(map(str, shape))}, {STEPS} steps, ms per loop "
          "(model outputs precomputed)")
    for name, options in cases:
        runs = {"kdfast": getattr(kd, f"sample_{name}"), "k-diffusion": getattr(kds, f"sample_{name}")}
        def replayed(fn):  # the same model outputs and, for the stochastic samplers, the same noise
            noise = {"noise_sampler": _ReplayNoise(noises)} if "noise_sampler" in options else {}
            return fn(_ReplayModel(outputs), x, sigmas, disable=True, **{**options, **noise})

        results = {k: replayed(fn) for k, fn in runs.items()}
        times = {k: [] for k in runs}
        for _ in range(repeats):
            for k, fn in runs.items():
                model = _ReplayModel(outputs)
                sync(device)
                t0 = time.perf_counter()
                fn(model, x, sigmas, disable=True, **options)
                sync(device)
                times[k].append((time.perf_counter() - t0) * 1e3)
        peaks = {k: peak_memory_bytes(lambda: fn(_ReplayModel(outputs), x, sigmas, disable=True, **options), device)
                 for k, fn in runs.items()}
        q, ref = quartiles(times["kdfast"]), quartiles(times["k-diffusion"])
        diff = relative_difference(results["kdfast"], results["k-diffusion"])
        if not diff <= (1e-4 if dtype == torch.float32 else 2e-2):
            print(f"  WARNING: {name}: kdfast's loop differs from k-diffusion's by {diff:.1e} (relative)",
                  file=sys.stderr)
        rows.append({"op": f"kdiffusion_loop:{name}", "backend": kdfast_backend("solver_step", device),
                     "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                     "device": device_name(device), "steps": STEPS, "loop_ms": q, "peak_memory_bytes": peaks["kdfast"],
                     "anchor": "k-diffusion sampling", "anchor_loop_ms": ref,
                     "anchor_peak_memory_bytes": peaks["k-diffusion"], "speedup_loop": ref["median"] / q["median"],
                     "relative_diff": diff})
        print(f"  {name:<20}kdfast {q['median']:8.2f}  k-diffusion {ref['median']:8.2f}  x{ref['median'] / q['median']:5.2f}"
              f"  peak {peaks['kdfast'] / 2**20:.2f} vs {peaks['k-diffusion'] / 2**20:.2f} MiB"
              + ("" if diff is None else f"  rel. diff {diff:.1e}"))
    return rows


def interleaved_us(runs: Dict[str, Callable[[], object]], repeats: int, calls: int, device) -> list:
    """Quartiles of the us per call of each of ``runs`` (in their order), timed as ``repeats``
    interleaved rounds of ``calls`` calls each, the device drained around each round."""
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                run()
            sync(device)
            times[k].append((time.perf_counter() - t0) / calls * 1e6)
    return [quartiles(times[k]) for k in runs]


def paradigms_batch_steps(device, dtype, repeats: int, window: int = 8, images: int = 2,
                          latent=(4, 64, 64), steps: int = 50) -> list:
    """ParaDiGMS' batch step (``batch_step_no_noise``) against diffusers': a window of ``window``
    consecutive timesteps, each repeated for ``images`` images, SD-sized latents; host time per
    call, model outputs given. kdfast's is one fused pass with a coefficient row per sample."""
    import diffusers

    g = torch.Generator().manual_seed(0)
    batch = window * images
    x = torch.randn((batch, *latent), generator=g).to(device=device, dtype=dtype)
    m = (torch.randn((batch, *latent), generator=g) * 0.5).to(device=device, dtype=dtype)
    rows = []
    print(f"\nParaDiGMS batch step, a window of {window} timesteps x {images} images, {'x'.join(map(str, latent))} "
          f"latents, us per call (model outputs given)")
    for name in ("DDIMParallelScheduler", "DDPMParallelScheduler"):
        scheds = {"kdfast": getattr(kd, name)(), "diffusers": getattr(diffusers, name)()}
        for s in scheds.values():
            s.set_timesteps(steps, device=device)
        # the window as ParaDiGMS' pipeline passes it: a copy (block_t.flatten), not a view of the schedule
        t = scheds["kdfast"].timesteps[10:10 + window, None].expand(-1, images).reshape(-1)
        results = {k: s.batch_step_no_noise(m, t, x) for k, s in scheds.items()}
        q, ref = interleaved_us({k: (lambda s=s: s.batch_step_no_noise(m, t, x)) for k, s in scheds.items()},
                                repeats, 20, device)
        diff = relative_difference(results["kdfast"], results["diffusers"])
        if not diff <= (1e-4 if dtype == torch.float32 else 2e-2):
            print(f"  WARNING: {name}: kdfast's batch step differs from diffusers' by {diff:.1e} (relative)",
                  file=sys.stderr)
        short = name.replace("Scheduler", "").lower()
        rows.append({"op": f"batch_step_no_noise:{short}", "backend": kdfast_backend("solver_step", device),
                     "shape": [batch, *latent], "dtype": str(dtype).replace("torch.", ""),
                     "device": device_name(device), "window": window, "images": images, "us_per_call": q,
                     "anchor": f"diffusers {diffusers.__version__} {name}", "anchor_us_per_call": ref,
                     "speedup": ref["median"] / q["median"], "max_rel_diff_to_anchor": diff,
                     "peak_memory_bytes": peak_memory_bytes(lambda: scheds["kdfast"].batch_step_no_noise(m, t, x),
                                                            device),
                     "anchor_peak_memory_bytes": peak_memory_bytes(
                         lambda: scheds["diffusers"].batch_step_no_noise(m, t, x), device)})
        print(f"  {short:<20}kdfast {q['median']:9.1f}  diffusers {ref['median']:9.1f}  x{ref['median'] / q['median']:5.2f}"
              f"  rel. diff {diff:.1e}")
    return rows


def per_token_steps(device, dtype, repeats: int, batch: int = 2, tokens: int = 4096, channels: int = 128,
                    steps: int = 30) -> list:
    """Flow matching's per-token step (LTX-Video conditioning: some tokens further along) against
    diffusers', at an LTX-like packed latent ``[batch, tokens, channels]``; host time per step.
    kdfast's is one fused pass with a row of coefficients per token."""
    import diffusers

    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, tokens, channels), generator=g).to(device=device, dtype=dtype)
    v = torch.randn((batch, tokens, channels), generator=g).to(device=device, dtype=dtype)
    scheds = {"kdfast": kd.FlowMatchEulerDiscreteScheduler(shift=3.0),
              "diffusers": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)}
    for s in scheds.values():
        s.set_timesteps(steps, device=device)
    per_token = scheds["diffusers"].timesteps[5].expand(batch, tokens).clone()
    per_token[:, :tokens // 8] = scheds["diffusers"].timesteps[20]  # conditioning tokens

    def step(s):
        s.set_begin_index(5)
        s._step_index = None
        return s.step(v, s.timesteps[5], x, per_token_timesteps=per_token).prev_sample

    diff = relative_difference(step(scheds["kdfast"]), step(scheds["diffusers"]))
    if not diff <= 1e-6:
        print(f"  WARNING: per-token step differs from diffusers' by {diff:.1e} (relative)", file=sys.stderr)
    q, ref = interleaved_us({k: (lambda s=s: step(s)) for k, s in scheds.items()}, repeats, 10, device)
    print(f"\nPer-token flow step, {batch}x{tokens}x{channels} ({tokens // 8} conditioning tokens per sample), "
          f"us per step: kdfast {q['median']:.1f}  diffusers {ref['median']:.1f}  x{ref['median'] / q['median']:.2f}  "
          f"rel. diff {diff:.1e}")
    return [{"op": "flow_per_token_step", "backend": kdfast_backend("solver_step", device),
             "shape": [batch, tokens, channels], "dtype": str(dtype).replace("torch.", ""),
             "device": device_name(device), "us_per_step": q,
             "anchor": f"diffusers {diffusers.__version__} FlowMatchEulerDiscreteScheduler",
             "anchor_us_per_step": ref, "speedup": ref["median"] / q["median"], "max_rel_diff_to_anchor": diff,
             "peak_memory_bytes": peak_memory_bytes(lambda: step(scheds["kdfast"]), device),
             "anchor_peak_memory_bytes": peak_memory_bytes(lambda: step(scheds["diffusers"]), device)}]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="SD-sized latent only, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--solvers", default=None,
                        help=f"comma-separated subset of {','.join(name for name, *_ in SOLVERS)}")
    parser.add_argument("--repeats", type=int_at_least(1), default=None,
                        help="timed repeats per solver (default 15, quick 5)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="what to run: steps (per-step and loop times per solver), unet (the UNet loop), "
                             "kdiff (against k-diffusion's samplers, where installed), paradigms (ParaDiGMS' "
                             "batch step), per_token (flow matching's per-token step)")
    parser.add_argument("--out", default=None,
                        help="JSON file for the rows (default: benchmarks/results/bench_solvers.json, updated only by "
                             "full runs); rows of the same device, op, shape and dtype are replaced, all others kept")
    args = parser.parse_args(argv)
    # Arguments are checked before anything runs: an unknown name would otherwise give an
    # empty table and exit 0.
    device, dtype = check_device(parser, args.device), getattr(torch, args.dtype)
    wanted = None
    if args.solvers is not None:
        wanted = {s.strip() for s in args.solvers.split(",") if s.strip()}
        known = [name for name, *_ in SOLVERS]
        unknown = sorted(wanted - set(known))
        if unknown or not wanted:
            parser.error(f"--solvers: {'unknown solver(s) ' + ', '.join(unknown) if unknown else 'no solver given'}; "
                         f"expected some of {', '.join(known)}")
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or not sections <= set(SECTIONS):
        parser.error(f"--sections takes some of {', '.join(SECTIONS)}, got {args.sections!r}")
    if wanted and wanted <= VIDEO_ONLY and args.quick and sections == {"steps"}:
        parser.error(f"--quick measures the {QUICK_SHAPE} latents only, which {', '.join(sorted(wanted))} does not "
                     f"take (video latents): nothing would be measured")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import diffusers
    except ImportError:
        raise SystemExit("bench_solvers compares against diffusers: pip install diffusers")
    diffusers.utils.logging.set_verbosity_error()
    out = args.out
    if out is None and not (args.quick or args.solvers or sections != set(SECTIONS)):
        # only a full run updates the recorded figures; a partial one writes where --out says
        out = recorded_results(__file__)
    rows = []

    def record(new_rows):  # merged as soon as measured: a run cut short keeps what it measured
        rows.extend(new_rows)
        if out:
            merge_rows(out, new_rows)

    repeats = args.repeats or (5 if args.quick else 15)
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k == QUICK_SHAPE}
    print(f"kdfast {kdfast.__version__} vs diffusers {diffusers.__version__} on {device_name(device)}, {args.dtype}, "
          f"{STEPS} steps")
    evict = CacheEvictor() if "steps" in sections else None
    print(f"{'':<36}{'us/step, warm':^28}{'us/step, cold':^28}{'20-step loop, ms':^28}{'loop peak, KiB':^22}")
    print(f"{'solver':<18}{'shape':<22}" + f"{'kdfast':>9}{'diffusers':>10}{'x':>9}" * 3
          + f"{'kdfast':>11}{'diffusers':>11}{'df bytes/LB':>13}")
    for shape_name, shape in (shapes if "steps" in sections else {}).items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        outputs = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) * 0.5 for _ in range(2 * STEPS)]
        for name, kd_name, df_name, config in SOLVERS:
            if wanted and name not in wanted:
                continue
            if not hasattr(kd, kd_name):
                continue  # not implemented yet in this build
            if name in VIDEO_ONLY and len(shape) != 5:
                continue
            kd_make = lambda: getattr(kd, kd_name)(**config)  # noqa: E731
            df_make = lambda: getattr(diffusers, df_name)(**config)  # noqa: E731
            try:
                kd_make(), df_make()
            except ImportError as exc:  # a scheduler needing a package this machine lacks (torchsde)
                print(f"  {name}: skipped, {exc}", file=sys.stderr)
                continue
            (kd_step, kd_cold, kd_loop, n), (df_step, df_cold, df_loop, _) = measure_pair(
                (kd_make, df_make), x, outputs, device, repeats, evict)
            df_bytes = latent_bytes_per_step(df_make, x, outputs, device)
            kd_peak = loop_peak_memory(kd_make, x, outputs, device)
            df_peak = loop_peak_memory(df_make, x, outputs, device)
            kd_launches = launches_and_syncs(kd_make, x, outputs, device)
            df_launches = launches_and_syncs(df_make, x, outputs, device)
            scales = scales_model_input(kd_make(), x, device)
            kd_bytes = kdfast_bytes_per_step(name, x.numel(), x.element_size(), scales_input=scales)
            # the same loop as diffusers' (same outputs, same generator draws): else no speed-up to report
            ours, theirs = run_loop(kd_make(), x, outputs, device), run_loop(df_make(), x, outputs, device)
            try:
                rel_diff = relative_difference(ours, theirs)
            except ValueError as exc:
                print(f"  {name}: left out: {exc}", file=sys.stderr)
                continue
            # (16-bit: both loops are a few ulps of bf16 from a float64 one, kdfast's the closer)
            if not rel_diff <= (1e-4 if dtype == torch.float32 else 5e-2):
                print(f"  WARNING: {name}: kdfast's loop differs from diffusers' by {rel_diff:.1e} (relative)",
                      file=sys.stderr)
            row = {
                "op": f"scheduler_step:{name}", "backend": kdfast_backend("solver_step", device),
                "shape": list(shape), "dtype": args.dtype, "device": device_name(device), "steps": n,
                "us_per_step": kd_step, "anchor": f"diffusers {diffusers.__version__} {df_name}",
                "anchor_us_per_step": df_step, "speedup_per_step": df_step["median"] / kd_step["median"],
                "us_per_step_cold": kd_cold, "anchor_us_per_step_cold": df_cold,
                "speedup_per_step_cold": df_cold["median"] / kd_cold["median"],
                "loop_ms": kd_loop, "anchor_loop_ms": df_loop, "speedup_loop": df_loop["median"] / kd_loop["median"],
                "modelled_bytes_per_step": kd_bytes["modelled"], "lower_bound_bytes": kd_bytes["lower_bound"],
                "anchor_bytes_per_step": df_bytes, "anchor_bytes_ratio": df_bytes / kd_bytes["lower_bound"],
                "peak_memory_bytes": kd_peak, "anchor_peak_memory_bytes": df_peak,
                "per_step_gpu": kd_launches, "anchor_per_step_gpu": df_launches,
                "max_rel_diff_to_anchor": rel_diff,
            }
            print(f"{name:<18}{shape_name:<22}"
                  f"{kd_step['median']:>9.1f}{df_step['median']:>10.1f}{row['speedup_per_step']:>8.1f}x"
                  f"{kd_cold['median']:>9.1f}{df_cold['median']:>10.1f}{row['speedup_per_step_cold']:>8.1f}x"
                  f"{kd_loop['median']:>9.2f}{df_loop['median']:>10.2f}{row['speedup_loop']:>8.1f}x"
                  f"{kd_peak / 1024:>11.0f}{df_peak / 1024:>11.0f}{row['anchor_bytes_ratio']:>12.1f}x")
            if kd_launches is not None:
                if kd_launches["gpu_us"] > 0:  # 0: the profiler recorded no kernel time
                    row["effective_gb_per_s"] = kd_bytes["lower_bound"] / (kd_launches["gpu_us"] * 1e3)
                print(f"{'':<18}per step: kdfast {kd_launches['kernels']:.2f} kernels, {kd_launches['copies']:.2f} "
                      f"copies, {kd_launches['syncs']:.2f} syncs, {kd_launches['gpu_us']:.1f} us on the GPU "
                      f"({row.get('effective_gb_per_s', float('nan')):.0f} GB/s at the lower-bound bytes); diffusers "
                      f"{df_launches['kernels']:.2f} kernels, {df_launches['copies']:.2f} copies, "
                      f"{df_launches['syncs']:.2f} syncs, {df_launches['gpu_us']:.1f} us")
            record([row])
    if "unet" in sections:
        record(unet_loop(device, repeats // 3 or 1))
    if "kdiff" in sections:
        record(k_diffusion_loops(device, dtype, repeats))
    if "paradigms" in sections:
        record(paradigms_batch_steps(device, dtype, repeats))
    if "per_token" in sections:
        record(per_token_steps(device, dtype, repeats))
    if out and rows:
        print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
