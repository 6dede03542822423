"""kdfast.sampling: k-diffusion-style samplers (one fused kernel call per model evaluation)
and kdfast.sample.

The ground truth is a pure-torch, unfused implementation of each sampler in this file
(``ref_*``), TRANSCRIBED FROM k-diffusion's update rules (k_diffusion/sampling.py: Euler,
Euler ancestral, Heun, DPM-2, DPM-Solver++(2M), (2M) SDE, (3M) SDE; LCM as ComfyUI's copy of
that file has it) and, for UniPC, from diffusers' UniPCMultistepScheduler B(h) predictor /
corrector written in k-diffusion's convention. k-diffusion itself is not installable here (it
needs torchvision). Deviations from the verbatim code, all about where noise comes from: the
references draw every noise through ``noise_sampler`` (k-diffusion's Euler/Heun/DPM-2 churn use
``torch.randn_like`` and draw even when gamma == 0; the 2M/3M SDE samplers default to a
Brownian tree), so that the fused samplers and the references can share keyed noise.
"""
import math
import re

import numpy as np
import pytest
import torch

import kdfast
from kdfast import sampling as S
from kdfast.schedulers import DPMSolverMultistepScheduler

SIGMA_MIN, SIGMA_MAX = 0.0291675, 14.614642
SHAPE = (2, 4, 6, 6)


# --------------------------------------------------------------------------- fixtures


def denoiser(x, sigma, shift=0.0, cond=None):
    """Deterministic, input- and sigma-dependent stand-in for a k-diffusion denoiser."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = sigma.to(cd).reshape((-1,) + (1,) * (x.dim() - 1))
    xf = x.to(cd)
    c_in = 1.0 / torch.sqrt(1.0 + s * s)
    out = xf / (1.0 + s * s) + (s * c_in) * 0.5 * torch.sin(1.3 * xf * c_in + 0.1 * s) + shift
    if cond is not None:
        out = out + 0.3 * cond.to(cd) * torch.cos(0.7 * xf * c_in)
    return out.to(x.dtype)


def initial(dtype=torch.float32, seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * SIGMA_MAX).to(dtype)


def karras(n=10, zero=True):
    s = S.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX)
    return s if zero else s[:-1]


class KeyedNoise:
    """noise_sampler whose draw depends only on (sigma, sigma_next): fused sampler and
    reference get the same noise whatever order they draw it in. Keyed on 4 decimals:
    DPM-Solver++ SDE passes sigmas it recomputes as exp(-(-log sigma)) in the sigmas' dtype
    (float32 here, as k-diffusion), the float64 reference in float64."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype

    def __call__(self, sigma, sigma_next):
        a, b = float(sigma), float(sigma_next)
        seed = (int(round(a * 1e4)) * 1000003 + int(round(b * 1e4))) % (2 ** 62)
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.shape, generator=g, dtype=torch.float64).to(self.dtype)


def rel_err(got, expected):
    got, expected = got.double(), expected.double()
    return ((got - expected).abs().max() / max(1.0, expected.abs().max().item())).item()


# --------------------------------------------------------------------------- references
# Transcribed from k-diffusion's sampling.py (crowsonkb/k-diffusion), pure torch, unfused.


def append_dims(x, target_dims):
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def to_d(x, sigma, denoised):
    return (x - denoised) / append_dims(sigma, x.ndim)


