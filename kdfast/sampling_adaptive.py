"""k-diffusion's adaptive DPM-Solver (``sample_dpm_adaptive``), one fused kernel pass per model call.

DPM-Solver-12 and -23 (Lu et al. 2022, https://arxiv.org/abs/2206.00927) with k-diffusion's
PID step-size controller: each step attempt from ``t = -log(sigma)`` to ``t + h`` computes a
lower-order solution (DPM-Solver-1, or -2 with ``r1 = 1/3``) and a higher-order one (-2 with
``r1 = 1/2``, or -3) from the same model evaluations (2, or 3), estimates the local error from
their difference, accepts or rejects the attempt and adapts ``h``. Same signature, update
rules, controller, ``return_info`` dict and callback dict as k-diffusion's
``DPMSolver.dpm_solver_adaptive`` / ``sample_dpm_adaptive``.

How an attempt runs: every stage is one :func:`kdfast.ops.solver_step` pass, right after its
model evaluation. The first reads x and the model output, writes the next stage's input and
keeps eps (a history entry) and x (as aux, no copy); the last one writes, in the same pass,
the higher-order solution (plus the ancestral noise when ``eta > 0``) as its sample, the
lower-order one as aux (the next ``x_prev`` of the error scale) and their difference,
``x_low - x_high``, computed from the sources directly, as its history output. The error
norm ``||(x_low - x_high) / max(atol, rtol * max(|x_low|, |x_prev|))|| / sqrt(numel)`` is a few
elementwise ops and one reduction, and reading it (``.item()``) is the loop's only host read:
ONE PER STEP ATTEMPT, inherent to the algorithm (the controller decides on the host whether to
accept and what the next step size is). That read is also why this sampler cannot be captured
in a CUDA graph and is not among :data:`kdfast.sampling.SAMPLERS` (whose loops run from a
sigma list). The coefficients of an attempt depend on its step size, so they are computed per
attempt in float64 on the host (Python floats) and packed into one small CPU table.

Dtypes: float16/bfloat16 ``x`` is stepped with float32 math (the kernel's; eps and the error
terms are kept in float32, the error norm is computed in float32) and the result is in x's
dtype, whatever dtype the denoiser returns (unlike :mod:`kdfast.sampling`'s samplers, which
continue in a wider denoiser output's dtype: k-diffusion's adaptive solver also moves x, and
the sigmas it gives the denoiser, to float32 after a float32 denoiser's first call); float64
``x`` is stepped in float64 with float64 coefficients.

Differences from k-diffusion (see :func:`sample_dpm_adaptive`): times are float64 Python
floats (k-diffusion's are 0-d tensors of torch's default dtype, float32 usually); the noise of
an attempt is drawn before its acceptance is known (it is fused into the attempt's last pass)
and dropped when the attempt is rejected; reverse sampling is refused; a NaN error estimate
raises instead of looping forever.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import ops
from . import sampling as _sampling  # private helpers, looked up at call time (no import cycle)
from .schedulers._linear import AUX, H0, H1, NOISE, X, X0, Lin

__all__ = ["sample_dpm_adaptive"]

# Rejected attempts in a row after which the loop gives up. A rejection shrinks h by its step
# factor, below accept_safety: at k-diffusion's 0.81 this many leave h a factor 1e-92 smaller. An
# accept_safety above 1 can let the controller settle at error ~1 with a factor ~1, where every
# attempt is rejected and h stays put (k-diffusion loops forever there).
_MAX_REJECTIONS_IN_A_ROW = 1000

_HISTORY_NAMES = ("h0", "h1", "h2")


class _PIDStepSizeController:
    """k-diffusion's ``PIDStepSizeController`` (Python floats; ``error`` is a float)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float = 1,
                 accept_safety: float = 0.81, eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: List[float] = []

    @staticmethod
    def limiter(x: float) -> float:
        return 1 + math.atan(x - 1)

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = self.limiter(factor)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


