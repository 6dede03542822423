"""SA-Solver (stochastic Adams predictor-corrector, Xue et al. 2023), as a diffusers drop-in.

diffusers' step first corrects the sample the previous step predicted (the SA-Corrector,
from that step's corrected sample and noise), then predicts the next sample from the
corrected one with fresh noise (the SA-Predictor). Both are linear in the step's sources,
and the predictor of step i and the corrector of step i + 1 start with the same two terms,
``A * x_i^c + B * noise_i`` (same interval, same tau, same noise). kdfast's step writes that
sum as its aux output, the *carry*; the next step reads it back, adds the corrector's
gradient terms and predicts. One kernel pass reads x, the model output(s), the history, the
carry and the new noise, and writes the prediction, the converted model output (the history
entry) and the next carry.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..ops._tensors import outside_transforms
from ._config import register_to_config
from ._helpers import (NEW_OUTPUT, OUTPUTS, check_order, legacy_arguments, output_list, required, step_position,
                       unfused)
from ._linear import AUX, H0, H1, H2, MODEL, NOISE, X, X0, ZERO, Lin
from ._schedule import (BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, alpha_sigma, check_choice,
                        check_flow_sigma_spacing, last_unclipped_timestep, log_snr, randn_like_diffusers,
                        spaced_timesteps, x0_coefficients)
from .base import (MultistepScheduler, SchedulerOutput, StepPlan, TableRow, check_variance_noise, convert_arguments,
                   converted_dtype, push_history, reject_internal_step_arguments, reject_unknown_step_arguments)
from .ddpm import noise_scales
from .euler_discrete import KARRAS_SCHEDULERS

ALGORITHM_TYPES = ("data_prediction", "noise_prediction")
ORDERS = (1, 2, 3, 4)  # diffusers' coefficient formulas stop at 4 interpolation nodes


def default_tau(t) -> int:
    """diffusers' default ``tau_func``: the SDE (tau = 1) for timesteps in [200, 800], the ODE
    (tau = 0) elsewhere. A module function, unlike diffusers' lambda, so that the scheduler pickles."""
    return 1 if t >= 200 and t <= 800 else 0


def exp_moments(rate: float, h: float, count: int) -> List[float]:
    """``I_m = integral over u in [-h, 0] of exp(rate * u) * u**m``, for m < count.

    diffusers integrates ``exp(rate * x) * x**m`` over ``[lambda_s, lambda_t]`` and expands the
    Lagrange polynomial in powers of x, whose terms (x up to ~10, cubed) cancel to a result of
    size h**4; in the shifted variable u = x - lambda_t the terms are of the result's own size,
    and the factor exp(rate * lambda_t), which overflows float32 for large tau, is left out
    (the callers fold it into alpha_t or sigma_t). Integration by parts gives the recursion."""
    decay = math.exp(-rate * h)
    moments = [-math.expm1(-rate * h) / rate]
    for m in range(1, count):
        moments.append(-(decay * (-h) ** m + m * moments[-1]) / rate)
    return moments


def _power_exp_integral(power: int, rate: float, a: float, b: float) -> float:
    """``integral over x in [a, b] of exp(rate * x) * x**power`` (rate != 0), from the
    antiderivative ``exp(rate x) * sum_k (-1)**(power-k) power!/k! x**k / rate**(power-k+1)``."""
    def antiderivative_poly(x: float) -> float:
        return sum((-1) ** (power - k) * math.factorial(power) / math.factorial(k) * x ** k / rate ** (power - k + 1)
                   for k in range(power + 1))
    return math.exp(rate * b) * (antiderivative_poly(b) - antiderivative_poly(a) * math.exp(-rate * (b - a)))


def _check_power(order) -> None:
    if order not in (0, 1, 2, 3):
        raise ValueError(f"order must be 0, 1, 2 or 3, got {order}")


def _like(value: float, *refs):
    """``value`` as a 0-d tensor of the first tensor among ``refs`` (dtype and device), else a float."""
    for ref in refs:
        if isinstance(ref, torch.Tensor):
            return torch.tensor(value, dtype=ref.dtype if ref.is_floating_point() else torch.float64,
                                device=ref.device)
    return value


def lagrange_basis(nodes: Sequence[float], k: int) -> List[float]:
    """Coefficients (ascending powers) of the Lagrange basis polynomial that is 1 at ``nodes[k]``
    and 0 at the other nodes; ZeroDivisionError where two nodes coincide."""
    poly = [1.0]
    for j, node in enumerate(nodes):
        if j == k:
            continue
        denom = nodes[k] - node
        grown = [0.0] * (len(poly) + 1)
        for m, coef in enumerate(poly):
            grown[m] -= coef * node / denom
            grown[m + 1] += coef / denom
        poly = grown
    return poly


