"""DDPM (Ho et al. 2020), with every diffusers variance type, clipping / thresholding, as a diffusers drop-in."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._config import register_to_config
from ._helpers import Thresholding
from ._linear import NOISE, X, X0
from ._schedule import (BETA_SCHEDULES, TIMESTEP_SPACINGS, check_choice, epsilon_x0_coefficients, make_betas,
                        rescale_zero_terminal_snr, x0_error)
from .base import (CheckedPlan, FusedScheduler, GrowingTable, SchedulerOutput, StepPlan, _AlphasCumprod,
                   reject_unknown_step_arguments)
from .euler_discrete import KARRAS_SCHEDULERS

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCES = ("learned", "learned_range")
DDPM_BETA_SCHEDULES = BETA_SCHEDULES + ("sigmoid", "laplace")


def _laplace_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' ``beta_schedule="laplace"``: alpha_bar from a Laplace-distributed log-SNR."""

    def alpha_bar(t: float) -> float:
        lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
        snr = math.exp(lmb)
        return math.sqrt(snr / (1 + snr))

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def ddpm_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str, trained_betas=None,
               rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """The betas of diffusers' DDPMScheduler: the shared schedules plus ``sigmoid`` and ``laplace``."""
    if trained_betas is None and beta_schedule in ("sigmoid", "laplace"):
        if beta_schedule == "sigmoid":
            betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
        else:
            betas = _laplace_betas(num_train_timesteps)
        return rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas
    return make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr)


def integer_timestep(scheduler: FusedScheduler, timestep) -> int:
    """The integer value of ``timestep``, read without a host sync when it is an element of
    ``scheduler.timesteps`` (what pipelines pass).

    DDPM and PNDM index ``alphas_cumprod`` with the timestep, so diffusers raises an IndexError
    for a float one (``500.0`` included); so does this, saying why."""
    index = scheduler.schedule_index(timestep)
    if index is not None and not timestep.is_floating_point():
        return int(scheduler._host_timesteps[index])
    if isinstance(timestep, torch.Tensor):
        if timestep.is_floating_point() or timestep.is_complex():
            raise IndexError(f"timestep must be an integer training timestep (it indexes alphas_cumprod, as in "
                             f"diffusers), got a {timestep.dtype} tensor")
        if timestep.numel() != 1:
            raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
        return int(timestep.item())
    if isinstance(timestep, (int, np.integer)):
        return int(timestep)
    if isinstance(timestep, np.ndarray) and timestep.size == 1 and np.issubdtype(timestep.dtype, np.integer):
        return int(timestep.reshape(()))  # (a 0-d array, as diffusers takes)
    raise IndexError(f"timestep must be an integer training timestep (it indexes alphas_cumprod, as in diffusers), "
                     f"got {type(timestep).__name__} {timestep!r}")


