"""Fused solver steps against diffusers' schedulers, measured side by side in one run.

For each solver and latent shape: host time per step (the step call alone, model output
given), full 20-step loop time (set_timesteps included), and full-latent bytes moved per
step against the lower bound. diffusers' traffic is counted from the profiler: every aten
op touching latent-sized tensors reads its latent-sized inputs and writes one latent. On a
GPU also kernel launches, copies and host syncs per step, for both.

Then a whole sampling loop of a small UNet (the shipped digits teacher, 10 guided images,
20 DPM-Solver++ 2M steps), end to end: diffusers' scheduler with unfused guidance, kdfast's
eager loop and, on a GPU, kdfast's loop replayed as one CUDA graph. And, where k-diffusion
is installed, its samplers against kdfast.sampling's over the same model outputs (the
``kdiff`` section; ``pip install --no-deps k-diffusion torchsde trampoline torchdiffeq`` is
enough: only its sampling module is loaded).

    python benchmarks/bench_solvers.py                 # all shapes, the UNet loop, k-diffusion
    python benchmarks/bench_solvers.py --quick         # SD-sized latent only, fewer repeats
    python benchmarks/bench_solvers.py --sections unet # the UNet loop only
Writes JSON rows to benchmarks/results/bench_solvers.json.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import time
import warnings
from typing import Callable, Dict, Optional

import torch
from _common import check_device, device_name, int_at_least, k_diffusion_sampling, quartiles, sync

import kdfast
from kdfast import schedulers as kd

SHAPES = {"sd-1x4x64x64": (1, 4, 64, 64), "sd-2x4x128x128": (2, 4, 128, 128), "video-1x16x4x64x64": (1, 16, 4, 64, 64)}
STEPS = 20

# (name, kdfast class name, diffusers class name, config)
SOLVERS = [
    ("dpmpp_2m", "DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", {}),
    ("dpmpp_3m", "DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("sde_dpmpp_2m", "DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("unipc_bh2", "UniPCMultistepScheduler", "UniPCMultistepScheduler", {}),
    ("deis_3", "DEISMultistepScheduler", "DEISMultistepScheduler", {}),
    ("ddim", "DDIMScheduler", "DDIMScheduler", {}),
    ("euler", "EulerDiscreteScheduler", "EulerDiscreteScheduler", {}),
    ("euler_a", "EulerAncestralDiscreteScheduler", "EulerAncestralDiscreteScheduler", {}),
    ("heun", "HeunDiscreteScheduler", "HeunDiscreteScheduler", {}),
    ("lcm", "LCMScheduler", "LCMScheduler", {}),
]




def time_loop(scheduler, x, outputs, device, set_each_time: bool) -> float:
    """Seconds for one pass over the schedule (model outputs precomputed)."""
    gen = torch.Generator(device=device).manual_seed(0)
    kwargs = step_kwargs(scheduler, gen)
    if not set_each_time:
        scheduler.set_timesteps(STEPS, device=device)
    sync(device)
    t0 = time.perf_counter()
    if set_each_time:
        scheduler.set_timesteps(STEPS, device=device)
    sample = x
    for t, out in zip(scheduler.timesteps, outputs):
        scheduler.scale_model_input(sample, t)  # pipelines call it every step; the model is precomputed
        sample = scheduler.step(out, t, sample, **kwargs).prev_sample
    sync(device)
    return time.perf_counter() - t0


def step_kwargs(scheduler, gen):
    """Pass the generator to schedulers whose step takes one (diffusers' UniPC/DEIS do not)."""
    return {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}


def measure_pair(makes, x, outputs, device, repeats: int):
    """Per-step us (warm and cold) and loop ms of each scheduler, repeats interleaved.

    warm: a loop run right after the same scheduler's previous loop (back-to-back steps);
    cold: the first loop after the other scheduler ran, its caches evicted, as a model
    forward between real steps would. Both schedulers are measured under the same conditions.
    """
    scheds = [make() for make in makes]
    for s in scheds:
        time_loop(s, x, outputs, device, True)  # warm-up
    warm, cold, loop = ([[] for _ in scheds] for _ in range(3))
    for _ in range(repeats):
        for k, s in enumerate(scheds):
            steps = len(s.timesteps)
            cold[k].append(time_loop(s, x, outputs, device, False) / steps * 1e6)
            warm[k].append(time_loop(s, x, outputs, device, False) / steps * 1e6)
            loop[k].append(time_loop(s, x, outputs, device, True) * 1e3)
    return [(quartiles(warm[k]), quartiles(cold[k]), quartiles(loop[k]), len(s.timesteps))
            for k, s in enumerate(scheds)]


def latent_bytes_per_step(make: Callable, x, outputs, device) -> float:
    """Full-latent bytes per step seen by the profiler (each latent-sized aten op: inputs + 1 output)."""
    from torch.profiler import ProfilerActivity, profile

    sched = make()
    sched.set_timesteps(STEPS, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = list(x.shape)
    numel = x.numel()
    saved_stderr = os.dup(2)  # the profiler library logs start/stop lines on fd 2
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            sample = x
            for t, out in zip(sched.timesteps, outputs):
                sample = sched.step(out, t, sample, **step_kwargs(sched, gen)).prev_sample
    finally:
        os.dup2(saved_stderr, 2)
        os.close(devnull)
        os.close(saved_stderr)
    total = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::") or ev.cpu_parent is not None and ev.cpu_parent.name.startswith("aten::"):
            continue  # count top-level aten ops only
        latent_inputs = [s for s in ev.input_shapes if isinstance(s, list) and s == shape]
        if ev.name in ("aten::empty", "aten::empty_like", "aten::empty_strided", "aten::randn", "aten::normal_"):
            latent_inputs = []
        if latent_inputs:
            total += (len(latent_inputs) + 1) * numel * x.element_size()
    return total / len(sched.timesteps)


def kdfast_bytes_per_step(name: str, numel: int, itemsize: int) -> Dict[str, float]:
    """What the fused kernel reads and writes, and the lower bound for the same step."""
    # Latent-sized tensors per step: reads (x, model output, history, aux, noise) and writes
    # (sample, history entry, aux). Heun alternates a 3-read/2-write and a 4-read/1-write stage.
    reads = {"dpmpp_2m": 3, "dpmpp_3m": 4, "sde_dpmpp_2m": 4, "unipc_bh2": 5, "deis_3": 4, "ddim": 2,
             "euler": 2, "euler_a": 3, "heun": 3.5, "lcm": 3}[name]
    writes = {"dpmpp_2m": 2, "dpmpp_3m": 2, "sde_dpmpp_2m": 2, "unipc_bh2": 3, "deis_3": 2, "ddim": 1,
              "euler": 1, "euler_a": 1, "heun": 1.5, "lcm": 2}[name]
    # The lower bound reads x, the model output, the history the formula needs (and the noise
    # of SDE steps) once, and writes the new sample and the history entry once: exactly the
    # fused kernel's traffic, so the ratio is 1.0 by construction; diffusers is compared to it.
    return {"kdfast": (reads + writes) * numel * itemsize, "lower_bound": (reads + writes) * numel * itemsize}


def launches_and_syncs(make: Callable, x, outputs, device) -> Optional[Dict[str, float]]:
    """Per step on a GPU: kernels launched, memory copies/sets, and host syncs (the
    synchronizing calls torch's sync debug mode reports). None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sched = make()
    sched.set_timesteps(STEPS, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    kwargs = step_kwargs(sched, gen)
    pairs = list(zip(sched.timesteps, outputs))
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sample = x
                for t, out in pairs:  # the step alone, as in the host-time columns
                    sample = sched.step(out, t, sample, **kwargs).prev_sample
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
    n = len(pairs)
    # GPU time per step: with the lower-bound bytes it gives the effective bandwidth, which
    # bounds how far above the lower bound the real traffic can be.
    return {"kernels": kernels / n, "copies": copies / n, "syncs": syncs / n, "gpu_us": busy_us / n}


def unet_loop(device, repeats: int, steps: int = STEPS, guidance: float = 1.2) -> list:
    """The whole loop of a small UNet (10 guided images), end to end, kdfast vs diffusers."""
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
    ref = quartiles(times["diffusers"])
    rows = []
    print(f"\nwhole loop, digits teacher UNet on {device_name(device)}: 10 images (guided, batch 20 per UNet call), "
          f"{steps} DPM-Solver++ 2M steps, ms per loop")
    for name in runs:
        q = quartiles(times[name])
        diff = float((results[name] - results["diffusers"]).abs().max())
        rows.append({"op": f"unet_loop:{name}", "shape": [10, 1, 16, 16], "dtype": "float32",
                     "device": device_name(device), "steps": steps, "loop_ms": q,
                     "anchor": "diffusers loop (same UNet, diffusers DPMSolverMultistepScheduler, unfused guidance)",
                     "anchor_loop_ms": ref, "speedup_loop": ref["median"] / q["median"], "max_abs_diff": diff})
        print(f"  {name:<20}{q['median']:>10.2f} ms  [{q['q1']:.2f}, {q['q3']:.2f}]  x{ref['median'] / q['median']:5.2f}"
              f"  max |diff| to diffusers {diff:.1e}")
    return rows


class _ReplayModel:
    """A denoiser returning precomputed outputs in turn (both samplers call it equally often)."""

    def __init__(self, outputs):
        self.outputs, self.calls = outputs, 0

    def __call__(self, x, sigma, **kwargs):
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return out


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

    def gaussian(sigma, sigma_next):  # the same noise source for both (k-diffusion's SDE default is a Brownian tree)
        return torch.randn(shape, device=device, dtype=dtype)

    cases = [("euler", {}), ("heun", {}), ("dpmpp_2m", {}), ("euler_ancestral", {"noise_sampler": gaussian}),
             ("dpmpp_2m_sde", {"noise_sampler": gaussian}), ("dpmpp_3m_sde", {"noise_sampler": gaussian})]
    rows = []
    print(f"\nkdfast.sampling vs k-diffusion samplers, {'x'.join(map(str, shape))}, {STEPS} steps, ms per loop "
          "(model outputs precomputed)")
    for name, options in cases:
        runs = {"kdfast": getattr(kd, f"sample_{name}"), "k-diffusion": getattr(kds, f"sample_{name}")}
        results = {k: fn(_ReplayModel(outputs), x, sigmas, disable=True, **options) for k, fn in runs.items()}
        times = {k: [] for k in runs}
        for _ in range(repeats):
            for k, fn in runs.items():
                model = _ReplayModel(outputs)
                sync(device)
                t0 = time.perf_counter()
                fn(model, x, sigmas, disable=True, **options)
                sync(device)
                times[k].append((time.perf_counter() - t0) * 1e3)
        q, ref = quartiles(times["kdfast"]), quartiles(times["k-diffusion"])
        diff = None
        if not options:  # deterministic: the same result
            a, b = results["kdfast"].double(), results["k-diffusion"].double()
            diff = float((a - b).abs().max() / max(1.0, float(b.abs().max())))
        rows.append({"op": f"kdiffusion_loop:{name}", "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                     "device": device_name(device), "steps": STEPS, "loop_ms": q, "anchor": "k-diffusion sampling",
                     "anchor_loop_ms": ref, "speedup_loop": ref["median"] / q["median"], "relative_diff": diff})
        print(f"  {name:<18}kdfast {q['median']:8.2f}  k-diffusion {ref['median']:8.2f}  x{ref['median'] / q['median']:5.2f}"
              + ("" if diff is None else f"  rel. diff {diff:.1e}"))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="SD-sized latent only, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--solvers", default=None,
                        help=f"comma-separated subset of {','.join(name for name, *_ in SOLVERS)}")
    parser.add_argument("--repeats", type=int_at_least(1), default=None,
                        help="timed repeats per solver (default 15, quick 5)")
    parser.add_argument("--sections", default="steps,unet,kdiff",
                        help="what to run: steps (per-step and loop times per solver), unet (the UNet loop), "
                             "kdiff (against k-diffusion's samplers, where installed)")
    parser.add_argument("--out", default=None,
                        help="JSON file for the rows (default: benchmarks/results/bench_solvers.json, updated only by "
                             "full runs; rows of other devices are kept)")
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
    if not sections or not sections <= {"steps", "unet", "kdiff"}:
        parser.error(f"--sections takes steps, unet and/or kdiff, got {args.sections!r}")
    try:
        import diffusers
    except ImportError:
        raise SystemExit("bench_solvers compares against diffusers: pip install diffusers")
    diffusers.utils.logging.set_verbosity_error()
    repeats = args.repeats or (5 if args.quick else 15)
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k == "sd-1x4x64x64"}
    rows = []
    print(f"kdfast {kdfast.__version__} vs diffusers {diffusers.__version__} on {device_name(device)}, {args.dtype}, "
          f"{STEPS} steps")
    print(f"{'':<36}{'us/step, warm':^28}{'us/step, cold':^28}{'20-step loop, ms':^28}")
    print(f"{'solver':<14}{'shape':<22}" + f"{'kdfast':>9}{'diffusers':>10}{'x':>9}" * 3 + f"{'df bytes/LB':>13}")
    for shape_name, shape in (shapes if "steps" in sections else {}).items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        outputs = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) * 0.5 for _ in range(2 * STEPS)]
        for name, kd_name, df_name, config in SOLVERS:
            if wanted and name not in wanted:
                continue
            if not hasattr(kd, kd_name):
                continue  # not implemented yet in this build
            kd_make = lambda: getattr(kd, kd_name)(**config)  # noqa: E731
            df_make = lambda: getattr(diffusers, df_name)(**config)  # noqa: E731
            (kd_step, kd_cold, kd_loop, n), (df_step, df_cold, df_loop, _) = measure_pair(
                (kd_make, df_make), x, outputs, device, repeats)
            df_bytes = latent_bytes_per_step(df_make, x, outputs, device)
            kd_launches = launches_and_syncs(kd_make, x, outputs, device)
            df_launches = launches_and_syncs(df_make, x, outputs, device)
            kd_bytes = kdfast_bytes_per_step(name, x.numel(), x.element_size())
            row = {
                "op": f"scheduler_step:{name}", "backend": kdfast.backends.op("solver_step").select(device.type).backend,
                "shape": list(shape), "dtype": args.dtype, "device": device_name(device), "steps": n,
                "us_per_step": kd_step, "anchor": f"diffusers {diffusers.__version__} {df_name}",
                "anchor_us_per_step": df_step, "speedup_per_step": df_step["median"] / kd_step["median"],
                "us_per_step_cold": kd_cold, "anchor_us_per_step_cold": df_cold,
                "speedup_per_step_cold": df_cold["median"] / kd_cold["median"],
                "loop_ms": kd_loop, "anchor_loop_ms": df_loop, "speedup_loop": df_loop["median"] / kd_loop["median"],
                "bytes_per_step": kd_bytes["kdfast"], "lower_bound_bytes": kd_bytes["lower_bound"],
                "anchor_bytes_per_step": df_bytes, "anchor_bytes_ratio": df_bytes / kd_bytes["lower_bound"],
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                "per_step_gpu": kd_launches, "anchor_per_step_gpu": df_launches,
            }
            rows.append(row)
            print(f"{name:<14}{shape_name:<22}"
                  f"{kd_step['median']:>9.1f}{df_step['median']:>10.1f}{row['speedup_per_step']:>8.1f}x"
                  f"{kd_cold['median']:>9.1f}{df_cold['median']:>10.1f}{row['speedup_per_step_cold']:>8.1f}x"
                  f"{kd_loop['median']:>9.2f}{df_loop['median']:>10.2f}{row['speedup_loop']:>8.1f}x"
                  f"{row['anchor_bytes_ratio']:>12.1f}x")
            if kd_launches is not None:
                row["effective_gb_per_s"] = kd_bytes["lower_bound"] / (kd_launches["gpu_us"] * 1e3)
                print(f"{'':<14}per step: kdfast {kd_launches['kernels']:.2f} kernels, {kd_launches['copies']:.2f} "
                      f"copies, {kd_launches['syncs']:.2f} syncs, {kd_launches['gpu_us']:.1f} us on the GPU "
                      f"({row['effective_gb_per_s']:.0f} GB/s at the lower-bound bytes); diffusers "
                      f"{df_launches['kernels']:.2f} kernels, {df_launches['copies']:.2f} copies, "
                      f"{df_launches['syncs']:.2f} syncs, {df_launches['gpu_us']:.1f} us")
    if "unet" in sections:
        rows += unet_loop(device, repeats // 3 or 1)
    if "kdiff" in sections:
        rows += k_diffusion_loops(device, dtype, repeats)
    out = args.out
    if out is None:
        if args.quick or args.solvers or sections != {"steps", "unet", "kdiff"}:
            return  # a partial run must not replace the recorded figures
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_solvers.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    kept = []
    if os.path.exists(out):
        with open(out) as f:
            kept = [r for r in json.load(f) if r.get("device") != device_name(device)]
    with open(out, "w") as f:
        json.dump(kept + rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
