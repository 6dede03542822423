"""kdfast's PiflowScheduler against diffusers' in one run: host time per step and per 4-step loop,
full-latent passes per step, bytes moved against the lower bound, and the candidate ways of applying
the collapsed step (``a * sample + sum_g w_g * grid_g``).

diffusers' step integrates the pi-Flow policy substep by substep (~37 substeps per step at 4 steps,
each several full-latent ops); kdfast's applies the same step as one linear combination whose
weights are computed at ``set_timesteps``. Shapes are Kandinsky-6-like channels-last latents
``[batch, frames, height, width, 16]`` with an ``n_grid``-times wider model output.

    python benchmarks/bench_piflow.py                   # default shapes, fp32 and bf16 model outputs
    python benchmarks/bench_piflow.py --quick           # one shape, fewer repeats
    python benchmarks/bench_piflow.py --threads 1 --out /tmp/piflow.json
    python benchmarks/bench_piflow.py --device cuda --quick    # on a GPU (a sync ends each timed call)

Bytes are modelled, not measured: kdfast's step (one ``kdfast.ops.grid_combination`` kernel) reads
the sample once and each grid slice with a nonzero weight once and writes the result once; the
lower bound reads the sample and the widened output once and writes the result once,
``(n_grid + 2)`` latents. diffusers' passes are the aten
ops of a step whose inputs include a latent-sized tensor (profiler).
"""
from __future__ import annotations

import argparse
import sys
import statistics
import time
from typing import Optional

import torch
from _common import (check_device, device_name, int_at_least, kdfast_backend, merge_rows, peak_memory_bytes,
                     quartiles, quiet_stderr, sync)

from kdfast import ops
from kdfast.ops.solver_step import coefficients, fused_step
from kdfast.schedulers.piflow import PiflowScheduler

SHAPES = [(1, 8, 32, 32, 16), (1, 4, 64, 64, 16), (2, 4, 32, 32, 16)]
STEPS = 4


def timed_side_by_side(calls: dict, device: torch.device) -> dict:
    """Seconds per call for each ``name: (fn, repeats)``, the calls of all of them interleaved
    over one period (each name's calls spread evenly across it), so that a change in the
    machine's load falls on every side alike rather than on whichever ran last."""
    for fn, _ in calls.values():
        fn()
        fn()
    sync(device)
    rounds = max(n for _, n in calls.values())
    times = {name: [] for name in calls}
    for r in range(rounds):
        for name, (fn, n) in calls.items():
            if (r + 1) * n // rounds > r * n // rounds:  # n of the rounds, evenly spaced
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


def median_us(times) -> float:
    return statistics.median(times) * 1e6


def quartiles_us(times):
    q = quartiles(times)  # (inclusive: a few samples' quartiles stay inside their range)
    return q["q1"] * 1e6, q["q3"] * 1e6


def model_output(x: torch.Tensor, n_grid: int, t: float, dtype) -> torch.Tensor:
    """A deterministic widened output: n_grid different functions of x."""
    grid = torch.arange(n_grid, dtype=torch.float32, device=x.device).repeat_interleave(x.shape[-1]) * 0.1
    return (torch.sin(1.3 * x.float().repeat(*([1] * (x.dim() - 1)), n_grid) + grid) * 0.6 + t / 1000).to(dtype)


