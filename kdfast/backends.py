"""Backend registry: which implementation of an op runs, and why the others cannot.

Each op has up to four implementations: ``reference`` (pure torch, the specification),
``cpu`` (C++), ``cuda`` (CUDA C++) and ``triton``. For a given device the registry picks the
first usable one in order of speed; ``KDFAST_BACKEND=<name>`` forces one and fails loudly,
with the reasons, when it cannot serve.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from . import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Fastest first. Triton serves CPU tensors only through its interpreter, which is for
# testing, so it is never chosen automatically on the CPU.
_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


# KDFAST_BACKEND is read at import and by refresh(): an environment lookup per call would
# cost as much as a quarter of a small fused step.
_FORCED: Optional[str] = os.environ.get("KDFAST_BACKEND") or None


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on these inputs; the message says why."""


def refresh() -> None:
    """Re-read ``KDFAST_BACKEND`` and forget cached choices (after changing the environment,
    e.g. KDFAST_BACKEND or TRITON_INTERPRET, or installing a backend)."""
    global _FORCED
    from . import _ext

    _FORCED = os.environ.get("KDFAST_BACKEND") or None
    _ext.forget()
    for entry in OPS.values():
        entry._cache.clear()


def _cuda_device_reason() -> Optional[str]:
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def cuda_runtime_reason(device_error: str) -> Optional[str]:
    """Why kdfast's CUDA kernels cannot run although torch sees a GPU, from the error the
    extension's own (statically linked) CUDA runtime gives when it counts the devices (""
    when it can use them): typically a driver older than that runtime, which torch, built
    against an older CUDA, does not mind."""
    if not device_error:
        return None
    return (f"kdfast._C_cuda's CUDA runtime cannot use this machine's GPUs: {device_error}; update the "
            f"NVIDIA driver or build kdfast with the CUDA toolkit of torch's CUDA version "
            f"(the triton or reference backend serves meanwhile)")


def _lowest_capability() -> Tuple[int, int]:
    """The lowest compute capability among the visible GPUs: a backend is chosen per device
    type, so it must serve tensors on any of them."""
    import torch

    return min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))


def _arch_runs(entry: str, capability: Tuple[int, int]) -> Optional[bool]:
    """Whether code built for one entry of CMake's CUDA_ARCHITECTURES runs on a GPU of compute
    ``capability``; None for an entry that names no arch (``native``, ``all``, ``all-major``).
    ``NN``: machine code for NN (runs on NN's major at NN's minor and up) plus PTX (the driver
    compiles it for any GPU at or above NN); ``-real``: the machine code alone; ``-virtual``:
    the PTX alone; ``NNa``: NN exactly; ``NNf``: NN's family (its major, minor at or above)."""
    match = re.fullmatch(r"(\d+)([af]?)(?:-(real|virtual))?", entry)
    if not match:
        return None
    arch = divmod(int(match[1]), 10)  # "90" -> (9, 0), "100" -> (10, 0), "89" -> (8, 9)
    if match[2] == "a":
        return capability == arch
    if match[2] == "f" or match[3] == "real":
        return capability[0] == arch[0] and capability[1] >= arch[1]
    return capability >= arch  # (the PTX)


def cuda_arch_reason(archs: str, capability: Tuple[int, int]) -> Optional[str]:
    """Why kernels built for ``archs`` (CMake's list, e.g. ``"80,89,90"``: machine code plus
    PTX for each; ``90a``, ``100f``, ``-real`` and ``-virtual`` entries too) cannot run on a GPU
    of compute ``capability``, or None (also when an entry names no arch, as ``native`` does:
    nothing here can tell)."""
    runs = [_arch_runs(a.strip(), tuple(capability)) for a in archs.replace(";", ",").split(",") if a.strip()]
    if not runs or None in runs or any(runs):
        return None
    gpu = capability[0] * 10 + capability[1]
    return (f"kdfast._C_cuda was built for {archs}, none of which runs on a GPU here (sm_{gpu}): rebuild with "
            f"KDFAST_CUDA_ARCHS={gpu} (the triton or reference backend serves meanwhile)")


def check_known(backend: Optional[str]) -> None:
    """An unknown backend name (``backend``, else ``KDFAST_BACKEND``) as the error, before any
    reason specific to the inputs (float64 tensors, say) is given."""
    forced = backend or _FORCED
    if forced and forced not in BACKENDS:
        raise BackendUnavailableError(backend_reason(forced, "cpu"))


