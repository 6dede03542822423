"""Noise schedules and sigma spacings shared by every scheduler (diffusers' definitions).

The training noise schedule (betas, cumulative alphas) is computed in float32 as diffusers
does, because it *is* the model's schedule; everything derived from it for sampling is
float64 on the host.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .._checks import is_integer_at_least
from ..ops._tensors import _F32_MAX, F32_ROUNDS_TO_ZERO

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, choices))}")


# What a config or step argument that must be a number may be (a bool is not one)
NUMBERS = (int, float, np.integer, np.floating)


def finite_number(name: str, value) -> float:
    """``value`` as a float, or a ValueError naming ``name`` when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, NUMBERS) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_shift(shift) -> float:
    """A flow-matching ``shift``: ``shift * s / (1 + (shift - 1) * s)`` maps [0, 1] onto itself
    for a shift > 0 only; at 0 or below it gives sigmas of either sign or a division by zero
    (diffusers' loops ran on to values of 1e8 or NaN)."""
    value = finite_number("shift", shift)
    if value <= 0:
        raise ValueError(f"shift must be > 0 (the sigmas are shift * s / (1 + (shift - 1) * s)), got {shift!r}")
    return value


def check_clipping_config(config: Mapping) -> None:
    """The x0 clipping settings of a scheduler's config, refused by name at construction (the
    step refused them later, under its kernel's argument names): ``dynamic_thresholding_ratio``
    a quantile in [0, 1]; with ``thresholding``, ``sample_max_value`` a positive float32; with
    ``clip_sample``, ``clip_sample_range`` a float32 >= 0."""
    if "dynamic_thresholding_ratio" in config:
        ratio = finite_number("dynamic_thresholding_ratio", config["dynamic_thresholding_ratio"])
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in [0, 1] (a quantile), got {ratio}")
    if config.get("thresholding") and "sample_max_value" in config:
        value = finite_number("sample_max_value", config["sample_max_value"])
        if not F32_ROUNDS_TO_ZERO < value <= _F32_MAX:
            raise ValueError(f"sample_max_value must be positive (x0 is divided by its clamped quantile) and "
                             f"within float32's range, got {value}")
    if config.get("clip_sample") and "clip_sample_range" in config:
        value = finite_number("clip_sample_range", config["clip_sample_range"])
        if not 0.0 <= value <= _F32_MAX:
            raise ValueError(f"clip_sample_range must be >= 0 (x0 is clamped to [-range, range]) and within "
                             f"float32's range, got {value}")


_INTEGER_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def is_integer_timestep(timestep) -> bool:
    """Whether ``timestep`` is an integer (or bool) number or tensor: a loop index passed where a
    value of ``scheduler.timesteps`` belongs."""
    if isinstance(timestep, torch.Tensor):
        return timestep.dtype in _INTEGER_DTYPES
    return isinstance(timestep, (bool, int, np.integer))


def check_flow_sigma_spacing(config, spacings: Sequence[str]) -> None:
    """Refuse ``use_flow_sigmas`` with one of ``spacings`` (Karras, exponential, ... sigmas): the
    diffusers class spaces those on the training noise schedule (sigmas up to ~150), then reads
    them as flow sigmas, where alpha = 1 - sigma < 0: every step is NaN."""
    chosen = [name for name in spacings if config[name]]
    if config.use_flow_sigmas and chosen:
        raise ValueError(f"use_flow_sigmas=True cannot be combined with {chosen[0]}=True: those sigmas are "
                         "spaced on the training noise schedule, not as flow sigmas (diffusers' steps are all NaN)")


def betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (``squaredcos_cap_v2``) of Nichol & Dhariwal."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def check_training_steps(num_train_timesteps, trained_betas) -> None:
    """A schedule without trained betas needs at least one training timestep (diffusers fails
    with an IndexError at 0); trained betas need one per training timestep (the timesteps
    span ``num_train_timesteps``: past the table they failed or read its end)."""
    if trained_betas is None:
        if not is_integer_at_least(num_train_timesteps, 1):
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
        return
    count = trained_betas.numel() if isinstance(trained_betas, torch.Tensor) else np.size(trained_betas)
    if count != num_train_timesteps:
        raise ValueError(f"trained_betas must hold one beta per training timestep (num_train_timesteps="
                         f"{num_train_timesteps!r}), got {count}")


