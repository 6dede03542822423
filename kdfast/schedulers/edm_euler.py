"""Euler steps of an EDM-preconditioned model (Karras et al. 2022), as a drop-in for diffusers'
``EDMEulerScheduler``."""
from __future__ import annotations

import math
from typing import List, Optional, Union

import torch

from ._config import register_to_config
from ._linear import NOISE, X, X0
from ._schedule import check_choice
from .base import GrowingTable, SchedulerOutput, StepPlan
from .euler_discrete import _as_float32, _reject_integer_timestep, _SigmaScheduler


class EDMPreconditioning:
    """The EDM parameterisation both EDM schedulers share (config keys ``sigma_min``,
    ``sigma_max``, ``sigma_data``, ``rho``, ``prediction_type``): the Karras / exponential
    sigma ramps and the input, noise and output preconditioning, as diffusers computes them."""

    @property
    def init_noise_sigma(self) -> float:
        return (self.config.sigma_max ** 2 + 1) ** 0.5

    def _compute_karras_sigmas(self, ramp: torch.Tensor, sigma_min: Optional[float] = None,
                               sigma_max: Optional[float] = None) -> torch.Tensor:
        sigma_min = sigma_min or self.config.sigma_min
        sigma_max = sigma_max or self.config.sigma_max
        rho = self.config.rho
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (hi + ramp * (lo - hi)) ** rho

    def _compute_exponential_sigmas(self, ramp: torch.Tensor, sigma_min: Optional[float] = None,
                                    sigma_max: Optional[float] = None) -> torch.Tensor:
        sigma_min = sigma_min or self.config.sigma_min
        sigma_max = sigma_max or self.config.sigma_max
        return torch.linspace(math.log(sigma_min), math.log(sigma_max), len(ramp)).exp().flip(0)

    def _get_conditioning_c_in(self, sigma):
        return 1 / ((sigma ** 2 + self.config.sigma_data ** 2) ** 0.5)

    def precondition_inputs(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        """``sample * c_in(sigma)``, the network's input."""
        return sample * self._get_conditioning_c_in(sigma)

    def precondition_noise(self, sigma) -> torch.Tensor:
        """``0.25 * log(sigma)``, the network's noise-level input (the schedule's timesteps)."""
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor([sigma])
        return 0.25 * torch.log(sigma)

    def _output_scalings(self, sigma: float):
        """(c_skip, c_out): the denoised sample is ``c_skip * x + c_out * model_output``."""
        sd = self.config.sigma_data
        pt = self.config.prediction_type
        if pt == "sample":  # the model predicts x0 itself (diffusers' EDM schedulers raise here)
            return 0.0, 1.0
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2) ** 0.5
        return c_skip, (c_out if pt == "epsilon" else -c_out)

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma) -> torch.Tensor:
        """The denoised sample ``c_skip * sample + c_out * model_output``."""
        c_skip, c_out = self._output_scalings(sigma)
        return c_skip * sample + c_out * model_output

    def _input_scales(self, sigmas: torch.Tensor) -> List[float]:
        """``c_in`` per sigma, computed as diffusers does (float32 tensors), so that scaling by
        that float32 value gives bit-identical model inputs."""
        return self._get_conditioning_c_in(sigmas).tolist()


