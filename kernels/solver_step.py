"""Triton version of the fused solver step (same math as csrc/solver_step/solver_step.h)."""
from __future__ import annotations

import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _load(ptr, stride, b, offs, mask, PRESENT: tl.constexpr):
    if PRESENT:
        return tl.load(ptr + b * stride + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.zeros(offs.shape, tl.float32)


@triton.jit
def _clamp_symmetric(v, r):
    # torch.clamp(v, -r, r), as solver_step.h's clamp_symmetric: the upper bound last
    above_lo = tl.where(v < -r, -r, v)
    return tl.where(above_lo > r, r, above_lo)


@triton.jit
def _term(acc, c, src):
    # A zero coefficient drops its term (an unused inf/NaN source stays harmless).
    return tl.where(c != 0.0, acc + c * src, acc)


@triton.jit
def _coef(coef, rows_ptr, b, k: tl.constexpr, ROWS: tl.constexpr):
    # Coefficient k of sample b: its own row's (ROWS), else the batch's row (kernel arguments)
    if ROWS:
        return tl.load(rows_ptr + b * 29 + k)
    return coef[k]


@triton.jit
def _combine(coef, rows_ptr, b, out: tl.constexpr, x, m, u, x0, h0, h1, h2, aux, noise, ROWS: tl.constexpr,
             HAS_H0: tl.constexpr, HAS_H1: tl.constexpr, HAS_H2: tl.constexpr, HAS_AUX: tl.constexpr,
             HAS_NOISE: tl.constexpr):
    # An input not passed adds no term, whatever its coefficient (solver_step.h's absent_sources)
    base: tl.constexpr = 2 + 9 * out
    acc = tl.zeros(x.shape, tl.float32)
    acc = _term(acc, _coef(coef, rows_ptr, b, base, ROWS), x)
    acc = _term(acc, _coef(coef, rows_ptr, b, base + 1, ROWS), m)
    acc = _term(acc, _coef(coef, rows_ptr, b, base + 2, ROWS), u)
    acc = _term(acc, _coef(coef, rows_ptr, b, base + 3, ROWS), x0)
    if HAS_H0:
        acc = _term(acc, _coef(coef, rows_ptr, b, base + 4, ROWS), h0)
    if HAS_H1:
        acc = _term(acc, _coef(coef, rows_ptr, b, base + 5, ROWS), h1)
    if HAS_H2:
        acc = _term(acc, _coef(coef, rows_ptr, b, base + 6, ROWS), h2)
    if HAS_AUX:
        acc = _term(acc, _coef(coef, rows_ptr, b, base + 7, ROWS), aux)
    if HAS_NOISE:
        acc = _term(acc, _coef(coef, rows_ptr, b, base + 8, ROWS), noise)
    return acc


@triton.jit
def _solver_step_kernel(
    x_ptr, model_ptr, cond_ptr, h0_ptr, h1_ptr, h2_ptr, aux_ptr, noise_ptr,
    out0_ptr, out1_ptr, out2_ptr, coef, rows_ptr, dyn_ptr,
    s_x, s_model, s_cond, s_h0, s_h1, s_h2, s_aux, s_noise, s_out0, s_out1, s_out2,
    inner, guidance_scale, clip_value,
    HAS_COND: tl.constexpr, HAS_H0: tl.constexpr, HAS_H1: tl.constexpr, HAS_H2: tl.constexpr,
    HAS_AUX: tl.constexpr, HAS_NOISE: tl.constexpr,
    WRITE0: tl.constexpr, WRITE1: tl.constexpr, WRITE2: tl.constexpr,
    THRESHOLD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # One flat grid axis (axis 1 stops at 65535, a batch of toy 2-D points does not)
    tiles = tl.cdiv(inner, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // tiles
    offs = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    x = _load(x_ptr, s_x, b, offs, mask, True)
    u = _load(model_ptr, s_model, b, offs, mask, True)
    if HAS_COND:
        c = _load(cond_ptr, s_cond, b, offs, mask, True)
        m = u + guidance_scale * (c - u)
    else:
        m = u
    x0 = _coef(coef, rows_ptr, b, 0, ROWS) * x + _coef(coef, rows_ptr, b, 1, ROWS) * m
    if THRESHOLD == 1:
        x0 = _clamp_symmetric(x0, clip_value)
    elif THRESHOLD == 2:
        s = tl.load(dyn_ptr + b)
        # IEEE division, as torch and the C++/CUDA kernels divide (compiled fp32 `/` is within 2 ulp)
        x0 = tl.div_rn(_clamp_symmetric(x0, s), s)
    h0 = _load(h0_ptr, s_h0, b, offs, mask, HAS_H0)
    h1 = _load(h1_ptr, s_h1, b, offs, mask, HAS_H1)
    h2 = _load(h2_ptr, s_h2, b, offs, mask, HAS_H2)
    aux = _load(aux_ptr, s_aux, b, offs, mask, HAS_AUX)
    noise = _load(noise_ptr, s_noise, b, offs, mask, HAS_NOISE)
    if WRITE0:
        v = _combine(coef, rows_ptr, b, 0, x, m, u, x0, h0, h1, h2, aux, noise, ROWS, HAS_H0, HAS_H1, HAS_H2,
                     HAS_AUX, HAS_NOISE)
        tl.store(out0_ptr + b * s_out0 + offs, v.to(out0_ptr.dtype.element_ty), mask=mask)
    if WRITE1:
        v = _combine(coef, rows_ptr, b, 1, x, m, u, x0, h0, h1, h2, aux, noise, ROWS, HAS_H0, HAS_H1, HAS_H2,
                     HAS_AUX, HAS_NOISE)
        tl.store(out1_ptr + b * s_out1 + offs, v.to(out1_ptr.dtype.element_ty), mask=mask)
    if WRITE2:
        v = _combine(coef, rows_ptr, b, 2, x, m, u, x0, h0, h1, h2, aux, noise, ROWS, HAS_H0, HAS_H1, HAS_H2,
                     HAS_AUX, HAS_NOISE)
        tl.store(out2_ptr + b * s_out2 + offs, v.to(out2_ptr.dtype.element_ty), mask=mask)


def _stride(t):
    if t is None or t.dim() == 0 or t.shape[0] <= 1:
        return 0 if t is None else t.numel()
    return t.stride(0)


def launch(inputs, outputs, coefs, guidance_scale, threshold, clip_value, dynamic_scale):
    """Fill ``outputs`` (sample, history, aux; None = not wanted) from ``inputs``.

    ``coefs`` is the CPU float32 tensor of 29 values; they travel as kernel arguments (like
    the CUDA launcher's params struct), so no copy to the device and a captured CUDA graph
    keeps each step's values. Or a float32 ``[batch, 29]`` table on the sample's device: a row
    of coefficients per sample, read by the kernel.
    """
    x = inputs[0]
    batch = x.shape[0]
    inner = x.numel() // batch
    dummy = x  # stands in for absent pointers; never read (constexpr flags)
    ins = [dummy if t is None else t for t in inputs]
    outs = [dummy if t is None else t for t in outputs]
    grid = (triton.cdiv(inner, _BLOCK) * batch,)
    rows = coefs.dim() == 2
    _solver_step_kernel[grid](
        *ins, *outs, (0.0,) * 29 if rows else tuple(coefs.tolist()), coefs if rows else dummy,
        dummy if dynamic_scale is None else dynamic_scale,
        *[_stride(t) for t in inputs], *[_stride(t) for t in outputs],
        inner, guidance_scale, clip_value,
        HAS_COND=inputs[2] is not None, HAS_H0=inputs[3] is not None, HAS_H1=inputs[4] is not None,
        HAS_H2=inputs[5] is not None, HAS_AUX=inputs[6] is not None, HAS_NOISE=inputs[7] is not None,
        WRITE0=outputs[0] is not None, WRITE1=outputs[1] is not None, WRITE2=outputs[2] is not None,
        THRESHOLD=threshold, ROWS=rows, BLOCK=_BLOCK,
    )
