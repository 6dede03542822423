"""Linear multistep sampling (k-diffusion's ``sample_lms``), as a diffusers drop-in."""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._config import register_to_config
from ._helpers import KarrasForTheStepCount
from ._linear import HISTORY, MODEL, ZERO, X, X0, Lin
from ._schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS, check_choice, noise_schedule
from .base import GrowingTable, SchedulerOutput, StepPlan, reject_unknown_step_arguments
from .euler_discrete import (_SigmaScheduler, check_sigma_options, converted_sigmas,
                             spaced_timesteps, train_sigmas)

SIGMA_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# The fused step reads three history entries: the current derivative and three past ones.
MAX_ORDER = 4


def sigma_x0(prediction_type: str, sigma: float) -> Tuple[float, float]:
    """(a, b) with ``x0 = a * x + b * model_output`` at noise level ``sigma`` (x = x0 + sigma * eps),
    as diffusers' sigma schedulers convert each prediction type."""
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return 1.0 / (sigma * sigma + 1.0), -sigma / (sigma * sigma + 1.0) ** 0.5
    return 0.0, 1.0


def sigma_derivative(prediction_type: str, sigma: float) -> Lin:
    """The ODE derivative ``(x - x0) / sigma``, simplified on the host.

    diffusers computes x0, then ``x - x0`` (= sigma * eps for an epsilon model) in float32:
    the rounding error of x0, ~1e-7 |x|, is divided by sigma, and multiplied by the step's
    size after that (a step from sigma 14.6 with a midpoint at 0.03 amplifies it 500x). The
    simplified form has no such cancellation: for an epsilon model the derivative is the model
    output itself. At sigma = 0, where diffusers divides 0 by 0 (NaN), it is the limit, the
    model output, for epsilon and v-prediction; a sample prediction has none, and steps from
    sigma = 0 have zero length: ZERO.
    """
    if prediction_type == "epsilon":
        return MODEL
    if prediction_type == "v_prediction":
        # (x - x0) / sigma with x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v
        return (sigma / (sigma * sigma + 1.0)) * X + (1.0 / (sigma * sigma + 1.0) ** 0.5) * MODEL
    return (X - MODEL) / sigma if sigma != 0.0 else ZERO