class EDMEulerScheduler(EDMPreconditioning, _SigmaScheduler):
    """Drop-in for ``diffusers.EDMEulerScheduler``: same arguments, config, schedule (Karras or
    exponential sigmas between ``sigma_min`` and ``sigma_max``), preconditioning
    (``precondition_inputs`` / ``_noise`` / ``_outputs``) and step, churn included.

    Each ``step`` is one fused kernel pass: the EDM output preconditioning
    ``x0 = c_skip * x + c_out * model_output`` at ``sigma_hat``, the churn noise when
    ``s_churn > 0`` and the Euler update. A ``pred_original_sample`` passed to ``step`` takes
    the place of the model's (as in diffusers), still in one pass.
    """

    _diffusers_name = "EDMEulerScheduler"
    _x0_from_float32_sample = True
    _compatibles = ()
    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
    ):
        check_choice("sigma_schedule", sigma_schedule, ("karras", "exponential"))
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if not (0 < sigma_min < sigma_max and sigma_data > 0 and rho > 0):
            raise ValueError(f"need 0 < sigma_min < sigma_max, sigma_data > 0 and rho > 0; got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}, sigma_data={sigma_data}, rho={rho}")
        self.num_inference_steps = None
        self.is_scale_input_called = False
        # diffusers sets the training schedule at construction; its coefficients are made on
        # the first step that needs them.
        ramp = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        self._install(self._sigmas_of_ramp(ramp), None)
        self._table = None

    # ---------------------------------------------------------------- schedule

    def _sigmas_of_ramp(self, ramp: torch.Tensor) -> torch.Tensor:
        if self.config.sigma_schedule == "karras":
            return self._compute_karras_sigmas(ramp).to(torch.float32)
        return self._compute_exponential_sigmas(ramp).to(torch.float32)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      sigmas: Optional[Union[torch.Tensor, List[float], float]] = None) -> None:
        """The schedule of ``num_inference_steps`` steps, or of ``sigmas``: positions in [0, 1]
        along the Karras / exponential ramp (not sigma values), as diffusers takes them."""
        if sigmas is None:
            if num_inference_steps is None or int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
            ramp = torch.linspace(0, 1, int(num_inference_steps), dtype=torch.float64)
        else:
            ramp = torch.as_tensor(sigmas).to(torch.float64)
        if ramp.dim() != 1 or ramp.numel() < 1:
            raise ValueError(f"sigmas (the ramp) must be a non-empty 1-D sequence, got shape {tuple(ramp.shape)}")
        ramp_sigmas = self._sigmas_of_ramp(ramp)
        if not bool(torch.isfinite(ramp_sigmas).all() and (ramp_sigmas > 0).all()):
            # (Karras sigmas of positions past the ramp: negative sigmas and NaN timesteps)
            raise ValueError(f"sigmas must be positions along the ramp from sigma_max (0) to sigma_min (1), not sigma "
                             f"values; got {sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas}, which "
                             f"give the sigmas {ramp_sigmas.tolist()}")
        self.num_inference_steps = num_inference_steps
        self._install(ramp_sigmas, device)
        self._table = self._shared_table(self._build_table)

    def _install(self, sigmas: torch.Tensor, device) -> None:
        """Adopt float32 ``sigmas`` (one per step): timesteps ``0.25 * log(sigma)`` and the final sigma."""
        timesteps = self.precondition_noise(sigmas)
        last = sigmas[-1:] if self.config.final_sigmas_type == "sigma_min" else torch.zeros(1)
        self._set_sigmas(torch.cat([sigmas, last]))
        self._input_scale = self._input_scales(self.sigmas)
        self._set_timesteps(timesteps.to(device=device), timesteps.tolist())
        self._step_index = None
        self._begin_index = None

    def _build_table(self) -> GrowingTable:
        return GrowingTable({(i, 0.0, 1.0, False): self._plan(i) for i in range(len(self._host_timesteps))})

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``precondition_inputs`` at the current step's sigma."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return sample * self._input_scale[self._step_index]

    # ---------------------------------------------------------------- step

    def _plan(self, i: int, gamma: float = 0.0, s_noise: float = 1.0, given_x0: bool = False) -> StepPlan:
        sigma, sigma_next = self._host_sigmas[i], self._host_sigmas[i + 1]
        sigma_hat = sigma * (gamma + 1.0)
        # x0 = a * x_hat + b * m: the preconditioned model output, or a given x0 (a = 0, b = 1)
        a, b = (0.0, 1.0) if given_x0 else self._output_scalings(sigma_hat)
        # x_hat = x + c * noise;  x_next = x_hat + (x_hat - x0) / sigma_hat * (sigma_next - sigma_hat)
        #                               = r * x_hat + (1 - r) * x0
        r = sigma_next / sigma_hat
        sample, x0 = r * X + (1.0 - r) * X0, X0
        if gamma > 0:
            c = s_noise * math.sqrt(sigma_hat * sigma_hat - sigma * sigma)
            sample = sample + (c * (r + (1.0 - r) * a)) * NOISE
            x0 = x0 + (a * c) * NOISE
        return StepPlan(x0=(a, b), sample=sample, aux=x0)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             pred_original_sample: Optional[torch.Tensor] = None,
             variance_noise: Optional[torch.Tensor] = None, return_pred_original_sample: bool = False):
        """diffusers' ``step`` (same positional order); ``variance_noise`` replaces the churn draw.
        ``pred_original_sample`` is computed when first read, or written by the step with
        ``return_pred_original_sample=True``."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise, s_churn=s_churn,
                         s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, pred_original_sample=pred_original_sample,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
              pred_original_sample: Optional[torch.Tensor] = None,
              return_pred_original_sample: bool = False) -> SchedulerOutput:
        _reject_integer_timestep(timestep, type(self).__name__)
        self._require_table()
        self._check_step_inputs(model_output, sample)
        i = self._index_for_step(timestep)
        sigma = self._host_sigmas[i]
        gamma = 0.0
        if s_churn and _as_float32(s_tmin) <= sigma <= _as_float32(s_tmax):
            gamma = min(s_churn / (len(self._host_sigmas) - 1), 2 ** 0.5 - 1)
        given = pred_original_sample is not None
        key = (i, gamma, float(s_noise), given)
        entry = self._table.ensure(key, lambda: self._plan(i, gamma, float(s_noise), given))
        noise = None
        if gamma > 0:
            noise = self._noise(variance_noise, generator, model_output, model_output.dtype)
        if given:
            if cond is not None:
                raise ValueError("step_cfg guides the model output; with pred_original_sample there is none to guide")
            self._check_step_inputs(pred_original_sample, sample)
            result = self._fused(entry, sample, pred_original_sample, noise=noise)
            out = SchedulerOutput(result.sample.to(model_output.dtype), pred_original_sample)
        else:
            out = self._fused_output(entry, sample, model_output, want_x0=return_pred_original_sample,
                                     prev_dtype=model_output.dtype, cond=cond, guidance_scale=guidance_scale,
                                     noise=noise)
        self._step_index += 1
        return out
