"""Euler (Karras et al. 2022, Algorithm 2) with optional churn, as a diffusers drop-in."""
from __future__ import annotations

import importlib
import math
from typing import List, Optional, Union

import numpy as np
import torch

from ._config import register_to_config
from ._helpers import LogSigmaTimesteps, SigmaSpacings
from ._linear import NOISE, X, X0
from ._schedule import (BETA_SCHEDULES, TIMESTEP_SPACINGS, beta_sigmas, check_choice, exponential_sigmas,
                        custom_schedule, karras_sigmas, noise_schedule, sigma_range, sigma_to_t)
from .base import FusedScheduler, GrowingTable, SchedulerOutput, StepPlan

KARRAS_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                     "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                     "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
                     "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                     "DPMSolverSDEScheduler", "EDMEulerScheduler")


def _as_float32(value: float) -> float:
    """``value`` rounded to float32, as torch rounds a Python scalar compared with a float32 tensor."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _reject_integer_timestep(timestep, name: str) -> None:
    if isinstance(timestep, bool):
        return
    if isinstance(timestep, (int, np.integer)) or (isinstance(timestep, torch.Tensor)
                                                    and timestep.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `{name}.step()` "
                         "is not supported. Make sure to pass one of the `scheduler.timesteps` as a timestep.")


class _SigmaScheduler(SigmaSpacings, LogSigmaTimesteps, FusedScheduler):
    """What the sigma-parameterised (k-diffusion style) schedulers share: ``sigmas`` on the CPU
    in float32 as diffusers keeps them, input scaling, ``init_noise_sigma`` and ``add_noise``."""

    _compatibles = KARRAS_SCHEDULERS

    def _set_sigmas(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas.to("cpu", torch.float32)
        self._host_sigmas = self.sigmas.tolist()  # float32 values, exactly
        # diffusers divides by (sigma**2 + 1) ** 0.5 computed in float32; dividing by the same
        # float32 number gives bit-identical inputs.
        self._input_div = ((self.sigmas**2 + 1) ** 0.5).tolist()

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """The noise scale of the first step: a 0-d float32 CPU tensor, as diffusers returns it
        (callers use ``.cpu()`` / ``.to()`` on it; it multiplies latents on any device)."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def _require_table(self) -> None:
        """The coefficients of the schedule in use: diffusers' Euler schedulers also step on the
        training schedule that ``__init__`` sets up, before any ``set_timesteps``; its table is
        made on that first step."""
        if self._table is None:
            self._table = self._shared_table(self._build_table)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``sample / sqrt(sigma**2 + 1)``, as the Euler-type models expect their input."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return sample / self._input_div[self._step_index]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigmas[self._noising_indices(timesteps)].flatten()
        while sigma.dim() < original_samples.dim():
            sigma = sigma.unsqueeze(-1)
        return original_samples + noise * sigma

    def _index_for_step(self, timestep) -> int:
        if self._step_index is None:
            self._init_step_index(timestep)
        i, n = self._step_index, len(self._host_timesteps)
        if i >= n:
            raise IndexError(f"step {i} is past the end of the {n}-step schedule; call set_timesteps again")
        return i


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """Training sigmas in timestep order, float32 as diffusers computes them."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int) -> np.ndarray:
    """The float32 timesteps of diffusers' Euler-type schedulers for each ``timestep_spacing``."""
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = num_train_timesteps // n
        timesteps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
        return timesteps + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / n
        return np.arange(num_train_timesteps, 0, -ratio).round().copy().astype(np.float32) - 1
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    raise AssertionError


def converted_sigmas(config, sigmas: np.ndarray, log_sigmas: np.ndarray, n: int, karras_reads_config: bool = True):
    """Karras / exponential / beta sigma spacing (None when the config asks for none) between the
    config's ``sigma_min`` / ``sigma_max``, else ``sigmas``' ends; ``karras_reads_config=False``:
    Karras sigmas between ``sigmas``' ends whatever the config says (diffusers' LMS and DPM-SDE)."""
    if config.use_karras_sigmas:
        ends = sigma_range(config, sigmas) if karras_reads_config else (float(sigmas[-1]), float(sigmas[0]))
        out = karras_sigmas(*ends, n)
    elif config.use_exponential_sigmas:
        out = exponential_sigmas(*sigma_range(config, sigmas), n)
    elif config.use_beta_sigmas:
        out = beta_sigmas(*sigma_range(config, sigmas), n)
    else:
        return None
    return out, np.array([sigma_to_t(s, log_sigmas) for s in out])


