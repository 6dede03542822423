"""Specification of the fused group norm + activation (see csrc/group_norm/group_norm.h).

``y = act(GroupNorm(x + shift[:, :, None, ...]; num_groups, weight, bias, eps))`` with
``act`` the identity or SiLU: torch's ``F.group_norm`` (biased variance over each group's
channels and positions) after the per-(sample, channel) shift, computed in ``dtype``.
Gradients come from autograd, so this is also what the op's backward computes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "silu")


def group_norm_act(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5, shift: Optional[torch.Tensor] = None,
                   activation: str = "silu", dtype: Optional[torch.dtype] = torch.float64) -> torch.Tensor:
    """The op's value in ``dtype`` (None: x's dtype, as torch's own modules compute it)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    dtype = x.dtype if dtype is None else dtype
    v = x.to(dtype)
    if shift is not None:
        v = v + shift.to(dtype).reshape(shift.shape + (1,) * (x.dim() - 2))
    if weight is None and bias is not None:
        # (an explicit weight of ones: torch's group_norm backward on the CPU fails with a bias alone)
        weight = torch.ones_like(bias)
    weight, bias = (None if t is None else t.to(dtype) for t in (weight, bias))
    if v.numel() and v[0].numel() == num_groups:
        # one element per group, which F.group_norm refuses: (x - mean) / sqrt(0 + eps) with
        # mean = x, so 0 (NaN from an inf or NaN, or from 0 / 0 at eps = 0)
        y = (v - v) * (math.inf if eps == 0 else eps ** -0.5)
        shape = (1, -1) + (1,) * (v.dim() - 2)
        y = y if weight is None else y * weight.reshape(shape)
        y = y if bias is None else y + bias.reshape(shape)
    else:
        if dtype is torch.float64:
            # The spec centres each group on its (constant) mean first, which changes neither the
            # value nor the gradient: torch's channels-last kernel takes the variance as
            # E[x^2] - E[x]^2, which cancels even in float64 for a spread small beside the mean
            # (negative at 1e4 +- 1e-3, then NaN at eps = 0). (dtype=None stays torch's own.)
            v = v - _group_means(v.detach(), num_groups)
        y = F.group_norm(v, num_groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y


def _group_means(v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Each (sample, group)'s mean, shaped to broadcast over ``v`` ``[N, C, *spatial]``."""
    n, c = v.shape[:2]
    means = v.reshape(n, num_groups, -1).mean(dim=2) if v.numel() else v.new_zeros(n, num_groups)
    return means.repeat_interleave(c // num_groups, dim=1).reshape((n, c) + (1,) * (v.dim() - 2))
