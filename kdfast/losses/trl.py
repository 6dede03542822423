"""Drop-ins for TRL: the GKD trainer's generalized JSD computed by kdfast's fused kernel.

TRL's ``GKDTrainer.generalized_jsd_loss`` builds log-softmaxes, their mixture and two KL
terms as ``[batch, seq, vocab]`` tensors. :func:`generalized_jsd_loss` has its signature,
conventions and values (tested against it) and computes each token's divergence and
gradient in one pass, without those temporaries::

    from kdfast.losses.trl import patch_gkd_trainer
    patch_gkd_trainer()            # every GKDTrainer now uses kdfast's loss
    trainer = GKDTrainer(...)
"""
from __future__ import annotations

import inspect
from typing import Optional, Union

import torch

from ..ops._tensors import check_label_ids
from ..reference import kd_divergence as ref
from .kd import _check_beta, _check_temperature, _resolve_kind, kd_loss

TRL_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss``, fused.

    ``beta * KL(teacher || M) + (1 - beta) * KL(student || M)``, ``M = beta * teacher +
    (1 - beta) * student`` (beta 0: forward KL, beta 1: reverse KL), both logits divided by
    ``temperature``, positions whose label is -100 left out. ``reduction``: ``"batchmean"``
    (over valid tokens; without labels, over the first dimension, as TRL), ``"sum"``, ``"mean"``
    (over valid tokens x vocabulary) or ``"none"``; ``num_items_in_batch`` divides the sum instead.
    ``"none"`` returns TRL's per-entry ``[..., vocab]`` tensor (valid positions only when labels
    are given), which this function then computes the unfused way, like TRL.
    """
    if reduction not in TRL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, TRL_REDUCTIONS))}, got {reduction!r}")
    if reduction == "none" and num_items_in_batch is None:
        return _per_entry(student_logits, teacher_logits, labels, _check_beta(beta, symbolic=True),
                          _check_temperature(temperature))
    if reduction == "batchmean" and labels is None and num_items_in_batch is None:
        # TRL divides by the first dimension (the batch of [batch, seq, vocab] logits), not
        # by the number of tokens, when no labels say which tokens count.
        total = kd_loss(student_logits, teacher_logits, None, kind="jsd", beta=beta, temperature=temperature,
                        reduction="sum")
        return total / max(student_logits.shape[0], 1)
    return kd_loss(student_logits, teacher_logits, labels, kind="jsd", beta=beta, temperature=temperature,
                   reduction="batchmean" if reduction == "none" else reduction,
                   num_items_in_batch=num_items_in_batch)


def _per_entry(student_logits, teacher_logits, labels, beta: float, temperature: float) -> torch.Tensor:
    """TRL's unreduced result: the divergence's terms per vocabulary entry (checked as kd_loss
    checks the reduced forms)."""
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1:
            raise TypeError(f"{name} must be a floating-point torch.Tensor with a vocabulary dimension")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    temperature = _check_temperature(temperature)
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != student_logits.shape[:-1]):
        raise ValueError(f"labels must be a tensor of shape {tuple(student_logits.shape[:-1])} (the logits without "
                         f"the vocabulary dimension)")
    if labels is not None:
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must hold integers, got {labels.dtype}")
        if labels.device != student_logits.device:
            raise ValueError(f"labels must be on {student_logits.device} like the logits, got {labels.device}")
        labels = labels.to(torch.int64)
        check_label_ids(labels, student_logits.shape[-1], -100)
    ls = torch.log_softmax(student_logits / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits / temperature, dim=-1)
    terms = ref.divergence_terms(_resolve_kind("jsd", beta), ls, lt, beta)  # beta 0 / 1: the KLs, as TRL
    return terms if labels is None else terms[labels != -100]


def patch_gkd_trainer(trainer_cls=None):
    """Make TRL's GKD trainer (``trainer_cls``, by default TRL's own ``GKDTrainer``) compute
    its loss with :func:`generalized_jsd_loss`; returns the class."""
    if trainer_cls is None:
        trainer_cls = _trl_gkd_trainer()
    name = getattr(trainer_cls, "__name__", trainer_cls)
    if not hasattr(trainer_cls, "generalized_jsd_loss"):
        raise TypeError(f"{name!r} has no generalized_jsd_loss to replace")
    # Trainers whose loss takes more (TRL's GOLD and IWOPD trainers: logits_are_probs, top_k)
    # would call the drop-in with arguments it does not know, mid-training.
    theirs = inspect.signature(trainer_cls.generalized_jsd_loss).parameters
    extra = [p for p in theirs if p not in inspect.signature(generalized_jsd_loss).parameters
             and p not in ("self", "cls")]
    if extra:
        raise TypeError(f"{name}.generalized_jsd_loss takes {', '.join(extra)}, which kdfast's drop-in does not: "
                        "patch TRL's GKD trainer (or a subclass with its signature)")
    trainer_cls.generalized_jsd_loss = staticmethod(generalized_jsd_loss)
    return trainer_cls


def _trl_gkd_trainer():
    try:  # TRL >= 1.0 keeps GKD under trl.experimental
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except ImportError:
        try:
            from trl import GKDTrainer
        except ImportError as exc:
            raise ImportError("patch_gkd_trainer needs TRL with its GKD trainer (pip install trl)") from exc
    return GKDTrainer
