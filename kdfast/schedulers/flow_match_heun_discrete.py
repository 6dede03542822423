"""Heun's second-order method on the flow ODE of a rectified-flow / flow-matching model, as a
drop-in for diffusers' ``FlowMatchHeunDiscreteScheduler``."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from .._checks import check_count
from ._config import register_to_config
from ._helpers import FlowTimesteps
from ._linear import AUX, H0, MODEL, NOISE, X
from ._schedule import check_shift
from .base import FusedScheduler, GrowingTable, SchedulerOutput, StepPlan, reject_unknown_step_arguments
from .euler_discrete import _as_float32, _reject_integer_timestep
from .flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

_HALF = (torch.float16, torch.bfloat16)


class FlowMatchHeunDiscreteScheduler(FlowTimesteps, FusedScheduler):
    """Drop-in for ``diffusers.FlowMatchHeunDiscreteScheduler``: same arguments, config, schedule
    and step (with its churn options ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``).

    The model predicts the velocity ``v``. As in diffusers, the schedule repeats every
    timestep after the first and ``step`` alternates between the Euler predictor and the
    trapezoidal corrector (``order = 2``). The predictor is one fused pass that also writes its
    derivative (``prev_derivative``, kept in float32 for half-precision latents, as diffusers
    keeps it); the corrector is one fused pass reading that derivative (history) and the
    predictor's input sample (aux), which is kept by reference, not copied. With churn the
    predictor's sample is ``x + c * noise``: it is not written either, the corrector reads the
    predictor's noise again, so the churned sample keeps float32 precision with half-precision
    latents, as diffusers' float32 copy does (``scheduler.sample`` computes it when read).
    ``variance_noise`` replaces the churn draw. A model output wider than the latents (float32
    on float16) gives a result of its own precision, as in diffusers.
    """

    _diffusers_name = "FlowMatchHeunDiscreteScheduler"
    order = 2

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        check_shift(shift)
        check_count("num_train_timesteps", num_train_timesteps, 1)
        # The schedule is FlowMatchEuler's for this config (the same numpy operations as
        # diffusers' Heun, bit for bit); it computes it, this class interleaves it.
        self._flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
        self.sigmas = self._flow.sigmas
        self._host_sigmas = self._flow._host_sigmas
        self.sigma_min, self.sigma_max = self._flow.sigma_min, self._flow.sigma_max
        self._set_timesteps(self._flow.timesteps, self._flow._host_timesteps)
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._table = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.prev_derivative: Optional[torch.Tensor] = None
        self.dt: Optional[float] = None
        # the predictor's input sample, its churn noise (or None) and the noise's coefficient
        self._stage_input: Optional[Tuple[torch.Tensor, Optional[torch.Tensor], float]] = None

    @property
    def sample(self) -> Optional[torch.Tensor]:
        """The predictor's (churned) sample that the corrector starts from, None in the first
        stage: the predictor's input in float32 without churn (a float32 input itself, as in
        diffusers), else ``x + c * noise`` in float32 (computed now: the step keeps ``x`` and
        the noise, not their sum)."""
        if self._stage_input is None:
            return None
        x, noise, c = self._stage_input
        if noise is None:
            return x
        return (x if x.dtype in (torch.float32, torch.float64) else x.float()) + c * noise

    @sample.setter
    def sample(self, value: Optional[torch.Tensor]) -> None:
        self._stage_input = None if value is None else (value, None, 0.0)

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next ``step`` is a predictor (Euler) stage."""
        return self.dt is None

    # ---------------------------------------------------------------- schedule

    def _staged_schedule(self) -> bool:
        # the training schedule, as constructed, is plain sigmas (diffusers repeats them for the
        # two stages only in set_timesteps)
        return self.num_inference_steps is not None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Compute the (doubled) timesteps and sigmas, value for value as diffusers, and both
        stages' kernel coefficients."""
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {n!r}")
        self._flow.set_timesteps(int(n))
        sigmas, timesteps = self._flow.sigmas, self._flow.timesteps  # float32 CPU, sigmas ending with 0
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        self._host_sigmas = sigmas.tolist()  # float32 values, exactly
        self.sigmas = sigmas.to(device)
        self._set_timesteps(timesteps.to(device), timesteps.tolist())
        self.num_inference_steps = int(n)
        self._step_index = None
        self._begin_index = None
        self._reset_state()
        self._table = self._shared_table(self._build_table)

    def _churn(self, k: int, gamma: float = 0.0, s_noise: float = 1.0) -> Tuple[float, float, float]:
        """``(sigma_hat, dt, c)`` of the predictor at index ``k``: the raised sigma, ``sigma_next -
        sigma_hat`` (the corrector reuses it) and the coefficient of the churn noise, in float32
        as diffusers computes them."""
        sigma = self._host_sigmas[k]
        sigma_hat = _as_float32(sigma * _as_float32(gamma + 1.0))
        dt = _as_float32(self._host_sigmas[k + 1] - sigma_hat)
        c = 0.0
        if gamma > 0:
            c = s_noise * math.sqrt(_as_float32(_as_float32(sigma_hat * sigma_hat) - _as_float32(sigma * sigma)))
        return sigma_hat, dt, c

    def _build_table(self) -> GrowingTable:
        # Predictors at every index (a schedule entered at an odd index, too); correctors by the
        # dt their predictor stored: the update reads nothing else. Churn adds its own rows.
        plans = {}
        for k in range(len(self._host_sigmas) - 1):
            plans[(1, k)] = self._plan_predictor(k)
            dt = self._churn(k)[1]
            plans[(2, dt, 0.0)] = self._plan_corrector(dt, 0.0)
        return GrowingTable(plans)

    def _plan_predictor(self, k: int, gamma: float = 0.0, s_noise: float = 1.0) -> StepPlan:
        sigma, sigma_next = self._host_sigmas[k], self._host_sigmas[k + 1]
        sigma_hat, dt, c = self._churn(k, gamma, s_noise)
        # x_hat = x + c * noise;  x0 = x_hat - sigma * v;  d = (x_hat - x0) / sigma_hat = (sigma / sigma_hat) * v;
        # x_next = x_hat + dt * d
        d = (sigma / sigma_hat) * MODEL
        # the corrector needs d, except after the last step (sigma_next = 0)
        return StepPlan(x0=(0.0, 1.0), sample=X + c * NOISE + dt * d, history=d if sigma_next != 0 else None)

    @staticmethod
    def _plan_corrector(dt: float, c: float) -> StepPlan:
        # x_next = x_hat + dt * (d_pred + d) / 2, x_hat = x_pred + c * noise_pred, and
        # d = (x - (x - sigma_next * v)) / sigma_next = v: the corrector's own sample (churned or
        # not) cancels out.
        return StepPlan(x0=(0.0, 1.0), sample=AUX + c * NOISE + (0.5 * dt) * (H0 + MODEL))

    # ---------------------------------------------------------------- forward process

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """The forward process ``sigma * noise + (1 - sigma) * sample`` at the current step (set
        from ``timestep`` when the loop has not started), as diffusers' Heun computes it."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sigma * noise + (1.0 - sigma) * sample

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None):
        """diffusers' ``step`` (same positional order): one predictor or corrector stage.
        ``variance_noise`` replaces the churn draw."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise, s_churn=s_churn,
                         s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
              **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        _reject_integer_timestep(timestep, type(self).__name__)
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        if sample.dtype != model_output.dtype and torch.promote_types(sample.dtype, model_output.dtype) \
                is model_output.dtype:
            # diffusers computes in float32 and returns the model output's dtype: a model output
            # wider than the latents (float32 on float16) gets a result of its own precision
            sample = sample.to(model_output.dtype)
        if self._step_index is None:
            self._init_step_index(timestep)
        k, hs = self._step_index, self._host_sigmas
        if k >= len(hs) - 1:
            raise IndexError(f"step {k} is past the end of the {len(hs) - 1}-stage schedule; "
                             "call set_timesteps again")
        first = self.dt is None
        sigma = hs[k] if first else hs[k - 1]
        gamma = 0.0
        if s_churn and _as_float32(s_tmin) <= sigma <= _as_float32(s_tmax):
            gamma = min(s_churn / (len(hs) - 1), 2**0.5 - 1)
            if gamma <= -1:
                raise ValueError(f"s_churn={s_churn} makes sigma_hat = sigma * (1 + s_churn / {len(hs) - 1}) <= 0")
        # diffusers draws the churn noise in both stages (the corrector's cancels out): the
        # generator advances as there
        noise = self._noise(variance_noise, generator, model_output, model_output.dtype) if gamma > 0 else None
        # (diffusers keeps the derivative in float32 whatever the latents' dtype)
        history_dtype = torch.float32 if sample.dtype in _HALF else None
        if first:
            key = (1, k)
            if gamma != 0.0:  # (a negative s_churn scales sigma without adding noise, as in diffusers)
                s_noise = float(s_noise)
                key = self._table.ensure((1, k, gamma, s_noise), lambda: self._plan_predictor(k, gamma, s_noise))
            result = self._fused(key, sample, model_output, cond=cond, guidance_scale=guidance_scale, noise=noise,
                                 write_history=self._table.plan(key).history is not None,
                                 history_dtype=history_dtype)
            _, self.dt, c = self._churn(k, gamma, s_noise)
            self.prev_derivative = result.history
            # diffusers keeps the float32 sample it made (the caller's float32 tensor itself, a
            # float32 copy of a half-precision one): an in-place edit of a half-precision input
            # after this stage does not reach the corrector
            self._stage_input = (sample if sample.dtype in (torch.float32, torch.float64) else sample.float(),
                                 noise, c)
        else:
            state = self._stage_input
            if self.prev_derivative is None or state is None:
                raise ValueError("the second Heun stage needs the first stage's state; call step in order")
            x, stage_noise, c = state
            if x.shape != sample.shape:
                raise ValueError(f"sample shape {tuple(sample.shape)} does not match the first stage's "
                                 f"{tuple(x.shape)}")
            dt = self.dt
            key = self._table.ensure((2, dt, c), lambda: self._plan_corrector(dt, c))
            result = self._fused(key, sample, model_output, cond=cond, guidance_scale=guidance_scale,
                                 history=[self.prev_derivative], aux=x, noise=stage_noise)
            self._reset_state()
        prev = result.sample
        if prev.dtype != model_output.dtype:
            prev = prev.to(model_output.dtype)
        self._step_index += 1
        return SchedulerOutput(prev)
