"""Latent consistency sampling of a flow-matching student (few steps, each re-noising the
predicted clean sample), as a drop-in for diffusers' ``FlowMatchLCMScheduler``."""
from __future__ import annotations

import math
import numbers
from typing import List, Optional

import torch

from ._config import register_to_config
from ._linear import MODEL, NOISE, X, X0
from ._schedule import check_choice
from .base import GrowingTable, SchedulerOutput, StepPlan, reject_unknown_step_arguments
from .euler_discrete import _as_float32, _reject_integer_timestep
from .flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

UPSCALE_MODES = ("nearest", "linear", "bilinear", "bicubic", "trilinear", "area", "nearest-exact")


def _check_scale_factors(scale_factors, upscale_mode) -> None:
    if scale_factors is not None:
        if isinstance(scale_factors, (str, bytes)) or not hasattr(scale_factors, "__len__"):
            raise ValueError(f"scale_factors must be a list of numbers > 0, got {scale_factors!r}")
        for f in scale_factors:
            if isinstance(f, bool) or not isinstance(f, numbers.Real) or not math.isfinite(f) or f <= 0:
                raise ValueError(f"scale_factors must be a list of numbers > 0, got {list(scale_factors)!r}")
    if upscale_mode:  # (None or "" turns the upscaling off, as in diffusers)
        check_choice("upscale_mode", upscale_mode, UPSCALE_MODES)


