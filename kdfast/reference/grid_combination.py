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
                     dtype: Optional[torch.dtype] = None, differentiable_weights: bool = False) -> torch.Tensor:
    """The combination computed in ``dtype`` and returned in it; None: in float32 (float64 for a
    float64 sample), as the kernels compute, returned in the sample's dtype.

    A zero weight's term is skipped (its weights are read on the host), unless
    ``differentiable_weights``: then every term is formed, a zero weight's masked where it holds
    inf or NaN, so that the weight keeps its gradient and tangent, ``sum(grad * term)``, and no
    value is read on the host (weights batched by torch.func.vmap work too)."""
    compute = dtype or (torch.float64 if sample.dtype == torch.float64 else torch.float32)
    channels = sample.shape[-1]
    grid = (coefs.numel() - 1) // len(outputs)
    weights = coefs.to(compute)  # (rounded like the kernels' copy when compute is float32)
    used = None if differentiable_weights else (weights != 0).tolist()  # coefs live on the host
    acc = torch.zeros(sample.shape, dtype=compute, device=sample.device)
    terms = [sample] + [points[..., g, :] for output in outputs
                        for points in (output.unflatten(-1, (grid, channels)),) for g in range(grid)]
    for i, (w, term) in enumerate(zip(weights, terms)):
        if used is None:
            term = term.to(compute)
            acc = acc + w * torch.where((w != 0) | torch.isfinite(term), term, 0.0)
        elif used[i]:
            acc = acc + w * term.to(compute)
    return acc if dtype is not None else acc.to(sample.dtype)
