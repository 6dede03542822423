"""Specification of the fused diffusion-distillation losses (see csrc/diffusion_losses/diffusion_losses.h).

Per sample ``b`` (index of dim 0) with ``n`` elements and weight ``w_b``:

- ``pseudo_huber``: ``w_b (sqrt(||x_b - y_b||^2 + c_b^2) - c_b)`` (iCT, Song & Dhariwal 2023)
- ``pseudo_huber`` with ``elementwise=True``: ``w_b mean_i (sqrt((x_bi - y_bi)^2 + c_b^2) - c_b)`` (LCM)
- ``dmd``: ``w_b 0.5 mean_i (x_bi - sg(x_bi - g_bi))^2`` with
  ``g_b = (x0_fake_b - x0_real_b) / mean_i |x_t,bi - x0_real,bi|`` (DMD / DMD2; ``x_t`` defaults to
  ``x``); a zero or non-finite normaliser gives the sample ``g = 0``, a non-finite ``g`` element 0.
- ``progressive_mse``: ``w_b mean_i (pred_bi - target_bi)^2`` with the progressive-distillation
  target of :func:`pd_target` (Salimans & Ho 2022).

Gradients come from autograd, so this module is also the reference of the fused backward.
Per-sample coefficients are computed in float64; element math in ``dtype``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

KINDS = ("pseudo_huber", "pseudo_huber_elementwise", "dmd", "progressive_mse")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
COMBINATIONS = ("pd_target", "ddim_step")

PerSample = Union[float, torch.Tensor]


def per_sample(value: Optional[PerSample], batch: int, device, dtype=torch.float64,
               default: float = 1.0) -> torch.Tensor:
    """``value`` (a number, or a tensor of 1 or ``batch`` elements) as a ``[batch]`` tensor."""
    if value is None:
        value = default
    t = torch.as_tensor(value, device=device).to(dtype).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t.reshape(batch)


def _column(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[batch]`` tensor shaped to broadcast over ``like``'s samples."""
    return t.reshape((t.shape[0],) + (1,) * (like.dim() - 1))  # (no -1: vmap over an empty batch)


