"""Latent Consistency Model multistep sampling (Luo et al. 2023), as a diffusers drop-in."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from .._checks import check_float
from ._config import register_to_config
from ._helpers import Thresholding
from ._linear import NOISE, X, X0
from ._schedule import (BETA_SCHEDULES, TIMESTEP_SPACINGS, check_choice, custom_schedule, epsilon_x0_coefficients,
                        host_array, noise_schedule, x0_error)
from .base import CheckedPlan, FusedScheduler, OutputFields, StepPlan, reject_unknown_step_arguments
from .ddim import timestep_value
from .base import GrowingTable

logger = logging.getLogger(__name__)

SIGMA_DATA = 0.5


def undefined_step_error(scheduler, t: int, plan: StepPlan, clips: bool = True) -> str:
    """Why the LCM / TCD step at ``t`` is refused (its coefficients are not finite; ``clips``:
    whether the step applies clip_sample and thresholding, as LCM's does and TCD's does not)."""
    if not all(math.isfinite(c) for c in plan.x0):
        return x0_error(t, scheduler._host_alphas_cumprod[t], scheduler.config.rescale_betas_zero_snr, clips)
    return f"timestep {t}: the step's coefficients are not finite; diffusers' step returns inf/NaN there"


@dataclass
class LCMSchedulerOutput(OutputFields):
    """Like diffusers' LCMSchedulerOutput: ``.prev_sample``, ``.denoised``, ``out[i]``,
    ``out["denoised"]`` (and the rest of :class:`OutputFields`), ``to_tuple()``."""

    _fields = ("prev_sample", "denoised")

    prev_sample: torch.Tensor
    denoised: Optional[torch.Tensor] = None


class LCMScheduler(Thresholding, FusedScheduler):
    """Drop-in for ``diffusers.LCMScheduler``: same arguments and config.

    Each ``step`` is one fused kernel pass (plus a reduction pass with dynamic thresholding)
    writing the denoised sample (boundary-condition scalings applied to the, optionally clipped
    or thresholded, x0) and the next sample, which
    re-noises it with noise drawn from the caller's generator exactly as diffusers draws it.

    A step past the end of the schedule is an IndexError, where diffusers steps again at the
    last timestep, re-noising the denoised sample to that same timestep (and
    ``set_timesteps(0)`` a ValueError, where diffusers fails with a ZeroDivisionError).
    """

    _diffusers_name = "LCMScheduler"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("prediction_type", prediction_type, ("epsilon", "sample", "v_prediction"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if int(original_inference_steps) < 1:
            raise ValueError(f"original_inference_steps must be >= 1, got {original_inference_steps}")
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._host_alphas_cumprod = self.alphas_cumprod.tolist()
        self._host_final = float(self.final_alpha_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._set_timesteps(torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)))
        self.custom_timesteps = False
        self.sigma_data = SIGMA_DATA
        self._step_index = None
        self._begin_index = None
        self._table = None

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      original_inference_steps: Optional[int] = None, timesteps: Optional[List[int]] = None,
                      strength: float = 1.0) -> None:
        """LCM's timesteps (a subset of the distillation schedule, or custom ones) and coefficients."""
        cfg = self.config
        T = cfg.num_train_timesteps
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        original_steps = cfg.original_inference_steps if original_inference_steps is None else original_inference_steps
        # (past 1 the origin timesteps run past the training schedule)
        strength = check_float("strength", strength, 0.0, 1.0)
        origin = self._origin_timesteps(original_steps, original_inference_steps, strength)

        if timesteps is not None:
            timesteps = [int(t) for t in custom_schedule("timesteps", timesteps, np.int64)]
            train_timesteps = set(origin.tolist())
            off_schedule = []
            for i in range(1, len(timesteps)):
                if timesteps[i] >= timesteps[i - 1]:
                    raise ValueError("`custom_timesteps` must be in descending order.")
                if timesteps[i] not in train_timesteps:
                    off_schedule.append(timesteps[i])
            if timesteps[0] >= T:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {T}.")
            if timesteps[-1] < 0:
                raise ValueError(f"`timesteps` must be >= 0, got {timesteps[-1]}")
            if strength == 1.0 and timesteps[0] != T - 1:
                logger.warning("The first timestep on the custom timestep schedule is %s, not %s: you may get "
                               "unexpected results.", timesteps[0], T - 1)
            if off_schedule:
                logger.warning("The custom timestep schedule contains timesteps not on the distillation schedule: "
                               "%s. You may get unexpected results.", off_schedule)
            if len(timesteps) > original_steps:
                logger.warning("The custom timestep schedule has %d steps, more than the %d of the distillation "
                               "schedule. You may get unexpected results.", len(timesteps), original_steps)
            timesteps = host_array(timesteps, np.int64)
            steps, custom = len(timesteps), True
            init_timestep = min(int(steps * strength), steps)
            t_start = max(steps - init_timestep, 0)
            timesteps = timesteps[t_start * self.order:]
        else:
            if int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
            if num_inference_steps > T:
                raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than "
                                 f"`self.config.train_timesteps`: {T}.")
            skipping_step = len(origin) // num_inference_steps
            if skipping_step < 1:
                raise ValueError(f"The combination of `original_steps x strength`: {original_steps} x {strength} is "
                                 f"smaller than `num_inference_steps`: {num_inference_steps}. Reduce "
                                 "`num_inference_steps` or increase `strength`.")
            if num_inference_steps > original_steps:
                raise ValueError(f"`num_inference_steps`: {num_inference_steps} cannot be larger than "
                                 f"`original_inference_steps`: {original_steps}.")
            origin = origin[::-1].copy()
            idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
            timesteps = origin[idx]
            steps, custom = num_inference_steps, self.custom_timesteps  # (never reset, as in diffusers)

        self._set_timesteps(torch.from_numpy(timesteps).to(device=device, dtype=torch.long), timesteps.tolist())
        # set once the schedule is made, so that a call that fails leaves the scheduler as it was
        self.num_inference_steps, self.custom_timesteps = steps, custom
        self._step_index = None
        self._begin_index = None
        self._table = self._shared_table(
            lambda: GrowingTable({key: self._plan(*key) for key in map(self._key, range(len(timesteps)))}))

    def _origin_timesteps(self, original_steps: int, original_inference_steps: Optional[int],
                          strength: float) -> np.ndarray:
        """The distillation schedule the inference timesteps are taken from, ascending."""
        T = self.config.num_train_timesteps
        if original_steps > T:
            raise ValueError(f"`original_steps`: {original_steps} cannot be larger than `self.config.train_timesteps`:"
                             f" {T}: the model was trained on at most {T} timesteps.")
        k = T // original_steps
        return np.asarray(list(range(1, int(original_steps * strength) + 1))) * k - 1

    def get_scalings_for_boundary_condition_discrete(self, timestep) -> Tuple[float, float]:
        """(c_skip, c_out) of the consistency-model boundary condition at ``timestep``."""
        scaled = float(timestep) * self.config.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        return c_skip, c_out

    def _key(self, i: int, t: Optional[int] = None) -> Tuple[int, int, bool]:
        """What step ``i`` at timestep ``t`` (by default the schedule's) depends on: ``t``, the
        next timestep of the schedule (``t`` itself after the last) and whether it is the last
        step. Not ``i`` itself: the schedule may be assigned anew between steps."""
        host = self._host_timesteps
        t = int(host[i]) if t is None else t
        prev_t = int(host[i + 1]) if i + 1 < len(host) else t
        return t, prev_t, i == self.num_inference_steps - 1

    def _plan(self, t: int, prev_t: int, last: bool) -> CheckedPlan:
        """The step from ``t`` to ``prev_t``, undefined where diffusers' step is inf or NaN (an
        epsilon model at zero terminal SNR without clipping or thresholding)."""
        plan = self._update(t, prev_t, last)
        return CheckedPlan.of(plan, lambda: undefined_step_error(self, t, plan))

    def _update(self, t: int, prev_t: int, last: bool) -> StepPlan:
        cfg = self.config
        a_t = self._host_alphas_cumprod[t]
        a_prev = self._host_alphas_cumprod[prev_t] if prev_t >= 0 else self._host_final
        sa, sb = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        if cfg.prediction_type == "epsilon":
            x0 = epsilon_x0_coefficients(sa, sb, bounded=cfg.clip_sample or cfg.thresholding)
        elif cfg.prediction_type == "sample":
            x0 = (0.0, 1.0)
        else:
            x0 = (sa, -sb)
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(t)
        denoised = c_out * X0 + c_skip * X
        if last:  # the last step returns the denoised sample itself
            return StepPlan(x0=x0, sample=denoised)
        return StepPlan(x0=x0, sample=math.sqrt(a_prev) * denoised + math.sqrt(1.0 - a_prev) * NOISE,
                        history=denoised)

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None):
        """diffusers' ``step`` (same positional order): returns ``(prev_sample, denoised)``."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> LCMSchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        i, n = self._step_index, len(self._host_timesteps)
        if i >= n:
            raise IndexError(f"step {i} is past the end of the {n}-step schedule; call set_timesteps again")
        t = timestep_value(self, timestep)
        T = self.config.num_train_timesteps
        if not -T <= t < T:
            raise IndexError(f"timestep {t} is outside the training schedule [0, {T})")
        key = self._key(i, t)
        entry = self._table.ensure(key, lambda: self._plan(*key))
        self._raise_if_undefined(entry)  # (before the noise draw: a refused step leaves the generator as it was)
        plan = self._table.plan(entry)
        noise = None
        if plan.history is not None:
            dtype = torch.promote_types(sample.dtype, model_output.dtype)
            noise = self._noise(variance_noise, generator, model_output, dtype)
        cfg = self.config
        clip = cfg.clip_sample_range if cfg.clip_sample and not cfg.thresholding else None
        dynamic = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
        result = self._fused(entry, sample, model_output, cond=cond, guidance_scale=guidance_scale, noise=noise,
                             write_history=plan.history is not None,
                             clip_value=clip, dynamic=dynamic)
        self._step_index += 1
        denoised = result.sample if result.history is None else result.history
        return LCMSchedulerOutput(prev_sample=result.sample, denoised=denoised)

    # ---------------------------------------------------------------- helpers

    def previous_timestep(self, timestep):
        """The timestep the step from ``timestep`` lands on, as diffusers computes it."""
        if self.custom_timesteps or self.num_inference_steps:
            t = timestep_value(self, timestep)
            index = self._host_timesteps.index(float(t))
            if index == len(self._host_timesteps) - 1:
                return torch.tensor(-1)
            return self.timesteps[index + 1]
        return timestep - 1

    def _sqrt_alphas(self, timesteps: torch.Tensor, like: torch.Tensor):
        alphas_cumprod = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        a = alphas_cumprod[timesteps.to(like.device)]
        sa, sb = (a**0.5).flatten(), ((1 - a) ** 0.5).flatten()
        while sa.dim() < like.dim():
            sa, sb = sa.unsqueeze(-1), sb.unsqueeze(-1)
        return sa, sb

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """diffusers' forward process: ``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` at ``timesteps``."""
        sa, sb = self._sqrt_alphas(timesteps, original_samples)
        return sa * original_samples + sb * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """diffusers' v-prediction target: ``sqrt(a_t) noise - sqrt(1 - a_t) sample`` at ``timesteps``."""
        sa, sb = self._sqrt_alphas(timesteps, sample)
        return sa * noise - sb * sample
