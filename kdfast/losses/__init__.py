"""Distillation losses.

- :func:`kd_loss` / :class:`KDLoss`: fused logit divergences (forward / reverse KL,
  generalized JSD, TVD, skew KL) on given logits.
- :func:`fused_linear_kd` / :class:`FusedLinearKDLoss`: the same with the LM heads inside,
  chunked so that the ``[tokens, vocab]`` logits never exist.
"""
from .fused_linear import FusedLinearKDLoss, default_chunk_size, fused_linear_kd
from .kd import KDLoss, kd_loss

__all__ = ["FusedLinearKDLoss", "KDLoss", "default_chunk_size", "fused_linear_kd", "kd_loss"]
