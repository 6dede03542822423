"""k-diffusion-style samplers whose every update is one fused kernel pass, and ``sample``.

The samplers keep k-diffusion's signatures and its denoiser convention,
``model(x, sigma * s_in, **extra_args) -> denoised`` with ``x = x0 + sigma * eps``, and its
update rules (``sample_euler``, ``sample_euler_ancestral``, ``sample_heun``, ``sample_dpm_2``,
``sample_dpm_2_ancestral``, ``sample_lms``, ``sample_dpm_fast``, ``sample_dpmpp_2s_ancestral``,
``sample_dpmpp_sde``, ``sample_dpmpp_2m``, ``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde``, plus
``sample_lcm`` and a bh1/bh2 UniPC predictor-corrector ``sample_unipc``, and
``sample_dpm_adaptive`` (:mod:`kdfast.sampling_adaptive`), whose step-size control reads its
error norm on the host once per step attempt: the one sampler whose loop makes host reads and
cannot be captured in a CUDA graph). What differs is how a step runs: the
sigmas are read to the host once, before the loop; every step's update is written as a linear
combination of the fused kernel's sources (``X``, ``X0``, ``H0`` ..., see
:mod:`kdfast.schedulers._linear`) and its coefficients are computed in float64 and packed once
per sigma list; the loop then makes exactly one :func:`kdfast.ops.solver_step` call per model
evaluation and no host reads, so it can be captured in a CUDA graph (``sample(...,
cuda_graph=True)``).

Dtypes: ``x`` may be float32, float16, bfloat16 or float64. float16/bfloat16 latents are stepped
with float32 math (and, where the denoiser returns a wider dtype, continue in it, as
k-diffusion's arithmetic promotes them); float64 latents in float64, by the op's reference backend (the compiled
kernels stop at float32) and with the coefficient table kept in float64, so a float64 loop
matches k-diffusion's float64 samplers (float64 sigmas) to rounding, ~1e-15. The result has
x's dtype, or a wider denoiser output's. k-diffusion's arithmetic also promotes x to the
sigmas' dtype, which kdfast does not follow: with float16 latents and float32 sigmas,
k-diffusion's Euler, Heun, DPM-2, LMS and ancestral samplers return float32 (kdfast float16,
from the same float32 step math), and with float32 latents and float64 sigmas, float64. Where
k-diffusion ends on ``x = denoised`` (DPM-Solver++ 2M/3M SDE, LCM), it returns the denoiser's
dtype even when narrower; kdfast returns x's.

Sigmas: a strictly decreasing list ending at 0 or above; a single value is a loop of no steps
(the sampler returns ``x``), as in k-diffusion.

Noise: SDE and ancestral samplers take k-diffusion's ``noise_sampler(sigma, sigma_next)`` (called
with Python floats where k-diffusion passes 0-d tensors; DPM-Solver++ SDE's stage sigmas are
computed in the sigmas' dtype, as k-diffusion computes them, so a Brownian tree gives its
draws; k-diffusion's own tree rounds Python floats to float32, so with float64 sigmas use
:class:`BrownianTreeNoiseSampler`) and,
when none is given, draw ``torch.randn_like(x)`` from the global RNG (k-diffusion's default),
or, with ``generator``, ``x``-shaped contiguous draws from it (diffusers' ``randn_tensor``;
a list of one generator per sample draws each sample's noise from its own, as there).
``sample_dpmpp_sde``, ``sample_dpmpp_2m_sde`` and ``sample_dpmpp_3m_sde`` therefore default to
Gaussian noise, not k-diffusion's Brownian tree (pass a :class:`BrownianTreeNoiseSampler` as
``noise_sampler`` to get it).
Churn noise (``s_churn > 0`` in Euler / Heun / DPM-2) is drawn with
``noise_sampler(sigmas[i], sigmas[i + 1])`` and added by the kernel of the step before (the
first step's by one extra kernel pass before the loop). It is drawn only for the steps that
churn, where k-diffusion draws ``randn_like(x)`` on every step (with ``s_churn=0`` too) and
discards the draws it does not use: with an ``s_tmin`` / ``s_tmax`` window that leaves some
steps unchurned, the same global seed therefore gives other (equally distributed) samples than
k-diffusion. Pass a ``noise_sampler`` keyed on its ``(sigma, sigma_next)`` arguments to compare
the two draw for draw.

Callbacks get k-diffusion's ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}``, to read. The step
that follows reads ``x`` and the model's output after the callback returns, so an in-place
edit of ``x`` or ``denoised`` there changes that whole step, where k-diffusion's Euler, Heun,
DPM-2 and LMS have formed their derivative before calling it; with guidance, ``denoised`` is
a combined copy that the (fused) step does not read.
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
import warnings
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from . import ops
from ._checks import check_flag, not_a_number
from .ops._tensors import reference_required
from .ops.solver_step import NUM_COEFS
from .schedulers._linear import AUX, H0, H1, H2, NOISE, X, X0, Lin
from .schedulers.base import promoted_sample, run_eagerly
from .schedulers.lms_discrete import lms_coefficients

__all__ = [
    "sample", "CapturedSampler", "SAMPLERS",
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_lms", "sample_dpm_fast", "sample_dpm_adaptive", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_lcm", "sample_unipc", "dpm_fast_sigmas",
    "append_zero", "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential",
    "get_sigmas_vp", "loglinear_interp", "get_sigmas_ays", "AYS_NOISE_LEVELS",
    "default_noise_sampler", "get_ancestral_step", "BrownianTreeNoiseSampler",
]

NoiseSampler = Callable[[Any, Any], torch.Tensor]

# --------------------------------------------------------------------------- schedules (k-diffusion's)


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """k-diffusion's helper: ``x`` with a 0 appended (a schedule that ends at sigma 0)."""
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """Constructs the noise schedule of Karras et al. (2022)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device='cpu'):
    """Constructs an exponential noise schedule."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp()
    return append_zero(sigmas)


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1., device='cpu'):
    """Constructs an polynomial in log sigma noise schedule."""
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return append_zero(sigmas)


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device='cpu'):
    """Constructs a continuous VP noise schedule."""
    t = torch.linspace(1, eps_s, n, device=device)
    sigmas = torch.sqrt(torch.exp(beta_d * t ** 2 / 2 + beta_min * t) - 1)
    return append_zero(sigmas)


# Align Your Steps (Sabour et al. 2024): NVIDIA's published 10-step noise levels (11 numbers,
# the last is replaced by 0 when sampling).
AYS_NOISE_LEVELS = {
    "SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    "SVD": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def loglinear_interp(t_steps, num_steps: int) -> np.ndarray:
    """Log-linear interpolation of a decreasing sequence to ``num_steps`` points (AYS)."""
    t_steps = np.asarray(t_steps, dtype=np.float64)
    if t_steps.ndim != 1 or len(t_steps) < 2:
        raise ValueError(f"t_steps must be a 1-D sequence of at least 2 values, got shape {t_steps.shape}")
    if np.any(t_steps <= 0) or not np.all(np.isfinite(t_steps)):
        raise ValueError("t_steps must be positive and finite (they are interpolated in log space)")
    if int(num_steps) < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    new_xs = np.linspace(0, 1, int(num_steps))
    new_ys = np.interp(new_xs, xs, ys)
    return np.exp(new_ys)[::-1].copy()


def get_sigmas_ays(n, sigmas_10="SD1", device='cpu') -> torch.Tensor:
    """Align-Your-Steps sigmas for ``n`` steps: ``n + 1`` values, the last 0.

    ``sigmas_10`` is a 10-step AYS list of 11 noise levels (or a key of
    :data:`AYS_NOISE_LEVELS`); it is log-linearly interpolated to ``n`` steps when ``n != 10``,
    as ComfyUI's AlignYourStepsScheduler does.
    """
    if isinstance(sigmas_10, str):
        if sigmas_10 not in AYS_NOISE_LEVELS:
            raise ValueError(f"unknown AYS model type {sigmas_10!r}; expected one of {', '.join(AYS_NOISE_LEVELS)}")
        sigmas_10 = AYS_NOISE_LEVELS[sigmas_10]
    if isinstance(sigmas_10, torch.Tensor):
        sigmas_10 = sigmas_10.detach().cpu().double().tolist()
    try:
        sigmas = [float(s) for s in sigmas_10]
    except (TypeError, ValueError):
        raise TypeError(f"sigmas_10 must be a model type or a list of noise levels, got {sigmas_10!r}") from None
    if len(sigmas) < 2 or not all(math.isfinite(s) and s > 0 for s in sigmas) or any(
            a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas_10 must hold at least 2 finite, positive, strictly decreasing noise levels, "
                         f"got {sigmas}")
    n = _int_option("n", n, minimum=1)
    if n + 1 != len(sigmas):
        sigmas = loglinear_interp(sigmas, n + 1).tolist()
    sigmas[-1] = 0.0
    return torch.tensor(sigmas, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------- noise


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.) -> Tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step, as k-diffusion computes them (floats)."""
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _as_sigma_tensor(value: float, dtype: torch.dtype) -> torch.Tensor:
    """``value`` as k-diffusion holds a sigma: a 0-d tensor of the sigmas' ``dtype`` (on the CPU,
    whatever the default device), for arithmetic that must round as k-diffusion's does."""
    return torch.tensor(value, dtype=dtype, device="cpu")


def _ancestral_step_in(sigma_from: float, sigma_to: float, eta: float, dtype: torch.dtype) -> Tuple[float, float]:
    """:func:`get_ancestral_step` in float64, but ``sigma_down`` is 0 exactly where k-diffusion's,
    computed on the sigma tensors (their ``dtype``), is 0: its samplers take an Euler step
    there, and in float32 a next sigma below ~2.5e-4 of the current one already gives 0."""
    sigma_down, sigma_up = get_ancestral_step(sigma_from, sigma_to, eta)
    f, t = (_as_sigma_tensor(v, dtype) for v in (sigma_from, sigma_to))
    down, up = (float(v) for v in get_ancestral_step(f, t, eta)) if eta else (sigma_to, 0.)
    return (0., sigma_up) if down == 0 else (down, up) if sigma_down == 0 else (sigma_down, sigma_up)


def default_noise_sampler(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> NoiseSampler:
    """``noise_sampler(sigma, sigma_next)`` drawing ``torch.randn_like(x)``-equivalent noise.

    With ``generator`` the draws come from it (on the generator's device, then moved to x's,
    as diffusers' ``randn_tensor`` does); without, from torch's global RNG like ``randn_like``.
    """
    shape, dtype, device = tuple(x.shape), x.dtype, x.device
    if generator is None:
        # randn_like itself (k-diffusion's default): it fills in x's memory order, so a
        # channels-last x gets the same value at every position (torch.randn fills contiguously)
        return lambda sigma, sigma_next: torch.randn_like(x)
    if isinstance(generator, (list, tuple)):
        # one generator per sample, as diffusers' randn_tensor takes them: sample i's noise is
        # what generator i draws for a batch of one
        if len(generator) != shape[0] or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator: a list must hold one torch.Generator per sample ({shape[0]}), got "
                             f"{[type(g).__name__ for g in generator]}")
        one = (1,) + shape[1:]
        return lambda sigma, sigma_next: torch.cat(
            [torch.randn(one, generator=g, dtype=dtype, device=g.device).to(device) for g in generator])
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, a list of one per sample, or None, got "
                        f"{type(generator).__name__}")
    gen_device = generator.device
    if gen_device.type == device.type:
        return lambda sigma, sigma_next: torch.randn(shape, generator=generator, dtype=dtype, device=device)
    return lambda sigma, sigma_next: torch.randn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


