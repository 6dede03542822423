"""Tensor -> (address, batch stride, dtype code) conversion shared by every op binding."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

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


def addresses(tensors, inner: int) -> Tuple[list, list, list]:
    """(addresses, batch strides, dtype codes) of sample-major tensors of ``inner`` elements
    per sample (validated to share one shape); None gives zeros."""
    n = len(tensors)
    ptrs, strides, codes = [0] * n, [0] * n, [0] * n
    for i, t in enumerate(tensors):
        if t is not None:
            ptrs[i] = t.data_ptr()
            strides[i] = inner if t.is_contiguous() else t.stride(0)
            codes[i] = DTYPE_CODES[t.dtype]
    return ptrs, strides, codes
