"""Classifier distillation losses: Hinton KD, decoupled KD (DKD) and Sinkhorn-distance KD.

Classifier logits are ``[batch, classes]`` with classes in the tens to thousands, so these
are written with torch ops (the fused kernels pay off at language-model vocabularies); Hinton
KD's divergence still runs through the fused :func:`kdfast.losses.kd_loss`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .._checks import is_finite_number, real_number
from ..ops._tensors import vmapped
from .kd import _check_int, _check_temperature, kd_loss


_NO_IGNORE = -(2 ** 63)  # an ignore_index no label can hold


def _check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if t.dim() != 2:
            raise ValueError(f"{name} must be [batch, classes], got shape {tuple(t.shape)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits must be on {student_logits.device} like student_logits, got "
                         f"{teacher_logits.device}")


def _compute_dtype(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.dtype:
    """float64 when either side is float64 (as kd_loss computes), else float32."""
    return torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32


def _check_weight(name: str, value) -> float:
    value = real_number(name, value)
    if not (is_finite_number(value, name, symbolic=True) and value >= 0):  # (DKD's weights meet torch's ops alone)
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _check_labels(labels: torch.Tensor, batch: int, classes: int, device: torch.device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError("labels must be an int64 or int32 tensor of class ids")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on {device} like the logits, got {labels.device}")
    # checked where it is free: on the CPU, outside torch.compile (where it would break the graph)
    # and unbatched by torch.func.vmap (where no value can be read)
    if labels.device.type == "cpu" and not torch.compiler.is_compiling() and not vmapped(labels) and labels.numel() \
            and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must be class ids in [0, {classes})")
    return labels.long()


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   labels: Optional[torch.Tensor] = None, temperature: float = 4.0,
                   alpha: float = 0.9) -> torch.Tensor:
    """Hinton et al. (2015): ``alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(student, labels)``,
    averaged over the batch (the CE term needs ``labels``; ``alpha=1`` drops it)."""
    _check_pair(student_logits, teacher_logits)
    temperature = _check_temperature(temperature)
    alpha = real_number("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if labels is not None:  # checked even where alpha=1 leaves them unused
        labels = _check_labels(labels, *student_logits.shape, student_logits.device)
    if alpha == 1.0:
        return kd_loss(student_logits, teacher_logits, kind="forward_kl", temperature=temperature, scale_by_t2=True)
    if labels is None:
        raise ValueError("labels are needed for the cross-entropy term (or pass alpha=1.0)")
    # no ignore_index: a label of -100 is refused wherever it is read (not dropped from the
    # cross-entropy alone, as F.cross_entropy's default would where the CPU check does not run)
    hard = _batch_mean(F.cross_entropy(student_logits.to(_compute_dtype(student_logits, teacher_logits)), labels,
                                       ignore_index=_NO_IGNORE, reduction="sum"), labels.shape[0])
    if alpha == 0.0:  # (the KD term left out, not multiplied by 0: an infinite one would give NaN)
        return hard
    soft = kd_loss(student_logits, teacher_logits, kind="forward_kl", temperature=temperature, scale_by_t2=True)
    return alpha * soft + (1.0 - alpha) * hard


def _batch_mean(total: torch.Tensor, batch: int) -> torch.Tensor:
    """``total / batch``, 0 for an empty batch (as kd_loss's batchmean), not 0 / 0."""
    return total / max(batch, 1)


def _plogratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q) with 0 log 0 = 0: a class the teacher rules out (logit -inf) adds nothing.

    The dropped entries' log-probabilities are replaced before the arithmetic: where() gives
    the unselected branch a zero gradient, but 0 times the inf or NaN of -inf - -inf there is
    still NaN."""
    keep = p > 0
    zero = torch.zeros_like(p)
    return torch.where(keep, p * (torch.where(keep, log_p, zero) - torch.where(keep, log_q, zero)), zero)


def _shifted(z: torch.Tensor) -> torch.Tensor:
    """``z`` less its row maximum (rows without a finite one as they are): the log-probabilities
    below are differences of logits and log-sum-exps, which would otherwise carry the rounding
    of logits far from 0 (1e-2 relative error at an offset of 1e6 in float32). Shifting before
    the temperature's division also keeps logits near float32's maximum finite."""
    top = z.detach().amax(dim=1, keepdim=True)
    return z - torch.where(top.isfinite(), top, torch.zeros_like(top))


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``, times ``T^2``,
    averaged over the batch.

    TCKD is the KL between the binary (target, non-target) distributions of teacher and
    student; NCKD the KL between their distributions over the non-target classes alone. The
    target class is removed exactly (log-probability -inf), not by subtracting a large number.
    Computed in float32, or float64 for float64 logits.
    """
    _check_pair(student_logits, teacher_logits)
    temperature = _check_temperature(temperature)
    alpha, beta = _check_weight("alpha", alpha), _check_weight("beta", beta)
    batch, classes = student_logits.shape
    if classes < 2:
        raise ValueError("dkd_loss needs at least 2 classes")
    labels = _check_labels(labels, batch, classes, student_logits.device)
    compute = _compute_dtype(student_logits, teacher_logits)
    s = _shifted(student_logits.to(compute)) / temperature
    t = _shifted(teacher_logits.to(compute)) / temperature
    # (a comparison, not F.one_hot, which reads the labels' range on the host: vmap cannot)
    target = labels.unsqueeze(1) == torch.arange(classes, device=labels.device)

    def parts(z):
        lse = torch.logsumexp(z, dim=1)
        log_target = z.gather(1, labels.unsqueeze(1)).squeeze(1) - lse
        others = z.masked_fill(target, -math.inf)
        # A row whose non-target logits are all -inf (a teacher certain of its label) has no
        # non-target distribution: logsumexp would give -inf with a NaN gradient and others -
        # lse_others -inf - -inf = NaN. Its logsumexp is taken over stand-in zeros instead, so
        # its non-target log-probabilities are all -inf (probability 0, no NCKD term).
        has_rest = (others > -math.inf).any(dim=1, keepdim=True)
        lse_others = torch.logsumexp(torch.where(has_rest, others, torch.zeros_like(others)), dim=1)
        log_rest = torch.where(has_rest.squeeze(1), lse_others, torch.full_like(lse_others, -math.inf))
        binary = torch.stack([log_target, log_rest - lse], dim=1)  # log(p_t), log(1 - p_t)
        non_target = others - lse_others.unsqueeze(1)  # log-probs among others, -inf at the target
        return binary, non_target

    s_bin, s_nt = parts(s)
    t_bin, t_nt = parts(t)
    tckd = _plogratio(t_bin.exp(), t_bin, s_bin).sum(1)
    nckd = _plogratio(t_nt.exp(), t_nt, s_nt).sum(1)
    return _batch_mean((alpha * tckd + beta * nckd).sum(), batch) * temperature ** 2