def ref_get_ancestral_step(sigma_from, sigma_to, eta=1.):
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def ref_euler(model, x, sigmas, extra_args=None, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.,
              noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            eps = noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise  # k-diffusion: torch.randn_like(x) * s_noise
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


def ref_euler_ancestral(model, x, sigmas, extra_args=None, eta=1., s_noise=1., noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = ref_get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = to_d(x, sigmas[i], denoised)
        dt = sigma_down - sigmas[i]
        x = x + d * dt
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def ref_heun(model, x, sigmas, extra_args=None, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.,
             noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            eps = noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
    return x


def ref_dpm_2(model, x, sigmas, extra_args=None, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.,
              noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            eps = noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            dt = sigmas[i + 1] - sigma_hat
            x = x + d * dt
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            dt_1 = sigma_mid - sigma_hat
            dt_2 = sigmas[i + 1] - sigma_hat
            x_2 = x + d * dt_1
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * dt_2
    return x


def ref_dpmpp_2m(model, x, sigmas, extra_args=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def ref_dpmpp_2m_sde(model, x, sigmas, extra_args=None, eta=1., s_noise=1., noise_sampler=None,
                     solver_type='midpoint'):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    h_last = None
    h = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == 'heun':
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                elif solver_type == 'midpoint':
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


def ref_dpmpp_3m_sde(model, x, sigmas, extra_args=None, eta=1., s_noise=1., noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0 = h_1 / h
                r1 = h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def ref_lcm(model, x, sigmas, extra_args=None, noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


def ref_dpm_2_ancestral(model, x, sigmas, extra_args=None, eta=1., s_noise=1., noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = ref_get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            dt_1 = sigma_mid - sigmas[i]
            dt_2 = sigma_down - sigmas[i]
            x_2 = x + d * dt_1
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * dt_2
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def ref_linear_multistep_coeff(order, t, i, j):
    from scipy import integrate

    def fn(tau):
        prod = 1.
        for k in range(order):
            if j == k:
                continue
            prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod
    return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0]


def ref_lms(model, x, sigmas, extra_args=None, order=4):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        ds.append(d)
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [ref_linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


def ref_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, eta=1., s_noise=1., noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = ref_get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            d = to_d(x, sigmas[i], denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(torch.as_tensor(sigma_down, dtype=sigmas.dtype))
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = model(x_2, sigma_fn(s) * s_in, **extra_args)
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def ref_dpmpp_sde(model, x, sigmas, extra_args=None, eta=1., s_noise=1., noise_sampler=None, r=1 / 2):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: torch.as_tensor(sigma, dtype=sigmas.dtype).log().neg()  # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            d = to_d(x, sigmas[i], denoised)
            dt = sigmas[i + 1] - sigmas[i]
            x = x + d * dt
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            sd, su = ref_get_ancestral_step(sigma_fn(t), sigma_fn(s), eta)
            s_ = t_fn(sd)
            x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise_sampler(sigma_fn(t), sigma_fn(s)) * s_noise * su
            denoised_2 = model(x_2, sigma_fn(s) * s_in, **extra_args)
            sd, su = ref_get_ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
            t_next_ = t_fn(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sigma_fn(t_next_) / sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise_sampler(sigma_fn(t), sigma_fn(t_next)) * s_noise * su
    return x


def ref_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, eta=0., s_noise=1., noise_sampler=None):
    """k-diffusion's DPMSolver.dpm_solver_fast with its eps cache unrolled; the times are
    float64 here (k-diffusion's ``torch.linspace`` makes them float32 whatever the input)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigma = lambda t: t.neg().exp()  # noqa: E731
    t_of = lambda s: torch.as_tensor(s, dtype=torch.float64).log().neg()  # noqa: E731

    def eps_at(x, t):
        return (x - model(x, sigma(t) * s_in, **extra_args)) / sigma(t)

    t_start, t_end = t_of(sigma_max), t_of(sigma_min)
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i in range(len(orders)):
        t, t_next = ts[i], ts[i + 1]
        if eta:
            sd, su = ref_get_ancestral_step(sigma(t), sigma(t_next), eta)
            t_next_ = torch.minimum(t_end, t_of(sd))
            su = (sigma(t_next) ** 2 - sigma(t_next_) ** 2) ** 0.5
        else:
            t_next_, su = t_next, 0.
        h = t_next_ - t
        eps = eps_at(x, t)
        if orders[i] == 1:
            x = x - sigma(t_next_) * h.expm1() * eps
        elif orders[i] == 2:
            r1 = 1 / 2
            s1 = t + r1 * h
            u1 = x - sigma(s1) * (r1 * h).expm1() * eps
            eps_r1 = eps_at(u1, s1)
            x = x - sigma(t_next_) * h.expm1() * eps - sigma(t_next_) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            u1 = x - sigma(s1) * (r1 * h).expm1() * eps
            eps_r1 = eps_at(u1, s1)
            u2 = (x - sigma(s2) * (r2 * h).expm1() * eps
                  - sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
            eps_r2 = eps_at(u2, s2)
            x = x - sigma(t_next_) * h.expm1() * eps - sigma(t_next_) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
        x = x + su * s_noise * noise_sampler(sigma(t), sigma(t_next)) if eta else x
    return x


# UniPC: diffusers' multistep_uni_p_bh_update / multistep_uni_c_bh_update (predict_x0) with
# alpha_t = 1, sigma_t = sigma (k-diffusion's x = x0 + sigma * eps), lambda = -log(sigma).


def _ref_unipc_weights(h, rks, order, variant):
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    B_h = hh if variant == 'bh1' else torch.expm1(hh)
    R, b = [], []
    rks = torch.stack(rks + [torch.ones((), dtype=h.dtype)])
    for i in range(1, order + 1):
        R.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return h_phi_1, B_h, torch.stack(R), torch.stack(b)


def ref_uni_p(model_outputs, x, sigmas, i, order, variant):
    m0 = model_outputs[-1]
    lam = lambda s: -s.double().log()  # noqa: E731
    h = lam(sigmas[i + 1]) - lam(sigmas[i])
    rks, D1s = [], []
    for k in range(1, order):
        rk = (lam(sigmas[i - k]) - lam(sigmas[i])) / h
        rks.append(rk)
        D1s.append((model_outputs[-(k + 1)] - m0) / rk.to(m0.dtype))
    h_phi_1, B_h, R, b = _ref_unipc_weights(h, rks, order, variant)
    x_t = (sigmas[i + 1] / sigmas[i]) * x - h_phi_1.to(x.dtype) * m0
    if D1s:
        rhos_p = torch.tensor([0.5], dtype=torch.float64) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        pred_res = sum(r.to(x.dtype) * d for r, d in zip(rhos_p, D1s))
        x_t = x_t - B_h.to(x.dtype) * pred_res
    return x_t


def ref_uni_c(model_t, model_outputs, last_sample, sigmas, i, order, variant):
    m0 = model_outputs[-1]
    lam = lambda s: -s.double().log()  # noqa: E731
    h = lam(sigmas[i]) - lam(sigmas[i - 1])
    rks, D1s = [], []
    for k in range(1, order):
        rk = (lam(sigmas[i - 1 - k]) - lam(sigmas[i - 1])) / h
        rks.append(rk)
        D1s.append((model_outputs[-(k + 1)] - m0) / rk.to(m0.dtype))
    h_phi_1, B_h, R, b = _ref_unipc_weights(h, rks, order, variant)
    rhos_c = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(R, b)
    x_t = (sigmas[i] / sigmas[i - 1]) * last_sample - h_phi_1.to(m0.dtype) * m0
    corr_res = sum(r.to(m0.dtype) * d for r, d in zip(rhos_c[:-1], D1s)) if D1s else 0
    return x_t - B_h.to(m0.dtype) * (corr_res + rhos_c[-1].to(m0.dtype) * (model_t - m0))


def ref_unipc(model, x, sigmas, extra_args=None, order=2, variant='bh2', use_corrector=True,
              lower_order_final=True):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    outputs, last_sample, last_order = [], None, None
    for i in range(n):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if use_corrector and i > 0:
            x = ref_uni_c(denoised, outputs, last_sample, sigmas, i, last_order, variant)
        outputs.append(denoised)
        this_order = min(order, i + 1)
        if lower_order_final:
            this_order = min(this_order, n - i)
        if sigmas[i + 1] == 0:
            this_order = 1
        last_sample = x
        x = ref_uni_p(outputs, x, sigmas, i, this_order, variant)
        last_order = this_order
    return x


# (kdfast sampler, reference, options); options with noise get a KeyedNoise noise_sampler.
CASES = {
    "euler": (S.sample_euler, ref_euler, {}),
    "euler_churn": (S.sample_euler, ref_euler, dict(s_churn=1.0)),
    "euler_churn_window": (S.sample_euler, ref_euler, dict(s_churn=3.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)),
    "euler_churn_negative_noise": (S.sample_euler, ref_euler, dict(s_churn=1.0, s_noise=-1.0)),
    "euler_ancestral": (S.sample_euler_ancestral, ref_euler_ancestral, {}),
    "euler_ancestral_eta": (S.sample_euler_ancestral, ref_euler_ancestral, dict(eta=0.7, s_noise=0.9)),
    "heun": (S.sample_heun, ref_heun, {}),
    "heun_churn": (S.sample_heun, ref_heun, dict(s_churn=1.0)),
    "heun_churn_negative_noise": (S.sample_heun, ref_heun, dict(s_churn=1.0, s_noise=-0.5)),  # noise subtracted
    "dpm_2": (S.sample_dpm_2, ref_dpm_2, {}),
    "dpm_2_churn": (S.sample_dpm_2, ref_dpm_2, dict(s_churn=2.0, s_tmin=0.1, s_tmax=5.0)),
    "dpm_2_churn_negative_noise": (S.sample_dpm_2, ref_dpm_2, dict(s_churn=2.0, s_noise=-0.5)),
    "dpm_2_ancestral": (S.sample_dpm_2_ancestral, ref_dpm_2_ancestral, {}),
    "dpm_2_ancestral_eta": (S.sample_dpm_2_ancestral, ref_dpm_2_ancestral, dict(eta=0.6, s_noise=1.1)),
    "lms": (S.sample_lms, ref_lms, {}),
    "lms_o1": (S.sample_lms, ref_lms, dict(order=1)),
    "lms_o2": (S.sample_lms, ref_lms, dict(order=2)),
    "lms_o3": (S.sample_lms, ref_lms, dict(order=3)),
    "dpmpp_2s_ancestral": (S.sample_dpmpp_2s_ancestral, ref_dpmpp_2s_ancestral, {}),
    "dpmpp_2s_ancestral_eta": (S.sample_dpmpp_2s_ancestral, ref_dpmpp_2s_ancestral, dict(eta=0.5, s_noise=0.9)),
    "dpmpp_2s_ancestral_eta0": (S.sample_dpmpp_2s_ancestral, ref_dpmpp_2s_ancestral, dict(eta=0.0)),
    "dpmpp_sde": (S.sample_dpmpp_sde, ref_dpmpp_sde, {}),
    "dpmpp_sde_r": (S.sample_dpmpp_sde, ref_dpmpp_sde, dict(eta=0.5, s_noise=1.1, r=0.3)),
    "dpmpp_sde_eta0": (S.sample_dpmpp_sde, ref_dpmpp_sde, dict(eta=0.0)),
    "dpmpp_2m": (S.sample_dpmpp_2m, ref_dpmpp_2m, {}),
    "dpmpp_2m_sde": (S.sample_dpmpp_2m_sde, ref_dpmpp_2m_sde, {}),
    "dpmpp_2m_sde_heun": (S.sample_dpmpp_2m_sde, ref_dpmpp_2m_sde, dict(solver_type='heun', eta=0.5)),
    "dpmpp_2m_sde_eta0": (S.sample_dpmpp_2m_sde, ref_dpmpp_2m_sde, dict(eta=0.0, solver_type='heun')),
    "dpmpp_3m_sde": (S.sample_dpmpp_3m_sde, ref_dpmpp_3m_sde, {}),
    "dpmpp_3m_sde_eta0": (S.sample_dpmpp_3m_sde, ref_dpmpp_3m_sde, dict(eta=0.0)),
    "lcm": (S.sample_lcm, ref_lcm, {}),
    "unipc": (S.sample_unipc, ref_unipc, {}),
    "unipc_o1": (S.sample_unipc, ref_unipc, dict(order=1)),
    "unipc_o3": (S.sample_unipc, ref_unipc, dict(order=3)),
    "unipc_o3_bh1": (S.sample_unipc, ref_unipc, dict(order=3, variant='bh1')),
    "unipc_no_corrector": (S.sample_unipc, ref_unipc, dict(order=3, use_corrector=False)),
    "unipc_no_lof": (S.sample_unipc, ref_unipc, dict(order=3, lower_order_final=False)),
}
NOISY = ("churn", "ancestral", "sde", "lcm")


def run_case(case, dtype, sigmas, ref_dtype=None, extra_args=None):
    """(kdfast result in ``dtype``, reference result in ``ref_dtype``)."""
    fn, ref, opts = CASES[case]
    x = initial(torch.float64)
    kwargs = dict(opts)
    ref_kwargs = dict(opts)
    if any(k in case for k in NOISY) or fn in (S.sample_euler_ancestral, S.sample_lcm, S.sample_dpmpp_2m_sde,
                                                 S.sample_dpmpp_3m_sde):
        kwargs["noise_sampler"] = KeyedNoise(SHAPE, dtype)
        ref_kwargs["noise_sampler"] = KeyedNoise(SHAPE, ref_dtype or dtype)
    out = fn(denoiser, x.to(dtype), sigmas, extra_args=extra_args, disable=True, **kwargs)
    expected = None
    if ref_dtype is not None:
        ref_sigmas = sigmas.double() if ref_dtype == torch.float64 else sigmas.float()
        with torch.no_grad():
            expected = ref(denoiser, x.to(ref_dtype), ref_sigmas, extra_args=extra_args, **ref_kwargs)
    return out, expected


# --------------------------------------------------------------------------- samplers vs references


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_matches_reference_fp32(case):
    sigmas = karras(10)
    out, expected = run_case(case, torch.float32, sigmas, torch.float64)
    assert out.dtype == torch.float32 and out.shape == SHAPE
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) <= 1e-5, case


@pytest.mark.parametrize("case", ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms",
                                  "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm",
                                  "unipc_o3"])
def test_sampler_schedule_without_final_zero(case):
    # img2img-style partial schedules end above zero: no denoising-to-zero step.
    sigmas = karras(8, zero=False)
    out, expected = run_case(case, torch.float32, sigmas, torch.float64)
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("case", ["euler", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde",
                                  "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc_o3"])
def test_single_step_schedule(case):
    sigmas = torch.tensor([SIGMA_MAX, 0.0])
    out, expected = run_case(case, torch.float32, sigmas, torch.float64)
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["euler", "euler_churn", "euler_ancestral", "heun", "heun_churn", "dpm_2",
                                  "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "lcm", "unipc",
                                  "unipc_o3"])
def test_sampler_low_precision(case, dtype):
    """fp16/bf16 latents: the sample and history are stored in that dtype after every step
    (the kernel computes in fp32). The result stays within a few ulps (of the dtype, relative
    to the largest value) of the float64 reference started from the same rounded input; we
    see <= 2 ulps. (k-diffusion's own loop is no same-dtype baseline here: its
    ``append_dims(sigma)`` promotes fp16/bf16 latents to float32 after the first step.)"""
    fn, ref, opts = CASES[case]
    sigmas = karras(10)
    x = initial(torch.float64).to(dtype)
    kwargs, ref_kwargs = dict(opts), dict(opts)
    if any(k in case for k in NOISY) or fn in (S.sample_euler_ancestral, S.sample_lcm, S.sample_dpmpp_2m_sde,
                                                 S.sample_dpmpp_3m_sde):
        kwargs["noise_sampler"] = KeyedNoise(SHAPE, dtype)
        ref_kwargs["noise_sampler"] = KeyedNoise(SHAPE, torch.float64)
    out = fn(denoiser, x, sigmas, disable=True, **kwargs)
    with torch.no_grad():
        expected = ref(denoiser, x.double(), sigmas.double(), **ref_kwargs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, expected) <= 4 * torch.finfo(dtype).eps, case


def test_extra_args_reach_the_denoiser():
    sigmas = karras(6)
    seen = []

    def model(x, sigma, shift, tag):
        seen.append(tag)
        return denoiser(x, sigma, shift=shift)

    out = S.sample_dpmpp_2m(model, initial(), sigmas, extra_args={"shift": 0.25, "tag": "t"}, disable=True)
    ref = ref_dpmpp_2m(denoiser, initial(torch.float64), sigmas.double(), extra_args={"shift": 0.25})
    assert seen == ["t"] * 6
    assert rel_err(out, ref) <= 1e-5
    plain = S.sample_dpmpp_2m(denoiser, initial(), sigmas, disable=True)
    assert rel_err(out, plain) > 1e-3


@pytest.mark.parametrize("case", ["euler_churn", "heun", "lms", "dpmpp_2s_ancestral_eta0", "dpmpp_sde_eta0", "dpmpp_2m",
                                  "unipc_o3"])
def test_callback(case):
    fn, _, opts = CASES[case]
    sigmas = karras(6)
    infos = []
    kwargs = dict(opts)
    if "churn" in case:
        kwargs["noise_sampler"] = KeyedNoise(SHAPE, torch.float32)
    out = fn(denoiser, initial(), sigmas, callback=infos.append, disable=True, **kwargs)
    assert [info["i"] for info in infos] == list(range(6))
    for info in infos:
        assert set(info) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        i = info["i"]
        assert float(info["sigma"]) == float(sigmas[i])
        if "churn" in case:
            gamma = min(1.0 / 6, 2 ** 0.5 - 1)
            assert float(info["sigma_hat"]) == pytest.approx(float(sigmas[i]) * (1 + gamma), rel=1e-6)
        else:
            assert float(info["sigma_hat"]) == float(sigmas[i])
        expected = denoiser(info["x"], info["x"].new_full((2,), float(info["sigma_hat"])))
        torch.testing.assert_close(info["denoised"], expected, rtol=1e-6, atol=1e-6)
    # The callback does not change the result.
    again = fn(denoiser, initial(), sigmas, disable=True, **kwargs)
    torch.testing.assert_close(out, again, rtol=0, atol=0)


@pytest.fixture
def counted(monkeypatch):
    """``(calls, model)``: ``model`` is the test denoiser; ``calls`` counts its evaluations and
    the fused kernel calls (``kdfast.ops.solver_step``)."""
    calls = {"model": 0, "kernel": 0}
    real = kdfast.ops.solver_step

    def counting(*args, **kwargs):
        calls["kernel"] += 1
        return real(*args, **kwargs)

    def model(x, sigma):
        calls["model"] += 1
        return denoiser(x, sigma)

    monkeypatch.setattr(kdfast.ops, "solver_step", counting)
    return calls, model


def test_one_fused_call_per_model_evaluation(counted):
    calls, model = counted
    sigmas = karras(8)
    for name, fn in S.SAMPLERS.items():
        calls.update(model=0, kernel=0)
        fn(model, initial(), sigmas, disable=True)
        assert calls["kernel"] == calls["model"] > 0, name
    calls.update(model=0, kernel=0)
    S.sample_heun(model, initial(), sigmas, disable=True, s_churn=1.0, noise_sampler=KeyedNoise(SHAPE, torch.float32))
    assert calls["model"] == 2 * 8 - 1
    assert calls["kernel"] == calls["model"] + 1  # the first step's churn noise: one pass before the loop


def test_default_noise_sampler_uses_the_generator():
    sigmas = karras(8)
    x = initial()
    a = S.sample_dpmpp_2m_sde(denoiser, x, sigmas, disable=True, generator=torch.Generator().manual_seed(3))
    b = S.sample_dpmpp_2m_sde(denoiser, x, sigmas, disable=True, generator=torch.Generator().manual_seed(3))
    c = S.sample_dpmpp_2m_sde(denoiser, x, sigmas, disable=True, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    # One LCM step into sigma 0.5: denoised + 0.5 * randn(generator), randn_like-equivalent.
    one = torch.tensor([SIGMA_MAX, 0.5])
    got = S.sample_lcm(denoiser, x, one, disable=True, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    expected = denoiser(x, x.new_full((2,), SIGMA_MAX)) + 0.5 * noise
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # Without a generator: the global RNG, like torch.randn_like.
    torch.manual_seed(11)
    got = S.sample_lcm(denoiser, x, one, disable=True)
    torch.manual_seed(11)
    expected = denoiser(x, x.new_full((2,), SIGMA_MAX)) + 0.5 * torch.randn_like(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_coefficient_table_is_cached_per_sigma_list():
    S._cached_plan.cache_clear()
    sigmas = karras(7)
    S.sample_dpmpp_2m(denoiser, initial(), sigmas, disable=True)
    S.sample_dpmpp_2m(denoiser, initial(seed=1), sigmas.clone(), disable=True)
    info = S._cached_plan.cache_info()
    assert info.misses == 1 and info.hits == 1
    plan = S._cached_plan("dpmpp_2m", tuple(sigmas.tolist()), ())
    assert all(r.dtype == torch.float32 and r.device.type == "cpu" for r in plan.rows)
    assert len({r.untyped_storage().data_ptr() for r in plan.rows}) == 1  # one packed table


# --------------------------------------------------------------------------- schedules


def test_schedules_match_formulas():
    n, lo, hi = 12, 0.03, 14.6
    ramp = np.linspace(0, 1, n)
    expected = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    s = S.get_sigmas_karras(n, lo, hi)
    assert s.shape == (n + 1,) and s.dtype == torch.float32 and s[-1] == 0
    np.testing.assert_allclose(s[:-1].double().numpy(), expected, rtol=2e-6)
    s = S.get_sigmas_karras(n, lo, hi, rho=3.)
    np.testing.assert_allclose(s[:-1].double().numpy(),
                               (hi ** (1 / 3) + ramp * (lo ** (1 / 3) - hi ** (1 / 3))) ** 3, rtol=2e-6)
    s = S.get_sigmas_exponential(n, lo, hi)
    np.testing.assert_allclose(s[:-1].double().numpy(), np.exp(np.linspace(np.log(hi), np.log(lo), n)), rtol=2e-6)
    assert s[-1] == 0
    s = S.get_sigmas_polyexponential(n, lo, hi, rho=2.)
    r = np.linspace(1, 0, n) ** 2
    np.testing.assert_allclose(s[:-1].double().numpy(), np.exp(r * (np.log(hi) - np.log(lo)) + np.log(lo)), rtol=2e-6)
    s = S.get_sigmas_vp(n)
    t = np.linspace(1, 1e-3, n)
    np.testing.assert_allclose(s[:-1].double().numpy(), np.sqrt(np.exp(19.9 * t ** 2 / 2 + 0.1 * t) - 1),
                               rtol=5e-4)  # float32 exp(.) - 1 cancels near t = eps_s, as in k-diffusion
    torch.testing.assert_close(S.append_zero(torch.tensor([3.0, 1.0])), torch.tensor([3.0, 1.0, 0.0]))


def test_align_your_steps():
    levels = S.AYS_NOISE_LEVELS["SD1"]
    s10 = S.get_sigmas_ays(10, "SD1")
    assert s10.dtype == torch.float32 and s10.shape == (11,)
    torch.testing.assert_close(s10[:-1], torch.tensor(levels[:-1], dtype=torch.float32))
    assert s10[-1] == 0
    # ComfyUI's AlignYourStepsScheduler (transcribed): log-linear interpolation, last -> 0.
    xs = np.linspace(0, 1, len(levels))
    ys = np.log(np.asarray(levels)[::-1])
    expected = np.exp(np.interp(np.linspace(0, 1, 26), xs, ys))[::-1].copy()
    expected[-1] = 0
    s25 = S.get_sigmas_ays(25, levels)
    assert s25.shape == (26,)
    np.testing.assert_allclose(s25.double().numpy(), expected, rtol=1e-6)
    interp = S.loglinear_interp(levels, 17)
    assert interp[0] == pytest.approx(levels[0]) and interp[-1] == pytest.approx(levels[-1])
    assert np.all(np.diff(interp) < 0)
    with pytest.raises(ValueError):
        S.get_sigmas_ays(10, "SD9")
    # (n was truncated, and levels that are no schedule were interpolated or returned)
    for n in (2.5, True, torch.tensor(True), np.array(2.5)):
        with pytest.raises(TypeError, match="n must be an integer"):
            S.get_sigmas_ays(n)
    for n in (torch.tensor(12), np.array(12), np.int32(12), np.float32(12.0)):  # (as get_sigmas_karras takes them)
        assert torch.equal(S.get_sigmas_ays(n), S.get_sigmas_ays(12))
    for bad in ([1.0, 2.0, 4.0, 8.0], [1.0, -5.0, math.nan], [1.0]):
        with pytest.raises(ValueError, match="sigmas_10 must hold at least 2 finite, positive, strictly decreasing"):
            S.get_sigmas_ays(3, bad)
    with pytest.raises(ValueError):
        S.loglinear_interp([1.0, 0.0], 5)
    # Usable as a sampler schedule.
    out = kdfast.sampling.sample(denoiser, initial(), S.get_sigmas_ays(12, "SDXL"), disable=True)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- float64


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_float64(case):
    """float64 latents are stepped in float64 (the reference backend, with the coefficient
    table in float64): the loop matches the float64 references to rounding (measured <= 1.2e-15)."""
    sigmas = karras(10).double()
    out, expected = run_case(case, torch.float64, sigmas, torch.float64)
    assert out.dtype == torch.float64 and out.shape == SHAPE
    assert rel_err(out, expected) <= 1e-13, case


def test_float64_sampler_history_aux_and_guidance():
    # history (DPM-Solver++), aux (UniPC, Heun) and fused guidance all stay float64
    sigmas = karras(8).double()
    cond = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 4, 1, 1)
    uncond = torch.zeros(2, 4, 1, 1, dtype=torch.float64)
    for name in ("dpmpp_2m", "unipc", "heun"):
        got = S.sample(denoiser, initial(torch.float64), sigmas, sampler=name, guidance_scale=3.0, cond=cond,
                       uncond=uncond, disable=True)
        guided = lambda x, s: (denoiser(x, s, cond=uncond)  # noqa: E731
                               + 3.0 * (denoiser(x, s, cond=cond) - denoiser(x, s, cond=uncond)))
        expected = CASES[name][1](guided, initial(torch.float64), sigmas)
        assert got.dtype == torch.float64
        assert rel_err(got, expected) <= 1e-13, name


def test_float64_sampler_uses_float64_coefficients(monkeypatch):
    """The float64 loop reads the float64 table; the float32 table would limit it to ~1e-8."""
    sigmas = karras(10).double()
    rows = []
    real = S.ops.solver_step

    def spy(x, m, coefs, **kwargs):
        rows.append(coefs.dtype)
        return real(x, m, coefs, **kwargs)

    monkeypatch.setattr(S.ops, "solver_step", spy)
    S.sample_dpmpp_2m(denoiser, initial(torch.float64), sigmas, disable=True)
    S.sample_dpmpp_2m(denoiser, initial(torch.float32), sigmas, disable=True)
    assert rows == [torch.float64] * 10 + [torch.float32] * 10


@pytest.mark.parametrize("case", ["euler", "euler_ancestral", "euler_ancestral_eta", "heun", "dpm_2",
                                  "dpm_2_ancestral", "dpm_2_ancestral_eta", "lms", "lms_o2", "dpmpp_2s_ancestral",
                                  "dpmpp_2s_ancestral_eta", "dpmpp_sde", "dpmpp_sde_r", "dpmpp_2m", "dpmpp_2m_sde",
                                  "dpmpp_2m_sde_heun", "dpmpp_3m_sde"])
def test_sampler_float64_matches_k_diffusion(kds, case):
    """k-diffusion's own samplers in float64 (float64 sigmas): measured <= 1.2e-15."""
    fn, _, opts = CASES[case]
    kwargs = dict(opts)
    if any(k in case for k in NOISY):
        kwargs["noise_sampler"] = KeyedNoise(SHAPE, torch.float64)
    sigmas = karras(10).double()
    want = getattr(kds, fn.__name__)(denoiser, initial(torch.float64), sigmas, disable=True,
                                                      **kwargs)
    got = fn(denoiser, initial(torch.float64), sigmas, disable=True, **kwargs)
    assert want.dtype == got.dtype == torch.float64
    assert rel_err(got, want) <= 1e-13, case


# --------------------------------------------------------------------------- DPM-Solver-Fast

FAST_MIN, FAST_MAX = 0.0292, 14.61


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9, 10, 12])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_dpm_fast_matches_reference(n, eta):
    kwargs = dict(eta=eta)
    if eta:
        kwargs["noise_sampler"] = KeyedNoise(SHAPE, torch.float64)
    expected = ref_dpm_fast(denoiser, initial(torch.float64), FAST_MIN, FAST_MAX, n, **kwargs)
    got = S.sample_dpm_fast(denoiser, initial(torch.float64), FAST_MIN, FAST_MAX, n, disable=True, **kwargs)
    assert got.dtype == torch.float64 and rel_err(got, expected) <= 1e-13
    if eta:
        kwargs["noise_sampler"] = KeyedNoise(SHAPE, torch.float32)
    got = S.sample_dpm_fast(denoiser, initial(), FAST_MIN, FAST_MAX, n, disable=True, **kwargs)
    assert got.dtype == torch.float32 and rel_err(got, expected) <= 1e-5


def test_dpm_fast_calls_the_model_n_times_once_per_kernel(counted):
    calls, model = counted
    infos = []
    S.sample_dpm_fast(model, initial(), FAST_MIN, FAST_MAX, 11, callback=infos.append, disable=True)
    assert calls == {"model": 11, "kernel": 11}
    sigmas = S.dpm_fast_sigmas(FAST_MIN, FAST_MAX, 11)
    assert len(sigmas) == 5 and sigmas[0] == pytest.approx(FAST_MAX) and sigmas[-1] == pytest.approx(FAST_MIN)
    assert [info["i"] for info in infos] == [0, 1, 2, 3]  # steps of orders 3, 3, 3, 2
    assert [float(info["sigma"]) for info in infos] == pytest.approx(sigmas[:-1])


def test_dpm_fast_with_half_x_and_a_float32_denoiser_calls_it_at_float32_sigmas():
    # k-diffusion's DPM-Solver-Fast makes each sigma argument from the current x, which its
    # arithmetic promotes to the denoiser's float32 after the first call; sigmas kept in float16
    # (3 digits) put the result 3e-4 off the float64 run instead of 1e-6.
    seen = []

    def wide(x, sigma):
        seen.append(sigma.dtype)
        return denoiser(x.float(), sigma.float())

    x = initial(torch.float16)
    got = S.sample_dpm_fast(wide, x, FAST_MIN, FAST_MAX, 9, disable=True)
    assert seen == [torch.float16] + [torch.float32] * 8 and got.dtype == torch.float32
    expected = S.sample_dpm_fast(denoiser, x.double(), FAST_MIN, FAST_MAX, 9, disable=True)
    assert rel_err(got, expected) <= 1e-5


def test_dpm_fast_matches_k_diffusion(kds):
    """k-diffusion runs DPM-Solver-Fast's times in float32 (its ``torch.linspace``), so the two
    agree to float32 rounding of the step boundaries; the noise is keyed coarsely enough that
    both draw the same."""

    class CoarseNoise(KeyedNoise):
        def __call__(self, sigma, sigma_next):
            seed = int(round(float(sigma) * 1e3)) * 1000003 + int(round(float(sigma_next) * 1e3))
            return torch.randn(self.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    for n, eta in ((10, 0.0), (9, 0.0), (12, 0.5)):
        kwargs = dict(eta=eta, noise_sampler=CoarseNoise(SHAPE, torch.float64))
        want = kds.sample_dpm_fast(denoiser, initial(torch.float64), FAST_MIN, FAST_MAX, n, disable=True, **kwargs)
        got = S.sample_dpm_fast(denoiser, initial(torch.float64), FAST_MIN, FAST_MAX, n, disable=True, **kwargs)
        assert rel_err(got, want) <= 1e-5, (n, eta)


# --------------------------------------------------------------------------- Brownian tree noise


def test_dpmpp_sde_gives_the_noise_sampler_k_diffusions_float32_times():
    # k-diffusion computes sigma_fn(t), sigma_fn(t + r h), sigma_fn(t_next) in the sigmas' dtype;
    # a Brownian tree queried at the float64 values instead (an ulp away) drew other increments
    x = initial()
    for sigmas, r in ((karras(6), 0.5), (karras(5), 0.3), (karras(5).double(), 0.5)):
        calls = []
        S.sample_dpmpp_sde(denoiser, x.to(sigmas.dtype), sigmas, r=r, disable=True,
                           noise_sampler=lambda a, b: calls.append((a, b)) or torch.zeros(SHAPE, dtype=sigmas.dtype))
        expected = []
        for i in range(len(sigmas) - 1):  # k-diffusion's sample_dpmpp_sde, transcribed
            if sigmas[i + 1] == 0:
                continue
            t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
            s = t + (t_next - t) * r
            sigma_fn = [v.neg().exp().item() for v in (t, s, t_next)]
            expected += [(sigma_fn[0], sigma_fn[1]), (sigma_fn[0], sigma_fn[2])]
        assert calls == expected, (sigmas.dtype, r)


def test_brownian_tree_noise_sampler():
    pytest.importorskip("torchsde")
    x = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    sigmas = karras(8).double()
    a = S.BrownianTreeNoiseSampler(x, float(sigmas[-2]), float(sigmas[0]), seed=5)
    b = S.BrownianTreeNoiseSampler(x, float(sigmas[-2]), float(sigmas[0]), seed=5)
    c = S.BrownianTreeNoiseSampler(x, float(sigmas[-2]), float(sigmas[0]), seed=6)
    draws = [a(float(sigmas[i]), float(sigmas[i + 1])) for i in range(7)]
    for i, d in enumerate(draws):
        assert d.shape == x.shape and d.dtype == x.dtype
        torch.testing.assert_close(d, b(float(sigmas[i]), float(sigmas[i + 1])), rtol=0, atol=0)
        assert (d - c(float(sigmas[i]), float(sigmas[i + 1]))).abs().max() > 0.1
    # increments over disjoint intervals are independent, each of unit variance
    flat = torch.stack([d.flatten() for d in draws])
    assert (flat.var(dim=1) - 1).abs().max() < 0.25
    assert torch.corrcoef(flat).sub(torch.eye(7, dtype=flat.dtype)).abs().max() < 0.25
    # one path: the noise of a long interval is the normalised sum of its parts
    whole = a(float(sigmas[0]), float(sigmas[2]))
    parts = (draws[0] * (sigmas[0] - sigmas[1]).sqrt() + draws[1] * (sigmas[1] - sigmas[2]).sqrt())
    torch.testing.assert_close(whole, parts / (sigmas[0] - sigmas[2]).sqrt(), rtol=1e-9, atol=1e-9)
    # one motion per batch item with a list of seeds
    per_item = S.BrownianTreeNoiseSampler(x, float(sigmas[-2]), float(sigmas[0]), seed=[5, 6])
    single = S.BrownianTreeNoiseSampler(x[:1], float(sigmas[-2]), float(sigmas[0]), seed=6)
    torch.testing.assert_close(per_item(1.0, 0.5)[1:], single(1.0, 0.5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one per batch item"):
        S.BrownianTreeNoiseSampler(x, 0.1, 1.0, seed=[1, 2, 3])
    # as the noise of an SDE sampler
    x = initial(torch.float64)
    tree = S.BrownianTreeNoiseSampler(x, float(sigmas[-2]), float(sigmas[0]), seed=5)
    out = S.sample_dpmpp_sde(denoiser, x, sigmas, disable=True, noise_sampler=tree)
    assert torch.isfinite(out).all()


def test_brownian_tree_matches_k_diffusion(kds):
    pytest.importorskip("torchsde")
    x = initial(torch.float64)
    sigmas = karras(8).double()
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    ours = S.BrownianTreeNoiseSampler(x, float(lo), float(hi), seed=3)
    theirs = kds.BrownianTreeNoiseSampler(x, lo, hi, seed=3)
    for i in range(7):
        torch.testing.assert_close(ours(float(sigmas[i]), float(sigmas[i + 1])), theirs(sigmas[i], sigmas[i + 1]),
                                   rtol=0, atol=0)
    # k-diffusion's default for sample_dpmpp_sde, draw for draw
    want = kds.sample_dpmpp_sde(denoiser, x, sigmas, disable=True,
                                noise_sampler=kds.BrownianTreeNoiseSampler(x, lo, hi, seed=4))
    got = S.sample_dpmpp_sde(denoiser, x, sigmas, disable=True,
                             noise_sampler=S.BrownianTreeNoiseSampler(x, float(lo), float(hi), seed=4))
    assert rel_err(got, want) <= 1e-13


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_brownian_tree_with_a_transform_draws_k_diffusions_noise(kds, dtype):
    # the transform saw a float64 sigma where k-diffusion's sees the schedule's dtype: the
    # tree was queried at other times, and the same seed drew other noise (1e-3 off)
    pytest.importorskip("torchsde")
    x = torch.zeros(3, 4)

    def transform(s):
        return s.log().neg()

    for sigmas in (torch.tensor([14.6, 3.0, 0.5, 0.03], dtype=dtype), karras(8, zero=False).to(dtype)):
        lo, hi = sigmas.min(), sigmas.max()
        # (Python floats: torch's default dtype, float32, which k-diffusion's queries have only for
        # float32 sigmas)
        for ends in ((lo, hi),) + (((float(lo), float(hi)),) if dtype == torch.float32 else ()):
            ours = S.BrownianTreeNoiseSampler(x, *ends, seed=[3, 4, 5], transform=transform)
            theirs = kds.BrownianTreeNoiseSampler(x, *ends, seed=[3, 4, 5], transform=transform)
            for i in range(len(sigmas) - 1):
                torch.testing.assert_close(ours(float(sigmas[i]), float(sigmas[i + 1])),
                                           theirs(sigmas[i], sigmas[i + 1]), rtol=0, atol=0)


def test_brownian_tree_seeds_per_item_in_any_sequence():
    # a numpy array or a range was taken as one seed (int() of it failed)
    pytest.importorskip("torchsde")
    x = torch.zeros(3, 4)
    want = S.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=[0, 1, 2])(5.0, 1.0)
    for seeds in (range(3), np.arange(3), torch.arange(3), (0, 1, 2), [np.int64(0), torch.tensor(1), 2]):
        torch.testing.assert_close(S.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=seeds)(5.0, 1.0), want,
                                   rtol=0, atol=0)
    torch.testing.assert_close(S.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=np.int64(7))(5.0, 1.0),
                               S.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=7)(5.0, 1.0), rtol=0, atol=0)
    for bad in (1.5, "3", True, [1, None, 2], [[1], [2], [3]], np.zeros((3, 1), dtype=np.int64)):
        with pytest.raises(TypeError, match="seed must be an int"):
            S.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=bad)


# --------------------------------------------------------------------------- kdfast.sample


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_sample_with_sigmas_equals_sampler(name):
    sigmas = karras(8)
    kwargs = {}
    if any(k in name for k in NOISY):
        kwargs["noise_sampler"] = KeyedNoise(SHAPE, torch.float32)
    got = S.sample(denoiser, initial(), sigmas, sampler=name, disable=True, **kwargs)
    expected = S.SAMPLERS[name](denoiser, initial(), sigmas, disable=True, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_sigmas_as_python_list():
    sigmas = karras(6)
    infos = []
    got = S.sample(denoiser, initial(), sigmas.tolist(), sampler="heun", callback=infos.append, disable=True)
    expected = S.sample_heun(denoiser, initial(), sigmas, disable=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert [float(info["sigma"]) for info in infos] == sigmas[:-1].tolist()


def test_sample_options_and_generator():
    sigmas = karras(8)
    got = S.sample(denoiser, initial(), sigmas, sampler="dpmpp_2m_sde", solver_type="heun", eta=0.5,
                   generator=torch.Generator().manual_seed(1), disable=True)
    expected = S.sample_dpmpp_2m_sde(denoiser, initial(), sigmas, solver_type="heun", eta=0.5,
                                     generator=torch.Generator().manual_seed(1), disable=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got = S.sample(denoiser, initial(), sigmas, sampler="unipc", order=3, variant="bh1", disable=True)
    expected = S.sample_unipc(denoiser, initial(), sigmas, order=3, variant="bh1", disable=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_3m_sde", "unipc"])
@pytest.mark.parametrize("batched", [True, False])
def test_cfg_fused_equals_unfused(name, batched):
    sigmas = karras(8)
    g = 5.5
    cond = torch.linspace(-1, 1, 8).reshape(2, 4, 1, 1)
    uncond = torch.zeros(2, 4, 1, 1) if batched else None  # None: two calls, cond=None for the uncond one
    calls = []

    def model(x, sigma, cond=None):
        calls.append(x.shape[0])
        return denoiser(x, sigma, cond=cond)

    def guided(x, sigma):
        u = denoiser(x, sigma, cond=uncond)
        c = denoiser(x, sigma, cond=cond)
        return u + g * (c - u)

    kwargs = {}
    if name == "dpmpp_3m_sde":
        kwargs["noise_sampler"] = KeyedNoise(SHAPE, torch.float32)
    got = S.sample(model, initial(), sigmas, sampler=name, guidance_scale=g, cond=cond, uncond=uncond,
                   disable=True, **kwargs)
    expected = S.SAMPLERS[name](guided, initial(), sigmas, disable=True, **kwargs)
    assert rel_err(got, expected) <= 2e-5
    n_evals = 2 * 8 - 1 if name == "heun" else 8
    assert calls == ([4] * n_evals if batched else [2] * (2 * n_evals))
    # guidance 1 calls the conditional branch only
    calls.clear()
    got1 = S.sample(model, initial(), sigmas, sampler=name, guidance_scale=1.0, cond=cond, uncond=uncond,
                    disable=True, **kwargs)
    assert calls == [2] * n_evals
    plain = S.SAMPLERS[name](lambda x, s: denoiser(x, s, cond=cond), initial(), sigmas, disable=True, **kwargs)
    torch.testing.assert_close(got1, plain, rtol=0, atol=0)


def test_cfg_callback_reports_guided_denoised():
    sigmas = karras(5)
    cond, uncond = torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)
    infos = []
    S.sample(denoiser, initial(), sigmas, sampler="euler", guidance_scale=3.0, cond=cond, uncond=uncond,
             callback=infos.append, disable=True)
    assert len(infos) == 5
    for info in infos:
        s = info["x"].new_full((2,), float(info["sigma"]))
        u, c = denoiser(info["x"], s, cond=uncond), denoiser(info["x"], s, cond=cond)
        torch.testing.assert_close(info["denoised"], u + 3.0 * (c - u), rtol=1e-6, atol=1e-5)


def _vp_wrapper(scheduler, den=denoiser, **fixed):
    """A raw 'sample'-prediction model for a VP scheduler, built from a k-diffusion denoiser."""
    sigma_of = dict(zip(scheduler.timesteps.tolist(), scheduler.sigmas[:-1].tolist()))

    def model(x, t, **kwargs):
        sigma = sigma_of[float(t)] if not isinstance(t, torch.Tensor) else sigma_of[t.item()]
        scale = math.sqrt(1 + sigma * sigma)
        return den(x * scale, x.new_full((x.shape[0],), sigma), **fixed, **kwargs)
    return model


def test_sample_with_scheduler_equals_manual_loop_and_dpmpp_2m():
    sched = DPMSolverMultistepScheduler(prediction_type="sample", solver_order=2)
    sched.set_timesteps(10)
    model = _vp_wrapper(sched)
    sigmas = sched.sigmas.clone()
    x_ve = initial()
    x_vp = x_ve / math.sqrt(1 + float(sigmas[0]) ** 2)
    got = S.sample(model, x_vp, sched, disable=True)
    # manual diffusers-style loop
    sched.set_timesteps(10)
    x = x_vp
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=0, atol=0)
    # conventions coincide: VP DPM-Solver++(2M) on x0 predictions == k-diffusion dpmpp_2m on sigmas
    kd = S.sample_dpmpp_2m(denoiser, x_ve, sigmas, disable=True)
    assert rel_err(got, kd) <= 1e-5
    # and guidance fused through step_cfg
    sched.set_timesteps(10)
    cond, uncond = torch.ones(2, 4, 1, 1), -torch.ones(2, 4, 1, 1)
    got = S.sample(model, x_vp, sched, guidance_scale=4.0, cond=cond, uncond=uncond, disable=True)

    def guided(x, s):
        u, c = denoiser(x, s, cond=uncond), denoiser(x, s, cond=cond)
        return u + 4.0 * (c - u)
    kd = S.sample_dpmpp_2m(guided, x_ve, sigmas, disable=True)
    assert rel_err(got, kd) <= 2e-5
    # a used scheduler must be reset first
    with pytest.raises(ValueError, match="set_timesteps"):
        S.sample(model, x_vp, sched, disable=True)


def test_a_stepped_pndm_scheduler_is_refused_and_scale_model_input_is_not_a_step():
    from kdfast.schedulers import EulerDiscreteScheduler, PNDMScheduler

    calls = []

    def model(x, t):
        calls.append(t)
        return torch.tanh(x)

    x = initial() / SIGMA_MAX
    pndm = PNDMScheduler()
    pndm.set_timesteps(5)
    t = pndm.timesteps[0]
    pndm.step(model(x, t), t, x)
    calls.clear()
    # PNDM keeps no step index (its counter is its position): refused before any model call
    with pytest.raises(ValueError, match="already been stepped"):
        S.sample(model, x, pndm, disable=True)
    assert not calls
    pndm.set_timesteps(5)
    S.sample(model, x, pndm, disable=True)
    with pytest.raises(ValueError, match="already been stepped"):
        S.sample(model, x, pndm, disable=True)
    # scale_model_input at the first timestep positions the step index there: not a step
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(5)
    euler.scale_model_input(x, euler.timesteps[0])
    got = S.sample(model, x * euler.init_noise_sigma, euler, disable=True)
    euler.set_timesteps(5)
    torch.testing.assert_close(got, S.sample(model, x * euler.init_noise_sigma, euler, disable=True), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.0, 0.5, 3.0, None])
def test_scheduler_loop_callback_gets_the_guided_output(scale):
    from kdfast.schedulers import EulerDiscreteScheduler

    outputs = []

    def model(x, t, cond):
        out = torch.tanh(0.7 * x + 0.01 * t) * 0.9 + 0.3 * cond
        outputs.append(out)
        return out

    cond, uncond = torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)
    sched = EulerDiscreteScheduler()
    sched.set_timesteps(3)
    seen = []
    kw = {} if scale is None else dict(guidance_scale=scale, uncond=uncond)
    S.sample(model, initial() / SIGMA_MAX * sched.init_noise_sigma, sched, cond=cond, disable=True,
             callback=lambda d: seen.append(d["model_output"]), **kw)
    if scale is None:
        expected = outputs[0]
    else:
        u, c = outputs[0].chunk(2)  # one call on the doubled batch: [uncond, cond]
        expected = u + scale * (c - u)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)


def test_sample_with_sde_scheduler_uses_generator():
    sched = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", prediction_type="sample")
    sched.set_timesteps(8)
    model = _vp_wrapper(sched)
    x = initial() / SIGMA_MAX
    got = S.sample(model, x, sched, generator=torch.Generator().manual_seed(0), disable=True)
    sched.set_timesteps(8)
    gen = torch.Generator().manual_seed(0)
    ref = x
    for t in sched.timesteps:
        ref = sched.step(model(ref, t), t, ref, generator=gen).prev_sample
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_unipc_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    # bh1 into sigma 0 gives NaN in diffusers (B(h) = -h = -inf times a zero correction), so
    # that case ends at sigma_min; kdfast's bh1 into 0 is finite (tested against ref_unipc).
    for order, variant, final in ((2, "bh2", "zero"), (3, "bh2", "zero"), (3, "bh1", "sigma_min"),
                                  (2, "bh2", "sigma_min")):
        df = diffusers.UniPCMultistepScheduler(solver_order=order, solver_type=variant, prediction_type="sample",
                                               final_sigmas_type=final)
        df.set_timesteps(10)
        model = _vp_wrapper(df)
        sigmas = df.sigmas.clone()
        x_ve = initial()
        x = x_ve / math.sqrt(1 + float(sigmas[0]) ** 2)
        for t in df.timesteps:
            x = df.step(model(x, t), t, x).prev_sample
        got = S.sample_unipc(denoiser, x_ve, sigmas, order=order, variant=variant, disable=True)
        got = got / math.sqrt(1 + float(sigmas[-1]) ** 2)  # back to the VP scaling (1 at sigma 0)
        assert rel_err(got, x) <= 1e-5, (order, variant, final)


def test_euler_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    df = diffusers.EulerDiscreteScheduler(prediction_type="sample")
    df.set_timesteps(10)
    sigmas = df.sigmas.clone()
    sigma_of = dict(zip(df.timesteps.tolist(), sigmas[:-1].tolist()))
    x_ve = initial()
    x = x_ve
    for t in df.timesteps:
        sigma = sigma_of[t.item()]
        out = denoiser(df.scale_model_input(x, t) * math.sqrt(1 + sigma ** 2), x.new_full((2,), sigma))
        x = df.step(out, t, x).prev_sample
    got = S.sample_euler(denoiser, x_ve, sigmas, disable=True)
    assert rel_err(got, x) <= 1e-5


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_sde"])
def test_sigmas_as_a_numpy_array_sample_as_the_tensor_does(sampler):
    x, sigmas = initial(), karras(6).double()
    kwargs = {} if sampler == "dpmpp_2m" else {"generator": torch.Generator().manual_seed(0)}
    expected = S.sample(denoiser, x, sigmas, sampler=sampler, disable=True, **kwargs)
    if kwargs:
        kwargs["generator"].manual_seed(0)
    got = S.sample(denoiser, x, sigmas.numpy(), sampler=sampler, disable=True, **kwargs)
    assert torch.equal(got, expected)
    if kwargs:
        kwargs["generator"].manual_seed(0)
    backwards = sigmas.flip(0).numpy()[::-1]  # (a reversed view: negative strides)
    backwards.setflags(write=False)
    assert torch.equal(S.sample(denoiser, x, backwards, sampler=sampler, disable=True, **kwargs), expected)


def test_bad_inputs():
    x, sigmas = initial(), karras(5)
    with pytest.raises(ValueError) as err:
        S.sample(denoiser, x, sigmas, sampler="ddim_magic")
    for name in S.SAMPLERS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="1-D"):
        S.sample(denoiser, x, sigmas.reshape(1, -1), disable=True)
    with pytest.raises(ValueError, match="decreasing"):
        S.sample(denoiser, x, sigmas.flip(0), disable=True)
    with pytest.raises(ValueError, match="decreasing"):
        S.sample_euler(denoiser, x, torch.tensor([3.0, 1.0, 1.0, 0.0]), disable=True)
    with pytest.raises(ValueError, match=">= 0"):
        S.sample(denoiser, x, torch.tensor([3.0, 1.0, -1.0]), disable=True)
    with pytest.raises(ValueError, match="finite"):
        S.sample(denoiser, x, torch.tensor([float("nan"), 1.0, 0.0]), disable=True)
    with pytest.raises(ValueError, match="at least one"):
        S.sample(denoiser, x, torch.tensor([]), disable=True)
    with pytest.raises(ValueError, match="cuda_graph"):
        S.sample(denoiser, x, sigmas, cuda_graph=True, disable=True)
    cond = torch.ones(2, 4, 1, 1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale"):
            S.sample(denoiser, x, sigmas, guidance_scale=bad, cond=cond, uncond=cond, disable=True)
    with pytest.raises(ValueError, match="cond"):
        S.sample(denoiser, x, sigmas, guidance_scale=3.0, disable=True)
    with pytest.raises(ValueError, match="guidance_scale needs cond="):  # (would steer away from uncond)
        S.sample(denoiser, x, sigmas, guidance_scale=3.0, uncond=cond, disable=True)
    with pytest.raises(TypeError, match="option"):
        S.sample(denoiser, x, sigmas, sampler="dpmpp_2m", eta=1.0, disable=True)
    with pytest.raises(TypeError):
        S.sample(denoiser, x.long(), sigmas, disable=True)
    with pytest.raises(ValueError, match="solver_type"):
        S.sample_dpmpp_2m_sde(denoiser, x, sigmas, solver_type="rk4", disable=True)
    with pytest.raises(ValueError, match="order"):
        S.sample_unipc(denoiser, x, sigmas, order=4, disable=True)
    with pytest.raises(ValueError, match="order"):
        S.sample_lms(denoiser, x, sigmas, order=5, disable=True)
    with pytest.raises(TypeError, match="order"):
        S.sample(denoiser, x, sigmas, sampler="lms", order=2.5, disable=True)
    for r in (0.0, -0.5, math.nan, "0.5", True, None):
        with pytest.raises(ValueError, match="r must be"):
            S.sample_dpmpp_sde(denoiser, x, sigmas, r=r, disable=True)
    # any real number, as k-diffusion takes
    flat = lambda a, b: torch.zeros_like(x)  # noqa: E731
    expected = S.sample_dpmpp_sde(denoiser, x, sigmas, r=0.25, noise_sampler=flat, disable=True)
    for r in (np.float32(0.25), torch.tensor(0.25)):
        assert torch.equal(S.sample_dpmpp_sde(denoiser, x, sigmas, r=r, noise_sampler=flat, disable=True), expected)
    with pytest.raises(ValueError, match="> 0"):
        S.sample_dpm_fast(denoiser, x, 0.0, 14.6, 10, disable=True)
    with pytest.raises(ValueError, match="below sigma_max"):
        S.sample_dpm_fast(denoiser, x, 14.6, 0.03, 10, disable=True)
    with pytest.raises(ValueError, match="are equal"):
        S.sample_dpm_fast(denoiser, x, 1.0, 1.0, 10, disable=True)
    with pytest.raises(ValueError, match="n must be >= 1"):
        S.sample_dpm_fast(denoiser, x, 0.03, 14.6, 0, disable=True)
    with pytest.raises(TypeError, match="n must be an integer"):
        S.sample_dpm_fast(denoiser, x, 0.03, 14.6, 7.5, disable=True)
    # a denoiser returning something else (a diffusers model's tuple, say) is named as the culprit
    # (before a callback or guidance sees it)
    for wrap in (lambda out: (out,), lambda out: out.numpy()):
        with pytest.raises(TypeError, match="the denoiser must return a torch.Tensor"):
            S.sample(lambda x, s: wrap(denoiser(x, s)), x, sigmas, disable=True)
        with pytest.raises(TypeError, match="the denoiser must return a torch.Tensor"):
            S.sample(lambda x, s, cond=None: wrap(denoiser(x, s)), x, sigmas, guidance_scale=3.0,
                     cond=torch.ones(1), callback=lambda d: None, disable=True)
    with pytest.raises(TypeError, match="the denoiser must return a torch.Tensor, got NoneType"):
        S.sample(lambda x, s: None, x, sigmas, disable=True)
    with pytest.raises(TypeError, match="the denoiser must return a floating-point tensor, got torch.complex64"):
        S.sample(lambda x, s: x.to(torch.complex64), x, sigmas, disable=True)  # (not "sample must be ...")
    with pytest.raises(TypeError, match="noise_sampler must return a torch.Tensor, got NoneType"):
        S.sample_euler_ancestral(denoiser, x, sigmas, noise_sampler=lambda s, sn: None, disable=True)
    ddim = kdfast.schedulers.DDIMScheduler()
    ddim.set_timesteps(3)
    with pytest.raises(TypeError, match="the denoiser must return a floating-point tensor, got torch.complex64"):
        S.sample(lambda x, t: x.to(torch.complex64), x, ddim, disable=True)  # (the scheduler path too)
    sched = DPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        S.sample(denoiser, x, sched, disable=True)
    with pytest.raises(ValueError, match="cuda_graph"):
        sched.set_timesteps(5)
        S.sample(denoiser, x, sched, cuda_graph=True, disable=True)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sampler="euler_ancestral", eta="1"), TypeError, "eta must be a number"),
    (dict(sampler="euler_ancestral", eta=-1.0), ValueError, "eta must be >= 0"),
    (dict(sampler="euler_ancestral", eta=math.nan), ValueError, "eta must be finite"),
    (dict(sampler="dpmpp_2m_sde", s_noise="1"), TypeError, "s_noise must be a number"),
    (dict(sampler="dpmpp_3m_sde", s_noise=math.inf), ValueError, "s_noise must be finite"),
    (dict(sampler="euler", s_churn="1"), TypeError, "s_churn must be a number"),
    (dict(sampler="heun", s_churn=-1.0), ValueError, "s_churn must be >= 0"),
    (dict(sampler="dpm_2", s_tmin=math.nan), ValueError, "s_tmin must be a number, not NaN"),
    (dict(extra_args=[1, 2]), TypeError, "extra_args must be a dict"),
    (dict(extra_args="ab"), TypeError, "extra_args must be a dict"),
    (dict(sampler="euler_ancestral", noise_sampler=3), TypeError, "noise_sampler must be callable"),
    (dict(generator=3), TypeError, "generator must be a torch.Generator"),
    (dict(sampler=["euler"]), ValueError, "unknown sampler"),
    (dict(guidance_scale=np.True_, cond=torch.ones(2, 4, 1, 1)), TypeError, "guidance_scale must be a number"),
    (dict(guidance_scale=torch.tensor(True), cond=torch.ones(2, 4, 1, 1)), TypeError,
     "guidance_scale must be a number"),
    (dict(cuda_graph="False"), ValueError, "cuda_graph must be True or False"),
    # (unhashable values failed in the plans' cache: "unhashable type")
    (dict(sampler="dpmpp_2m_sde", solver_type=["heun"]), ValueError, "solver_type must be 'heun' or 'midpoint'"),
    (dict(sampler="unipc", variant=["bh1"]), ValueError, "variant must be 'bh1' or 'bh2'"),
    (dict(sampler="dpmpp_sde", r=[0.3]), ValueError, "r must be a positive number"),
    (dict(callback=5), TypeError, "callback must be callable"),
])
def test_bad_options_name_the_argument(kwargs, error, match):
    # (float() took "1" and numpy/tensor bools; a NaN s_noise was blamed on the sigmas)
    with pytest.raises(error, match=match):
        S.sample(denoiser, initial(), karras(5), disable=True, **kwargs)


