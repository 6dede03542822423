"""CogVideoX's DDIM (deterministic, on the SNR-shifted noise schedule), as a diffusers drop-in."""
from __future__ import annotations

import logging
import math
from typing import List, Optional, Union

import numpy as np
import torch

from .._checks import check_count, real_number
from ._config import register_to_config
from ._linear import X, X0
from ._schedule import (BETA_SCHEDULES, TIMESTEP_SPACINGS, betas_for_alpha_bar, check_betas, check_choice,
                        check_training_steps)
from .base import CheckedPlan, guidance_pair, reject_unknown_step_arguments
from .ddim import DDIMScheduler, _div, _sqrt, timestep_value

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def cogvideox_noise_schedule(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                             trained_betas, snr_shift_scale: float, rescale_betas_zero_snr: bool):
    """(betas, alphas, alphas_cumprod) of diffusers' CogVideoX schedulers, in their dtypes.

    Unlike the other diffusers schedulers, ``scaled_linear`` betas are float64 (so is
    everything derived from them); the cumulative alphas are then SNR-shifted,
    ``a / (s + (1 - s) a)`` (the SNR divided by ``snr_shift_scale``), and, with
    ``rescale_betas_zero_snr``, rescaled to zero terminal SNR as cumulative alphas (not as
    betas, as the other schedulers do), so the last one is exactly 0.
    """
    check_training_steps(num_train_timesteps, trained_betas)
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    else:
        betas = betas_for_alpha_bar(num_train_timesteps)
    check_betas(betas, beta_start, beta_end, beta_schedule, trained_betas)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod = alphas_cumprod / (snr_shift_scale + (1 - snr_shift_scale) * alphas_cumprod)
    if rescale_betas_zero_snr:
        root = alphas_cumprod.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        alphas_cumprod = root**2
    return betas, alphas, alphas_cumprod


class CogVideoXSchedule(DDIMScheduler):
    """What diffusers' two CogVideoX schedulers share: the constructor arguments and config (those
    of ``DDIMScheduler`` without thresholding, plus ``snr_shift_scale``), the SNR-shifted noise
    schedule, DDIM's timestep spacings, ``add_noise``, ``get_velocity`` and ``_get_variance``
    (inherited from :class:`~kdfast.schedulers.ddim.DDIMScheduler`), and the checks a step makes."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.0120,
        beta_schedule: str = "scaled_linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        snr_shift_scale: float = 3.0,
    ):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        check_count("num_train_timesteps", num_train_timesteps, 1)
        shift = float(snr_shift_scale)
        if not (math.isfinite(shift) and shift > 0):
            # s <= 0 gives cumulative alphas outside [0, 1): every step of diffusers' is NaN
            raise ValueError(f"snr_shift_scale must be a finite number > 0, got {snr_shift_scale}")
        self.betas, self.alphas, self.alphas_cumprod = cogvideox_noise_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, snr_shift_scale,
            rescale_betas_zero_snr)
        self._host_alphas_cumprod = self.alphas_cumprod.tolist()
        bad = [(t, a) for t, a in enumerate(self._host_alphas_cumprod) if not 0.0 <= a < 1.0]
        if bad:
            t, a = bad[0]
            names = "trained_betas" if trained_betas is not None else "beta_start, beta_end"
            raise ValueError(f"the noise schedule needs alphas_cumprod in [0, 1) (betas in (0, 1]); got {a} at "
                             f"timestep {t}: check {names} and snr_shift_scale (diffusers' steps there are inf "
                             "or NaN)")
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._host_final = float(self.final_alpha_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._set_timesteps(torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)))
        self._step_index = None
        self._begin_index = None
        self._table = None
        self._warned_ignored = False

    def _alpha_prod(self, t: int) -> float:
        # an out-of-range timestep (leading spacing with a large steps_offset) plans as NaN; its
        # step raises the IndexError of _checked_timestep
        host = self._host_alphas_cumprod
        return host[t] if -len(host) <= t < len(host) else math.nan

    def _x0_coefficients(self, a: float):
        """(c_x, c_m) with x0 = c_x * sample + c_m * model_output at cumulative alpha ``a``, as
        diffusers' step predicts x0; infinite for epsilon at a = 0 (zero terminal SNR)."""
        pt = self.config.prediction_type
        if pt == "epsilon":
            sa = _sqrt(a)
            return _div(1.0, sa), -_div(_sqrt(1.0 - a), sa)
        if pt == "sample":
            return 0.0, 1.0
        return _sqrt(a), -_sqrt(1.0 - a)

    def _checked_plan(self, t: int, x0, sample, history=None, aux=None, what: str = "") -> CheckedPlan:
        """The plan, with the reason it is undefined when a coefficient is inf or NaN."""
        plan = CheckedPlan(x0=x0, sample=sample, history=history, aux=aux)
        if all(math.isfinite(c) for c in plan.row()):
            return plan
        if not all(math.isfinite(c) for c in x0):
            why = " (rescale_betas_zero_snr=True)" if self.config.rescale_betas_zero_snr else ""
            error = (f"timestep {t}: alphas_cumprod[{t}] is 0{why}, where "
                     "prediction_type='epsilon' defines no x0 (diffusers' step returns inf/NaN there); use "
                     "prediction_type='v_prediction' (as CogVideoX does) or a timestep_spacing that skips "
                     "the last training timestep")
        else:
            error = f"timestep {t}: the update is not finite{what}"
        return CheckedPlan(x0=x0, sample=sample, history=history, aux=aux, error=error)

    def _checked_timestep(self, timestep, name: str = "timestep") -> int:
        """The integer training timestep of ``timestep`` (no host read for a schedule element)."""
        try:
            t = timestep_value(self, timestep)
        except ValueError as e:
            raise ValueError(str(e).replace("timestep", name, 1)) from None
        T = len(self._host_alphas_cumprod)  # (num_train_timesteps)
        if not -T <= t < T:
            raise IndexError(f"{name} {t} is outside the training schedule [0, {T})")
        return t

    def _warn_ignored(self, eta) -> None:
        """diffusers' CogVideoX steps take ``eta`` and ignore it; say so once instead of silently."""
        eta = real_number("eta", eta)
        if not math.isfinite(eta):
            raise ValueError(f"eta must be a finite number, got {eta}")
        if eta != 0.0 and not self._warned_ignored:
            self._warned_ignored = True
            logger.warning("%s.step ignores eta=%g, as diffusers' does (its update has a fixed noise level)",
                           type(self).__name__, eta)

    def _step(self, *args, **kwargs):
        raise NotImplementedError


