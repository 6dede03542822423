"""DPM-Solver-2 (Karras et al. 2022, Algorithm 2 with a midpoint step), as a diffusers drop-in."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from ._config import register_to_config
from ._linear import AUX, NOISE, X, X0, Lin
from ._schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS, check_choice, noise_schedule
from .base import CoefficientTable, SchedulerOutput, StepPlan, check_variance_noise, reject_unknown_step_arguments
from .euler_discrete import (_SigmaScheduler, check_sigma_options, converted_sigmas,
                             spaced_timesteps, train_sigmas)
from .lms_discrete import SIGMA_PREDICTION_TYPES, sigma_derivative, sigma_x0


def _midpoint_timesteps(sigmas: torch.Tensor, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each midpoint sigma, bit for bit as diffusers gets it.

    This is ``sigma_to_t`` in float32: diffusers passes it float32 torch tensors here, and
    torch's type promotion keeps the interpolation in float32 where numpy's would end it in
    float64. A sigma with a zero training sigma below it (beta_start=0: log -inf) gets the
    lower timestep where diffusers' 0/0 gives a NaN timestep.
    """
    log_sigma = np.log(np.maximum(sigmas.numpy(), np.float32(1e-10)))
    dists = log_sigma[np.newaxis, :] - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    with np.errstate(invalid="ignore"):
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
    w = np.where(np.isnan(w), np.float32(0.0), w)
    return (1 - w) * low_idx.astype(np.float32) + w * high_idx.astype(np.float32)