def _samples(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[batch, elements per sample]`` (an empty batch too)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _sample_mean(t: torch.Tensor) -> torch.Tensor:
    return _samples(t).mean(1)


def _sample_sum(t: torch.Tensor) -> torch.Tensor:
    return _samples(t).sum(1)


class _ZeroWithUnitGradient(torch.autograd.Function):
    """``x - sg(x)`` that stays 0 where x is inf or NaN: value 0, gradient 1 (reverse mode and
    vmap; what torch.compile traces, which takes no custom jvp)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.zeros_like(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ZeroWithUnitDerivative(_ZeroWithUnitGradient):
    """The same with forward mode too (torch.func.jvp, forward-mode AD)."""

    @staticmethod
    def jvp(ctx, tangent):
        return tangent


def zero_with_unit_derivative(x: torch.Tensor) -> torch.Tensor:
    """0 in value with derivative 1 with respect to ``x``, even where ``x`` is not finite (where
    ``x - x.detach()`` is NaN)."""
    if torch.compiler.is_compiling():
        return _ZeroWithUnitGradient.apply(x)
    return _ZeroWithUnitDerivative.apply(x)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: PerSample, weights: Optional[PerSample] = None,
                 elementwise: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-sample pseudo-Huber loss ``[batch]`` in ``dtype`` (differentiable in x and y)."""
    batch = x.shape[0]
    x, y = x.to(dtype), y.to(dtype)
    c = per_sample(c, batch, x.device, dtype)
    w = per_sample(weights, batch, x.device, dtype)
    d = x - y
    # sqrt(s + c^2) - c written as s / (sqrt(s + c^2) + c): the difference cancels where s << c^2
    # (2% off at |d| = 1e-7, c = 1; 0 for c = 1e30), as the kernels' form does not. An infinite
    # s (an inf in d, or d*d past the dtype's range) gives inf, with the kernels' slopes: per
    # element, NaN at an inf d (autograd's, of the formula) and sign(d) where only d*d
    # overflows; per sample d / sqrt(s) (0, NaN at an inf element).
    # Each branch of a where sees only its own entries: a masked inf / inf would still make a
    # NaN gradient. Dead entries (d = 0, c = 0) give 0: sqrt'(0) would make 0 * inf = NaN.
    if elementwise:
        c_col = _column(c, d)
        infinite = torch.isinf(d)
        s = torch.where(infinite, torch.zeros_like(d), d) ** 2  # (d * d's slope at d = inf: 0 * inf)
        big = infinite | (s == math.inf)
        live = ((d != 0) | (c_col > 0)) & ~big
        h = torch.sqrt(torch.where(live, s + c_col * c_col, torch.ones_like(d)))
        ad = d.abs()
        inf_d = torch.where(infinite, d, torch.ones_like(d))
        beyond = torch.where(infinite, torch.sqrt(inf_d * inf_d + c_col * c_col),  # inf, slope 0 * inf = NaN
                             ad + torch.where(infinite, torch.zeros_like(d), s - ad).detach())  # s, slope sign(d)
        value = _sample_mean(torch.where(big, beyond, torch.where(live, s, torch.zeros_like(d)) / (h + c_col)))
    else:
        s = _sample_sum(d * d)
        big = s == math.inf
        live = ~((s == 0) & (c == 0)) & ~big  # (a NaN s is live: its loss is NaN, as the kernels')
        r = torch.sqrt(torch.where(live, s + c * c, torch.ones_like(s)))
        beyond = torch.sqrt(torch.where(big, s, torch.ones_like(s)))  # inf, slope 1 / (2 sqrt(s)) = 0
        value = torch.where(big, beyond, torch.where(live, s, torch.zeros_like(s)) / (r + c))
    return w * value


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, x_t: Optional[torch.Tensor] = None,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """DMD's ``g = (x0_fake - x0_real) / mean|x_t - x0_real|`` per sample, NaN-safe, in ``dtype``."""
    with torch.no_grad():  # (detached too: forward-mode AD does not stop at no_grad)
        x_t = (x if x_t is None else x_t).detach()
        real = x0_real.detach().to(dtype)
        norm = _sample_mean((x_t.to(dtype) - real).abs())
        valid = torch.isfinite(norm) & (norm > 0)
        norm = _column(torch.where(valid, norm, torch.ones_like(norm)), real)
        g = (x0_fake.detach().to(dtype) - real) / norm
        return torch.where(torch.isfinite(g) & _column(valid, real), g, torch.zeros_like(g))


def dmd(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, x_t: Optional[torch.Tensor] = None,
        weights: Optional[PerSample] = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-sample DMD loss ``[batch]``: value ``0.5 mean(g^2)``, gradient ``g / n`` with respect to x.

    ``0.5 mean((x - sg(x - g))^2)``, value, gradient and Hessian ``I / n``; it is written as
    ``0.5 mean(g^2) + mean(z g) + 0.5 mean(z^2)`` with ``z = x - sg(x)`` (0, with gradient 1) so
    that the value does not lose ``g`` to rounding when ``|x| >> |g|``.
    """
    g = dmd_gradient(x, x0_real, x0_fake, x_t, dtype)
    # not x - sg(x): an inf or NaN in x would give (inf - inf) * g = NaN; its gradient is g / n
    # too (the fused backward's, which reads no x when x_t is given)
    z = zero_with_unit_derivative(x.to(dtype))
    value = 0.5 * _sample_mean(g * g) + _sample_mean(z * g) + 0.5 * _sample_mean(z * z)
    return per_sample(weights, x.shape[0], x.device, dtype) * value


def prediction_to_x0_eps(prediction_type: str, alpha, sigma):
    """(p0, q0, p1, q1) with ``x0 = p0 z + q0 m`` and ``eps = p1 z + q1 m`` for a latent
    ``z = alpha x0 + sigma eps`` and a model prediction ``m`` (``v = alpha eps - sigma x0``)."""
    if prediction_type == "epsilon":
        return 1 / alpha, -sigma / alpha, 0 * alpha, 1 + 0 * alpha
    if prediction_type == "sample":
        return 0 * alpha, 1 + 0 * alpha, 1 / sigma, -alpha / sigma
    if prediction_type == "v_prediction":
        n = alpha * alpha + sigma * sigma
        return alpha / n, -sigma / n, sigma / n, alpha / n
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def x0_to_prediction(prediction_type: str, alpha, sigma):
    """(u, v): the prediction of ``prediction_type`` that gives ``x0`` at ``z`` is ``u x0 + v z``."""
    if prediction_type == "epsilon":
        return -alpha / sigma, 1 / sigma
    if prediction_type == "sample":
        return 1 + 0 * alpha, 0 * alpha
    if prediction_type == "v_prediction":
        return -(alpha * alpha + sigma * sigma) / sigma, alpha / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def combination_coefficients(combination: str, prediction_type: str, alpha_t, sigma_t, alpha_s, sigma_s):
    """Per-sample ``(ca, cb)`` (float64) of ``out = ca a + cb b``.

    ``"pd_target"``: ``a = x_s``, ``b = x_t``; the student's one-step target,
    ``x0 = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)`` converted
    to ``prediction_type`` at ``x_t``. ``"ddim_step"``: ``a = x_t``, ``b`` the model output;
    the deterministic DDIM step ``x_s = alpha_s x0 + sigma_s eps``.
    """
    at, st, as_, ss = (torch.as_tensor(v).double() if isinstance(v, torch.Tensor) else float(v)
                       for v in (alpha_t, sigma_t, alpha_s, sigma_s))
    if combination == "pd_target":
        r = ss / st
        inv_den = 1 / (as_ - r * at)
        u, v = x0_to_prediction(prediction_type, at, st)
        return u * inv_den, v - u * r * inv_den
    if combination == "ddim_step":
        p0, q0, p1, q1 = prediction_to_x0_eps(prediction_type, at, st)
        return as_ * p0 + ss * p1, as_ * q0 + ss * q1
    raise ValueError(f"unknown combination {combination!r}; expected one of {COMBINATIONS}")


def _combine(combination, prediction_type, a, b, alpha_t, sigma_t, alpha_s, sigma_s, dtype):
    batch = a.shape[0]
    ca, cb = (per_sample(v, batch, a.device) for v in combination_coefficients(
        combination, prediction_type, *(per_sample(v, batch, a.device) for v in (alpha_t, sigma_t, alpha_s, sigma_s))))
    return _column(ca.to(dtype), a) * a.to(dtype) + _column(cb.to(dtype), a) * b.to(dtype)


def pd_target(x_s: torch.Tensor, x_t: torch.Tensor, alpha_t: PerSample, sigma_t: PerSample, alpha_s: PerSample,
              sigma_s: PerSample, prediction_type: str = "epsilon", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The progressive-distillation target of the student's prediction (see
    :func:`combination_coefficients`)."""
    return _combine("pd_target", prediction_type, x_s, x_t, alpha_t, sigma_t, alpha_s, sigma_s, dtype)


def ddim_step(x_t: torch.Tensor, model_output: torch.Tensor, alpha_t: PerSample, sigma_t: PerSample,
              alpha_s: PerSample, sigma_s: PerSample, prediction_type: str = "epsilon",
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Deterministic DDIM step from (alpha_t, sigma_t) to (alpha_s, sigma_s), per sample."""
    return _combine("ddim_step", prediction_type, x_t, model_output, alpha_t, sigma_t, alpha_s, sigma_s, dtype)


def progressive_mse(pred: torch.Tensor, x_s: torch.Tensor, x_t: torch.Tensor, alpha_t: PerSample,
                    sigma_t: PerSample, alpha_s: PerSample, sigma_s: PerSample, prediction_type: str = "epsilon",
                    weights: Optional[PerSample] = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-sample weighted MSE ``[batch]`` between ``pred`` and the (constant) :func:`pd_target`."""
    target = pd_target(x_s, x_t, alpha_t, sigma_t, alpha_s, sigma_s, prediction_type, dtype).detach()
    e = pred.to(dtype) - target
    return per_sample(weights, pred.shape[0], pred.device, dtype) * _sample_mean(e * e)