def test_the_denoiser_and_sigma_values_are_named():
    x = initial()
    with pytest.raises(TypeError, match="the denoiser must be callable"):
        S.sample(None, x, karras(5), disable=True)
    with pytest.raises(TypeError, match="each of sigmas must be a number, got 'a'"):
        S.sample(denoiser, x, ["a", 0.0], disable=True)
    with pytest.raises(TypeError, match="the denoiser must be callable"):
        sched = DPMSolverMultistepScheduler()
        sched.set_timesteps(5)
        S.sample(None, x, sched, disable=True)


def test_real_sampler_options_take_any_real_number():
    x, sigmas = initial(), karras(5)
    flat = lambda a, b: torch.full_like(x, 0.5)  # noqa: E731
    expected = S.sample(denoiser, x, sigmas, sampler="euler_ancestral", eta=0.5, noise_sampler=flat, disable=True)
    for eta in (np.float32(0.5), torch.tensor(0.5)):
        got = S.sample(denoiser, x, sigmas, sampler="euler_ancestral", eta=eta, noise_sampler=flat, disable=True)
        assert torch.equal(got, expected)
    expected = S.sample(denoiser, x, sigmas, sampler="dpmpp_sde", r=0.3, noise_sampler=flat, disable=True)
    for r in (np.array(0.3), np.float64(0.3), torch.tensor(0.3, dtype=torch.float64)):  # (k-diffusion takes these)
        assert torch.equal(S.sample_dpmpp_sde(denoiser, x, sigmas, r=r, noise_sampler=flat, disable=True), expected)