class CogVideoXDDIMScheduler(CogVideoXSchedule):
    """Drop-in for ``diffusers.CogVideoXDDIMScheduler``: same arguments, config, schedule and
    attributes (``betas``, ``alphas_cumprod`` with the SNR shift, ``final_alpha_cumprod``,
    ``timesteps``).

    The update is deterministic DDIM, ``x_prev = a_t x + b_t x0`` with
    ``a_t = sqrt((1 - alpha_prev) / (1 - alpha_t))`` and ``b_t = sqrt(alpha_prev) - sqrt(alpha_t) a_t``,
    x0 predicted from an ``epsilon``, ``sample`` or ``v_prediction`` model output: one fused
    kernel pass, coefficients planned in float64 on the host (when the schedule is set, or on
    first use for a timestep off the schedule). As in diffusers, ``step`` reads the timestep's
    value (any training timestep works) and the previous timestep is ``t - T // num_inference_steps``.

    As in diffusers, ``clip_sample``, ``clip_sample_range`` and ``sample_max_value`` are recorded
    in the config and not applied, and ``eta``, ``use_clipped_model_output``, ``generator`` and
    ``variance_noise`` are accepted and not used (a nonzero ``eta`` is logged once).
    ``pred_original_sample`` is computed when first read (or written by the step itself with
    ``return_pred_original_sample=True``), so ``step(..., return_dict=False)[0]`` costs one pass.
    Where diffusers' step is inf/NaN (an epsilon model at the zero-SNR last timestep) the step
    raises a ValueError saying why.
    """

    _diffusers_name = "CogVideoXDDIMScheduler"
    order = 1

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set the ``num_inference_steps`` timesteps (``linspace``, ``leading`` or ``trailing``
        spacing, as diffusers) on ``device`` and plan each step's kernel coefficients."""
        super().set_timesteps(num_inference_steps, device)

    def _key(self, t: int) -> int:
        return t

    def _plan(self, t: int) -> CheckedPlan:
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        a = self._alpha_prod(t)
        a_prev = self._alpha_prod(prev_t) if prev_t >= 0 else self._host_final
        a_t = _sqrt(_div(1.0 - a_prev, 1.0 - a))
        b_t = _sqrt(a_prev) - _sqrt(a) * a_t
        # aux: pred_original_sample, written when asked for (else computed when first read)
        return self._checked_plan(t, self._x0_coefficients(a), a_t * X + b_t * X0, aux=X0)

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Optional[torch.Generator] = None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True,
             return_pred_original_sample: bool = False):
        """diffusers' ``step`` (same positional order): one fused kernel pass.

        Returns ``SchedulerOutput(prev_sample, pred_original_sample)``, or with
        ``return_dict=False`` the tuple ``(prev_sample, pred_original_sample)``. x0 costs one
        more latent write, so it is computed when first read (from this step's inputs), or by
        the step itself with ``return_pred_original_sample=True`` (kdfast only). ``eta``,
        ``use_clipped_model_output``, ``generator`` and ``variance_noise`` are not used, as in
        diffusers.
        """
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise, eta=eta,
                         use_clipped_model_output=use_clipped_model_output,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def step_cfg(self, uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, timestep,
                 sample: torch.Tensor, eta: float = 0.0, use_clipped_model_output: bool = False,
                 generator: Optional[torch.Generator] = None, variance_noise: Optional[torch.Tensor] = None,
                 return_dict: bool = True, return_pred_original_sample: bool = False):
        """``step`` with classifier-free guidance fused into the same kernel pass:
        ``model_output = uncond + guidance_scale * (cond - uncond)``. ``uncond`` and ``cond`` may
        be the two halves of one batched forward (``out.chunk(2)``) without copies."""
        self._check_step_inputs(uncond, sample, "uncond")
        self._check_step_inputs(cond, sample, "cond")
        uncond, cond = guidance_pair(uncond, cond)
        out = self._step(uncond, timestep, sample, cond, guidance_scale, generator, variance_noise, eta=eta,
                         use_clipped_model_output=use_clipped_model_output,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              eta: float = 0.0, use_clipped_model_output: bool = False, return_pred_original_sample: bool = False,
              **kwargs):
        reject_unknown_step_arguments(kwargs)
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        self._warn_ignored(eta)
        t = self._checked_timestep(timestep)
        key = self._table.ensure(t, lambda: self._plan(t))
        self._raise_if_undefined(key)
        return self._fused_output(key, sample, model_output, want_x0=return_pred_original_sample, cond=cond,
                                  guidance_scale=guidance_scale)