def backend_reason(backend: str, device_type: str) -> Optional[str]:
    """Why ``backend`` cannot run on ``device_type`` tensors here, or None if it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}"
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device_type} tensors"
        return _ext.cpu()[1]
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device_type} tensors"
        module, reason = _ext.cuda()
        if module is None:
            return reason
        return (_cuda_device_reason() or cuda_runtime_reason(module.device_error())
                or cuda_arch_reason(module.build_info().get("archs", ""), _lowest_capability()))
    # triton
    _, reason = _ext.triton()
    if reason:
        return reason
    if device_type == "cpu" and not _ext.triton_interpreting():
        return ("triton runs CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before "
                "the process imports triton)")
    if device_type == "cpu" and _ext.triton_library_interpreted() is False:
        return ("triton was imported before TRITON_INTERPRET=1 was set, and its own functions (tl.max ...) "
                "keep the compiled mode they were defined in: start the process with TRITON_INTERPRET=1")
    if device_type == "cpu" and not _ext.triton_kernels_interpreted():
        return ("kdfast's Triton kernels were loaded before TRITON_INTERPRET=1 was set: call "
                "kdfast.backends.refresh() to load them under the interpreter")
    if device_type == "cuda":
        return _cuda_device_reason()
    if device_type != "cpu":
        return f"triton backend does not handle {device_type} tensors"
    return None


@dataclass(frozen=True)
class Implementation:
    backend: str
    run: Callable


class Op:
    """The implementations of one op, keyed by backend name."""

    def __init__(self, name: str):
        self.name = name
        self._impls: Dict[str, Callable] = {}
        self._needs: Dict[str, Callable[[], Optional[str]]] = {}
        self._cache: Dict[Tuple[str, Optional[str]], Implementation] = {}

    def register(self, backend: str, needs: Optional[Callable[[], Optional[str]]] = None
                 ) -> Callable[[Callable], Callable]:
        """Register ``backend``'s implementation; ``needs``, when given, says why something else
        it uses beyond its backend cannot be used here (None when it can)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")

        def deco(fn: Callable) -> Callable:
            self._impls[backend] = fn
            if needs is not None:
                self._needs[backend] = needs
            self._cache.clear()
            return fn

        return deco

    @property
    def backends(self) -> Tuple[str, ...]:
        return tuple(b for b in BACKENDS if b in self._impls)

    def reason(self, backend: str, device_type: str) -> Optional[str]:
        if backend in BACKENDS and backend not in self._impls:
            return f"kdfast.{self.name} has no {backend} implementation"
        reason = backend_reason(backend, device_type)
        if reason is None and backend in self._needs:
            reason = self._needs[backend]()
        return reason

    def select(self, device_type: str, backend: Optional[str] = None) -> Implementation:
        """The implementation to run for tensors on ``device_type``.

        ``backend`` (or else ``KDFAST_BACKEND``) forces a choice; otherwise the fastest usable.
        """
        forced = backend or _FORCED
        key = (device_type, forced)
        impl = self._cache.get(key)
        if impl is None:
            impl = self._select_uncached(device_type, forced)
            self._cache[key] = impl
        return impl

    def _select_uncached(self, device_type: str, forced: Optional[str]) -> Implementation:
        if forced:
            reason = self.reason(forced, device_type)
            if reason:
                usable = [b for b in self.backends if self.reason(b, device_type) is None]
                raise BackendUnavailableError(
                    f"backend {forced!r} cannot run kdfast.{self.name} on {device_type} tensors: "
                    f"{reason}. Usable here: {', '.join(usable) or 'none'}"
                )
            return Implementation(forced, self._impls[forced])
        reasons = []
        for name in _PREFERENCE.get(device_type, ("reference",)):
            reason = self.reason(name, device_type)
            if reason is None:
                return Implementation(name, self._impls[name])
            reasons.append(f"{name}: {reason}")
        raise BackendUnavailableError(
            f"no backend can run kdfast.{self.name} on {device_type} tensors ({'; '.join(reasons)})"
        )

    def report(self, device_type: str) -> List[Tuple[str, Optional[str]]]:
        """(backend, reason or None) for every backend, for ``kdfast info``."""
        return [(b, self.reason(b, device_type)) for b in BACKENDS]


OPS: Dict[str, Op] = {}


def op(name: str) -> Op:
    """The registry entry of op ``name`` (created on first use)."""
    if name not in OPS:
        OPS[name] = Op(name)
    return OPS[name]
