"""Specification of the grid combination (see csrc/grid_combination/grid_combination.h).

``out = a * x + sum_k sum_g w[k][g] * y_k[..., g * C:(g + 1) * C]``: a sample ``x`` of ``C``
channels in its last dimension and one or two outputs ``y_k`` holding ``G`` grid points per
channel (``G * C`` in the last dimension). ``coefs`` is ``[a, w[0][0..G), w[1][0..G)]``. Terms
are added in that order from 0, each product rounded before its sum; a zero weight drops its
term (its input is not read: an unused inf or NaN does not poison the result).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def grid_combination(sample: torch.Tensor, outputs: Sequence[torch.Tensor], coefs: torch.Tensor,
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The combination computed in ``dtype`` and returned in it; None: in float32 (float64 for a
    float64 sample), as the kernels compute, returned in the sample's dtype."""
    compute = dtype or (torch.float64 if sample.dtype == torch.float64 else torch.float32)
    channels = sample.shape[-1]
    grid = (coefs.numel() - 1) // len(outputs)
    weights = coefs.to(compute)  # (rounded like the kernels' copy when compute is float32)
    used = (weights != 0).tolist()  # coefs live on the host
    acc = torch.zeros(sample.shape, dtype=compute, device=sample.device)
    if used[0]:
        acc = acc + weights[0] * sample.to(compute)
    for k, output in enumerate(outputs):
        points = output.unflatten(-1, (grid, channels))
        for g in range(grid):
            i = 1 + k * grid + g
            if used[i]:
                acc = acc + weights[i] * points[..., g, :].to(compute)
    return acc if dtype is not None else acc.to(sample.dtype)