class _Stage:
    """One kernel pass of an attempt: the model is called at ``sigma`` first."""

    __slots__ = ("sigma", "row", "n_hist", "use_aux", "write_history", "write_aux", "noise")

    def __init__(self, sigma: float, sample: Lin, history: Optional[Lin] = None, aux: Optional[Lin] = None):
        outs = [lin for lin in (sample, history, aux) if lin is not None]
        used = {name for lin in outs for name, v in lin.terms.items() if v != 0.0}
        self.sigma = sigma
        self.row = ops.coefficients(0.0, 1.0, sample.terms, None if history is None else history.terms,
                                    None if aux is None else aux.terms)
        self.n_hist = max([k + 1 for k, name in enumerate(_HISTORY_NAMES) if name in used], default=0)
        self.use_aux = "aux" in used
        self.write_history = history is not None
        self.write_aux = aux is not None
        self.noise = "noise" in used


def _attempt(order: int, s: float, t_to: float, noise_scale: float) -> List[_Stage]:
    """The kernel passes of one attempt from time ``s`` to ``t_to`` (t = -log sigma), as
    k-diffusion's ``dpm_solver_{1,2,3}_step`` (eps form, eps = (x - denoised) / sigma).

    The first pass keeps eps as history H0 and its input x as AUX; order 3's second pass
    pushes eps_r1 (H0, eps becomes H1). The last pass writes x_high (+ ``noise_scale`` * noise)
    as its sample, x_low - x_high as its history output and x_low as its aux output."""
    sig = lambda tt: math.exp(-tt)  # noqa: E731
    h = t_to - s
    if not h > 0:
        raise ValueError(f"the step size at sigma {sig(s):.6g} has collapsed to {h!r}")
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = s + r1 * h
    eps = (X - X0) / sig(s)
    stages = [_Stage(sig(s), X - (sig(s1) * math.expm1(r1 * h)) * eps, history=eps)]
    c_base = sig(t_to) * math.expm1(h)
    c_2 = sig(t_to) / (2 * r1) * math.expm1(h)  # DPM-Solver-2's correction, r1 = 1/2 or 1/3
    eps_r1 = (X - X0) / sig(s1)
    if order == 2:
        x_low = AUX - c_base * H0  # DPM-Solver-1
        corr = c_2 * (eps_r1 - H0)
        x_high = x_low - corr  # DPM-Solver-2
        diff = corr  # x_low - x_high
        last_sigma = sig(s1)
    else:
        r2 = 2 / 3
        s2 = s + r2 * h
        u2 = (AUX - (sig(s2) * math.expm1(r2 * h)) * H0
              - (sig(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)) * (eps_r1 - H0))
        stages.append(_Stage(sig(s1), u2, history=eps_r1))
        # now H0 = eps_r1, H1 = eps
        eps_r2 = (X - X0) / sig(s2)
        corr_low = c_2 * (H0 - H1)
        corr_high = (sig(t_to) / r2 * (math.expm1(h) / h - 1)) * (eps_r2 - H1)
        x_low = AUX - c_base * H1 - corr_low  # DPM-Solver-2, r1 = 1/3
        x_high = AUX - c_base * H1 - corr_high  # DPM-Solver-3
        diff = corr_high - corr_low
        last_sigma = sig(s2)
    if noise_scale != 0:
        x_high = x_high + noise_scale * NOISE
    stages.append(_Stage(last_sigma, x_high, history=diff, aux=x_low))
    for stage in stages:
        if not all(math.isfinite(v) for v in stage.row):
            raise ValueError(f"the step from sigma {sig(s):.6g} to {sig(t_to):.6g} (h = {h:.3g}) gives non-finite "
                             "solver coefficients; the step size has collapsed")
    return stages


# --------------------------------------------------------------------------- validation