def _generator_seed(seed) -> int:
    """A ``torch.Generator`` seed: an integer (not a bool, nor a float, string or other thing
    ``int()`` would read) in the range ``manual_seed`` takes, ``[-2**63, 2**64)``."""
    try:
        value = operator.index(seed) if not isinstance(seed, bool) else None
    except TypeError:
        value = None
    if value is None or not -2 ** 63 <= value < 2 ** 64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    return value


def _tree_seeds(seed):
    """A Brownian tree's seed (an int; random for None), or a list of them for a sequence of
    one per batch item (a list, tuple, range, 1-D array or tensor, as k-diffusion takes)."""
    if seed is None:
        return int(torch.randint(0, 2 ** 63 - 1, []).item())
    if isinstance(seed, (list, tuple, range)) or (isinstance(seed, (np.ndarray, torch.Tensor)) and seed.ndim == 1):
        return [_one_seed(s) for s in seed]
    return _one_seed(seed)


def _one_seed(seed) -> int:
    if isinstance(seed, (np.ndarray, torch.Tensor)) and seed.ndim == 0:
        seed = seed.item()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or a sequence of one int per batch item, got {seed!r}")
    return int(seed)


class BrownianTreeNoiseSampler:
    """``noise_sampler(sigma, sigma_next)`` drawing from one Brownian motion over
    ``[sigma_min, sigma_max]`` (a ``torchsde.BrownianTree``; needs ``torchsde``): the noise of
    an interval is the motion's increment over it divided by the square root of its length.
    Draws over overlapping intervals are therefore correlated as the SDE's noise is, and a
    seed fixes one path whatever the number of steps. This is k-diffusion's default for its SDE
    samplers. It runs on the host (not inside a CUDA graph).

    Args:
        x: a tensor of the shape, dtype and device of the draws.
        sigma_min, sigma_max: the interval the motion covers (the schedule's smallest nonzero
            sigma and its largest).
        seed: an int, or a sequence of ints (list, tuple, range, 1-D array or tensor: one
            independent motion per batch item); random when None.
        transform: maps a sigma (a 0-d tensor in the dtype of the end points given, else
            torch's default, as k-diffusion's) to the motion's time; the identity by default.
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed=None, transform=None):
        try:
            import torchsde
        except ImportError:
            raise ImportError("BrownianTreeNoiseSampler needs torchsde: pip install torchsde") from None
        self.transform = transform
        # A transform sees a sigma in the dtype k-diffusion gives it (the schedule's: the end
        # points' dtype, else torch's default), so that a seed draws k-diffusion's noise: the
        # tree rounds its times, and a transform's value in float64 differs from it in float32.
        self.sigma_dtype = next((s.dtype for s in (sigma_max, sigma_min)
                                 if isinstance(s, torch.Tensor) and s.is_floating_point()), torch.get_default_dtype())
        t0, t1 = self._time(sigma_min), self._time(sigma_max)
        self.sign = 1 if t0 < t1 else -1
        lo, hi = (t0, t1) if t0 < t1 else (t1, t0)
        seeds = _tree_seeds(seed)
        self.batched = isinstance(seeds, list)
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"seed: one per batch item ({x.shape[0]}), got {len(seeds)}")
        w0 = torch.zeros_like(x[0] if self.batched else x)
        self.trees = [torchsde.BrownianTree(lo, w0, hi, entropy=s) for s in (seeds if self.batched else [seeds])]

    def _time(self, sigma) -> torch.Tensor:
        if self.transform is None:
            # float64 times: the samplers pass Python floats, which a float32 tensor would round
            # outside the tree's own (float64) end points
            return torch.as_tensor(sigma, dtype=torch.float64)
        return self.transform(torch.as_tensor(sigma, dtype=self.sigma_dtype))

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0, t1 = self._time(sigma), self._time(sigma_next)
        sign = self.sign * (1 if t0 < t1 else -1)
        lo, hi = (t0, t1) if t0 < t1 else (t1, t0)
        with warnings.catch_warnings():
            # the tree rounds its end points (to its tolerance's digits) and clamps queries at
            # the schedule's ends into them, with a warning each time: the clamp is what we want
            warnings.filterwarnings("ignore", message="Should have t[ab]", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return (w if self.batched else w[0]) / (t1 - t0).abs().sqrt()


# --------------------------------------------------------------------------- plans


class _Eval(NamedTuple):
    """One fused kernel call (after one model evaluation unless ``model`` is False)."""

    step: int                 # k-diffusion's outer step index i
    model: bool               # evaluate the model first (False: churn pass before the loop)
    sigma: float              # the sigma the model is called at
    sigma_hat: float          # for the callback
    callback: bool            # first evaluation of step i: report it
    end: bool                 # last call of step i (progress bar)
    row: int                  # index into the plan's coefficient table
    n_hist: int               # history entries read (newest first)
    use_aux: bool
    noise: Optional[Tuple[float, float]]  # noise_sampler arguments when the step adds noise
    write_history: bool
    write_aux: bool
    aux_from_x: bool          # keep this call's input sample as aux (no copy)


class _Plan(NamedTuple):
    evals: Tuple[_Eval, ...]
    rows: Tuple[torch.Tensor, ...]  # float32 CPU views of one packed table
    steps: int
    rows64: Tuple[torch.Tensor, ...]  # the same table in float64, for float64 samples
    float32_overflow: Optional[int]  # the first step whose coefficients float32 cannot hold, if any


_FLOAT32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103  # halfway from float32's largest value to 2**128: rounds to inf


def _fits_float32(value: float) -> bool:
    """Whether a finite Python float stays finite rounded to float32 (no tensor, no host read)."""
    return abs(value) < _FLOAT32_OVERFLOW


def _float32_overflow_error(plan: _Plan, dtype: torch.dtype) -> ValueError:
    """A plan whose float32 rows hold an inf (sigmas near 0 far apart: exp(h) overflows), met by
    a sample stepped in float32 (any but float64, after promotion to the denoiser's dtype)."""
    return ValueError(f"step {plan.float32_overflow}: the sigmas give solver coefficients beyond float32's range, "
                      f"in which a {dtype} sample is stepped: sample in float64, or take a smallest sigma further "
                      "from 0 or more steps")


def _uses(lins: Sequence[Optional[Lin]], source: str) -> bool:
    return any(lin is not None and lin.terms.get(source, 0.0) != 0.0 for lin in lins)


class _Builder:
    """Collects a sampler's kernel calls; X0 is the model output itself (cx=0, cm=1)."""

    def __init__(self, sigmas: Sequence[float]):
        self.s = sigmas
        self.n = len(sigmas) - 1
        self.evals: List[_Eval] = []
        self.rows: List[List[float]] = []

    def add(self, i: int, sigma: float, sample: Lin, *, history: Optional[Lin] = None, aux: Optional[Lin] = None,
            aux_from_x: bool = False, noise: Optional[Tuple[float, float]] = None, callback: bool = True,
            sigma_hat: Optional[float] = None, model: bool = True, end: bool = True) -> None:
        outs = (sample, history, aux)
        row = ops.coefficients(0.0, 1.0, sample.terms, None if history is None else history.terms,
                               None if aux is None else aux.terms)
        if not all(math.isfinite(v) for v in row):
            raise ValueError(f"step {i}: the sigmas give non-finite solver coefficients ({sample!r}); "
                             "check that they are positive, strictly decreasing and not too close together")
        n_hist = max([k + 1 for k, name in enumerate(("h0", "h1", "h2")) if _uses(outs, name)], default=0)
        needs_noise = _uses(outs, "noise")
        if needs_noise and noise is None:
            raise AssertionError("a step that adds noise needs noise_sampler arguments")
        self.evals.append(_Eval(
            step=i, model=model, sigma=float(sigma), sigma_hat=float(sigma if sigma_hat is None else sigma_hat),
            callback=callback and model, end=end, row=len(self.rows), n_hist=n_hist, use_aux=_uses(outs, "aux"),
            noise=noise if needs_noise else None, write_history=history is not None, write_aux=aux is not None,
            aux_from_x=aux_from_x))
        self.rows.append(row)

    def plan(self) -> _Plan:
        # host tables, whatever torch's default device (a plan is cached and serves every device)
        table64 = torch.tensor(self.rows, dtype=torch.float64, device="cpu").reshape(len(self.rows), NUM_COEFS)
        table = table64.to(torch.float32)
        float32_overflow = next((ev.step for ev in self.evals
                                 if not all(_fits_float32(v) for v in self.rows[ev.row])), None)
        return _Plan(tuple(self.evals), tuple(table.unbind(0)), self.n, tuple(table64.unbind(0)), float32_overflow)


def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, as torch rounds a Python number it compares with a tensor."""
    return float(_as_sigma_tensor(value, dtype))


def _churn_amounts(s, s_churn, s_tmin, s_tmax, s_noise, dtype: torch.dtype) -> List[Tuple[float, float]]:
    """(sigma_hat, churn noise scale) per step, k-diffusion's Algorithm 2 rule. Its window test
    compares the bounds with the sigma tensor: in the sigmas' ``dtype`` (s_tmax = 14.6 holds a
    float32 sigma of 14.6, which is 14.600000381)."""
    n = len(s) - 1
    s_tmin, s_tmax = _in_dtype(s_tmin, dtype), _in_dtype(s_tmax, dtype)
    out = []
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= s[i] <= s_tmax else 0.
        sigma_hat = s[i] * (gamma + 1)
        out.append((sigma_hat, s_noise * (sigma_hat ** 2 - s[i] ** 2) ** 0.5 if gamma > 0 else 0.))
    return out


class _Churn:
    """Adds step i+1's churn noise to step i's last kernel call (and step 0's before the loop)."""

    def __init__(self, b: _Builder, s_churn, s_tmin, s_tmax, s_noise, sigmas_dtype: str):
        self.b, self.s = b, b.s
        self.amounts = _churn_amounts(b.s, s_churn, s_tmin, s_tmax, s_noise, getattr(torch, sigmas_dtype))
        # (a negative s_noise churns too: the noise is subtracted, as k-diffusion adds eps * s_noise)
        if self.amounts and self.amounts[0][1] != 0:
            b.add(0, self.s[0], X + self.amounts[0][1] * NOISE, noise=(self.s[0], self.s[1]), model=False,
                  end=False)

    def sigma_hat(self, i: int) -> float:
        return self.amounts[i][0]

    def after(self, i: int, update: Lin) -> Tuple[Lin, Optional[Tuple[float, float]]]:
        if i + 1 < len(self.amounts) and self.amounts[i + 1][1] != 0:
            return update + self.amounts[i + 1][1] * NOISE, (self.s[i + 1], self.s[i + 2])
        return update, None


def _euler_update(sigma_hat: float, sigma_next: float) -> Lin:
    # x + d * dt with d = (x - denoised) / sigma_hat
    dt = sigma_next - sigma_hat
    return X + (dt / sigma_hat) * (X - X0)


def _plan_euler(s, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1., sigmas_dtype="float32") -> _Plan:
    b = _Builder(s)
    churn = _Churn(b, s_churn, s_tmin, s_tmax, s_noise, sigmas_dtype)
    for i in range(b.n):
        sh = churn.sigma_hat(i)
        update, noise = churn.after(i, _euler_update(sh, s[i + 1]))
        b.add(i, sh, update, noise=noise, sigma_hat=sh)
    return b.plan()


def _plan_heun(s, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1., sigmas_dtype="float32") -> _Plan:
    b = _Builder(s)
    churn = _Churn(b, s_churn, s_tmin, s_tmax, s_noise, sigmas_dtype)
    for i in range(b.n):
        sh, sn = churn.sigma_hat(i), s[i + 1]
        if sn == 0:
            update, noise = churn.after(i, _euler_update(sh, sn))
            b.add(i, sh, update, noise=noise, sigma_hat=sh)
            continue
        dt = sn - sh
        # x_2 = x + d * dt; keep x (aux) and denoised (history) for the second stage
        b.add(i, sh, _euler_update(sh, sn), history=X0, aux_from_x=True, sigma_hat=sh, end=False)
        d = (AUX - H0) / sh
        d_2 = (X - X0) / sn
        update, noise = churn.after(i, AUX + (0.5 * dt) * (d + d_2))
        b.add(i, sn, update, noise=noise, callback=False)
    return b.plan()


def _plan_dpm_2(s, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1., sigmas_dtype="float32") -> _Plan:
    b = _Builder(s)
    churn = _Churn(b, s_churn, s_tmin, s_tmax, s_noise, sigmas_dtype)
    for i in range(b.n):
        sh, sn = churn.sigma_hat(i), s[i + 1]
        if sn == 0:
            update, noise = churn.after(i, _euler_update(sh, sn))
            b.add(i, sh, update, noise=noise, sigma_hat=sh)
            continue
        sigma_mid = math.exp(0.5 * (math.log(sh) + math.log(sn)))
        b.add(i, sh, _euler_update(sh, sigma_mid), aux_from_x=True, sigma_hat=sh, end=False)
        update, noise = churn.after(i, AUX + ((sn - sh) / sigma_mid) * (X - X0))
        b.add(i, sigma_mid, update, noise=noise, callback=False)
    return b.plan()


def _plan_euler_ancestral(s, eta=1., s_noise=1.) -> _Plan:
    b = _Builder(s)
    for i in range(b.n):
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta=eta)
        update = X + ((sigma_down - s[i]) / s[i]) * (X - X0)
        noise = None
        if s[i + 1] > 0 and s_noise * sigma_up != 0:
            update = update + (s_noise * sigma_up) * NOISE
            noise = (s[i], s[i + 1])
        b.add(i, s[i], update, noise=noise)
    return b.plan()