@pytest.mark.parametrize("case", ["heun", "guided_two_calls"])
def test_a_denoiser_may_change_its_sigma_argument_in_place(case):
    # k-diffusion makes a sigma tensor per model call; the cached one was passed again (to Heun's
    # next step at the same sigma, to the conditional call of a two-call CFG): a denoiser that
    # turned it into a timestep in place (sigma.mul_(1000)) changed those calls' sigma
    def mutating(x, sigma, cond=None):
        plain = sigma.clone()
        sigma.mul_(1000.0)
        return denoiser(x, plain, cond=cond)

    x, sigmas, cond = initial(), karras(5), torch.ones(SHAPE[0], 4, 1, 1)
    kwargs = dict(sampler="heun") if case == "heun" else dict(sampler="euler", guidance_scale=3.0, cond=cond)
    torch.testing.assert_close(S.sample(mutating, x, sigmas, disable=True, **kwargs),
                               S.sample(denoiser, x, sigmas, disable=True, **kwargs), rtol=0, atol=0)


def test_scheduler_step_options_reach_every_step():
    # DDIM's eta and Euler's churn are step() arguments in diffusers (a pipeline passes them to
    # every step): sample() passes its options on to them, draw for draw with diffusers
    import diffusers

    def model(x, t, cond=None):
        return 0.3 * torch.tanh(x) + (0 if cond is None else 0.1 * cond)

    x = initial()
    for name, options in (("DDIMScheduler", dict(eta=0.5, use_clipped_model_output=True)),
                          ("EulerDiscreteScheduler", dict(s_churn=1.0, s_noise=0.9))):
        ours, theirs = getattr(kdfast.schedulers, name)(), getattr(diffusers, name)()
        ours.set_timesteps(6)
        theirs.set_timesteps(6)
        got = S.sample(model, x * ours.init_noise_sigma, ours, generator=torch.Generator().manual_seed(3),
                       disable=True, **options)
        g, y = torch.Generator().manual_seed(3), x * theirs.init_noise_sigma
        for t in theirs.timesteps:
            y = theirs.step(model(theirs.scale_model_input(y, t), t), t, y, generator=g, **options).prev_sample
        assert (got - y).abs().max() <= 1e-5 * max(1.0, y.abs().max().item()), name
        # with guidance too (step_cfg takes the same options)
        ours.set_timesteps(6)
        cond = torch.ones(2, 4, 1, 1)
        guided = S.sample(model, x * ours.init_noise_sigma, ours, generator=torch.Generator().manual_seed(3),
                          guidance_scale=2.0, cond=cond, uncond=-cond, disable=True, **options)
        assert guided.shape == x.shape and not torch.equal(guided, got)
    sched = kdfast.schedulers.EulerDiscreteScheduler()
    sched.set_timesteps(5)
    with pytest.raises(TypeError, match=r"no per-step option\(s\) \['eta'\].*s_churn"):
        S.sample(model, x, sched, eta=0.5, disable=True)
    with pytest.raises(TypeError, match="no per-step option"):  # the loop passes these itself
        S.sample(model, x, sched, return_dict=False, disable=True)