def _check_args(sigma_min, sigma_max, order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, eta,
                s_noise, noise_sampler, generator, extra_args) -> Tuple[Any, ...]:
    _number = _sampling._number
    lo = _number("sigma_min", sigma_min, positive=True)
    hi = _number("sigma_max", sigma_max, positive=True)
    _sampling._check_sigma_interval(lo, hi)
    if isinstance(order, bool) or order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order!r}")
    rtol = _number("rtol", rtol, nonnegative=True)
    atol = _number("atol", atol, nonnegative=True)
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol must not both be 0 (the error scale max(atol, rtol * |x|) would be 0)")
    h_init = _number("h_init", h_init)
    if h_init == 0:
        raise ValueError("h_init must not be 0 (the first step size, in log sigma)")
    pcoeff, icoeff, dcoeff = (_number(n, v) for n, v in (("pcoeff", pcoeff), ("icoeff", icoeff), ("dcoeff", dcoeff)))
    accept_safety = _number("accept_safety", accept_safety)
    if accept_safety >= 1 + math.pi / 2:
        raise ValueError(f"accept_safety must be below 1 + pi/2 (the controller's largest step factor), got "
                         f"{accept_safety}: no step would ever be accepted")
    eta = _number("eta", eta, nonnegative=True)
    s_noise = _number("s_noise", s_noise)
    if noise_sampler is not None:
        _sampling._check_callable("noise_sampler", noise_sampler, "noise_sampler(sigma, sigma_next)")
    _sampling._check_generator(generator)
    _sampling._extra_args(extra_args)
    return lo, hi, int(order), rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, eta, s_noise


# --------------------------------------------------------------------------- the sampler


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81,
                        eta=0., s_noise=1., noise_sampler=None, return_info=False, generator=None):
    """DPM-Solver-12 and 23 (adaptive step size), k-diffusion's ``sample_dpm_adaptive``.

    Integrates from ``sigma_max`` down to ``sigma_min`` (both > 0, ``sigma_min < sigma_max``;
    reverse sampling is not supported) with steps of ``order`` 3 (DPM-Solver-3, its error
    estimated against DPM-Solver-2) or 2 (DPM-Solver-2 against -1), the step size in log sigma
    starting at ``h_init`` and set by a PID controller (``pcoeff``, ``icoeff``, ``dcoeff``) on
    the error norm relative to ``max(atol, rtol * max(|x_low|, |x_prev|))``; an attempt is
    accepted when its step factor is at least ``accept_safety``. ``eta > 0`` adds ancestral
    noise after each accepted step (``s_noise`` scales it). Returns x, or ``(x, info)`` with
    ``return_info``: ``info = {'steps', 'nfe', 'n_accept', 'n_reject'}`` (attempts, model
    evaluations, accepted and rejected attempts).

    Each model evaluation is followed by one fused :func:`kdfast.ops.solver_step` pass, and each
    attempt makes ONE host read, its error norm (the controller needs it on the host): this
    loop syncs with the device once per attempt and cannot be captured in a CUDA graph. As in
    k-diffusion, an attempt after a rejected one evaluates the model again at the same x and
    sigma (``nfe`` counts it).

    ``callback`` gets k-diffusion's dict after every attempt, accepted or not: ``{'sigma',
    'sigma_hat', 'x', 'i', 't', 't_up', 'denoised', 'error', 'h', 'steps', 'nfe', 'n_accept',
    'n_reject'}``: ``x`` and ``t = t_up = -log(sigma)`` after the attempt (unchanged when it was
    rejected), ``denoised`` the model output at the attempt's start, ``error`` its error norm (a
    0-d tensor on x's device), ``h`` the next step size (a float), ``i = steps - 1``.
    ``sigma``, ``sigma_hat``, ``t`` and ``t_up`` are float64 0-d CPU tensors. ``disable`` turns
    the tqdm progress bar (one tick per model evaluation, no total) off like k-diffusion's.

    Noise (``eta > 0``): ``noise_sampler(sigma, sigma_next)`` is called with the attempt's
    (sigma(s), sigma(t)), as k-diffusion's; when it is None, Gaussian noise is drawn from
    ``generator`` (not in k-diffusion; the global RNG when None), kdfast's convention for SDE
    samplers (pass a :class:`~kdfast.sampling.BrownianTreeNoiseSampler` for Brownian-tree
    noise). Because the noise is added by the attempt's last kernel pass, it is drawn before the
    attempt is accepted and dropped when it is rejected: a ``noise_sampler`` is also called for
    rejected attempts, so with the default Gaussian noise the same seed gives other (equally
    distributed) samples than k-diffusion once an attempt is rejected. A sampler keyed on its
    ``(sigma, sigma_next)`` arguments (a Brownian tree) gives the same noise as k-diffusion's.
    No noise is drawn where its scale is 0 (the last step).

    Differences from k-diffusion besides the noise: times and step sizes are float64 Python
    floats (k-diffusion's are tensors of torch's default dtype, float32 usually, so float32
    results agree to float32 rounding of the times, ~1e-6, and float64 results to ~1e-15 with
    k-diffusion run under ``torch.set_default_dtype(torch.float64)``); reverse sampling
    (``sigma_min > sigma_max``) is refused; ``rtol == atol == 0``, ``h_init == 0``, an
    unreachable ``accept_safety``, 1000 rejected attempts in a row (an ``accept_safety`` above 1
    can let the controller settle where every attempt is rejected) and a NaN error estimate
    raise instead of looping forever.
    """
    _sampling._check_x(x)
    _sampling.check_callback(callback)
    (sigma_min, sigma_max, order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, eta,
     s_noise) = _check_args(sigma_min, sigma_max, order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety,
                            eta, s_noise, noise_sampler, generator, extra_args)
    extra_args = {} if extra_args is None else dict(extra_args)
    if noise_sampler is None:
        noise_sampler = _sampling.default_noise_sampler(x, generator)
    evaluate = _sampling._model_caller(model, x, extra_args, None, None, None, ())
    with _sampling._progress(None, disable) as bar:
        x, info = _adaptive_loop(evaluate, x, sigma_min, sigma_max, order, rtol, atol, h_init, pcoeff, icoeff, dcoeff,
                                 accept_safety, eta, s_noise, noise_sampler, callback, bar)
    if return_info:
        return x, info
    return x