def diffusers_latent_ops(scheduler, m, t, x) -> int:
    """aten ops in one diffusers step that read a tensor of at least a latent's elements."""
    numel = x.numel()
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                record_shapes=True) as prof:
        scheduler._step_index = 1
        scheduler.step(m, t, x)
    count = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::") or ev.cpu_parent is not None and ev.cpu_parent.name.startswith("aten::"):
            continue
        shapes = [s for s in ev.input_shapes if isinstance(s, list) and s]
        if any(_numel(s) >= numel for s in shapes) and ev.name not in ("aten::view", "aten::reshape", "aten::expand",
                                                                        "aten::movedim", "aten::unsqueeze",
                                                                        "aten::squeeze", "aten::slice", "aten::select",
                                                                        "aten::permute", "aten::as_strided", "aten::to",
                                                                        "aten::_to_copy", "aten::lift_fresh"):
            count += 1
    return count


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def candidates(x: torch.Tensor, m: torch.Tensor, a: float, ws: list) -> dict:
    """The ways of applying one collapsed step (float32 sample and output)."""
    G, C = len(ws), x.shape[-1]
    N = x.numel() // C
    block = torch.zeros(G * C, C)
    for g, w in enumerate(ws):
        block[g * C:(g + 1) * C] = torch.eye(C) * w
    block = block.to(x.device)
    wv = torch.tensor(ws, dtype=torch.float32, device=x.device)
    nonzero = [(g, w) for g, w in enumerate(ws) if w]

    coefs = torch.tensor([a, *ws], dtype=torch.float32)

    def grid_combination():  # kdfast's choice: one kernel, the lower bound's bytes
        return ops.grid_combination(x, m, coefs)

    def add_loop():  # one host-scalar add_ per used grid slice (an fp32 accumulator read and written each time)
        out = torch.mul(x, a)
        slices = m.unflatten(-1, (G, C)).unbind(-2)
        for g, w in nonzero:
            out.add_(slices[g], alpha=w)
        return out

    def addmm_block():  # one GEMM with a block-diagonal [G*C, C] weight matrix: one pass, C x the FLOPs
        return torch.addmm(x.reshape(N, C), m.reshape(N, G * C), block, beta=a).view(x.shape)

    def einsum():
        return torch.einsum("ngc,g->nc", m.reshape(N, G, C), wv).view(x.shape).add_(x, alpha=a)

    def matmul_bcast():
        return torch.matmul(wv.view(1, G), m.reshape(N, G, C)).view(x.shape).add_(x, alpha=a)

    def solver_step_2pass():  # the fused kernel takes sample-shaped inputs: slices are copied first
        sl = [m[..., g * C:(g + 1) * C].contiguous() for g in range(G)]
        first = dict(zip(("model", "h0", "h1", "h2", "aux", "noise"), ws[:6]))
        rest = dict(zip(("model", "h0", "h1", "h2"), ws[6:10]))
        r1 = torch.tensor(coefficients(0.0, 0.0, {"x": a, **first}), dtype=torch.float32)
        out = fused_step(x, sl[0], r1, None, 1.0, sl[1:4], sl[4] if G > 4 else None, sl[5] if G > 5 else None,
                         None, None, False, False, None).sample
        if G > 6:
            r2 = torch.tensor(coefficients(0.0, 0.0, {"x": 1.0, **rest}), dtype=torch.float32)
            out = fused_step(out, sl[6], r2, None, 1.0, sl[7:G], None, None, None, None, False, False, None).sample
        return out

    cands = {"grid_combination": grid_combination, "add_loop": add_loop, "addmm_block": addmm_block, "einsum": einsum,
             "matmul_bcast": matmul_bcast}
    if G <= 10:
        cands["solver_step_2pass"] = solver_step_2pass
    return cands


