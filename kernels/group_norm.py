"""Triton version of the fused group norm + activation (same math as csrc/group_norm/group_norm.h).

One program per (sample, group), three sweeps over the group (sum of deviations from its
first element, squared deviation from the mean, output) in blocks of ``_BLOCK`` elements,
float32 partial sums per lane; the mean and the per-channel centers (mean - shift) in float64,
as group_norm.h forms them. When too
few (sample, group) pairs would fill the GPU, each group is cut into ``splits`` chunks
(group_norm.h's ``gpu_splits``): one kernel writes each chunk's moments about the group's
pivot (its first element), a second gathers them and normalises the chunk.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024
_MAX_SPLITS = 64  # group_norm.h's kGpuMaxSplits


@triton.jit
def _element(i, c0, cpg, channels, spatial, CHANNELS_LAST: tl.constexpr):
    """Element i of a group -> (its channel, its offset in the sample)."""
    if CHANNELS_LAST:  # [spatial, channels]: a pixel's cpg channels of the group, pixel after pixel
        c = c0 + i % cpg
        return c, (i // cpg) * channels + c
    c = c0 + i // spatial  # [channels, spatial]: the group is one contiguous range
    return c, c0 * spatial + i


@triton.jit
def _load(x_ptr, shift_ptr, b, x_stride, s_batch, s_channel, i, n, c0, cpg, channels, spatial,
          CHANNELS_LAST: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Elements i (< n) of a group and their channels' shifts (0 without one), both float32:
    x + shift is only ever formed in float64 (a shift far larger than the spread of x, which
    float32 would round to it, keeps x's accuracy)."""
    mask = i < n
    c, off = _element(i, c0, cpg, channels, spatial, CHANNELS_LAST)
    x = tl.load(x_ptr + b * x_stride + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + b * s_batch + c * s_channel, mask=mask, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros_like(x)
    return x, shift, c, off, mask


@triton.jit
def _center(mean, shift, HAS_SHIFT: tl.constexpr):
    """group_norm.h's per-channel center mean - shift (float64 mean), in float32."""
    if HAS_SHIFT:
        return (mean - shift.to(tl.float64)).to(tl.float32)
    return mean.to(tl.float32) + tl.zeros_like(shift)


@triton.jit
def _center_pair(mean, shift, HAS_SHIFT: tl.constexpr):
    """The per-channel center as float32 hi + lo, for the variance sweep (group_norm_cpu.cpp's
    center_pair: with a shift, a float32 center's rounding no longer cancels over the group)."""
    exact = mean - shift.to(tl.float64) if HAS_SHIFT else mean + tl.zeros_like(shift).to(tl.float64)
    hi = exact.to(tl.float32)  # (_center's value)
    return hi, (exact - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def _write(x_ptr, out_ptr, shift_ptr, w_ptr, bias_ptr, b, x_stride, out_stride, s_batch, s_channel, i, n, c0,
           cpg, channels, spatial, mean, rstd, CHANNELS_LAST: tl.constexpr, HAS_SHIFT: tl.constexpr,
           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """Normalise, activate and store elements i (< n) of a group (``mean`` in float64)."""
    x, shift, c, off, mask = _load(x_ptr, shift_ptr, b, x_stride, s_batch, s_channel, i, n, c0, cpg, channels,
                                   spatial, CHANNELS_LAST, HAS_SHIFT)
    y = (x - _center(mean, shift, HAS_SHIFT)) * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(out_ptr + b * out_stride + off, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_kernel(
    x_ptr, out_ptr, shift_ptr, w_ptr, bias_ptr,
    channels, spatial, groups, x_stride, out_stride, s_batch, s_channel, eps,
    CHANNELS_LAST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // groups
    cpg = channels // groups
    c0 = (pid % groups) * cpg
    n = cpg * spatial
    lanes = tl.arange(0, BLOCK)

    # the mean of x + shift as the mean of x plus the mean of the group's channel shifts (each
    # channel holds spatial elements), in float64; x's as its first element plus the mean
    # deviation from it (float32 sums of the order of the group's spread, as group_norm.h's)
    pivot = _pivot(x_ptr, shift_ptr, b, x_stride, s_batch, s_channel, c0, spatial, CHANNELS_LAST, False)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        x, shift, c, off, mask = _load(x_ptr, shift_ptr, b, x_stride, s_batch, s_channel, start + lanes, n, c0, cpg,
                                       channels, spatial, CHANNELS_LAST, False)
        acc += tl.where(mask, x - pivot.to(tl.float32), 0.0)
    mean = pivot + tl.sum(acc, axis=0).to(tl.float64) / n
    if HAS_SHIFT:
        acc_shift = tl.zeros([BLOCK], tl.float64)
        for start in range(0, cpg, BLOCK):
            at = start + lanes
            acc_shift += tl.load(shift_ptr + b * s_batch + (c0 + at) * s_channel, mask=at < cpg,
                                 other=0.0).to(tl.float64)
        mean += tl.sum(acc_shift, axis=0) / cpg

    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        x, shift, c, off, mask = _load(x_ptr, shift_ptr, b, x_stride, s_batch, s_channel, start + lanes, n, c0, cpg,
                                       channels, spatial, CHANNELS_LAST, HAS_SHIFT)
        hi, lo = _center_pair(mean, shift, HAS_SHIFT)
        d = (x - hi) - lo
        acc += tl.where(mask, d * d, 0.0)
    # in float64 like inverse_std in group_norm.h (and exactly rounded: fp32 sqrt and division
    # compile to approximations on NVIDIA GPUs)
    msd = tl.sum(acc, axis=0).to(tl.float64) / n
    rstd = (1.0 / tl.sqrt(msd + eps) + (msd - msd)).to(tl.float32)  # NaN for an overflowed sum (inverse_std)

    for start in range(0, n, BLOCK):
        _write(x_ptr, out_ptr, shift_ptr, w_ptr, bias_ptr, b, x_stride, out_stride, s_batch, s_channel,
               start + lanes, n, c0, cpg, channels, spatial, mean, rstd, CHANNELS_LAST, HAS_SHIFT, HAS_WEIGHT,
               HAS_BIAS, SILU)


@triton.jit
def _pivot(x_ptr, shift_ptr, b, x_stride, s_batch, s_channel, c0, spatial, CHANNELS_LAST: tl.constexpr,
           HAS_SHIFT: tl.constexpr):
    """The group's first element (plus its shift), in float64: the value its chunks' moments are
    taken about."""
    off = c0 if CHANNELS_LAST else c0 * spatial
    v = tl.load(x_ptr + b * x_stride + off).to(tl.float64)
    if HAS_SHIFT:
        v += tl.load(shift_ptr + b * s_batch + c0 * s_channel).to(tl.float64)
    return v


@triton.jit
def _chunk(pid, splits, groups, channels, spatial, chunk):
    """Program pid of a split launch -> its (sample, group) pair, sample, channels per group,
    first channel, group size and element range [first, stop) within the group."""
    pair = pid // splits
    cpg = channels // groups
    n = cpg * spatial
    first = (pid % splits) * chunk
    return pair, pair // groups, cpg, (pair % groups) * cpg, n, first, tl.minimum(n, first + chunk)


@triton.jit
def _chunk_moments_kernel(
    x_ptr, shift_ptr, partial_ptr,
    channels, spatial, groups, splits, chunk, x_stride, s_batch, s_channel,
    CHANNELS_LAST: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pair, b, cpg, c0, n, first, stop = _chunk(pid, splits, groups, channels, spatial, chunk)
    pivot = _pivot(x_ptr, shift_ptr, b, x_stride, s_batch, s_channel, c0, spatial, CHANNELS_LAST, HAS_SHIFT)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float64)
    acc_sq = tl.zeros([BLOCK], tl.float64)
    for start in range(first, stop, BLOCK):
        x, shift, c, off, mask = _load(x_ptr, shift_ptr, b, x_stride, s_batch, s_channel, start + lanes, stop, c0,
                                       cpg, channels, spatial, CHANNELS_LAST, HAS_SHIFT)
        # the deviations from the pivot and their squares in float64, as the CUDA kernel sums
        # them: the variance is sq - s^2, which cancels in float32 when the pivot (the group's
        # first element) lies far from the mean (an outlier of 2e4 gave errors of 0.1)
        d = tl.where(mask, x.to(tl.float64) + shift.to(tl.float64) - pivot, 0.0)
        acc += d
        acc_sq += d * d
    tl.store(partial_ptr + 2 * pid, tl.sum(acc, axis=0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(acc_sq, axis=0))


@triton.jit
def _chunk_normalize_kernel(
    x_ptr, out_ptr, shift_ptr, w_ptr, bias_ptr, partial_ptr,
    channels, spatial, groups, splits, chunk, x_stride, out_stride, s_batch, s_channel, eps,
    CHANNELS_LAST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr, BLOCK: tl.constexpr, MAX_SPLITS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pair, b, cpg, c0, n, first, stop = _chunk(pid, splits, groups, channels, spatial, chunk)
    # every program of the group gathers the same partials in the same order
    j = tl.arange(0, MAX_SPLITS)
    at = partial_ptr + 2 * (pair * splits + j)
    s = tl.sum(tl.load(at, mask=j < splits, other=0.0), axis=0) / n
    sq = tl.sum(tl.load(at + 1, mask=j < splits, other=0.0), axis=0) / n
    pivot = _pivot(x_ptr, shift_ptr, b, x_stride, s_batch, s_channel, c0, spatial, CHANNELS_LAST, HAS_SHIFT)
    mean = pivot + s
    var = sq - s * s
    var = tl.where(var < 0.0, 0.0, var)  # (a NaN stays NaN)
    rstd = (1.0 / tl.sqrt(var + eps) + (var - var)).to(tl.float32)  # NaN for an overflowed sum (inverse_std)
    lanes = tl.arange(0, BLOCK)
    for start in range(first, stop, BLOCK):
        _write(x_ptr, out_ptr, shift_ptr, w_ptr, bias_ptr, b, x_stride, out_stride, s_batch, s_channel,
               start + lanes, stop, c0, cpg, channels, spatial, mean, rstd, CHANNELS_LAST, HAS_SHIFT, HAS_WEIGHT,
               HAS_BIAS, SILU)


def launch(x, shift, weight, bias, num_groups, eps, activation, channels_last, out, splits=1):
    """Fill ``out`` (laid out as x, each sample one dense block) with the op's value; ``splits``
    (group_norm.h's ``gpu_splits``) chunks per group, or one program per group."""
    batch, channels = x.shape[:2]
    spatial = x.numel() // (batch * channels)
    if channels * spatial >= 2 ** 31:
        # channels and spatial are 32-bit kernel arguments, and so are the offsets within a sample
        # made from them (the sample's base offset is 64-bit)
        raise ValueError(f"the triton group norm takes samples of fewer than 2^31 elements, got {channels} channels "
                         f"x {spatial} positions; use the cuda or reference backend")
    dummy = x  # stands in for absent pointers; never read (constexpr flags)
    pointers = (dummy if shift is None else shift, dummy if weight is None else weight,
                dummy if bias is None else bias)
    shift_strides = (0, 0) if shift is None else (shift.stride(0), shift.stride(1))
    flags = dict(CHANNELS_LAST=bool(channels_last), HAS_SHIFT=shift is not None, HAS_WEIGHT=weight is not None,
                 HAS_BIAS=bias is not None, SILU=activation == 1, BLOCK=_BLOCK)
    sample = channels * spatial
    if splits <= 1:
        _group_norm_kernel[(batch * num_groups,)](
            x, out, *pointers, channels, spatial, num_groups, sample, sample, *shift_strides, eps, **flags)
        return
    if splits > _MAX_SPLITS:
        raise ValueError(f"splits must be at most {_MAX_SPLITS}, got {splits}")
    n_group = channels // num_groups * spatial
    chunk = (n_group + splits - 1) // splits  # group_norm.h's gpu_chunk
    partial = torch.empty(2 * batch * num_groups * splits, dtype=torch.float64, device=x.device)
    grid = (batch * num_groups * splits,)
    _chunk_moments_kernel[grid](x, pointers[0], partial, channels, spatial, num_groups, splits, chunk, sample,
                                *shift_strides, CHANNELS_LAST=flags["CHANNELS_LAST"], HAS_SHIFT=flags["HAS_SHIFT"],
                                BLOCK=_BLOCK)
    _chunk_normalize_kernel[grid](x, out, *pointers, partial, channels, spatial, num_groups, splits, chunk, sample,
                                  sample, *shift_strides, eps, MAX_SPLITS=_MAX_SPLITS, **flags)
