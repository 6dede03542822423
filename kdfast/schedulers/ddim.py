"""DDIM (Song et al. 2021), with eta noise, clipping / thresholding and CFG++, as a diffusers drop-in."""
from __future__ import annotations

import math
from typing import List, Optional, Union

import numpy as np
import torch

from .._checks import real_number
from ._config import register_to_config
from ._helpers import Thresholding
from ._linear import MODEL, NOISE, UNCOND, X, X0
from ._schedule import (BETA_SCHEDULES, TIMESTEP_SPACINGS, check_choice, epsilon_x0_coefficients, noise_schedule,
                        x0_error)
from .base import CheckedPlan, FusedScheduler, SchedulerOutput, StepPlan
from .base import GrowingTable
from .euler_discrete import KARRAS_SCHEDULERS


def _sqrt(v: float) -> float:
    """sqrt that gives NaN for a negative argument, as the tensor math of diffusers does."""
    return math.sqrt(v) if v >= 0 else math.nan


def _div(a: float, b: float) -> float:
    """a / b with IEEE results for b == 0 (diffusers divides tensors; inf / nan propagate)."""
    if b != 0:
        return a / b
    return math.nan if a == 0 else math.copysign(math.inf, a)


def timestep_value(scheduler: FusedScheduler, timestep) -> int:
    """The integer value of ``timestep``, read without a host sync when it is an element of
    ``scheduler.timesteps`` (what pipelines pass)."""
    index = scheduler.schedule_index(timestep)
    if index is not None:
        value = timestep = scheduler._host_timesteps[index]
    else:
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
            timestep = timestep.item()
        value = float(timestep)
    if not value.is_integer():
        raise ValueError(f"timestep must be an integer training timestep, got {timestep}")
    return int(value)


def ddim_variance(scheduler, timestep, prev_timestep) -> torch.Tensor:
    """diffusers' ``_get_variance`` of DDIM-style schedulers (DDIM, TCD): the variance of the
    step from ``timestep`` to ``prev_timestep`` (below 0: to ``final_alpha_cumprod``)."""
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_t_prev = (scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0
                         else scheduler.final_alpha_cumprod)
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)