def sinkhorn_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     cost: Optional[torch.Tensor] = None, temperature: float = 1.0, epsilon: float = 0.05,
                     iterations: int = 50) -> torch.Tensor:
    """Sinkhorn-distance KD: the entropy-regularised optimal-transport cost between the
    teacher's and the student's class distributions, averaged over the batch.

    Args:
        cost: ``[classes, classes]`` finite ground cost (default ``1 - I``: every confusion
            costs 1, for which the unregularised distance is the total variation).
        temperature: softmax temperature applied to both logits.
        epsilon: entropic regularisation (smaller is closer to the exact distance, slower to
            converge: for 10 classes, the default cost and unit-scale logits, 50 iterations
            come within ~7e-4 of the exact distance on average at epsilon 0.05 (~5e-3 at
            most) and ~7e-3 at 0.01 (~4e-2 at most); sharper distributions come closer).
        iterations: log-domain Sinkhorn iterations (unrolled: gradients flow through them).

    Returns ``mean_b <P_b, cost>`` with ``P_b`` the Sinkhorn transport plan of sample ``b``,
    rounded onto the plans whose marginals are exactly the two distributions (Altschuler et
    al., 2017): too few iterations for ``epsilon`` give a worse plan, hence a larger value,
    never one below the exact distance. Computed in float32, or float64 for float64 logits.
    """
    _check_pair(student_logits, teacher_logits)
    temperature = _check_temperature(temperature)
    batch, classes = student_logits.shape
    if cost is None:
        cost = 1.0 - torch.eye(classes, device=student_logits.device)
    if not isinstance(cost, torch.Tensor) or cost.shape != (classes, classes):
        raise ValueError(f"cost must be a [{classes}, {classes}] tensor")
    if not cost.is_floating_point():
        raise TypeError(f"cost must be a floating-point tensor, got {cost.dtype}")
    # checked where it is free (a CPU cost, outside torch.compile); an inf cost would give a NaN
    # loss (0 transport times inf)
    if cost.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isfinite(cost).all()):
        raise ValueError("cost must be finite")
    epsilon = real_number("epsilon", epsilon)
    if not (is_finite_number(epsilon, "epsilon", symbolic=True) and epsilon > 0):
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    iterations = _check_int("iterations", iterations, minimum=1)
    compute = _compute_dtype(student_logits, teacher_logits)
    tiny = torch.finfo(compute).tiny
    if epsilon < tiny:  # (cost / epsilon in compute's dtype: 0 / 0 gave a NaN loss)
        raise ValueError(f"epsilon must be at least {tiny:.5g} (the smallest normal {compute}) with {compute} logits, "
                         f"got {epsilon}")
    cost = cost.to(device=student_logits.device, dtype=compute)
    log_a = torch.log_softmax(teacher_logits.to(compute) / temperature, dim=1)  # source: teacher
    log_b = torch.log_softmax(student_logits.to(compute) / temperature, dim=1)  # target: student
    kernel = -cost / epsilon  # log K
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(iterations):
        f = log_a - torch.logsumexp(kernel.unsqueeze(0) + g.unsqueeze(1), dim=2)
        g = log_b - torch.logsumexp(kernel.unsqueeze(0) + f.unsqueeze(2), dim=1)
    plan = _round_to_marginals((f.unsqueeze(2) + kernel.unsqueeze(0) + g.unsqueeze(1)).exp(), log_a.exp(), log_b.exp())
    return _batch_mean((plan * cost).sum(), batch)


