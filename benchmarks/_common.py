"""Helpers shared by the benchmark scripts (run as ``python benchmarks/bench_<pillar>.py``,
which puts this folder on ``sys.path``)."""
from __future__ import annotations

import platform
import statistics
from typing import Dict, List

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quartiles(samples: List[float]) -> Dict[str, float]:
    """Median and quartiles of timing samples."""
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median": statistics.median(samples), "q1": q[0], "q3": q[2]}