class DDIMScheduler(Thresholding, FusedScheduler):
    """Drop-in for ``diffusers.DDIMScheduler``: same arguments and config.

    As in diffusers, ``step`` reads the timestep's *value* (any training timestep works, not
    only the schedule's) and computes the previous timestep as ``t - T // num_inference_steps``.
    Coefficients for the schedule's timesteps are computed in ``set_timesteps``; other values,
    ``eta`` and ``use_clipped_model_output`` get theirs (float64, on the host) on first use.

    ``step_cfg(..., cfg_pp=True)`` runs CFG++ (Chung et al. 2024): the renoising direction
    uses the unguided model output, ``x_prev = sqrt(a_prev) x0_guided + sqrt(1 - a_prev) eps_uncond``
    (plus the eta noise term), in the same single kernel pass.

    Where diffusers' step is inf or NaN, ``step`` raises a ValueError saying why, before drawing
    any noise: an epsilon model at a timestep whose ``alphas_cumprod`` is 0 (zero terminal SNR)
    without clipping or thresholding, ``eta > 1``, any other non-finite coefficient.
    """

    _diffusers_name = "DDIMScheduler"
    _compatibles = KARRAS_SCHEDULERS
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("prediction_type", prediction_type, ("epsilon", "sample", "v_prediction"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._host_alphas_cumprod = self.alphas_cumprod.tolist()
        self._host_final = float(self.final_alpha_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._set_timesteps(torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)))
        self._step_index = None
        self._begin_index = None
        self._table = None

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Compute the timesteps and the kernel coefficients of each."""
        cfg = self.config
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = int(num_inference_steps)
        T = cfg.num_train_timesteps
        if n > T:
            raise ValueError(f"`num_inference_steps`: {n} cannot be larger than `self.config.train_timesteps`: {T} "
                             f"as the unet model trained with this scheduler can only handle maximal {T} timesteps.")
        if cfg.timestep_spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = T // n
            timesteps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
            timesteps += cfg.steps_offset
        else:
            ratio = T / n
            timesteps = np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
        self.num_inference_steps = n
        self._start_new_loop()
        self._set_timesteps(torch.from_numpy(timesteps).to(device), timesteps.tolist())
        self._table = self._shared_table(lambda: GrowingTable({self._key(t): self._plan(t) for t in timesteps.tolist()}))

    @staticmethod
    def _key(t: int, eta: float = 0.0, use_clipped: bool = False, cfg_pp: bool = False):
        return (t, eta, use_clipped, cfg_pp)

    def _alpha_prod(self, t: int) -> float:
        return self._host_alphas_cumprod[t]  # negative t wraps, as indexing the tensor does

    def _get_variance(self, timestep, prev_timestep) -> torch.Tensor:
        """The DDIM variance between two timesteps, as diffusers' private method of that name
        computes it (in float32 tensors): pipelines such as CycleDiffusion call it directly."""
        return ddim_variance(self, timestep, prev_timestep)

    def _alphas(self, t: int):
        """(alpha_cumprod the step at ``t`` starts from, alpha_cumprod it ends at)."""
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        return self._alpha_prod(t), (self._alpha_prod(prev_t) if prev_t >= 0 else self._host_final)

    def _plan(self, t: int, eta: float = 0.0, use_clipped: bool = False, cfg_pp: bool = False) -> CheckedPlan:
        """The step from ``t`` (see :meth:`_alphas`), undefined where diffusers' step is inf or NaN:
        an epsilon model's x0 at alphas_cumprod 0 (zero terminal SNR) without clipping, ``eta > 1``
        (a negative direction variance), any other non-finite coefficient."""
        plan = self._update(t, eta, use_clipped, cfg_pp)

        def error() -> str:
            a_t, a_prev = self._alphas(t)
            if not all(math.isfinite(c) for c in plan.x0):
                return x0_error(t, a_t, self.config.rescale_betas_zero_snr)
            return (f"timestep {t}: the step's coefficients are not finite (alphas_cumprod[t] = {a_t:g}, previous "
                    f"alpha_cumprod = {a_prev:g}, eta = {eta:g}, use_clipped_model_output = {use_clipped}); "
                    "diffusers' step returns inf/NaN there" + ("; eta must be <= 1" if eta > 1 else ""))

        return CheckedPlan.of(plan, error)

    def _update(self, t: int, eta: float, use_clipped: bool, cfg_pp: bool) -> StepPlan:
        cfg = self.config
        a_t, a_prev = self._alphas(t)
        b_t = 1.0 - a_t
        sa, sb = math.sqrt(a_t), math.sqrt(b_t)
        # m: the (guided) model output; for CFG++ the noise direction uses the unguided one
        m_eps = UNCOND if cfg_pp else MODEL
        if cfg.prediction_type == "epsilon":
            x0 = epsilon_x0_coefficients(sa, sb, bounded=cfg.clip_sample or cfg.get("thresholding", False))
            eps = m_eps
        elif cfg.prediction_type == "sample":
            x0 = (0.0, 1.0)
            eps = _div(1.0, sb) * X - _div(sa, sb) * m_eps
        else:
            x0 = (sa, -sb)
            eps = sa * m_eps + sb * X
        if use_clipped:  # epsilon re-derived from the clipped / thresholded x0
            eps = _div(1.0, sb) * X - _div(sa, sb) * X0
        std = 0.0
        if eta != 0:  # (the variance is 0/0 on a step from alpha_cumprod 1: the inverse's first)
            std = eta * _sqrt(_div(1.0 - a_prev, b_t) * (1.0 - _div(a_t, a_prev)))
        direction = 1.0 - a_prev - std * std
        if -1e-12 < direction < 0.0:
            # Exactly 0 at eta = 1 from alpha_cumprod 0 (zero terminal SNR): whether rounding
            # leaves it a hair above or below 0 is luck (diffusers' float32 gets NaN or a finite
            # value by step count); only a truly negative radicand (eta > 1) gives NaN.
            direction = 0.0
        sample = math.sqrt(a_prev) * X0 + _sqrt(direction) * eps
        if eta > 0:  # (a negative eta shrinks the direction term and adds no noise, as in diffusers)
            sample = sample + std * NOISE
        return StepPlan(x0=x0, sample=sample, aux=X0)  # aux: pred_original_sample, written when asked for

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Optional[torch.Generator] = None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True,
             return_pred_original_sample: bool = False):
        """diffusers' ``step`` (same positional order): one fused kernel pass.

        ``pred_original_sample`` (the clipped / thresholded x0) would cost one more latent write
        per step, so it is computed when first read (from this step's inputs), or written by the
        step itself with ``return_pred_original_sample=True``.
        """
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise, eta=eta,
                         use_clipped_model_output=use_clipped_model_output,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              eta: float = 0.0, use_clipped_model_output: bool = False, cfg_pp: bool = False,
              return_pred_original_sample: bool = False) -> SchedulerOutput:
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        # (diffusers' pipelines pass use_clipped_model_output=None: the flags keep their truth values)
        eta, use_clipped, cfg_pp = real_number("eta", eta), bool(use_clipped_model_output), bool(cfg_pp)
        if not math.isfinite(eta):
            raise ValueError(f"eta must be a finite number, got {eta}")
        if cfg_pp and use_clipped:
            raise ValueError("cfg_pp=True and use_clipped_model_output=True cannot be combined: CFG++ renoises "
                             "with the unguided model output")
        t = timestep_value(self, timestep)
        T = self.config.num_train_timesteps
        if not -T <= t < T:
            raise IndexError(f"timestep {t} is outside the training schedule [0, {T})")
        key = self._table.ensure(self._key(t, eta, use_clipped, cfg_pp),
                                 lambda: self._plan(t, eta, use_clipped, cfg_pp))
        self._raise_if_undefined(key)  # (before the noise draw: a refused step leaves the generator as it was)
        noise = None
        if eta > 0:
            noise = self._variance_noise(variance_noise, generator, model_output, model_output.dtype)
        cfg = self.config
        clip = cfg.clip_sample_range if cfg.clip_sample and not cfg.thresholding else None
        dynamic = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
        return self._fused_output(key, sample, model_output, want_x0=return_pred_original_sample, cond=cond,
                                  guidance_scale=guidance_scale, noise=noise, clip_value=clip, dynamic=dynamic)

    # ---------------------------------------------------------------- training-side helpers

    def _sqrt_alphas(self, timesteps: torch.Tensor, like: torch.Tensor):
        alphas_cumprod = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        timesteps = timesteps.to(like.device)
        a = alphas_cumprod[timesteps]
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
