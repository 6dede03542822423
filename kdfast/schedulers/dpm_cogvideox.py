"""CogVideoX's DPM scheduler (SDE-DPM-Solver++(2M) on the SNR-shifted schedule), as a diffusers drop-in."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ._linear import H0, NOISE, X, X0
from .base import CheckedPlan, SchedulerOutput, guidance_pair
from .ddim import _div, _sqrt
from .ddim_cogvideox import CogVideoXSchedule


def _log_snr(a: float) -> float:
    """``log(sqrt(a / (1 - a)))`` as diffusers' tensors compute it: -inf at a = 0, +inf at a = 1."""
    if a <= 0.0:
        return -math.inf if a == 0.0 else math.nan
    if a >= 1.0:
        return math.inf if a == 1.0 else math.nan
    return 0.5 * (math.log(a) - math.log1p(-a))


class CogVideoXDPMScheduler(CogVideoXSchedule):
    """Drop-in for ``diffusers.CogVideoXDPMScheduler``: same arguments, config, schedule and
    attributes (those of :class:`~kdfast.schedulers.ddim_cogvideox.CogVideoXDDIMScheduler`;
    diffusers' docstring lists other default betas than its constructor has: the constructor's
    are taken), and the same ``step`` contract.

    ``step(model_output, old_pred_original_sample, timestep, timestep_back, sample, ...)`` is a
    stochastic DPM-Solver++(2M) step in log-SNR ``lambda`` (``h = lambda_prev - lambda_t``)::

        x_prev = sqrt((1 - a_prev) / (1 - a_t)) e^-h x - expm1(-2h) sqrt(a_prev) D
                 + sqrt(1 - a_prev) sqrt(1 - e^-2h) z

    with ``D = x0`` on the first step (``old_pred_original_sample`` None) and the last one, else
    ``D = (1 + 1/2r) x0 - (1/2r) old_x0``, ``r`` the ratio of the previous log-SNR step (from
    ``timestep_back``) to this one. It returns ``(prev_sample, pred_original_sample)``, the
    x0 to pass back as ``old_pred_original_sample`` next step (as CogVideoX pipelines do).
    Both are written by one fused kernel pass (x0 as the kernel's history output, in the
    dtype diffusers gives it), with coefficients planned in float64 on the host: in
    ``set_timesteps`` for the pipeline's (timestep, previous timestep) pairs, on first use
    for any other.

    The noise ``z`` is drawn from ``generator`` exactly as diffusers draws it: once per step,
    and once more (the first draw unused) on second-order steps; ``variance_noise`` (kdfast
    only: diffusers ignores it) replaces both draws. As in diffusers, ``eta`` and
    ``use_clipped_model_output`` are not used (a nonzero ``eta`` is logged once), nor are the
    clipping options of the config; ``return_dict`` defaults to False, and a first-order step
    returns the tuple even with ``return_dict=True``. Where diffusers' step is inf/NaN (an
    epsilon model at the zero-SNR last timestep, a ``timestep_back`` equal to ``timestep``)
    the step raises a ValueError saying why.
    """

    _diffusers_name = "CogVideoXDPMScheduler"
    order = 1

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set the ``num_inference_steps`` timesteps (``linspace``, ``leading`` or ``trailing``
        spacing, as diffusers) on ``device`` and plan the kernel coefficients of each step: its
        first-order update and its second-order one from the schedule's previous timestep."""
        super().set_timesteps(num_inference_steps, device)
        host = [int(t) for t in self._host_timesteps]
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        for t_back, t in zip(host, host[1:]):
            if t - ratio >= 0:
                self._table.ensure(self._key(t, t_back, True), lambda t=t, t_back=t_back: self._plan(t, t_back, True))

    def _key(self, t: int, t_back: Optional[int] = None, second: bool = False) -> Tuple[int, Optional[int], bool]:
        """A first-order step (``t_back`` None) does not depend on the previous timestep."""
        return (t, t_back, second)

    def _plan(self, t: int, t_back: Optional[int] = None, second: bool = False) -> CheckedPlan:
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        a = self._alpha_prod(t)
        a_prev = self._alpha_prod(prev_t) if prev_t >= 0 else self._host_final
        lamb = _log_snr(a)
        h = _log_snr(a_prev) - lamb
        # e^-h: 0 at the last step (a_prev = 1, h = inf); no overflow: |lambda| < 400 in float64
        decay = math.exp(-h)
        mult1 = _sqrt(_div(1.0 - a_prev, 1.0 - a)) * decay
        mult2 = math.expm1(-2.0 * h) * _sqrt(a_prev)
        mult_noise = _sqrt(1.0 - a_prev) * _sqrt(1.0 - decay * decay)
        x0 = self._x0_coefficients(a)
        if not second:
            sample = mult1 * X - mult2 * X0 + mult_noise * NOISE
            return self._checked_plan(t, x0, sample, history=X0)
        r = _div(lamb - _log_snr(self._alpha_prod(t_back)), h)
        mult4 = _div(1.0, 2.0 * r)
        sample = mult1 * X - mult2 * ((1.0 + mult4) * X0 - mult4 * H0) + mult_noise * NOISE
        return self._checked_plan(t, x0, sample, history=X0,
                                  what=f" from timestep_back={t_back} (log-SNR step ratio r={r}); pass the "
                                       "schedule's previous timestep")

    # ---------------------------------------------------------------- diffusers' helpers

    def get_variables(self, alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor,
                      alpha_prod_t_back: Optional[torch.Tensor] = None):
        """diffusers' helper: ``(h, r, lamb, lamb_next)`` of DPM-Solver++(2M) from cumulative
        alphas (tensors), ``r`` None without ``alpha_prod_t_back``. The step does not call it:
        its coefficients are planned on the host."""
        lamb = ((alpha_prod_t / (1 - alpha_prod_t)) ** 0.5).log()
        lamb_next = ((alpha_prod_t_prev / (1 - alpha_prod_t_prev)) ** 0.5).log()
        h = lamb_next - lamb
        if alpha_prod_t_back is None:
            return h, None, lamb, lamb_next
        lamb_previous = ((alpha_prod_t_back / (1 - alpha_prod_t_back)) ** 0.5).log()
        return h, (lamb - lamb_previous) / h, lamb, lamb_next

    def get_mult(self, h: torch.Tensor, r: Optional[torch.Tensor], alpha_prod_t: torch.Tensor,
                 alpha_prod_t_prev: torch.Tensor, alpha_prod_t_back: Optional[torch.Tensor] = None):
        """diffusers' helper: the multipliers ``(mult1, mult2)`` of the sample and x0, and with
        ``alpha_prod_t_back`` also ``(mult3, mult4)`` of the current and previous x0."""
        mult1 = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) ** 0.5 * (-h).exp()
        mult2 = (-2 * h).expm1() * alpha_prod_t_prev**0.5
        if alpha_prod_t_back is None:
            return mult1, mult2
        return mult1, mult2, 1 + 1 / (2 * r), 1 / (2 * r)

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, old_pred_original_sample: Optional[torch.Tensor], timestep,
             timestep_back, sample: torch.Tensor, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator: Optional[torch.Generator] = None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = False):
        """diffusers' ``step`` (same positional order): one fused kernel pass.

        ``old_pred_original_sample``: the x0 the previous step returned (None on the first step);
        ``timestep_back``: the previous step's timestep (None on the first step). Returns
        ``(prev_sample, pred_original_sample)``; with ``return_dict=True`` a second-order step
        returns ``SchedulerOutput(prev_sample, pred_original_sample)`` instead (a first-order
        one still the tuple, as in diffusers).
        """
        return self._dpm_step(model_output, None, 1.0, old_pred_original_sample, timestep, timestep_back, sample,
                              eta, generator, variance_noise, return_dict)

    def _loop_step(self, model_output, cond, guidance_scale, timestep, previous_timestep, sample, carry, generator,
                   options):
        # the carry is the x0 the previous step returned, as CogVideoX pipelines pass it on
        if cond is None:
            return self.step(model_output, carry, timestep, previous_timestep, sample, generator=generator, **options)
        return self.step_cfg(model_output, cond, guidance_scale, carry, timestep, previous_timestep, sample,
                             generator=generator, **options)

    def step_cfg(self, uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float,
                 old_pred_original_sample: Optional[torch.Tensor], timestep, timestep_back, sample: torch.Tensor,
                 eta: float = 0.0, use_clipped_model_output: bool = False,
                 generator: Optional[torch.Generator] = None, variance_noise: Optional[torch.Tensor] = None,
                 return_dict: bool = False):
        """``step`` with classifier-free guidance fused into the same kernel pass:
        ``model_output = uncond + guidance_scale * (cond - uncond)`` (``step``'s arguments, with
        ``uncond, cond, guidance_scale`` for ``model_output``). ``uncond`` and ``cond`` may be
        the two halves of one batched forward (``out.chunk(2)``) without copies."""
        self._check_step_inputs(uncond, sample, "uncond")
        self._check_step_inputs(cond, sample, "cond")
        uncond, cond = guidance_pair(uncond, cond)
        return self._dpm_step(uncond, cond, guidance_scale, old_pred_original_sample, timestep, timestep_back,
                              sample, eta, generator, variance_noise, return_dict)

    def _dpm_step(self, model_output, cond, guidance_scale, old, timestep, timestep_back, sample, eta, generator,
                  variance_noise, return_dict):
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        self._warn_ignored(eta)
        t = self._checked_timestep(timestep)
        # diffusers reads alphas_cumprod[timestep_back] whenever it is given
        t_back = None if timestep_back is None else self._checked_timestep(timestep_back, "timestep_back")
        second = old is not None and t - self.config.num_train_timesteps // self.num_inference_steps >= 0
        if second:
            if not isinstance(old, torch.Tensor) or old.shape != sample.shape or old.device != sample.device:
                raise ValueError("old_pred_original_sample must be the pred_original_sample of the previous step, a "
                                 f"tensor of sample's shape {tuple(sample.shape)} on {sample.device}, got "
                                 + (f"{tuple(old.shape)} on {old.device}" if isinstance(old, torch.Tensor)
                                    else type(old).__name__))
            if t_back is None:
                raise ValueError("timestep_back must be the previous step's timestep when old_pred_original_sample "
                                 "is given (diffusers' step fails with an IndexError without it)")
        else:
            t_back = None  # a first-order step does not depend on it
        key = self._table.ensure(self._key(t, t_back, second), lambda: self._plan(t, t_back, second))
        self._raise_if_undefined(key)
        if variance_noise is not None:
            if generator is not None:
                raise ValueError("pass generator or variance_noise, not both")
            noise = variance_noise
        else:  # diffusers draws once, and on a second-order step once more, using the second draw
            noise = self._noise(None, generator, sample, sample.dtype)
            if second:
                noise = self._noise(None, generator, sample, sample.dtype)
        # x0 in the dtype diffusers' arithmetic gives it (float32 for a float32 model output on
        # bfloat16 latents, as CogVideoX pipelines step): it is the next step's history
        m_dtype = model_output.dtype if cond is None else torch.promote_types(model_output.dtype, cond.dtype)
        x0_dtype = m_dtype if self.config.prediction_type == "sample" else torch.promote_types(sample.dtype, m_dtype)
        result = self._fused(key, sample, model_output, cond=cond, guidance_scale=guidance_scale,
                             history=(old,) if second else (), noise=noise, write_history=True,
                             history_dtype=x0_dtype)
        if return_dict and second:
            return SchedulerOutput(result.sample, result.history)
        return result.sample, result.history
