"""Ancestral Euler sampling (k-diffusion's ``sample_euler_ancestral``), as a diffusers drop-in."""
from __future__ import annotations

import math
from typing import List, Optional, Union

import numpy as np
import torch

from ._config import register_to_config
from ._linear import NOISE, X, X0
from ._schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS, check_choice, noise_schedule
from .base import CoefficientTable, SchedulerOutput, StepPlan, reject_unknown_step_arguments
from .euler_discrete import _reject_integer_timestep, _SigmaScheduler, spaced_timesteps, train_sigmas


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """Drop-in for ``diffusers.EulerAncestralDiscreteScheduler``: same arguments and config.

    Each ``step`` is one fused kernel pass: x0 conversion, the Euler step down to
    ``sigma_down`` and the ancestral noise ``sigma_up * noise``, drawn as diffusers draws it.
    ``prediction_type="sample"`` also works here (diffusers raises NotImplementedError).
    """

    _diffusers_name = "EulerAncestralDiscreteScheduler"
    _x0_from_float32_sample = True
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr,
            floor_terminal=True)
        sigmas = train_sigmas(self.alphas_cumprod)
        self._set_sigmas(torch.from_numpy(np.concatenate([sigmas[::-1], [0.0]]).astype(np.float32)))
        self._set_timesteps(torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                         dtype=float)[::-1].copy()))
        self.num_inference_steps = None
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None
        self._table = None

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Compute the timesteps and sigmas, and every step's kernel coefficients."""
        cfg = self.config
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = int(num_inference_steps)
        timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        train = train_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        self._set_sigmas(torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)))
        self._set_timesteps(torch.from_numpy(timesteps).to(device=device), timesteps.tolist())
        self.num_inference_steps = n
        self._step_index = None
        self._begin_index = None
        self._table = self._shared_table(self._build_table)

    def _build_table(self) -> CoefficientTable:
        return CoefficientTable({i: self._plan(i) for i in range(len(self._host_timesteps))})

    def _plan(self, i: int) -> StepPlan:
        sigma, sigma_to = self._host_sigmas[i], self._host_sigmas[i + 1]
        # A step to a larger sigma (zero-SNR schedules floor the first sigma at 4096, below the
        # next one) has no ancestral split: diffusers' square roots give NaN there, kdfast a
        # plain Euler step to sigma_to (sigma_up = 0).
        sigma_up = math.sqrt(max(0.0, sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2))
        sigma_down = math.sqrt(max(0.0, sigma_to**2 - sigma_up**2))
        pt = self.config.prediction_type
        if pt == "epsilon":
            x0 = (1.0, -sigma)
        elif pt == "v_prediction":
            x0 = (1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0))
        else:
            x0 = (0.0, 1.0)
        # d = (x - x0) / sigma;  x_next = x + d * (sigma_down - sigma) + sigma_up * noise
        # (aux output: pred_original_sample, written only when asked for)
        r = sigma_down / sigma
        return StepPlan(x0=x0, sample=r * X + (1.0 - r) * X0 + sigma_up * NOISE, aux=X0)

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None, return_pred_original_sample: bool = False):
        """diffusers' ``step`` (same positional order); ``variance_noise`` replaces the draw.
        ``pred_original_sample`` is computed when first read, or written by the step with
        ``return_pred_original_sample=True``."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              return_pred_original_sample: bool = False, **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        _reject_integer_timestep(timestep, type(self).__name__)
        self._require_table()
        self._check_step_inputs(model_output, sample)
        i = self._index_for_step(timestep)
        # drawn every step, the last one (sigma_up = 0) included, like diffusers: same generator state
        noise = self._noise(variance_noise, generator, model_output, model_output.dtype)
        if not self._table.plans[i].uses("noise"):
            noise = None
        out = self._fused_output(i, sample, model_output, want_x0=return_pred_original_sample,
                                 prev_dtype=model_output.dtype, cond=cond, guidance_scale=guidance_scale, noise=noise)
        self._step_index += 1
        return out
