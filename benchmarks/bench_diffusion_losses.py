"""Fused diffusion-distillation losses against the plain torch expressions they replace.

For each loss, latent shape and dtype: time of forward + backward (median and quartiles, the
fused op and the torch expression interleaved in one run) and peak memory allocated during
it (``_common.peak_memory_bytes``: CUDA, the caching allocator's peak; CPU, torch's allocation
records replayed in order).

    python benchmarks/bench_diffusion_losses.py           # both shapes, fp32 and bf16
    python benchmarks/bench_diffusion_losses.py --quick   # the small shape, fp32 only
Writes JSON rows to benchmarks/results/bench_diffusion_losses.json (rows of the same device,
loss, shape and dtype are replaced, all others kept).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Callable, List, Optional

import torch
from _common import (check_devices, device_name, int_at_least, kdfast_backend, merge_rows, peak_memory_bytes, quartiles,
                     recorded_results, sync)

from kdfast.losses import diffusion as dl
from kdfast.reference import diffusion_losses as ref

SHAPES = {"8x4x64x64": (8, 4, 64, 64), "8x16x128x128": (8, 16, 128, 128)}




# --------------------------------------------------------------------------- the cases


def cases(shape, dtype, device):
    """(name, fused loss fn, naive torch loss fn, anchor description, inputs, differentiable input)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn():
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    batch = shape[0]
    dims = tuple(range(1, len(shape)))
    w = torch.linspace(0.5, 2.0, batch, device=device)
    x, y, real, fake = randn(), randn(), randn(), randn()
    c_ict = 0.00054 * math.sqrt(math.prod(shape[1:]))
    abar_t = torch.linspace(0.2, 0.8, batch, dtype=torch.float64)
    abar_s = (abar_t + 0.1).clamp(max=1.0)
    sched = [v.to(device) for v in (abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt())]

    def ict_naive(x):
        d = x.float() - y.float()
        return (w * (torch.sqrt((d * d).sum(dims) + c_ict**2) - c_ict)).mean()

    def lcm_naive(x):
        return (w * (torch.sqrt((x.float() - y.float()) ** 2 + 0.001**2) - 0.001).mean(dims)).mean()

    def dmd_naive(x):
        with torch.no_grad():
            p_real = x - real
            p_fake = x - fake
            grad = (p_real - p_fake) / torch.abs(p_real).mean(dim=dims, keepdim=True)
            grad = torch.nan_to_num(grad)
        return 0.5 * torch.nn.functional.mse_loss(x.float(), (x - grad).detach().float(), reduction="mean")

    col = (-1,) + (1,) * (len(shape) - 1)

    def pd_naive(pred):
        with torch.no_grad():
            ca, cb = ref.combination_coefficients("pd_target", "v_prediction", *sched)
            target = ca.float().view(col) * real.float() + cb.float().view(col) * fake.float()
        return (w * ((pred.float() - target) ** 2).mean(dims)).mean()

    return [
        ("pseudo_huber (iCT)", lambda x: dl.pseudo_huber_loss(x, y, c=c_ict, weights=w), ict_naive,
         "torch: (w * (sqrt(((x-y)^2).sum(dims) + c^2) - c)).mean()", x),
        ("pseudo_huber elementwise (LCM)", lambda x: dl.pseudo_huber_loss(x, y, c=0.001, weights=w, elementwise=True),
         lcm_naive, "torch: (w * (sqrt((x-y)^2 + c^2) - c).mean(dims)).mean()  (diffusers LCM script + weights)", x),
        ("dmd", lambda x: dl.dmd_loss(x, real, fake), dmd_naive, "torch: DMD2 compute_distribution_matching_loss", x),
        ("progressive_distillation (v)",
         lambda p: dl.progressive_distillation_loss(p, real, fake, *sched, prediction_type="v_prediction", weights=w),
         pd_naive, "torch: target = ca*x_s + cb*x_t; (w * ((pred-target)^2).mean(dims)).mean()", x),
    ]


def fwd_bwd(fn: Callable, x: torch.Tensor):
    leaf = x.detach().requires_grad_(True)
    loss = fn(leaf)
    loss.backward()
    return leaf.grad


