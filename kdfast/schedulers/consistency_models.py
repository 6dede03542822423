"""Multistep sampling of consistency models (Song et al. 2023, Algorithm 1), as a drop-in for
diffusers' ``CMStochasticIterativeScheduler``."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ._config import register_to_config
from ._linear import NOISE, X0
from ._schedule import finite_number
from .base import CoefficientTable, OutputFields, StepPlan, check_variance_noise, reject_unknown_step_arguments
from .euler_discrete import _reject_integer_timestep, _SigmaScheduler


class CMStochasticIterativeSchedulerOutput(OutputFields):
    """Like diffusers' CMStochasticIterativeSchedulerOutput: ``.prev_sample``, ``out[0]``,
    ``out["prev_sample"]`` (and the rest of :class:`~kdfast.schedulers.base.OutputFields`),
    ``to_tuple()``."""

    __slots__ = ("prev_sample",)
    _fields = ("prev_sample",)

    def __init__(self, prev_sample: torch.Tensor):
        self.prev_sample = prev_sample

    def __repr__(self) -> str:
        return f"CMStochasticIterativeSchedulerOutput(prev_sample={self.prev_sample!r})"


class CMStochasticIterativeScheduler(_SigmaScheduler):
    """Drop-in for ``diffusers.CMStochasticIterativeScheduler``: same arguments, config, schedules
    (``set_timesteps(num_inference_steps)`` or ``set_timesteps(timesteps=[...])``, and the
    training schedule of the constructor, which ``step`` also runs on), input scaling, scalings
    (``get_scalings``, ``get_scalings_for_boundary_condition``), ``sigma_to_t`` and ``add_noise``.

    A step denoises with the consistency model's boundary-condition scalings at ``sigma``,
    ``x0 = c_skip * x + c_out * model_output``, clamps x0 to [-1, 1] when ``clip_denoised``, and
    re-noises it to the next sigma: ``x0 + s_noise * sqrt(sigma_hat**2 - sigma_min**2) * z``.
    That is one fused kernel pass (guidance, the scalings, the clamp and the noise), its
    coefficients computed when the schedule is set, as diffusers computes them (in the sigmas'
    own float32 or float64). ``z`` is drawn from the caller's generator exactly as diffusers
    draws it: in the model output's dtype, at every step, the last one included, and not at all
    on a one-timestep schedule (which adds no noise). ``variance_noise`` replaces the draw.

    Deviations, each where diffusers' result is not a number or not a step: on a step to
    ``sigma_min`` (the last step, and the step to a custom timestep ``num_train_timesteps - 1``)
    diffusers computes ``sigma_hat**2 - sigma_min**2`` in float32, which rounds below 0 for
    about one ``sigma_min`` in four and makes every sample NaN; its exact value is 0, and so is
    the noise kdfast adds there. Settings for which diffusers' steps are NaN, infinite, complex
    or a ZeroDivisionError (``num_train_timesteps < 2``, ``sigma_min < 0``, ``sigma_min >=
    sigma_max``, ``sigma_data <= 0``, ``rho <= 0``, non-finite values, custom timesteps whose
    sigma overflows float32) raise a ValueError naming the argument, and a step past the end of
    the schedule an IndexError. ``prev_sample`` has diffusers' dtype, that of ``sample`` and the
    model output promoted together (a float16 sample with a float32 model output is cast up
    first, one more pass, as diffusers' arithmetic does). diffusers' warning when ``step`` runs
    before ``scale_model_input`` is not repeated (as in kdfast's other sigma schedulers).
    """

    _diffusers_name = "CMStochasticIterativeScheduler"
    _compatibles = ()
    order = 1
    init_noise_sigma = 80.0  # (a plain value, set by the constructor, where Euler's is computed)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 40,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        s_noise: float = 1.0,
        rho: float = 7.0,
        clip_denoised: bool = True,
    ) -> None:
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) \
                or num_train_timesteps < 2:
            # set_timesteps divides by num_train_timesteps - 1 (diffusers' sigmas are NaN at 1)
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        sigma_min, sigma_max = finite_number("sigma_min", sigma_min), finite_number("sigma_max", sigma_max)
        if not 0 <= sigma_min < sigma_max:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if finite_number("sigma_data", sigma_data) <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if finite_number("rho", rho) <= 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        finite_number("s_noise", s_noise)
        if not isinstance(clip_denoised, (bool, np.bool_)):
            raise ValueError(f"clip_denoised must be True or False, got {clip_denoised!r}")
        self.init_noise_sigma = sigma_max
        ramp = np.linspace(0, 1, num_train_timesteps)
        sigmas = self._convert_to_karras(ramp)
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.is_scale_input_called = False
        self._install(torch.from_numpy(sigmas), torch.from_numpy(self.sigma_to_t(sigmas)), None)
        self._table = None  # made on the first step on this schedule, if any

    # ---------------------------------------------------------------- schedule

    def sigma_to_t(self, sigmas: Union[float, np.ndarray]) -> np.ndarray:
        """The model's timestep input of each Karras sigma: ``1000 * 0.25 * log(sigma + 1e-44)``."""
        if not isinstance(sigmas, np.ndarray):
            sigmas = np.array(sigmas, dtype=np.float64)
        return 1000 * 0.25 * np.log(sigmas + 1e-44)

    def _convert_to_karras(self, ramp: np.ndarray) -> np.ndarray:
        """Karras et al.'s sigmas at positions ``ramp`` (0: ``sigma_max``, 1: ``sigma_min``)."""
        cfg = self.config
        rho = cfg.rho
        min_inv_rho = cfg.sigma_min ** (1 / rho)
        max_inv_rho = cfg.sigma_max ** (1 / rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[List[int]] = None) -> None:
        """diffusers' schedule: ``num_inference_steps`` timesteps evenly spaced in
        ``[0, num_train_timesteps)``, or the given descending integer ``timesteps``, each mapped
        to a Karras sigma (``sigmas`` ends with ``sigma_min``) and to the model's timestep
        ``sigma_to_t(sigma)``; and every step's kernel coefficients."""
        T = self.config.num_train_timesteps
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Exactly one of `num_inference_steps` or `timesteps` must be supplied.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps`.")
        if timesteps is not None:
            schedule = self._custom_schedule(timesteps)
        else:
            n = num_inference_steps
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {n!r}")
            if n > T:
                raise ValueError(f"`num_inference_steps`: {n} cannot be larger than `self.config.train_timesteps`: "
                                 f"{T} as the unet model trained with this scheduler can only handle maximal {T} "
                                 "timesteps.")
            schedule = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64)

        # Map timesteps to Karras sigmas as diffusers (and openai/consistency_models) does
        ramp = schedule[::-1].copy() / (T - 1)
        with np.errstate(over="ignore", invalid="ignore"):
            sigmas = self._convert_to_karras(ramp)
            model_timesteps = self.sigma_to_t(sigmas)
            sigmas = np.concatenate([sigmas, [self.config.sigma_min]]).astype(np.float32)
        if not (np.isfinite(sigmas).all() and np.isfinite(model_timesteps).all()):
            raise ValueError(f"timesteps {schedule.tolist()} give sigmas {sigmas.tolist()}, beyond float32 range "
                             "(diffusers' steps are NaN there); pass timesteps nearer [0, num_train_timesteps)")

        if timesteps is None:
            self.num_inference_steps = num_inference_steps
        self.custom_timesteps = timesteps is not None
        model_timesteps = torch.from_numpy(model_timesteps)
        if str(device).startswith("mps"):  # mps has no float64, as in diffusers
            model_timesteps = model_timesteps.to(torch.float32)
        self._install(torch.from_numpy(sigmas), model_timesteps, device)
        self._table = self._shared_table(self._build_table)

    def _custom_schedule(self, timesteps) -> np.ndarray:
        """The integer schedule of user ``timesteps``, checked as diffusers checks them (and for
        what makes its steps NaN)."""
        values = timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps
        try:
            host = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"timesteps must be a 1-D sequence of numbers, got {timesteps!r}") from exc
        if host.ndim != 1 or host.size == 0:
            raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {host.shape}")
        if not np.isfinite(host).all():
            raise ValueError(f"timesteps must be finite numbers, got {host.tolist()}")
        if (host[1:] >= host[:-1]).any():
            raise ValueError("`timesteps` must be in descending order.")
        if host[0] >= self.config.num_train_timesteps:
            raise ValueError(
                f"`timesteps` must start before `self.config.train_timesteps`: {self.config.num_train_timesteps}.")
        return host.astype(np.int64)  # truncated toward zero, as diffusers' np.array(..., dtype=np.int64)

    def _install(self, sigmas: torch.Tensor, timesteps: torch.Tensor, device) -> None:
        """Adopt a schedule: ``sigmas`` (kept on the CPU in their dtype, float64 for the training
        schedule and float32 after ``set_timesteps``, as diffusers keeps them) and ``timesteps``."""
        self._set_sigmas(sigmas)
        self._set_timesteps(timesteps.to(device=device), timesteps.tolist())
        self._step_index = None
        self._begin_index = None

    def _set_sigmas(self, sigmas: torch.Tensor) -> None:
        cfg = self.config
        self.sigmas = sigmas.to("cpu")
        self._host_sigmas = self.sigmas.tolist()
        # diffusers divides by this number, computed in the sigmas' dtype: the same Python
        # value gives bit-identical model inputs
        self._input_div = ((self.sigmas ** 2 + cfg.sigma_data ** 2) ** 0.5).tolist()
        self._step_scalings = self._scalings(self.sigmas)

    def _scalings(self, sigmas: torch.Tensor) -> Dict[int, Tuple[float, float, float]]:
        """``(c_skip, c_out, sqrt(sigma_hat**2 - sigma_min**2))`` of every step index that has a
        next sigma, computed with diffusers' tensor arithmetic (in the sigmas' dtype)."""
        cfg = self.config
        n, T = len(sigmas), cfg.num_train_timesteps
        # diffusers' next sigma: sigmas[i + 1] while i + 1 < num_train_timesteps, else sigmas[-1]
        steps = [i for i in range(n) if i + 1 < n or i + 1 >= T]
        nexts = [i + 1 if i + 1 < T else n - 1 for i in steps]
        sigma, sigma_next = sigmas[steps], sigmas[nexts]
        c_skip, c_out = self.get_scalings_for_boundary_condition(sigma)
        sigma_hat = sigma_next.clamp(min=cfg.sigma_min, max=cfg.sigma_max)
        # NaN in diffusers where float32 rounding takes this below 0 (a step to sigma_min): 0 here
        spread = (sigma_hat ** 2 - cfg.sigma_min ** 2).clamp(min=0) ** 0.5
        return dict(zip(steps, zip(c_skip.tolist(), c_out.tolist(), spread.tolist())))

    def _build_table(self) -> CoefficientTable:
        return CoefficientTable({i: self._plan(i) for i in self._step_scalings})

    def _plan(self, i: int) -> StepPlan:
        c_skip, c_out, spread = self._step_scalings[i]
        # x0 = c_skip * x + c_out * m (clamped by the kernel);  prev = x0 + s_noise * spread * z
        return StepPlan(x0=(c_skip, c_out), sample=X0 + (float(self.config.s_noise) * spread) * NOISE)

    # ---------------------------------------------------------------- scalings

    def get_scalings(self, sigma) -> Tuple[torch.Tensor, torch.Tensor]:
        """EDM's ``(c_skip, c_out)`` at ``sigma`` (diffusers' ``get_scalings``; the step uses
        :meth:`get_scalings_for_boundary_condition`)."""
        sigma_data = self.config.sigma_data
        c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
        c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2) ** 0.5
        return c_skip, c_out

    def get_scalings_for_boundary_condition(self, sigma) -> Tuple[torch.Tensor, torch.Tensor]:
        """The consistency model's ``(c_skip, c_out)`` at ``sigma`` (Song et al. 2023, appendix C,
        with epsilon = ``sigma_min``): ``c_skip = 1`` and ``c_out = 0`` at ``sigma_min``, so that
        the model is the identity there."""
        sigma_min = self.config.sigma_min
        sigma_data = self.config.sigma_data
        c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
        c_out = (sigma - sigma_min) * sigma_data / (sigma ** 2 + sigma_data ** 2) ** 0.5
        return c_skip, c_out

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``sample / sqrt(sigma**2 + sigma_data**2)`` at the current step's sigma, the consistency
        model's input, bit for bit as diffusers computes it."""
        return super().scale_model_input(sample, timestep)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``original_samples + noise * sigma`` at each timestep's sigma (diffusers' positions: each
        timestep's own, or the current / begin index once a begin index is set)."""
        return super().add_noise(original_samples, noise, timesteps)

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None):
        """diffusers' ``step`` (same positional order): one fused kernel pass, returns
        ``CMStochasticIterativeSchedulerOutput(prev_sample)`` or ``(prev_sample,)``.
        ``variance_noise`` (unit normal; scaled by ``s_noise`` here) replaces the draw."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> CMStochasticIterativeSchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        _reject_integer_timestep(timestep, type(self).__name__)
        self._check_step_inputs(model_output, sample)
        for name, t in (("model_output", model_output), ("sample", sample)):
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        check_variance_noise(variance_noise, sample, "the sample's shape")
        self._require_table()
        i = self._index_for_step(timestep)
        if i not in self._table:  # (timesteps assigned longer than the sigmas)
            raise IndexError(f"step {i} has no next sigma: sigmas has {len(self._host_sigmas)} entries; "
                             "call set_timesteps again")
        model_dtype = model_output.dtype if cond is None else torch.promote_types(model_output.dtype, cond.dtype)
        noise = None
        if len(self._host_timesteps) > 1:  # diffusers draws at every step of a multistep schedule only
            noise = self._noise(variance_noise, generator, model_output, model_dtype)
        prev_dtype = torch.promote_types(model_dtype, sample.dtype)
        if sample.dtype != prev_dtype:
            sample = sample.to(prev_dtype)
        result = self._fused(i, sample, model_output, cond=cond, guidance_scale=guidance_scale,
                             noise=noise if self._table.plan(i).uses("noise") else None,
                             clip_value=1.0 if self.config.clip_denoised else None)
        self._step_index += 1
        return CMStochasticIterativeSchedulerOutput(result.sample)