def _interleaved(values: torch.Tensor) -> torch.Tensor:
    """diffusers' doubling of a per-step schedule: the first entry once, the others twice."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])


def _finite(values: torch.Tensor) -> torch.Tensor:
    """``values`` with diffusers' 0/0 and log(0) - log(0) results (NaN) at their limit, 0: a
    noise level between, or noise added after, a zero sigma."""
    return torch.where(torch.isnan(values), torch.zeros_like(values), values)


class _KDPM2Scheduler(_SigmaScheduler):
    """What the two KDPM2 schedulers share: the doubled schedule of timesteps and midpoint
    timesteps, the stage state (diffusers' ``self.sample``), input scaling at the midpoint
    and the two fused stages. Subclasses say where the midpoint lies and where the second
    stage lands."""

    order = 2
    _ancestral = False

    def _setup(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
               timestep_spacing) -> None:
        check_sigma_options(self.config)
        # diffusers raises NotImplementedError for "sample" in step; kdfast takes x0 = model output
        check_choice("prediction_type", prediction_type, SIGMA_PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(num_train_timesteps, beta_start, beta_end,
                                                                      beta_schedule, trained_betas)
        # diffusers sets a full-length schedule at construction; its coefficients are made on
        # the first step that needs them.
        self._set_schedule(num_train_timesteps, None, num_train_timesteps, build=False)

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps: Optional[int] = None) -> None:
        """Compute the (doubled) timesteps and sigmas, and both stages' kernel coefficients."""
        self._set_schedule(num_inference_steps, device, num_train_timesteps, build=True)

    def _set_schedule(self, num_inference_steps, device, num_train_timesteps, build: bool) -> None:
        cfg = self.config
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = int(num_inference_steps)
        timesteps = spaced_timesteps(cfg.timestep_spacing, num_train_timesteps or cfg.num_train_timesteps, n,
                                     cfg.steps_offset)
        train = train_sigmas(self.alphas_cumprod)
        with np.errstate(divide="ignore"):  # a zero training sigma (beta_start=0) has log -inf, as in diffusers
            log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        converted = converted_sigmas(cfg, sigmas, log_sigmas, n)
        if converted is not None:
            sigmas, timesteps = converted
            if cfg.use_karras_sigmas:  # diffusers rounds the Karras timesteps only
                timesteps = timesteps.round()
        self.log_sigmas = torch.from_numpy(log_sigmas).to(device=device)
        # The midpoint sigmas in diffusers' float32 torch ops, bit for bit (see _midpoints), and
        # from them the midpoint timesteps.
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        interpol, up, down = self._midpoints(sigmas)
        self._set_sigmas(_interleaved(sigmas))
        self.sigmas_interpol = _interleaved(interpol)
        self._host_interpol = self.sigmas_interpol.tolist()
        self._interpol_div = ((self.sigmas_interpol**2 + 1) ** 0.5).tolist()
        if up is not None:
            self.sigmas_up, self.sigmas_down = _interleaved(up), _interleaved(down)
            self._host_up, self._host_down = self.sigmas_up.tolist(), self.sigmas_down.tolist()
        timesteps = torch.from_numpy(np.asarray(timesteps))
        t_interpol = torch.from_numpy(_midpoint_timesteps(interpol, log_sigmas)).to(dtype=timesteps.dtype)
        mid = t_interpol[:-2] if self._ancestral else t_interpol[1:-1]
        timesteps = torch.cat([timesteps[:1], torch.stack((mid[:, None], timesteps[1:, None]), dim=-1).flatten()])
        self._set_timesteps(timesteps.to(device=device), timesteps.tolist())
        self.num_inference_steps = n
        self.sample = None
        self._step_index = None
        self._begin_index = None
        self._table = self._shared_table(self._build_table) if build else None

    def _midpoints(self, sigmas: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(sigmas_interpol, sigmas_up, sigmas_down) of the per-step ``sigmas`` (ending with 0)."""
        raise NotImplementedError

    def _build_table(self) -> CoefficientTable:
        plans = {}
        for k in range(len(self._host_sigmas) - 3):  # every index of the doubled schedule, in either stage
            plans[(k, 1)] = self._plan_first(k)
            if k > 0:
                plans[(k, 2)] = self._plan_second(k)
        return CoefficientTable(plans)

    def _first_sigmas(self, k: int) -> Tuple[float, float]:
        """(sigma, midpoint sigma) of a first stage at index ``k``."""
        raise NotImplementedError

    def _second_sigmas(self, k: int) -> Tuple[float, float, float, float]:
        """(sigma, midpoint sigma, sigma landed on, ancestral noise scale) of a second stage at ``k``."""
        raise NotImplementedError

    def _plan_first(self, k: int) -> StepPlan:
        sigma, sigma_mid = self._first_sigmas(k)
        pt = self.config.prediction_type
        # Euler step to the midpoint; the input sample is kept (by reference) for the second stage
        update = X + (sigma_mid - sigma) * sigma_derivative(pt, sigma)
        return StepPlan(x0=sigma_x0(pt, sigma), sample=update, aux=X0)  # aux output: pred_original_sample

    def _plan_second(self, k: int) -> StepPlan:
        sigma, sigma_mid, sigma_to, sigma_up = self._second_sigmas(k)
        pt = self.config.prediction_type
        d: Lin = sigma_derivative(pt, sigma_mid)
        if sigma_mid == 0 and pt == "sample" and sigma != 0:
            # no derivative at a zero midpoint: the first stage's sample towards the midpoint's x0
            d = (AUX - X0) / sigma
        # the whole step from the first stage's sample (AUX) with the midpoint's derivative
        update = AUX + (sigma_to - sigma) * d
        if sigma_up != 0:
            update = update + sigma_up * NOISE
        return StepPlan(x0=sigma_x0(pt, sigma_mid), sample=update, aux=X0)

    @property
    def state_in_first_order(self) -> bool:
        return self.sample is None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``sample / sqrt(sigma**2 + 1)``, with the midpoint's sigma in the second stage."""
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if self.sample is None:
            return sample / self._input_div[k]
        return sample / self._interpol_div[k - 1 if self._ancestral else k]

    # ---------------------------------------------------------------- step

    def _stage(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
               return_pred_original_sample: bool) -> SchedulerOutput:
        self._require_table()
        self._check_step_inputs(model_output, sample)
        check_variance_noise(variance_noise, model_output)  # (at the first stage too, which draws none)
        k = self._index_for_step(timestep)
        if self.sample is None:
            out = self._fused_output((k, 1), sample, model_output, want_x0=return_pred_original_sample, cond=cond,
                                     guidance_scale=guidance_scale)
            self.sample = sample
        else:
            if (k, 2) not in self._table:
                raise IndexError(f"no second {type(self).__name__} stage at step index {k}")
            if self.sample.shape != sample.shape:
                raise ValueError(f"sample shape {tuple(sample.shape)} does not match the first stage's sample shape "
                                 f"{tuple(self.sample.shape)}; call step in order")
            noise = None
            if self._ancestral:
                # drawn at every second stage, like diffusers: the same generator state
                noise = self._noise(variance_noise, generator, model_output, model_output.dtype)
                if not self._table.plans[(k, 2)].uses("noise"):
                    noise = None
            out = self._fused_output((k, 2), sample, model_output, want_x0=return_pred_original_sample, cond=cond,
                                     guidance_scale=guidance_scale, aux=self.sample, noise=noise)
            self.sample = None
        self._step_index += 1
        return out


class KDPM2DiscreteScheduler(_KDPM2Scheduler):
    """Drop-in for ``diffusers.KDPM2DiscreteScheduler``: same arguments and config.

    As in diffusers, the timesteps alternate between the schedule's and midpoint ones (the
    geometric mean of neighbouring sigmas), and ``step`` alternates between the Euler step to
    the midpoint and the step from the first stage's sample with the midpoint's derivative
    (``order = 2``). Each stage is one fused pass; the second reads the first stage's input
    sample (diffusers' ``self.sample``, kept by reference, not copied) as its aux input.
    ``prediction_type="sample"`` also works here (diffusers raises NotImplementedError).
    """

    _diffusers_name = "KDPM2DiscreteScheduler"

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
        # the geometric mean of each sigma and the one before; the first (log 0 - log 0: NaN in
        # diffusers) is never read
        return _finite(sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()), None, None

    def _first_sigmas(self, k):
        return self._host_sigmas[k], self._host_interpol[k + 1]

    def _second_sigmas(self, k):
        return self._host_sigmas[k - 1], self._host_interpol[k], self._host_sigmas[k], 0.0

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
        return self._stage(model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
                           return_pred_original_sample)
