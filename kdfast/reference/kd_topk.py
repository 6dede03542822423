"""Specification of the fused top-k KD (see csrc/kd_topk/kd_topk.h).

Per row r (token), with ``q = softmax(student / T)`` over the vocabulary, the teacher's ``k``
stored ids and log-probabilities ``lp`` (at most 0; ``p = exp(lp)``):

- ``remainder="bucket"``: the forward KL between the two (k + 1)-outcome distributions that
  keep the k ids and lump everything else into one outcome: ``sum_i p_i (lp_i - log q_id_i) +
  r (log r - log Q)`` with ``r = 1 - sum p`` (0 when within the rounding of the stored
  log-probabilities, ``stored_eps`` per unit of each, and absent when k equals the vocabulary)
  and ``Q`` the student's mass outside the ids;
- ``remainder="renormalize"``: ``sum_i p^_i (log p^_i - log q_id_i)`` with ``p^ = p / sum p``;

times ``loss_scale``, with ``0 log 0 = 0``. Rows whose label is ``ignore_index`` give 0 (and no
NaN gradient, whatever they hold). A student row without a softmax (all -inf, or an inf or NaN
entry) gives NaN. Gradients come from autograd through :func:`kd_topk` (the student's and the
stored log-probabilities'); :func:`kd_topk_grad` gives the student's in closed form.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .kd_divergence import tempered

REMAINDERS = ("bucket", "renormalize")


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, accurate at both ends (Maechler 2012)."""
    a = a.clamp(max=0.0)
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def stored_rounding(p: torch.Tensor, lp: torch.Tensor, stored_eps: float) -> torch.Tensor:
    """How far storing the log-probabilities can move their probabilities' sum per position,
    the bound under which a remainder counts as 0: each ``p_i = exp(lp_i)`` is off by up to
    ``p_i |lp_i|`` units of the stored dtype (bfloat16 holds lp to 3 digits), and their float32
    sum by k float32 units. (A coarser bound drops real remainders: ``p_i (1 + |lp_i|)`` took a
    confident token's 0.5% in bfloat16 for rounding, and the loss went negative.) An entry of
    probability 0 (lp = -inf) adds nothing."""
    per_entry = torch.where(p > 0, -p * lp, torch.zeros_like(p))
    return stored_eps * per_entry.sum(-1) + p.shape[-1] * torch.finfo(torch.float32).eps


def mass_rounding(p: torch.Tensor, lp: torch.Tensor, stored_eps: float) -> torch.Tensor:
    """The tolerance of the stored mass's checks (at most 1; with k equal to the vocabulary,
    1): :func:`stored_rounding` plus ``p_i`` units per entry, for log-probabilities computed in
    the stored dtype (a bf16 model's log-softmax), whose error is not relative to lp alone. A
    coarse ``k * eps`` of bfloat16 (0.5 at k = 64) would let a mass of 1.6 through."""
    per_entry = torch.where(p > 0, p, torch.zeros_like(p))
    return stored_rounding(p, lp, stored_eps) + stored_eps * per_entry.sum(-1)


def renormalized(lp: torch.Tensor) -> torch.Tensor:
    """The log-probabilities renormalised to a mass of 1 per position, ``(lp - max) - log(sum
    exp(lp - max))``: the max taken off first (``lp - logsumexp(lp)`` rounds the sum's log away
    where lp is -1e8, and every weight came out 1); NaN where there is no mass to renormalise
    or an entry is NaN."""
    m = lp.amax(dim=-1, keepdim=True).detach()
    shifted = lp - torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    log_z = torch.log(torch.exp(shifted).sum(-1, keepdim=True))
    return torch.where(log_z > -math.inf, shifted - log_z, torch.full_like(shifted, math.nan))


def xlogy_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p * (log_p - log_q)``, 0 where ``p`` is 0 and NaN where it is NaN (a NaN teacher entry
    must not vanish from the loss while its gradient is NaN). Where ``p`` is 0 the logs are
    replaced before the product: 0 times their -inf has a NaN gradient even where() drops it."""
    kept = p > 0
    zero = torch.zeros_like(p)
    return torch.where(kept, p * (torch.where(kept, log_p, zero) - torch.where(kept, log_q, zero)),
                       torch.where(p == 0, zero, p))


def _log_sum_exp(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp(x, -1)`` as ``max + log(sum(exp(x - max)))`` with the max held constant:
    torch.logsumexp's gradient ``exp(x - result)`` rounds ``result`` to ``x`` where the max is
    1e30 in size (every entry's share comes out 1); ``exp(x - max) / sum`` keeps it."""
    m = x.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m.squeeze(-1) + torch.log(torch.exp(x - m).sum(-1))


def _inputs(student, ids, logprobs, labels, ignore_index, temperature, dtype):
    """z = student / T, the ids and the clamped log-probabilities in ``dtype``, ignored rows
    replaced by harmless stand-ins before any math (masking their losses only afterwards
    would still send a NaN gradient back from NaN logits or log-probabilities there), and the
    mask of kept rows (None without labels)."""
    k, vocab = ids.shape[1], student.shape[1]
    z = tempered(student.to(dtype), temperature)
    ids = ids.long()
    lp = logprobs.to(dtype).clamp(max=0.0)
    keep = None if labels is None else labels.reshape(-1).to(torch.int64) != ignore_index
    if keep is not None:
        drop = ~keep.unsqueeze(1)
        z = z.masked_fill(drop, 0.0)  # (not in place: vmap refuses that when only the labels are batched)
        ids = torch.where(drop, torch.arange(k, device=ids.device).clamp(max=vocab - 1), ids)
        lp = lp.masked_fill(drop, -math.log(max(k, 1)))
    return z, ids, lp, keep