def _plan_dpmpp_2m(s) -> _Plan:
    b = _Builder(s)
    for i in range(b.n):
        sn = s[i + 1]
        keep = X0 if i + 1 < b.n else None
        if sn == 0:
            b.add(i, s[i], X0, history=keep)
            continue
        h = math.log(s[i]) - math.log(sn)  # t_next - t with t = -log(sigma)
        if i == 0:
            denoised_d = X0
        else:
            r = (math.log(s[i - 1]) - math.log(s[i])) / h
            denoised_d = (1 + 1 / (2 * r)) * X0 - (1 / (2 * r)) * H0
        b.add(i, s[i], (sn / s[i]) * X - math.expm1(-h) * denoised_d, history=keep)
    return b.plan()


def _plan_dpmpp_2m_sde(s, eta=1., s_noise=1., solver_type='midpoint') -> _Plan:
    b = _Builder(s)
    h_last = h = None
    for i in range(b.n):
        sn = s[i + 1]
        keep = X0 if i + 1 < b.n else None
        noise = None
        if sn == 0:
            update = X0  # denoising step
        else:
            h = math.log(s[i]) - math.log(sn)
            eta_h = eta * h
            e = -math.expm1(-h - eta_h)
            update = (sn / s[i] * math.exp(-eta_h)) * X + e * X0
            if i > 0:
                r = h_last / h
                if solver_type == 'heun':
                    update = update + ((e / (-h - eta_h) + 1) * (1 / r)) * (X0 - H0)
                else:
                    update = update + (0.5 * e * (1 / r)) * (X0 - H0)
            if eta and s_noise:
                update = update + (sn * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise) * NOISE
                noise = (s[i], sn)
        b.add(i, s[i], update, history=keep, noise=noise)
        h_last = h
    return b.plan()


def _plan_dpmpp_3m_sde(s, eta=1., s_noise=1.) -> _Plan:
    b = _Builder(s)
    h = h_1 = h_2 = None
    for i in range(b.n):
        sn = s[i + 1]
        keep = X0 if i + 1 < b.n else None
        noise = None
        if sn == 0:
            update = X0  # denoising step
        else:
            h = math.log(s[i]) - math.log(sn)
            h_eta = h * (eta + 1)
            update = math.exp(-h_eta) * X + (-math.expm1(-h_eta)) * X0
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (X0 - H0) / r0
                d1_1 = (H0 - H1) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                update = update + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                update = update + phi_2 * ((X0 - H0) / r)
            if eta and s_noise:
                update = update + (sn * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise) * NOISE
                noise = (s[i], sn)
        b.add(i, s[i], update, history=keep, noise=noise)
        h_1, h_2 = h, h_1
    return b.plan()


def _plan_lcm(s) -> _Plan:
    b = _Builder(s)
    for i in range(b.n):
        if s[i + 1] > 0:
            b.add(i, s[i], X0 + s[i + 1] * NOISE, noise=(s[i], s[i + 1]))
        else:
            b.add(i, s[i], X0)
    return b.plan()


def _unipc_weights(h: float, rks: List[float], order: int, variant: str, corrector: bool):
    """(h_phi_1, B_h, rhos) of UniPC's B(h) update (diffusers' multistep_uni_{p,c}_bh_update)."""
    hh = -h  # data prediction
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == 'bh1' else math.expm1(hh)
    rks = list(rks) + [1.0]
    R, rhs = [], []
    factorial_i = 1
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        rhs.append(h_phi_k * factorial_i / b_h)
        factorial_i *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    if corrector:
        rhos = [0.5] if order == 1 else np.linalg.solve(np.array(R), np.array(rhs)).tolist()
    elif order == 1:
        rhos = []
    elif order == 2:
        rhos = [0.5]
    else:
        rhos = np.linalg.solve(np.array(R)[:-1, :-1], np.array(rhs)[:-1]).tolist()
    return h_phi_1, b_h, rhos


def _plan_unipc(s, order=2, variant='bh2', use_corrector=True, lower_order_final=True) -> _Plan:
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    b = _Builder(s)
    n = b.n
    lam = [math.inf if v == 0 else -math.log(v) for v in s]
    hist = (H0, H1, H2)  # denoised of steps i-1, i-2, i-3
    orders = []
    for i in range(n):
        p = min(order, i + 1)
        if lower_order_final:
            p = min(p, n - i)
        if s[i + 1] == 0:
            p = 1
        orders.append(p)
    for i in range(n):
        # Corrector (UniC): refine x_i, predicted by step i-1, with the denoised just computed.
        corrected = use_corrector and i > 0
        if corrected:
            oc = orders[i - 1]
            h = lam[i] - lam[i - 1]
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, oc)]
            h_phi_1, b_h, rhos = _unipc_weights(h, rks, oc, variant, corrector=True)
            res = rhos[-1] * (X0 - H0)
            for k in range(1, oc):
                res = res + rhos[k - 1] * ((hist[k] - H0) / rks[k - 1])
            x_i = (s[i] / s[i - 1]) * AUX - h_phi_1 * H0 - b_h * res
        else:
            x_i = X
        # Predictor (UniP) from x_i to sigma_{i+1}.
        p = orders[i]
        if s[i + 1] == 0:
            update = X0
        else:
            h = lam[i + 1] - lam[i]
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
            h_phi_1, b_h, rhos = _unipc_weights(h, rks, p, variant, corrector=False)
            update = (s[i + 1] / s[i]) * x_i - h_phi_1 * X0
            for k in range(1, p):
                update = update - (b_h * rhos[k - 1] / rks[k - 1]) * (hist[k - 1] - X0)
        last = i + 1 == n
        keep_aux = use_corrector and not last
        b.add(i, s[i], update, history=None if last else X0,
              aux=x_i if keep_aux and corrected else None, aux_from_x=keep_aux and not corrected)
    return b.plan()


def _plan_dpm_2_ancestral(s, eta=1., s_noise=1., sigmas_dtype="float32") -> _Plan:
    b = _Builder(s)
    for i in range(b.n):
        sigma_down, sigma_up = _ancestral_step_in(s[i], s[i + 1], eta, getattr(torch, sigmas_dtype))
        if sigma_down == 0:  # Euler into sigma_down; k-diffusion adds no noise here
            b.add(i, s[i], _euler_update(s[i], sigma_down))
            continue
        sigma_mid = math.exp(0.5 * (math.log(s[i]) + math.log(sigma_down)))
        b.add(i, s[i], _euler_update(s[i], sigma_mid), aux_from_x=True, end=False)
        update = AUX + ((sigma_down - s[i]) / sigma_mid) * (X - X0)
        update, noise = _with_noise(update, s_noise * sigma_up, (s[i], s[i + 1]))
        b.add(i, sigma_mid, update, noise=noise, callback=False)
    return b.plan()


def _with_noise(update: Lin, scale: float, key: Tuple[float, float]) -> Tuple[Lin, Optional[Tuple[float, float]]]:
    """``update + scale * noise`` and the noise_sampler arguments; no draw when scale is 0."""
    if scale == 0:
        return update, None
    return update + scale * NOISE, key


def _exp_step(sigma: float, sigma_to: float) -> Tuple[float, float]:
    """(a, b) of the first-order data-prediction step ``a * x + b * denoised`` from sigma to
    sigma_to: ``a = sigma_to / sigma``, ``b = -expm1(log(sigma_to) - log(sigma))``; into 0, (0, 1)."""
    if sigma_to == 0:
        return 0.0, 1.0
    return sigma_to / sigma, -math.expm1(math.log(sigma_to) - math.log(sigma))


