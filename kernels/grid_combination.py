"""Triton version of the grid combination (same math as csrc/grid_combination/grid_combination.h)."""
from __future__ import annotations

import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _add_weighted(acc, w, ptr, offs, mask):
    # A zero weight drops its term and leaves its grid point unread (the mask covers no lane).
    v = tl.load(ptr + offs, mask=mask & (w != 0.0), other=0.0).to(tl.float32)
    return tl.where(w != 0.0, acc + w * v, acc)


@triton.jit
def _grid_combination_kernel(
    x_ptr, y0_ptr, y1_ptr, out_ptr, coefs, total, channels, s_x, s_y0, s_y1,
    GRID: tl.constexpr, TWO: tl.constexpr, BLOCK: tl.constexpr,
):
    # Flat over rows x channels, like the CUDA kernel: narrow rows still fill whole blocks
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    # int64 before any product: g * channels passes 2^31 for a row of more than 2^31 values
    # (tl.cast, not .to: an argument equal to 1 is specialised into a constant)
    channels = tl.cast(channels, tl.int64)
    r = e // channels
    c = e - r * channels
    acc = _add_weighted(tl.zeros((BLOCK,), tl.float32), coefs[0], x_ptr, r * s_x + c, mask)
    row = r * s_y0 + c
    for g in tl.static_range(GRID):
        acc = _add_weighted(acc, coefs[1 + g], y0_ptr, row + g * channels, mask)
    if TWO:
        row = r * s_y1 + c
        for g in tl.static_range(GRID):
            acc = _add_weighted(acc, coefs[1 + GRID + g], y1_ptr, row + g * channels, mask)
    tl.store(out_ptr + e, acc.to(out_ptr.dtype.element_ty), mask=mask)


def launch(x, ys, coefs, out):
    """Fill ``out`` (``[rows, C]``, contiguous) from ``x`` (``[rows, C]``) and ``ys`` (one or two
    ``[rows, G * C]``; each a row-strided view whose last dimension is contiguous).

    ``coefs`` is the CPU float32 tensor ``[a, w[0][0..G), w[1][0..G)]``; its values travel as
    kernel arguments (no copy to the device; a captured CUDA graph keeps each step's values).
    """
    rows, channels = x.shape
    total = rows * channels
    grid = (coefs.numel() - 1) // len(ys)
    two = len(ys) == 2
    y1 = ys[1] if two else ys[0]  # stands in for an absent second output; never read (TWO)
    _grid_combination_kernel[(triton.cdiv(total, _BLOCK),)](
        x, ys[0], y1, out, tuple(coefs.tolist()), total, channels, x.stride(0), ys[0].stride(0), y1.stride(0),
        GRID=grid, TWO=two, BLOCK=_BLOCK,
        enable_fp_fusion=False,  # products rounded before the sums, as the CPU and CUDA kernels do
    )