def kd_topk(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, labels: Optional[torch.Tensor] = None,
            ignore_index: int = -100, temperature: float = 1.0, remainder: str = "bucket", stored_eps: float = 0.0,
            loss_scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row losses ``[rows]`` in ``dtype`` of a ``[rows, vocab]`` student against ``[rows, k]``
    stored ids and log-probabilities (``stored_eps``: the machine epsilon of the dtype they
    were stored in, for the remainder's rounding test)."""
    k, vocab = ids.shape[1], student.shape[1]
    z, ids, lp, keep = _inputs(student, ids, logprobs, labels, ignore_index, temperature, dtype)
    log_q_all = torch.log_softmax(z, dim=-1)
    log_q = log_q_all.gather(1, ids)
    log_mass = torch.logsumexp(lp, dim=-1)
    if remainder == "renormalize":
        # (a position with no stored mass has nothing to renormalise: NaN, refused on the CPU)
        lp_hat = renormalized(lp)
        rows = xlogy_ratio(lp_hat.exp(), lp_hat, log_q).sum(-1)
    else:
        p = lp.exp()
        rows = xlogy_ratio(p, lp, log_q).sum(-1)
        if k < vocab:  # with k == vocab there is no remainder (the stored mass is 1 up to rounding)
            # The student's mass outside the k ids, summed directly rather than as
            # 1 - sum(inside), which would lose everything below float rounding. A student with
            # no mass there (all -inf) gets log 0 without logsumexp's NaN gradient for an all
            # -inf row.
            outside = z.scatter(1, ids, -math.inf)
            has_rest = (outside > -math.inf).any(dim=-1)
            log_out = _log_sum_exp(torch.where(has_rest.unsqueeze(1), outside, torch.zeros_like(outside)))
            log_q_rest = torch.where(has_rest, log_out - _log_sum_exp(z), torch.full_like(log_out, -math.inf))
            # A teacher remainder within the rounding of the stored log-probabilities is 0: not an
            # infinite KL against a student with no mass outside the k ids, nor a huge one against
            # a student that masks them with a large negative logit (NaN stays NaN).
            # The test is made before the log, so a dropped remainder sends no gradient through it
            # (log 0's inf times where()'s zero would be NaN in the teacher's gradient).
            real = (-torch.expm1(log_mass) > stored_rounding(p, lp, stored_eps)) | log_mass.isnan()
            log_r = torch.where(real, log1mexp(torch.where(real, log_mass, torch.full_like(log_mass, -1.0))),
                                torch.full_like(log_mass, -math.inf))
            rows = rows + xlogy_ratio(log_r.exp(), log_r, log_q_rest)
    # a student row without a softmax: NaN (an all -inf one met by a teacher with no mass would
    # give inf or 0 above)
    rows = torch.where(torch.isfinite(torch.logsumexp(z.detach(), dim=-1)), rows, torch.full_like(rows, math.nan))
    rows = rows * loss_scale
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    return rows


@torch.no_grad()
def kd_topk_grad(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                 labels: Optional[torch.Tensor] = None, ignore_index: int = -100, temperature: float = 1.0,
                 remainder: str = "bucket", stored_eps: float = 0.0, loss_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``d kd_topk(...)[r] / d student[r, :]`` in closed form, in ``dtype``:
    ``(A q_j - B [j not an id] q_j / Q - sum_i [id_i == j] w_i) * loss_scale / T``, with ``w_i``
    the teacher weights (``p`` or ``p^``, 0 where 0 or NaN), ``B = r`` where the remainder term
    has a gradient (r > 0 and Q > 0) and ``A = sum w + B`` (the autograd gradient of
    :func:`kd_topk`, which the tests check)."""
    k, vocab = ids.shape[1], student.shape[1]
    z, ids, lp, keep = _inputs(student, ids, logprobs, labels, ignore_index, temperature, dtype)
    log_q_all = torch.log_softmax(z, dim=-1)
    q = log_q_all.exp()
    log_mass = torch.logsumexp(lp, dim=-1)
    if remainder == "renormalize":
        w = renormalized(lp).exp()
    else:
        w = lp.exp()
    w = torch.where(w > 0, w, torch.zeros_like(w))  # (NaN and 0 weights send no gradient)
    a = w.sum(-1)
    grad = a.unsqueeze(1) * q
    if remainder == "bucket" and k < vocab:
        p = lp.exp()
        real = (-torch.expm1(log_mass) > stored_rounding(p, lp, stored_eps)) | log_mass.isnan()
        r = torch.where(real, -torch.expm1(log_mass), torch.zeros_like(log_mass))
        outside = z.scatter(1, ids, -math.inf)
        has_rest = (outside > -math.inf).any(dim=-1)
        b = torch.where((r > 0) & has_rest, r, torch.zeros_like(r))
        # q_j / Q outside the ids: the softmax of the outside logits themselves (from log q, logits
        # of -1e30 would lose their differences: every entry's share came out 1)
        out_prob = torch.where(has_rest.unsqueeze(1),
                               torch.softmax(torch.where(has_rest.unsqueeze(1), outside, torch.zeros_like(outside)), -1),
                               torch.zeros_like(q))
        grad = grad + b.unsqueeze(1) * (q - out_prob)
    grad = grad.scatter_add(1, ids, -w)
    # a student row without a softmax: NaN everywhere
    grad = torch.where(log_q_all.isnan().any(-1, keepdim=True), torch.full_like(grad, math.nan), grad)
    grad = grad * (loss_scale / temperature)
    if keep is not None:
        grad = torch.where(keep.unsqueeze(1), grad, torch.zeros_like(grad))
    return grad
