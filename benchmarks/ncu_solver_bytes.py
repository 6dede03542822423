"""Bytes the fused solver step moves per step on a GPU, measured with Nsight Compute, against
the lower bound (each input latent read once, each output written once); and the same for
pi-Flow's step (one ``grid_combination`` kernel: the sample and each used grid point read once).

Runs itself under ``ncu`` and reads, for every launch of the step kernel, the L2 traffic the
kernel asked for (``lts__t_sectors_srcunit_tex_op_read/write``, 32-byte sectors: what left the
SM, whatever L2 then did with it), the figure held against the lower bound, and the DRAM bytes
(with ncu's default cache flush before each launch). DRAM writes are reported apart and not
as traffic: a latent of this size fits the write-back L2, which still holds most of the
kernel's writes when it ends. The last launch of each solver is a steady-state step (full
history).

    python benchmarks/ncu_solver_bytes.py            # needs ncu and a CUDA GPU
Writes JSON rows to benchmarks/results/ncu_solver_bytes.json.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import math
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

# The solvers profiled, by bench_solvers' names: their classes, configs and byte counts are its own
SOLVERS = ("ddim", "euler_a", "dpmpp_2m", "sde_dpmpp_2m", "unipc_bh2", "deis_3", "flow_euler")
SHAPE = (2, 4, 128, 128)
STEPS = 6
# pi-Flow: a Kandinsky-6-like channels-last latent, a model output n_grid times wider, a 4-step schedule
PIFLOW_SHAPE = (1, 8, 32, 32, 16)
PIFLOW_GRID = 10
PIFLOW_STEPS = 4
PIFLOW_PROFILED = 1  # the step reported (every grid point has a weight there)
METRICS = ("lts__t_sectors_srcunit_tex_op_read.sum", "lts__t_sectors_srcunit_tex_op_write.sum",
           "dram__bytes_read.sum", "dram__bytes_write.sum")


def run_steps() -> None:
    """The profiled process: STEPS steps of each solver, in SOLVERS order."""
    import torch
    from bench_solvers import SOLVERS as BENCHED, step_kwargs

    from kdfast import schedulers as kd

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=g).cuda()
    outputs = [torch.randn(SHAPE, generator=g).cuda() * 0.5 for _ in range(STEPS)]
    gen = torch.Generator("cuda").manual_seed(0)
    benched = {name: (cls, config) for name, cls, _, config in BENCHED}
    for name in SOLVERS:
        cls, config = benched[name]
        sched = getattr(kd, cls)(**config)
        sched.set_timesteps(20, device="cuda")
        x = x0
        kwargs = step_kwargs(sched, gen)
        for t, out in zip(sched.timesteps[:STEPS], outputs):
            x = sched.step(out, t, x, **kwargs).prev_sample
    piflow = kd.PiflowScheduler(n_grid=PIFLOW_GRID)
    piflow.set_timesteps(PIFLOW_STEPS, device="cuda")
    x = torch.randn(PIFLOW_SHAPE, generator=g).cuda()
    wide = (*PIFLOW_SHAPE[:-1], PIFLOW_GRID * PIFLOW_SHAPE[-1])
    for t in piflow.timesteps:
        x = piflow.step(torch.randn(wide, generator=g).cuda(), t, x).prev_sample
    torch.cuda.synchronize()


def _number(text: str) -> float:
    return float(text.replace(",", "")) if text.strip() else 0.0


def parse_ncu_csv(text: str) -> List[Dict[str, float]]:
    """Per launch of the profiled kernels: the METRICS (``--page raw --csv --print-units base``)."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = []
    for rec in csv.DictReader(io.StringIO("\n".join(lines))):
        if not rec.get("ID", "").strip().isdigit():
            continue  # the units row
        rows.append({"kernel": rec.get("Kernel Name", ""), **{m: _number(rec.get(m, "")) for m in METRICS}})
    return rows


def _row(name: str, shape, launch: Dict[str, float], bound: float) -> Dict:
    l2 = 32 * (launch["lts__t_sectors_srcunit_tex_op_read.sum"] + launch["lts__t_sectors_srcunit_tex_op_write.sum"])
    return {"op": f"scheduler_step:{name}", "shape": list(shape), "dtype": "float32", "kernel": launch["kernel"][:80],
            "l2_bytes": l2, "lower_bound_bytes": bound, "l2_ratio": l2 / bound,
            "dram_read_bytes": launch["dram__bytes_read.sum"],
            "dram_write_bytes_during_kernel": launch["dram__bytes_write.sum"]}