def last_unclipped_timestep(lambda_t: torch.Tensor, lambda_min_clipped) -> int:
    """DPM-Solver's ``lambda_min_clipped``: the training timesteps whose log-SNR ``lambda_t`` is
    below it are cut off the noisy end; the number kept. Refused when NaN or when it keeps none
    (the schedule was built of timestep -1, the model called there)."""
    if (isinstance(lambda_min_clipped, bool) or not isinstance(lambda_min_clipped, (int, float, np.number))
            or math.isnan(lambda_min_clipped)):
        raise ValueError(f"lambda_min_clipped must be a number (-inf: no clipping), got {lambda_min_clipped!r}")
    kept = lambda_t.numel() - int(torch.searchsorted(torch.flip(lambda_t, [0]), float(lambda_min_clipped)))
    if kept < 1:
        raise ValueError(f"lambda_min_clipped={lambda_min_clipped} clips every training timestep (the largest "
                         f"log-SNR is {float(lambda_t.max()):.4g})")
    return kept


def check_betas(betas: torch.Tensor, beta_start, beta_end, beta_schedule, trained_betas) -> torch.Tensor:
    """``betas``, refused by name where they are not finite or leave [0, 1]: NaN or negative
    alphas, whose square roots every step takes (diffusers returns NaN)."""
    if betas.numel() == 0 or not bool(((betas >= 0) & (betas <= 1)).all()):  # (NaN fails both)
        source = ("trained_betas" if trained_betas is not None
                  else f"beta_start={beta_start!r} and beta_end={beta_end!r} ({beta_schedule})")
        raise ValueError(f"the training betas must be finite and in [0, 1] (at least one), which {source} do not "
                         f"give")
    return betas


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None, rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """The training betas, checked (check_training_steps, check_betas)."""
    check_training_steps(num_train_timesteps, trained_betas)
    betas = _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr)
    return check_betas(betas, beta_start, beta_end, beta_schedule, trained_betas)