def test_guided_step_options_are_those_of_step_cfg():
    # with guidance the loop calls step_cfg alone: its own options (DDIM's CFG++) pass, which
    # step() does not take (they were refused as options of both)
    def model(x, t, cond=None):
        return 0.3 * torch.tanh(x) + (0 if cond is None else 0.1 * cond)

    x, cond = initial(), torch.ones(2, 4, 1, 1)
    sched = kdfast.schedulers.DDIMScheduler()
    sched.set_timesteps(5)
    got = S.sample(model, x, sched, guidance_scale=0.6, cond=cond, uncond=-cond, cfg_pp=True, disable=True)
    sched.set_timesteps(5)
    y = x
    for t in sched.timesteps:
        y = sched.step_cfg(model(y, t, -cond), model(y, t, cond), 0.6, t, y, cfg_pp=True).prev_sample
    torch.testing.assert_close(got, y)
    # at a scale of 1 too (it took the unguided path and refused cfg_pp; CFG++ at 1 still
    # re-noises with the unconditional output)
    for scale in (1.0, 1.0 - 1e-6):
        sched.set_timesteps(5)
        got = S.sample(model, x, sched, guidance_scale=scale, cond=cond, uncond=-cond, cfg_pp=True, disable=True)
        sched.set_timesteps(5)
        y = x
        for t in sched.timesteps:
            y = sched.step_cfg(model(y, t, -cond), model(y, t, cond), scale, t, y, cfg_pp=True).prev_sample
        torch.testing.assert_close(got, y)
    sched.set_timesteps(5)
    conditional = S.sample(model, x, sched, guidance_scale=1.0, cond=cond, uncond=-cond, disable=True)
    assert (got - conditional).abs().max() > 0.01
    # cfg_pp=False at 1 is plain guidance at 1: the conditional output alone, one call per step
    calls = []

    def counting(x, t, cond=None):
        calls.append(x.shape[0])
        return model(x, t, cond)

    sched.set_timesteps(5)
    same = S.sample(counting, x, sched, guidance_scale=1.0, cond=cond, uncond=-cond, cfg_pp=False, disable=True)
    assert calls == [x.shape[0]] * 5
    torch.testing.assert_close(same, conditional)
    sched.set_timesteps(5)
    with pytest.raises(TypeError, match=r"DDIMScheduler.step has no per-step option\(s\) \['cfg_pp'\].*with guidance"):
        S.sample(model, x, sched, cfg_pp=True, disable=True)  # no guidance: step() is called
    with pytest.raises(TypeError, match=r"it takes \['cfg_pp', 'eta', 'use_clipped_model_output'\]\)$"):  # (not uncond)
        S.sample(model, x, sched, guidance_scale=2.0, cond=cond, uncond=-cond, bogus=1, disable=True)