def _plan_dpmpp_2s_ancestral(s, eta=1., s_noise=1., sigmas_dtype="float32") -> _Plan:
    b = _Builder(s)
    for i in range(b.n):
        sigma_down, sigma_up = _ancestral_step_in(s[i], s[i + 1], eta, getattr(torch, sigmas_dtype))
        key = (s[i], s[i + 1])
        scale = s_noise * sigma_up  # 0 into sigma 0
        if sigma_down == 0:  # Euler into 0
            update, noise = _with_noise(_euler_update(s[i], 0.0), scale, key)
            b.add(i, s[i], update, noise=noise)
            continue
        # DPM-Solver++(2S): a half step (in log sigma) to sigma_mid, then the full one with the
        # denoised computed there
        h = math.log(s[i]) - math.log(sigma_down)
        sigma_mid = math.exp(math.log(s[i]) - 0.5 * h)
        b.add(i, s[i], (sigma_mid / s[i]) * X - math.expm1(-0.5 * h) * X0, aux_from_x=True, end=False)
        update, noise = _with_noise((sigma_down / s[i]) * AUX - math.expm1(-h) * X0, scale, key)
        b.add(i, sigma_mid, update, noise=noise, callback=False)
    return b.plan()


def _noise_times_dpmpp_sde(sigma: float, sigma_next: float, r: float, dtype: torch.dtype) -> Tuple[float, ...]:
    """The sigmas k-diffusion's DPM-Solver++ SDE gives its noise sampler for one step,
    ``sigma_fn(t), sigma_fn(t + r h), sigma_fn(t_next)``, computed as it computes them: with torch
    ops in the sigmas' dtype (on the CPU; k-diffusion computes them on the sigmas' device, whose
    log and exp may round the last bit otherwise). A Brownian tree queried at the float64 values
    instead (an ulp away) draws other increments: 1e-4 off k-diffusion's samples with the same
    seed."""
    t, t_next = (_as_sigma_tensor(v, dtype).log().neg() for v in (sigma, sigma_next))
    s = t + (t_next - t) * r
    return tuple(float(v.neg().exp()) for v in (t, s, t_next))


def _plan_dpmpp_sde(s, eta=1., s_noise=1., r=0.5, sigmas_dtype="float32") -> _Plan:
    dtype = getattr(torch, sigmas_dtype)
    b = _Builder(s)
    fac = 1 / (2 * r)
    for i in range(b.n):
        sigma, sigma_next = s[i], s[i + 1]
        if sigma_next == 0:
            b.add(i, sigma, _euler_update(sigma, sigma_next))
            continue
        # t = -log(sigma); the stage point s = t + r * h, as k-diffusion (which also goes
        # through exp(-t) for the sigmas it gets from t)
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        sigma_t = math.exp(-t)
        sigma_s = math.exp(-(t + r * (t_next - t)))
        sigma_n = math.exp(-t_next)
        noise_t, noise_s, noise_n = _noise_times_dpmpp_sde(sigma, sigma_next, r, dtype)
        # stage 1: ancestral step from sigma to sigma_s, keeping x (aux) and denoised (history)
        sd, su = get_ancestral_step(sigma_t, sigma_s, eta)
        a, c = _exp_step(sigma_t, sd)
        stage, noise = _with_noise(a * X + c * X0, s_noise * su, (noise_t, noise_s))
        b.add(i, sigma, stage, history=X0, aux_from_x=True, noise=noise, end=False)
        # stage 2: ancestral step from sigma to sigma_next with the two denoised mixed
        sd, su = get_ancestral_step(sigma_t, sigma_n, eta)
        a, c = _exp_step(sigma_t, sd)
        update = a * AUX + c * ((1 - fac) * H0 + fac * X0)
        update, noise = _with_noise(update, s_noise * su, (noise_t, noise_n))
        b.add(i, sigma_s, update, noise=noise, callback=False)
    return b.plan()


def _plan_lms(s, order=4) -> _Plan:
    if order not in (1, 2, 3, 4):
        raise ValueError(f"order must be 1, 2, 3 or 4 (the fused step keeps three past derivatives), got {order!r}")
    b = _Builder(s)
    past = (H0, H1, H2)  # d of steps i-1, i-2, i-3
    for i in range(b.n):
        d = (X - X0) / s[i]
        p = min(i + 1, order)
        coeffs = lms_coefficients(s, i, p)  # k-diffusion's linear_multistep_coeff, exact
        update = X + coeffs[0] * d
        for j in range(1, p):
            update = update + coeffs[j] * past[j - 1]
        keep = d if order > 1 and i + 1 < b.n else None
        b.add(i, s[i], update, history=keep)
    return b.plan()


def _dpm_fast_orders(nfe: int) -> List[int]:
    """DPM-Solver-Fast's per-step orders for ``nfe`` model evaluations (order 3, ending in 2, 1)."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def _plan_dpm_fast(s, nfe, eta=0., s_noise=1.) -> _Plan:
    """DPM-Solver (noise prediction, eps = (x - denoised) / sigma) of orders 1-3 per step."""
    orders = _dpm_fast_orders(nfe)
    b = _Builder(s)
    t_end = -math.log(s[-1])
    sig = lambda tt: math.exp(-tt)  # noqa: E731  (sigma of t = -log sigma)
    for i, order in enumerate(orders):
        t, t_next = -math.log(s[i]), -math.log(s[i + 1])
        if eta:
            sd, _ = get_ancestral_step(sig(t), sig(t_next), eta)
            t_to = min(t_end, -math.log(sd)) if sd > 0 else t_end
            su = math.sqrt(sig(t_next) ** 2 - sig(t_to) ** 2)
        else:
            t_to, su = t_next, 0.
        h = t_to - t
        key = (sig(t), sig(t_next))
        eps = (X - X0) / sig(t)
        if order == 1:
            update, noise = _with_noise(X - (sig(t_to) * math.expm1(h)) * eps, s_noise * su, key)
            b.add(i, sig(t), update, noise=noise)
            continue
        # the first eps is kept as history H0, the step's start x as aux
        r1 = 1 / 2 if order == 2 else 1 / 3
        s1 = t + r1 * h
        b.add(i, sig(t), X - (sig(s1) * math.expm1(r1 * h)) * eps, history=eps, aux_from_x=True, end=False)
        eps_r1 = (X - X0) / sig(s1)
        base = AUX - (sig(t_to) * math.expm1(h)) * H0
        if order == 2:
            update = base - (sig(t_to) / (2 * r1) * math.expm1(h)) * (eps_r1 - H0)
            update, noise = _with_noise(update, s_noise * su, key)
            b.add(i, sig(s1), update, noise=noise, callback=False)
            continue
        r2 = 2 / 3
        s2 = t + r2 * h
        u2 = (AUX - (sig(s2) * math.expm1(r2 * h)) * H0
              - (sig(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)) * (eps_r1 - H0))
        b.add(i, sig(s1), u2, callback=False, end=False)
        eps_r2 = (X - X0) / sig(s2)
        update = base - (sig(t_to) / r2 * (math.expm1(h) / h - 1)) * (eps_r2 - H0)
        update, noise = _with_noise(update, s_noise * su, key)
        b.add(i, sig(s2), update, noise=noise, callback=False)
    return b.plan()


_PLANNERS: Dict[str, Callable[..., _Plan]] = {
    "euler": _plan_euler,
    "euler_ancestral": _plan_euler_ancestral,
    "heun": _plan_heun,
    "dpm_2": _plan_dpm_2,
    "dpm_2_ancestral": _plan_dpm_2_ancestral,
    "lms": _plan_lms,
    "dpmpp_2s_ancestral": _plan_dpmpp_2s_ancestral,
    "dpmpp_sde": _plan_dpmpp_sde,
    "dpm_fast": _plan_dpm_fast,
    "dpmpp_2m": _plan_dpmpp_2m,
    "dpmpp_2m_sde": _plan_dpmpp_2m_sde,
    "dpmpp_3m_sde": _plan_dpmpp_3m_sde,
    "lcm": _plan_lcm,
    "unipc": _plan_unipc,
}


@functools.lru_cache(maxsize=128)
def _cached_plan(name: str, sigmas: Tuple[float, ...], options: Tuple[Tuple[str, Any], ...]) -> _Plan:
    return _PLANNERS[name](list(sigmas), **dict(options))


# Samplers whose plan depends on arithmetic k-diffusion does on the sigma tensors, in their dtype:
# dpmpp_sde's noise sampler arguments, the ancestral samplers' Euler test, the churn window.
_IN_SIGMAS_DTYPE = frozenset({"dpmpp_sde", "dpm_2_ancestral", "dpmpp_2s_ancestral", "euler", "heun", "dpm_2"})


@run_eagerly  # host arithmetic, made once per sigma list (dynamo would bypass its cache and trace it)
def _plan(name: str, sigmas: Sequence[float], options: Dict[str, Any]) -> _Plan:
    # 1 and 1.0 hash alike, so int / float spellings of an option share a cache entry.
    return _cached_plan(name, tuple(sigmas), tuple(sorted(options.items())))


# --------------------------------------------------------------------------- validation


def _number(name: str, value, *, finite: bool = True, positive: bool = False, nonnegative: bool = False) -> float:
    """``float(value)``, or an error naming ``name``: a TypeError for what is not a real number
    (float() takes "2" and True), a ValueError for a value out of range (NaN always; inf unless
    ``finite=False``)."""
    if not_a_number(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):  # (RuntimeError: a tensor of several elements)
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if math.isnan(v) or finite and math.isinf(v):
        raise ValueError(f"{name} must be {'finite' if finite else 'a number, not NaN'}, got {value}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and v < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return v


# The samplers' real-valued options: (finite, nonnegative); and their options with a few
# values. The others (order, ...) are checked where their sampler's plan reads them. (The plans
# are cached by their options: these are checked before, as an unhashable value would fail there.)
_REAL_OPTIONS = {"eta": (True, True), "s_noise": (True, False), "s_churn": (True, True),
                 "s_tmin": (False, False), "s_tmax": (False, False)}
_CHOICE_OPTIONS = {"solver_type": ("heun", "midpoint"), "variant": ("bh1", "bh2")}


def _checked_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` with its real-valued sampler options as floats (errors name the option)."""
    out = dict(options)
    for name, (finite, nonnegative) in _REAL_OPTIONS.items():
        if name in out:
            out[name] = _number(name, out[name], finite=finite, nonnegative=nonnegative)
    for name, choices in _CHOICE_OPTIONS.items():
        if name in out and not (isinstance(out[name], str) and out[name] in choices):
            raise ValueError(f"{name} must be {' or '.join(map(repr, choices))}, got {out[name]!r}")
    if "r" in out:
        r = out["r"]
        try:  # any real number, as k-diffusion's arithmetic takes (a numpy scalar or array, a 0-d tensor)
            out["r"] = math.nan if isinstance(r, (bool, str, bytes)) else float(r)
        except (TypeError, ValueError, RuntimeError):
            out["r"] = math.nan
        if not (math.isfinite(out["r"]) and out["r"] > 0):
            raise ValueError(f"r must be a positive number (the midpoint's fraction of the step), got {r!r}")
    return out


def _check_callable(name: str, value, how: str) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be callable as {how}, got {type(value).__name__}")


def check_callback(callback) -> None:
    """A ``callback`` argument: None or callable (else an error before the first model call)."""
    if callback is not None:
        _check_callable("callback", callback, "callback(dict)")


def _check_denoiser(denoiser, how: str) -> None:
    if not callable(denoiser):
        raise TypeError(f"the denoiser must be callable as {how}, got {type(denoiser).__name__}")


def _extra_args(extra_args) -> Dict[str, Any]:
    if extra_args is None:
        return {}
    if not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args must be a dict of keyword arguments for the denoiser, got "
                        f"{type(extra_args).__name__}")
    return dict(extra_args)


