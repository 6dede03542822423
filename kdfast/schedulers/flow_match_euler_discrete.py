"""Euler steps of a rectified-flow / flow-matching model (SD3, Flux, Wan, LTX-Video, ...), as
a drop-in for diffusers' ``FlowMatchEulerDiscreteScheduler``."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from ..ops.solver_step import NUM_COEFS, SOURCES, fused_step
from ._config import register_to_config
from ._helpers import FlowShifts, FlowTimesteps, SigmaSpacings, TerminalShift
from ._linear import MODEL, NOISE, X
from ._schedule import (beta_sigmas, check_choice, check_shift, custom_schedule, exponential_sigmas, karras_sigmas,
                        sigma_range)
from .base import CoefficientTable, FusedScheduler, SchedulerOutput, StepPlan
from .euler_discrete import _reject_integer_timestep, check_sigma_options


# Where the sample output's coefficient of each source sits in a coefficient row
_SAMPLE_FROM = {name: 2 + k for k, name in enumerate(SOURCES)}


class FlowMatchEulerDiscreteScheduler(FlowTimesteps, FlowShifts, TerminalShift, SigmaSpacings, FusedScheduler):
    """Drop-in for ``diffusers.FlowMatchEulerDiscreteScheduler``: same arguments, config,
    schedule (static and resolution-dependent shifts, ``shift_terminal``, Karras / exponential /
    beta sigmas, ``invert_sigmas``) and step.

    The model predicts the velocity ``v``; a step is ``x + (sigma_next - sigma) * v``, or with
    ``stochastic_sampling`` ``(1 - sigma_next) * (x - sigma * v) + sigma_next * noise``. Each
    ``step`` (and ``step_cfg``, which fuses classifier-free guidance) is one kernel pass with
    the coefficients computed in ``set_timesteps``; diffusers' upcast, update and downcast are
    three. With ``per_token_timesteps`` (a sigma per token, LTX-Video's conditioning) the step is
    one pass too, with a row of coefficients per token computed on the tokens' device.
    """

    _diffusers_name = "FlowMatchEulerDiscreteScheduler"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: Optional[float] = 0.5,
        max_shift: Optional[float] = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: Optional[float] = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        self._init_flow_schedule()

    def _init_flow_schedule(self) -> None:
        """The training schedule diffusers sets at construction, from this scheduler's config
        (flow-matching schedulers built on this one call it from their own constructors)."""
        cfg = self.config
        num_train_timesteps, shift = cfg.num_train_timesteps, check_shift(cfg.shift)
        check_sigma_options(cfg)
        check_choice("time_shift_type", cfg.time_shift_type, ("exponential", "linear"))
        if cfg.shift_terminal is not None and not 0 <= cfg.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1), got {cfg.shift_terminal}")
        timesteps = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps,
                                                 dtype=np.float32)[::-1].copy())
        sigmas = timesteps / num_train_timesteps
        if not cfg.use_dynamic_shifting:  # (a dynamic shift is applied per resolution in set_timesteps)
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self._shift = shift
        self.sigmas = sigmas
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self._host_sigmas = self.sigmas.tolist()
        self._set_timesteps(sigmas * num_train_timesteps)
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._table = None

    # ---------------------------------------------------------------- shift

    @property
    def shift(self) -> float:
        """The static shift ``set_timesteps`` applies (``set_shift`` changes it)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Set the static shift the next :meth:`set_timesteps` applies (the config keeps its own), as diffusers does."""
        self._shift = check_shift(shift)

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      sigmas: Optional[List[float]] = None, mu: Optional[float] = None,
                      timesteps: Optional[List[float]] = None) -> None:
        """Compute the sigmas and timesteps (as diffusers, value for value) and every step's
        kernel coefficients. ``mu`` is the resolution-dependent shift (needed with
        ``use_dynamic_shifting``); ``sigmas`` / ``timesteps`` give a custom schedule."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("`sigmas` and `timesteps` should have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                    timesteps is not None and len(timesteps) != num_inference_steps):
                raise ValueError("`sigmas` and `timesteps` should have the same length as num_inference_steps, "
                                 "if `num_inference_steps` is provided")
        elif sigmas is None and timesteps is None:
            raise ValueError("pass num_inference_steps, sigmas or timesteps")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = int(num_inference_steps)

        # The same numpy operations in the same precision as diffusers: the sigmas are equal,
        # bit for bit (float64 for a computed schedule, float32 for given sigmas).
        given_timesteps = timesteps is not None
        if given_timesteps:
            timesteps = custom_schedule("timesteps", timesteps, np.float32)
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(self._sigma_to_t(self.sigma_max), self._sigma_to_t(self.sigma_min), n)
            sigmas = timesteps / cfg.num_train_timesteps
        else:
            sigmas = custom_schedule("sigmas", sigmas, np.float32)
        if cfg.use_dynamic_shifting:
            sigmas = self.time_shift(mu, 1.0, sigmas)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if cfg.shift_terminal:
            sigmas = self.stretch_shift_to_terminal(sigmas)
        if cfg.use_karras_sigmas:
            sigmas = karras_sigmas(*sigma_range(cfg, sigmas), n)
        elif cfg.use_exponential_sigmas:
            sigmas = exponential_sigmas(*sigma_range(cfg, sigmas), n)
        elif cfg.use_beta_sigmas:
            sigmas = beta_sigmas(*sigma_range(cfg, sigmas), n)

        sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
        if not torch.isfinite(sigmas).all():
            raise ValueError("the schedule has non-finite sigmas (check shift, mu and the custom sigmas)")
        if given_timesteps:
            timesteps = torch.from_numpy(timesteps).to(torch.float32)
        else:
            timesteps = sigmas * cfg.num_train_timesteps
        if cfg.invert_sigmas:  # (Mochi) denoise on 1 - sigma, with timesteps made from it
            sigmas = 1.0 - sigmas
            timesteps = sigmas * cfg.num_train_timesteps
            sigmas = torch.cat([sigmas, torch.ones(1)])
        else:
            sigmas = torch.cat([sigmas, torch.zeros(1)])

        self._host_sigmas = sigmas.tolist()  # float32 values, exactly
        self.sigmas = sigmas.to(device)
        self._set_timesteps(timesteps.to(device), timesteps.tolist())
        self.num_inference_steps = n
        self._step_index = None
        self._begin_index = None
        self._table = self._shared_table(self._build_table)

    def _build_table(self) -> CoefficientTable:
        # one plan per sigma interval: the training schedule of __init__ has no final sigma,
        # so its last timestep has no step (diffusers' fails there too)
        return CoefficientTable({i: self._plan(i) for i in range(len(self._host_sigmas) - 1)})

    def _plan(self, i: int) -> StepPlan:
        sigma, sigma_next = self._host_sigmas[i], self._host_sigmas[i + 1]
        # The velocity is the kernel's MODEL source (the guided model output); x0 is not formed.
        if self.config.stochastic_sampling:
            # x0 = x - sigma * v;  x_next = (1 - sigma_next) * x0 + sigma_next * noise
            keep = 1.0 - sigma_next
            return StepPlan(x0=(0.0, 1.0), sample=keep * X - (keep * sigma) * MODEL + sigma_next * NOISE)
        # dt rounded to float32 as diffusers computes it (sigma_next - sigma on float32 tensors)
        dt = float(np.float32(sigma_next) - np.float32(sigma))
        return StepPlan(x0=(0.0, 1.0), sample=X + dt * MODEL)

    # ---------------------------------------------------------------- forward process

    def scale_noise(self, sample: torch.Tensor, timestep, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The forward process: ``sigma * noise + (1 - sigma) * sample`` at each timestep."""
        sigma = torch.tensor([self._host_sigmas[i] for i in self._noising_indices(timestep)], dtype=sample.dtype,
                             device=sample.device)
        sigma = sigma.reshape((-1,) + (1,) * (sample.dim() - 1))
        return sigma * noise + (1.0 - sigma) * sample

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, per_token_timesteps: Optional[torch.Tensor] = None,
             return_dict: bool = True, variance_noise: Optional[torch.Tensor] = None):
        """diffusers' ``step`` (same positional order; ``s_churn``, ``s_tmin``, ``s_tmax`` and
        ``s_noise`` are accepted and unused, as there). ``variance_noise`` replaces the draw of
        ``stochastic_sampling``."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise,
                         per_token_timesteps=per_token_timesteps)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              per_token_timesteps: Optional[torch.Tensor] = None, s_churn: float = 0.0, s_tmin: float = 0.0,
              s_tmax: float = float("inf"), s_noise: float = 1.0) -> SchedulerOutput:
        # (s_churn ... s_noise: taken by step_cfg as by step, and unused, as in diffusers' step)
        _reject_integer_timestep(timestep, type(self).__name__)
        if self._table is None:  # stepping on the training schedule, before any set_timesteps
            self._table = self._shared_table(self._build_table)
        self._check_step_inputs(model_output, sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= len(self._host_sigmas) - 1:
            raise IndexError(f"step {i} is past the end of the {len(self._host_timesteps)}-step schedule; "
                             "call set_timesteps again")
        if per_token_timesteps is not None:
            prev = self._per_token_step(model_output, sample, per_token_timesteps, generator, variance_noise, cond,
                                        guidance_scale)
        else:
            noise = None
            if self.config.stochastic_sampling:
                noise = self._noise(variance_noise, generator, sample, torch.float32)
            prev = self._fused(i, sample, model_output, cond=cond, guidance_scale=guidance_scale,
                               noise=noise).sample
            if prev.dtype != model_output.dtype:
                prev = prev.to(model_output.dtype)
        self._step_index += 1
        return SchedulerOutput(prev)

    def _per_token_step(self, model_output: torch.Tensor, sample: torch.Tensor, per_token_timesteps: torch.Tensor,
                        generator, variance_noise, cond: Optional[torch.Tensor] = None,
                        guidance_scale: float = 1.0) -> torch.Tensor:
        """diffusers' per-token step in one fused pass: each token moves from its own sigma to the
        largest schedule sigma below it (its Euler update adds ``(sigma - sigma_lower) * v``,
        diffusers' sign convention for this path). The tokens' sigmas are computed on their device
        with diffusers' operations (token-sized, no host read), written as one coefficient row per
        token, and the latent, viewed as ``[tokens, channels]``, is stepped with a row each. The
        result is float32, as in diffusers."""
        if not isinstance(per_token_timesteps, torch.Tensor) or not per_token_timesteps.is_floating_point():
            raise TypeError(f"per_token_timesteps must be a floating tensor of timesteps, one per token, got "
                            f"{getattr(per_token_timesteps, 'dtype', type(per_token_timesteps).__name__)}")
        tokens = sample.shape[:-1]
        if sample.dim() < 2 or per_token_timesteps.dim() > 2 or per_token_timesteps.device != sample.device:
            raise ValueError(f"per_token_timesteps must hold one timestep per token (sample {tuple(sample.shape)}: "
                             f"tokens {tuple(tokens)}, channels last; at most 2-D, as diffusers takes it) on "
                             f"{sample.device}, got shape {tuple(per_token_timesteps.shape)} on "
                             f"{per_token_timesteps.device}")
        try:
            per_token_timesteps = per_token_timesteps.expand(tokens)
        except RuntimeError:
            raise ValueError(f"per_token_timesteps of shape {tuple(per_token_timesteps.shape)} does not match the "
                             f"sample's tokens {tuple(tokens)} (sample {tuple(sample.shape)}, channels last)") from None
        sample = sample.to(torch.float32)
        per_token_sigmas = per_token_timesteps / self.config.num_train_timesteps
        # diffusers' lower sigma, max((sigmas < sigma_token - 1e-6) * sigmas), without its
        # [schedule, tokens] temporary: the largest schedule sigma below the threshold (0 if none)
        below = (per_token_sigmas - 1e-6).reshape(-1).to(torch.float32)
        ascending = torch.sort(self.sigmas.to(device=below.device, dtype=torch.float32)).values
        count = torch.searchsorted(ascending, below)  # schedule sigmas < the threshold
        lower = torch.where(count > 0, ascending[(count - 1).clamp(min=0)], 0.0).clamp(min=0.0)
        current = per_token_sigmas.reshape(-1).to(torch.float32)
        noise = None
        rows = torch.zeros(current.numel(), NUM_COEFS, dtype=torch.float32, device=sample.device)
        if self.config.stochastic_sampling:
            # x0 = x - sigma * v, then (1 - sigma_lower) * x0 + sigma_lower * noise
            noise = self._noise(variance_noise, generator, sample, torch.float32)
            rows[:, 0] = 1.0  # x0 from x
            rows[:, 1] = -current  # x0 from the (guided) model output
            rows[:, _SAMPLE_FROM["x0"]] = 1.0 - lower
            rows[:, _SAMPLE_FROM["noise"]] = lower
        else:
            rows[:, _SAMPLE_FROM["x"]] = 1.0
            rows[:, _SAMPLE_FROM["model"]] = current - lower
        channels = sample.shape[-1]

        def flat(t):
            return None if t is None else t.reshape(-1, channels)

        out = fused_step(flat(sample), flat(model_output), rows, flat(cond), guidance_scale, (), None, flat(noise),
                         None, None, False, False, None).sample
        return out.reshape(sample.shape)
