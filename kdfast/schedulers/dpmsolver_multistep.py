"""DPM-Solver / DPM-Solver++ (1, 2M, 3M) and SDE-DPM-Solver++, as a diffusers drop-in."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from ._linear import H0, H1, MODEL, X, X0, NOISE, Lin
from ._schedule import (BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, alpha_sigma, check_choice,
                        check_flow_sigma_spacing, custom_schedule, last_unclipped_timestep, log_snr, spaced_timesteps,
                        x0_coefficients)
from ._config import register_to_config
from ._helpers import OUTPUTS, LuLambdas, legacy_arguments, output_list, required, step_position, unfused
from .base import (MultistepScheduler, SchedulerOutput, StepPlan, convert_arguments, converted_dtype, push_history,
                   reject_unknown_step_arguments)
from .euler_discrete import KARRAS_SCHEDULERS

ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
SIGMA_SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# Log-SNR steps shorter than this are zero-length steps whose sigmas differ only by float32
# rounding (a few ulps of sigma: ~1e-7 in lambda); real schedules step by 1e-3 or more.
_ROUNDING_STEP = 1e-6


def prediction_part(scheduler, output, sample):
    """The prediction in a model output: diffusers' ``model_output[:, :3]`` for the learned
    variance types, where the output is wider than the sample (the variance is not used).
    diffusers takes 3 channels whatever the latents': with latents of other than 3 channels
    that is named here (the 3 channels were compared with the sample's shape, an error about a
    shape never passed)."""
    if (scheduler.config.get("variance_type") in ("learned", "learned_range") and isinstance(output, torch.Tensor)
            and isinstance(sample, torch.Tensor) and min(output.dim(), sample.dim()) > 1
            and output.shape[1] > sample.shape[1]):
        if sample.shape[1] != 3:
            raise ValueError(f"model_output {tuple(output.shape)}: with variance_type="
                             f"{scheduler.config.variance_type!r} an output wider than the sample "
                             f"{tuple(sample.shape)} is read as diffusers reads it, its channels [:3]: 3-channel "
                             "latents only; for others pass the mean alone")
        return output[:, :3]
    return output


def check_dpm_solver_config(scheduler, algorithms=ALGORITHMS, flow_exclusive=SIGMA_SPACINGS) -> None:
    """The settings DPM-Solver's multistep, singlestep and inverse schedulers share, checked as
    their constructors check them, with diffusers' aliases mapped (algorithm ``deis`` to
    ``dpmsolver++``; solver ``logrho``, ``bh1``, ``bh2`` to ``midpoint``). ``flow_exclusive``:
    the sigma spacings flow sigmas cannot be combined with."""
    cfg = scheduler.config
    if sum([cfg.use_beta_sigmas, cfg.use_exponential_sigmas, cfg.use_karras_sigmas]) > 1:
        raise ValueError("Only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used.")
    if cfg.algorithm_type == "deis":
        scheduler.register_to_config(algorithm_type="dpmsolver++")
    else:
        check_choice("algorithm_type", cfg.algorithm_type, algorithms)
    if cfg.solver_type in ("logrho", "bh1", "bh2"):
        scheduler.register_to_config(solver_type="midpoint")
    else:
        check_choice("solver_type", cfg.solver_type, ("midpoint", "heun"))
    check_choice("prediction_type", cfg.prediction_type, PREDICTION_TYPES)
    if "timestep_spacing" in cfg:
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
    check_flow_sigma_spacing(scheduler.config, flow_exclusive)
    if cfg.trained_betas is None:
        check_choice("beta_schedule", cfg.beta_schedule, BETA_SCHEDULES)
    if cfg.solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {cfg.solver_order}")


class DPMSolverMultistepScheduler(LuLambdas, MultistepScheduler):
    """Drop-in for ``diffusers.DPMSolverMultistepScheduler``: same arguments and config.

    Each ``step`` is one fused kernel pass: model-output conversion, clipping, the multistep
    update and (for SDE variants) the noise term. Dynamic thresholding adds one reduction pass
    before it (the per-sample quantile).
    """

    _diffusers_name = "DPMSolverMultistepScheduler"
    _compatibles = KARRAS_SCHEDULERS
    # The algorithm types whose third-order step diffusers' class lacks (it fails there, where
    # this ran second order): refused at that step; shorter schedules that never reach it run.
    _no_third_order = ("sde-dpmsolver",)

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
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Optional[str] = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        check_dpm_solver_config(self, flow_exclusive=SIGMA_SPACINGS + ("use_lu_lambdas",))
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if self.config.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type 'zero' is not supported for algorithm_type {algorithm_type}; "
                             "use 'sigma_min'")
        if prediction_type == "flow_prediction" and self.config.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            raise ValueError("prediction_type 'flow_prediction' needs algorithm_type dpmsolver++ or sde-dpmsolver++")

        self._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                  rescale_betas_zero_snr)

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu: Optional[float] = None,
                      timesteps: Optional[List[int]] = None) -> None:
        """Compute the timesteps and sigmas, and every step's kernel coefficients."""
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
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_lu_lambdas or cfg.use_exponential_sigmas
                                      or cfg.use_beta_sigmas):
            raise ValueError("Cannot pass timesteps together with karras/lu/exponential/beta sigmas.")

        if timesteps is not None:
            timesteps = custom_schedule("timesteps", timesteps, np.int64)
        else:
            timesteps = spaced_timesteps(cfg.timestep_spacing, num_inference_steps, cfg.steps_offset,
                                         cfg.num_train_timesteps,
                                         last_unclipped_timestep(self.lambda_t, cfg.lambda_min_clipped))

        sigmas, timesteps = self._spaced_sigmas(timesteps, num_inference_steps,
                                                round_karras=cfg.beta_schedule != "squaredcos_cap_v2",
                                                lu=cfg.use_lu_lambdas)
        if cfg.final_sigmas_type == "sigma_min":
            sigma_last = float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        else:
            sigma_last = 0.0
        self._install_schedule(np.concatenate([sigmas, [sigma_last]]), timesteps, device)

    def _plan(self, sigmas: List[float], i: int, order: int) -> Optional[StepPlan]:
        cfg = self.config
        a_s0, s_s0 = self._alpha_sigma(float(sigmas[i]))
        x0 = self._x0_conversion(float(sigmas[i]), a_s0, s_s0)
        plus = cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
        # The quantity a multistep solver keeps: x0 for ++ variants, epsilon otherwise.
        if plus:
            q = X0
        elif cfg.thresholding:
            q = (X - a_s0 * X0) / s_s0
        elif cfg.prediction_type == "epsilon":
            q = MODEL
        elif cfg.prediction_type == "sample":
            q = (X - a_s0 * MODEL) / s_s0
        else:
            q = a_s0 * MODEL + s_s0 * X
        x_t = self._update_rule(sigmas, i, order, q, (H0, H1))
        if x_t is None:
            return None  # a combination the step logic never selects (e.g. order 2 into sigma 0)
        return StepPlan(x0=x0, sample=x_t, history=q)

    def _update_rule(self, sigmas: List[float], i: int, order: int, q: Lin, history: Sequence[Lin]) -> Optional[Lin]:
        """The multistep update of step ``i`` at ``order`` from ``q``, the solver's quantity
        (x0 or epsilon) at ``sigmas[i]``, and ``history``, the older ones (newest first), as
        a combination of them, X and NOISE; None where it is not finite."""
        cfg = self.config
        a_s0, s_s0 = self._alpha_sigma(float(sigmas[i]))
        try:
            a_t, s_t = self._alpha_sigma(float(sigmas[i + 1]))
            lam = [log_snr(*self._alpha_sigma(float(sigmas[i + 1 - k]))) for k in range(order + 1)]
            h = lam[0] - lam[1]
            if abs(h) < _ROUNDING_STEP:
                # A step of length zero (karras, exponential, beta or lu sigmas ending at
                # sigma_min, which final_sigmas_type="sigma_min" appends again) leaves x as it
                # is at every order: the higher-order terms vanish with h (diffusers divides
                # 0 by 0 there, and its heun solver type returns NaN). The appended sigma_min
                # can differ from the last sigma by float32 rounding, in either direction: a
                # step "back" by that much would make the SDE variants' noise variance negative.
                h, order = 0.0, 1
            if order == 1:
                D = [q]
            elif order == 2:
                r0 = (lam[1] - lam[2]) / h
                D = [q, (1.0 / r0) * (q - history[0])]
            else:
                r0, r1 = (lam[1] - lam[2]) / h, (lam[2] - lam[3]) / h
                d10, d11 = (1.0 / r0) * (q - history[0]), (1.0 / r1) * (history[0] - history[1])
                D = [q, d10 + (r0 / (r0 + r1)) * (d10 - d11), (1.0 / (r0 + r1)) * (d10 - d11)]
            x_t = self._update(cfg.algorithm_type, cfg.solver_type, order, a_t, s_t, a_s0, s_s0, h, D)
        except (ZeroDivisionError, OverflowError, ValueError):
            return None
        if not all(math.isfinite(v) for v in x_t.terms.values()):
            return None
        return x_t

    def _alpha_sigma(self, sigma: float):
        """(alpha_t, sigma_t) of the schedule's noise level ``sigma`` (VP, or flow matching)."""
        return alpha_sigma(sigma, self.config.use_flow_sigmas)

    def _x0_conversion(self, sigma: float, alpha_t: float, sigma_t: float):
        """(c_x, c_m) with x0 = c_x * x + c_m * model_output at noise level ``sigma``."""
        if self.config.prediction_type == "flow_prediction":
            return 1.0, -sigma  # diffusers: x0 = x - sigma * v with the schedule's raw sigma
        return x0_coefficients(self.config.prediction_type, alpha_t, sigma_t)

    @staticmethod
    def _update(algorithm: str, solver_type: str, order: int, a_t, s_t, a_s0, s_s0, h, D) -> Lin:
        em1 = math.expm1(-h) if math.isfinite(h) else -1.0  # exp(-h) - 1
        ep1 = math.expm1(h) if math.isfinite(h) else math.inf  # exp(h) - 1
        if algorithm == "dpmsolver++":
            x = (s_t / s_s0) * X - (a_t * em1) * D[0]
            if order == 2:
                if solver_type == "midpoint":
                    x = x - 0.5 * (a_t * em1) * D[1]
                else:
                    x = x + (a_t * (em1 / h + 1.0)) * D[1]
            elif order == 3:
                x = x + (a_t * (em1 / h + 1.0)) * D[1] - (a_t * ((em1 + h) / h**2 - 0.5)) * D[2]
            return x
        if algorithm == "dpmsolver":
            x = (a_t / a_s0) * X - (s_t * ep1) * D[0]
            if order == 2:
                if solver_type == "midpoint":
                    x = x - 0.5 * (s_t * ep1) * D[1]
                else:
                    x = x - (s_t * (ep1 / h - 1.0)) * D[1]
            elif order == 3:
                x = x - (s_t * (ep1 / h - 1.0)) * D[1] - (s_t * ((ep1 - h) / h**2 - 0.5)) * D[2]
            return x
        if algorithm == "sde-dpmsolver++":
            e2 = -math.expm1(-2.0 * h) if math.isfinite(h) else 1.0  # 1 - exp(-2h)
            decay = math.exp(-h) if math.isfinite(h) else 0.0
            x = (s_t / s_s0 * decay) * X + (a_t * e2) * D[0] + s_t * math.sqrt(e2) * NOISE
            if order == 2:
                if solver_type == "midpoint":
                    x = x + 0.5 * (a_t * e2) * D[1]
                else:
                    x = x + (a_t * (e2 / (-2.0 * h) + 1.0)) * D[1]
            elif order == 3:
                x = x + (a_t * (e2 / (-2.0 * h) + 1.0)) * D[1] + (a_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D[2]
            return x
        # sde-dpmsolver
        x = (a_t / a_s0) * X - 2.0 * (s_t * ep1) * D[0] + s_t * math.sqrt(math.expm1(2 * h)) * NOISE
        if order == 2:
            if solver_type == "midpoint":
                x = x - (s_t * ep1) * D[1]
            else:
                x = x - 2.0 * (s_t * (ep1 / h - 1.0)) * D[1]
        elif order == 3:
            raise ValueError("third order is not defined for sde-dpmsolver")
        return x

    # ---------------------------------------------------------------- step

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
        i, n = self._step_index, len(self._host_timesteps)
        if i >= n:
            raise IndexError(f"step {i} is past the end of the {n}-step schedule; call set_timesteps again")
        order = self._step_order(i, n)
        while order > 1 and (i, order) not in self._table:
            # The step after a zero-length one (a sigma repeated: 1000 linspace steps) has no
            # difference quotient at this order: diffusers divides by zero (NaN from there on);
            # the highest order defined here is taken instead.
            order -= 1
        if (i, order) not in self._table:
            raise ValueError(f"no finite DPM-Solver update of order {order} at step {i} "
                             f"(sigma {float(self.sigmas[i])} to {float(self.sigmas[i + 1])})")
        history = self.model_outputs[:-order:-1]  # the newest order - 1 entries, newest first
        if len(history) < order - 1:
            raise ValueError("model_outputs is missing entries this step needs")
        # diffusers keeps the converted output in its conversion's dtype and casts the step's
        # result to it (EDM's preconditioned output always mixes in the sample; its result is
        # the arithmetic's)
        plus = cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
        model_only = not self._edm and ((cfg.prediction_type == "sample") if plus else
                                        (cfg.prediction_type == "epsilon" and not cfg.thresholding))
        dtype = converted_dtype(sample, model_output, model_only)
        noise = None
        if cfg.algorithm_type.startswith("sde"):
            noise = self._noise(variance_noise, generator, model_output,
                                dtype if self._noise_in_converted_dtype else torch.float32)
        result = self._fused((i, order), sample, model_output, cond=cond, guidance_scale=guidance_scale,
                             history=history, noise=noise, write_history=True,
                             dynamic=(cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None,
                             history_dtype=dtype)
        push_history(self.model_outputs, result.history, cfg.solver_order)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index = i + 1
        prev = result.sample
        return SchedulerOutput(prev if self._edm or prev.dtype is dtype else prev.to(dtype))

    # diffusers draws the SDE noise in float32; its inverse and EDM schedulers in the converted
    # model output's dtype (the sample's promoted with the model output's, unless the conversion
    # returns the model output as it is)
    _noise_in_converted_dtype = False
    _edm = False  # EDM's preconditioned outputs (EDMDPMSolverMultistepScheduler)

    def _step_order(self, i: int, n: int) -> int:
        """diffusers' order for step ``i`` of ``n``: the solver order once the history allows it,
        lowered at the end of short schedules (``lower_order_final``), by ``euler_at_final`` and
        before a zero final sigma."""
        cfg = self._config
        lower_order_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                            or cfg.get("final_sigmas_type") == "zero")
        lower_order_second = i == n - 2 and cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            return 1
        if cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            return 2
        if cfg.algorithm_type in self._no_third_order:
            raise ValueError(f"solver_order=3 with algorithm_type={cfg.algorithm_type!r}: diffusers' "
                             f"{self._diffusers_name} has no third-order step for it (it fails there, at step {i}); "
                             "use solver_order=2 (with lower_order_final, schedules of at most 4 steps never "
                             "reach third order)")
        return 3

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
        (``step`` does not). ``noise`` is required by the SDE variants."""
        (sample,) = legacy_arguments("dpm_solver_first_order_update", args, kwargs, ("timestep", "prev_timestep"),
                                     sample=sample)
        return self._helper_update("dpm_solver_first_order_update", 1, [model_output], sample, noise)

    def multistep_dpm_solver_second_order_update(self, model_output_list: List[torch.Tensor], *args,
                                                 sample: Optional[torch.Tensor] = None,
                                                 noise: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """diffusers' second-order multistep update from the last two converted outputs
        (``model_output_list[-1]`` the current one) at the current step, unfused."""
        (sample,) = legacy_arguments("multistep_dpm_solver_second_order_update", args, kwargs,
                                     ("timestep_list", "prev_timestep"), sample=sample)
        return self._helper_update("multistep_dpm_solver_second_order_update", 2, model_output_list, sample, noise)

    def multistep_dpm_solver_third_order_update(self, model_output_list: List[torch.Tensor], *args,
                                                sample: Optional[torch.Tensor] = None,
                                                noise: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """diffusers' third-order multistep update from the last three converted outputs at the
        current step, unfused."""
        (sample,) = legacy_arguments("multistep_dpm_solver_third_order_update", args, kwargs,
                                     ("timestep_list", "prev_timestep"), sample=sample)
        return self._helper_update("multistep_dpm_solver_third_order_update", 3, model_output_list, sample, noise)

    def _helper_update(self, method: str, order: int, outputs, sample, noise) -> torch.Tensor:
        """The update rule the step's table is planned from, evaluated on the caller's tensors.
        Where diffusers divides by zero (a zero-length step) it is the step's finite update."""
        required(method, "sample", sample)
        i, sigmas = step_position(self, method, back=order - 1)
        algorithm = self.config.algorithm_type
        sde = algorithm.startswith("sde")
        if sde and noise is None:
            if order == 3 and self._edm:
                raise ValueError(f"{method}: EDM's third-order update is dpmsolver++'s only (diffusers' takes no "
                                 f"noise), not {algorithm!r}'s")
            raise ValueError(f"{method}: `noise` is required by algorithm_type={algorithm!r} (diffusers asserts it)")
        rule = self._update_rule(sigmas, i, order, OUTPUTS[0], OUTPUTS[1:])
        return unfused(method, rule, order, i, {**output_list(method, outputs, order), "x": sample,
                                                  "noise": noise if sde else None})
