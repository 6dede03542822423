"""DEIS (log-rho multistep exponential integrator, orders 1-3), as a diffusers drop-in."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from ._config import register_to_config
from ._helpers import OUTPUTS, legacy_arguments, output_list, required, step_position, unfused
from ._linear import H0, H1, X, X0, Lin
from ._schedule import (BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, alpha_sigma, check_choice,
                        check_flow_sigma_spacing, spaced_timesteps, x0_coefficients)
from .base import (MultistepScheduler, SchedulerOutput, StepPlan, convert_arguments, converted_dtype, push_history,
                   reject_internal_step_arguments, reject_unknown_step_arguments)


def _lagrange1(t: float, b: float, c: float) -> float:
    """Antiderivative in rho of the order-2 Lagrange basis polynomial in log(rho) that is 1 at b, 0 at c."""
    lt, lb, lc = math.log(t), math.log(b), math.log(c)
    return t * (lt - lc - 1.0) / (lb - lc)


def _lagrange2(t: float, b: float, c: float, d: float) -> float:
    """Antiderivative in rho of the order-3 Lagrange basis polynomial in log(rho): 1 at b, 0 at c and d."""
    lt, lb, lc, ld = math.log(t), math.log(b), math.log(c), math.log(d)
    return t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0) / ((lb - lc) * (lb - ld))


class DEISMultistepScheduler(MultistepScheduler):
    """Drop-in for ``diffusers.DEISMultistepScheduler``: same arguments and config.

    Each ``step`` is one fused kernel pass: model-output conversion (to x0, clipping, back to
    epsilon as diffusers does), the multistep log-rho update, and the history entry. Dynamic
    thresholding adds one reduction pass before it (the per-sample quantile).
    """

    _diffusers_name = "DEISMultistepScheduler"
    _compatibles = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
                    "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                    "DPMSolverSDEScheduler", "EDMEulerScheduler")

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
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        if sum([use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas]) > 1:
            raise ValueError("Only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used.")
        if algorithm_type in ("dpmsolver", "dpmsolver++"):  # other solvers' names, mapped as diffusers does
            self.register_to_config(algorithm_type="deis")
        else:
            check_choice("algorithm_type", algorithm_type, ("deis",))
        if solver_type in ("midpoint", "heun", "bh1", "bh2"):
            self.register_to_config(solver_type="logrho")
        else:
            check_choice("solver_type", solver_type, ("logrho",))
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        check_flow_sigma_spacing(self.config, ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}")

        self._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu: Optional[float] = None) -> None:
        """Compute the timesteps and sigmas, and every step's kernel coefficients."""
        cfg = self.config
        if mu is not None:
            if not (cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"):
                raise ValueError("mu needs use_dynamic_shifting=True and time_shift_type='exponential'")
            # diffusers overwrites its config's flow_shift with e^mu here; so does kdfast.
            self.register_to_config(flow_shift=float(np.exp(mu)))
            cfg = self.config
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = int(num_inference_steps)
        N = cfg.num_train_timesteps
        timesteps = spaced_timesteps(cfg.timestep_spacing, n, cfg.steps_offset, N)

        sig, timesteps = self._spaced_sigmas(timesteps, n)
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas or cfg.use_flow_sigmas:
            sig = np.concatenate([sig, sig[-1:]])  # diffusers' DEIS repeats the last sigma there
        else:
            sig = np.concatenate([sig, [float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)]])
        self._install_schedule(sig, timesteps, device)

    # ---------------------------------------------------------------- coefficients

    def _plan(self, sigmas: List[float], i: int, order: int) -> Optional[StepPlan]:
        cfg = self.config
        flow = cfg.use_flow_sigmas
        try:
            a_0, s_0 = alpha_sigma(sigmas[i], flow)
            if cfg.prediction_type == "flow_prediction":
                x0 = (1.0, -sigmas[i])  # diffusers: x0 = x - sigma * v with the schedule's raw sigma
            else:
                x0 = x0_coefficients(cfg.prediction_type, a_0, s_0)
            # DEIS keeps epsilon, recomputed from the (thresholded) x0 like diffusers, which for
            # flow_prediction divides by the raw schedule sigma (equal to s_0 with flow sigmas).
            eps = (X - a_0 * X0) / (sigmas[i] if cfg.prediction_type == "flow_prediction" else s_0)
        except (ZeroDivisionError, OverflowError, ValueError):
            return None  # a combination the step logic never selects
        x_t = self._update_rule(sigmas, i, order, eps, (H0, H1))
        if x_t is None:
            return None
        return StepPlan(x0=x0, sample=x_t, history=eps)

    def _update_rule(self, sigmas: List[float], i: int, order: int, eps: Lin, history: Sequence[Lin]) -> Optional[Lin]:
        """The DEIS update of step ``i`` at ``order`` from ``eps``, the epsilon at ``sigmas[i]``,
        and ``history``, the older ones (newest first), as a combination of them and X; None
        where it is not finite."""
        flow = self.config.use_flow_sigmas
        try:
            a_t, s_t = alpha_sigma(sigmas[i + 1], flow)
            a_0, s_0 = alpha_sigma(sigmas[i], flow)
            if order == 1:  # = DDIM
                h = (math.log(a_t) - math.log(s_t)) - (math.log(a_0) - math.log(s_0))
                x_t = (a_t / a_0) * X - (s_t * math.expm1(h)) * eps
            else:
                rho = [s / a for a, s in (alpha_sigma(sigmas[i + 1 - k], flow) for k in range(order + 1))]
                r_t, r0, r1 = rho[0], rho[1], rho[2]
                if order == 2:
                    c0 = _lagrange1(r_t, r0, r1) - _lagrange1(r0, r0, r1)
                    c1 = _lagrange1(r_t, r1, r0) - _lagrange1(r0, r1, r0)
                    x_t = (a_t / a_0) * X + (a_t * c0) * eps + (a_t * c1) * history[0]
                else:
                    r2 = rho[3]
                    c0 = _lagrange2(r_t, r0, r1, r2) - _lagrange2(r0, r0, r1, r2)
                    c1 = _lagrange2(r_t, r1, r2, r0) - _lagrange2(r0, r1, r2, r0)
                    c2 = _lagrange2(r_t, r2, r0, r1) - _lagrange2(r0, r2, r0, r1)
                    x_t = (a_t / a_0) * X + (a_t * c0) * eps + (a_t * c1) * history[0] + (a_t * c2) * history[1]
        except (ZeroDivisionError, OverflowError, ValueError):
            return None  # a combination the step logic never selects
        if not all(math.isfinite(v) for v in x_t.terms.values()):
            return None
        return x_t

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             generator: Optional[torch.Generator] = None, **kwargs):
        """diffusers' ``step`` (same positional order): one fused kernel pass. ``generator`` is
        accepted and unused (DEIS is deterministic)."""
        reject_internal_step_arguments(kwargs)
        out = self._step(model_output, timestep, sample, None, 1.0, generator, None, **kwargs)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        if self.num_inference_steps is None:
            self._require_timesteps()
        cfg = self._config
        self._check_step_inputs(model_output, sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        i, n = self._step_index, len(self._host_timesteps)
        if i >= n:
            raise IndexError(f"step {i} is past the end of the {n}-step schedule; call set_timesteps again")
        lower_order_final = i == n - 1 and cfg.lower_order_final and n < 15
        lower_order_second = i == n - 2 and cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            order = 1
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            order = 2
        else:
            order = 3
        if (i, order) not in self._table:
            raise ValueError(f"no finite DEIS update of order {order} at step {i} (repeated sigmas?)")
        history = self.model_outputs[:-order:-1]  # the newest order - 1 entries, newest first
        if len(history) < order - 1:
            raise ValueError("model_outputs is missing entries this step needs")
        result = self._fused((i, order), sample, model_output, cond=cond, guidance_scale=guidance_scale,
                             history=history, write_history=True,
                             dynamic=(cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None,
                             # (DEIS converts every prediction to epsilon from x0: the promoted dtype)
                             history_dtype=converted_dtype(sample, model_output, False))
        push_history(self.model_outputs, result.history, cfg.solver_order)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index = i + 1
        return SchedulerOutput(result.sample)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: Optional[torch.Tensor] = None,
                             **kwargs) -> torch.Tensor:
        """Epsilon recomputed from the (thresholded) data prediction at the current step."""
        sample = convert_arguments(args, kwargs, sample)
        return self._converted_output(model_output, sample, (self._step_index, 1), self.config.thresholding)

    # ---------------------------------------------------------------- diffusers' helpers

    def deis_first_order_update(self, model_output: torch.Tensor, *args, sample: Optional[torch.Tensor] = None,
                                **kwargs) -> torch.Tensor:
        """diffusers' first-order update (DDIM) from ``model_output``, the epsilon of
        :meth:`convert_model_output`, at the current step: unfused, for callers that use it
        (``step`` does not)."""
        (sample,) = legacy_arguments("deis_first_order_update", args, kwargs, ("timestep", "prev_timestep"),
                                     sample=sample)
        return self._helper_update("deis_first_order_update", 1, [model_output], sample)

    def multistep_deis_second_order_update(self, model_output_list: List[torch.Tensor], *args,
                                           sample: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """diffusers' second-order update from the last two converted outputs, unfused."""
        (sample,) = legacy_arguments("multistep_deis_second_order_update", args, kwargs,
                                     ("timestep_list", "prev_timestep"), sample=sample)
        return self._helper_update("multistep_deis_second_order_update", 2, model_output_list, sample)

    def multistep_deis_third_order_update(self, model_output_list: List[torch.Tensor], *args,
                                          sample: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """diffusers' third-order update from the last three converted outputs, unfused."""
        (sample,) = legacy_arguments("multistep_deis_third_order_update", args, kwargs,
                                     ("timestep_list", "prev_timestep"), sample=sample)
        return self._helper_update("multistep_deis_third_order_update", 3, model_output_list, sample)

    def _helper_update(self, method: str, order: int, outputs, sample) -> torch.Tensor:
        """The update rule the step's table is planned from, evaluated on the caller's tensors."""
        required(method, "sample", sample)
        i, sigmas = step_position(self, method, back=order - 1)
        rule = self._update_rule(sigmas, i, order, OUTPUTS[0], OUTPUTS[1:])
        return unfused(method, rule, order, i, {**output_list(method, outputs, order), "x": sample})