def _check_generator(generator) -> None:
    """A generator argument: None, a torch.Generator, or a list of one per sample (checked
    against the batch where the noise is drawn, :func:`default_noise_sampler`)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        return
    raise TypeError(f"generator must be a torch.Generator, a list of one per sample, or None, got "
                    f"{type(generator).__name__}")


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")


def _read_sigmas(sigmas) -> List[float]:
    """The sigma list as Python floats: the loop's only host read, done before it starts."""
    if isinstance(sigmas, torch.Tensor):
        if sigmas.dim() != 1:
            raise ValueError(f"sigmas must be a 1-D tensor, got shape {tuple(sigmas.shape)}")
        if not sigmas.is_floating_point():
            raise TypeError(f"sigmas must be a floating-point tensor, got {sigmas.dtype}")
        host = sigmas.detach().tolist()
    elif isinstance(sigmas, (list, tuple)):
        host = [_number("each of sigmas", v, finite=False) for v in sigmas]  # (inf is refused below, with the list)
    else:
        raise TypeError(f"sigmas must be a 1-D tensor, a numpy array or a sequence of floats, got "
                        f"{type(sigmas).__name__}")
    if not host:
        raise ValueError("sigmas must hold at least one value (one value: a loop of no steps)")
    if not all(math.isfinite(v) for v in host):
        raise ValueError("sigmas must be finite")
    if host[-1] < 0:
        raise ValueError(f"sigmas must be >= 0, got {host[-1]}")
    if any(a <= b for a, b in zip(host, host[1:])):
        raise ValueError(f"sigmas must be strictly decreasing, got {host}")
    return host


def _check_guidance(guidance_scale, cond, uncond, extra_args) -> Optional[float]:
    if "cond" in extra_args and (cond is not None or guidance_scale is not None):
        raise ValueError("pass the conditioning as cond=/uncond=, not inside extra_args, when using guidance")
    if guidance_scale is None:
        if uncond is not None:
            raise ValueError("uncond is only used with guidance_scale")
        return None
    g = _number("guidance_scale", guidance_scale)
    if cond is None:
        # (uncond=None alone is the unconditional call, cond=None; a missing cond would steer the
        # samples away from the only conditioning given)
        raise ValueError("guidance_scale needs cond= (the conditioning the denoiser gets as cond=) and uncond= "
                         "(None: the denoiser is called with cond=None for the unconditional output)")
    return g


# --------------------------------------------------------------------------- model calls


def _model_caller(model, x: torch.Tensor, extra_args: Dict[str, Any], guidance: Optional[float], cond, uncond,
                  timesteps: Sequence[Any], sigma_follows_x: bool = False, both_halves: bool = False):
    """``evaluate(x, key) -> (model_output, cond_output or None)``; ``key`` picks a precomputed
    time argument: a sigma (sigma path; ``evaluate.time_arg(sigma, x)`` gives the tensor, which
    the loop passes as the key) or the timestep tensor itself (scheduler path).

    Sigma arguments are made once, in x's dtype, as k-diffusion's ``s_in`` is, and each model
    call gets its own copy, as in k-diffusion; with
    ``sigma_follows_x`` (DPM-Solver-Fast, whose k-diffusion code makes them from the current x)
    a sample promoted to a wider denoiser output's dtype gets them in that dtype from then on.
    ``both_halves``: both outputs at a guidance scale of 1 too (CFG++ there)."""
    B = x.shape[0]
    guided = guidance is not None and (guidance != 1.0 or both_halves)
    batched = (guided and isinstance(cond, torch.Tensor)
               and isinstance(uncond, torch.Tensor) and cond.dim() > 0 and cond.shape == uncond.shape
               and cond.shape[0] == B)
    rows = 2 * B if batched else B
    sigma_args = {}

    # Plain Python, left out of torch.compile: traced, a float key would be a guard on its value,
    # one recompile of every frame it reaches per sigma (the loop passes evaluate the tensor)
    @run_eagerly
    def sigma_arg(key, x):
        if not isinstance(key, float):
            return key
        slot = (key, x.dtype if sigma_follows_x else None)
        arg = sigma_args.get(slot)
        if arg is None:  # the first call at a promoted dtype: a fill, capturable like the model's ops
            arg = sigma_args[slot] = x.new_full((rows,), key)
        # a copy per call, as k-diffusion makes one: a denoiser that turns its sigma into a
        # timestep in place (sigma.mul_(1000)) would change the next call's otherwise
        return arg.clone()

    for t in timesteps:
        sigma_arg(t, x)

    def made(evaluate):
        evaluate.time_arg = sigma_arg  # (key, x) -> the time argument the denoiser gets
        return evaluate

    if not guided:
        kwargs = dict(extra_args)
        if cond is not None or guidance is not None:
            kwargs["cond"] = cond

        def evaluate(x, key):
            return model(x, sigma_arg(key, x), **kwargs), None
        return made(evaluate)

    if batched:
        cond2 = torch.cat([uncond, cond])

        def evaluate(x, key):
            out = model(torch.cat([x, x]), sigma_arg(key, x), cond=cond2, **extra_args)
            if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != 2 * B:
                raise ValueError(f"the denoiser must return a tensor of batch {2 * B} for the doubled CFG batch")
            u, c = out.chunk(2)
            return u, c
        return made(evaluate)

    def evaluate(x, key):
        arg = sigma_arg(key, x)
        arg_cond = arg.clone()  # (the first call may change its time argument in place)
        return model(x, arg, cond=uncond, **extra_args), model(x, arg_cond, cond=cond, **extra_args)
    return made(evaluate)


def _guided(u: torch.Tensor, c: Optional[torch.Tensor], g: float) -> torch.Tensor:
    """The guided output, for callbacks only (the steps fuse guidance into the kernel)."""
    return u if c is None else u + g * (c - u)


# --------------------------------------------------------------------------- the loop


def _check_denoised(m, c) -> None:
    """The denoiser's output(s) (``c``: the conditional one, or None), before a kernel reads them:
    a tensor a solver step can take, else an error naming the denoiser (not the sample, to which
    a complex output would otherwise promote it)."""
    for out in (m,) if c is None else (m, c):
        if not isinstance(out, torch.Tensor):  # (a diffusers model's tuple, say, or None)
            raise TypeError(f"the denoiser must return a torch.Tensor, got {type(out).__name__}")
        if not out.is_floating_point():
            raise TypeError(f"the denoiser must return a floating-point tensor, got {out.dtype}")


def _draw_noise(noise_sampler: NoiseSampler, sigma, sigma_next) -> torch.Tensor:
    """``noise_sampler(sigma, sigma_next)``, checked: a step given no noise would drop its noise
    term silently (k-diffusion fails there too)."""
    noise = noise_sampler(sigma, sigma_next)
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise_sampler must return a torch.Tensor, got {type(noise).__name__}")
    return noise


def _execute(plan: _Plan, x: torch.Tensor, evaluate, noise_sampler: NoiseSampler, guidance: Optional[float],
             callback, cb_sigmas, bar) -> torch.Tensor:
    """Run the plan's kernel calls; no host reads."""
    g = 1.0 if guidance is None else guidance
    # float64 samples are stepped in float64 (by the reference backend) with float64 coefficients
    rows = plan.rows64 if x.dtype == torch.float64 else plan.rows
    hist: List[torch.Tensor] = []
    aux = None
    for ev in plan.evals:
        if ev.model:
            m, c = evaluate(x, evaluate.time_arg(ev.sigma, x))
            _check_denoised(m, c)
        else:
            m, c = x, None  # churn pass: only X and NOISE are read
        noise = None if ev.noise is None else _draw_noise(noise_sampler, *ev.noise)
        if callback is not None and ev.callback:
            sigma_t, sigma_hat_t = cb_sigmas[ev.step]
            callback({'x': x, 'i': ev.step, 'sigma': sigma_t, 'sigma_hat': sigma_hat_t,
                      'denoised': _guided(m, c, g)})
        if m.dtype is not x.dtype or (c is not None and c.dtype is not x.dtype):
            # k-diffusion's arithmetic promotes x to a wider denoiser output's dtype (either half's)
            x = promoted_sample(x, m, c)
            rows = plan.rows64 if x.dtype == torch.float64 else plan.rows
        if rows is plan.rows and plan.float32_overflow is not None:  # (known on the host: no read)
            raise _float32_overflow_error(plan, x.dtype)
        out = ops.solver_step(x, m, rows[ev.row], cond=c, guidance_scale=g if c is not None else 1.0,
                              history=hist[:ev.n_hist], aux=aux if ev.use_aux else None, noise=noise,
                              write_history=ev.write_history, write_aux=ev.write_aux)
        if ev.aux_from_x:
            aux = x
        elif ev.write_aux:
            aux = out.aux
        if ev.write_history:
            hist.insert(0, out.history)
            del hist[3:]
        x = out.sample
        if ev.end and bar is not None:
            bar.update(1)
    return x


def _progress(total: int, disable):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=disable)


def _callback_sigmas(sigmas, host: List[float], plan: _Plan):
    """Per step (sigma, sigma_hat) as 0-d tensors, made before the loop (no reads inside it)."""
    if isinstance(sigmas, torch.Tensor):
        base = [sigmas[i] for i in range(len(host) - 1)]
        like = sigmas
    else:
        like = torch.tensor(host, dtype=torch.float32, device="cpu")
        base = [like[i] for i in range(len(host) - 1)]
    out = {i: (base[i], base[i]) for i in range(len(base))}
    for ev in plan.evals:
        if ev.callback and ev.sigma_hat != host[ev.step]:
            out[ev.step] = (base[ev.step], torch.tensor(ev.sigma_hat, dtype=like.dtype, device=like.device))
    return out


class _Loop(NamedTuple):
    """A prepared sampling loop: ``run(x, cond, uncond, callback=None, bar=None)`` builds the
    model calls for these inputs and runs the loop; ``reset()`` puts any Python-side state (a
    scheduler's) back to the start."""

    run: Callable[..., torch.Tensor]
    steps: int
    reset: Callable[[], None]
    graph_refusal: Optional[str] = None  # why the loop cannot be captured in a CUDA graph, if it cannot


def _sigma_loop(name: str, model, x: torch.Tensor, sigmas, *, extra_args=None, with_callback: bool = False,
                noise_sampler: Optional[NoiseSampler] = None, generator: Optional[torch.Generator] = None,
                guidance_scale=None, cond=None, uncond=None, options: Optional[Dict[str, Any]] = None) -> _Loop:
    _check_x(x)
    _check_denoiser(model, "model(x, sigma, **extra_args)")
    extra_args = _extra_args(extra_args)
    guidance = _check_guidance(guidance_scale, cond, uncond, extra_args)
    _check_generator(generator)
    if noise_sampler is not None:
        _check_callable("noise_sampler", noise_sampler, "noise_sampler(sigma, sigma_next)")
    if isinstance(sigmas, np.ndarray):
        sigmas = torch.from_numpy(np.array(sigmas))  # (a copy: reversed or read-only arrays too)
    host = _read_sigmas(sigmas)  # the only host read; nothing below reads a tensor's value
    options = _checked_options(options or {})
    if name in _IN_SIGMAS_DTYPE:
        options["sigmas_dtype"] = str(sigmas.dtype).split(".")[-1] if isinstance(sigmas, torch.Tensor) else "float32"
    plan = _plan(name, host, options)
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, generator)
    model_sigmas = sorted({ev.sigma for ev in plan.evals if ev.model})
    cb_sigmas = _callback_sigmas(sigmas, host, plan) if with_callback else None

    def run(x, cond, uncond, callback=None, bar=None):
        evaluate = _model_caller(model, x, extra_args, guidance, cond, uncond, model_sigmas,
                                 sigma_follows_x=name == "dpm_fast")
        return _execute(plan, x, evaluate, noise_sampler, guidance, callback, cb_sigmas, bar)
    return _Loop(run, plan.steps, lambda: None)