@functools.lru_cache(maxsize=None)
def _gauss_legendre(points: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    u, w = np.polynomial.legendre.leggauss(points)
    return tuple(u.tolist()), tuple(w.tolist())


def lms_coefficients(sigmas: Sequence[float], t: int, order: int) -> List[float]:
    """diffusers' ``get_lms_coefficient(order, t, j)`` for j = 0 .. order-1, in float64.

    Coefficient j is the integral over [sigmas[t], sigmas[t+1]] of the Lagrange basis polynomial
    of node sigmas[t-j] on the nodes sigmas[t], ..., sigmas[t-order+1]. diffusers integrates it
    with ``scipy.integrate.quad``, exact for a polynomial up to rounding; Gauss-Legendre with as
    many points as nodes is exact too (degree order-1 <= 2*order-1), without the adaptive
    machinery. Where diffusers divides by zero (repeated sigmas), kdfast's coefficients are
    finite: a repeated node drops to the polynomial on the nodes before it (the dropped nodes
    get 0), and a zero-length step has zero coefficients.
    """
    out = [0.0] * order
    lo, hi = sigmas[t], sigmas[t + 1]
    nodes = [sigmas[t - k] for k in range(order)]  # (t - k < 0 wraps around, as diffusers' indexing does)
    m = 1
    while m < order and nodes[m] not in nodes[:m]:
        m += 1
    u, w = _gauss_legendre(m)
    half, mid = 0.5 * (hi - lo), 0.5 * (hi + lo)
    taus = [half * x + mid for x in u]
    for j in range(m):
        acc = 0.0
        for tau, weight in zip(taus, w):
            prod = weight
            for k in range(m):
                if k != j:
                    prod *= (tau - nodes[k]) / (nodes[j] - nodes[k])
            acc += prod
        out[j] = half * acc
    return out


def check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")
    if order > MAX_ORDER:
        raise ValueError(f"order={order} is not supported: kdfast's fused LMS step reads at most "
                         f"{MAX_ORDER - 1} past derivatives, so order must be at most {MAX_ORDER} "
                         "(diffusers' default)")
    return int(order)


class LMSDiscreteScheduler(KarrasForTheStepCount, _SigmaScheduler):
    """Drop-in for ``diffusers.LMSDiscreteScheduler``: same arguments and config.

    Each ``step`` is one fused kernel pass: x0 conversion, the derivative ``(x - x0) / sigma``
    (written as the next steps' history) and the linear multistep update, which reads up to
    three past derivatives. The Lagrange integrals are computed exactly in float64 on the host
    when the schedule is set (for the default ``order=4`` and for the start that
    ``set_begin_index`` names; another ``order`` on first use), and kept in the shared table.
    ``order`` may be 1 to 4 (the kernel reads three past derivatives; diffusers allows more).

    ``derivatives`` holds the past derivatives as diffusers' list does (oldest first, at most
    ``order`` of them), except that the last step of the schedule does not add its own: no
    step reads it.
    """

    _diffusers_name = "LMSDiscreteScheduler"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        check_sigma_options(self.config)
        check_choice("prediction_type", prediction_type, SIGMA_PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(num_train_timesteps, beta_start, beta_end,
                                                                      beta_schedule, trained_betas)
        self.use_karras_sigmas = use_karras_sigmas
        self.is_scale_input_called = False
        # diffusers sets a full-length schedule at construction; its coefficients are made on
        # the first step that needs them.
        self._set_schedule(num_train_timesteps, None, build=False)

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Compute the timesteps and sigmas, and every step's kernel coefficients."""
        self._set_schedule(num_inference_steps, device, build=True)

    def _set_schedule(self, num_inference_steps, device, build: bool) -> None:
        cfg = self.config
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = int(num_inference_steps)
        timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        train = train_sigmas(self.alphas_cumprod)
        with np.errstate(divide="ignore"):  # a zero training sigma (beta_start=0) has log -inf, as in diffusers
            log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        # diffusers' LMS spaces Karras sigmas between the schedule's own ends, whatever a
        # sigma_min / sigma_max in the config says (its exponential and beta spacings read them)
        converted = converted_sigmas(cfg, sigmas, log_sigmas, n, karras_reads_config=False)
        if converted is not None:
            sigmas, timesteps = converted
        self._set_sigmas(torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)))
        host = torch.from_numpy(np.asarray(timesteps)).to(torch.float32)
        self._set_timesteps(host.to(device=device), host.tolist())
        self.num_inference_steps = n
        self.derivatives: List[torch.Tensor] = []
        self._step_index = None
        self._begin_index = None
        self._table = self._shared_table(self._build_table) if build else None

    def _build_table(self) -> GrowingTable:
        # a loop from the start at order 4: min(i + 1, 4) derivatives, all of them read
        return GrowingTable({(i, min(i + 1, MAX_ORDER), min(i + 1, MAX_ORDER)):
                             self._plan(i, min(i + 1, MAX_ORDER), min(i + 1, MAX_ORDER))
                             for i in range(len(self._host_sigmas) - 1)})

    def _plan(self, i: int, order: int, used: int) -> StepPlan:
        """Step ``i`` with the Lagrange coefficients of ``order`` nodes, of which the ``used``
        newest derivatives are summed (diffusers zips the coefficients with the derivatives it
        holds: fewer than ``order`` after an img2img start)."""
        pt = self.config.prediction_type
        sigma = self._host_sigmas[i]
        d = sigma_derivative(pt, sigma)
        coeffs = lms_coefficients(self._host_sigmas, i, order)[:used]
        sample = X + coeffs[0] * d
        for c, h in zip(coeffs[1:], HISTORY):
            sample = sample + c * h
        # the derivative is kept for later steps, except after the last one
        keep = d if i + 2 < len(self._host_sigmas) else None
        return StepPlan(x0=sigma_x0(pt, sigma), sample=sample, history=keep, aux=X0)  # aux: pred_original_sample

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """diffusers' linear multistep coefficient, computed exactly in float64 (diffusers
        evaluates the integrand in float32: the two differ by ~1e-7 relative)."""
        return lms_coefficients(self._host_sigmas, t, order)[current_order]

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where the loop starts in ``timesteps`` (pipelines call this for img2img). The first
        steps from there read fewer derivatives than their order: their coefficients are made
        here, not on the step path."""
        super().set_begin_index(begin_index)
        if self._table is None:
            return
        last = len(self._host_sigmas) - 1
        for j in range(MAX_ORDER - 1):
            i = self._begin_index + j
            if i < last:
                self._ensure(i, min(i + 1, MAX_ORDER), j + 1)

    def _ensure(self, i: int, order: int, used: int):
        return self._table.ensure((i, order, used), lambda: self._plan(i, order, used))

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True, generator: Optional[torch.Generator] = None,
             return_pred_original_sample: bool = False):
        """diffusers' ``step`` (same positional order); ``generator`` is accepted and unused.
        ``pred_original_sample`` is computed when first read, or written by the step with
        ``return_pred_original_sample=True``."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, None, order=order,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              order: int = 4, return_pred_original_sample: bool = False, **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        order = check_order(order)
        self._require_table()
        self._check_step_inputs(model_output, sample)
        i = self._index_for_step(timestep)
        kept = self.derivatives
        # diffusers appends this step's derivative (dropping the oldest once if it then holds
        # more than `order`) and zips min(step_index + 1, order) coefficients with the newest
        p = min(i + 1, order)
        used = min(p, len(kept) + 1)
        key = self._ensure(i, p, used)
        history = [kept[-1 - j] for j in range(used - 1)]
        write = self._table.plan(key).history is not None
        dtype = sample.dtype if model_output.dtype is sample.dtype else torch.promote_types(sample.dtype,
                                                                                          model_output.dtype)
        fused = dict(cond=cond, guidance_scale=guidance_scale, history=history)
        result = self._fused(key, sample, model_output, write_history=write, history_dtype=dtype,
                             write_aux=self._x0_with_step(return_pred_original_sample, sample, model_output, **fused),
                             **fused)
        out = self._output(result, key, sample, model_output, **fused)
        if write:
            kept.append(result.history)
            if len(kept) > order:
                del kept[0]
        self._step_index += 1
        return out