def _adaptive_loop(evaluate, x: torch.Tensor, sigma_min: float, sigma_max: float, order: int, rtol: float,
                   atol: float, h_init: float, pcoeff: float, icoeff: float, dcoeff: float, accept_safety: float,
                   eta: float, s_noise: float, noise_sampler: Callable, callback, bar) -> Tuple[torch.Tensor, Dict]:
    sig = lambda tt: math.exp(-tt)  # noqa: E731
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    # coefficient rows and the error estimate: float64 for a float64 x, else float32
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    # eps and the error terms in float32 for float16 / bfloat16 samples
    history_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    batch = x.shape[0]
    sqrt_numel = x.numel() ** 0.5

    s = t_start
    pid = _PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {'steps': 0, 'nfe': 0, 'n_accept': 0, 'n_reject': 0}
    if x.numel() == 0:  # nothing to sample (and an error norm of 0 / 0): as kdfast.sample, x itself
        return x, info
    # rtol * |x_prev|, x_prev being the last accepted x_low (x at the start)
    prev_scaled = x.to(compute).abs().mul_(rtol)
    rejected_in_a_row = 0
    while s < t_end - 1e-5:
        t = min(t_end, s + pid.h)
        if eta:
            sd, su = _sampling.get_ancestral_step(sig(s), sig(t), eta)
            t_to = min(t_end, -math.log(sd)) if sd > 0 else t_end
            su = math.sqrt(max(sig(t) ** 2 - sig(t_to) ** 2, 0.0))
        else:
            t_to, su = t, 0.
        stages = _attempt(order, s, t_to, su * s_noise)
        if compute != torch.float64 and not all(_sampling._fits_float32(v) for st in stages for v in st.row):
            raise ValueError(f"the step from sigma {sig(s):.6g} to {sig(t_to):.6g} (h = {t_to - s:.3g}) gives solver "
                             f"coefficients beyond float32's range, in which a {x.dtype} sample is stepped: sample in "
                             "float64, or take a sigma_min further from 0")
        rows = torch.tensor([st.row for st in stages], dtype=compute, device="cpu").unbind(0)
        x_in, aux, hist, denoised = x, x, [], None
        for k, stage in enumerate(stages):
            m, _ = evaluate(x_in, x.new_full((batch,), stage.sigma))
            _sampling._check_denoised(m, None)
            if torch.float64 in (m.dtype, x.dtype) and m.dtype != x.dtype:
                m = m.to(compute)  # (the kernel takes float64 with a float64 sample only; the result is in x's dtype)
            if k == 0:
                denoised = m
            noise = _sampling._draw_noise(noise_sampler, sig(s), sig(t)) if stage.noise else None
            out = ops.solver_step(x_in, m, rows[k], history=hist[:stage.n_hist], aux=aux if stage.use_aux else None,
                                  noise=noise, write_history=stage.write_history, write_aux=stage.write_aux,
                                  history_dtype=history_dtype)
            if bar is not None:
                bar.update(1)
            if k + 1 < len(stages):
                hist.insert(0, out.history)
                x_in = out.sample
        x_high, diff, x_low = out.sample, out.history, out.aux

        # error = ||(x_low - x_high) / max(atol, rtol * max(|x_low|, |x_prev|))|| / sqrt(numel)
        low_scaled = x_low.to(compute).abs().mul_(rtol)
        delta = torch.maximum(low_scaled, prev_scaled).clamp_(min=atol)
        # an entry that is 0 in all three samples has no error (not 0 / 0): where atol is 0
        no_error = (diff == 0) & (delta == 0) if atol == 0 else None
        scaled = diff.to(compute).div_(delta)  # (in place on diff itself where it is in compute's dtype)
        if no_error is not None:
            scaled = scaled.masked_fill_(no_error, 0.0)
        error = torch.linalg.vector_norm(scaled).div_(sqrt_numel)
        err = error.item()  # the step's one host read: the controller decides on the host
        if math.isnan(err):
            raise FloatingPointError(f"the error estimate of the step from sigma {sig(s):.6g} to {sig(t):.6g} is NaN: "
                                     "the model output or the sample holds non-finite values")
        accept = pid.propose_step(err)
        if accept:
            prev_scaled = low_scaled
            x = x_high
            s = t
            info['n_accept'] += 1
            rejected_in_a_row = 0
        else:
            info['n_reject'] += 1
            rejected_in_a_row += 1
            if rejected_in_a_row >= _MAX_REJECTIONS_IN_A_ROW:
                raise RuntimeError(
                    f"sample_dpm_adaptive: {rejected_in_a_row} attempts in a row were rejected at sigma {sig(s):.6g} "
                    f"(step size {pid.h:.3g}, error {err:.3g}): no step passes accept_safety={accept_safety} here"
                    + (" (above 1, the controller can settle where every attempt is rejected; k-diffusion's "
                       "default is 0.81)" if accept_safety > 1 else ""))
        info['nfe'] += order
        info['steps'] += 1
        if callback is not None:
            t_cb = torch.tensor(s, dtype=torch.float64, device="cpu")
            sigma_cb = torch.tensor(sig(s), dtype=torch.float64, device="cpu")
            callback({'sigma': sigma_cb, 'sigma_hat': sigma_cb, 'x': x, 'i': info['steps'] - 1, 't': t_cb,
                      't_up': t_cb, 'denoised': denoised, 'error': error, 'h': pid.h, **info})
    return x, dict(info)