class FlowMatchLCMScheduler(FlowMatchEulerDiscreteScheduler):
    """Drop-in for ``diffusers.FlowMatchLCMScheduler``: same arguments, config and schedule
    (FlowMatchEuler's: static and resolution-dependent shifts with ``mu``, ``shift_terminal``,
    Karras / exponential / beta sigmas, ``invert_sigmas``, custom sigmas or timesteps) and step.

    The model predicts the velocity ``v``; a step predicts the clean sample ``x0 = x - sigma *
    v`` and re-noises it to the next sigma, ``(1 - sigma_next) * x0 + sigma_next * noise``, with
    noise drawn from the caller's generator exactly as diffusers draws it (float32, or float64
    for a float64 model output; at every step, the last included). Each ``step`` (and
    ``step_cfg``, which fuses classifier-free guidance) is one kernel pass; on a model output
    wider than the latents (float32 on float16) it computes in the model output's precision and
    returns its dtype, as diffusers does.

    Scale-wise generation (``scale_factors`` / ``set_scale_factors``): at step ``i <
    len(scale_factors)`` diffusers resizes ``x0`` to ``scale_factors[i]`` times the first
    step's spatial size (``torch.nn.functional.interpolate`` with ``upscale_mode``) before
    re-noising it. The resize is not a per-element combination, so such a step runs as two
    fused passes around diffusers' own ``interpolate`` call: ``x0`` (guidance fused, kept in
    float32 as diffusers keeps it), then the re-noising of the resized ``x0`` (which reads the
    noise as its model input).
    """

    _diffusers_name = "FlowMatchLCMScheduler"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: Optional[float] = None,
        use_karras_sigmas: Optional[bool] = False,
        use_exponential_sigmas: Optional[bool] = False,
        use_beta_sigmas: Optional[bool] = False,
        time_shift_type: str = "exponential",
        scale_factors: Optional[List[float]] = None,
        upscale_mode: Optional[str] = "bicubic",
    ):
        _check_scale_factors(scale_factors, upscale_mode)
        self._init_flow_schedule()
        self._init_size = None  # the first step's spatial size, what the scale factors multiply
        self._scale_factors = scale_factors
        self._upscale_mode = upscale_mode

    def set_scale_factors(self, scale_factors: List[float], upscale_mode: str) -> None:
        """Sets scale factors (one per step but the last) and the upscaling mode of scale-wise
        generation."""
        _check_scale_factors(scale_factors, upscale_mode)
        self._scale_factors = scale_factors
        self._upscale_mode = upscale_mode

    # ---------------------------------------------------------------- coefficients

    def _build_table(self) -> GrowingTable:
        # the two passes of a resizing step are planned when first taken
        return GrowingTable({i: self._plan(i) for i in range(len(self._host_sigmas) - 1)})

    def _plan(self, i: int) -> StepPlan:
        sigma, sigma_next = self._host_sigmas[i], self._host_sigmas[i + 1]
        # x0 = x - sigma * v;  x_next = (1 - sigma_next) * x0 + sigma_next * noise
        # ((1 - sigma_next) rounded to float32, as diffusers computes it on a float32 tensor)
        return StepPlan(x0=(1.0, -sigma), sample=_as_float32(1.0 - sigma_next) * X0 + sigma_next * NOISE)

    def _plan_x0(self, i: int) -> StepPlan:
        # x0 as the sample output (float32 latents) or the history output (float32 for others)
        return StepPlan(x0=(1.0, -self._host_sigmas[i]), sample=X0, history=X0)

    def _plan_renoise(self, i: int) -> StepPlan:
        # X: the resized x0;  MODEL: the noise
        sigma_next = self._host_sigmas[i + 1]
        return StepPlan(x0=(1.0, 0.0), sample=_as_float32(1.0 - sigma_next) * X + sigma_next * MODEL)

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None):
        """diffusers' ``step`` (same positional order). ``variance_noise`` replaces the noise
        draw (of the resized shape at a resizing step)."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        _reject_integer_timestep(timestep, type(self).__name__)
        self._check_step_inputs(model_output, sample)
        if sample.dtype != model_output.dtype and torch.promote_types(sample.dtype, model_output.dtype) \
                is model_output.dtype:
            # diffusers computes in float32 and returns the model output's dtype: a model output
            # wider than the latents (float32 on float16) gets a result of its own precision
            sample = sample.to(model_output.dtype)
        factors = self._scale_factors if self._upscale_mode else None
        if factors and len(self._timesteps) != len(factors) + 1:
            raise ValueError(f"scale_factors should have one entry per step but the last: {len(factors)} "
                             f"scale factors for {len(self._timesteps)} timesteps")
        if self._table is None:  # stepping on the training schedule, before any set_timesteps
            self._table = self._shared_table(self._build_table)
        if self._init_size is None or self._step_index is None:
            self._init_size = model_output.size()[2:]
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i + 1 >= len(self._host_sigmas):
            raise IndexError(f"step {i} is past the end of the {len(self._host_sigmas) - 1}-step schedule; "
                             "call set_timesteps again")
        # diffusers draws the noise in the dtype of its x0: float32 (its upcast latents), float64
        # with a float64 model output
        noise_dtype = torch.promote_types(torch.float32, model_output.dtype)
        if factors and i < len(factors):
            prev = self._resizing_step(i, model_output, sample, cond, guidance_scale, generator, variance_noise,
                                       noise_dtype)
        else:
            noise = self._noise(variance_noise, generator, sample, noise_dtype)
            prev = self._fused(i, sample, model_output, cond=cond, guidance_scale=guidance_scale, noise=noise).sample
        if prev.dtype != model_output.dtype:
            prev = prev.to(model_output.dtype)
        self._step_index += 1
        return SchedulerOutput(prev)

    def _resizing_step(self, i: int, model_output, sample, cond, guidance_scale, generator, variance_noise,
                       noise_dtype: torch.dtype) -> torch.Tensor:
        """A scale-wise step: fused x0, diffusers' interpolation, fused re-noising."""
        table = self._table
        to_float32 = sample.dtype not in (torch.float32, torch.float64)  # (diffusers' x0 is float32)
        entry = table.ensure(("x0", i), lambda: self._plan_x0(i))
        result = self._fused(entry, sample, model_output, cond=cond, guidance_scale=guidance_scale,
                             write_history=to_float32, history_dtype=torch.float32 if to_float32 else None)
        x0 = result.history if to_float32 else result.sample
        size = [round(self._scale_factors[i] * s) for s in self._init_size]
        x0 = torch.nn.functional.interpolate(x0, size=size, mode=self._upscale_mode)
        noise = self._noise(variance_noise, generator, x0, noise_dtype)
        entry = table.ensure(("renoise", i), lambda: self._plan_renoise(i))
        return self._fused(entry, x0, noise).sample
