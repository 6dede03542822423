"""DPM-Solver / DPM-Solver++ inversion (image -> noise), as a drop-in for diffusers'
``DPMSolverMultistepInverseScheduler``: the multistep updates of
:class:`~kdfast.schedulers.DPMSolverMultistepScheduler` run up an ascending noise schedule."""
from __future__ import annotations

from typing import List, Optional, Union

import numpy as np
import torch

from ._config import register_to_config
from ._schedule import (beta_sigmas, exponential_sigmas, karras_sigmas, last_unclipped_timestep, sigma_range,
                        sigma_to_t)
from .dpmsolver_multistep import DPMSolverMultistepScheduler, check_dpm_solver_config
from .euler_discrete import KARRAS_SCHEDULERS


class DPMSolverMultistepInverseScheduler(DPMSolverMultistepScheduler):
    """Drop-in for ``diffusers.DPMSolverMultistepInverseScheduler``: same arguments, config and
    schedule.

    The schedule climbs from the least noisy training timestep to the noisiest one kept by
    ``lambda_min_clipped``, its sigmas ending with that timestep's sigma (with Karras,
    exponential or beta sigmas: the last sigma repeated, a last step of length zero). Every step
    is the DPM-Solver(++) multistep update of :class:`DPMSolverMultistepScheduler` between two
    of these sigmas (``h = lambda_t - lambda_s < 0``), one fused kernel pass: model-output
    conversion, clipping, the update, the new history entry and, for the SDE variants, the
    noise, drawn as diffusers draws it (same generator calls, shape and dtype: the model
    output's). Dynamic thresholding adds one reduction pass before it.

    As in diffusers, ``use_flow_sigmas=True`` keeps the forward (descending) flow schedule, the
    final step's order is lowered only by ``euler_at_final`` and ``lower_order_final``, and
    timesteps that repeat are dropped while their sigmas are kept.

    Where diffusers fails, this scheduler raises a clear error or stays finite:

    - a zero-length step (the repeated last sigma; trailing spacing, which ends at the noisiest
      timestep and appends its sigma again) leaves the sample as it is, and the step after a
      zero-length one takes the highest order defined there (diffusers divides 0 by 0: NaN);
    - the SDE variants cannot go up the noise schedule (their noise variance is negative for
      ``h < 0``: every diffusers step is NaN): ``set_timesteps`` raises, except on the
      descending flow schedule;
    - a third-order step of an SDE variant, which diffusers' inverse scheduler does not define
      (an assertion fails), raises ``ValueError``;
    - flow sigmas with Karras / exponential / beta spacing are refused at construction;
    - with those spacings and a ``sigma_min`` / ``sigma_max`` in the config (as EDM-style
      pipelines' configs carry), diffusers spaces its sigmas down from ``sigma_max`` to
      ``sigma_min``, a schedule that does not invert; this one climbs from ``sigma_min`` to
      ``sigma_max``.
    """

    _diffusers_name = "DPMSolverMultistepInverseScheduler"
    _no_third_order = ("sde-dpmsolver", "sde-dpmsolver++")
    _compatibles = KARRAS_SCHEDULERS

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        lambda_min_clipped: float = -float("inf"),
        variance_type: Optional[str] = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        check_dpm_solver_config(self)
        plus = self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
        if prediction_type == "flow_prediction" and not plus:
            raise ValueError("prediction_type 'flow_prediction' needs algorithm_type dpmsolver++ or sde-dpmsolver++ "
                             "(diffusers raises in the step)")
        self._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self._set_timesteps(torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                         dtype=np.float32)))
        # diffusers keeps these as attributes too
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None) -> None:
        """Compute the ascending timesteps and sigmas, and every step's kernel coefficients."""
        cfg = self.config
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n, T = int(num_inference_steps), cfg.num_train_timesteps
        self.noisiest_timestep = noisiest = last_unclipped_timestep(self.lambda_t, cfg.lambda_min_clipped) - 1
        if cfg.timestep_spacing == "linspace":
            timesteps = np.linspace(0, noisiest, n + 1).round()[:-1].copy().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = (noisiest + 1) // (n + 1)
            timesteps = (np.arange(0, n + 1) * ratio).round()[:-1].copy().astype(np.int64) + cfg.steps_offset
        else:
            timesteps = np.arange(noisiest + 1, 0, -T / n).round()[::-1].copy().astype(np.int64) - 1

        train = self._train_sigmas()
        log_sigmas = np.log(train)
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            spacing = (karras_sigmas if cfg.use_karras_sigmas else
                       exponential_sigmas if cfg.use_exponential_sigmas else beta_sigmas)
            # up from the config's sigma_min (else the least noisy training sigma) to its
            # sigma_max (else the noisiest): the spacings run from their second argument
            lo, hi = sigma_range(cfg, np.flip(train))
            sigmas = spacing(hi, lo, n)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg.use_karras_sigmas:
                timesteps = timesteps.round().astype(np.int64)
            sigmas = np.concatenate([sigmas, sigmas[-1:]])
        elif cfg.use_flow_sigmas:  # (diffusers' forward flow schedule, descending)
            s = 1.0 - np.linspace(1, 1 / T, n + 1)
            sigmas = np.flip(cfg.flow_shift * s / (1 + (cfg.flow_shift - 1) * s))[:-1].copy()
            timesteps = (sigmas * T).copy()
            sigmas = np.concatenate([sigmas, sigmas[-1:]])
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
            sigmas = np.concatenate([sigmas, [train[noisiest]]])
        # Timesteps repeated (as many steps as training timesteps, Karras rounding) are dropped,
        # their sigmas are not: diffusers' loop then stops short of the last sigmas.
        _, first = np.unique(timesteps, return_index=True)
        timesteps = timesteps[np.sort(first)]
        if cfg.algorithm_type.startswith("sde"):
            up = np.asarray(sigmas, dtype=np.float32)
            if (up[1:len(timesteps) + 1] > up[:len(timesteps)]).any():
                raise ValueError(f"algorithm_type={cfg.algorithm_type!r} cannot step up the noise schedule: its noise "
                                 "variance (1 - exp(-2h), or exp(2h) - 1) is negative for h = lambda_t - lambda_s < 0 "
                                 "(diffusers' steps are all NaN); invert with 'dpmsolver++' or 'dpmsolver'")
        self._install_schedule(sigmas, timesteps, device)

    # ---------------------------------------------------------------- step

    _noise_in_converted_dtype = True  # (as diffusers' inverse scheduler draws it)