# --------------------------------------------------------------------------- no host reads in the loop


def _raise(*args, **kwargs):
    raise AssertionError("host read of a tensor value inside the sampling loop")


_READS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__")


def _arming(monkeypatch, den):
    """A denoiser that forbids tensor -> Python conversions from its first call on."""
    state = {"armed": False, "calls": 0}

    def model(*args, **kwargs):
        if not state["armed"]:
            for attr in _READS:
                monkeypatch.setattr(torch.Tensor, attr, _raise)
            state["armed"] = True
        state["calls"] += 1
        return den(*args, **kwargs)
    return model, state


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_no_host_reads_after_setup(monkeypatch, name):
    sigmas = karras(6)
    with monkeypatch.context() as m:
        model, state = _arming(m, denoiser)
        got = S.sample(model, initial(), sigmas, sampler=name, generator=torch.Generator().manual_seed(0),
                       callback=lambda info: None, disable=True)
    assert state["calls"] >= 6
    with monkeypatch.context() as m:  # guided, doubled batch
        model, state = _arming(m, denoiser)
        S.sample(model, initial(), sigmas, sampler=name, generator=torch.Generator().manual_seed(0),
                 guidance_scale=2.0, cond=torch.ones(2, 4, 1, 1), uncond=torch.zeros(2, 4, 1, 1), disable=True)
    expected = S.sample(denoiser, initial(), sigmas, sampler=name, generator=torch.Generator().manual_seed(0),
                        disable=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if name in ("euler", "heun", "dpm_2"):  # churn: sigma_hat tensors for the callback are made before the loop
        with monkeypatch.context() as m:
            model, state = _arming(m, denoiser)
            S.sample(model, initial(), sigmas, sampler=name, s_churn=1.0, generator=torch.Generator().manual_seed(0),
                     callback=lambda info: None, disable=True)
    # the patch really bites
    with monkeypatch.context() as m:
        model, _ = _arming(m, lambda x, s: denoiser(x, s) * float(s[0]))
        with pytest.raises(AssertionError, match="host read"):
            S.sample(model, initial(), sigmas, sampler=name, disable=True)


def test_no_host_reads_scheduler_loop(monkeypatch):
    sched = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", prediction_type="sample")
    sched.set_timesteps(6)
    sigma_by_index = [sched.sigmas[i:i + 1].clone() for i in range(6)]
    index = {"i": 0}

    def den(x, t, cond=None):  # no value lookups: the sigma comes from a precomputed list
        s = sigma_by_index[index["i"] % 6].expand(x.shape[0])
        index["i"] += 1
        return denoiser(x * torch.sqrt(1 + s * s).reshape(-1, 1, 1, 1), s, cond=cond)

    x = initial() / SIGMA_MAX
    with monkeypatch.context() as m:
        model, state = _arming(m, den)
        got = S.sample(model, x, sched, generator=torch.Generator().manual_seed(0), guidance_scale=2.0,
                       cond=torch.ones(2, 4, 1, 1), uncond=torch.zeros(2, 4, 1, 1), disable=True)
    assert state["calls"] == 6 and torch.isfinite(got).all()


# --------------------------------------------------------------------------- GPU


def _cuda_case():
    x = initial().cuda()
    sigmas = karras(8).cuda()
    return x, sigmas


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_gpu_loop_does_not_sync(name):
    x, sigmas = _cuda_case()
    state = {"armed": False}

    def model(x, sigma, cond=None):
        if not state["armed"]:
            torch.cuda.set_sync_debug_mode("error")
            state["armed"] = True
        return denoiser(x, sigma, cond=cond)

    try:
        got = S.sample(model, x, sigmas, sampler=name, generator=torch.Generator("cuda").manual_seed(0),
                       guidance_scale=3.0, cond=torch.ones(2, 4, 1, 1, device="cuda"),
                       uncond=torch.zeros(2, 4, 1, 1, device="cuda"), disable=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    if not any(k in name for k in NOISY):  # deterministic: same as on the CPU
        cpu = S.sample(denoiser, x.cpu(), sigmas.cpu(), sampler=name, guidance_scale=3.0,
                       cond=torch.ones(2, 4, 1, 1), uncond=torch.zeros(2, 4, 1, 1), disable=True)
        assert rel_err(got.cpu(), cpu) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(S.SAMPLERS))
@pytest.mark.parametrize("guided", [False, True])
def test_gpu_cuda_graph_equals_eager(name, guided):
    x, sigmas = _cuda_case()
    kwargs = dict(sampler=name, disable=True)
    if guided:
        kwargs.update(guidance_scale=4.0, cond=torch.ones(2, 4, 1, 1, device="cuda"),
                      uncond=torch.zeros(2, 4, 1, 1, device="cuda"))
    eager = S.sample(denoiser, x, sigmas, generator=torch.Generator("cuda").manual_seed(7), **kwargs)
    graphed = S.sample(denoiser, x, sigmas, generator=torch.Generator("cuda").manual_seed(7), cuda_graph=True,
                       **kwargs)
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
    # the default CUDA generator works too
    torch.cuda.manual_seed(3)
    eager = S.sample(denoiser, x, sigmas, **kwargs)
    torch.cuda.manual_seed(3)
    graphed = S.sample(denoiser, x, sigmas, cuda_graph=True, **kwargs)
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_gpu_cuda_graph_scheduler_loop():
    sched = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", prediction_type="sample")
    x = (initial() / SIGMA_MAX).cuda()

    def model(x, t):
        return denoiser(x, x.new_full((x.shape[0],), 1.0) * (t.float() / 100.0 + 0.05))

    sched.set_timesteps(8, device="cuda")
    eager = S.sample(model, x, sched, generator=torch.Generator("cuda").manual_seed(1), disable=True)
    sched.set_timesteps(8, device="cuda")
    graphed = S.sample(model, x, sched, generator=torch.Generator("cuda").manual_seed(1), cuda_graph=True)
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
    assert sched.step_index == 8


@pytest.mark.gpu
def test_gpu_cuda_graph_rejects_cpu_generator_and_callback():
    x, sigmas = _cuda_case()
    with pytest.raises(ValueError, match="generator"):
        S.sample(denoiser, x, sigmas, sampler="lcm", generator=torch.Generator(), cuda_graph=True)
    with pytest.raises(ValueError, match="callback"):
        S.sample(denoiser, x, sigmas, callback=lambda info: None, cuda_graph=True)


@pytest.mark.parametrize("fn, ref, opts", [(S.sample_euler_ancestral, ref_euler_ancestral, {}),
                                           (S.sample_euler, ref_euler, dict(s_churn=1.0))])
def test_default_noise_is_randn_like_x_in_its_memory_order(fn, ref, opts):
    # Without noise_sampler or generator the draws are k-diffusion's randn_like(x): for a
    # channels-last x that fills in channels-last order (torch.randn would put other values at
    # every position).
    x = initial().to(memory_format=torch.channels_last)
    sigmas = karras()
    torch.manual_seed(7)
    got = fn(denoiser, x, sigmas, disable=True, **opts)
    torch.manual_seed(7)
    with torch.no_grad():
        want = ref(denoiser, x, sigmas, noise_sampler=lambda sigma, sigma_next: torch.randn_like(x), **opts)
    assert (got - want).abs().max() / max(1.0, want.abs().max()) < 1e-5


@pytest.mark.parametrize("case", ["euler", "heun_churn", "euler_ancestral", "dpmpp_2m", "dpmpp_3m_sde", "lms", "unipc"])
def test_a_single_sigma_is_a_loop_of_no_steps(case):
    # as in k-diffusion: the sampler returns x itself, and calls nothing
    fn = CASES[case][0]
    x = initial()
    calls = []
    out = fn(lambda x, sigma, **kw: calls.append(sigma) or x, x, torch.tensor([SIGMA_MAX]), disable=True,
             callback=lambda info: calls.append(info))
    assert out is x and not calls


def test_generator_list_draws_each_samples_noise_from_its_own_generator():
    # diffusers' randn_tensor convention: sample i's noise is what generator i draws for a batch of one
    x = initial()
    n = x.shape[0]
    sigmas = S.get_sigmas_karras(6, 0.03, SIGMA_MAX)
    got = S.sample(denoiser, x, sigmas, sampler="euler_ancestral", disable=True,
                   generator=[torch.Generator().manual_seed(i) for i in range(n)])
    alone = [S.sample(denoiser, x[i:i + 1], sigmas, sampler="euler_ancestral", disable=True,
                      generator=torch.Generator().manual_seed(i)) for i in range(n)]
    torch.testing.assert_close(got, torch.cat(alone), rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"one torch.Generator per sample \\({n}\\)"):
        S.sample(denoiser, x, sigmas, sampler="euler_ancestral", generator=[torch.Generator()] * (n + 1),
                 disable=True)
    with pytest.raises(TypeError, match="generator must be a torch.Generator, a list of one per sample, or None"):
        S.sample(denoiser, x, sigmas, sampler="euler_ancestral", generator=3, disable=True)


@pytest.mark.parametrize("option", [dict(use_corrector="False"), dict(lower_order_final=1), dict(order=2.7),
                                    dict(order="2")])
def test_unipc_switches_and_order_are_checked_not_coerced(option):
    # bool("False") is True and int(2.7) is 2: both would run another sampler than the one asked for
    x, sigmas = initial(), S.get_sigmas_karras(6, 0.03, SIGMA_MAX)
    name = next(iter(option))
    error = TypeError if name == "order" else ValueError  # (as lms's order and the schedulers' switches)
    with pytest.raises(error, match=f"{name} must be"):
        S.sample(denoiser, x, sigmas, sampler="unipc", disable=True, **option)
    with pytest.raises(error, match=f"{name} must be"):
        S.sample_unipc(denoiser, x, sigmas, disable=True, **option)


@pytest.mark.parametrize("scale", ["3", True])
def test_guidance_scale_must_be_a_number_not_a_string_or_bool(scale):
    cond, uncond = torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)
    with pytest.raises(TypeError, match=re.escape(f"guidance_scale must be a number, got {scale!r}")):
        S.sample(denoiser, initial(), S.get_sigmas_karras(4, 0.03, SIGMA_MAX), guidance_scale=scale, cond=cond,
                 uncond=uncond, disable=True)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "lms"])
