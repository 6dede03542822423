"""Improved pseudo-numerical methods (iPNDM: PNDM's linear multistep with a 1st- to 4th-order
Adams-Bashforth warm-up), as a drop-in for diffusers' ``IPNDMScheduler``."""
from __future__ import annotations

import math
from typing import List, Optional, Union

import numpy as np
import torch

from ._config import register_to_config
from ._linear import HISTORY, MODEL, X
from .._checks import check_count
from .base import FusedScheduler, GrowingTable, SchedulerOutput, StepPlan, reject_unknown_step_arguments

# Adams-Bashforth weights of (ets[-1], ets[-2], ...) by how many ets entries the step combines
_AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
               4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
MAX_ORDER = 4
# diffusers divides by max(alpha, 1e-8): alpha is 0 at the first timestep (pure noise)
_MIN_ALPHA = 1e-8


def _check_trained_betas(trained_betas) -> None:
    """diffusers takes ``alpha = sqrt(1 - beta**2)``: a beta outside [-1, 1] (or not finite)
    makes every alpha after it NaN, and its steps NaN; fewer than two betas leave no step."""
    values = np.asarray(trained_betas, dtype=np.float64)
    if values.ndim != 1 or values.shape[0] < 2:
        raise ValueError(f"trained_betas must be a 1-D sequence of at least 2 noise levels (each step goes from one "
                         f"to the next), got shape {tuple(values.shape)}")
    if not np.isfinite(values).all() or (np.abs(values.astype(np.float32)) > 1).any():
        raise ValueError("trained_betas must be finite and within [-1, 1] (alpha = sqrt(1 - beta**2); diffusers' "
                         f"steps are NaN otherwise), got {values.tolist()}")


