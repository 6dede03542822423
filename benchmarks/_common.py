"""Helpers shared by the benchmark scripts (run as ``python benchmarks/bench_<pillar>.py``,
which puts this folder on ``sys.path``)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import types
from typing import Dict, List, Optional

import torch

from kdfast.train.run import int_at_least  # noqa: F401  (re-exported: the scripts' argparse type)


def check_device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    """``--device`` as a torch device, cpu or cuda[:N]; anything else, or CUDA on a machine
    without a GPU, is a usage error (exit status 2) before any work."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda (or cuda:N), got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {text}: no CUDA GPU here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


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


def k_diffusion_sampling() -> Optional[types.ModuleType]:
    """k-diffusion's ``sampling`` module, or None when k-diffusion is not installed.

    A full install imports as usual. With only the package's files (``pip install --no-deps
    k-diffusion``: its ``__init__`` imports torchvision, CLIP, wandb and more), ``sampling.py``
    is loaded alone, with the one helper it takes from ``k_diffusion.utils``."""
    try:
        import k_diffusion.sampling as sampling
        return sampling
    except Exception:
        for name in [n for n in sys.modules if n == "k_diffusion" or n.startswith("k_diffusion.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    package, utils = types.ModuleType("k_diffusion"), types.ModuleType("k_diffusion.utils")
    package.__path__ = [folder]
    utils.append_dims = lambda x, target_dims: x[(...,) + (None,) * (target_dims - x.ndim)]
    package.utils = utils
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    try:
        loader = importlib.util.spec_from_file_location("k_diffusion.sampling", os.path.join(folder, "sampling.py"))
        sampling = importlib.util.module_from_spec(loader)
        sys.modules["k_diffusion.sampling"] = sampling
        loader.loader.exec_module(sampling)
    except Exception as exc:  # its own imports (torchsde, torchdiffeq, scipy) missing
        print(f"k-diffusion's sampling module does not load: {exc}", file=sys.stderr)
        return None
    return sampling