def _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr):
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    else:
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def noise_schedule(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                   trained_betas=None, rescale_betas_zero_snr: bool = False,
                   floor_terminal: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(betas, alphas, alphas_cumprod) of the training schedule, float32 like diffusers.

    ``floor_terminal``: with zero-terminal-SNR rescaling, set the last cumulative alpha to
    2**-24 instead of 0 so that the first sigma stays finite (diffusers' Euler and multistep
    schedulers do this; DDIM and LCM do not).
    """
    betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    if rescale_betas_zero_snr and floor_terminal:
        alphas_cumprod[-1] = 2**-24
    return betas, alphas, alphas_cumprod


def log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma); +inf at sigma = 0 (the end of a zero-final-sigma schedule)."""
    return math.inf if sigma == 0.0 else math.log(alpha) - math.log(sigma)


def spaced_timesteps(spacing: str, n: int, steps_offset: int, num_train_timesteps: int,
                     last_timestep: Optional[int] = None) -> np.ndarray:
    """diffusers' linspace / leading / trailing spacings (Lin et al. 2023, table 2), descending.

    ``last_timestep`` (default: ``num_train_timesteps``) ends the range early, for DPM-Solver's
    ``lambda_min_clipped``.
    """
    last = num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    ratio = num_train_timesteps / n
    return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1


def host_array(values, dtype) -> np.ndarray:
    """User-given timesteps or sigmas (a sequence, a numpy array, or a tensor on any device) as a
    new numpy array of ``dtype``, the values ``np.array(values).astype(dtype)`` gives; that
    warns for a tensor under numpy 2 (torch's ``__array__`` takes no ``copy``) and fails for
    one on a GPU."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = (values.double() if values.is_floating_point() else values).numpy()
    return np.array(values).astype(dtype)


def custom_schedule(name: str, values, dtype, sigmas: bool = False) -> np.ndarray:
    """:func:`host_array` of a schedule passed to ``set_timesteps``, refused by name unless it
    is a non-empty 1-D sequence of finite numbers (``sigmas``: >= 0 too): an empty one ran no
    step or failed with a ZeroDivisionError, NaN ones ran NaN steps. (One sigma, the end alone,
    is a schedule of no steps, as in diffusers.)"""
    try:
        host = host_array(values, np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got {values!r}") from exc
    if host.ndim != 1 or host.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {host.shape}")
    if not np.isfinite(host).all() or (sigmas and (host < 0).any()):
        raise ValueError(f"{name} must be finite{' and >= 0' if sigmas else ''}, got {host.tolist()}")
    return host.astype(dtype)  # (the float64 copy's values: exact for any schedule's numbers)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating in log-sigma."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Beta-distribution spacing (Lee et al. 2024); needs scipy."""
    try:
        import scipy.stats
    except ImportError as exc:  # pragma: no cover - scipy is a test dependency
        raise ImportError("use_beta_sigmas needs scipy: pip install scipy") from exc
    ppf = [scipy.stats.beta.ppf(t, alpha, beta) for t in 1 - np.linspace(0, 1, n)]
    return np.array([sigma_min + p * (sigma_max - sigma_min) for p in ppf])


def lu_lambdas(lambda_min: float, lambda_max: float, n: int) -> np.ndarray:
    """Uniform log-SNR spacing (Lu et al., DPM-Solver)."""
    ramp = np.linspace(0, 1, n)
    return lambda_max + ramp * (lambda_min - lambda_max)


def sigma_range(config, in_sigmas: np.ndarray) -> Tuple[float, float]:
    """(sigma_min, sigma_max): the config's when it sets them, else the schedule's ends."""
    lo = config.get("sigma_min") if hasattr(config, "get") else None
    hi = config.get("sigma_max") if hasattr(config, "get") else None
    return (float(in_sigmas[-1]) if lo is None else lo, float(in_sigmas[0]) if hi is None else hi)


def alpha_sigma(sigma: float, flow: bool = False) -> Tuple[float, float]:
    """(alpha_t, sigma_t) of the VP (or flow-matching) process at noise level ``sigma``."""
    if flow:
        return 1.0 - sigma, sigma
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def x0_coefficients(prediction_type: str, alpha_t: float, sigma_t: float) -> Tuple[float, float]:
    """(c_x, c_m) with x0 = c_x * x + c_m * model_output, for x_t = alpha_t x0 + sigma_t eps."""
    if prediction_type == "epsilon":
        return 1.0 / alpha_t, -sigma_t / alpha_t
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return alpha_t, -sigma_t
    if prediction_type == "flow_prediction":
        return 1.0, -sigma_t
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    raise AssertionError


# Stands in for 1 / alpha_t = inf when x0 is to be clipped anyway (see epsilon_x0_coefficients).
_ZERO_ALPHA_SCALE = 2.0 ** 100


def x0_error(t: int, alpha_prod_t: float, zero_snr: bool, clips: bool = True) -> str:
    """Why a step at ``t`` is refused: an epsilon model defines no x0 where alphas_cumprod is 0
    (``clips``: whether the scheduler's step applies clip_sample and thresholding, which would)."""
    why = " (rescale_betas_zero_snr=True)" if zero_snr else ""
    unless, clip = (" without clip_sample or thresholding", " clip_sample=True,") if clips else ("", "")
    return (f"timestep {t}: alphas_cumprod[{t}] is {alpha_prod_t:g}{why}, where prediction_type='epsilon' defines "
            f"no x0{unless} (diffusers' step returns inf/NaN there); use prediction_type='v_prediction',{clip} or a "
            "timestep_spacing that skips the last training timestep")


def epsilon_x0_coefficients(alpha_t: float, sigma_t: float, bounded: bool) -> Tuple[float, float]:
    """(c_x, c_m) of ``x0 = (x - sigma_t * eps) / alpha_t`` for an epsilon model.

    At alpha_t = 0 (the first step of a zero-SNR rescaled schedule) x0 is +-inf, which diffusers
    then clips or thresholds to +-bound. ``inf * x - inf * eps`` would be NaN instead, so when
    x0 is ``bounded`` the scale is a finite power of two, 2^100: ``x * 2^100`` is exact, the
    difference has the sign of ``x - sigma_t * eps``, and clipping gives diffusers' values.
    Unbounded, x0 is infinite there in both libraries.
    """
    if alpha_t == 0:
        scale = _ZERO_ALPHA_SCALE if bounded else math.inf
        return scale, -sigma_t * scale
    return 1.0 / alpha_t, -sigma_t / alpha_t


def randn_like_diffusers(shape, generator, device, dtype) -> torch.Tensor:
    """Noise drawn exactly as diffusers' ``randn_tensor`` draws it, for draw-for-draw parity.

    ``generator``: None, one ``torch.Generator``, or a list of one per batch entry (what
    pipelines pass on for ``pipe(..., generator=[g0, g1])``): entry i is drawn from
    ``generator[i]``."""
    device = torch.device(device)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {shape[0]}; "
                             "pass one per batch entry or a single one")
    first = generator[0] if isinstance(generator, (list, tuple)) else generator
    gen_device = first.device if first is not None else device
    if gen_device.type != device.type and gen_device.type != "cpu":
        raise ValueError(f"generator: cannot draw a {device.type} tensor from a {gen_device.type} generator")
    draw_device = "cpu" if gen_device.type == "cpu" else device
    if isinstance(generator, (list, tuple)):
        one = (1,) + tuple(shape[1:])
        noise = torch.cat([torch.randn(one, generator=g, device=draw_device, dtype=dtype) for g in generator])
    else:
        noise = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
    return noise.to(device)