def piflow_lower_bound(itemsize: int) -> float:
    """Bytes of the profiled pi-Flow step's lower bound: the sample and each grid point with a
    nonzero weight read once, the result written once."""
    from kdfast.schedulers import PiflowScheduler

    scheduler = PiflowScheduler(n_grid=PIFLOW_GRID)
    scheduler.set_timesteps(PIFLOW_STEPS)
    used = int((scheduler._coefs[PIFLOW_PROFILED][1:] != 0).sum())
    return math.prod(PIFLOW_SHAPE) * itemsize * (2 + used)


def summarise(launches: List[Dict[str, float]], itemsize: int, ncu_output: str = "") -> List[Dict]:
    from bench_solvers import kdfast_bytes_per_step  # the byte accounting of the main benchmark

    steps = [launch for launch in launches if "solver_step" in launch["kernel"]]
    grid = [launch for launch in launches if "grid_combination" in launch["kernel"]]
    if len(steps) != STEPS * len(SOLVERS) or len(grid) != PIFLOW_STEPS:
        raise SystemExit(f"expected {STEPS * len(SOLVERS)} solver-step and {PIFLOW_STEPS} grid-combination kernel "
                         f"launches, ncu reported {len(steps)} and {len(grid)}; its output ended:\n"
                         f"{ncu_output[-3000:]}")
    numel = math.prod(SHAPE)
    rows = []
    for k, name in enumerate(SOLVERS):
        bound = kdfast_bytes_per_step(name, numel, itemsize)["step"]  # the fused kernel's own lower bound
        rows.append(_row(name, SHAPE, steps[(k + 1) * STEPS - 1], bound))
    rows.append(_row("piflow", PIFLOW_SHAPE, grid[PIFLOW_PROFILED], piflow_lower_bound(itemsize)))
    return rows


def find_ncu(install_root: str = "/opt/nvidia/nsight-compute", toolkit_bin: str = "/usr/local/cuda/bin"
             ) -> Optional[str]:
    """Nsight Compute's ``ncu``: on PATH, else the newest under ``install_root``, else the CUDA
    toolkit's (GPU images often leave both off PATH)."""
    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(glob.glob(os.path.join(install_root, "*", "ncu")), key=_version_key, reverse=True)
    candidates.append(os.path.join(toolkit_bin, "ncu"))
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def ncu_command(ncu: str) -> List[str]:
    """The ncu command that profiles this script's ``--child`` run.

    ``--clock-control none`` measures the GPU at the clocks it runs at: ncu's default locks them
    to base clocks, which changes a shared card's settings (and bytes do not depend on clocks)."""
    return [ncu, "--clock-control", "none", "--csv", "--page", "raw", "--print-units", "base",
            "--metrics", ",".join(METRICS), "-k", "regex:solver_step_kernel|grid_combination_kernel", sys.executable,
            os.path.abspath(__file__), "--child"]


def _version_key(path: str) -> Tuple[int, ...]:
    version = os.path.basename(os.path.dirname(path))
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "ncu_solver_bytes.json"))
    args = parser.parse_args()
    if args.child:
        return run_steps()
    ncu = find_ncu()
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) is neither on PATH nor in /opt/nvidia/nsight-compute or "
                         "/usr/local/cuda/bin")
    done = subprocess.run(ncu_command(ncu), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ncu failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    import torch

    rows = summarise(parse_ncu_csv(done.stdout), itemsize=4, ncu_output=done.stdout + done.stderr)
    device = torch.cuda.get_device_name()
    print(f"fused solver step, {'x'.join(map(str, SHAPE))} fp32 (pi-Flow: {'x'.join(map(str, PIFLOW_SHAPE))}), "
          f"on {device}: bytes per steady-state step")
    print(f"{'solver':<14}{'lower bound':>14}{'L2 traffic':>14}{'x LB':>7}{'DRAM reads':>14}{'DRAM writes*':>14}")
    for r in rows:
        r["device"] = device
        print(f"{r['op'].split(':')[1]:<14}{r['lower_bound_bytes']:>14,.0f}{r['l2_bytes']:>14,.0f}{r['l2_ratio']:>7.2f}"
              f"{r['dram_read_bytes']:>14,.0f}{r['dram_write_bytes_during_kernel']:>14,.0f}")
    print("* written back to DRAM while the kernel ran; the write-back L2 holds the rest")
    from _common import merge_rows

    merge_rows(args.out, rows)  # (other devices' rows are kept)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
