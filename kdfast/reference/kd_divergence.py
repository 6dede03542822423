"""Specification of the fused KD divergences (see csrc/kd_divergence/kd_divergence.h).

Per row r (token), with the first ``vocab`` columns of each row, temperature T,
``q = softmax(student / T)`` and ``p = softmax(teacher / T)``:

- forward_kl: ``KL(p || q) = sum p (log p - log q)``
- reverse_kl: ``KL(q || p)``
- jsd: ``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``
- tvd: ``0.5 sum |p - q|``
- skew_kl: ``KL(p || beta p + (1 - beta) q)``

times ``loss_scale``, with ``0 log 0 = 0``; rows whose label is ``ignore_index`` give 0. A row
whose student or teacher logits have no softmax (all -inf, or an inf or NaN entry) gives NaN,
with a NaN gradient.
Gradients come from autograd through :func:`kd_divergence`, so it is also the reference for the
fused backward; :func:`kd_divergence_grad` gives the same gradient in closed form.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl")


def _xlogratio(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """w * (a - b) with 0 where w == 0 (whatever a - b is), differentiably."""
    safe = torch.where(w > 0, a - b, torch.zeros_like(a))
    return w * safe


def _log_mix(beta: float, lt: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """log(beta p + (1 - beta) q) from log p and log q."""
    # At beta = 0 or 1 the mixture is one side exactly: logaddexp with a side that is -inf
    # everywhere has a clean first derivative but a NaN second one (inf / inf).
    if beta == 1:
        return lt
    if beta == 0:
        return ls
    log_beta = math.log(beta) if beta > 0 else -math.inf
    log_rest = math.log1p(-beta) if beta < 1 else -math.inf
    a, b = lt + log_beta, ls + log_rest
    # Where both are -inf, logaddexp's backward is NaN even with a zero incoming gradient.
    live = (a > -math.inf) | (b > -math.inf)
    zero = torch.zeros_like(a)
    lm = torch.logaddexp(torch.where(live, a, zero), torch.where(live, b, zero))
    return torch.where(live, lm, torch.full_like(lm, -math.inf))


def divergence_terms(kind: str, ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-entry terms of the divergence from student and teacher log-probabilities."""
    q, p = ls.exp(), lt.exp()
    if kind == "forward_kl":
        return _xlogratio(p, lt, ls)
    if kind == "reverse_kl":
        return _xlogratio(q, ls, lt)
    if kind == "jsd":
        lm = _log_mix(beta, lt, ls)
        # The weights inside 0 log 0: at beta = 0 or 1 an entry one side lacks gives 0, not 0 * inf.
        return _xlogratio(beta * p, lt, lm) + _xlogratio((1 - beta) * q, ls, lm)
    if kind == "tvd":
        return 0.5 * (p - q).abs()
    if kind == "skew_kl":
        return _xlogratio(p, lt, _log_mix(beta, lt, ls))
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def tempered(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(x - max) / temperature`` along the last dim, as the softmax takes it (the shift does not
    change it), formed as the kernels' tempered_shift (csrc/common/kd_common.h): below
    temperature 1 the difference first, as ``x / T`` alone overflows for ``|x| > T * max``
    (float32 logits of 1e38 at T = 0.5); else each scaled first. A row whose max is not finite
    is not shifted, so it still has no distribution."""
    m = x.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    inv_t = 1.0 / temperature
    if isinstance(inv_t, float) and not torch.compiler.is_compiling():
        return (x - m) * inv_t if inv_t > 1 else x * inv_t - m * inv_t
    # Traced (the number a SymFloat or a 0-d tensor under torch.compile): no branch on its value,
    # which would compile a graph for each side of 1.
    # (a tensor made by an op on it: torch.as_tensor of a SymFloat would bake in its first value)
    inv_t = torch.ones((), dtype=x.dtype, device=x.device) * inv_t
    return torch.where(inv_t > 1, (x - m) * inv_t, x * inv_t - m * inv_t)


def _tempered(student: torch.Tensor, teacher: torch.Tensor, vocab: Optional[int], temperature: float,
              dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The shared vocabulary's logits divided by the temperature, in ``dtype``, and that vocabulary."""
    vocab = min(student.shape[-1], teacher.shape[-1]) if vocab is None else vocab
    s, t = student[:, :vocab].to(dtype), teacher[:, :vocab].to(dtype)
    return tempered(s, temperature), tempered(t, temperature), vocab


def _has_softmax(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rows where both logits have a distribution (not all -inf, no inf or NaN entry)."""
    return torch.isfinite(torch.logsumexp(s, -1)) & torch.isfinite(torch.logsumexp(t, -1))


def kd_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    vocab: Optional[int] = None,
    loss_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-row divergence ``[rows]`` of 2-D logits, computed in ``dtype``."""
    s, t, vocab = _tempered(student, teacher, vocab, temperature, dtype)
    if labels is None:
        sk, tk = s, t
    else:
        # Ignored rows get stand-in logits (zeros) and a loss of 0 by masks, not by indexing:
        # whatever they hold gives no NaN gradient, and the code has no data-dependent shapes
        # (the op's backward runs it under torch.compile's tracing).
        keep = (labels != ignore_index).unsqueeze(1)
        sk, tk = torch.where(keep, s, torch.zeros_like(s)), torch.where(keep, t, torch.zeros_like(t))
    ls = torch.log_softmax(sk, dim=-1)
    lt = torch.log_softmax(tk, dim=-1)
    values = divergence_terms(kind, ls, lt, beta).sum(-1) * loss_scale
    # No distribution (all -inf, an inf or a NaN): NaN, and a NaN gradient over the row.
    defined = _has_softmax(sk, tk)
    nan_where_undefined = torch.where(defined, 0.0, math.nan).to(values.dtype)
    values = torch.where(defined, values, (sk.sum(-1) + tk.sum(-1)) * nan_where_undefined)
    return values if labels is None else torch.where(keep.squeeze(1), values, torch.zeros_like(values))


def _entry_weights(kind: str, ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    """``w = q * dD/dq`` per entry (up to a multiple of q, which cancels in the gradient)."""
    q, p = ls.exp(), lt.exp()
    zero = torch.zeros_like(q)
    if kind == "forward_kl" or (kind == "skew_kl" and beta == 0):  # (skew KL at 0 is forward KL)
        return -p
    if kind == "reverse_kl":
        return torch.where(q > 0, q * (ls - torch.where(q > 0, lt, zero)), zero)
    if kind == "jsd":
        lm = _log_mix(beta, lt, ls)
        weight = (1 - beta) * q  # inside the 0 log 0 convention, as in divergence_terms
        return torch.where(weight > 0, weight * (ls - torch.where(weight > 0, lm, zero)), zero)
    if kind == "tvd":
        return 0.5 * q * torch.sign(q - p)
    if kind == "skew_kl":
        lm = _log_mix(beta, lt, ls)
        # in log space: a student probability that underflows still has its weight (-p at beta 0)
        live = (ls > -math.inf) & (lt > -math.inf)
        return torch.where(live, -(1 - beta) * torch.exp(torch.where(live, ls + lt - lm, zero)), zero)
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def kd_divergence_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    vocab: Optional[int] = None,
    loss_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``d kd_divergence(...)[r] / d student[r, :]`` in closed form, shaped like ``student``.

    ``(w - q * sum(w)) * loss_scale / temperature`` with ``w = q * dD/dq`` per entry: the
    softmax's Jacobian applied to the divergence's derivative. The reference backend uses it
    (no autograd runs inside a custom op); the tests check it against autograd through
    :func:`kd_divergence`. Ignored rows and padding columns get 0; rows without a softmax, NaN.
    """
    s, t, vocab = _tempered(student, teacher, vocab, temperature, dtype)
    ls, lt = torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
    w = _entry_weights(kind, ls, lt, beta)
    g = (w - ls.exp() * w.sum(-1, keepdim=True)) * (loss_scale / temperature)
    g = torch.where(_has_softmax(s, t).unsqueeze(1), g, math.nan)
    if labels is not None:
        g = torch.where((labels != ignore_index).unsqueeze(1), g, 0.0)
    return torch.nn.functional.pad(g, (0, student.shape[1] - vocab))  # padding columns: 0
