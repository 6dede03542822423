"""Triton version of the fused KD divergences (same math as csrc/kd_divergence/kd_divergence.h).

One program per row: an online log-sum-exp sweep over the vocabulary for both logits, a
sweep for the loss and sum(w), and, when asked, a sweep writing the student's gradient
``(w - q * sum(w)) * loss_scale / T`` (forward KL, whose sum(w) is -1, writes it in the second
sweep).
"""
from __future__ import annotations

import triton
import triton.language as tl

_MAX_BLOCK = 4096

NEG_INF = tl.constexpr(float("-inf"))
INF = tl.constexpr(float("inf"))


@triton.jit
def tempered_shift(x, m, inv_t):
    """(x - m) / T without overflow at either end (tempered_shift in csrc/common/kd_common.h)."""
    return tl.where(inv_t > 1.0, (x - m) * inv_t, x * inv_t - m * inv_t)


@triton.jit
def _weighted_log_ratio(p, a, b):
    return tl.where(p > 0.0, p * (a - b), 0.0)


@triton.jit
def _log_mixture(ls, lt, q, p, beta, rest, log_beta, log_rest):
    """(log m, (1 - beta) q / m) for m = beta p + (1 - beta) q, as log_mixture in the C++ header."""
    a = log_beta + lt
    b = log_rest + ls
    va = beta * p
    vb = rest * q
    hi = tl.maximum(a, b)
    big = tl.maximum(va, vb)
    small = tl.minimum(va, vb)
    m = va + vb
    share = tl.where(m > 0.0, vb / tl.where(m > 0.0, m, 1.0), tl.where(beta > 0.0, 0.0, 1.0))  # (1 at beta 0)
    r = tl.where(big > 0.0, small / tl.where(big > 0.0, big, 1.0), 0.0)
    # log1p(r) for r in [0, 1] (log(1 + r) would lose a small r to rounding: an absolute error of
    # up to 6e-8 in log m, the whole loss of nearly equal rows at beta near 0 or 1): Goldberg's
    # log(u) * r / (u - 1), u = 1 + r, exact where u rounds to 1
    u = 1.0 + r
    lm = hi + tl.where(u == 1.0, r, tl.log(u) * (r / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(hi == NEG_INF, hi, lm), share


@triton.jit
def _term(ls, lt, q, p, beta, rest, log_beta, log_rest, KIND: tl.constexpr):
    """(entry's divergence, w = q dD/dq) as in divergence_term."""
    if KIND == 0:  # forward KL(p || q)
        loss = _weighted_log_ratio(p, lt, ls)
        w = -p
    elif KIND == 1:  # reverse KL(q || p)
        loss = _weighted_log_ratio(q, ls, lt)
        w = loss
    elif KIND == 2:  # generalized JSD
        lm, share = _log_mixture(ls, lt, q, p, beta, rest, log_beta, log_rest)
        w = _weighted_log_ratio(rest * q, ls, lm)  # weights inside 0 log 0, as in the C++ term
        loss = _weighted_log_ratio(beta * p, lt, lm) + w
    elif KIND == 3:  # total variation
        loss = 0.5 * tl.abs(q - p)
        w = tl.where(q > p, 0.5 * q, tl.where(q < p, -0.5 * q, 0.0))  # the sign by comparison, as in C++
    else:  # skew KL(p || beta p + (1 - beta) q)
        lm, share = _log_mixture(ls, lt, q, p, beta, rest, log_beta, log_rest)
        loss = _weighted_log_ratio(p, lt, lm)
        w = -p * share
    return loss, w


@triton.jit
def _kd_divergence_kernel(
    s_ptr, t_ptr, labels_ptr, loss_ptr, grad_ptr,
    s_stride, t_stride, g_stride, vocab, grad_cols, ignore_index,
    beta, rest, log_beta, log_rest, inv_t, loss_scale,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    cols = tl.arange(0, BLOCK)

    # Sweep 1: online (max, sum exp((x - max) / T)) of both rows, the maxima in logit units.
    ms = tl.cast(NEG_INF, tl.float32)
    zs = tl.cast(0.0, tl.float32)
    mt = tl.cast(NEG_INF, tl.float32)
    zt = tl.cast(0.0, tl.float32)
    for start in range(0, vocab, BLOCK):
        j = start + cols
        mask = j < vocab
        s = tl.load(s_row + j, mask=mask, other=NEG_INF).to(tl.float32)
        t = tl.load(t_row + j, mask=mask, other=NEG_INF).to(tl.float32)
        # tl.max passes NaN over: a NaN counts as +inf here, so that its row is left without a
        # finite normaliser (and gets NaN) even where the rest of its block is -inf and skipped.
        ms_new = tl.maximum(ms, tl.max(tl.where(s != s, INF, s), 0))
        mt_new = tl.maximum(mt, tl.max(tl.where(t != t, INF, t), 0))
        zs = tl.where(ms_new == NEG_INF, 0.0, zs * tl.exp(tempered_shift(ms, ms_new, inv_t))
                      + tl.sum(tl.exp(tempered_shift(s, ms_new, inv_t)), 0))
        zt = tl.where(mt_new == NEG_INF, 0.0, zt * tl.exp(tempered_shift(mt, mt_new, inv_t))
                      + tl.sum(tl.exp(tempered_shift(t, mt_new, inv_t)), 0))
        ms = ms_new
        mt = mt_new
    # log-probabilities as (x - m) / T - log z (see LogNorm in kd_divergence.h); a row without a
    # finite normaliser has no distribution and gets NaN.
    log_zs = tl.log(zs)
    log_zt = tl.log(zt)
    defined = (tl.abs(ms) < INF) & (tl.abs(log_zs) < INF) & (tl.abs(mt) < INF) & (tl.abs(log_zt) < INF)

    keep = tl.cast(1.0, tl.float32)
    if HAS_LABELS:
        keep = tl.where(tl.load(labels_ptr + row) == ignore_index, 0.0, 1.0)
    # NaN made in the kernel: a NaN global would fail Triton's "global changed" check (nan != nan)
    nan = INF - INF
    scale = loss_scale * inv_t
    g_row = grad_ptr + row * g_stride
    # Forward KL's sum(w) is -1 on a row with a distribution (kForwardKLSumW in
    # kd_divergence.h): its gradient (w + q) is written in sweep 2, which then also covers the
    # padding columns (vocab <= j < grad_cols, gradient 0), and there is no sweep 3.
    GRAD_NOW: tl.constexpr = WRITE_GRAD and KIND == 0

    # Sweep 2: the divergence and sum(w).
    loss = tl.cast(0.0, tl.float32)
    sum_w = tl.cast(0.0, tl.float32)
    for start in range(0, grad_cols if GRAD_NOW else vocab, BLOCK):
        j = start + cols
        mask = j < vocab
        s = tl.load(s_row + j, mask=mask, other=NEG_INF).to(tl.float32)
        t = tl.load(t_row + j, mask=mask, other=NEG_INF).to(tl.float32)
        ls = tempered_shift(s, ms, inv_t) - log_zs
        lt = tempered_shift(t, mt, inv_t) - log_zt
        q = tl.exp(ls)
        term, w = _term(ls, lt, q, tl.exp(lt), beta, rest, log_beta, log_rest, KIND)
        loss += tl.sum(tl.where(mask, term, 0.0), 0)
        sum_w += tl.sum(tl.where(mask, w, 0.0), 0)
        if GRAD_NOW:
            g = tl.where(defined, (w + q) * scale, nan)
            g = tl.where(keep > 0.0, tl.where(mask, g, 0.0), 0.0)
            tl.store(g_row + j, g.to(grad_ptr.dtype.element_ty), mask=j < grad_cols)

    loss = tl.where(defined, loss * loss_scale, nan)
    tl.store(loss_ptr + row, tl.where(keep > 0.0, loss, 0.0))

    if WRITE_GRAD and not GRAD_NOW:
        # Sweep 3: the gradient; padding columns (vocab <= j < grad_cols) get 0.
        for start in range(0, grad_cols, BLOCK):
            j = start + cols
            mask = j < vocab
            s = tl.load(s_row + j, mask=mask, other=NEG_INF).to(tl.float32)
            t = tl.load(t_row + j, mask=mask, other=NEG_INF).to(tl.float32)
            ls = tempered_shift(s, ms, inv_t) - log_zs
            lt = tempered_shift(t, mt, inv_t) - log_zt
            q = tl.exp(ls)
            _, w = _term(ls, lt, q, tl.exp(lt), beta, rest, log_beta, log_rest, KIND)
            g = tl.where(defined, (w - q * sum_w) * scale, nan)
            g = tl.where(keep > 0.0, tl.where(mask, g, 0.0), 0.0)
            tl.store(g_row + j, g.to(grad_ptr.dtype.element_ty), mask=j < grad_cols)


def launch(student, teacher, labels, row_loss, grad, kind, beta, inv_t, ignore_index, vocab, loss_scale):
    """Run the kernel for 2-D logits (rows strided, entries adjacent); ``grad`` may be None."""
    import math

    rows = student.shape[0]
    block = min(_MAX_BLOCK, triton.next_power_of_2(vocab))
    log_beta = math.log(beta) if beta > 0 else float("-inf")
    log_rest = math.log1p(-beta) if beta < 1 else float("-inf")
    rest = 1.0 - beta  # in double here: a float32 beta near 1 loses it
    _kd_divergence_kernel[(rows,)](
        student, teacher, labels if labels is not None else row_loss, row_loss,
        grad if grad is not None else row_loss,
        student.stride(0), teacher.stride(0), grad.stride(0) if grad is not None else 0, vocab,
        grad.shape[1] if grad is not None else 0, ignore_index,
        beta, rest, log_beta, log_rest, inv_t, loss_scale,
        KIND=kind, HAS_LABELS=labels is not None, WRITE_GRAD=grad is not None, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