class IPNDMScheduler(FusedScheduler):
    """Drop-in for ``diffusers.IPNDMScheduler``: same arguments, config, schedule, ``ets``
    and step.

    The schedule is diffusers': at timestep index ``i`` the noise level is
    ``beta_i = sin(pi/2 * s_i)**2`` for ``s_i`` evenly spaced from 1 to 0, and
    ``alpha_i = sqrt(1 - beta_i**2)`` (or ``trained_betas`` given as such).
    A step forms ``e = beta_i * x + alpha_i * model_output``, appends it to ``ets`` and combines
    the newest ``ets`` entries with Adams-Bashforth weights of order ``min(len(ets), 4)`` into
    ``E``; then ``pred = (x - beta_i * E) / max(alpha_i, 1e-8)`` and
    ``prev = alpha_{i+1} * pred + beta_{i+1} * E``.

    Each ``step`` (and ``step_cfg``, which fuses classifier-free guidance) is one fused
    kernel pass: it reads the sample, the model output and the three previous ``ets``
    entries, and writes the previous sample and the new ``ets`` entry. The update is planned
    on the host in float64 when the schedule is set, for a loop from the start or from the
    index ``set_begin_index`` names, as one linear combination: diffusers' ``(x - beta * E) /
    1e-8`` at the first timestep (alpha = 0, where ``E = x``) is then the exact ``beta_1 * x``
    rather than a difference of two equal numbers. ``ets`` holds every entry, as in
    diffusers (steps read the newest three); a list injected from outside is read as it is.

    Half-precision latents are stepped in float32 and rounded once per step (diffusers rounds
    every intermediate): up to ~50 steps the loop is as close to the float32 one as diffusers'
    (0.3-1.6x its error here), but with hundreds of steps each step moves the latents by less
    than half a unit in the last place and the single rounding drops it systematically, where
    diffusers' intermediate roundings dither it (~5x diffusers' error at 1000 float16 steps).
    Keep float32 latents for such loops.

    ``step`` also accepts ``generator=`` (unused: iPNDM draws no noise), as kdfast's other
    deterministic schedulers do, so that one loop drives any of them.
    """

    _diffusers_name = "IPNDMScheduler"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
    ):
        check_count("num_train_timesteps", num_train_timesteps, 1)
        if trained_betas is not None:
            _check_trained_betas(trained_betas)
        self._table = None
        # diffusers sets a schedule of num_train_timesteps steps here; its coefficients are
        # planned on the first step that needs them
        self._set_schedule(num_train_timesteps, None, build=False)
        self.init_noise_sigma = 1.0
        self.pndm_order = 4  # (diffusers' attribute: the order of the multistep formula)

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """diffusers' noise levels ``betas`` / ``alphas`` and ``timesteps`` (float32, value for
        value), and the coefficients of the loop over them; starts a new loop (``ets`` emptied).

        With ``trained_betas`` the schedule has one timestep per trained beta but the last,
        whatever ``num_inference_steps`` says, as in diffusers."""
        self._set_schedule(num_inference_steps, device, build=True)

    def _set_schedule(self, num_inference_steps, device, build: bool) -> None:
        n = check_count("num_inference_steps", num_inference_steps, 1)
        # the same torch operations in float32 as diffusers: the same numbers, bit for bit
        steps = torch.linspace(1, 0, n + 1)[:-1]
        steps = torch.cat([steps, torch.tensor([0.0])])
        if self.config.trained_betas is not None:
            betas = torch.tensor(self.config.trained_betas, dtype=torch.float32)
        else:
            betas = torch.sin(steps * math.pi / 2) ** 2
        alphas = (1.0 - betas**2) ** 0.5
        timesteps = (torch.atan2(betas, alphas) / math.pi * 2)[:-1]
        self.num_inference_steps = n
        self.betas, self.alphas = betas, alphas
        self._host_betas, self._host_alphas = betas.tolist(), alphas.tolist()
        self._set_timesteps(timesteps.to(device), timesteps.tolist())
        self.ets: List[torch.Tensor] = []
        self._step_index = None
        self._begin_index = None
        self._table = self._shared_table(self._build_table) if build else None

    def _build_table(self) -> GrowingTable:
        # a loop from the start: ets holds min(i + 1, 4) entries at step i
        return GrowingTable({(i, min(i + 1, MAX_ORDER)): self._plan(i, min(i + 1, MAX_ORDER))
                             for i in range(len(self._host_betas) - 1)})

    def _plan(self, i: int, order: int) -> StepPlan:
        """Step ``i`` combining ``order`` ets entries: the current one (from the kernel's x and
        model sources) and ``order - 1`` earlier ones (its history, newest first)."""
        beta, alpha = self._host_betas[i], self._host_alphas[i]
        next_beta, next_alpha = self._host_betas[i + 1], self._host_alphas[i + 1]
        current = beta * X + alpha * MODEL
        weights = _AB_WEIGHTS[order]
        ets = weights[0] * current
        for w, h in zip(weights[1:], HISTORY):
            ets = ets + w * h
        pred = (X - beta * ets) / max(alpha, _MIN_ALPHA)
        # (x0 is not an output of this step: the kernel's x0 source is left at zero)
        return StepPlan(x0=(0.0, 0.0), sample=next_alpha * pred + next_beta * ets, history=current)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where the loop starts in ``timesteps`` (pipelines call this for img2img). The first
        steps from there combine fewer ets entries than a loop from the start: their
        coefficients are made here, not on the step path."""
        super().set_begin_index(begin_index)
        if self._table is None:
            return
        last = len(self._host_betas) - 1
        for j in range(MAX_ORDER - 1):
            i = self._begin_index + j
            if i < last:
                self._ensure(i, j + 1)

    def _ensure(self, i: int, order: int):
        return self._table.ensure((i, order), lambda: self._plan(i, order))

    # ---------------------------------------------------------------- step

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The sample as it is: iPNDM's model takes it unscaled."""
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             generator: Optional[torch.Generator] = None):
        """diffusers' ``step`` (same positional order): one fused kernel pass. Returns
        ``SchedulerOutput(prev_sample)`` (or ``(prev_sample,)``); the new ``ets`` entry is kept.
        ``generator`` is accepted and unused."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, None)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> SchedulerOutput:
        # (generator, variance_noise: step_cfg's common arguments; iPNDM draws no noise)
        reject_unknown_step_arguments(kwargs)
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        self._check_step_inputs(model_output, sample)
        if self._table is None:  # stepping on the schedule of __init__
            self._table = self._shared_table(self._build_table)
        if self._step_index is None:
            self._init_step_index(timestep)
        i, n = self._step_index, len(self._host_betas) - 1
        if i >= n:  # diffusers indexes betas[i + 1] past its end: IndexError
            raise IndexError(f"step {i} is past the end of the {n}-step schedule; call set_timesteps again")
        ets = self.ets
        order = min(len(ets) + 1, MAX_ORDER)
        key = self._ensure(i, order)
        history = [ets[-1 - k] for k in range(order - 1)]
        # diffusers' ets entry and prev_sample have the promoted dtype of the sample and the model output
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        if cond is not None:
            dtype = torch.promote_types(dtype, cond.dtype)
        if sample.dtype != dtype:  # the step writes the sample's dtype: widen it first, not the result after
            sample = sample.to(dtype)
        result = self._fused(key, sample, model_output, cond=cond, guidance_scale=guidance_scale, history=history,
                             write_history=True, history_dtype=dtype)
        # the state changes only once the step has succeeded
        ets.append(result.history)
        self._step_index = i + 1
        return SchedulerOutput(result.sample)