def _sample_sigmas(name: str, model, x: torch.Tensor, sigmas, *, extra_args=None, callback=None, disable=None,
                   noise_sampler: Optional[NoiseSampler] = None, generator: Optional[torch.Generator] = None,
                   guidance_scale=None, cond=None, uncond=None, cuda_graph: bool = False,
                   options: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    check_callback(callback)
    loop = _sigma_loop(name, model, x, sigmas, extra_args=extra_args, with_callback=callback is not None,
                       noise_sampler=noise_sampler, generator=generator, guidance_scale=guidance_scale,
                       cond=cond, uncond=uncond, options=options)
    return _run(loop, x, cond, uncond, generator, cuda_graph, callback, disable)


def _run(loop: _Loop, x, cond, uncond, generator, cuda_graph: bool, callback, disable) -> torch.Tensor:
    if check_flag("cuda_graph", cuda_graph):  # capture, replay once
        _check_graph_args(x, generator, callback, loop=loop)
        return CapturedSampler._from_loop(loop, x, cond, uncond, generator)()
    with _progress(loop.steps, disable) as bar:
        return loop.run(x, cond, uncond, callback=callback, bar=bar)


# --------------------------------------------------------------------------- CUDA graphs


def _check_graph_args(x: torch.Tensor, generator, callback, who: str = "cuda_graph=True",
                      loop: Optional[_Loop] = None) -> None:
    if loop is not None and loop.graph_refusal:
        raise ValueError(f"{who}: {loop.graph_refusal}; sample without a graph")
    if x.dtype == torch.float64:
        # float64 steps run the reference backend, which copies each step's coefficients from
        # the host: not capturable.
        raise ValueError(f"{who} takes float32, float16 or bfloat16 latents, got float64 (float64 steps "
                         "run the reference backend, which cannot be captured); sample without a graph")
    if x.device.type != "cuda":
        raise ValueError(f"{who} needs CUDA tensors, got x on {x.device}")
    if callback is not None:
        raise ValueError(f"callback is not supported with {who} (a replayed graph runs no Python)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{who} takes one CUDA torch.Generator (its state is captured with the loop), got "
                        f"{type(generator).__name__}")
    if generator is not None and generator.device.type != "cuda":
        raise ValueError(f"{who} needs a CUDA generator (a CPU generator's draws cannot be captured); "
                         f"got one on {generator.device}")


def _rng_generator(generator: Optional[torch.Generator], device: torch.device) -> torch.Generator:
    """The generator a loop draws from: ``generator``, else the device's default one."""
    if generator is not None:
        return generator
    return torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator


def _capture(run: Callable[..., torch.Tensor], x: torch.Tensor, generator: Optional[torch.Generator],
             reset: Callable[[], None]):
    """Warm up with one whole eager ``run()`` on a side stream, then capture ``run()`` (model
    calls included) in one CUDA graph. The whole loop, not its first steps: later steps can
    need kernels of their own (a Triton specialisation for the last step, which writes no
    history; a third history entry), and compiling or loading one during capture fails. The
    RNG state is put back to where it was before the warm-up, so the first replay draws what
    the eager loop would. Returns ``(graph, output)``."""
    device = x.device
    # Everything on x's GPU, whichever is current: torch.cuda.graph's default capture stream
    # belongs to the GPU current when a process first captures, and work on another GPU's
    # streams would run eagerly during capture, leaving an empty graph that replays stale output.
    with torch.cuda.device(device):
        gen = _rng_generator(generator, device)
        state = gen.get_state()
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            run()
        current.wait_stream(side)
        gen.set_state(state)
        reset()
        graph = torch.cuda.CUDAGraph()
        if gen is not torch.cuda.default_generators[device.index or 0]:
            # the device's default generator is registered by capture_begin itself
            register = getattr(graph, "register_generator_state", None)
            if register is not None:
                register(gen)
        with torch.cuda.graph(graph, stream=side):
            out = run()
        current.wait_stream(side)
        gen.set_state(state)
    return graph, out


def _static_copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class CapturedSampler:
    """A whole sampling loop, model calls included, captured once as a CUDA graph and replayed
    for new inputs: the way to sample a small or few-step model many times without paying
    Python and launch costs per step.

    Takes the arguments of :func:`kdfast.sample` (without ``cuda_graph``, ``callback`` and
    ``disable``); ``x``, ``cond`` and ``uncond`` fix the shapes, dtypes and devices of every
    later call. Capturing runs the loop once eagerly (warm-up) and records it once;
    each call then copies its inputs into the captured buffers and replays::

        loop = kdfast.CapturedSampler(denoiser, x, sigmas, sampler="dpmpp_2m",
                                      guidance_scale=5.0, cond=cond, uncond=uncond)
        images = loop(torch.randn_like(x) * sigmas[0], cond=new_cond)

    The result equals the eager loop's for the same inputs and generator state. Random draws
    (SDE and ancestral samplers) come from ``generator`` (a CUDA one, or the device's default
    generator when None) and advance it by one loop's draws per call; ``seed=`` reseeds it
    first; a ``noise_sampler`` of your own must draw on the GPU with capturable ops (its draws
    are recorded with the loop). Tensors passed in ``extra_args`` are read from their memory at
    every replay: change them in place (``copy_``) to change them. A scheduler given here belongs to the captured
    loop from then on (it is kept as ``.scheduler``). The denoiser must be capturable: no host syncs, no data-dependent
    Python control flow.
    """

    def __init__(self, denoiser, x: torch.Tensor, sigmas_or_scheduler, *, sampler: str = "dpmpp_2m",
                 guidance_scale=None, cond=None, uncond=None, extra_args=None,
                 generator: Optional[torch.Generator] = None, **sampler_options):
        loop = _make_loop(denoiser, x, sigmas_or_scheduler, sampler=sampler, guidance_scale=guidance_scale,
                          cond=cond, uncond=uncond, extra_args=extra_args, generator=generator,
                          with_callback=False, sampler_options=sampler_options)
        _check_graph_args(x, generator, None, who="CapturedSampler", loop=loop)
        self._setup(loop, x, cond, uncond, generator)
        self.scheduler = sigmas_or_scheduler if hasattr(sigmas_or_scheduler, "set_timesteps") else None

    @classmethod
    def _from_loop(cls, loop: _Loop, x, cond, uncond, generator) -> "CapturedSampler":
        self = cls.__new__(cls)
        self._setup(loop, x, cond, uncond, generator)
        self.scheduler = None
        return self

    def _setup(self, loop: _Loop, x, cond, uncond, generator) -> None:
        self.generator = generator
        # The graph reads device memory made outside it (a scheduler's timesteps, for one):
        # holding the loop keeps those tensors, and so the addresses baked in, alive.
        self._loop = loop
        self._inputs = {"x": _static_copy(x), "cond": _static_copy(cond), "uncond": _static_copy(uncond)}
        ins = self._inputs
        with torch.no_grad():
            self._graph, self._out = _capture(lambda: loop.run(ins["x"], ins["cond"], ins["uncond"]),
                                              ins["x"], generator, loop.reset)

    @property
    def device(self) -> torch.device:
        """The device the captured loop runs on."""
        return self._inputs["x"].device

    def __call__(self, x: Optional[torch.Tensor] = None, cond=None, uncond=None, *,
                 seed: Optional[int] = None) -> torch.Tensor:
        """Replay the loop from ``x`` (default: the last input) with ``cond`` / ``uncond``
        (default: the last ones); returns a new tensor."""
        if reference_required((x, cond, uncond)):
            # (a replay runs recorded kernels on fixed buffers: no tangent, batching or gradient)
            raise NotImplementedError(
                "kdfast.CapturedSampler: a captured CUDA graph cannot run under torch.func's transforms (vmap, grad, "
                "jvp, ...) or forward-mode AD; run the loop with kdfast.sample(...) (cuda_graph=False) there, or, "
                "for gradients, step the scheduler yourself (kdfast.sample runs without gradients)")
        for name, new in (("x", x), ("cond", cond), ("uncond", uncond)):
            if new is None:
                continue
            static = self._inputs[name]
            if not isinstance(static, torch.Tensor):
                raise ValueError(f"{name} was not a tensor when the loop was captured, so it cannot be replaced; "
                                 "capture a new CapturedSampler")
            if not isinstance(new, torch.Tensor) or new.shape != static.shape or new.dtype != static.dtype \
                    or new.device != static.device:
                got = (f"{tuple(new.shape)} {new.dtype} on {new.device}" if isinstance(new, torch.Tensor)
                       else type(new).__name__)
                raise ValueError(f"{name} must match the captured {tuple(static.shape)} {static.dtype} on "
                                 f"{static.device}, got {got}")
            static.copy_(new)
        if seed is not None:
            _rng_generator(self.generator, self.device).manual_seed(_generator_seed(seed))
        self._graph.replay()
        return self._out.clone()


# --------------------------------------------------------------------------- scheduler path


def _scheduler_state(scheduler) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(scheduler).items()}


def _set_scheduler_state(scheduler, state: Dict[str, Any]) -> None:
    for k in [k for k in vars(scheduler) if k not in state]:
        del scheduler.__dict__[k]
    for k, v in state.items():
        scheduler.__dict__[k] = list(v) if isinstance(v, list) else v


