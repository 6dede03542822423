"""Distillation losses.

- :func:`kd_loss` / :class:`KDLoss`: fused logit divergences (forward / reverse KL,
  generalized JSD, TVD, skew KL) on given logits.
- :func:`fused_linear_kd` / :class:`FusedLinearKDLoss`: the same with the LM heads inside,
  chunked so that the ``[tokens, vocab]`` logits never exist.
- :func:`topk_kd_loss` / :func:`teacher_topk`: KD from cached teacher top-k log-probabilities;
  :func:`fused_linear_topk_kd` / :class:`FusedLinearTopKKDLoss`: the same with the student's
  LM head inside, chunked.
- :func:`hinton_kd_loss`, :func:`dkd_loss`, :func:`sinkhorn_kd_loss`: classifier KD.
- :mod:`kdfast.losses.trl`: TRL's GKD loss, fused (``generalized_jsd_loss``,
  ``patch_gkd_trainer``).
- :mod:`kdfast.losses.diffusion`: diffusion-distillation losses batched over samples at
  different timesteps: :func:`pseudo_huber_loss` (consistency training), :func:`dmd_loss`
  (distribution matching), :func:`progressive_distillation_loss` and its target.
"""
from . import diffusion, trl
from .classifier import dkd_loss, hinton_kd_loss, sinkhorn_kd_loss
from .diffusion import (dmd_loss, progressive_distillation_loss, progressive_distillation_target,
                        progressive_distillation_teacher, pseudo_huber_loss, truncated_snr_weights)
from .fused_linear import (FusedLinearKDLoss, FusedLinearTopKKDLoss, default_chunk_size, fused_linear_kd,
                           fused_linear_topk_kd)
from .kd import KDLoss, kd_loss
from .topk import teacher_topk, topk_kd_loss

__all__ = ["FusedLinearKDLoss", "FusedLinearTopKKDLoss", "KDLoss", "default_chunk_size", "diffusion", "dkd_loss",
           "dmd_loss", "fused_linear_kd", "fused_linear_topk_kd", "hinton_kd_loss", "kd_loss", "progressive_distillation_loss",
           "progressive_distillation_target", "progressive_distillation_teacher", "pseudo_huber_loss",
           "sinkhorn_kd_loss", "teacher_topk", "topk_kd_loss", "trl", "truncated_snr_weights"]