def _round_to_marginals(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Altschuler, Weed and Rigollet (2017), Algorithm 2: the nearest plan (in L1) whose row sums
    are exactly ``a`` and column sums exactly ``b``, for plans ``[batch, n, n]``. After too few
    Sinkhorn iterations for its epsilon, the plan's rows are far from ``a`` and its cost can be
    anything down to 0; the rounded plan is always a real transport plan, so the loss is never
    below the exact distance. Differentiable, no host sync."""
    plan = plan * _ratio_at_most_1(a, plan.sum(2)).unsqueeze(2)
    plan = plan * _ratio_at_most_1(b, plan.sum(1)).unsqueeze(1)
    # Both >= 0 with equal sums, but for rounding. Dividing by the larger of the two sums keeps
    # err_a_i / sum and err_b_j / sum at most 1, so the correction and its gradient stay bounded
    # where one sum is 0 and the other rounding noise (dividing by sum(err_a) alone gave
    # gradients of 1e23 there).
    err_a, err_b = (a - plan.sum(2)).clamp(min=0.0), (b - plan.sum(1)).clamp(min=0.0)
    total = torch.maximum(err_a.sum(1), err_b.sum(1)).clamp(min=torch.finfo(plan.dtype).tiny)
    return plan + err_a.unsqueeze(2) * err_b.unsqueeze(1) / total[:, None, None]


def _ratio_at_most_1(target: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``min(target / current, 1)`` with a finite gradient everywhere: ``(t / c).clamp(max=1)``
    has the value, but where ``c`` is tiny its division's backward, ``-t / c**2``, overflows to
    inf before the clamp's zero gradient multiplies it (inf * 0 = NaN). Dividing by
    ``max(c, t)`` instead gives 1 there, from a division whose gradient stays finite."""
    current = current.clamp(min=torch.finfo(current.dtype).tiny)
    return target / torch.maximum(current, target)
