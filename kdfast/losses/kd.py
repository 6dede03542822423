"""Logit distillation losses on given logits: ``kd_loss`` and :class:`KDLoss`.

The divergence of every token and its gradient come from one fused kernel
(:func:`kdfast.ops.kd_divergence`); this module only flattens, masks and reduces.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..backends import check_known
from .._checks import check_flag, check_int as _check_int, is_finite_number, real_number
from ..ops._tensors import _F32_MAX, check_label_ids
from ..ops.kd_divergence import KINDS, check_arguments, kd_divergence
from ..reference import kd_divergence as ref

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _check_temperature(temperature: float) -> float:
    """``temperature`` as a float, if it is a positive finite number (every loss's check). Under
    torch.compile it may stay symbolic: the kernels' ops take it in a tensor
    (:func:`kdfast.ops._tensors.number_tensor`), so an annealed temperature compiles once."""
    temperature = real_number("temperature", temperature)
    if not (is_finite_number(temperature, "temperature", symbolic=True) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def _t2_loss_scale(temperature: float, scale_by_t2, float64: bool = False) -> float:
    """The loss scale of ``scale_by_t2``: ``temperature**2``, which the kernels take as a float32
    number (float64 logits are computed in float64), else 1."""
    if not check_flag("scale_by_t2", scale_by_t2):
        return 1.0
    scale = temperature ** 2
    if not float64 and not torch.compiler.is_compiling() and scale > _F32_MAX:  # (symbolic: checked when run)
        raise ValueError(f"temperature**2 (scale_by_t2=True) must be within float32's range (temperature <= "
                         f"{math.sqrt(_F32_MAX):.6g}; the kernels compute in float32), got temperature={temperature}")
    return scale


def _check_beta(beta: float, symbolic: bool = False) -> float:
    """``beta`` as a float, if it is a number in [0, 1] (every loss's check; ``symbolic``: a loss
    of torch's ops alone, see :func:`kdfast._checks.is_finite_number`; the kernels' ops take
    ``beta`` as a float, a constant under torch.compile)."""
    beta = real_number("beta", beta)
    if not (is_finite_number(beta, "beta", symbolic) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return beta


def _count_valid(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """How many labels are not ``ignore_index``, compared in int64 as the kernels compare them
    (a uint8 tensor compared with -100 directly wraps it to 156)."""
    return (labels.to(torch.int64) != ignore_index).sum()


def _resolve_kind(kind: str, beta: float) -> str:
    # TRL's generalized JSD: beta = 0 is KL(teacher || student), beta = 1 is KL(student ||
    # teacher) (the mixture formula itself vanishes at both ends).
    if kind == "jsd" and beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


def _reduce(rows: torch.Tensor, valid: Union[int, torch.Tensor], vocab: int, reduction: str,
            num_items_in_batch: Optional[Union[int, torch.Tensor]]) -> torch.Tensor:
    total = rows.sum()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    # clamp(1): an all-ignored batch gives 0 (with zero gradient), not 0/0.
    count = valid.clamp(min=1) if isinstance(valid, torch.Tensor) else max(valid, 1)
    if reduction == "batchmean":
        return total / count
    return total / (count * vocab)  # "mean": over every (valid token, vocabulary entry) pair


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    *,
    scale_by_t2: bool = False,
    vocab_size: Optional[int] = None,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """Knowledge-distillation divergence between student and teacher logits.

    Args:
        student_logits, teacher_logits: ``[..., vocab]`` logits (float32, float16 or
            bfloat16), e.g. ``[batch, seq, vocab]``; math runs in float32. float64 logits
            are taken too: their math runs in float64, unfused, by the pure-torch reference.
        labels: optional ``[...]`` token ids; positions equal to ``ignore_index`` are left out.
        kind: ``"forward_kl"`` KL(teacher || student), ``"reverse_kl"`` KL(student || teacher),
            ``"jsd"`` generalized Jensen-Shannon ``beta KL(P||M) + (1-beta) KL(Q||M)`` with
            ``M = beta P + (1-beta) Q`` and P the teacher (TRL's convention, including
            beta = 0 meaning forward KL and beta = 1 reverse KL), ``"tvd"`` total variation
            ``0.5 sum |P - Q|``, or ``"skew_kl"`` ``KL(P || beta P + (1-beta) Q)``
            (DistiLLM's skew KL; there beta is the teacher's share, typically 0.1).
        beta: the mixing weight of ``"jsd"`` and ``"skew_kl"`` in [0, 1] (unused by the others).
        temperature: softmax temperature applied to both logits.
        ignore_index: the label value of positions to leave out (only read with ``labels``).
        reduction: ``"batchmean"`` (sum over valid tokens / their number; without labels
            every position counts, where TRL's ``generalized_jsd_loss`` divides by
            ``logits.shape[0]`` instead: :func:`kdfast.losses.trl.generalized_jsd_loss`
            gives TRL's values), ``"sum"``,
            ``"mean"`` (sum / (valid tokens * vocab), as TRL), or ``"none"`` (float32 loss per
            token, shaped like ``labels``; ignored tokens give 0).
        scale_by_t2: multiply by ``temperature**2`` (Hinton et al.), keeping gradient
            magnitudes comparable across temperatures.
        vocab_size: the shared vocabulary when the two logits have different widths
            (padded LM heads); columns at or beyond it get probability 0.
        num_items_in_batch: divide the summed loss by this instead (gradient accumulation): a
            positive integer, or a real tensor of one element (its value is not read, which
            would be a host sync).

    Returns:
        A float32 scalar (or per-token tensor for ``reduction="none"``; float64 for float64 logits). Differentiable; the
        student's gradient is computed by the forward kernel itself, no logits-sized
        temporaries are created besides that gradient (kept in float32 for float16 logits, so
        that a loss scale applied in the backward still finds the small entries that float16
        would flush to 0). So a graph whose student takes gradients supports one backward (a
        second one through ``retain_graph=True``, and ``create_graph=True``, raise an error).
        A token whose logits have no softmax (all -inf, or an inf or NaN entry) and is not
        ignored gives NaN.

    Under ``torch.compile`` a changing ``temperature`` compiles twice in all (its first value,
    then a symbolic one); each new ``beta`` compiles once.

    The logits are read in place when their leading dimensions flatten to rows of one stride
    (any contiguous ``[batch, seq, vocab]`` tensor); a slice such as the causal shift
    ``logits[:, :-1]`` does not, and both logits are then copied. To shift without copies, pass
    the whole logits and labels whose last position is ``ignore_index``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if reduction == "none" and num_items_in_batch is not None:
        raise ValueError("num_items_in_batch divides a summed loss; it has no meaning with reduction='none'")
    if num_items_in_batch is not None and not isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = _check_int("num_items_in_batch", num_items_in_batch, minimum=1)
    elif num_items_in_batch is not None:
        # (a tensor's value is not read: that would be a host sync per call; its shape and dtype
        # are. transformers' Trainer passes a float tensor, its count divided by the parallel sizes)
        if num_items_in_batch.numel() != 1 or num_items_in_batch.is_complex() or num_items_in_batch.dtype == torch.bool:
            raise ValueError(f"num_items_in_batch must be a positive integer or a real tensor of one element, "
                             f"got a {num_items_in_batch.dtype} tensor of shape {tuple(num_items_in_batch.shape)}")
        num_items_in_batch = num_items_in_batch.reshape(())
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have a vocabulary dimension, got a 0-d tensor")
        if t.shape[-1] == 0:
            raise ValueError(f"{name} must have a vocabulary of at least one entry, got shape {tuple(t.shape)}")
    lead = student_logits.shape[:-1]
    if teacher_logits.shape[:-1] != lead:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must agree in every dimension but the last")
    ignore_index = _check_int("ignore_index", ignore_index)
    if vocab_size is not None:
        vocab_size = _check_int("vocab_size", vocab_size, minimum=1)
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.shape != lead:
            raise ValueError(f"labels must have shape {tuple(lead)} (the logits without the vocabulary "
                             f"dimension), got {tuple(labels.shape)}")
    # (float64 logits go to the float64 reference, torch's ops alone: their numbers may stay symbolic)
    float64 = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
    beta, temperature = _check_beta(beta, float64), _check_temperature(temperature)
    args = dict(kind=_resolve_kind(kind, beta), beta=beta, temperature=temperature,
                labels=None if labels is None else labels.reshape(-1), ignore_index=ignore_index,
                vocab_size=vocab_size, loss_scale=_t2_loss_scale(temperature, scale_by_t2, float64))
    rows = math.prod(lead)  # (not -1, which vmap over an empty batch cannot resolve)
    student_2d = student_logits.reshape(rows, student_logits.shape[-1])
    teacher_2d = teacher_logits.reshape(rows, teacher_logits.shape[-1])
    if torch.float64 in (student_logits.dtype, teacher_logits.dtype):
        rows = _float64_rows(student_2d, teacher_2d, **args)
    else:
        rows = kd_divergence(student_2d, teacher_2d, **args)
    if reduction == "none":
        return rows.reshape(lead)
    valid = rows.numel() if labels is None else _count_valid(labels, ignore_index)
    vocab = student_logits.shape[-1] if vocab_size is None else vocab_size
    return _reduce(rows, valid, vocab, reduction, num_items_in_batch)


def _float64_rows(student, teacher, *, kind, beta, temperature, labels, ignore_index, vocab_size, loss_scale):
    """Per-row divergences of float64 logits, in float64, by the pure-torch reference with
    autograd (the fused kernels stop at float32): TRL takes float64 logits, so its drop-in does."""
    student, teacher, labels, beta, temperature, vocab, loss_scale = check_arguments(
        student, teacher, labels, kind, beta, temperature, vocab_size, loss_scale, float64=True)
    check_label_ids(labels, student.shape[1], ignore_index)  # (masks only: the student's width bounds them)
    check_known(None)  # a misspelt KDFAST_BACKEND fails here too, as for every other dtype
    return ref.kd_divergence(student, teacher, kind, beta, temperature, labels, ignore_index, vocab, loss_scale,
                             dtype=torch.float64)


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`: ``KDLoss(kind="jsd", beta=0.5, temperature=1.0)`` then
    ``loss = criterion(student_logits, teacher_logits, labels)``."""

    def __init__(self, kind: str = "jsd", beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "batchmean", scale_by_t2: bool = False, vocab_size: Optional[int] = None):
        super().__init__()
        # Validate once here so that a bad configuration fails at construction.
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
        self.kind, self.beta, self.temperature = kind, _check_beta(beta), _check_temperature(temperature)
        self.ignore_index, self.reduction = _check_int("ignore_index", ignore_index), reduction
        self.scale_by_t2 = check_flag("scale_by_t2", scale_by_t2)
        # the upper bound (the logits' width) can only be checked at the call
        self.vocab_size = None if vocab_size is None else _check_int("vocab_size", vocab_size, minimum=1)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The divergence of ``student_logits`` from ``teacher_logits`` (see :func:`kd_loss`)."""
        return kd_loss(student_logits, teacher_logits, labels, kind=self.kind, beta=self.beta,
                       temperature=self.temperature, ignore_index=self.ignore_index, reduction=self.reduction,
                       scale_by_t2=self.scale_by_t2, vocab_size=self.vocab_size)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, beta={self.beta}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"scale_by_t2={self.scale_by_t2}, vocab_size={self.vocab_size}")