class SASolverScheduler(MultistepScheduler):
    """Drop-in for ``diffusers.SASolverScheduler``: same arguments, config and state.

    Each ``step`` is one fused kernel pass: the model-output conversion (with the classifier-
    free guidance of ``step_cfg``), the SA-Corrector of the incoming sample, the SA-Predictor of
    the next one and its noise term, for every ``predictor_order`` and ``corrector_order`` 1-4,
    both algorithm types, every prediction type and tau. Dynamic thresholding adds one reduction
    pass before it (the per-sample quantile), and the noise is drawn with a ``torch.randn`` of
    its own at every step, as diffusers draws it (same shape, dtype and generator, draw for
    draw), also where tau = 0 leaves it unused (the kernel then does not read it).

    What differs from diffusers, and why:

    * ``last_sample`` (the corrected sample the predictor started from) is not written by the
      step: the step keeps the carry instead (see the module docstring). Reading
      ``last_sample`` computes it, one kernel pass, the first time. Assigning ``last_sample``
      or ``last_noise`` (to resume a loop), or ``tau_func`` mid-loop, makes the next step fold
      ``last_sample`` and ``last_noise`` into a carry first: one more pass, on that step only.
    * Coefficients are planned in float64 on the host when the schedule is set, from diffusers'
      closed forms in a shifted variable (see :func:`exp_moments`). Where diffusers' own float32
      coefficients lose precision (third and fourth order, fine schedules) or overflow (large
      tau: ``exp((1 + tau^2) * lambda)`` passes float32's range and its steps are NaN), kdfast
      follows diffusers' algorithm evaluated in float64.
    * ``tau_func`` is evaluated on the host: when the schedule is set, at each timestep of
      ``timesteps`` (passed as a 0-d int64 tensor, as pipelines pass them), and for a timestep
      given to ``step`` as a Python number, at that number. A tensor timestep stands for the
      schedule's timestep at the step index (reading its value would be a host sync); every
      pipeline passes exactly that one. Values are cached: ``tau_func`` must be a pure
      function; assigning a new ``scheduler.tau_func`` clears them.
    * Where a sigma repeats inside the schedule (``timestep_spacing="leading"`` or
      ``"linspace"`` with as many steps as training timesteps), diffusers' Lagrange
      interpolation divides by zero and every later step is NaN; kdfast lowers the predictor
      or corrector order there to the highest one whose nodes are distinct, and a corrector
      over a zero-length interval leaves the sample as it is (its exact limit).
    * ``algorithm_type="noise_prediction"`` with ``thresholding=True`` fails in diffusers (it
      indexes ``alpha_t`` with a timestep it was never given); kdfast thresholds the x0 that
      the step's epsilon implies at the step's own noise level, as the code intends.
      ``prediction_type="flow_prediction"`` needs ``algorithm_type="data_prediction"`` (diffusers
      raises at the first step; kdfast at construction).
    * With ``variance_type="learned"`` or ``"learned_range"`` diffusers keeps the first three
      channels of the model output but draws its noise in the full output's shape, and fails;
      kdfast raises a clear error for a model output with more channels than the sample.
    * A callable ``tau_func`` cannot be saved to JSON (nor can it in diffusers): ``save_pretrained``
      raises a TypeError that says so.
    """

    _diffusers_name = "SASolverScheduler"
    _steps_in_the_wider_dtype = False  # (diffusers casts its result to the sample's dtype)
    _compatibles = KARRAS_SCHEDULERS

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        predictor_order: int = 2,
        corrector_order: int = 2,
        prediction_type: str = "epsilon",
        tau_func: Optional[Callable] = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "data_prediction",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        lambda_min_clipped: float = -float("inf"),
        variance_type: Optional[str] = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        if sum([use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas]) > 1:
            raise ValueError("Only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used.")
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_flow_sigma_spacing(self.config, ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
        for name, order in (("predictor_order", predictor_order), ("corrector_order", corrector_order)):
            if isinstance(order, bool) or order not in ORDERS:
                raise ValueError(f"{name} must be 1, 2, 3 or 4, got {order!r}")
        if prediction_type == "flow_prediction" and algorithm_type != "data_prediction":
            raise ValueError("prediction_type='flow_prediction' needs algorithm_type='data_prediction'")
        if tau_func is not None and not callable(tau_func):
            raise TypeError(f"tau_func must be a function of the timestep (or None), got {type(tau_func).__name__}")
        if use_beta_sigmas:
            import importlib.util

            if importlib.util.find_spec("scipy") is None:
                raise ImportError("use_beta_sigmas needs scipy: pip install scipy")

        self.tau_func = default_tau if tau_func is None else tau_func
        self.predict_x0 = algorithm_type == "data_prediction"
        self._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.timestep_list: List = [None] * self._history_length()
        self.this_predictor_order: Optional[int] = None
        self.this_corrector_order: Optional[int] = None
        self._last_noise: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------- state

    @property
    def tau_func(self) -> Callable:
        """The stochasticity tau as a function of the timestep (diffusers' attribute)."""
        return self._tau_func

    @tau_func.setter
    def tau_func(self, tau_func: Callable) -> None:
        # the carry holds the last predictor's tau; diffusers' next corrector evaluates the new function
        self._tau_func, self._carry = tau_func, None
        self._tau_cache: Dict[tuple, float] = {}

    @property
    def last_sample(self) -> Optional[torch.Tensor]:
        """The sample the last predictor started from (corrected, unless the step had no corrector)."""
        if self._last_sample_maker is not None:
            i, c, tau_prev, carry, model_quantity, history = self._last_sample_maker
            self._last_sample = self._fused(self._corrected_row(i, c, tau_prev), carry, model_quantity,
                                            history=history).sample
            self._last_sample_maker = None
        return self._last_sample

    @last_sample.setter
    def last_sample(self, sample: Optional[torch.Tensor]) -> None:
        self._last_sample, self._last_sample_maker, self._carry = sample, None, None

    @property
    def last_noise(self) -> Optional[torch.Tensor]:
        """The noise the last predictor drew (the next corrector uses it again)."""
        return self._last_noise

    @last_noise.setter
    def last_noise(self, noise: Optional[torch.Tensor]) -> None:
        self._last_noise, self._carry = noise, None

    def _history_length(self) -> int:
        cfg = self.config
        return max(cfg.predictor_order, cfg.corrector_order - 1)

    def _reset_history(self) -> None:
        self.model_outputs: List[Optional[torch.Tensor]] = [None] * self._history_length()
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None
        self._last_sample: Optional[torch.Tensor] = None
        self._last_sample_maker = None
        self._carry: Optional[torch.Tensor] = None
        self._carry_tau: Optional[float] = None
        self._extra: Dict[tuple, tuple] = {}

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None) -> None:
        """Compute the timesteps and sigmas, and every step's kernel coefficients."""
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = int(num_inference_steps)
        cfg = self.config
        timesteps = spaced_timesteps(cfg.timestep_spacing, n, cfg.steps_offset, cfg.num_train_timesteps,
                                     last_unclipped_timestep(self.lambda_t, cfg.lambda_min_clipped))
        sigmas, timesteps = self._spaced_sigmas(timesteps, n)
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas or cfg.use_flow_sigmas:
            last = sigmas[-1]  # the last sigma again: the last step has length zero
        else:
            last = float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        self._install_schedule(np.concatenate([sigmas, [last]]), timesteps, device)

    def _install_schedule(self, sigmas: np.ndarray, timesteps, device) -> None:
        super()._install_schedule(sigmas, timesteps, device)
        self._plan_sigmas = self.sigmas.tolist()  # what the plans were computed from, for the extra ones
        for i in range(self.num_inference_steps):  # every tau the loop reads, also when the table was shared
            self._tau(None, i)

    # ---------------------------------------------------------------- tau

    def _tau(self, timestep, index: int) -> float:
        """tau at ``timestep``: a number as given; a tensor (or None) as the schedule's timestep at ``index``."""
        if timestep is None or isinstance(timestep, torch.Tensor):
            key = (True, self._host_timesteps[index])
        else:
            if isinstance(timestep, (np.ndarray, np.generic)):  # (an array is no dict key; one element read as its number)
                timestep = timestep.item()
            key = (False, timestep)
        tau = self._tau_cache.get(key)
        if tau is None:
            value = key[1]
            if key[0]:  # as pipelines pass it: a 0-d int64 tensor
                value = torch.tensor(int(value) if float(value).is_integer() else value)
            tau = self._tau_cache[key] = self._evaluate_tau(value)
        return tau

    def _evaluate_tau(self, timestep) -> float:
        out = self._tau_func(timestep)
        if not (isinstance(out, numbers.Real) or (isinstance(out, torch.Tensor) and out.numel() == 1)):
            raise TypeError(f"tau_func must return a number, got {out!r} at timestep {timestep!r}")
        tau = float(out)
        if not math.isfinite(tau):
            raise ValueError(f"tau_func returned {tau} at timestep {timestep!r}; expected a finite number")
        return tau

    # ---------------------------------------------------------------- coefficients

    def _plans(self, sigmas: List[float]) -> Dict[tuple, StepPlan]:
        """Plans keyed (step index, predictor order, corrector order or 0, the corrector's tau
        or None, the predictor's tau), for every order pair a loop reaches (from any begin
        index) with the schedule's own taus; other keys are made when a step asks for them."""
        n = len(sigmas) - 1
        taus = [self._tau(None, i) for i in range(n)]
        depth = self._history_length()
        plans = {}
        for i in range(n):
            p_cap, c_cap = self._order_caps(i, n)
            _, c_cap_before = self._order_caps(i - 1, n)
            for k in range(min(i, depth + 1) + 1):  # k: steps the loop took before this one
                p = min(p_cap, min(k, depth) + 1)
                c = 0 if k == 0 else min(c_cap_before, min(k - 1, depth) + 2)
                key = (i, p, c, taus[i - 1] if c else None, taus[i])
                if key not in plans:
                    plan = self._plan(sigmas, *key)
                    if plan is not None:
                        plans[key] = plan
        return plans

    def _order_caps(self, i: int, n: int) -> Tuple[int, int]:
        """(predictor, corrector) orders allowed at step ``i`` of ``n`` (before the warm-up limit)."""
        cfg = self._config
        if cfg.lower_order_final:
            return min(cfg.predictor_order, n - i), min(cfg.corrector_order, n - i + 1)
        return cfg.predictor_order, cfg.corrector_order

    def _lam(self, sigma: float) -> float:
        return log_snr(*alpha_sigma(sigma, self.config.use_flow_sigmas))

    def _model_quantity(self, sigmas: List[float], i: int) -> Tuple[Lin, Tuple[float, float]]:
        """(what the solver keeps at step i, x0 coefficients): x0 (data_prediction) or epsilon."""
        cfg = self.config
        a, s = alpha_sigma(sigmas[i], cfg.use_flow_sigmas)
        if self.predict_x0:
            if cfg.prediction_type == "flow_prediction":
                return X0, (1.0, -sigmas[i])  # diffusers: x0 = x - sigma * v with the schedule's raw sigma
            return X0, x0_coefficients(cfg.prediction_type, a, s)
        # epsilon = e_x * x + e_m * model_output
        e_x, e_m = {"epsilon": (0.0, 1.0), "sample": (1.0 / s, -a / s), "v_prediction": (s, a)}[cfg.prediction_type]
        x0 = ((1.0 - s * e_x) / a, -s * e_m / a)  # the x0 that epsilon implies
        if cfg.thresholding:
            return (X - a * X0) / s, x0  # epsilon again, from the thresholded x0
        return e_x * X + e_m * MODEL, x0

    def _decay_and_noise(self, sigmas: List[float], s: int, t: int, tau: float) -> Tuple[float, float]:
        """(A, B) of ``A * x + B * noise``, the update's first terms from ``sigmas[s]`` to ``sigmas[t]``."""
        flow = self.config.use_flow_sigmas
        a_s, s_s = alpha_sigma(sigmas[s], flow)
        a_t, s_t = alpha_sigma(sigmas[t], flow)
        h = log_snr(a_t, s_t) - log_snr(a_s, s_s)
        if self.predict_x0:
            return math.exp(-tau * tau * h) * s_t / s_s, s_t * math.sqrt(-math.expm1(-2.0 * tau * tau * h))
        return a_t / a_s, tau * s_t * math.sqrt(math.expm1(2.0 * h))

    def _gradient(self, sigmas: List[float], i: int, s: int, t: int, order: int, tau: float,
                  corrector: bool, quantity: Lin, history: Sequence[Lin] = (H0, H1, H2)) -> Optional[Lin]:
        """The gradient part of an update from ``sigmas[s]`` to ``sigmas[t]`` at step ``i``:
        ``sum_k g_k * m_{i-k}`` over the step's model quantity (``quantity``) and the ``order - 1``
        ``history`` entries before it, newest first (the Lagrange interpolation nodes are the
        log-SNRs of ``sigmas[i - k]``, Python indexing like diffusers' tensor indexing). None
        where it is not finite."""
        sources = (quantity, *history)
        if len(sources) < order:
            raise ValueError(f"an order-{order} update needs {order} model quantities, got {len(sources)}")
        try:
            lam_t = self._lam(sigmas[t])
            h = lam_t - self._lam(sigmas[s])
            if h == 0.0:
                return ZERO  # an empty interval: diffusers' 0 at order 1, 0 / 0 above it
            a_t, s_t = alpha_sigma(sigmas[t], self.config.use_flow_sigmas)
            k1 = 1.0 + tau * tau
            nodes = [self._lam(sigmas[i - k]) - lam_t for k in range(order)]
            if self.predict_x0:
                # (1 + tau^2) sigma_t e^{-tau^2 lambda_t} times the integral of e^{(1 + tau^2) x} L_k(x),
                # with e^{(1 + tau^2) lambda_t} taken out: sigma_t e^{lambda_t} = alpha_t
                scale, moments = k1 * a_t, exp_moments(k1, h, order)
            else:
                # -(1 + tau^2) alpha_t times the integral of e^{-x} L_k(x), with e^{-lambda_t} taken out
                scale, moments = -k1 * s_t, exp_moments(-1.0, h, order)
            g = []
            for k in range(order):
                basis = lagrange_basis(nodes, k)
                g.append(scale * sum(c * moments[m] for m, c in enumerate(basis)))
            if self.predict_x0 and order == 2:
                # diffusers' O(h^3) modification of the second-order updates (as UniPC's)
                inner = h * k1 + math.expm1(-k1 * h)
                if corrector:
                    extra = h / 2 - inner / (k1 * k1 * h)
                else:
                    extra = (h * h / 2 - inner / (k1 * k1)) / (self._lam(sigmas[i]) - self._lam(sigmas[i - 1]))
                g[0] += scale * extra
                g[1] -= scale * extra
        except (ZeroDivisionError, OverflowError, ValueError):
            return None
        if not all(math.isfinite(v) for v in g):
            return None
        out = ZERO
        for coef, source in zip(g, sources):
            out = out + coef * source
        return out

    def _plan(self, sigmas: List[float], i: int, p: int, c: int, tau_prev: Optional[float],
              tau: float) -> Optional[StepPlan]:
        """Step ``i``: the corrector of order ``c`` (none for 0) from the carry, then the predictor
        of order ``p``; None where an update is not finite."""
        try:
            q, x0 = self._model_quantity(sigmas, i)
            start = X
            if c:
                correction = self._gradient(sigmas, i, i - 1, i, c, tau_prev, True, q)
                if correction is None:
                    return None
                start = AUX + correction
            prediction = self._gradient(sigmas, i, i, i + 1, p, tau, False, q)
            if prediction is None:
                return None
            decay, noise = self._decay_and_noise(sigmas, i, i + 1, tau)
        except (ZeroDivisionError, OverflowError, ValueError):
            return None
        carry = decay * start + noise * NOISE
        plan = StepPlan(x0=x0, sample=carry + prediction, history=q, aux=carry)
        for out in (plan.sample, plan.aux):
            if not all(math.isfinite(v) for v in out.terms.values()):
                return None
        return plan

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: Optional[torch.Tensor] = None, **kwargs):
        """diffusers' ``step`` (same positional order): one fused kernel pass. The noise is drawn
        from ``generator`` as diffusers draws it; ``variance_noise`` (kdfast) supplies it instead."""
        reject_internal_step_arguments(kwargs)
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise, **kwargs)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> SchedulerOutput:
        if kwargs:
            reject_unknown_step_arguments(kwargs)
        if self.num_inference_steps is None:
            self._require_timesteps()
        cfg = self._config
        if (cfg.variance_type in ("learned", "learned_range") and isinstance(model_output, torch.Tensor)
                and isinstance(sample, torch.Tensor) and model_output.dim() > 1 and sample.dim() > 1
                and model_output.shape[1] != sample.shape[1]):
            raise ValueError(
                f"model_output has {model_output.shape[1]} channels and sample {sample.shape[1]}: with variance_type="
                f"{cfg.variance_type!r} diffusers' SA-Solver keeps 3 channels of the output but draws its noise in the "
                f"output's shape, and fails; pass only the predicted mean, model_output[:, :{sample.shape[1]}]")
        self._check_step_inputs(model_output, sample)
        i = self._step_index
        if i is None:
            self._init_step_index(timestep)
            i = self._step_index
        n = len(self._host_timesteps)
        if i >= n:
            raise IndexError(f"step {i} is past the end of the {n}-step schedule; call set_timesteps again")

        c = 0
        tau_prev = None
        carry = self._carry
        if i > 0 and (self._last_sample is not None or self._last_sample_maker is not None):
            c = self.this_corrector_order
            if c is None:
                raise ValueError("last_sample is set but this_corrector_order is not: set both to resume an "
                                 "SA-Solver loop")
            if carry is None:  # state set from outside: fold last_sample and last_noise into a carry
                tau_prev = self._tau(self.timestep_list[-1], i - 1)
                carry = self._fold(i, tau_prev)
            else:
                tau_prev = self._carry_tau
        tau = self._tau(timestep, i)
        depth = self._history_length()
        p_cap, c_cap = self._order_caps(i, n)
        lower = self.lower_order_nums
        p = min(p_cap, lower + 1)
        next_c = min(c_cap, lower + 2)

        key = (i, p, c, tau_prev, tau)
        p_used, c_used = p, c
        if key not in self._table._rows:
            key, p_used, c_used = self._extra_step(key)
        reads = max(p_used, c_used) - 1
        outputs = self.model_outputs
        history = outputs[:-1 - reads:-1]  # the newest `reads` entries, newest first
        if len(history) < reads:
            raise ValueError("model_outputs is missing entries this step needs")
        for h in history:  # not `None in history`: that compares tensors with None
            if h is None:
                raise ValueError("model_outputs is missing entries this step needs")

        check_variance_noise(variance_noise, model_output)
        noise = variance_noise
        if noise is None:
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
        result = self._fused(key, sample, model_output, cond=cond, guidance_scale=guidance_scale, history=history,
                             aux=carry if c else None, noise=noise if tau != 0.0 else None, write_history=True,
                             write_aux=i + 1 < n,
                             dynamic=(cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding
                             else None,
                             history_dtype=converted_dtype(sample, model_output, cfg.prediction_type == (
                                 "sample" if cfg.algorithm_type == "data_prediction" else "epsilon")))

        if c:
            self._last_sample = None
            self._last_sample_maker = (i, c_used, tau_prev, carry, result.history, history[:c_used - 1])
        else:
            self._last_sample, self._last_sample_maker = sample, None
        push_history(outputs, result.history, depth)
        push_history(self.timestep_list, timestep, depth)
        self._last_noise = noise
        self._carry, self._carry_tau = result.aux, tau
        self.this_predictor_order, self.this_corrector_order = p, next_c
        if lower < depth:
            self.lower_order_nums = lower + 1
        self._step_index = i + 1
        return SchedulerOutput(result.sample)

    def _extra_row(self, key: tuple, make: Callable[[], Optional[StepPlan]]) -> Optional[TableRow]:
        """The coefficients of a plan that is not in the schedule's table, made on first use."""
        row = self._extra.get(key)
        if row is None:
            with outside_transforms():  # (kept for later steps: never a transform's storage-less wrapper)
                plan = make()
                if plan is None:
                    return None
                row = self._extra[key] = TableRow(plan)
        return row

    def _extra_step(self, key: tuple) -> Tuple[TableRow, int, int]:
        """``(row, predictor order, corrector order)`` of a step not planned in advance (state set
        from outside, a timestep off the schedule, or orders lowered where interpolation nodes
        coincide)."""
        found = self._extra.get(("step",) + key)
        if found is not None:
            return found
        i, p, c, tau_prev, tau = key
        sigmas = self._plan_sigmas
        while c > 1 and self._gradient(sigmas, i, i - 1, i, c, tau_prev, True, X0) is None:
            c -= 1
        while p > 1 and self._gradient(sigmas, i, i, i + 1, p, tau, False, X0) is None:
            p -= 1
        row = self._extra_row((i, p, c, tau_prev, tau), lambda: self._plan(sigmas, i, p, c, tau_prev, tau))
        if row is None:
            raise ValueError(f"no finite SA-Solver update at step {i} (sigma {sigmas[i]} to {sigmas[i + 1]})")
        found = self._extra[("step",) + key] = (row, p, c)
        return found

    def _corrected_row(self, i: int, c: int, tau_prev: float) -> TableRow:
        """Coefficients of step i's corrected sample from its inputs carry (as ``sample``), model
        quantity (as ``model_output``) and history: what ``last_sample`` computes when read."""
        def make():
            correction = self._gradient(self._plan_sigmas, i, i - 1, i, c, tau_prev, True, MODEL)
            return StepPlan(x0=(0.0, 0.0), sample=X + correction)

        return self._extra_row(("corrected", i, c, tau_prev), make)

    def _fold(self, i: int, tau_prev: float) -> torch.Tensor:
        """The carry of step ``i`` from ``last_sample`` and ``last_noise`` (one kernel pass)."""
        sample, noise = self.last_sample, self._last_noise
        if noise is None:
            raise ValueError("last_sample is set but last_noise is not: set both to resume an SA-Solver loop")

        def make():
            decay, scale = self._decay_and_noise(self._plan_sigmas, i - 1, i, tau_prev)
            return StepPlan(x0=(0.0, 0.0), sample=decay * X + scale * NOISE)

        row = self._extra_row(("carry", i, tau_prev), make)
        return self._fused(row, sample, sample, noise=noise).sample

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: Optional[torch.Tensor] = None,
                             **kwargs) -> torch.Tensor:
        """The solver's quantity (x0 for data_prediction, else epsilon) at the current step,
        thresholded as the step thresholds it."""
        sample = convert_arguments(args, kwargs, sample)
        cfg = self.config
        if (sample is not None and cfg.variance_type in ("learned", "learned_range")
                and cfg.prediction_type == "epsilon" and model_output.shape[1] != sample.shape[1]):
            model_output = model_output[:, :3]
        i = self._step_index
        key = None
        if i is not None:
            def make():
                q, x0 = self._model_quantity(self._plan_sigmas, i)
                return StepPlan(x0=x0, sample=q, history=q)

            key = self._extra_row(("convert", i), make)
        return self._converted_output(model_output, sample, key, cfg.thresholding)

    # ---------------------------------------------------------------- diffusers' helpers
    # The coefficient helpers below are diffusers' building blocks, for callers that use them;
    # the step's tables integrate in a shifted variable instead (see exp_moments). They compute
    # in float64 and return the inputs' tensor type (a Python float for numbers).

    def get_coefficients_exponential_negative(self, order: int, interval_start, interval_end):
        """``integral of exp(-x) * x**order`` over ``[interval_start, interval_end]`` (order 0-3)."""
        _check_power(order)
        return _like(_power_exp_integral(order, -1.0, float(interval_start), float(interval_end)),
                     interval_start, interval_end)

    def get_coefficients_exponential_positive(self, order: int, interval_start, interval_end, tau):
        """``integral of exp((1 + tau**2) * x) * x**order`` over ``[interval_start, interval_end]``
        (order 0-3)."""
        _check_power(order)
        rate = 1.0 + float(tau) ** 2
        return _like(_power_exp_integral(order, rate, float(interval_start), float(interval_end)),
                     interval_start, interval_end)

    def lagrange_polynomial_coefficient(self, order: int, lambda_list) -> list:
        """The Lagrange basis polynomials of the ``order + 1`` nodes ``lambda_list`` (order 0-3),
        each as its coefficients from the highest power down (diffusers' layout)."""
        _check_power(order)
        if len(lambda_list) != order + 1:
            raise ValueError(f"lambda_list must hold order + 1 = {order + 1} nodes, got {len(lambda_list)}")
        nodes = [float(v) for v in lambda_list]
        return [[_like(c, *lambda_list) for c in reversed(lagrange_basis(nodes, k))] for k in range(order + 1)]

    def get_coefficients_fn(self, order: int, interval_start, interval_end, lambda_list, tau) -> list:
        """The ``order`` gradient coefficients of an SA-Solver update over
        ``[interval_start, interval_end]``: the integral of each Lagrange basis polynomial of
        ``lambda_list`` times ``exp((1 + tau**2) x)`` (data prediction) or ``exp(-x)``."""
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order}")
        if len(lambda_list) != order:
            raise ValueError(f"lambda_list must hold order = {order} nodes, got {len(lambda_list)}")
        nodes = [float(v) for v in lambda_list]
        a, b = float(interval_start), float(interval_end)
        rate = 1.0 + float(tau) ** 2 if self.predict_x0 else -1.0
        integrals = [_power_exp_integral(m, rate, a, b) for m in range(order)]
        return [_like(sum(c * integrals[m] for m, c in enumerate(lagrange_basis(nodes, k))), interval_start,
                      interval_end) for k in range(order)]

    def stochastic_adams_bashforth_update(self, model_output: torch.Tensor, *args,
                                          sample: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                                          order: Optional[int] = None, tau=None, **kwargs) -> torch.Tensor:
        """diffusers' SA-Predictor of ``order`` from ``sample`` at the current step, with the
        converted outputs in ``self.model_outputs`` (its newest is this step's; ``model_output``
        is unused, as in diffusers), the step's ``noise`` and stochasticity ``tau``: unfused,
        for callers that use it (``step`` does not). Returned in the sample's dtype."""
        method = "stochastic_adams_bashforth_update"
        sample, noise, order, tau = legacy_arguments(method, args, kwargs, ("prev_timestep",), sample=sample,
                                                     noise=noise, order=order, tau=tau)
        for name, value in (("sample", sample), ("noise", noise), ("tau", tau)):
            required(method, name, value)
        order = check_order(method, order, ORDERS)
        i, tau = self._helper_position(method, tau, 1, order - 1)
        return self._helper_update(method, i, i + 1, order, tau, False, X, sample,
                                   {"x": sample, "noise": noise, **output_list(method, self.model_outputs, order)})

    def stochastic_adams_moulton_update(self, this_model_output: torch.Tensor, *args,
                                        last_sample: Optional[torch.Tensor] = None,
                                        last_noise: Optional[torch.Tensor] = None,
                                        this_sample: Optional[torch.Tensor] = None, order: Optional[int] = None,
                                        tau=None, **kwargs) -> torch.Tensor:
        """diffusers' SA-Corrector of ``order`` at the current step: corrects the previous
        step's prediction from ``last_sample`` and ``last_noise`` (that step's sample and
        noise) with ``this_model_output``, the converted output here, and
        ``self.model_outputs`` (not yet holding it); ``tau`` is the previous step's. Unfused,
        returned in ``last_sample``'s dtype; ``this_sample`` is required, as in diffusers, and
        unused."""
        method = "stochastic_adams_moulton_update"
        last_sample, last_noise, this_sample, order, tau = legacy_arguments(
            method, args, kwargs, ("this_timestep",), last_sample=last_sample, last_noise=last_noise,
            this_sample=this_sample, order=order, tau=tau)
        for name, value in (("last_sample", last_sample), ("last_noise", last_noise), ("this_sample", this_sample),
                            ("tau", tau)):
            required(method, name, value)
        order = check_order(method, order, ORDERS)
        i, tau = self._helper_position(method, tau, 0, max(1, order - 1))
        outputs = output_list(method, self.model_outputs, order - 1) if order > 1 else {}
        return self._helper_update(method, i - 1, i, order, tau, True, AUX, last_sample,
                                   {"aux": last_sample, "noise": last_noise, "new_output": this_model_output,
                                    **outputs})

    def _helper_position(self, method: str, tau, ahead: int, back: int) -> Tuple[int, float]:
        """(step index, tau) of a helper call, checked (see :func:`step_position`)."""
        i, _ = step_position(self, method, ahead, self._plan_sigmas, back)
        tau = float(tau)
        if not math.isfinite(tau):
            raise ValueError(f"{method}: tau must be a finite number, got {tau}")
        return i, tau

    def _helper_update(self, method: str, s: int, t: int, order: int, tau: float, corrector: bool, start: Lin,
                       like: torch.Tensor, tensors: dict) -> torch.Tensor:
        """The predictor (or corrector) rule from ``sigmas[s]`` to ``sigmas[t]``, from ``start``,
        evaluated on the caller's tensors; the step's table is planned from the same rule."""
        sigmas = self._plan_sigmas
        i = self.step_index
        quantity, history = (NEW_OUTPUT, OUTPUTS) if corrector else (OUTPUTS[0], OUTPUTS[1:])
        rule = self._gradient(sigmas, i, s, t, order, tau, corrector, quantity, history)
        try:
            decay, noise_scale = self._decay_and_noise(sigmas, s, t, tau)
        except (ZeroDivisionError, OverflowError, ValueError):
            rule = None
        if rule is not None:
            rule = decay * start + noise_scale * NOISE + rule
        return unfused(method, rule, order, i, tensors, like.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` at the training timesteps (diffusers' SA-Solver uses
        DDPM's ``add_noise``), bit-identical to diffusers'."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = noise_scales(self, timesteps, original_samples)
        return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise

    def to_json_string(self) -> str:
        """The config as JSON (what ``save_pretrained`` writes); a callable ``tau_func`` cannot be."""
        if self.config.tau_func is not None:
            raise TypeError("tau_func: a function cannot be saved in scheduler_config.json (diffusers cannot "
                            "either); save a scheduler built without it and pass tau_func= when loading")
        return super().to_json_string()

