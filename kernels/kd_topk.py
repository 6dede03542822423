"""Triton version of the fused top-k KD (same math as csrc/kd_topk/kd_topk.h).

One program per row (token): an online log-sum-exp sweep over the student's logits; the k
stored entries (teacher mass, entry losses and weights) in chunks of KB; where a live remainder
needs the student's mass outside the ids, sweeps over the outside columns (re-summed relative to
the largest outside entry when the sum, relative to the row's maximum, is below kTinyOutside);
and, when asked, a gradient sweep writing ``grad_entry`` at every column followed, after a
barrier, by a scatter of ``A q_id - w_i`` (times the scale) at the ids. Ignored rows only write
zeros; a row without a distribution, or with an id outside the vocabulary (kd_topk.h:
id_in_range; ids are checked on the host only where that costs no sync), writes NaN without
reading at its ids.

Membership ("is column j one of the row's ids") in the outside sweeps: the columns are taken as
a [W, 32] tile (W words of 32 columns) and the tile's bitmap of ids, one int32 word per row of
the tile, is built from the ids in chunks of KBLOCK ([W, KBLOCK] compares of word indices,
OR-reduced), then read by a broadcast shift: vocab * k / 32 compares per sweep instead of the
vocab * k of comparing every column with every id.

Scalars that need expm1 / log1p (log of the teacher's remaining mass) are computed in float64,
where exp(a) - 1 and log(1 - exp(a)) keep float32's accuracy (Triton's interpreter has no
libdevice); the entry losses and weights are summed in float64 as the CPU launcher does.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .kd_divergence import tempered_shift

_MAX_BLOCK = 4096
_MAX_KB = 1024
_KBLOCK = 32

NEG_INF = tl.constexpr(float("-inf"))
INF = tl.constexpr(float("inf"))
# kd_topk.h: kTinyOutside, and the float32 epsilon of the rounding bound of log_remainder
TINY_OUTSIDE = tl.constexpr(1e-30)
FLT_EPS = tl.constexpr(1.1920929e-07)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _logit_at(s_row, ids, mask):
    """The student's logits at the ids (checked to lie in the vocabulary before)."""
    return tl.load(s_row + ids, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _outside_tile(ids_row, k, start, W: tl.constexpr, KBLOCK: tl.constexpr):
    """[W, 32] mask: column start + 32 w + b is not one of the row's ids."""
    wr = tl.arange(0, W)
    kr = tl.arange(0, KBLOCK)
    words = tl.zeros([W], dtype=tl.int32)
    for kc in range(0, k, KBLOCK):
        i = kc + kr
        d = tl.load(ids_row + i, mask=i < k, other=-1) - start
        inside = (d >= 0) & (d < W * 32)
        bit = tl.where(inside, tl.full([KBLOCK], 1, tl.int64) << (d & 31), 0).to(tl.int32)
        hit = ((d >> 5)[None, :] == wr[:, None]) & inside[None, :]
        words = words | tl.reduce(tl.where(hit, bit[None, :], 0), 1, _or)
    b = tl.arange(0, 32)
    return ((words[:, None] >> b[None, :]) & 1) == 0


@triton.jit
def _outside_reduce(s_row, ids_row, vocab, k, inv_t, ref, DO_MAX: tl.constexpr, W: tl.constexpr,
                    KBLOCK: tl.constexpr):
    """Over the columns outside the ids: max of the logits s (DO_MAX), else sum of exp((s - ref) / T)."""
    tile = W * 32
    j0 = tl.arange(0, W)[:, None] * 32 + tl.arange(0, 32)[None, :]
    if DO_MAX:
        acc = tl.cast(NEG_INF, tl.float32)
    else:
        acc = tl.cast(0.0, tl.float32)
    for start in range(0, vocab, tile):
        j = start + j0
        out = _outside_tile(ids_row, k, start, W, KBLOCK) & (j < vocab)
        x = tl.load(s_row + j, mask=out, other=NEG_INF).to(tl.float32)
        if DO_MAX:
            acc = tl.maximum(acc, tl.max(tl.max(x, 1), 0))
        else:
            acc += tl.sum(tl.sum(tl.exp(tempered_shift(x, ref, inv_t)), 1), 0)
    return acc


@triton.jit
def _entry_log_weight(lp_row, i, km, tm, log_tz, log_mass, nan, RENORM: tl.constexpr):
    """The stored entries' log-weights at ``i``: the log-probabilities clamped to <= 0
    (clamp_logprob, NaN kept), renormalised when asked, ``(lp - tm) - log(tz)`` with their max
    ``tm`` taken off first (teacher_log_weight; NaN where there is no mass or it is NaN)."""
    lp = tl.load(lp_row + i, mask=km, other=NEG_INF)
    lp = tl.where(lp > 0.0, 0.0, lp)
    if RENORM:
        log_w = tl.where(log_mass > NEG_INF, (lp - tm) - log_tz, nan)
    else:
        log_w = lp
    return log_w


@triton.jit
def _kd_topk_kernel(
    s_ptr, ids_ptr, lp_ptr, labels_ptr, loss_ptr, grad_ptr,
    s_stride, g_stride, vocab, k, ignore_index, inv_t, loss_scale, stored_eps,
    RENORM: tl.constexpr, HAS_LABELS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, KB: tl.constexpr, KBLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    ids_row = ids_ptr + row * k
    lp_row = lp_ptr + row * k
    g_row = grad_ptr + row * g_stride
    cols = tl.arange(0, BLOCK)
    kr = tl.arange(0, KB)
    W: tl.constexpr = BLOCK // 32
    # NaN made in the kernel: a NaN global would fail Triton's "global changed" check (nan != nan)
    nan = INF - INF
    scale = loss_scale * inv_t

    ignored = row < 0  # (False)
    if HAS_LABELS:
        ignored = tl.load(labels_ptr + row) == ignore_index
    if ignored:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, vocab, BLOCK):
                j = start + cols
                tl.store(g_row + j, tl.zeros([BLOCK], tl.float32).to(grad_ptr.dtype.element_ty), mask=j < vocab)
    else:
        # Sweep 1: online (max, sum exp((s - max) / T)) of the logits s, the max in logit units.
        # tl.max passes NaN over: a NaN counts as +inf here, so that its row is left without a
        # finite normaliser (and gets NaN).
        m = tl.cast(NEG_INF, tl.float32)
        zs = tl.cast(0.0, tl.float32)
        for start in range(0, vocab, BLOCK):
            j = start + cols
            s = tl.load(s_row + j, mask=j < vocab, other=NEG_INF).to(tl.float32)
            m_new = tl.maximum(m, tl.max(tl.where(s != s, INF, s), 0))
            zs = tl.where(m_new == NEG_INF, 0.0, zs * tl.exp(tempered_shift(m, m_new, inv_t))
                          + tl.sum(tl.exp(tempered_shift(s, m_new, inv_t)), 0))
            m = m_new
        log_z = tl.log(zs)
        # The stored entries: running max of lp, sum exp(lp - max), and the rounding terms
        # sum p |lp| (teacher_push); a NaN entry makes the mass NaN. An id outside the
        # vocabulary (ids are checked on the CPU only) makes the row NaN, without reading or
        # writing outside the row.
        tm = tl.cast(NEG_INF, tl.float32)
        tz = tl.cast(0.0, tl.float32)
        rounding = tl.cast(0.0, tl.float32)
        any_nan = tl.cast(0.0, tl.float32)
        bad_id = tl.cast(0.0, tl.float32)
        for kc in range(0, k, KB):
            i = kc + kr
            lp = tl.load(lp_row + i, mask=i < k, other=NEG_INF)
            idv = tl.load(ids_row + i, mask=i < k, other=0)
            bad_id = tl.maximum(bad_id, tl.max(tl.where((idv < 0) | (idv >= vocab), 1.0, 0.0), 0))
            lp = tl.where(lp > 0.0, 0.0, lp)  # clamp_logprob (NaN kept)
            p = tl.exp(lp)
            rounding += tl.sum(tl.where(p > 0.0, -p * lp, 0.0), 0)
            any_nan = tl.maximum(any_nan, tl.max(tl.where(lp != lp, 1.0, 0.0), 0))
            lpc = tl.where(lp != lp, NEG_INF, lp)
            tm_new = tl.maximum(tm, tl.max(lpc, 0))
            tz = tl.where(tm_new == NEG_INF, 0.0, tz * tl.exp(tm - tm_new) + tl.sum(tl.exp(lpc - tm_new), 0))
            tm = tm_new
        log_tz = tl.log(tz)
        log_mass = tl.where(tm == NEG_INF, NEG_INF, tm + log_tz)
        log_mass = tl.where(any_nan > 0.0, nan, log_mass)
        defined = (tl.abs(m) < INF) & (tl.abs(log_z) < INF) & (bad_id == 0.0)
        if defined:
            # log_remainder: -inf when renormalising, when k == vocab, or within the rounding of
            # the stored entries; expm1 and log1mexp in float64.
            if RENORM:
                log_r = tl.cast(NEG_INF, tl.float32)
            else:
                lm64 = log_mass.to(tl.float64)
                em1 = tl.exp(lm64) - 1.0
                bound = stored_eps * rounding + tl.cast(k, tl.float32) * FLT_EPS
                real = ((-em1).to(tl.float32) > bound) | (log_mass != log_mass)
                log1mexp = tl.log(-em1).to(tl.float32)
                log_r = tl.where(real & (k < vocab), log1mexp, NEG_INF)
            r = tl.exp(log_r)

            # The student's mass outside the ids (log Q), summed directly, where a live remainder
            # needs it.
            m_out = m
            rare = tl.cast(0.0, tl.float32)
            inv_z_out = tl.cast(0.0, tl.float32)
            log_q_rest = tl.cast(NEG_INF, tl.float32)
            if r > 0.0:
                z_out = _outside_reduce(s_row, ids_row, vocab, k, inv_t, m, False, W, KBLOCK)
                if z_out < TINY_OUTSIDE:
                    rare = tl.cast(1.0, tl.float32)
                    m_out = _outside_reduce(s_row, ids_row, vocab, k, inv_t, m, True, W, KBLOCK)
                    z_out = tl.cast(0.0, tl.float32)
                    if m_out > NEG_INF:
                        z_out = _outside_reduce(s_row, ids_row, vocab, k, inv_t, m_out, False, W, KBLOCK)
                log_q_rest = tl.where(z_out > 0.0, tempered_shift(m_out, m, inv_t) + (tl.log(z_out) - log_z), NEG_INF)
                inv_z_out = tl.where(z_out > 0.0, 1.0 / z_out, 0.0)

            # The entries' losses and weights (entry_loss), summed in float64.
            loss = tl.cast(0.0, tl.float64)
            weight_sum = tl.cast(0.0, tl.float64)
            for kc in range(0, k, KB):
                i = kc + kr
                km = i < k
                log_w = _entry_log_weight(lp_row, i, km, tm, log_tz, log_mass, nan, RENORM)
                x_id = _logit_at(s_row, tl.load(ids_row + i, mask=km, other=0), km)
                w = tl.exp(log_w)
                lq = tempered_shift(x_id, m, inv_t) - log_z
                term = tl.where(w > 0.0, w * (log_w - lq), tl.where(w == 0.0, 0.0, w))
                loss += tl.sum(tl.where(km, term, 0.0).to(tl.float64), 0)
                weight_sum += tl.sum(tl.where(km & (w > 0.0), w, 0.0).to(tl.float64), 0)
            rem = tl.where(r > 0.0, r * (log_r - log_q_rest), tl.where(r == 0.0, 0.0, r))
            loss += rem.to(tl.float64)
            tl.store(loss_ptr + row, loss.to(tl.float32) * loss_scale)

            if WRITE_GRAD:
                # grad_entry at every column, A q_j - B exp((s_j - m_out) / T) / Z_out; the ids
                # are overwritten below.
                b = tl.where((r > 0.0) & (log_q_rest > NEG_INF), r, 0.0)
                a = weight_sum.to(tl.float32) + b
                bz = b * inv_z_out
                inv_z = 1.0 / zs
                for start in range(0, vocab, BLOCK):
                    j = start + cols
                    mask = j < vocab
                    x = tl.load(s_row + j, mask=mask, other=NEG_INF).to(tl.float32)
                    e = tl.exp(tempered_shift(x, m, inv_t))
                    out = tl.where(bz > 0.0, tl.where(rare > 0.0, tl.exp(tempered_shift(x, m_out, inv_t)), e), 0.0)
                    g = (a * (e * inv_z) - bz * out) * scale
                    tl.store(g_row + j, g.to(grad_ptr.dtype.element_ty), mask=mask)
                tl.debug_barrier()  # the sweep's stores at the ids are done (the ids of a row are distinct)
                for kc in range(0, k, KB):
                    i = kc + kr
                    km = i < k
                    log_w = _entry_log_weight(lp_row, i, km, tm, log_tz, log_mass, nan, RENORM)
                    ids = tl.load(ids_row + i, mask=km, other=0)
                    x_id = _logit_at(s_row, ids, km)
                    w = tl.exp(log_w)
                    weight = tl.where(w > 0.0, w, 0.0)
                    g = a * tl.exp(tempered_shift(x_id, m, inv_t) - log_z) * scale - weight * scale
                    tl.store(g_row + ids, g.to(grad_ptr.dtype.element_ty), mask=km)
        else:
            tl.store(loss_ptr + row, nan)
            if WRITE_GRAD:
                for start in range(0, vocab, BLOCK):
                    j = start + cols
                    tl.store(g_row + j, (tl.zeros([BLOCK], tl.float32) + nan).to(grad_ptr.dtype.element_ty),
                             mask=j < vocab)


def launch(student, ids, logprobs, labels, row_loss, grad, renormalize, inv_t, ignore_index, loss_scale, stored_eps):
    """Run the kernel: ``student`` [rows, vocab] (rows strided, entries adjacent), ``ids`` int64
    and ``logprobs`` float32 [rows, k] contiguous, ``labels`` int64 [rows] or None, ``row_loss``
    float32 [rows], ``grad`` (the student's shape, rows strided, entries adjacent) or None."""
    rows, vocab = student.shape
    k = ids.shape[1]
    if rows == 0:
        return
    block = max(32, min(_MAX_BLOCK, triton.next_power_of_2(vocab)))
    kb = max(16, min(_MAX_KB, triton.next_power_of_2(k)))
    kblock = 16 if k <= 16 else _KBLOCK
    _kd_topk_kernel[(rows,)](
        student, ids, logprobs, labels if labels is not None else row_loss, row_loss,
        grad if grad is not None else row_loss,
        student.stride(0), grad.stride(0) if grad is not None else 0, vocab, k, ignore_index,
        inv_t, loss_scale, stored_eps,
        RENORM=bool(renormalize), HAS_LABELS=labels is not None, WRITE_GRAD=grad is not None,
        BLOCK=block, KB=kb, KBLOCK=kblock,
        num_warps=8 if block >= 2048 else 4,
    )
