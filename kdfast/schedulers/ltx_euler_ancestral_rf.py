"""Euler-ancestral steps of a rectified-flow model (LTX-Video's ComfyUI sampler
``sample_euler_ancestral_RF``), as a drop-in for diffusers' ``LTXEulerAncestralRFScheduler``."""
from __future__ import annotations

import logging
import math
import numbers
from typing import List, Optional, Union

import torch

from .._checks import check_count
from ._config import register_to_config
from ._linear import MODEL, NOISE, X
from .base import CoefficientTable, FusedScheduler, SchedulerOutput, StepPlan, reject_unknown_step_arguments
from .euler_discrete import _reject_integer_timestep
from .flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

logger = logging.getLogger(__name__)

# diffusers' constants: a next sigma below this ends the loop with x0; the guard in alpha_down's divisions
_FINAL_SIGMA = 1e-8
_GUARD = 1e-12


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


class LTXEulerAncestralRFScheduler(FusedScheduler):
    """Drop-in for ``diffusers.LTXEulerAncestralRFScheduler``: same arguments (``num_train_timesteps``,
    ``eta``, ``s_noise``), config, schedules and step.

    The model predicts the velocity ``v`` (CONST parameterisation), so ``x0 = x - sigma * v``.
    A step goes down to ``sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)`` by
    ``x + (sigma_down / sigma - 1) * sigma * v``, rescales by ``(1 - sigma_next) / (1 - sigma_down)``
    and adds ``s_noise * sqrt(sigma_next**2 - sigma_down**2 (1 - sigma_next)**2 / (1 - sigma_down)**2)``
    of fresh noise (the rescale and the noise only when ``eta > 0`` and ``s_noise > 0``, as in
    diffusers); a step into ``sigma_next < 1e-8`` returns x0. Each ``step`` (and ``step_cfg``,
    which fuses classifier-free guidance) is one kernel pass with coefficients planned in
    ``set_timesteps``: diffusers' float32 scalar arithmetic, done once on the host, then
    combined in float64; diffusers' step is ~10 tensor passes and reads ``sigma_next`` back to
    the host every step. The noise is drawn as diffusers draws it (float32, ``generator`` or a
    list of them), whenever diffusers draws, even where its coefficient is zero;
    ``variance_noise`` replaces the draw.

    Schedules, as diffusers makes them: ``set_timesteps(num_inference_steps, mu=...)`` takes the
    sigmas of :class:`FlowMatchEulerDiscreteScheduler` built from this scheduler's config (a
    config taken from a flow-matching scheduler keeps its ``shift``, dynamic shifting, Karras /
    exponential / beta sigmas ...); ``set_timesteps(sigmas=[...])`` (or ``timesteps=``, read as
    sigmas) is a ComfyUI-style schedule that ends with its terminal sigma, with timesteps
    ``sigmas * num_train_timesteps`` (the terminal one included). A step past the last sigma
    returns ``sample`` itself, without a kernel call, as diffusers' does.

    Where diffusers' step gives NaN or inf (a step from ``sigma = 0`` to a nonzero sigma divides
    by zero: Mochi-style inverted flow sigmas start there), this one raises a ValueError naming the
    step; non-finite sigmas, ``eta`` or ``s_noise`` are refused when given. ``prev_sample`` keeps
    ``sample``'s dtype (float32 math inside, one rounding at the end, as diffusers' upcast).
    """

    _diffusers_name = "LTXEulerAncestralRFScheduler"
    _steps_in_the_wider_dtype = False  # (diffusers casts its result to the sample's dtype)
    _compatibles = ("FlowMatchEulerDiscreteScheduler",)
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, eta: float = 1.0, s_noise: float = 1.0):
        for name, value in (("eta", eta), ("s_noise", s_noise)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        check_count("num_train_timesteps", num_train_timesteps, 1)
        # No schedule until set_timesteps (diffusers' sigmas and timesteps are None until then)
        self.num_inference_steps: Optional[int] = None
        self.sigmas: Optional[torch.Tensor] = None
        self._timesteps = None
        self._host_timesteps: List[float] = []
        self._timestep_span = None
        self._timesteps_version = None
        self._host_sigmas: List[float] = []
        self._draws: List[bool] = []
        self._step_index = None
        self._begin_index = None
        self._table = None

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      sigmas: Optional[Union[List[float], torch.Tensor]] = None,
                      timesteps: Optional[Union[List[float], torch.Tensor]] = None,
                      mu: Optional[float] = None, **kwargs) -> None:
        """Set the schedule (as diffusers, value for value) and plan every step's kernel coefficients.

        With neither ``sigmas`` nor ``timesteps``: the flow-matching sigmas of
        ``num_inference_steps`` steps (``mu``: the resolution-dependent shift, needed when the
        config has ``use_dynamic_shifting``). Else ``sigmas`` (a list or a 1-D tensor, ``timesteps``
        standing in for it) is the schedule, terminal sigma included: ``len(sigmas) - 1`` steps.
        Other keyword arguments are accepted and ignored, as in diffusers."""
        if sigmas is None and timesteps is None:
            if num_inference_steps is None:
                raise ValueError("LTXEulerAncestralRFScheduler.set_timesteps requires either explicit "
                                 "`sigmas`/`timesteps` or a `num_inference_steps` value.")
            # diffusers builds a FlowMatchEulerDiscreteScheduler from this config; so does this
            flow = FlowMatchEulerDiscreteScheduler.from_config(self.config)
            flow.set_timesteps(num_inference_steps=num_inference_steps, device=device, mu=mu)
            self.num_inference_steps = flow.num_inference_steps
            self.sigmas = flow.sigmas.to(device=device)
            self._host_sigmas = list(flow._host_sigmas)
            self._set_timesteps(flow.timesteps.to(device=device), flow._host_timesteps)
        else:
            self._set_explicit(num_inference_steps, device, timesteps if sigmas is None else sigmas,
                               "sigmas" if sigmas is not None else "timesteps")
        cfg = self.config
        noisy = cfg.eta > 0.0 and cfg.s_noise > 0.0
        self._draws = [noisy and abs(s) >= _FINAL_SIGMA for s in self._host_sigmas[1:]]
        self._step_index = None
        self._begin_index = None
        self._table = self._shared_table(self._build_table) if len(self._host_sigmas) > 1 else None

    def _set_explicit(self, num_inference_steps, device, sigmas, name: str) -> None:
        if isinstance(sigmas, list):
            try:
                sigmas_tensor = torch.tensor(sigmas, dtype=torch.float32)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"`{name}` must be a list of numbers: {exc}") from None
        elif isinstance(sigmas, torch.Tensor):
            sigmas_tensor = sigmas.to(dtype=torch.float32)
        else:
            raise TypeError(f"`{name}` must be a list or torch.Tensor, got {type(sigmas)}.")
        if sigmas_tensor.ndim != 1:
            raise ValueError(f"`{name}` must be a 1D tensor, got shape {tuple(sigmas_tensor.shape)}.")
        host = sigmas_tensor.tolist()  # once, here: the step reads the host copy
        if not host:
            raise ValueError(f"`{name}` must hold at least one sigma (the terminal one), got none")
        if not all(math.isfinite(s) for s in host):
            raise ValueError(f"`{name}` must be finite, got {host}")
        if abs(host[-1]) > 1e-6:
            logger.warning("The last sigma in the schedule is not zero (%.6f). For best compatibility with ComfyUI's "
                           "RF sampler, the terminal sigma should be 0.0.", host[-1])
        if device is not None:
            sigmas_tensor = sigmas_tensor.to(device)
        # sigmas stay as given (in [0, 1]); the network sees them scaled to training timesteps
        timesteps = sigmas_tensor * float(self.config.num_train_timesteps)
        if num_inference_steps is not None and num_inference_steps != len(host) - 1:
            logger.warning("Provided `num_inference_steps=%d` does not match `len(sigmas)-1=%d`. Overriding "
                           "`num_inference_steps` with `len(sigmas)-1`.", num_inference_steps, len(host) - 1)
        self.num_inference_steps = len(host) - 1
        self.sigmas = sigmas_tensor
        self._host_sigmas = host
        self._set_timesteps(timesteps)

    def _build_table(self) -> CoefficientTable:
        plans = {}
        for i in range(len(self._host_sigmas) - 1):
            plan = self._plan(i)
            if plan is not None:  # (a step diffusers turns into NaN / inf raises when taken)
                plans[i] = plan
        return CoefficientTable(plans) if plans else None

    def _coefficients(self, i: int):
        """``(a, b, c)`` with ``x_next = a * x + b * v + c * noise`` for step ``i``: the float32
        numbers diffusers' step computes from ``sigmas[i]`` and ``sigmas[i + 1]``, combined in
        float64."""
        sigma, sigma_next = self._host_sigmas[i], self._host_sigmas[i + 1]
        if abs(sigma_next) < _FINAL_SIGMA:  # the last step: x0 = x - sigma * v
            return 1.0, -sigma, 0.0
        cfg = self.config
        eta, s_noise = float(cfg.eta), float(cfg.s_noise)
        s, s_next = _f32(sigma), _f32(sigma_next)
        sigma_down = s_next * (1.0 + (s_next / s - 1.0) * eta)
        alpha_next, alpha_down = 1.0 - s_next, 1.0 - sigma_down
        ratio = sigma_down / s
        # x = ratio * x + (1 - ratio) * (x - sigma * v)
        keep, to_x0 = ratio.item(), (1.0 - ratio).item()
        scale, noise = 1.0, 0.0
        if eta > 0.0 and s_noise > 0.0:
            renoise = (s_next**2 - sigma_down**2 * alpha_next**2 / (alpha_down**2 + _GUARD)).clamp(min=0.0).sqrt()
            scale = (alpha_next / (alpha_down + _GUARD)).item()
            noise = renoise.item() * s_noise
        return scale * (keep + to_x0), -scale * to_x0 * sigma, noise

    def _plan(self, i: int) -> Optional[StepPlan]:
        a, b, c = self._coefficients(i)
        if not all(math.isfinite(v) for v in (a, b, c)):
            return None
        # x0 = x - sigma * v (the kernel forms it only for a lazily read x0; the update reads x and v)
        return StepPlan(x0=(1.0, -self._host_sigmas[i]), sample=a * X + b * MODEL + c * NOISE)

    # ---------------------------------------------------------------- step index

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """Index of ``timestep`` in the schedule (a repeated value: its second match), found
        without a host sync for an element of ``timesteps``; a ValueError for a value the
        schedule does not hold, as in diffusers."""
        if schedule_timesteps is None and self._timesteps is None:
            raise ValueError("Timesteps have not been set. Call `set_timesteps` first.")
        try:
            return super().index_for_timestep(timestep, schedule_timesteps)
        except IndexError as exc:
            raise ValueError(f"Passed `timestep` is not in `self.timesteps`: {exc}") from None

    def _init_step_index(self, timestep) -> None:
        if self._timesteps is None:
            raise ValueError("Timesteps have not been set. Call `set_timesteps` first.")
        super()._init_step_index(timestep)

    @staticmethod
    def _sigma_broadcast(sigma: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """``sigma`` with trailing singleton dimensions up to ``sample``'s rank (diffusers' helper)."""
        while sigma.ndim < sample.ndim:
            sigma = sigma.view(*sigma.shape, 1)
        return sigma

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None):
        """diffusers' ``step`` (same positional order): one fused kernel pass from the velocity
        ``model_output`` at ``timestep``; ``variance_noise`` replaces the noise draw. Returns
        ``SchedulerOutput(prev_sample)`` (or ``(prev_sample,)``), in ``sample``'s dtype."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        _reject_integer_timestep(timestep, type(self).__name__)
        if self.sigmas is None or self._timesteps is None:
            raise ValueError("Scheduler has not been initialized. Call `set_timesteps` before `step`.")
        self._check_step_inputs(model_output, sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        i, last = self._step_index, len(self._host_sigmas) - 1
        if i >= last:  # already at the end: diffusers returns the sample itself
            self._step_index = last
            return SchedulerOutput(sample)
        table = self._table
        if table is None or i not in table:
            raise ValueError(f"step {i} (sigma {self._host_sigmas[i]:g} to {self._host_sigmas[i + 1]:g}) has no finite "
                             "Euler-ancestral RF update: it divides by sigma = 0 (diffusers' step gives NaN / inf); "
                             "pass sigmas without such a step")
        noise = None
        if self._draws[i]:  # drawn where diffusers draws, used where its coefficient is not zero
            noise = self._noise(variance_noise, generator, sample, torch.float32)
            if not table.plans[i].uses("noise"):
                noise = None
        prev = self._fused(i, sample, model_output, cond=cond, guidance_scale=guidance_scale, noise=noise).sample
        self._step_index = i + 1
        return SchedulerOutput(prev)
