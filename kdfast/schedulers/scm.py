"""Simplified continuous-time consistency model sampling (sCM, Lu & Song 2024; SANA-Sprint), as a
diffusers drop-in."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from .._checks import check_count
from ._config import register_to_config
from ._linear import NOISE, X0
from ._schedule import check_choice
from .base import FusedScheduler, GrowingTable, SchedulerOutput, StepPlan, reject_unknown_step_arguments


class SCMSchedulerOutput(SchedulerOutput):
    """Like diffusers' SCMSchedulerOutput: ``.prev_sample``, ``.pred_original_sample``, ``out[i]``,
    ``out["prev_sample"]`` (and the rest of :class:`~kdfast.schedulers.base.OutputFields`),
    ``to_tuple()``. Both fields are always there: the step writes them together."""

    __slots__ = ()

    def to_tuple(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.prev_sample, self.pred_original_sample

    def __repr__(self) -> str:
        return f"SCMSchedulerOutput(prev_sample={self.prev_sample!r})"


class SCMScheduler(FusedScheduler):
    """Drop-in for ``diffusers.SCMScheduler``: same arguments, config, ``set_timesteps`` options
    (``timesteps``, ``max_timesteps``, ``intermediate_timesteps``) and ``step``.

    The TrigFlow parameterisation: at timestep ``s`` (an angle, pi/2 is pure noise) the model
    predicts the velocity ``v`` with ``x0 = cos(s) * x - sin(s) * v``, and a step re-noises x0
    to the next timestep ``t``: ``cos(t) * x0 + sin(t) * sigma_data * z``. Each ``step`` is one
    fused kernel pass writing both ``prev_sample`` and ``pred_original_sample`` (SANA-Sprint
    pipelines read both at every step). ``z`` is drawn from the caller's generator exactly as
    diffusers draws it: float32, at every step, the last one (``t = 0``, no noise added)
    included, so the generator ends in the same state. ``variance_noise`` replaces the draw.
    At ``t = 0`` the step returns x0 itself as both outputs (one tensor, one write).

    Unlike diffusers, half-precision latents stay in their dtype: diffusers adds its float32
    noise to them and returns float32 samples.
    """

    _diffusers_name = "SCMScheduler"
    order = 1
    _last_timestep_is_the_end = True  # (SANA-Sprint steps from every timestep but the last, 0)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        prediction_type: str = "trigflow",
        sigma_data: float = 0.5,
    ):
        # diffusers accepts any prediction_type here and raises at the first step
        check_choice("prediction_type", prediction_type, ("trigflow",))
        check_count("num_train_timesteps", num_train_timesteps, 1)
        if not math.isfinite(float(sigma_data)):
            raise ValueError(f"sigma_data must be a finite number, got {sigma_data}")
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._set_timesteps(torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)))
        self._step_index = None
        self._begin_index = None
        self._table = None

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: int, timesteps: Optional[Union[List[float], torch.Tensor]] = None,
                      device=None, max_timesteps: Optional[float] = 1.57080,
                      intermediate_timesteps: Optional[float] = 1.3) -> None:
        """diffusers' schedules: ``num_inference_steps + 1`` timesteps from ``max_timesteps`` down
        to 0 (evenly spaced, or ``[max_timesteps, intermediate_timesteps, 0]`` for 2 steps), or
        the given ``timesteps``; and every step's kernel coefficients."""
        T = self.config.num_train_timesteps
        n = num_inference_steps
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {n!r}")
        if n > T:
            raise ValueError(f"`num_inference_steps`: {n} cannot be larger than `self.config.train_timesteps`: {T} as "
                             f"the unet model trained with this scheduler can only handle maximal {T} timesteps.")
        if timesteps is not None and len(timesteps) != n + 1:
            raise ValueError("If providing custom timesteps, `timesteps` must be of length `num_inference_steps + 1`.")
        if timesteps is not None and max_timesteps is not None:
            raise ValueError("If providing custom timesteps, `max_timesteps` should not be provided.")
        if timesteps is None and max_timesteps is None:
            raise ValueError("Should provide either `timesteps` or `max_timesteps`.")
        if intermediate_timesteps is not None and n != 2:
            raise ValueError("Intermediate timesteps for SCM is not supported when num_inference_steps != 2.")

        # Made as diffusers makes them (float32, on `device`), so that they are the same numbers.
        if timesteps is not None:
            if isinstance(timesteps, list):
                schedule = torch.tensor(timesteps, device=device).float()
            elif isinstance(timesteps, torch.Tensor):
                schedule = timesteps.to(device).float()
            else:
                raise ValueError(f"Unsupported timesteps type: {type(timesteps)}")
            name = "timesteps"
        elif intermediate_timesteps is not None:
            schedule = torch.tensor([max_timesteps, intermediate_timesteps, 0], device=device).float()
            name = "max_timesteps and intermediate_timesteps"
        else:
            schedule = torch.linspace(max_timesteps, 0, n + 1, device=device).float()
            name = "max_timesteps"
        if schedule.dim() != 1:
            raise ValueError(f"timesteps must be a 1-D sequence, got shape {tuple(schedule.shape)}")
        host = schedule.tolist()  # once here; the step reads this copy
        if not all(math.isfinite(v) for v in host):
            raise ValueError(f"{name} must be finite numbers, got timesteps {host}")

        self.num_inference_steps = n
        self._set_timesteps(schedule, host)
        self._step_index = None
        self._begin_index = None
        self._table = self._shared_table(
            lambda: GrowingTable({key: self._plan(*key) for key in map(self._key, range(len(host) - 1))}))

    def _key(self, i: int) -> Tuple[float, float]:
        """What step ``i`` depends on: its timestep and the next (``timesteps`` may be assigned anew)."""
        host = self._host_timesteps
        return host[i], host[i + 1]

    def _plan(self, s: float, t: float) -> StepPlan:
        # x0 = cos(s) x - sin(s) v;  prev = cos(t) x0 + sin(t) sigma_data z
        x0 = (math.cos(s), -math.sin(s))
        scale = math.sin(t) * float(self.config.sigma_data)
        if scale == 0.0 and math.cos(t) == 1.0:  # t = 0, the last step: prev_sample equals x0
            # (two outputs all the same, as diffusers' are two tensors: editing one in place must
            # not change the other)
            return StepPlan(x0=x0, sample=X0, aux=X0)
        return StepPlan(x0=x0, sample=math.cos(t) * X0 + scale * NOISE, aux=X0)

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None):
        """diffusers' ``step`` (same positional order): returns ``(prev_sample, pred_original_sample)``.
        ``variance_noise`` (unit normal, scaled by ``sigma_data`` here) replaces the draw."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> SCMSchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        self._refresh_host_timesteps()
        i, n = self._step_index, len(self._host_timesteps)
        if i + 1 >= n:  # the step goes to timesteps[i + 1]; the last timestep (0) is never stepped from
            raise IndexError(f"step {i} is past the end of the {n - 1}-step schedule (timesteps[{i + 1}] does not "
                             "exist); call set_timesteps again")
        key = self._key(i)
        entry = self._table.ensure(key, lambda: self._plan(*key))
        plan = self._table.plan(entry)
        # drawn at every step, as diffusers does (float32, its randn_tensor's default dtype)
        noise = self._noise(variance_noise, generator, model_output, torch.float32)
        result = self._fused(entry, sample, model_output, cond=cond, guidance_scale=guidance_scale,
                             noise=noise if plan.uses("noise") else None, write_aux=plan.aux is not None)
        self._step_index += 1
        return SCMSchedulerOutput(result.sample, result.aux)