def test_a_wider_denoiser_output_widens_the_loop_like_k_diffusion(sampler):
    # k-diffusion's arithmetic promotes half-precision x to a float32 denoised: the loop goes on
    # in float32, exactly as one started from the same values in float32 (kdfast kept float16)
    x = initial()[:1].half()
    sigmas = S.get_sigmas_karras(5, 0.03, SIGMA_MAX)

    def wide(x, sigma):
        return denoiser(x.float(), sigma)

    got = S.sample(wide, x, sigmas, sampler=sampler, disable=True)
    assert got.dtype == torch.float32
    # (the first call's sigma is in x's dtype, float16, as k-diffusion's sigma * s_in: the rest
    # is the float32 loop; tests/test_sampling_vs_k_diffusion.py compares with k-diffusion itself)
    assert rel_err(got, S.sample(wide, x.float(), sigmas, sampler=sampler, disable=True)) <= 2e-3


@pytest.mark.parametrize("wider", ["cond", "uncond"])
def test_either_guidance_half_widens_the_loop(wider):
    # only the unconditional output's dtype was looked at: a float32 cond output left x in
    # float16 (k-diffusion's guided arithmetic promotes it)
    x = initial()[:1].half()
    sigmas = S.get_sigmas_karras(5, 0.03, SIGMA_MAX)

    def two_dtypes(x, sigma, cond=None):
        out = denoiser(x.float(), sigma) * (1.0 if cond is None else 1.1)
        return out if (cond is not None) == (wider == "cond") else out.half()

    got = S.sample(two_dtypes, x, sigmas, sampler="dpmpp_2m", guidance_scale=5.0, cond=torch.ones(1), uncond=None,
                   disable=True)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpmpp_2m", "dpmpp_sde", "dpm_fast", "dpm_adaptive"])