def run(shapes, n_grid: int, repeats: int, dtypes, device: torch.device, out: Optional[str] = None) -> list:
    """Measure every (shape, dtypes) pair; each row is merged into ``out`` as soon as it is measured
    (a run cut short keeps what it measured)."""
    import diffusers

    rows = []
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        for sample_dtype, output_dtype in dtypes:
            xs = x.to(sample_dtype)
            df, kd = diffusers.PiflowScheduler(n_grid=n_grid), PiflowScheduler(n_grid=n_grid)
            for s in (df, kd):
                s.set_timesteps(STEPS, device=device)
            outputs = [model_output(x, n_grid, float(t), output_dtype) for t in df.timesteps]
            latent = x.numel()

            def step_of(s, i=1):
                def fn():
                    s._step_index = i
                    return s.step(outputs[i], s.timesteps[i], xs).prev_sample
                return fn

            def loop_of(s):
                def fn():
                    s.set_timesteps(STEPS, device=device)
                    y = xs
                    for t, m in zip(s.timesteps, outputs):
                        y = s.step(m, t, y).prev_sample
                    return y
                return fn

            with torch.no_grad():
                ours, theirs = loop_of(kd)().double(), loop_of(df)().double()
                err = (ours - theirs).abs().max().item()
                tolerance = 1e-4 if sample_dtype == output_dtype == torch.float32 else 2e-2
                if not err <= tolerance * max(1.0, theirs.abs().max().item()):  # (a faster wrong loop is no gain)
                    print(f"  WARNING: {tuple(shape)}: kdfast's loop differs from diffusers' by {err:.1e}",
                          file=sys.stderr)
                timing = timed_side_by_side(dict(d_step=(step_of(df), max(3, repeats // 10)),
                                            k_step=(step_of(kd), repeats)), device)
                timing.update(timed_side_by_side(dict(d_loop=(loop_of(df), max(3, repeats // 20)),
                                                      k_loop=(loop_of(kd), max(5, repeats // 4))), device))
                d_step, k_step, d_loop, k_loop = (timing[k] for k in ("d_step", "k_step", "d_loop", "k_loop"))
                d_ops = diffusers_latent_ops(df, outputs[1], df.timesteps[1], xs)
                k_peak, d_peak = (peak_memory_bytes(loop_of(s), device) for s in (kd, df))
            a, *ws = kd._coefs[1].tolist()
            n_nonzero = sum(w != 0 for w in ws)
            out_size = torch.finfo(output_dtype).bits // 8
            in_size = torch.finfo(sample_dtype).bits // 8
            kd_bytes = latent * (in_size + n_nonzero * out_size + in_size)
            lower = latent * (in_size + n_grid * out_size + in_size)
            sample_name = str(sample_dtype).replace("torch.", "")
            output_name = str(output_dtype).replace("torch.", "")
            row = dict(op="piflow_step", backend=kdfast_backend("grid_combination", device), shape=list(shape),
                       n_grid=n_grid, steps=STEPS, anchor=f"diffusers {diffusers.__version__} PiflowScheduler",
                       dtype=f"{sample_name}/{output_name}", sample_dtype=sample_name, output_dtype=output_name,
                       device=device_name(device), threads=torch.get_num_threads(),
                       kdfast_step_us=median_us(k_step), kdfast_step_q=quartiles_us(k_step),
                       diffusers_step_us=median_us(d_step), diffusers_step_q=quartiles_us(d_step),
                       step_speedup=median_us(d_step) / median_us(k_step),
                       kdfast_loop_us=median_us(k_loop), kdfast_loop_q=quartiles_us(k_loop),
                       diffusers_loop_us=median_us(d_loop), diffusers_loop_q=quartiles_us(d_loop),
                       loop_speedup=median_us(d_loop) / median_us(k_loop),
                       peak_memory_bytes=k_peak, anchor_peak_memory_bytes=d_peak,
                       kdfast_launches=1,
                       diffusers_latent_ops=d_ops, kdfast_bytes=kd_bytes, lower_bound_bytes=lower,
                       bytes_ratio=kd_bytes / lower, loop_max_abs_diff=err)
            if sample_dtype == output_dtype == torch.float32:
                with torch.no_grad():
                    timing = timed_side_by_side({name: (fn, repeats) for name, fn in
                                                 candidates(xs, outputs[1], a, ws).items()}, device)
                    row["candidates_us"] = {name: median_us(times) for name, times in timing.items()}
            rows.append(row)
            print_row(row)
            if out:
                merge_rows(out, [row])
    return rows


def print_row(r) -> None:
    print(f"{str(tuple(r['shape'])):22s} {r['sample_dtype']:>8s}/{r['output_dtype']:<8s} "
          f"step kdfast {r['kdfast_step_us']:8.0f} us  diffusers {r['diffusers_step_us']:10.0f} us  "
          f"x{r['step_speedup']:6.0f} | loop {r['kdfast_loop_us']:8.0f} / {r['diffusers_loop_us']:10.0f} us "
          f"x{r['loop_speedup']:5.0f} | launches {r['kdfast_launches']} vs {r['diffusers_latent_ops']} latent ops | "
          f"bytes {r['bytes_ratio']:.2f}x bound | max|diff| {r['loop_max_abs_diff']:.1e}")
    if "candidates_us" in r:
        print("    apply candidates: " + ", ".join(f"{k} {v:.0f} us" for k, v in r["candidates_us"].items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one shape, fewer repeats")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--n-grid", type=int_at_least(2), default=10)
    p.add_argument("--repeats", type=int_at_least(1), default=None)
    p.add_argument("--out", default=None,
                   help="JSON file for the rows; rows of the same device, op, shape and dtype are replaced, all others "
                        "kept")
    args = p.parse_args(argv)
    device = check_device(p, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    repeats = args.repeats or (20 if args.quick else 60)
    dtypes = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]
    if args.quick:
        dtypes = dtypes[:2]
    print(f"PiflowScheduler step, {STEPS}-step schedule, n_grid={args.n_grid}, torch {torch.__version__}, "
          f"on {device_name(device)}")
    rows = run(shapes, args.n_grid, repeats, dtypes, device, args.out)
    if args.out:
        print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
