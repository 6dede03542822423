"""Triton version of the fused diffusion losses (same math as csrc/diffusion_losses/diffusion_losses.h).

Forward: a flat grid of tiles x samples writes float64 partial sums of each tile to a
workspace, then one program per sample adds them and writes the loss and the backward's
statistic. Backward and the per-sample combination (progressive-distillation target, DDIM
step): one element pass on the same grid. Per-sample scalars are read from a float64
``[6, batch]`` table built by the launcher.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 8192
_BLOCK = 1024
INF = tl.constexpr(float("inf"))


@triton.jit
def _hypot_nonneg(a, c):
    """sqrt(a^2 + c^2) for a, c >= 0 without overflow / underflow of the squares."""
    m = tl.maximum(a, c)
    # a power of two and its inverse (exact), as in the C++ header: a product, not a division
    k = tl.where(m > 1e18, 8.2718061255302767e-25, tl.where(m < 1e-18, 1.2676506002282294e30, 1.0))
    inv_k = tl.where(m > 1e18, 1.2089258196146292e24, tl.where(m < 1e-18, 7.8886090522101181e-31, 1.0))
    a_s = a * k
    c_s = c * k
    return tl.sqrt_rn(a_s * a_s + c_s * c_s) * inv_k


@triton.jit
def _pseudo_huber_element(v0, v1, c):
    """(sqrt(d^2 + c^2) - c in fp64, d / sqrt(d^2 + c^2)) of d = v0 - v1 in fp32, as
    pseudo_huber_element: the halves of d where v0 - v1 overflows."""
    d = v0 - v1
    over = (tl.abs(d) == INF) & (tl.abs(v0) < INF) & (tl.abs(v1) < INF)
    d = tl.where(over, 0.5 * v0 - 0.5 * v1, d)
    c = tl.where(over, 0.5 * c, c)
    a = tl.abs(d)
    h = _hypot_nonneg(a, c)
    inf = a == INF
    live = h > 0.0
    safe_h = tl.where(live, h, 1.0)
    ratio = tl.where(live, a / (safe_h + c), 0.0)
    rel = tl.where(live & (~inf), a / safe_h, 0.0)
    value = tl.where(inf, INF, (a * ratio).to(tl.float64) * tl.where(over, 2.0, 1.0))
    # (an inf or NaN d: a NaN slope, as the C++ kernels')
    slope = tl.where(d < 0.0, -rel, tl.where(d > 0.0, rel, tl.where(d == 0.0, 0.0, d - d)))
    slope = tl.where(inf, d - d, slope)
    return value, slope


@triton.jit
def _is_finite(v):
    return (v - v) == 0.0


@triton.jit
def _coefficients(alpha_t, sigma_t, alpha_s, sigma_s, COMBINATION: tl.constexpr, PREDICTION: tl.constexpr):
    """(ca, cb) of combination_coefficients, float64 scalars."""
    if COMBINATION == 0:  # progressive-distillation target from (x_s, x_t)
        r = sigma_s / sigma_t
        inv_den = 1.0 / (alpha_s - r * alpha_t)
        if PREDICTION == 0:
            u = -alpha_t / sigma_t
            v = 1.0 / sigma_t
        elif PREDICTION == 2:
            u = alpha_t * 0.0 + 1.0
            v = alpha_t * 0.0
        else:
            u = -(alpha_t * alpha_t + sigma_t * sigma_t) / sigma_t
            v = alpha_t / sigma_t
        ca = u * inv_den
        cb = v - u * r * inv_den
    else:  # DDIM step from (x_t, model output)
        if PREDICTION == 0:
            p0 = 1.0 / alpha_t
            q0 = -sigma_t / alpha_t
            p1 = alpha_t * 0.0
            q1 = alpha_t * 0.0 + 1.0
        elif PREDICTION == 2:
            p0 = alpha_t * 0.0
            q0 = alpha_t * 0.0 + 1.0
            p1 = 1.0 / sigma_t
            q1 = -alpha_t / sigma_t
        else:
            n = alpha_t * alpha_t + sigma_t * sigma_t
            p0 = alpha_t / n
            q0 = -sigma_t / n
            p1 = sigma_t / n
            q1 = alpha_t / n
        ca = alpha_s * p0 + sigma_s * p1
        cb = alpha_s * q0 + sigma_s * q1
    return ca, cb


@triton.jit
def _sample_consts(params_ptr, batch, b, KIND: tl.constexpr, PREDICTION: tl.constexpr):
    c = tl.load(params_ptr + 1 * batch + b)
    if KIND == 3:
        ca, cb = _coefficients(tl.load(params_ptr + 2 * batch + b), tl.load(params_ptr + 3 * batch + b),
                               tl.load(params_ptr + 4 * batch + b), tl.load(params_ptr + 5 * batch + b), 0, PREDICTION)
    else:
        ca = c * 0.0
        cb = c * 0.0
    return c, ca, cb


@triton.jit
def _load_inputs(in0, in1, in2, b, s0, s1, s2, idx, mask, NUM_INPUTS: tl.constexpr, SKIP_FIRST: tl.constexpr):
    v1 = tl.load(in1 + b * s1 + idx, mask=mask, other=0.0).to(tl.float32)
    if SKIP_FIRST:
        v0 = v1
    else:
        v0 = tl.load(in0 + b * s0 + idx, mask=mask, other=0.0).to(tl.float32)
    if NUM_INPUTS == 3:
        v2 = tl.load(in2 + b * s2 + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        v2 = v0
    return v0, v1, v2


@triton.jit
def _tile_and_sample(inner, TILE: tl.constexpr):
    """(tile, sample) of this program on the flat grid of tiles x samples (grid axis 1 stops
    at 65535 programs, a batch of toy 2-D points does not)."""
    tiles = tl.cdiv(inner, TILE)
    pid = tl.program_id(0).to(tl.int64)
    return pid % tiles, pid // tiles


@triton.jit
def _reduce_kernel(in0, in1, in2, s0, s1, s2, params_ptr, ws_ptr, batch, inner, tiles,
                   KIND: tl.constexpr, PREDICTION: tl.constexpr, NUM_INPUTS: tl.constexpr,
                   TILE: tl.constexpr, BLOCK: tl.constexpr):
    tile, b = _tile_and_sample(inner, TILE)
    c, ca, cb = _sample_consts(params_ptr, batch, b, KIND, PREDICTION)
    c32 = c.to(tl.float32)
    acc0 = tl.zeros([BLOCK], dtype=tl.float64)
    acc1 = tl.zeros([BLOCK], dtype=tl.float64)
    start = tile.to(tl.int64) * TILE
    for off in range(0, TILE, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < inner
        v0, v1, v2 = _load_inputs(in0, in1, in2, b, s0, s1, s2, idx, mask, NUM_INPUTS, False)
        if KIND == 0:
            d = v0.to(tl.float64) - v1.to(tl.float64)
            t0 = d * d
            t1 = d * 0.0
        elif KIND == 1:
            t0, _ = _pseudo_huber_element(v0, v1, c32)
            t1 = t0 * 0.0
        elif KIND == 2:
            n = v0.to(tl.float64) - v1.to(tl.float64)
            d = v2.to(tl.float64) - v1.to(tl.float64)
            t0 = tl.abs(n)
            t1 = tl.where(_is_finite(d), d * d, 0.0)
        else:
            e = v0.to(tl.float64) - (ca * v1.to(tl.float64) + cb * v2.to(tl.float64))
            t0 = e * e
            t1 = e * 0.0
        acc0 += tl.where(mask, t0, 0.0)
        acc1 += tl.where(mask, t1, 0.0)
    slot = (b * tiles + tile) * 2
    tl.store(ws_ptr + slot, tl.sum(acc0, 0))
    tl.store(ws_ptr + slot + 1, tl.sum(acc1, 0))


@triton.jit
def _finish_kernel(params_ptr, ws_ptr, loss_ptr, aux_ptr, batch, inner, tiles, KIND: tl.constexpr,
                   TBLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    acc0 = tl.zeros([TBLOCK], dtype=tl.float64)
    acc1 = tl.zeros([TBLOCK], dtype=tl.float64)
    for off in range(0, tiles, TBLOCK):
        j = off + tl.arange(0, TBLOCK)
        mask = j < tiles
        acc0 += tl.load(ws_ptr + (b * tiles + j) * 2, mask=mask, other=0.0)
        acc1 += tl.load(ws_ptr + (b * tiles + j) * 2 + 1, mask=mask, other=0.0)
    s0 = tl.sum(acc0, 0)
    s1 = tl.sum(acc1, 0)
    n = tl.cast(inner, tl.float64)  # not inner.to(): an int argument equal to 1 compiles as a constant
    c = tl.load(params_ptr + 1 * batch + b)
    if KIND == 0:
        r = tl.sqrt(s0 + c * c)  # float64: correctly rounded
        stat = r
        raw = tl.where(s0 == INF, INF, tl.where(r == 0.0, 0.0, s0 / tl.where(r == 0.0, 1.0, r + c)))  # NaN kept
    elif KIND == 2:
        norm = s0 / n
        valid = (norm > 0.0) & (norm < INF)
        inv = tl.where(valid, 1.0 / tl.where(valid, norm, 1.0), 0.0)
        stat = inv
        raw = tl.where(inv > 0.0, 0.5 * (s1 * inv) * inv / n, 0.0)
    else:
        stat = s0 * 0.0
        raw = s0 / n
    w = tl.load(params_ptr + b)
    tl.store(loss_ptr + b, tl.where(w == 0.0, 0.0, w * raw).to(tl.float32))
    tl.store(aux_ptr + 2 * b, raw)
    tl.store(aux_ptr + 2 * b + 1, stat)


@triton.jit
def _grad_kernel(in0, in1, in2, s0, s1, s2, params_ptr, aux_ptr, gl_ptr, gl_stride, g0_ptr, g1_ptr, batch, inner,
                 KIND: tl.constexpr, PREDICTION: tl.constexpr, NUM_INPUTS: tl.constexpr, WRITE0: tl.constexpr,
                 WRITE1: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    tile, b = _tile_and_sample(inner, TILE)
    c, ca, cb = _sample_consts(params_ptr, batch, b, KIND, PREDICTION)
    c32 = c.to(tl.float32)
    w = tl.load(params_ptr + b)
    k = tl.where(w == 0.0, 0.0, w * tl.load(gl_ptr + b * gl_stride).to(tl.float64))
    stat = tl.load(aux_ptr + 2 * b + 1)
    n = tl.cast(inner, tl.float64)  # not inner.to(): an int argument equal to 1 compiles as a constant
    if KIND == 0:
        ok = (stat > 0.0) & (stat < INF)
        # a NaN r (a NaN in the sample) makes the sample's whole gradient NaN, as autograd does
        factor = tl.where(stat != stat, stat, tl.where(ok, k / tl.where(ok, stat, 1.0), 0.0))
    elif KIND == 1:
        factor = k / n
    elif KIND == 2:
        factor = k * stat / n
    else:
        factor = 2.0 * k / n
    start = tile.to(tl.int64) * TILE
    for off in range(0, TILE, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < inner
        v0, v1, v2 = _load_inputs(in0, in1, in2, b, s0, s1, s2, idx, mask, NUM_INPUTS, KIND == 2)
        if KIND == 0:
            g = (v0.to(tl.float64) - v1.to(tl.float64)) * factor
        elif KIND == 1:
            _, slope = _pseudo_huber_element(v0, v1, c32)
            g = slope.to(tl.float64) * factor
        elif KIND == 2:
            d = v2.to(tl.float64) - v1.to(tl.float64)
            g = tl.where(_is_finite(d), d * factor, 0.0)
        else:
            g = (v0.to(tl.float64) - (ca * v1.to(tl.float64) + cb * v2.to(tl.float64))) * factor
        g = tl.where(k == 0.0, 0.0, g).to(tl.float32)  # a zero-weight sample: 0, even where it holds NaN
        if WRITE0:
            tl.store(g0_ptr + b * inner + idx, g.to(g0_ptr.dtype.element_ty), mask=mask)
        if WRITE1:
            tl.store(g1_ptr + b * inner + idx, (-g).to(g1_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combination_kernel(a_ptr, b_ptr, sa, sb, params_ptr, out_ptr, batch, inner, COMBINATION: tl.constexpr,
                        PREDICTION: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    tile, b = _tile_and_sample(inner, TILE)
    ca, cb = _coefficients(tl.load(params_ptr + 2 * batch + b), tl.load(params_ptr + 3 * batch + b),
                           tl.load(params_ptr + 4 * batch + b), tl.load(params_ptr + 5 * batch + b), COMBINATION,
                           PREDICTION)
    start = tile.to(tl.int64) * TILE
    for off in range(0, TILE, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < inner
        a = tl.load(a_ptr + b * sa + idx, mask=mask, other=0.0).to(tl.float64)
        v = tl.load(b_ptr + b * sb + idx, mask=mask, other=0.0).to(tl.float64)
        out = (ca * a + cb * v).to(tl.float32)
        tl.store(out_ptr + b * inner + idx, out.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ launchers


def _sizes(x):
    batch = x.shape[0]
    inner = x.numel() // batch
    tile = min(_TILE, triton.next_power_of_2(inner))
    return batch, inner, tile, min(_BLOCK, tile), triton.cdiv(inner, tile)


def _strides(ins, inner):
    return [0 if t is None else (inner if t.is_contiguous() else t.stride(0)) for t in ins]


def _param_table(params, values, batch, device):
    rows = [p.to(torch.float64).expand(batch) if p is not None
            else torch.full((batch,), float(v), dtype=torch.float64, device=device) for p, v in zip(params, values)]
    return torch.stack(rows).contiguous()


def _pointers(ins):
    return [ins[0] if t is None else t for t in ins]


def forward(kind, prediction, ins, params, values, loss, aux):
    x = ins[0]
    batch, inner, tile, block, tiles = _sizes(x)
    table = _param_table(params, values, batch, x.device)
    workspace = torch.empty(2 * batch * tiles, dtype=torch.float64, device=x.device)
    num_inputs = 2 if kind in (0, 1) else 3
    p = _pointers(ins)
    _reduce_kernel[(tiles * batch,)](p[0], p[1], p[2], *_strides(ins, inner), table, workspace, batch, inner, tiles,
                                   KIND=kind, PREDICTION=prediction, NUM_INPUTS=num_inputs, TILE=tile, BLOCK=block)
    _finish_kernel[(batch,)](table, workspace, loss, aux, batch, inner, tiles, KIND=kind,
                             TBLOCK=min(1024, triton.next_power_of_2(tiles)))


def backward(kind, prediction, ins, params, values, aux, grad_loss, gx, g1):
    x = ins[0]
    batch, inner, tile, block, tiles = _sizes(x)
    table = _param_table(params, values, batch, x.device)
    num_inputs = 2 if kind in (0, 1) else 3
    p = _pointers(ins)
    dummy = gx if gx is not None else g1
    _grad_kernel[(tiles * batch,)](p[0], p[1], p[2], *_strides(ins, inner), table, aux, grad_loss, grad_loss.stride(0),
                                 gx if gx is not None else dummy, g1 if g1 is not None else dummy, batch, inner,
                                 KIND=kind, PREDICTION=prediction, NUM_INPUTS=num_inputs, WRITE0=gx is not None,
                                 WRITE1=g1 is not None, TILE=tile, BLOCK=block)


def combination(comb, prediction, ins, params, values, out):
    a, b = ins[0], ins[1]
    batch, inner, tile, block, tiles = _sizes(a)
    table = _param_table(params, values, batch, a.device)
    sa, sb = _strides((a, b), inner)
    _combination_kernel[(tiles * batch,)](a, b, sa, sb, table, out, batch, inner, COMBINATION=comb,
                                        PREDICTION=prediction, TILE=tile, BLOCK=block)
