"""Tensor -> (address, batch stride, dtype code) conversion shared by every op binding."""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

_CURRENT = contextlib.nullcontext()


def on_device(t: torch.Tensor):
    """A context making ``t``'s CUDA device the current one for a launch: kernels (CUDA and
    Triton) run on the current device and stream, and a tensor on cuda:1 while cuda:0 is
    current would otherwise be read from the wrong GPU. Free when it already is current."""
    index = t.device.index
    if index is None or index == torch.cuda.current_device():
        return _CURRENT
    return torch.cuda.device(index)


# Same table as kdfast::DType in csrc/common/kd_common.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def sample_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when each sample (index of dim 0) is one contiguous block, else a copy.

    Views like ``out[:B]`` / ``out[B:]`` of a doubled CFG batch stay copy-free.
    """
    if t.is_contiguous():
        return t
    if t.dim() >= 1 and t.shape[0] > 0 and t[0].is_contiguous():
        return t
    return t.contiguous()


def describe(name: Optional[str], t: torch.Tensor) -> str:
    return f"{name}: {tuple(t.shape)} {t.dtype} on {t.device}"


def addresses(tensors, inner: int, contiguous: bool = False) -> Tuple[list, list, list]:
    """(addresses, batch strides, dtype codes) of sample-major tensors of ``inner`` elements
    per sample (validated to share one shape); None gives zeros. ``contiguous=True`` when the
    caller knows every tensor is (outputs it allocated): saves a property call per tensor."""
    ptrs, strides, codes = [], [], []
    for t in tensors:
        if t is None:
            ptrs.append(0)
            strides.append(0)
            codes.append(0)
        else:
            ptrs.append(t.data_ptr())
            strides.append(inner if contiguous or t.is_contiguous() else t.stride(0))
            codes.append(DTYPE_CODES[t.dtype])
    return ptrs, strides, codes
