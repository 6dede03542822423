"""Singlestep DPM-Solver / DPM-Solver++ (orders 1-3) and SDE-DPM-Solver++, as a diffusers drop-in.

A singlestep solver takes its steps in groups (``order_list``: 1, 2, 3, 1, 2, 3, ...): the
k-th step of a group integrates from the group's first sample to the next sigma, using the
model outputs of the group's steps so far. Every step is still linear in what it reads: the
current sample and model output (converted to x0 or epsilon), the converted outputs of the
group's earlier steps (history, newest first) and the group's first sample (``aux``, diffusers'
``self.sample``). So each step is one fused kernel pass, with coefficients from a table
computed in float64 when the schedule is set.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._config import register_to_config
from ._helpers import OUTPUTS, check_order, legacy_arguments, output_list, required, step_position, unfused
from ._linear import AUX, H0, H1, MODEL, NOISE, X, X0, Lin
from ._schedule import (alpha_sigma, check_choice, custom_schedule, last_unclipped_timestep, log_snr, spaced_timesteps,
                        x0_coefficients)
from .base import (MultistepScheduler, SchedulerOutput, StepPlan, convert_arguments, converted_dtype, push_history,
                   reject_internal_step_arguments, reject_unknown_step_arguments)
from .dpmsolver_multistep import check_dpm_solver_config, prediction_part
from .euler_discrete import KARRAS_SCHEDULERS

logger = logging.getLogger(__name__)

ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver++")


def singlestep_orders(steps: int, solver_order: int, lower_order_final: bool, final_sigmas_type: str) -> List[int]:
    """The solver order of each step, as diffusers' ``get_order_list`` gives it."""
    if solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}")
    if lower_order_final:
        if solver_order == 3:
            if steps % 3 == 0:
                orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1]
            elif steps % 3 == 1:
                orders = [1, 2, 3] * (steps // 3) + [1]
            else:
                orders = [1, 2, 3] * (steps // 3) + [1, 2]
        elif solver_order == 2:
            orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
        else:
            orders = [1] * steps
    else:
        orders = {1: [1], 2: [1, 2], 3: [1, 2, 3]}[solver_order] * (steps // solver_order)
    if final_sigmas_type == "zero" and orders:
        orders[-1] = 1  # the step into sigma 0 has no finite higher-order update
    return orders


def group_update(algorithm: str, solver_type: str, a_t: float, s_t: float, a_s: float, s_s: float, lam_t: float,
                 nodes: Sequence[Tuple[float, Lin]], start: Lin) -> Lin:
    """diffusers' singlestep update from the group's first sample ``start`` (noise level
    ``a_s, s_s``) to ``a_t, s_t``: ``nodes`` are (lambda, converted model output) of the
    group's steps, first step first, 1 to 3 of them (the order).

    Raises ZeroDivisionError where diffusers divides by zero (repeated sigmas)."""
    order = len(nodes)
    h = lam_t - nodes[0][0]
    finite = math.isfinite(h)
    em1 = math.expm1(-h) if finite else -1.0  # exp(-h) - 1
    ep1 = math.expm1(h) if finite else math.inf  # exp(h) - 1
    e2 = -math.expm1(-2.0 * h) if finite else 1.0  # 1 - exp(-2h)
    if order == 1:
        D0 = nodes[0][1]
    elif order == 2:
        r0 = (nodes[1][0] - nodes[0][0]) / h
        D0, D1 = nodes[0][1], (1.0 / r0) * (nodes[1][1] - nodes[0][1])
    else:
        r0, r1 = (nodes[2][0] - nodes[0][0]) / h, (nodes[1][0] - nodes[0][0]) / h
        m0, m1, m2 = nodes[2][1], nodes[1][1], nodes[0][1]
        D0 = m2
        D1_1 = (1.0 / r0) * (m0 - m2)
        if solver_type == "heun":
            # (midpoint reads D1_1 only: where the middle node repeats the first, r1 = 0, diffusers'
            # unused D1_0, D1 and D2 are inf or NaN and its midpoint update is finite)
            D1_0 = (1.0 / r1) * (m1 - m2)
            D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
            D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
    if algorithm == "dpmsolver++":
        x = (s_t / s_s) * start - (a_t * em1) * D0
        if order == 2:
            x = x - 0.5 * (a_t * em1) * D1 if solver_type == "midpoint" else x + (a_t * (em1 / h + 1.0)) * D1
        elif order == 3:
            if solver_type == "midpoint":
                x = x + (a_t * (em1 / h + 1.0)) * D1_1
            else:
                x = x + (a_t * (em1 / h + 1.0)) * D1 - (a_t * ((em1 + h) / h**2 - 0.5)) * D2
        return x
    if algorithm == "dpmsolver":
        x = (a_t / a_s) * start - (s_t * ep1) * D0
        if order == 2:
            x = x - 0.5 * (s_t * ep1) * D1 if solver_type == "midpoint" else x - (s_t * (ep1 / h - 1.0)) * D1
        elif order == 3:
            if solver_type == "midpoint":
                x = x - (s_t * (ep1 / h - 1.0)) * D1_1
            else:
                x = x - (s_t * (ep1 / h - 1.0)) * D1 - (s_t * ((ep1 - h) / h**2 - 0.5)) * D2
        return x
    # sde-dpmsolver++
    decay = math.exp(-h) if finite else 0.0
    x = (s_t / s_s * decay) * start + (a_t * e2) * D0 + (s_t * math.sqrt(e2)) * NOISE
    if order == 2:
        x = x + 0.5 * (a_t * e2) * D1 if solver_type == "midpoint" else x + (a_t * (e2 / (-2.0 * h) + 1.0)) * D1
    elif order == 3:
        if solver_type == "midpoint":
            x = x + (a_t * (e2 / (-2.0 * h) + 1.0)) * D1_1
        else:
            x = x + (a_t * (e2 / (-2.0 * h) + 1.0)) * D1 + (a_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
    return x


class DPMSolverSinglestepScheduler(MultistepScheduler):
    """Drop-in for ``diffusers.DPMSolverSinglestepScheduler``: same arguments, config, schedule
    and ``order_list``.

    Each ``step`` is one fused kernel pass: model-output conversion (x0 for ``dpmsolver++`` and
    ``sde-dpmsolver++``, epsilon for ``dpmsolver``), guidance (:meth:`step_cfg`), the singlestep
    update of order 1-3 from the group's first sample ``self.sample``, and the SDE noise term,
    drawn as diffusers draws it. Dynamic thresholding adds one reduction pass before it (the
    per-sample quantile). ``model_outputs`` holds the converted outputs, oldest first, as in
    diffusers; ``self.sample`` is the caller's tensor itself, not a copy.

    Where diffusers divides by zero (repeated timesteps in a custom schedule) the step drops
    the repeated node and stays finite; ``algorithm_type="dpmsolver"`` with ``thresholding``
    (which fails in diffusers) thresholds x0 at the step's sigma, as DPMSolverMultistep does.
    """

    _diffusers_name = "DPMSolverSinglestepScheduler"
    _compatibles = KARRAS_SCHEDULERS

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Optional[str] = None,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        check_dpm_solver_config(self, ALGORITHMS)
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if self.config.algorithm_type == "dpmsolver" and final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type 'zero' is not supported for algorithm_type {algorithm_type}; "
                             "use 'sigma_min'")
        if prediction_type == "flow_prediction" and self.config.algorithm_type == "dpmsolver":
            # (diffusers accepts it here and raises at the first step)
            raise ValueError("prediction_type 'flow_prediction' needs algorithm_type dpmsolver++ or sde-dpmsolver++")
        if use_beta_sigmas and importlib.util.find_spec("scipy") is None:  # (diffusers fails here too)
            raise ImportError("use_beta_sigmas needs scipy: pip install scipy")

        self._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.order_list = self.get_order_list(num_train_timesteps)

    def _reset_history(self) -> None:
        super()._reset_history()
        self.sample: Optional[torch.Tensor] = None  # the first sample of the current singlestep group

    def get_order_list(self, num_inference_steps: int) -> List[int]:
        """The solver order of each of ``num_inference_steps`` steps (diffusers' rule: groups of
        1, 2, ... ``solver_order``, shorter ones at the end with ``lower_order_final``, and a
        first-order step into sigma 0)."""
        cfg = self.config
        return singlestep_orders(int(num_inference_steps), cfg.solver_order, cfg.lower_order_final, cfg.final_sigmas_type)

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu: Optional[float] = None,
                      timesteps: Optional[List[int]] = None) -> None:
        """Compute the timesteps, sigmas and ``order_list``, and every step's kernel coefficients.

        Like diffusers, this sets ``lower_order_final=True`` in the config when the step count is
        not a multiple of ``solver_order`` or the last sigma is zero."""
        cfg = self.config
        if mu is not None:
            if not (cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"):
                raise ValueError("mu needs use_dynamic_shifting=True and time_shift_type='exponential'")
            self.register_to_config(flow_shift=float(np.exp(mu)))
            cfg = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Must pass exactly one of num_inference_steps or timesteps.")
        if num_inference_steps is not None and int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if timesteps is not None:
            if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
                raise ValueError("Cannot pass timesteps together with karras/exponential/beta sigmas.")
            timesteps = custom_schedule("timesteps", timesteps, np.int64)
            n = len(timesteps)
        else:
            n = int(num_inference_steps)
            timesteps = spaced_timesteps("linspace", n, 0, cfg.num_train_timesteps,
                                         last_unclipped_timestep(self.lambda_t, cfg.lambda_min_clipped))

        sigmas, timesteps = self._spaced_sigmas(timesteps, n)
        if cfg.final_sigmas_type == "sigma_min":
            sigma_last = float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        else:
            sigma_last = 0.0

        # diffusers changes the config itself here (and keeps the change for later schedules).
        if not cfg.lower_order_final and n % cfg.solver_order != 0:
            logger.warning("%d steps are not a multiple of solver_order=%d: setting lower_order_final=True, as "
                           "diffusers does", n, cfg.solver_order)
            self.register_to_config(lower_order_final=True)
        if not self.config.lower_order_final and cfg.final_sigmas_type == "zero":
            logger.info("final_sigmas_type='zero' needs lower_order_final=True: setting it, as diffusers does")
            self.register_to_config(lower_order_final=True)

        self._install_schedule(np.concatenate([sigmas, [sigma_last]]), timesteps, device)
        self.order_list = self.get_order_list(n)

    def _plan(self, sigmas: List[float], i: int, order: int) -> Optional[StepPlan]:
        """Step ``i`` at ``order``: from the sample of step ``i - order + 1`` (X for order 1, else
        AUX) with the converted outputs of steps ``i - order + 1 .. i`` (H1, H0, then this step's)."""
        cfg = self.config
        flow = cfg.use_flow_sigmas
        a_s0, s_s0 = alpha_sigma(float(sigmas[i]), flow)
        if cfg.prediction_type == "flow_prediction":
            x0 = (1.0, -float(sigmas[i]))  # diffusers: x0 = x - sigma * v with the schedule's raw sigma
        else:
            x0 = x0_coefficients(cfg.prediction_type, a_s0, s_s0)
        # The quantity the solver integrates: x0 for ++ variants, epsilon otherwise.
        if cfg.algorithm_type != "dpmsolver":
            q = X0
        elif cfg.thresholding:
            q = (X - a_s0 * X0) / s_s0  # epsilon of the thresholded x0
        elif cfg.prediction_type == "epsilon":
            q = MODEL
        elif cfg.prediction_type == "sample":
            q = (X - a_s0 * MODEL) / s_s0
        else:
            q = a_s0 * MODEL + s_s0 * X
        # Every order at every index (history set from outside can ask for any); an early step
        # then reads sigmas[i - k] with wrap-around, as diffusers does.
        x_t = self._group_rule(sigmas, i, order, (H1, H0, q)[3 - order:], X if order == 1 else AUX)
        if x_t is None:
            return None  # e.g. order 2 into sigma 0, which the order list never selects
        return StepPlan(x0=x0, sample=x_t, history=q)

    def _group_rule(self, sigmas: List[float], i: int, order: int, outputs: Sequence[Lin], start: Lin
                    ) -> Optional[Lin]:
        """Step ``i`` at ``order`` as a combination of ``start``, the sample of the group's
        first step ``i - order + 1``, the converted ``outputs`` of steps ``i - order + 1 .. i``
        (oldest first) and NOISE; None where it is not finite."""
        cfg = self.config
        flow = cfg.use_flow_sigmas
        first = i - order + 1
        try:
            a_t, s_t = alpha_sigma(float(sigmas[i + 1]), flow)
            a_s, s_s = alpha_sigma(float(sigmas[first]), flow)
            lam_t = log_snr(a_t, s_t)
            nodes = [(log_snr(*alpha_sigma(float(sigmas[first + k]), flow)), outputs[k]) for k in range(order)]
            try:
                x_t = group_update(cfg.algorithm_type, cfg.solver_type, a_t, s_t, a_s, s_s, lam_t, nodes, start)
            except ZeroDivisionError:
                x_t = self._repeated_sigma_update(a_t, s_t, a_s, s_s, lam_t, nodes, start)
        except (ZeroDivisionError, OverflowError, ValueError):
            return None
        if x_t is None or not all(math.isfinite(v) for v in x_t.terms.values()):
            return None
        return x_t

    def _repeated_sigma_update(self, a_t, s_t, a_s, s_s, lam_t, nodes, start) -> Optional[Lin]:
        """The update where diffusers divides by zero: a group that ends where it starts (its
        exact solution is its first sample), or one whose steps repeat a sigma (a custom
        schedule with a repeated timestep), which diffusers turns into NaN. The repeated node
        carries no new information: drop it and take the update of the order that is left."""
        cfg = self.config
        if lam_t == nodes[0][0]:
            return start  # (no noise either: its variance 1 - exp(-2h) is 0)
        distinct: List[Tuple[float, Lin]] = []
        for lam, out in nodes:
            if all(lam != seen for seen, _ in distinct):
                distinct.append((lam, out))
        if len(distinct) == len(nodes):
            return None
        return group_update(cfg.algorithm_type, cfg.solver_type, a_t, s_t, a_s, s_s, lam_t, distinct, start)

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None, **kwargs):
        """diffusers' ``step`` (same positional order): one fused kernel pass, returns
        ``SchedulerOutput(prev_sample)``. ``variance_noise`` (kdfast only) replaces the draw
        of ``sde-dpmsolver++``'s noise from ``generator``."""
        reject_internal_step_arguments(kwargs)
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise, **kwargs)
        return out if return_dict else out.to_tuple()

    def _check_step_inputs(self, model_output: torch.Tensor, sample: torch.Tensor, name: str = "model_output") -> None:
        super()._check_step_inputs(prediction_part(self, model_output, sample), sample, name)

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        if self.num_inference_steps is None:
            self._require_timesteps()
        cfg = self._config
        model_output, cond = prediction_part(self, model_output, sample), prediction_part(self, cond, sample)
        self._check_step_inputs(model_output, sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        i, orders = self._step_index, self.order_list
        if i >= len(orders):
            raise IndexError(f"step {i} is past the end of the {len(orders)}-step schedule; call set_timesteps again")
        order = orders[i]
        outputs = self.model_outputs
        # diffusers lowers the order while the outputs it needs are missing (img2img starts
        # mid-group); before this step's rotation, model_outputs[-order] is outputs[-(order - 1)].
        while order > 1 and outputs[-(order - 1)] is None:
            order -= 1
        if order == 1:
            aux, history = None, ()
        else:
            aux, history = self.sample, outputs[:-order:-1]  # the group's earlier outputs, newest first
            if aux is None:
                raise ValueError(f"step {i} is of order {order} and needs the sample of its group's first step "
                                 "(self.sample), which is None; step from the group's first step")
            if aux.shape != sample.shape:
                raise ValueError(f"sample shape {tuple(sample.shape)} does not match the shape "
                                 f"{tuple(aux.shape)} of the group's first sample (self.sample)")
        if (i, order) not in self._table:
            raise ValueError(f"no finite singlestep DPM-Solver update of order {order} at step {i} "
                             f"(sigma {float(self.sigmas[i])} to {float(self.sigmas[i + 1])})")
        # diffusers keeps the converted output in the dtype its conversion gives: the model's
        # when it is the model output itself, else promoted with the sample's.
        plus = cfg.algorithm_type != "dpmsolver"
        model_only = (cfg.prediction_type == "sample") if plus else (cfg.prediction_type == "epsilon"
                                                                     and not cfg.thresholding)
        dtype = converted_dtype(sample, model_output, model_only)
        noise = None
        if cfg.algorithm_type == "sde-dpmsolver++":
            if variance_noise is not None and generator is not None:
                raise ValueError("pass generator or variance_noise, not both")
            noise = self._noise(variance_noise, generator, sample, dtype)
        result = self._fused((i, order), sample, model_output, cond=cond, guidance_scale=guidance_scale,
                             history=history, aux=aux, noise=noise, write_history=True,
                             dynamic=(cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None,
                             history_dtype=dtype)
        push_history(outputs, result.history, cfg.solver_order)
        if order == 1:
            self.sample = sample  # the group's first sample, by reference as diffusers keeps it
        self._step_index = i + 1
        return SchedulerOutput(result.sample)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: Optional[torch.Tensor] = None,
                             **kwargs) -> torch.Tensor:
        """The solver's quantity (x0 for ++ variants, else epsilon) at the current step, thresholded
        as the step thresholds it."""
        sample = convert_arguments(args, kwargs, sample)
        return self._converted_output(prediction_part(self, model_output, sample), sample, (self._step_index, 1),
                                      self.config.thresholding)

    # ---------------------------------------------------------------- diffusers' helpers

    def dpm_solver_first_order_update(self, model_output: torch.Tensor, *args, sample: Optional[torch.Tensor] = None,
                                      noise: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """diffusers' first-order update (DDIM) from ``model_output``, converted by
        :meth:`convert_model_output`, at the current step: unfused, for callers that use it
        (``step`` does not). ``noise`` is required by ``sde-dpmsolver++``."""
        (sample,) = legacy_arguments("dpm_solver_first_order_update", args, kwargs, ("timestep", "prev_timestep"),
                                     sample=sample)
        return self._helper_update("dpm_solver_first_order_update", 1, [model_output], sample, noise)

    def singlestep_dpm_solver_second_order_update(self, model_output_list: List[torch.Tensor], *args,
                                                  sample: Optional[torch.Tensor] = None,
                                                  noise: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """diffusers' second-order singlestep update from ``sample``, the group's first sample
        (at the previous step), with the last two converted outputs, unfused."""
        (sample,) = legacy_arguments("singlestep_dpm_solver_second_order_update", args, kwargs,
                                     ("timestep_list", "prev_timestep"), sample=sample)
        return self._helper_update("singlestep_dpm_solver_second_order_update", 2, model_output_list, sample, noise)

    def singlestep_dpm_solver_third_order_update(self, model_output_list: List[torch.Tensor], *args,
                                                 sample: Optional[torch.Tensor] = None,
                                                 noise: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """diffusers' third-order singlestep update from ``sample``, the group's first sample
        (two steps back), with the last three converted outputs, unfused."""
        (sample,) = legacy_arguments("singlestep_dpm_solver_third_order_update", args, kwargs,
                                     ("timestep_list", "prev_timestep"), sample=sample)
        return self._helper_update("singlestep_dpm_solver_third_order_update", 3, model_output_list, sample, noise)

    def singlestep_dpm_solver_update(self, model_output_list: List[torch.Tensor], *args,
                                     sample: Optional[torch.Tensor] = None, order: Optional[int] = None,
                                     noise: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """diffusers' singlestep update of ``order`` (1, 2 or 3), unfused."""
        sample, order = legacy_arguments("singlestep_dpm_solver_update", args, kwargs,
                                         ("timestep_list", "prev_timestep"), sample=sample, order=order)
        order = check_order("singlestep_dpm_solver_update", order, (1, 2, 3))
        return self._helper_update("singlestep_dpm_solver_update", order, model_output_list, sample, noise)

    def _helper_update(self, method: str, order: int, outputs, sample, noise) -> torch.Tensor:
        """The update rule the step's table is planned from, evaluated on the caller's tensors."""
        required(method, "sample", sample)
        i, sigmas = step_position(self, method, back=order - 1)
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        if sde and noise is None:
            raise ValueError(f"{method}: `noise` is required by algorithm_type='sde-dpmsolver++' (diffusers asserts "
                             "it)")
        rule = self._group_rule(sigmas, i, order, OUTPUTS[:order][::-1], X)
        return unfused(method, rule, order, i, {**output_list(method, outputs, order), "x": sample,
                                                  "noise": noise if sde else None})
