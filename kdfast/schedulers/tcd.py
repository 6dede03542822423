"""Trajectory Consistency Distillation sampling (Zheng et al. 2024), as a diffusers drop-in."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from .._checks import real_number
from ._linear import MODEL, NOISE, X, X0
from ._schedule import epsilon_x0_coefficients
from .base import CheckedPlan, OutputFields, StepPlan, reject_unknown_step_arguments
from .ddim import ddim_variance, timestep_value
from .lcm import LCMScheduler, undefined_step_error


@dataclass
class TCDSchedulerOutput(OutputFields):
    """Like diffusers' TCDSchedulerOutput: ``.prev_sample``, ``.pred_noised_sample``,
    ``out[i]``, ``out["pred_noised_sample"]`` (and the rest of :class:`OutputFields`), ``to_tuple()``."""

    _fields = ("prev_sample", "pred_noised_sample")

    prev_sample: torch.Tensor
    pred_noised_sample: Optional[torch.Tensor] = None


class TCDScheduler(LCMScheduler):
    """Drop-in for ``diffusers.TCDScheduler``: same arguments, config and schedule (those of
    ``LCMScheduler``, whose constructor it shares).

    A step predicts x0 and epsilon from the model output, jumps to the earlier timestep
    ``s = floor((1 - eta) * t_prev)`` (``pred_noised_sample``) and, with ``eta > 0`` except at
    the last step, re-noises forward to ``t_prev`` with noise drawn from the caller's generator
    exactly as diffusers draws it: one fused kernel pass writing both outputs. diffusers' step
    looks up its coefficients by indexing tables with the (device) timestep, a host sync per
    step; here they are computed on the host, once per (timestep, eta). As in diffusers, the
    clipping and thresholding options are recorded in the config and not applied by the step.
    A step past the end of the schedule is an IndexError, as for ``LCMScheduler``.
    """

    _diffusers_name = "TCDScheduler"

    def _get_variance(self, timestep, prev_timestep) -> torch.Tensor:
        """The DDIM variance between two timesteps, as diffusers' private method of that name
        computes it (in float32 tensors): CycleDiffusion's helpers call it on any scheduler."""
        return ddim_variance(self, timestep, prev_timestep)

    def _origin_timesteps(self, original_steps: int, original_inference_steps: Optional[int],
                          strength: float) -> np.ndarray:
        # diffusers' TCD: an explicit original_inference_steps selects from every training timestep
        if original_inference_steps is None:
            return super()._origin_timesteps(original_steps, None, strength)
        return np.asarray(list(range(0, int(self.config.num_train_timesteps * strength))))

    def _key(self, i: int, t: Optional[int] = None, eta: float = 0.3) -> Tuple[int, int, bool, float]:
        """What step ``i`` at timestep ``t`` depends on: ``t``, the next timestep of the schedule
        (0 after the last, as diffusers takes it), whether it is the last step, and ``eta``."""
        host = self._host_timesteps
        t = int(host[i]) if t is None else t
        prev_t = int(host[i + 1]) if i + 1 < len(host) else 0
        return t, prev_t, i == self.num_inference_steps - 1, float(eta)

    def _plan(self, t: int, prev_t: int, last: bool, eta: float = 0.3) -> CheckedPlan:
        plan = self._update(t, prev_t, last, eta)
        return CheckedPlan.of(plan, lambda: undefined_step_error(self, t, plan, clips=False))

    def _update(self, t: int, prev_t: int, last: bool, eta: float = 0.3) -> StepPlan:
        cfg = self.config
        ac = self._host_alphas_cumprod
        # s = floor((1 - eta) * prev_t), in float32 as diffusers computes it on a long tensor
        s = int(np.floor(np.float32(1.0 - eta) * np.float32(prev_t)))
        a_t, a_prev, a_s = ac[t], ac[prev_t], ac[s]
        sa, sb = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        # x0 (the kernel's X0 source) and epsilon as diffusers forms them from the model output
        if cfg.prediction_type == "epsilon":
            x0, eps = epsilon_x0_coefficients(sa, sb, bounded=False), MODEL
        elif cfg.prediction_type == "sample":
            x0, eps = (0.0, 1.0), (X - sa * MODEL) / sb
        else:  # v_prediction
            x0, eps = (sa, -sb), sa * MODEL + sb * X
        noised = math.sqrt(a_s) * X0 + math.sqrt(1.0 - a_s) * eps
        if eta > 0 and not last:
            r = a_prev / a_s
            return StepPlan(x0=x0, sample=math.sqrt(r) * noised + math.sqrt(1.0 - r) * NOISE, history=noised)
        return StepPlan(x0=x0, sample=noised)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.3,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None):
        """diffusers' ``step`` (same positional order): returns ``(prev_sample, pred_noised_sample)``.
        ``eta`` (the paper's gamma, in [0, 1]) sets the stochasticity; ``variance_noise``
        replaces the draw."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise, eta=eta)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              eta: float = 0.3, **kwargs) -> TCDSchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        self._require_timesteps()
        eta = real_number("eta", eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta (gamma) must be in [0, 1], got {eta}")
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
        key = self._key(i, t, eta)
        entry = self._table.ensure(key, lambda: self._plan(*key))
        self._raise_if_undefined(entry)  # (before the noise draw)
        plan = self._table.plan(entry)
        noise = None
        if plan.history is not None:
            noise = self._noise(variance_noise, generator, model_output,
                                torch.promote_types(sample.dtype, model_output.dtype))
        result = self._fused(entry, sample, model_output, cond=cond, guidance_scale=guidance_scale, noise=noise,
                             write_history=plan.history is not None)
        self._step_index += 1
        noised = result.sample if result.history is None else result.history
        return TCDSchedulerOutput(prev_sample=result.sample, pred_noised_sample=noised)