def check_sigma_options(config) -> None:
    for name in ("use_beta_sigmas", "use_exponential_sigmas", "use_karras_sigmas"):
        # bool("false") is True: a config's string would pick that schedule (None and 0 / 1, read
        # as diffusers reads them, pass)
        if isinstance(config[name], (str, bytes)):
            raise ValueError(f"{name} must be True or False, got {config[name]!r}")
    if sum([bool(config.use_beta_sigmas), bool(config.use_exponential_sigmas), bool(config.use_karras_sigmas)]) > 1:
        raise ValueError("Only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used.")
    if config.use_beta_sigmas:
        try:
            importlib.import_module("scipy.stats")  # only its presence is checked here
        except ImportError as exc:  # pragma: no cover - scipy is a test dependency
            raise ImportError("use_beta_sigmas needs scipy: pip install scipy") from exc


class EulerDiscreteScheduler(_SigmaScheduler):
    """Drop-in for ``diffusers.EulerDiscreteScheduler``: same arguments and config.

    Each ``step`` is one fused kernel pass. With churn (``s_churn > 0`` inside
    ``[s_tmin, s_tmax]``), the noise diffusers adds to the sample before converting the model
    output is a kernel source, and the x0 conversion and update are adjusted for it, so the
    step stays one pass.
    """

    _diffusers_name = "EulerDiscreteScheduler"
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
        interpolation_type: str = "linear",
        use_karras_sigmas: Optional[bool] = False,
        use_exponential_sigmas: Optional[bool] = False,
        use_beta_sigmas: Optional[bool] = False,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        check_sigma_options(self.config)
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction", "sample", "original_sample"))
        check_choice("interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("timestep_type", timestep_type, ("discrete", "continuous"))
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)

        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr,
            floor_terminal=True)
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                 dtype=float)[::-1].copy()).to(torch.float32)
        self._set_sigmas(torch.cat([sigmas, torch.zeros(1)]))
        self._set_timesteps(self._continuous_timesteps(self.sigmas) if self._continuous else timesteps)
        self.num_inference_steps = None
        self.is_scale_input_called = False
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._step_index = None
        self._begin_index = None
        self._table = None

    @property
    def _continuous(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    @staticmethod
    def _continuous_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
        # element by element in float32, as diffusers builds them (bit-identical timesteps)
        return torch.tensor([(0.25 * s.log()).item() for s in sigmas[:-1]], dtype=torch.float32)

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[List[int]] = None, sigmas: Optional[List[float]] = None) -> None:
        """Compute the timesteps and sigmas, and every step's kernel coefficients."""
        cfg = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps` or `sigmas`.")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps` or `sigmas`.")
        if num_inference_steps is not None and int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas):
            raise ValueError("Cannot set `timesteps` with karras, exponential or beta sigmas.")
        if timesteps is not None and self._continuous:
            raise ValueError("Cannot set `timesteps` with timestep_type='continuous' and "
                             "prediction_type='v_prediction'.")
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        n = num_inference_steps

        train = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train)
        if sigmas is not None:
            sigmas = custom_schedule("sigmas", sigmas, np.float32, sigmas=True)
            if not (sigmas[:-1] > 0).all():  # (diffusers divides by it: NaN)
                raise ValueError(f"sigmas must be > 0 before the last (a step from sigma 0 is undefined), got "
                                 f"{sigmas.tolist()}")
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas[:-1]])
        else:
            if timesteps is not None:
                timesteps = custom_schedule("timesteps", timesteps, np.float32)
            else:
                timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
            if cfg.interpolation_type == "linear":
                sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
            else:  # log_linear: n + 1 sigmas, as diffusers makes them (the loop stops at the smallest)
                sigmas = torch.linspace(np.log(train[-1]), np.log(train[0]), n + 1).exp().numpy()
            converted = converted_sigmas(cfg, sigmas, log_sigmas, n)
            if converted is not None:
                sigmas, timesteps = converted
            if cfg.final_sigmas_type == "sigma_min":
                sigma_last = float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
            else:
                sigma_last = 0.0
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

        self._set_sigmas(torch.from_numpy(sigmas))
        if self._continuous:
            host = self._continuous_timesteps(self.sigmas)
        else:
            host = torch.from_numpy(timesteps.astype(np.float32))
        self._set_timesteps(host.to(device=device), host.tolist())
        self.num_inference_steps = n
        self._step_index = None
        self._begin_index = None
        self._table = self._shared_table(self._build_table)

    def _build_table(self) -> GrowingTable:
        return GrowingTable({i: self._plan(i) for i in range(len(self._host_timesteps))})

    def _plan(self, i: int, gamma: float = 0.0, s_noise: float = 1.0) -> StepPlan:
        sigma, sigma_next = self._host_sigmas[i], self._host_sigmas[i + 1]
        sigma_hat = sigma * (gamma + 1.0)
        pt = self.config.prediction_type
        if pt == "epsilon":
            a, b = 1.0, -sigma_hat
        elif pt == "v_prediction":  # diffusers uses sigma here, not sigma_hat
            a, b = 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
        else:
            a, b = 0.0, 1.0
        # x_hat = x + c * noise;  x0 = a * x_hat + b * m;  d = (x_hat - x0) / sigma_hat
        # x_next = x_hat + d * (sigma_next - sigma_hat) = r * x_hat + (1 - r) * x0
        r = sigma_next / sigma_hat
        sample, x0 = r * X + (1.0 - r) * X0, X0
        if gamma > 0:
            c = s_noise * math.sqrt(sigma_hat * sigma_hat - sigma * sigma)
            sample = sample + (c * (r + (1.0 - r) * a)) * NOISE
            x0 = x0 + (a * c) * NOISE
        # aux output: pred_original_sample, written only when asked for
        return StepPlan(x0=(a, b), sample=sample, aux=x0)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """diffusers' ``EulerDiscreteScheduler.get_velocity``, value for value: ``sqrt(a) * noise -
        sqrt(1 - a) * sample`` with ``a = alphas_cumprod[i]`` and ``i`` the position of each
        timestep in the inference schedule (diffusers indexes the training table with it)."""
        _reject_integer_timestep(timesteps, type(self).__name__)
        idx = [self.index_for_timestep(t) for t in torch.as_tensor(timesteps).reshape(-1).cpu()]
        a = self.alphas_cumprod.to(sample)[idx]
        shape = (-1,) + (1,) * (sample.dim() - 1)
        return a.sqrt().reshape(shape) * noise - (1 - a).sqrt().reshape(shape) * sample

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None, return_pred_original_sample: bool = False):
        """diffusers' ``step`` (same positional order); ``variance_noise`` replaces the churn draw.

        ``pred_original_sample`` would cost one more latent write per step, so it is computed
        when first read (from this step's inputs), or written by the step itself with
        ``return_pred_original_sample=True``.
        """
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise, s_churn=s_churn,
                         s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
              s_noise: float = 1.0, return_pred_original_sample: bool = False) -> SchedulerOutput:
        _reject_integer_timestep(timestep, type(self).__name__)
        self._require_table()
        self._check_step_inputs(model_output, sample)
        i = self._index_for_step(timestep)
        sigma = self._host_sigmas[i]
        gamma = 0.0
        if s_churn and _as_float32(s_tmin) <= sigma <= _as_float32(s_tmax):
            gamma = min(s_churn / (len(self._host_sigmas) - 1), 2**0.5 - 1)
        noise, key = None, i
        if gamma != 0.0:  # (a negative s_churn scales sigma without adding noise, as in diffusers)
            key = self._table.ensure((i, gamma, float(s_noise)), lambda: self._plan(i, gamma, float(s_noise)))
        if gamma > 0:
            noise = self._noise(variance_noise, generator, model_output, model_output.dtype)
        out = self._fused_output(key, sample, model_output, want_x0=return_pred_original_sample,
                                 prev_dtype=model_output.dtype, cond=cond, guidance_scale=guidance_scale, noise=noise)
        self._step_index += 1
        return out