def test_another_default_device_changes_nothing(name):
    # torch.set_default_device("cuda") or a `with torch.device(...)` block: the cached plans'
    # coefficient tables were made there (and refused by the step). The meta device stands in
    # for a GPU: anything made on it cannot be read at all.
    x = initial()
    if name in ("dpm_fast", "dpm_adaptive"):
        args = (denoiser, x, FAST_MIN, FAST_MAX) + ((5,) if name == "dpm_fast" else ())
    else:
        args = (denoiser, x, karras(5))
    kwargs = dict(disable=True, callback=lambda info: None)
    if name in ("dpmpp_sde", "dpm_fast"):
        kwargs["noise_sampler"] = lambda sigma, sigma_next: torch.cos(x * float(sigma))  # made from x, not new
    expected = getattr(S, f"sample_{name}")(*args, **kwargs)
    S._cached_plan.cache_clear()
    with torch.device("meta"):
        got = getattr(S, f"sample_{name}")(*args, **kwargs)
    assert got.device == expected.device and torch.equal(got, expected)


def test_compiling_a_whole_sigma_loop_does_not_recompile_per_sigma():
    # The loop handed each model evaluation its sigma as a Python float, which torch.compile
    # guarded on: one recompile per sigma until torch's limit (8), then that frame ran eagerly
    from torch._dynamo.utils import counters

    net = torch.nn.Conv2d(4, 4, 3, padding=1)

    def model(x, sigma):
        return x - sigma.view(-1, 1, 1, 1) * net(x / (sigma ** 2 + 1).sqrt().view(-1, 1, 1, 1)) * 0.1

    sigmas = S.get_sigmas_karras(20, 0.03, SIGMA_MAX)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    torch._dynamo.reset()
    counters.clear()
    generate = torch.compile(lambda x: S.sample(model, x, sigmas, sampler="euler", disable=True), backend="aot_eager")
    with torch.no_grad():
        expected = S.sample(model, x, sigmas, sampler="euler", disable=True)
        assert torch.equal(generate(x), expected)
        graphs = counters["stats"]["unique_graphs"]
        assert torch.equal(generate(x), expected)
    assert graphs <= 6, graphs  # (12 before, with the recompile limit hit)
    assert counters["stats"]["unique_graphs"] == graphs  # a second call compiles nothing


def test_sample_refuses_torch_func_grad_rather_than_give_zero_gradients():
    # kdfast.sample runs under torch.no_grad (an inference loop): under torch.func.grad that gave
    # gradients of exactly 0, silently; a loop stepped by hand is differentiated
    x = initial(torch.float64)[:1]
    a = torch.tensor(0.7, dtype=torch.float64)

    def scheduler():
        s = DPMSolverMultistepScheduler()
        s.set_timesteps(3)
        return s

    def through_sample(a, x):
        return S.sample(lambda inp, t: torch.tanh(inp) * a, x, scheduler(), disable=True).square().sum()

    def by_hand(a, x):
        s = scheduler()
        for t in s.timesteps:
            x = s.step(torch.tanh(x) * a, t, x).prev_sample
        return x.square().sum()

    assert torch.equal(through_sample(a, x), by_hand(a, x))
    with pytest.raises(NotImplementedError, match="runs without gradients"):
        torch.func.grad(through_sample)(a, x)
    assert torch.func.grad(by_hand)(a, x) != 0


def test_eager_sampling_leaves_the_compiler_stack_unloaded():
    # (keeping the loop's host Python out of torch.compile's tracing must not import dynamo in
    # eager code: torch.compiler.disable did, 1.7 s on the first call)
    import subprocess
    import sys

    code = ("import sys, torch, kdfast\n"
            "kdfast.sample(lambda x, s: 0.5 * x, torch.randn(1, 2, 4, 4), [3.0, 1.0, 0.0], disable=True)\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["dpm_2_ancestral", "dpmpp_2s_ancestral"])
def test_an_ancestral_step_is_euler_where_k_diffusions_float32_sigma_down_is_zero(name):
    # k-diffusion computes sigma_down on the float32 sigma tensors: 0 for 80 -> 0.002, an Euler
    # step with one model call; kdfast took the float64 value (5e-8) and a second-order step
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 80
    seen = []

    def model(x, sigma):
        seen.append(round(float(sigma[0]), 4))
        return denoiser(x, sigma)

    sigmas = S.get_sigmas_karras(2, 0.002, 80.0)
    getattr(S, f"sample_{name}")(model, x, sigmas, disable=True, noise_sampler=lambda a, b: torch.ones_like(x))
    assert seen == [80.0, 0.002]
    seen.clear()  # in float64 sigma_down is not 0: the second-order step, as k-diffusion's in float64
    getattr(S, f"sample_{name}")(model, x.double(), sigmas.double(), disable=True,
                                 noise_sampler=lambda a, b: torch.ones_like(x.double()))
    assert len(seen) == 3


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2"])
@pytest.mark.parametrize("window", [dict(s_tmax=14.6), dict(s_tmin=0.7)])
def test_the_churn_window_compares_in_the_sigmas_dtype(name, window):
    # k-diffusion's s_tmin <= sigma <= s_tmax rounds the bounds to the float32 sigma's dtype:
    # the float32 sigma 14.6 (14.600000381) is inside s_tmax=14.6, which float64 excluded
    sigmas = torch.tensor([14.6, 7.0, 3.0, 0.7, 0.2, 0.0])
    hats = []
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 14.6
    getattr(S, f"sample_{name}")(denoiser, x, sigmas, disable=True, s_churn=1.0, s_noise=0.0, **window,
                                 callback=lambda d: hats.append(float(d["sigma_hat"])))
    gamma = min(1.0 / 5, 2 ** 0.5 - 1)
    # (tensor comparisons, as k-diffusion's: sigma 14.6 inside s_tmax=14.6, 0.7 inside s_tmin=0.7)
    inside = (window.get("s_tmin", 0.0) <= sigmas[:-1]) & (sigmas[:-1] <= window.get("s_tmax", math.inf))
    assert inside[0 if "s_tmax" in window else 3]
    expect = [s * (1 + gamma) if keep else s for s, keep in zip(sigmas[:-1].tolist(), inside.tolist())]
    assert hats == pytest.approx(expect, rel=1e-6)