def time_once(fn, x, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fwd_bwd(fn, x)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def wait_until_quiet(limit: float, max_wait: float) -> float:
    """Wait (up to max_wait s) for the 1-minute load average to drop below ``limit``."""
    t0 = time.time()
    load = os.getloadavg()[0]
    while load > limit and time.time() - t0 < max_wait:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def run(device: torch.device, shapes, dtypes, repeats: int, quiet_load: float, out: Optional[str] = None
        ) -> List[dict]:
    """Measure every loss, shape and dtype on ``device``; each row is merged into ``out`` (when
    given) as soon as it is measured, so a run cut short keeps what it measured."""
    rows = []
    for shape_name, shape in shapes.items():
        for dtype in dtypes:
            for name, fused, naive, anchor, x in cases(shape, dtype, device):
                # Same-run check that the two compute the same thing.
                torch.testing.assert_close(fwd_bwd(fused, x).float(), fwd_bwd(naive, x).float(), rtol=2e-2, atol=1e-6)
                for _ in range(2):
                    time_once(fused, x, device), time_once(naive, x, device)  # warm-up
                load = wait_until_quiet(quiet_load, 60.0)
                t_fused, t_naive = [], []
                for _ in range(repeats):  # interleaved: both see the same machine state
                    t_fused.append(time_once(fused, x, device))
                    t_naive.append(time_once(naive, x, device))
                mem_fused = peak_memory_bytes(lambda: fwd_bwd(fused, x), device)
                mem_naive = peak_memory_bytes(lambda: fwd_bwd(naive, x), device)
                qf, qn = quartiles(t_fused), quartiles(t_naive)
                row = {
                    "op": name, "backend": kdfast_backend("diffusion_loss", device), "shape": list(shape),
                    "dtype": str(dtype).replace("torch.", ""), "device": device_name(device),
                    "what": "forward + backward (ms)",
                    "median": qf["median"], "q1": qf["q1"], "q3": qf["q3"], "peak_memory_bytes": mem_fused,
                    "anchor": anchor, "anchor_median": qn["median"], "anchor_q1": qn["q1"], "anchor_q3": qn["q3"],
                    "anchor_peak_memory_bytes": mem_naive,
                    "ratio": qn["median"] / qf["median"],
                    # kdfast's peak over torch's, as bench_kdloss.py reports it (below 1: kdfast holds less)
                    "memory_ratio_vs_anchor": (mem_fused / mem_naive) if mem_naive else None,
                    "repeats": repeats, "load_average_1min": load,
                }
                rows.append(row)
                if out:
                    merge_rows(out, [row])
                mb = 1 / 2**20
                print(f"{name:32s} {shape_name:13s} {row['dtype']:9s} fused {qf['median']:8.3f} ms "
                      f"[{qf['q1']:.3f}, {qf['q3']:.3f}]  torch {qn['median']:8.3f} ms  x{row['ratio']:5.2f}  "
                      f"peak {mem_fused * mb:7.1f} MiB vs {mem_naive * mb:7.1f} MiB  (load {load:.2f})", flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape, fp32, fewer repeats")
    parser.add_argument("--repeats", type=int_at_least(1), default=None)
    parser.add_argument("--quiet-load", type=float, default=1.5, help="wait for the 1-min load to drop below this")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="all",
                        help="cpu, cuda or cuda:N, or all (default: the CPU, then the GPU when there is one)")
    parser.add_argument("--out", default=None,
                        help="JSON file for the rows (default: benchmarks/results/bench_diffusion_losses.json, "
                             "written by full runs only; rows of the same device, loss, shape and dtype are "
                             "replaced, all others kept)")
    args = parser.parse_args(argv)
    devices = check_devices(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k == "8x4x64x64"}
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    repeats = args.repeats or (7 if args.quick else 15)
    out = args.out
    if out is None and not args.quick:  # a smoke run must not replace the recorded figures
        out = recorded_results(__file__)
    rows = []
    for device in devices:
        print(f"== {device_name(device)}")
        rows += run(device, shapes, dtypes, repeats if device.type == "cpu" else 4 * repeats, args.quiet_load, out)
    if out:
        print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
