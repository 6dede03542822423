"""Deterministic DDIM inversion (Song et al. 2021; Mokady et al. 2023): image -> noise, as a
diffusers drop-in. Used to invert images for editing and to make noise/image pairs for reflow."""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Union

import numpy as np
import torch

from ._config import register_to_config
from ._schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS, check_choice, noise_schedule
from .base import GrowingTable, SchedulerOutput, StepPlan, guidance_pair, reject_unknown_step_arguments
from .ddim import DDIMScheduler, timestep_value


class DDIMInverseScheduler(DDIMScheduler):
    """Drop-in for ``diffusers.DDIMInverseScheduler``: same arguments, config and schedule.

    The reverse of :class:`~kdfast.schedulers.DDIMScheduler`: its timesteps ascend, and a step
    at timestep ``t`` moves the sample from the noise level of ``t - T // num_inference_steps``
    (``initial_alpha_cumprod`` below 0) up to that of ``t``::

        x0   = x0 prediction at alpha_cumprod[t - T // n]   (clipped with clip_sample)
        x_t  = sqrt(alpha_cumprod[t]) * x0 + sqrt(1 - alpha_cumprod[t]) * eps

    Each ``step`` is one fused kernel pass (x0 conversion, clipping and the update); as in
    diffusers, it reads the timestep's *value*, so any training timestep works. The
    coefficients of the schedule's timesteps are planned (float64, on the host) in
    ``set_timesteps``, those of other values on first use. ``pred_original_sample`` (returned by
    diffusers) is computed when first read, or written by the step itself with
    ``return_pred_original_sample=True``; ``step_cfg`` fuses classifier-free guidance.

    Where diffusers returns inf/NaN, this scheduler raises instead: with
    ``prediction_type="sample"`` a step that starts at ``alpha_cumprod == 1`` (the first step
    with ``set_alpha_to_one=True``) has no noise direction, ``(x - x0) / 0``.

    The deprecated ``set_alpha_to_zero`` is read as diffusers reads it (as ``set_alpha_to_one``)
    and recorded in the config as ``set_alpha_to_one``, so a saved config rebuilds the same
    scheduler (diffusers' keeps ``set_alpha_to_one=True`` there); other unknown keyword
    arguments are a TypeError, where diffusers' ``**kwargs`` drops them silently.
    """

    _diffusers_name = "DDIMInverseScheduler"
    _compatibles = ()
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
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        **kwargs,
    ):
        # diffusers' **kwargs takes the deprecated set_alpha_to_zero (which it reads as
        # set_alpha_to_one) and ignores anything else; a misspelt option must not pass silently.
        unknown = sorted(k for k in kwargs if k != "set_alpha_to_zero")
        if unknown:
            raise TypeError(f"DDIMInverseScheduler got unexpected arguments: {', '.join(unknown)}")
        config = {k: v for k, v in self._config.items() if k not in ("kwargs", "_use_default_values")}
        defaults = [k for k in self._config.get("_use_default_values", []) if k != "kwargs"]
        if kwargs.get("set_alpha_to_zero") is not None:
            warnings.warn("The `set_alpha_to_zero` argument is deprecated. Please use `set_alpha_to_one` instead.",
                          FutureWarning, stacklevel=3)
            set_alpha_to_one = bool(kwargs["set_alpha_to_zero"])
            # recorded as the value in effect, and as given (diffusers records the default: its
            # config then builds another scheduler than the one it describes)
            config["set_alpha_to_one"] = set_alpha_to_one
            defaults = [k for k in defaults if k != "set_alpha_to_one"]
        if defaults:
            config["_use_default_values"] = defaults
        self._config = type(self._config)(config)
        check_choice("prediction_type", prediction_type, ("epsilon", "sample", "v_prediction"))
        # (linspace is refused by set_timesteps, as in diffusers: a forward DDIM config with it
        # still builds an inverse scheduler with from_config)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr)
        # The noise level a first step starts from (its t - T // n is below 0).
        self.initial_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._host_alphas_cumprod = self.alphas_cumprod.tolist()
        self._host_initial = float(self.initial_alpha_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._set_timesteps(torch.from_numpy(np.arange(0, num_train_timesteps).astype(np.int64)))
        self._step_index = None
        self._begin_index = None
        self._table = None

    @classmethod
    def _init_keys(cls):
        return [k for k in super()._init_keys() if k != "kwargs"]

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # diffusers passes its deprecated arguments on to the constructor, whether given to
        # from_config or found in the config (an old scheduler_config.json): an argument first
        init_dict, unused, hidden = super().extract_init_dict(config_dict, **kwargs)
        for source in (unused, hidden):
            if "set_alpha_to_zero" in source:
                init_dict["set_alpha_to_zero"] = source.pop("set_alpha_to_zero")
                break
        return init_dict, unused, hidden

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Compute the (ascending) timesteps and the kernel coefficients of each."""
        cfg = self.config
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n, T = int(num_inference_steps), cfg.num_train_timesteps
        if n > T:
            raise ValueError(f"`num_inference_steps`: {n} cannot be larger than `self.config.train_timesteps`: {T} "
                             f"as the unet model trained with this scheduler can only handle maximal {T} timesteps.")
        if cfg.timestep_spacing == "leading":
            timesteps = (np.arange(0, n) * (T // n)).round().copy().astype(np.int64) + cfg.steps_offset
        elif cfg.timestep_spacing == "trailing":
            timesteps = np.round(np.arange(T, 0, -T / n)[::-1]).astype(np.int64) - 1
        else:
            raise ValueError(f"timestep_spacing={cfg.timestep_spacing!r} is not supported by DDIMInverseScheduler; "
                             "expected 'leading' or 'trailing'")
        self.num_inference_steps = n
        self._start_new_loop()
        self._set_timesteps(torch.from_numpy(timesteps).to(device), timesteps.tolist())
        self._table = self._shared_table(lambda: self._schedule_table(timesteps.tolist()))

    def _schedule_table(self, timesteps: List[int]) -> GrowingTable:
        """The plans of the schedule's timesteps; a step without a defined update (see
        :meth:`_plan`) or off the training schedule is refused when it is taken."""
        plans = {}
        for t in timesteps:
            if -len(self._host_alphas_cumprod) <= t < len(self._host_alphas_cumprod):
                try:
                    plans[self._key(t)] = self._plan(t)
                except ValueError:
                    pass
        if not plans:  # a schedule without one usable step: say why now
            self._check_timestep(timesteps[0])
            self._plan(timesteps[0])
        return GrowingTable(plans)

    @staticmethod
    def _key(t: int):
        return t

    def _alphas(self, t: int):
        """(alpha_cumprod the step at ``t`` starts from, alpha_cumprod it ends at), as diffusers'
        inverse step indexes them (a negative ``t`` wraps, as indexing the tensor does)."""
        T = self.config.num_train_timesteps
        start = min(t - T // self.num_inference_steps, T - 1)
        return (self._alpha_prod(start) if start >= 0 else self._host_initial), self._alpha_prod(t)

    def _plan(self, t: int) -> StepPlan:
        """DDIM's deterministic update (eta 0), run up the noise schedule (see :meth:`_alphas`);
        refused where it is not finite."""
        plan = super()._plan(t)
        if not all(math.isfinite(v) for v in plan.row()):
            cfg, a_t = self.config, self._alphas(t)[0]
            if cfg.prediction_type == "sample":
                why = ("the sample has no noise there, and the noise a 'sample' model implies, (sample - x0) / "
                       "sqrt(1 - alpha_cumprod), is 0/0" + (" (set_alpha_to_one=True makes the first step start "
                                                          "at 1; use set_alpha_to_one=False)"
                                                          if cfg.set_alpha_to_one else ""))
            else:
                why = ("x0 = (sample - sqrt(1 - alpha_cumprod) * eps) / sqrt(alpha_cumprod) is infinite "
                       "(use clip_sample)")
            raise ValueError(f"timestep {t}: the inverse DDIM step starts at alpha_cumprod {a_t:g}, where {why}; "
                             "diffusers returns inf/NaN there")
        return plan

    def _check_timestep(self, t: int) -> None:
        T = len(self._host_alphas_cumprod)
        if not -T <= t < T:
            raise IndexError(f"timestep {t} is outside the training schedule [0, {T})")

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             return_pred_original_sample: bool = False):
        """diffusers' ``step`` (same positional order): one fused kernel pass from the noise level
        of ``timestep - T // num_inference_steps`` up to that of ``timestep``.

        Returns ``SchedulerOutput(prev_sample, pred_original_sample)``; ``pred_original_sample``
        (the clipped x0) is computed when first read, from this step's inputs, or written by the
        step with ``return_pred_original_sample=True``.
        """
        out = self._step(model_output, timestep, sample, None, 1.0,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def step_cfg(self, uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, timestep,
                 sample: torch.Tensor, return_dict: bool = True, return_pred_original_sample: bool = False):
        """``step`` with classifier-free guidance fused into the same kernel:
        ``model_output = uncond + guidance_scale * (cond - uncond)``."""
        self._check_step_inputs(uncond, sample, "uncond")
        self._check_step_inputs(cond, sample, "cond")
        uncond, cond = guidance_pair(uncond, cond)
        out = self._step(uncond, timestep, sample, cond, guidance_scale,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator=None, variance_noise=None,
              return_pred_original_sample: bool = False, **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        if generator is not None or variance_noise is not None:
            raise TypeError("DDIMInverseScheduler.step is deterministic: it takes no generator or variance_noise")
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        t = timestep_value(self, timestep)
        self._check_timestep(t)
        key = self._table.ensure(self._key(t), lambda: self._plan(t))
        cfg = self.config
        return self._fused_output(key, sample, model_output, want_x0=return_pred_original_sample, cond=cond,
                                  guidance_scale=guidance_scale,
                                  clip_value=cfg.clip_sample_range if cfg.clip_sample else None)

    def _get_variance(self, timestep, prev_timestep):
        raise AttributeError("DDIMInverseScheduler is deterministic and has no _get_variance (nor has diffusers')")