def noise_scales(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_prod), sqrt(1 - alpha_prod)) at ``timesteps``, shaped to broadcast against
    ``like``, with diffusers' own tensor operations in the same order: ``add_noise`` and
    ``get_velocity`` are bit-identical to diffusers' (training loops depend on them).

    As diffusers does, ``scheduler.alphas_cumprod`` is moved to ``like``'s device and kept
    there (one copy per device, not one per call)."""
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"timesteps must be a torch.Tensor of integer timesteps, got {type(timesteps).__name__}")
    if timesteps.is_floating_point() or timesteps.is_complex():
        raise IndexError(f"timesteps must be integer training timesteps (they index alphas_cumprod), got "
                         f"{timesteps.dtype}")
    if like.dim() and timesteps.numel() not in (1, like.shape[0]):
        raise ValueError(f"timesteps: got {timesteps.numel()} timesteps for a batch of {like.shape[0]}; pass one "
                         "per sample or a single one")
    alphas_cumprod = _AlphasCumprod.move(scheduler, like.device).to(dtype=like.dtype)
    timesteps = timesteps.to(like.device)
    sqrt_alpha_prod = (alphas_cumprod[timesteps] ** 0.5).flatten()
    sqrt_one_minus_alpha_prod = ((1 - alphas_cumprod[timesteps]) ** 0.5).flatten()
    while sqrt_alpha_prod.dim() < like.dim():
        sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
        sqrt_one_minus_alpha_prod = sqrt_one_minus_alpha_prod.unsqueeze(-1)
    return sqrt_alpha_prod, sqrt_one_minus_alpha_prod


class DDPMScheduler(Thresholding, FusedScheduler):
    """Drop-in for ``diffusers.DDPMScheduler``: same arguments, config, attributes and ``step``.

    As in diffusers, ``step`` reads the timestep's *value*: the previous timestep is the next
    one of ``timesteps`` after ``set_timesteps`` (custom ``timesteps`` included), and ``t - 1``
    before it (the full training chain, which diffusers steps without ``set_timesteps``).
    Noise is drawn for ``t > 0`` only, from ``generator`` exactly as diffusers draws it (same
    call, shape, dtype and device), or taken from the optional ``variance_noise=``.

    For the fixed variance types a step is one fused kernel pass: x0 (clipped or dynamically
    thresholded), the posterior mean and the noise term. The coefficients of each
    ``(timestep, previous timestep)`` pair are computed in ``set_timesteps`` with diffusers'
    own float32 tensor operations (``1 - a_t / a_prev`` cancels; computing it in float64
    instead would differ from diffusers by up to 1e-3 relative at small betas). Pairs outside
    the schedule get theirs on first use.

    ``learned`` and ``learned_range`` (the model output holds the variance in its second half
    of channels) make the noise scale depend on that output elementwise and nonlinearly
    (``exp(0.5 * log-variance)``): that term is computed with torch operations, unfused, as
    diffusers computes it, and the same single kernel pass adds it as its noise source. With
    ``step_cfg`` both halves of ``uncond`` / ``cond`` are guided, as ``step`` on the guided
    tensor would be.

    Where diffusers gives NaN, kdfast stays finite (and otherwise agrees):

    * ``fixed_large_log``: diffusers takes the square root of the log-variance ``log(beta_t)``
      (negative, so every noised step is NaN); kdfast uses the noise scale the log form
      stands for, ``exp(0.5 * log(beta_t))`` = ``sqrt(beta_t)``, as ``fixed_large`` does.
      Where ``beta_t`` is 1 (the first step of a zero-terminal-SNR schedule) diffusers' value,
      ``sqrt(log 1) = 0``, is finite, and kdfast follows it: that step adds no noise.
    * ``learned``: a negative predicted variance gives NaN in diffusers (``v ** 0.5``); kdfast
      clamps it at 0.

    Where diffusers' step is inf (an epsilon model at a timestep whose ``alphas_cumprod`` is 0,
    zero terminal SNR, without clipping or thresholding; a zero first beta), ``step`` raises a
    ValueError saying why, before drawing noise.

    ``pred_original_sample`` costs the step one more latent write, which pipelines rarely
    read: it is computed when first read, or written by the step with
    ``return_pred_original_sample=True``. ``_get_variance`` and ``previous_timestep`` are
    diffusers' (tensor results, for pipelines that call them).
    """

    _diffusers_name = "DDPMScheduler"
    _compatibles = KARRAS_SCHEDULERS
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        # None: what DPM-Solver's saved configs hold, and what diffusers' DDPM reads as fixed_small
        check_choice("variance_type", variance_type, VARIANCE_TYPES + (None,))
        check_choice("prediction_type", prediction_type, ("epsilon", "sample", "v_prediction"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, DDPM_BETA_SCHEDULES)
        self.betas = ddpm_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # (a copy: add_noise moves the attribute to the data's device, and an edit in place of the attribute
        # must not reach the steps unchecked)
        self._alphas_cumprod_cpu = self.alphas_cumprod.clone()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.variance_type = "fixed_small" if variance_type is None else variance_type
        self._set_timesteps(torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy()))
        self._step_index = None
        self._begin_index = None
        self._table = None  # made on the first step: training code that only adds noise never needs it
        self._log_variances: Dict[Tuple[int, int], Tuple[float, float]] = {}

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[List[int]] = None) -> None:
        """diffusers' timesteps (or the custom descending ``timesteps``) and the kernel
        coefficients of each step."""
        cfg = self.config
        T = cfg.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps`.")
        if timesteps is not None:
            values = np.asarray(timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps)
            if values.ndim != 1 or values.size == 0:
                raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {values.shape}")
            if np.any(values[1:] >= values[:-1]):
                raise ValueError("`custom_timesteps` must be in descending order.")
            if values[0] >= T:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {T}.")
            if values[-1] < 0:  # diffusers would index alphas_cumprod from its end
                raise ValueError(f"timesteps must be >= 0, got {values[-1]}")
            timesteps = np.array(values, dtype=np.int64)
            self.custom_timesteps = True  # num_inference_steps is left as it was, as in diffusers
        else:
            if int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
            n = int(num_inference_steps)
            if n > T:
                raise ValueError(f"`num_inference_steps`: {n} cannot be larger than `self.config.train_timesteps`: "
                                 f"{T} as the unet model trained with this scheduler can only handle maximal {T} "
                                 "timesteps.")
            if cfg.timestep_spacing == "linspace":
                timesteps = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
            elif cfg.timestep_spacing == "leading":
                timesteps = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + cfg.steps_offset
            else:
                timesteps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
            self.num_inference_steps = n
            self.custom_timesteps = False
        self._start_new_loop()
        self._set_timesteps(torch.from_numpy(timesteps).to(device), timesteps.tolist())
        self._table = self._shared_table(self._build_table)

    def _schedule_pairs(self) -> List[Tuple[int, int]]:
        return [(int(t), self._prev_timestep(int(t))) for t in dict.fromkeys(self._host_timesteps)]

    def _build_table(self) -> GrowingTable:
        pairs = self._schedule_pairs()
        scalars = self._scalars(pairs)
        return GrowingTable({(t, prev, self.variance_type): self._plan(t, s, self.variance_type)
                             for (t, prev), s in zip(pairs, scalars)})

    def _first_index(self) -> Dict[float, int]:
        """Timestep value -> its first position in the schedule (diffusers' lookup), per host copy."""
        host = self._host_timesteps
        cached = self.__dict__.get("_first_index_cache")
        if cached is None or cached[0] is not host:
            index: Dict[float, int] = {}
            for i, t in enumerate(host):
                index.setdefault(t, i)
            cached = self._first_index_cache = (host, index)
        return cached[1]

    def _prev_timestep(self, t: int) -> int:
        """``previous_timestep`` on the host, as an int."""
        if self.custom_timesteps or self.num_inference_steps:
            self._refresh_host_timesteps()
            index = self._first_index().get(t)
            if index is None:
                host = self._host_timesteps
                raise IndexError(f"timestep {t} is not one of the schedule's {len(host)} timesteps"
                                 + (f" ({host[0]:g} to {host[-1]:g})" if host else "") + "; pass one of them")
            host = self._host_timesteps
            return -1 if index == len(host) - 1 else int(host[index + 1])
        return t - 1

    def previous_timestep(self, timestep):
        """diffusers' ``previous_timestep``: the next timestep of the schedule (a tensor, -1 after
        the last), or ``timestep - 1`` before ``set_timesteps``."""
        if self.custom_timesteps or self.num_inference_steps:
            index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
            if index == self.timesteps.shape[0] - 1:
                return torch.tensor(-1)
            return self.timesteps[index + 1]
        return timestep - 1

    def _scalars(self, pairs: Sequence[Tuple[int, int]]) -> List[Dict[str, float]]:
        """diffusers' per-step scalars for ``(t, prev_t)`` pairs, with its float32 tensor
        operations in its order (vectorized over the pairs: the same IEEE results)."""
        ac = self._alphas_cumprod_cpu
        t = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
        prev = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
        alpha_prod_t = ac[t]
        alpha_prod_t_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], self.one)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
        columns = {
            "sqrt_alpha": alpha_prod_t ** 0.5,
            "sqrt_beta": beta_prod_t ** 0.5,
            "x0": (alpha_prod_t_prev ** 0.5 * current_beta_t) / beta_prod_t,
            "x": current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t,
            "fixed_small": variance ** 0.5,
            "fixed_small_log": torch.exp(0.5 * torch.log(variance)),
            "fixed_large": current_beta_t ** 0.5,
            # diffusers: sqrt(log(beta)), NaN but where beta is 1 (no noise there)
            "fixed_large_log": torch.where(current_beta_t >= 1, 0.0, torch.exp(0.5 * torch.log(current_beta_t))),
            "min_log": torch.log(variance),
            "max_log": torch.log(current_beta_t),
        }
        host = {k: v.tolist() for k, v in columns.items()}
        out = []
        for i, (ti, _) in enumerate(pairs):
            row = {k: v[i] for k, v in host.items()}
            row["noised"] = ti > 0
            out.append(row)
        return out

    def _plan(self, t: int, s: Dict[str, float], variance_type: str) -> CheckedPlan:
        """The step from ``t`` (``s``: its scalars), undefined where diffusers' step is inf or NaN:
        an epsilon model's x0 at alphas_cumprod 0 (zero terminal SNR) without clipping, or any
        other non-finite coefficient (a zero first beta: 1 - alphas_cumprod is 0 there)."""
        plan = self._update(s, variance_type)

        def error() -> str:
            a_t = s["sqrt_alpha"] ** 2
            if not all(math.isfinite(c) for c in plan.x0):
                return x0_error(t, a_t, self.config.rescale_betas_zero_snr)
            return (f"timestep {t}: the step's coefficients are not finite (alphas_cumprod[t] = {a_t:g}, "
                    f"1 - alphas_cumprod[t] = {s['sqrt_beta'] ** 2:g}); diffusers' step returns inf/NaN there")

        return CheckedPlan.of(plan, error)

    def _update(self, s: Dict[str, float], variance_type: str) -> StepPlan:
        cfg = self.config
        sa, sb = s["sqrt_alpha"], s["sqrt_beta"]
        if cfg.prediction_type == "epsilon":
            x0 = epsilon_x0_coefficients(sa, sb, bounded=cfg.clip_sample or cfg.thresholding)
        elif cfg.prediction_type == "sample":
            x0 = (0.0, 1.0)
        else:
            x0 = (sa, -sb)
        sample = s["x0"] * X0 + s["x"] * X
        if s["noised"]:
            # learned types: NOISE is the whole noise term, computed in torch (see the class docstring)
            sample = sample + (1.0 if variance_type in LEARNED_VARIANCES else s[variance_type]) * NOISE
        return StepPlan(x0=x0, sample=sample, aux=X0)  # aux: pred_original_sample, written when asked for

    def _ensure(self, t: int, prev: int, variance_type: str):
        if self._table is None:
            self._table = self._shared_table(self._build_table)
        return self._table.ensure((t, prev, variance_type),
                                  lambda: self._plan(t, self._scalars([(t, prev)])[0], variance_type))

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True, *,
             variance_noise: Optional[torch.Tensor] = None, return_pred_original_sample: bool = False):
        """diffusers' ``step`` (same positional order): one fused kernel pass.

        ``variance_noise`` (optional, not in diffusers): the standard normal noise of this step,
        instead of drawing it from ``generator``. Returns ``SchedulerOutput(prev_sample,
        pred_original_sample)``, x0 computed when first read (see the class docstring).
        """
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def _check_step_inputs(self, model_output: torch.Tensor, sample: torch.Tensor, name: str = "model_output") -> None:
        variance_type = self.variance_type
        if variance_type in LEARNED_VARIANCES and isinstance(model_output, torch.Tensor) \
                and isinstance(sample, torch.Tensor):
            expected = (sample.shape[0], 2 * sample.shape[1], *sample.shape[2:]) if sample.dim() >= 2 else None
            if expected is None or tuple(model_output.shape) != expected:
                raise ValueError(f"variance_type={variance_type!r}: {name} must hold the prediction and the "
                                 f"variance (twice the sample's channels: {expected}), got shape "
                                 f"{tuple(model_output.shape)}")
            return
        super()._check_step_inputs(model_output, sample, name)

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              return_pred_original_sample: bool = False, **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        variance_type = self.variance_type
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self._check_step_inputs(model_output, sample)
        t = integer_timestep(self, timestep)
        T = self.config.num_train_timesteps
        if not -T <= t < T:
            raise IndexError(f"timestep {t} is outside the training schedule [0, {T})")
        prev = self._prev_timestep(t)
        learned = variance_type in LEARNED_VARIANCES
        predicted_variance = None
        if learned:
            channels = sample.shape[1]
            model_output, predicted_variance = torch.split(model_output, channels, dim=1)
            if cond is not None:
                cond, cond_variance = torch.split(cond, channels, dim=1)
                predicted_variance = predicted_variance + guidance_scale * (cond_variance - predicted_variance)
        key = self._ensure(t, prev, variance_type)
        self._raise_if_undefined(key)  # (before the noise draw: a refused step leaves the generator as it was)
        noise = None
        if t > 0:
            noise = self._variance_noise(variance_noise, generator, model_output, model_output.dtype)
            if learned:
                noise = self._learned_std(predicted_variance, t, prev, variance_type) * noise
        cfg = self.config
        clip = cfg.clip_sample_range if cfg.clip_sample and not cfg.thresholding else None
        dynamic = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
        return self._fused_output(key, sample, model_output, want_x0=return_pred_original_sample, cond=cond,
                                  guidance_scale=guidance_scale, noise=noise, clip_value=clip, dynamic=dynamic)

    def _learned_std(self, predicted_variance: torch.Tensor, t: int, prev: int, variance_type: str) -> torch.Tensor:
        """The noise scale of the learned variance types, elementwise, as diffusers computes it."""
        if variance_type == "learned":
            # diffusers: predicted_variance ** 0.5, NaN where it is negative
            return predicted_variance.clamp(min=0) ** 0.5
        logs = self._log_variances.get((t, prev))
        if logs is None:
            s = self._scalars([(t, prev)])[0]
            logs = self._log_variances[(t, prev)] = (s["min_log"], s["max_log"])
        min_log, max_log = logs
        frac = (predicted_variance + 1) / 2
        return torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log))

    def _get_variance(self, t, predicted_variance: Optional[torch.Tensor] = None,
                      variance_type: Optional[str] = None) -> torch.Tensor:
        """diffusers' private method of that name (pipelines such as ParaDiGMS call it), with its
        tensor results: the *log*-variance for ``fixed_large_log``, the standard deviation for
        ``fixed_small_log``, the variance otherwise."""
        prev_t = self.previous_timestep(t)
        ac = self.alphas_cumprod
        alpha_prod_t = ac[t]
        alpha_prod_t_prev = ac[prev_t] if prev_t >= 0 else self.one
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
        variance_type = self.config.variance_type if variance_type is None else variance_type
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return torch.log(current_beta_t)
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(current_beta_t) + (1 - frac) * torch.log(variance)
        return variance

    # ---------------------------------------------------------------- training-side helpers

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise``, bit-identical to diffusers'."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = noise_scales(self, timesteps, original_samples)
        return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(a_t) * noise - sqrt(1 - a_t) * x0``, bit-identical to diffusers'."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = noise_scales(self, timesteps, sample)
        return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * sample
