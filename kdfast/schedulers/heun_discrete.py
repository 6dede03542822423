"""Heun's second-order method (Karras et al. 2022, Algorithm 1), as a diffusers drop-in."""
from __future__ import annotations

import math
from typing import List, Optional, Union

import numpy as np
import torch

from ._config import register_to_config
from ._linear import AUX, H0, X, X0
from ._schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS, check_choice, custom_schedule, make_betas
from .base import CoefficientTable, SchedulerOutput, StepPlan, reject_unknown_step_arguments
from .euler_discrete import _SigmaScheduler, check_sigma_options, converted_sigmas, spaced_timesteps, train_sigmas


def _exp_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' ``beta_schedule="exp"``: alpha_bar(t) = exp(-12 t)."""
    betas = [min(1 - math.exp(-12.0 * (i + 1) / num_steps) / math.exp(-12.0 * i / num_steps), max_beta)
             for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


class HeunDiscreteScheduler(_SigmaScheduler):
    """Drop-in for ``diffusers.HeunDiscreteScheduler``: same arguments and config.

    As in diffusers, the schedule repeats every timestep after the first, and ``step``
    alternates between the Euler predictor and the trapezoidal corrector (``order = 2``). The
    predictor is one fused pass that also writes its derivative ``(x - x0) / sigma``; the
    corrector is one fused pass reading that derivative (history) and the predictor's input
    sample (aux), which is kept by reference, not copied.
    """

    _diffusers_name = "HeunDiscreteScheduler"
    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        check_sigma_options(self.config)
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES + ("exp",))
        if trained_betas is None and beta_schedule == "exp":
            self.betas = _exp_betas(num_train_timesteps)
        else:
            self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.use_karras_sigmas = use_karras_sigmas
        self.is_scale_input_called = False
        # diffusers sets a full-length schedule at construction; its coefficients are made on
        # the first step that needs them.
        self._set_schedule(num_train_timesteps, None, num_train_timesteps, None, build=False)

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      num_train_timesteps: Optional[int] = None, timesteps: Optional[List[int]] = None) -> None:
        """Compute the (doubled) timesteps and sigmas, and both stages' kernel coefficients."""
        self._set_schedule(num_inference_steps, device, num_train_timesteps, timesteps, build=True)

    def _set_schedule(self, num_inference_steps, device, num_train_timesteps, timesteps, build: bool) -> None:
        cfg = self.config
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas):
            raise ValueError("Cannot set `timesteps` with karras, exponential or beta sigmas.")
        n = num_inference_steps or len(timesteps)
        T = num_train_timesteps or cfg.num_train_timesteps
        if timesteps is not None:
            timesteps = custom_schedule("timesteps", timesteps, np.float32)
        else:
            timesteps = spaced_timesteps(cfg.timestep_spacing, T, n, cfg.steps_offset)
        train = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        converted = converted_sigmas(cfg, sigmas, log_sigmas, n)
        if converted is not None:
            sigmas, timesteps = converted
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self._set_sigmas(torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]))
        timesteps = torch.from_numpy(timesteps)
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(torch.float32)
        self._set_timesteps(timesteps.to(device=device), timesteps.tolist())
        self.num_inference_steps = n
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._step_index = None
        self._begin_index = None
        self._table = self._shared_table(self._build_table) if build else None

    def _build_table(self) -> CoefficientTable:
        plans = {}
        for k in range(len(self._host_sigmas) - 1):  # one per timestep, whatever timesteps were assigned since
            plans[(k, 1)] = self._plan_predictor(k)
            corrector = self._plan_corrector(k)
            if corrector is not None:
                plans[(k, 2)] = corrector
        return CoefficientTable(plans)

    def _x0(self, sigma: float):
        pt = self.config.prediction_type
        if pt == "epsilon":
            return 1.0, -sigma
        if pt == "v_prediction":
            return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
        return 0.0, 1.0

    def _plan_predictor(self, k: int) -> StepPlan:
        sigma, sigma_next = self._host_sigmas[k], self._host_sigmas[k + 1]
        d = (X - X0) / sigma
        # the derivative is kept for the corrector, except after the last step (sigma_next = 0)
        return StepPlan(x0=self._x0(sigma), sample=X + (sigma_next - sigma) * d,
                        history=d if sigma_next != 0 else None, aux=X0)  # aux output: pred_original_sample

    def _plan_corrector(self, k: int) -> Optional[StepPlan]:
        if k == 0 or self._host_sigmas[k] == 0:
            return None
        sigma, sigma_next = self._host_sigmas[k - 1], self._host_sigmas[k]
        d = (X - X0) / sigma_next
        # x_next = x_pred_input + dt * (d_pred + d) / 2, dt = sigma_next - sigma as the predictor set it
        return StepPlan(x0=self._x0(sigma_next), sample=AUX + (0.5 * (sigma_next - sigma)) * (H0 + d), aux=X0)

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next step is the first (Euler) half of a Heun step, as in diffusers."""
        return self.dt is None

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             generator: Optional[torch.Generator] = None, return_pred_original_sample: bool = False):
        """diffusers' ``step`` (same positional order); ``generator`` is accepted and unused.
        ``pred_original_sample`` is computed when first read, or written by the step with
        ``return_pred_original_sample=True``."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, None,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              return_pred_original_sample: bool = False, **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        if self._table is None:
            self._table = self._shared_table(self._build_table)
        k = self._index_for_step(timestep)
        clip = self.config.clip_sample_range if self.config.clip_sample else None
        if self.state_in_first_order:
            plan = self._table.plans[(k, 1)]
            fused = dict(cond=cond, guidance_scale=guidance_scale, clip_value=clip)
            result = self._fused((k, 1), sample, model_output, write_history=plan.history is not None,
                                 write_aux=self._x0_with_step(return_pred_original_sample, sample, model_output,
                                                              **fused), **fused)
            out = self._output(result, (k, 1), sample, model_output, **fused)
            self.prev_derivative = result.history
            self.dt = self._host_sigmas[k + 1] - self._host_sigmas[k]
            self.sample = sample
        else:
            if (k, 2) not in self._table:
                raise IndexError(f"no second Heun stage at step index {k}")
            if self.prev_derivative is None or self.sample is None or self.sample.shape != sample.shape:
                raise ValueError("the second Heun stage needs the first stage's state; call step in order")
            out = self._fused_output((k, 2), sample, model_output, want_x0=return_pred_original_sample, cond=cond,
                                     guidance_scale=guidance_scale, clip_value=clip,
                                     history=[self.prev_derivative], aux=self.sample)
            self.prev_derivative = None
            self.dt = None
            self.sample = None
        self._step_index += 1
        return out