def _takes_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` accepts the keyword argument ``name`` (by name, or through ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


# step() arguments the loop itself passes, or that change from step to step (only a pipeline's
# own loop can give them): not options
_LOOP_STEP_ARGUMENTS = frozenset({
    "self", "model_output", "timestep", "sample", "cond", "uncond", "guidance_scale", "generator", "variance_noise",
    "return_dict", "return_pred_original_sample", "old_pred_original_sample", "timestep_back", "cur_sampling_step",
    "dmd_noisy_tensor", "dmd_sigmas", "dmd_timesteps", "all_timesteps", "pred_original_sample", "r_timestep",
    "per_token_timesteps"})


def _step_keywords(scheduler, method) -> set:
    """The keyword parameters of ``method``, with those of ``_step`` where ``method`` passes its
    ``**kwargs`` on to it (the shared ``step`` / ``step_cfg``)."""
    params = inspect.signature(method).parameters.values()
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) and method != scheduler._step:
        names |= _step_keywords(scheduler, scheduler._step)
    return names


def _step_cfg_only_options(scheduler, options: Dict[str, Any]) -> Tuple[set, bool]:
    """(the names in ``options`` that only ``step_cfg`` takes, whether one is turned on: CFG++'s
    ``cfg_pp=True``). One turned on guides at a scale of 1 too (CFG++ at 1 still re-noises with
    the unconditional output, which conditional sampling alone does not); turned off (None,
    False) at a scale of 1, they are plain guidance there, the conditional output alone."""
    if not options:
        return set(), False
    only = _step_keywords(scheduler, scheduler.step_cfg) - _step_keywords(scheduler, scheduler.step)
    names = {n for n in options if n in only and n not in _LOOP_STEP_ARGUMENTS and not n.startswith("_")}
    return names, any(options[n] is not None and options[n] is not False for n in names)


def _step_options(scheduler, options: Dict[str, Any], guided: bool) -> Dict[str, Any]:
    """The per-step options of ``scheduler.step`` given to :func:`sample` (DDIM's ``eta``,
    Euler's ``s_churn`` ...: in diffusers a pipeline passes them to every ``step`` call), checked
    against the keyword parameters of the method the loop calls: ``step``, or with guidance
    ``step_cfg`` (which may take more: DDIM's ``cfg_pp``)."""
    if not options:
        return {}
    who = type(scheduler).__name__
    names = _step_keywords(scheduler, scheduler.step_cfg if guided else scheduler.step)
    names = {n for n in names - _LOOP_STEP_ARGUMENTS if not n.startswith("_")}
    unknown = sorted(set(options) - names)
    if unknown:
        takes = f"it takes {sorted(names)}" if names else "it takes none"
        if not guided:  # (without guidance step() runs)
            takes += "; with guidance (cond and uncond), step_cfg's options too"
        raise TypeError(f"{who}.step{'/step_cfg' if guided else ''} has no per-step option(s) {unknown} "
                        f"(the options after the scheduler go to every step call; {takes})")
    return dict(options)


def _scheduler_loop(denoiser, x: torch.Tensor, scheduler, *, guidance_scale, cond, uncond, extra_args,
                    generator, step_options: Dict[str, Any]) -> _Loop:
    _check_x(x)
    _check_denoiser(denoiser, "denoiser(model_input, t, **extra_args)")
    extra_args = _extra_args(extra_args)
    guidance = _check_guidance(guidance_scale, cond, uncond, extra_args)
    _check_generator(generator)
    # (custom timesteps leave num_inference_steps None in DDPM and consistency models, as in diffusers)
    if getattr(scheduler, "num_inference_steps", None) is None and not getattr(scheduler, "custom_timesteps", False):
        raise ValueError("call scheduler.set_timesteps(...) before kdfast.sample(denoiser, x, scheduler)")
    if scheduler._has_stepped():
        raise ValueError("the scheduler has already been stepped; call set_timesteps(...) again before sampling")
    if generator is not None and not _takes_keyword(scheduler.step, "generator"):
        reason = getattr(scheduler, "_noise_source", "its steps draw no noise")
        raise TypeError(f"generator: {type(scheduler).__name__}.step takes no generator, as diffusers' does not "
                        f"({reason}); leave generator=None")
    start = scheduler.begin_index or 0
    timesteps = scheduler.timesteps
    if getattr(scheduler, "_last_timestep_is_the_end", False):
        timesteps = timesteps[:-1]
    cfg_only, cfg_only_on = _step_cfg_only_options(scheduler, step_options)
    fused_cfg = guidance is not None and (guidance != 1.0 or cfg_only_on)
    if guidance is not None and not fused_cfg:  # (step() takes none of them)
        step_options = {k: v for k, v in step_options.items() if k not in cfg_only}
    step_options = _step_options(scheduler, step_options, fused_cfg)
    state = _scheduler_state(scheduler)

    def run(x, cond, uncond, callback=None, bar=None):
        evaluate = _model_caller(denoiser, x, extra_args, guidance, cond, uncond, (), both_halves=fused_cfg)
        xx, carry, previous = x, None, None
        for i, t in enumerate(timesteps):  # iterating gives views: the step index costs no sync
            if i < start:
                continue
            inp = scheduler.scale_model_input(xx, t)
            m, c = evaluate(inp, t)
            _check_denoised(m, c)
            if callback is not None:
                guided = _guided(m, c, 1.0 if guidance is None else guidance)
                callback({'x': xx, 'i': i, 't': t, 'model_output': guided})
            xx, carry = scheduler._loop_step(m, c if fused_cfg else None, guidance, t, previous, xx, carry, generator,
                                             step_options)
            previous = t
            if bar is not None:
                bar.update(1)
        return xx

    return _Loop(run, len(timesteps) - start, lambda: _set_scheduler_state(scheduler, state),
                 scheduler._graph_refusal)


# --------------------------------------------------------------------------- public samplers


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., noise_sampler=None, generator=None):
    """Implements Algorithm 2 (Euler steps) from Karras et al. (2022).

    ``generator`` (not in k-diffusion) draws the noise when ``noise_sampler`` is None; see the
    module docstring.
    """
    return _sample_sigmas("euler", model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                          noise_sampler=noise_sampler, generator=generator,
                          options=dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise))


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, generator=None):
    """Ancestral sampling with Euler method steps.

    ``generator`` (not in k-diffusion) draws the noise when ``noise_sampler`` is None; see the
    module docstring.
    """
    return _sample_sigmas("euler_ancestral", model, x, sigmas, extra_args=extra_args, callback=callback,
                          disable=disable, noise_sampler=noise_sampler, generator=generator,
                          options=dict(eta=eta, s_noise=s_noise))


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1., noise_sampler=None, generator=None):
    """Implements Algorithm 2 (Heun steps) from Karras et al. (2022).

    ``generator`` (not in k-diffusion) draws the noise when ``noise_sampler`` is None; see the
    module docstring.
    """
    return _sample_sigmas("heun", model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                          noise_sampler=noise_sampler, generator=generator,
                          options=dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise))


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., noise_sampler=None, generator=None):
    """A sampler inspired by DPM-Solver-2 and Algorithm 2 from Karras et al. (2022).

    ``generator`` (not in k-diffusion) draws the noise when ``noise_sampler`` is None; see the
    module docstring.
    """
    return _sample_sigmas("dpm_2", model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                          noise_sampler=noise_sampler, generator=generator,
                          options=dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise))


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, generator=None):
    """Ancestral sampling with DPM-Solver second-order steps.

    ``generator`` (not in k-diffusion) draws the noise when ``noise_sampler`` is None; see the
    module docstring.
    """
    return _sample_sigmas("dpm_2_ancestral", model, x, sigmas, extra_args=extra_args, callback=callback,
                          disable=disable, noise_sampler=noise_sampler, generator=generator,
                          options=dict(eta=eta, s_noise=s_noise))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (Adams-Bashforth in sigma) of ``order`` 1 to 4, k-diffusion's LMS.

    The coefficients are the integrals k-diffusion takes with ``scipy.integrate.quad``,
    computed exactly (by Gauss-Legendre quadrature of the interpolating polynomial) once per
    sigma list; scipy is not needed. Orders above 4 are refused: the fused step keeps the
    derivatives of the last three steps.
    """
    return _sample_sigmas("lms", model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                          options=dict(order=_int_option("order", order)))


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M)."""
    return _sample_sigmas("dpmpp_2m", model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None, generator=None):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps.

    ``generator`` (not in k-diffusion) draws the noise when ``noise_sampler`` is None; see the
    module docstring.
    """
    return _sample_sigmas("dpmpp_2s_ancestral", model, x, sigmas, extra_args=extra_args, callback=callback,
                          disable=disable, noise_sampler=noise_sampler, generator=generator,
                          options=dict(eta=eta, s_noise=s_noise))


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2, generator=None):
    """DPM-Solver++ (stochastic): two model evaluations per step, the second at the fraction
    ``r`` of the step in log sigma, with ancestral noise after each stage.

    The noise is Gaussian, from ``generator`` (the global RNG when None), unless
    ``noise_sampler`` is given: k-diffusion defaults to a Brownian tree here; pass
    :class:`BrownianTreeNoiseSampler` (needs ``torchsde``) to get its draws.
    """
    return _sample_sigmas("dpmpp_sde", model, x, sigmas, extra_args=extra_args, callback=callback,
                          disable=disable, noise_sampler=noise_sampler, generator=generator,
                          options=dict(eta=eta, s_noise=s_noise, r=r))


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint', generator=None):
    """DPM-Solver++(2M) SDE (Gaussian noise from ``generator`` unless ``noise_sampler`` is given)."""
    return _sample_sigmas("dpmpp_2m_sde", model, x, sigmas, extra_args=extra_args, callback=callback,
                          disable=disable, noise_sampler=noise_sampler, generator=generator,
                          options=dict(eta=eta, s_noise=s_noise, solver_type=solver_type))


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, generator=None):
    """DPM-Solver++(3M) SDE (Gaussian noise from ``generator`` unless ``noise_sampler`` is given)."""
    return _sample_sigmas("dpmpp_3m_sde", model, x, sigmas, extra_args=extra_args, callback=callback,
                          disable=disable, noise_sampler=noise_sampler, generator=generator,
                          options=dict(eta=eta, s_noise=s_noise))


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, generator=None):
    """Latent Consistency Model sampling: ``x = denoised + sigma_next * noise``.

    ``generator`` (not in k-diffusion) draws the noise when ``noise_sampler`` is None; see the
    module docstring.
    """
    return _sample_sigmas("lcm", model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                          noise_sampler=noise_sampler, generator=generator)


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, order=2, variant='bh2',
                 use_corrector=True, lower_order_final=True):
    """UniPC (Zhao et al. 2023), data prediction, B(h) ``variant`` 'bh2' (default) or 'bh1'.

    Multistep predictor of ``order`` (1-3) with the UniC corrector, as diffusers'
    UniPCMultistepScheduler runs it (lower orders at the start and, with
    ``lower_order_final``, at the end), in k-diffusion's convention: the model is evaluated at
    the predicted sample; its output corrects that sample, and one kernel pass applies the
    correction and the next prediction. ``use_corrector=False`` runs the predictor alone (UniP).
    """
    return _sample_sigmas("unipc", model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                          options=_unipc_options(order, variant, use_corrector, lower_order_final))


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.,
                    s_noise=1., noise_sampler=None, generator=None):
    """DPM-Solver-Fast (Lu et al. 2022, fixed step size): ``n`` model evaluations spread over
    steps of order 3 (and a last one or two of order 2 and 1), equal in log sigma, from
    ``sigma_max`` to ``sigma_min`` (both > 0, as in k-diffusion; reverse sampling is not
    supported). ``eta > 0`` adds ancestral noise after each step.

    The callback gets the usual ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per step
    (k-diffusion's also carries ``t`` and ``t_up``, which are ``-log(sigma)``). ``generator``
    draws the noise when ``noise_sampler`` is None.
    """
    sigmas = dpm_fast_sigmas(sigma_min, sigma_max, n)
    return _sample_sigmas("dpm_fast", model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                          noise_sampler=noise_sampler, generator=generator,
                          options=dict(nfe=int(n), eta=eta, s_noise=s_noise))


def _check_sigma_interval(sigma_min: float, sigma_max: float) -> None:
    """The DPM-Solver samplers integrate from sigma_max down to sigma_min."""
    if sigma_min == sigma_max:
        raise ValueError(f"sigma_min and sigma_max are equal ({sigma_min}): there is no interval to sample")
    if sigma_min > sigma_max:
        raise ValueError(f"sigma_min must be below sigma_max (reverse sampling is not supported), got sigma_min="
                         f"{sigma_min} and sigma_max={sigma_max}")


def dpm_fast_sigmas(sigma_min, sigma_max, n) -> List[float]:
    """The step boundaries :func:`sample_dpm_fast` uses for ``n`` model evaluations (its model
    is called at these sigmas, except the last, and in between)."""
    n = _int_option("n", n, minimum=1)
    try:
        lo, hi = float(sigma_min), float(sigma_max)
    except (TypeError, ValueError):
        raise TypeError("sigma_min and sigma_max must be numbers") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or hi <= 0:
        raise ValueError(f"sigma_min and sigma_max must be finite and > 0, got {sigma_min} and {sigma_max}")
    _check_sigma_interval(lo, hi)
    # one step per order, equal in t = -log sigma
    ts = np.linspace(-math.log(hi), -math.log(lo), len(_dpm_fast_orders(n)) + 1)
    return [math.exp(-t) for t in ts]


def _int_option(name: str, value, minimum: Optional[int] = None) -> int:
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:  # (a 0-d tensor or array: its number)
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (
            isinstance(value, (float, np.floating)) and float(value).is_integer()):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _unipc_options(order, variant, use_corrector, lower_order_final) -> Dict[str, Any]:
    return dict(order=_int_option("order", order), variant=variant,
                use_corrector=check_flag("use_corrector", use_corrector),
                lower_order_final=check_flag("lower_order_final", lower_order_final))


SAMPLERS: Dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "lcm": sample_lcm,
    "unipc": sample_unipc,
}

# Options each sampler accepts through ``sample(..., **options)``.
_OPTIONS = {
    "euler": ("s_churn", "s_tmin", "s_tmax", "s_noise", "noise_sampler"),
    "heun": ("s_churn", "s_tmin", "s_tmax", "s_noise", "noise_sampler"),
    "dpm_2": ("s_churn", "s_tmin", "s_tmax", "s_noise", "noise_sampler"),
    "euler_ancestral": ("eta", "s_noise", "noise_sampler"),
    "dpm_2_ancestral": ("eta", "s_noise", "noise_sampler"),
    "lms": ("order",),
    "dpmpp_2s_ancestral": ("eta", "s_noise", "noise_sampler"),
    "dpmpp_sde": ("eta", "s_noise", "noise_sampler", "r"),
    "dpmpp_2m": (),
    "dpmpp_2m_sde": ("eta", "s_noise", "noise_sampler", "solver_type"),
    "dpmpp_3m_sde": ("eta", "s_noise", "noise_sampler"),
    "lcm": ("noise_sampler",),
    "unipc": ("order", "variant", "use_corrector", "lower_order_final"),
}
_DEFAULTS = {
    "euler": dict(s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.),
    "heun": dict(s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.),
    "dpm_2": dict(s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.),
    "euler_ancestral": dict(eta=1., s_noise=1.),
    "dpm_2_ancestral": dict(eta=1., s_noise=1.),
    "lms": dict(order=4),
    "dpmpp_2s_ancestral": dict(eta=1., s_noise=1.),
    "dpmpp_sde": dict(eta=1., s_noise=1., r=1 / 2),
    "dpmpp_2m": {},
    "dpmpp_2m_sde": dict(eta=1., s_noise=1., solver_type='midpoint'),
    "dpmpp_3m_sde": dict(eta=1., s_noise=1.),
    "lcm": {},
    "unipc": dict(order=2, variant='bh2', use_corrector=True, lower_order_final=True),
}


@torch.no_grad()
def sample(denoiser, x: torch.Tensor, sigmas_or_scheduler, *, sampler: str = "dpmpp_2m", guidance_scale=None,
           cond=None, uncond=None, extra_args=None, generator: Optional[torch.Generator] = None,
           cuda_graph: bool = False, callback=None, disable=None, **sampler_options) -> torch.Tensor:
    """Run a whole sampling loop; every step is one fused kernel pass.

    With a sigma list (1-D tensor, numpy array or list of floats, strictly decreasing, e.g.
    :func:`get_sigmas_karras`): runs
    the k-diffusion-style sampler ``sampler`` (a key of :data:`SAMPLERS`; its options, e.g.
    ``eta=``, ``s_noise=``, ``solver_type=``, ``order=``, ``noise_sampler=``, go in
    ``**sampler_options``) on ``denoiser(x, sigma_batch, **extra_args) -> denoised``, starting
    from ``x`` (noise already scaled to ``sigmas[0]``). ``generator`` draws the noise of the
    samplers that add noise; with a ``noise_sampler`` it draws nothing, and only names the CUDA
    generator that ``cuda_graph=True`` saves, registers and restores (the noise sampler's own).

    With a kdfast scheduler (``kdfast.schedulers.*``, ``set_timesteps`` already called): runs
    its loop, ``denoiser(scheduler.scale_model_input(x, t), t, **extra_args)`` returning the raw
    model output, then ``scheduler.step`` (``step_cfg`` with guidance); ``x`` is the initial
    latent as a pipeline prepares it (already times ``init_noise_sigma``); ``sampler`` is ignored,
    and ``**sampler_options`` are the step's per-step options, passed to every ``step`` call as a
    diffusers pipeline passes them (e.g. DDIM's ``eta=`` and ``use_clipped_model_output=``,
    Euler's ``s_churn=``).

    Conditioning reaches the denoiser as the keyword ``cond=``. With ``guidance_scale``
    (classifier-free guidance) the denoiser is called once on the doubled batch
    ``(cat([x, x]), cat([s, s]), cond=cat([uncond, cond]))`` when ``cond`` and ``uncond`` are
    tensors of the same shape with x's batch, else twice (``cond=uncond``, then ``cond=cond``);
    on the scheduler path the time argument is the scheduler's timestep itself (0-d, one for
    the whole batch, doubled or not, as diffusers pipelines pass it);
    ``extra_args`` are passed unchanged to every call. The guidance
    ``uncond + guidance_scale * (cond - uncond)`` is fused into the step kernel. A scale of 1
    calls the denoiser on ``cond`` only (with CFG++, ``cfg_pp=True``, on both: it re-noises with
    the unconditional output). ``cond`` is required with a guidance scale; ``uncond``
    may be None (the unconditional output is then the denoiser's with ``cond=None``).

    ``cuda_graph=True`` (CUDA tensors only): the whole loop, model calls included, is captured
    in one CUDA graph after one eager warm-up run and replayed; the denoiser must be
    capturable (no host syncs), a ``generator`` must be a CUDA one, and there is no callback or
    progress bar. Schedulers whose noise is a torchsde Brownian tree (``DPMSolverSDEScheduler``,
    ``CosineDPMSolverMultistepScheduler``), drawn on the host, are refused. The RNG state is
    restored before the replay, so the result equals the eager loop's with the same generator
    state. Each such call captures anew; to sample many times, capture once with
    :class:`CapturedSampler` and call it.

    ``callback`` gets k-diffusion's ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` per step on
    the sigma path (``denoised`` guided), and ``{'x', 'i', 't', 'model_output'}`` (guided) on the
    scheduler path. ``disable`` turns the tqdm progress bar off like k-diffusion's.

    The loop runs without gradients (``torch.no_grad``, as a pipeline's call and k-diffusion's
    samplers do: an inference loop keeps no activations). To differentiate through a loop (a
    few-step student trained through its own sampling), step it yourself:
    ``for t in scheduler.timesteps: x = scheduler.step(model(x, t), t, x).prev_sample`` (or
    ``step_cfg``), which autograd and ``torch.func`` differentiate; under ``torch.func.grad``
    this function raises rather than give zero gradients.
    """
    _refuse_grad_transforms("kdfast.sample")
    check_callback(callback)
    loop = _make_loop(denoiser, x, sigmas_or_scheduler, sampler=sampler, guidance_scale=guidance_scale, cond=cond,
                      uncond=uncond, extra_args=extra_args, generator=generator,
                      with_callback=callback is not None, sampler_options=sampler_options)
    return _run(loop, x, cond, uncond, generator, cuda_graph, callback, disable)


def _refuse_grad_transforms(who: str) -> None:
    """Refuse to run a no-grad loop under ``torch.func.grad`` (or ``vjp`` / ``jacrev``), where it
    would give gradients of exactly 0, silently."""
    if torch.compiler.is_compiling():
        return
    stack = torch._C._functorch.get_interpreter_stack() or ()
    if any(level.key() == torch._C._functorch.TransformType.Grad for level in stack):
        raise NotImplementedError(
            f"{who} runs without gradients (torch.no_grad): under torch.func.grad it would give zero gradients. "
            "To differentiate through a loop, step it yourself: for t in scheduler.timesteps: "
            "x = scheduler.step(model(x, t), t, x).prev_sample (or step_cfg)")


def _make_loop(denoiser, x, sigmas_or_scheduler, *, sampler, guidance_scale, cond, uncond, extra_args, generator,
               with_callback: bool, sampler_options: Dict[str, Any]) -> _Loop:
    """Validate :func:`sample`'s arguments and prepare its loop (sigma list or scheduler)."""
    from .schedulers.base import FusedScheduler

    if isinstance(sigmas_or_scheduler, FusedScheduler):
        return _scheduler_loop(denoiser, x, sigmas_or_scheduler, guidance_scale=guidance_scale, cond=cond,
                               uncond=uncond, extra_args=extra_args, generator=generator,
                               step_options=sampler_options)
    if hasattr(sigmas_or_scheduler, "set_timesteps") and hasattr(sigmas_or_scheduler, "step"):
        raise TypeError(f"{type(sigmas_or_scheduler).__name__} is not a kdfast scheduler; use one of "
                        "kdfast.schedulers (e.g. kdfast.schedulers.DPMSolverMultistepScheduler.from_config(...))")
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    unknown = sorted(set(sampler_options) - set(_OPTIONS[sampler]))
    if unknown:
        raise TypeError(f"sampler {sampler!r} takes no option(s) {unknown}; it takes {list(_OPTIONS[sampler])}")
    options = dict(_DEFAULTS[sampler])
    sampler_options = dict(sampler_options)
    noise_sampler = sampler_options.pop("noise_sampler", None)
    options.update(sampler_options)
    if sampler == "unipc":
        options = _unipc_options(**options)
    elif sampler == "lms":
        options["order"] = _int_option("order", options["order"])
    return _sigma_loop(sampler, denoiser, x, sigmas_or_scheduler, extra_args=extra_args, with_callback=with_callback,
                       noise_sampler=noise_sampler, generator=generator, guidance_scale=guidance_scale, cond=cond,
                       uncond=uncond, options=options)


from .sampling_adaptive import sample_dpm_adaptive  # noqa: E402  (it uses this module's helpers)
