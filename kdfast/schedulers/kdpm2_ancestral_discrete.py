"""Ancestral DPM-Solver-2 (k-diffusion's ``sample_dpm_2_ancestral``), as a diffusers drop-in."""
from __future__ import annotations

import math
from typing import List, Optional, Union

import numpy as np
import torch

from ._config import register_to_config
from .base import SchedulerOutput, reject_unknown_step_arguments
from .kdpm2_discrete import _finite, _KDPM2Scheduler


class KDPM2AncestralDiscreteScheduler(_KDPM2Scheduler):
    """Drop-in for ``diffusers.KDPM2AncestralDiscreteScheduler``: same arguments and config.

    As in diffusers, each step of the schedule splits the next sigma into ``sigma_down`` and
    ``sigma_up``; the first stage is an Euler step to the midpoint between sigma and
    ``sigma_down``, the second the step from the first stage's sample to ``sigma_down`` with
    the midpoint's derivative plus ``sigma_up * noise``, the noise drawn as diffusers draws it
    (same generator calls, order, dtype and device). Each stage is one fused pass.
    ``prediction_type="sample"`` also works here (diffusers raises NotImplementedError).
    """

    _diffusers_name = "KDPM2AncestralDiscreteScheduler"
    _ancestral = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._setup(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
                    timestep_spacing)

    def _midpoints(self, sigmas):
        # diffusers' float32 ops, for its values bit for bit where they are numbers
        sigmas_next = sigmas.roll(-1)
        sigmas_next[-1] = 0.0
        up = (sigmas_next**2 * (sigmas**2 - sigmas_next**2) / sigmas**2) ** 0.5
        down = (sigmas_next**2 - up**2) ** 0.5
        down[-1] = 0.0
        interpol = sigmas.log().lerp(down.log(), 0.5).exp()
        interpol[-2:] = 0.0
        # Where they are NaN, the float64 values of the same formulas. sigma_down**2 = next**4 /
        # sigma**2 is the difference of two nearly equal float32 numbers: when the next sigma is
        # far below sigma (2 steps on a 0.0001-0.02 schedule, cosine schedules) it rounds to <= 0,
        # and diffusers' midpoint, timestep and every later step are NaN. The last sigma_up (0/0,
        # never used) and the values after a zero sigma get their limit, 0.
        up, down, interpol = _finite(up), _finite(down), _finite(interpol)
        for i in torch.nonzero(interpol[:-2] == 0).flatten().tolist():
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            if s > 0 and s_next > 0:
                r = min(1.0, s_next / s)  # (a step up in sigma: no ancestral split, sigma_up = 0)
                u, d = s_next * math.sqrt(1.0 - r * r), s_next * r
                up[i], down[i], interpol[i] = u, d, math.sqrt(s * d)
        return interpol, up, down

    def _first_sigmas(self, k):
        return self._host_sigmas[k], self._host_interpol[k]

    def _second_sigmas(self, k):
        return self._host_sigmas[k - 1], self._host_interpol[k - 1], self._host_down[k - 1], self._host_up[k - 1]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None, return_pred_original_sample: bool = False):
        """diffusers' ``step`` (same positional order); ``variance_noise`` replaces the second
        stage's draw. ``pred_original_sample`` is computed when first read, or written by the
        step with ``return_pred_original_sample=True``."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              return_pred_original_sample: bool = False, **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        return self._stage(model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
                           return_pred_original_sample)
