"""Helpers shared by the benchmark scripts (run as ``python benchmarks/bench_<pillar>.py``,
which puts this folder on ``sys.path``)."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import types
from typing import Callable, Dict, List, Optional

import torch

from kdfast.train import run as _run

int_at_least = _run.int_at_least  # the scripts' argparse type for counts (one definition, in kdfast)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def recorded_results(script: str) -> str:
    """The recorded-results file of benchmark script ``script`` (its ``__file__``):
    ``benchmarks/results/<script name>.json``."""
    return os.path.join(RESULTS_DIR, os.path.splitext(os.path.basename(script))[0] + ".json")


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


def check_devices(parser: argparse.ArgumentParser, text: str) -> List[torch.device]:
    """``--device`` as a list: ``all`` is the CPU, then the GPU when there is one; anything
    else is :func:`check_device`'s one device (checked before any work)."""
    if text == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [check_device(parser, text)]


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
    threads = torch.get_num_threads()
    return f"CPU {model}, {threads} thread{'' if threads == 1 else 's'}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quartiles(samples: List[float]) -> Dict[str, float]:
    """Median and quartiles of timing samples (inclusive method: the quartiles of a few
    samples stay inside their range, where the exclusive one extrapolates beyond it)."""
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
    return {"median": statistics.median(samples), "q1": q[0], "q3": q[2]}


def kdfast_backend(op_name: str, device: torch.device) -> str:
    """The backend kdfast's registry runs op ``op_name`` with on ``device`` (cpu, cuda, triton
    or reference), for the ``backend`` field of kdfast's rows."""
    from kdfast import backends

    importlib.import_module("kdfast.ops")  # registers every op's implementations
    return backends.op(op_name).select(device.type).backend


def peak_memory_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated on ``device`` while ``run()`` runs, above what was allocated before.

    CUDA: the caching allocator's peak, reset first. CPU: every allocation and free of torch's
    CPU allocator during the call, from the profiler's memory records, replayed in time order;
    the peak of the bytes still held among those allocated during the call (tensors that
    existed before do not count, nor do their frees). Exact at allocation granularity: a
    per-op timeline (each op's net allocation added at its start) misses peaks inside ops.
    Memory allocated outside torch's allocator (a library's private scratch) is not seen;
    kdfast's CPU kernels allocate none.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return _replay_allocations(_allocation_events(prof.profiler.kineto_results.experimental_event_tree(), _EventType))


def _allocation_events(roots, event_type) -> List[tuple]:
    """(time ns, address, bytes; negative for a free) of the CPU allocator's records under the
    profiler's event tree (allocations inside ops are their children; those outside, roots)."""
    found, stack = [], list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == event_type.Allocation and node.typed[1].device.type == "cpu":
            found.append((node.start_time_ns, node.typed[1].ptr, node.typed[1].alloc_size))
    return found


def _replay_allocations(records: List[tuple]) -> int:
    """Peak of the bytes held by allocations made within ``records`` ((time, address, bytes),
    frees negative), replayed in time order. Frees of earlier allocations are ignored."""
    live: Dict[int, int] = {}
    held = peak = 0
    for _, ptr, size in sorted(records, key=lambda r: (r[0], r[2] > 0)):  # a free before a reuse at the same time
        if size > 0:
            live[ptr] = size
            held += size
            peak = max(peak, held)
        elif ptr in live:
            held -= live.pop(ptr)
    return peak


@contextlib.contextmanager
def quiet_stderr():
    """Silence fd 2 inside a ``with``: the profiler library logs start/stop lines there."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def row_key(row: dict) -> tuple:
    """What identifies a result row: one measurement of one op, shape and dtype on one device
    (and, for pi-Flow's steps, grid size: its sample's shape does not show it)."""
    return (row.get("device"), row.get("op"), json.dumps(row.get("shape"), sort_keys=True), row.get("dtype"),
            row.get("n_grid"))


def read_rows(path: str) -> List[dict]:
    """The rows of a result file (none where it does not exist); ValueError for a file that is
    not a JSON list of rows."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = json.load(f)  # (a JSONDecodeError is a ValueError)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} is not a JSON list of result rows")
    return rows


def merge_rows(path: str, rows: List[dict]) -> List[dict]:
    """Write ``rows`` to the JSON file ``path``, replacing the rows recorded there with the same
    key (see :func:`row_key`) and keeping all others (other devices, dtypes, shapes, and
    sections this run did not measure). Returns what was written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    old = read_rows(path)
    measured = {row_key(r) for r in rows}
    merged = [r for r in old if row_key(r) not in measured] + rows
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:  # then renamed: a run killed while writing leaves the old file whole
        json.dump(merged, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return merged


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
