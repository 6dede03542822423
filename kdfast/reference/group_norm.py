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
        y = F.group_norm(v, num_groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y
