"""Specification of the fused solver step (see csrc/solver_step/solver_step.h).

Inputs are, in order: x, model, cond, h0, h1, h2, aux, noise (absent ones are None).
``coefs`` holds 29 numbers: x0 = coefs[0]*x + coefs[1]*m, then for output k
out_k = sum_j coefs[2 + 9k + j] * src_j with src = (x, m, u, x0, h0, h1, h2, aux, noise),
where a zero coefficient drops its term (an unused inf/NaN source cannot poison an output)
and absent inputs read as 0. ``coefs`` may also be ``[batch, 29]``: a row per sample.

It is also what runs float64 steps: :mod:`kdfast.ops.solver_step` serves float64 samples
from these functions with ``compute_dtype=torch.float64`` (the compiled kernels stop at float32).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch

THRESHOLD_NONE, THRESHOLD_CLIP, THRESHOLD_DYNAMIC = 0, 1, 2
NUM_INPUTS, NUM_SOURCES, NUM_OUTPUTS = 8, 9, 3
NUM_COEFS = 2 + NUM_OUTPUTS * NUM_SOURCES


def guided(model: torch.Tensor, cond: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    return model if cond is None else model + scale * (cond - model)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((v.shape[0],) + (1,) * (like.dim() - 1))  # (no -1: vmap over an empty batch)


def solver_step(
    inputs: Sequence[Optional[torch.Tensor]],
    coefs: torch.Tensor,
    guidance_scale: float = 1.0,
    threshold: int = THRESHOLD_NONE,
    clip_value: float = 1.0,
    dynamic_scale: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> List[torch.Tensor]:
    """All three outputs, in ``compute_dtype`` (callers cast and keep the ones they need)."""
    vals = [None if t is None else t.to(compute_dtype) for t in inputs]
    x = vals[0]
    c = coefs.to(device=x.device, dtype=compute_dtype)
    if c.dim() == 2:  # a row per sample: coefficient i as a [batch, 1, ...] column
        c = c.t().reshape(c.shape[1], c.shape[0], *(1,) * (x.dim() - 1))
    model, cond = vals[1], vals[2]
    m = guided(model, cond, guidance_scale)
    x0 = c[0] * x + c[1] * m
    if threshold == THRESHOLD_CLIP:
        x0 = x0.clamp(-clip_value, clip_value)
    elif threshold == THRESHOLD_DYNAMIC:
        s = _per_sample(dynamic_scale.to(compute_dtype), x0)
        # torch.clamp as diffusers' _threshold_sample: the same values as min/max, and the same
        # gradient where x0 equals +-s (clamp gives it to x0, min/max would split it)
        x0 = torch.clamp(x0, -s, s) / s
    sources = [x, m, model, x0, vals[3], vals[4], vals[5], vals[6], vals[7]]
    outs = []
    for k in range(NUM_OUTPUTS):
        acc = torch.zeros_like(x)
        for j, src in enumerate(sources):
            if src is not None:
                cj = c[2 + NUM_SOURCES * k + j]
                # A zero coefficient's source adds nothing even if it holds inf or NaN (the kernels
                # do not read it), while the coefficient keeps its gradient, sum(grad * source).
                acc = acc + cj * torch.where((cj != 0) | torch.isfinite(src), src, 0.0)
        outs.append(acc)
    return outs


def threshold_scale(
    x: torch.Tensor,
    model: torch.Tensor,
    cond: Optional[torch.Tensor],
    guidance_scale: float,
    x0_from_x: float,
    x0_from_model: float,
    ratio: float,
    max_value: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-sample clamp(quantile(|x0|, ratio), 1, max_value) as ``[batch]``: float32, or float64
    when ``compute_dtype`` is float64."""
    m = guided(model.to(compute_dtype), None if cond is None else cond.to(compute_dtype), guidance_scale)
    x0 = x0_from_x * x.to(compute_dtype) + x0_from_model * m
    flat = x0.reshape(x0.shape[0], math.prod(x0.shape[1:])).abs()  # (-1 fails for an empty batch)
    # torch.quantile's method by hand, with its values: it refuses rows of over 2^24 values and
    # has no vmap batching rule (a NaN makes the quantile NaN, as there)
    values = flat.sort(dim=1).values
    lo, hi, frac = quantile_position(ratio, flat.shape[1], compute_dtype)
    s = torch.lerp(values[:, lo], values[:, hi], frac)  # a Python weight: no copy, no sync on CUDA
    s = torch.where(flat.isnan().any(dim=1), torch.full_like(s, float("nan")), s)
    return torch.clamp(s, min=1.0, max=max_value).to(torch.float64 if compute_dtype == torch.float64 else torch.float32)


_QUANTILE_MAX = 1 << 24  # the most values torch.quantile takes in one row


def quantile_position(ratio: float, n: int, dtype: torch.dtype):
    """(lo, hi, frac): the ``ratio`` quantile of ``n`` sorted values lies between elements ``lo``
    and ``hi`` at ``frac``, computed as the kernels (csrc quantile_position) and torch.quantile
    compute it: in float32 for float32 math up to 2^24 values, else in float64."""
    if dtype is not torch.float64 and n <= _QUANTILE_MAX:
        pos = np.float32(ratio) * np.float32(n - 1)
        lo = int(np.floor(pos))
        frac = float(pos - np.float32(lo))
    else:
        pos = float(ratio) * float(n - 1)
        lo = int(math.floor(pos))
        frac = pos - lo
    lo = min(max(lo, 0), n - 1)
    return lo, (min(lo + 1, n - 1) if frac > 0 else lo), frac
