"""The DDPM sampler of Würstchen and Stable Cascade (Pernias et al. 2023), as a diffusers drop-in.

Würstchen's schedule is continuous: timesteps are ratios in [0, 1] (``linspace(1, 0, n + 1)``,
the final 0 included), ``alpha_cumprod(t)`` is the cosine schedule of Nichol & Dhariwal (offset
``s``) of ``t`` warped by ``scaler``, and a step is DDPM's ancestral update from ``t`` to the next
timestep of the schedule. A step is one fused kernel pass, with a row of coefficients per sample
when the batch's timesteps differ.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..ops._tensors import outside_transforms
from ._config import register_to_config
from ._linear import MODEL, NOISE, X
from ._schedule import NUMBERS, finite_number
from .base import CheckedPlan, FusedScheduler, GrowingTable, SchedulerOutput, reject_unknown_step_arguments

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_timestep_dtype(name: str, t: torch.Tensor) -> None:
    if not (t.is_floating_point() or t.dtype in _INTEGER_DTYPES):  # (not bool, not complex)
        raise TypeError(f"{name} must hold timestep ratios in [0, 1] (a floating tensor), got a {t.dtype} tensor")


class DDPMWuerstchenScheduler(FusedScheduler):
    """Drop-in for ``diffusers.DDPMWuerstchenScheduler`` (Würstchen, Stable Cascade): same
    arguments (``scaler``, ``s``), config, attributes (``scaler``, ``s``, ``init_noise_sigma``,
    ``timesteps``, ``_alpha_cumprod``) and methods.

    A step from ``t`` (a tensor of one timestep per sample, or one for the batch: Stable
    Cascade's pipelines pass ``t.expand(batch).to(dtype)``) goes to the timestep after the one
    of the schedule nearest to ``timestep[0]``, as diffusers finds it, with
    ``alpha = alpha_cumprod(t) / alpha_cumprod(prev)``::

        prev_sample = sqrt(1 / alpha) * (x - (1 - alpha) / sqrt(1 - alpha_cumprod(t)) * model_output)
                      + sqrt((1 - alpha) * (1 - alpha_cumprod(prev)) / (1 - alpha_cumprod(t))) * noise

    the noise term dropped when ``prev`` is 0. ``alpha_cumprod`` values are diffusers' own (its
    float32 tensor operations, on the timestep in its own dtype: a bfloat16 ``timestep`` is
    rounded, as in diffusers), computed on the host; the coefficients are formed from them in
    float64. The step is one fused kernel pass; a batch whose samples sit at different
    timesteps is one pass too, each sample reading its own row of coefficients (all with the
    ``prev`` of ``timestep[0]``, as in diffusers). Noise is drawn at every step, the last
    included, exactly as diffusers draws it (same call, shape, dtype: ``model_output``'s), so
    generators stay in step draw for draw; ``variance_noise=`` (not in diffusers) replaces
    the draw. The result has ``model_output``'s dtype, as in diffusers.

    Host reads: none when ``timestep`` is a view of ``self.timesteps`` (an element,
    ``t.expand(batch)``, a slice), whose values come from the schedule's host copy, or is on the
    CPU; a tensor on a device that is not such a view (``t.expand(batch).to(torch.bfloat16)``)
    is read back once per step.

    Deviations from diffusers, where it fails or gives NaN:

    * ``set_timesteps`` checks its timesteps: at least two, finite, in [0, 1], strictly
      descending (diffusers takes any values; ascending ones give NaN).
    * A step from the schedule's last timestep (or one nearest to it) raises a ValueError
      (diffusers: IndexError); so does a sample whose timestep lies below the step's previous
      timestep (``alpha_cumprod`` rises: diffusers' noise scale is NaN) and a timestep outside
      [0, 1].
    * Where ``alpha_cumprod`` sits at its floor (1e-4) at both ends of a step, computed in two
      precisions (a float64 ``timestep``, a float32 schedule), rounding makes it rise by 2.5e-8
      and diffusers' noise scale NaN; kdfast's is 0 (the step is the identity, as it is in one
      precision).
    * ``timestep`` may also be a 0-d tensor or a number (one for the whole batch); diffusers
      needs a 1-D tensor.
    * ``_alpha_cumprod`` (and so ``add_noise``) takes the power of the warped timestep only
      where it is defined: a negative base, for which diffusers gives NaN (``t < 0`` with
      ``scaler < 1``, ``t > 1`` with a non-integer ``scaler > 1``), counts as 0.
    * ``num_inference_steps`` (the number of steps of the schedule) is kept, for kdfast's loops.
    """

    _diffusers_name = "DDPMWuerstchenScheduler"
    order = 1
    # The schedule's final 0 is where the loop ends, not a step from it (the pipelines step over
    # timesteps[:-1]); kdfast.sample does the same.
    _last_timestep_is_the_end = True

    @register_to_config
    def __init__(self, scaler: float = 1.0, s: float = 0.008) -> None:
        if finite_number("scaler", scaler) <= 0:
            raise ValueError(f"scaler must be > 0 (the timestep is raised to its power), got {scaler}")
        if finite_number("s", s) < 0:
            raise ValueError(f"s must be >= 0 (the offset of the cosine schedule), got {s}")
        self.scaler = scaler
        self.s = torch.tensor([s])
        self._init_alpha_cumprod = torch.cos(self.s / (1 + self.s) * torch.pi * 0.5) ** 2
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._table = None
        self.__dict__.pop("_timesteps", None)  # (a config assigned by a pipeline rebuilds the scheduler)

    # ---------------------------------------------------------------- schedule

    def _alpha_cumprod(self, t: torch.Tensor, device) -> torch.Tensor:
        """diffusers' ``alpha_cumprod(t)``, with its tensor operations in its order."""
        scaler = self.scaler
        if scaler > 1:
            base = 1 - t
            if not float(scaler).is_integer():  # (a negative base: NaN in diffusers)
                base = base.clamp(min=0)
            t = 1 - base ** scaler
        elif scaler < 1:
            t = t.clamp(min=0) ** scaler
        alpha_cumprod = torch.cos(
            (t + self.s.to(device)) / (1 + self.s.to(device)) * torch.pi * 0.5
        ) ** 2 / self._init_alpha_cumprod.to(device)
        return alpha_cumprod.clamp(0.0001, 0.9999)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    @property
    def timesteps(self) -> torch.Tensor:
        """The schedule: timestep ratios from 1 down to 0 (after ``set_timesteps``)."""
        return self._timesteps

    @timesteps.setter
    def timesteps(self, timesteps) -> None:
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.Tensor(timesteps)
        self._install(timesteps)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, timesteps=None, device=None) -> None:
        """diffusers' schedule: ``linspace(1, 0, num_inference_steps + 1)`` on ``device``, or the
        custom ``timesteps`` (a list: as a float32 tensor on ``device``; a tensor: kept as it is,
        as in diffusers); and the kernel coefficients of each step. Passing both is refused, as
        diffusers' docstring asks (its code takes the timesteps and ignores the count)."""
        if timesteps is None:
            if num_inference_steps is None:
                raise ValueError("set_timesteps: pass num_inference_steps or timesteps")
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                    or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
            host = torch.linspace(1.0, 0.0, int(num_inference_steps) + 1)
            self._install(host.to(device), host.tolist())  # (values made on the host: no read back)
            return
        if num_inference_steps is not None:
            raise ValueError("set_timesteps: pass num_inference_steps or timesteps, not both")
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.Tensor(timesteps).to(device)
        self._install(timesteps)

    def _install(self, timesteps: torch.Tensor, host: Optional[List[float]] = None) -> None:
        """Adopt a schedule (checked) and plan its steps."""
        _check_timestep_dtype("timesteps", timesteps)
        if timesteps.dim() != 1 or timesteps.shape[0] < 2:
            raise ValueError(f"timesteps must be a 1-D sequence of at least 2 timesteps (steps go from each to the "
                             f"next; the last is where the loop ends), got shape {tuple(timesteps.shape)}")
        if host is None:
            host = timesteps.detach().cpu().to(torch.float64).numpy().tolist()  # (one read of a device schedule)
        bad = [i for i, v in enumerate(host) if not 0.0 <= v <= 1.0]
        if bad:
            raise ValueError(f"timesteps must be ratios in [0, 1], got timesteps[{bad[0]}] = {host[bad[0]]}")
        if any(b >= a for a, b in zip(host, host[1:])):
            raise ValueError(f"timesteps must be strictly descending (from 1 towards 0), got {host}")
        self._start_new_loop()
        self._set_timesteps(timesteps, host)
        self.num_inference_steps = len(host) - 1
        self._table = self._shared_table(self._build_table)

    def _host_alpha_cumprod(self, values: Sequence[float], dtype: torch.dtype) -> List[float]:
        """``alpha_cumprod`` of timesteps of ``dtype`` as diffusers computes it (same operations,
        on the host)."""
        t = torch.tensor(list(values), dtype=torch.float64).to(dtype)  # (exact: values of dtype)
        return self._alpha_cumprod(t, "cpu").to(torch.float64).numpy().tolist()

    def _build_table(self) -> GrowingTable:
        host, dtype = self._host_timesteps, self._timesteps.dtype
        acs = self._host_alpha_cumprod(host, dtype)
        return GrowingTable({(host[i], dtype, host[i + 1], dtype): self._plan(host[i], host[i + 1], acs[i], acs[i + 1])
                             for i in range(len(host) - 1)})

    def _plan(self, t: float, prev: float, ac: float, ac_prev: float) -> CheckedPlan:
        """The step from ``t`` to ``prev`` (``ac``, ``ac_prev``: their alpha_cumprod), in float64."""
        if t < prev:
            error = (f"timestep {t:g} lies below the step's previous timestep {prev:g} (found from timestep[0], as "
                     f"in diffusers): alpha_cumprod would rise ({ac:g} -> {ac_prev:g}) and the noise variance be "
                     "negative (diffusers' step gives NaN); pass timesteps at or above it")
            return CheckedPlan(x0=(0.0, 0.0), sample=X, error=error)
        alpha = ac / ac_prev
        c_x = math.sqrt(1.0 / alpha)
        update = c_x * X - c_x * (1.0 - alpha) / math.sqrt(1.0 - ac) * MODEL
        if prev != 0:
            # At 0 where alpha_cumprod meets its floor in two precisions (a float64 t = 1 and a float32
            # prev: 1e-4 > float32(1e-4)); diffusers takes the square root of -2.5e-8 there: NaN
            variance = max(0.0, (1.0 - alpha) * (1.0 - ac_prev) / (1.0 - ac))
            update = update + math.sqrt(variance) * NOISE
        plan = CheckedPlan(x0=(0.0, 0.0), sample=update)  # (no x0: diffusers' step returns none)
        return CheckedPlan.of(plan, lambda: f"timestep {t:g}: the step's coefficients are not finite "
                                            f"(alpha_cumprod {ac:g}, previous {ac_prev:g})")

    def _entry(self, t: float, dtype: torch.dtype, prev: float):
        """The table entry of the step from ``t`` (of ``dtype``) to ``prev``, made on first use."""
        schedule_dtype = self._timesteps.dtype

        def make() -> CheckedPlan:
            ac = self._host_alpha_cumprod([t], dtype)[0]
            ac_prev = self._host_alpha_cumprod([prev], schedule_dtype)[0]
            return self._plan(t, prev, ac, ac_prev)

        return self._table.ensure((t, dtype, prev, schedule_dtype), make)

    # ---------------------------------------------------------------- timesteps of a step

    def _timestep_values(self, timestep) -> Tuple[List[float], torch.dtype]:
        """The values of ``timestep`` (flattened) and its dtype: from the schedule's host copy for a
        view of ``self.timesteps``, from host memory for a CPU tensor or a number, else read back once."""
        if not isinstance(timestep, torch.Tensor):
            if isinstance(timestep, bool) or not isinstance(timestep, NUMBERS):
                raise TypeError(f"timestep must be a tensor of timestep ratios in [0, 1] (or a number), got "
                                f"{type(timestep).__name__}")
            timestep = torch.tensor(timestep)  # (a float: float32, as torch.tensor makes it)
        _check_timestep_dtype("timestep", timestep)
        if timestep.numel() == 0:
            raise ValueError(f"timestep: got an empty tensor of shape {tuple(timestep.shape)}")
        if not any(timestep.stride()):  # an element, t.expand(batch): one value for the batch
            first = self.schedule_index(timestep[(0,) * timestep.dim()] if timestep.dim() else timestep)
            if first is not None:
                return [self._host_timesteps[first]], timestep.dtype
        return [float(v) for v in self.timestep_values(timestep).tolist()], timestep.dtype

    def _nearest_index(self, value: float, dtype: torch.dtype) -> int:
        """diffusers' ``(self.timesteps - timestep[0]).abs().argmin()``, on the host."""
        host = self._host_timesteps
        cache = self.__dict__.get("_nearest_cache")
        if cache is None or cache[0] is not host:
            first: Dict[float, int] = {}
            for i, v in enumerate(host):
                first.setdefault(v, i)
            cache = self._nearest_cache = (host, first, {})
        schedule_dtype = self._timesteps.dtype
        if dtype == schedule_dtype and value in cache[1]:  # a value of the schedule: where it is
            return cache[1][value]
        index = cache[2].get((value, dtype))
        if index is None:
            if len(cache[2]) >= 1024:  # off-schedule values (random t in training): keep the latest
                cache[2].pop(next(iter(cache[2]), None), None)
            with outside_transforms():  # (host constants; inside a transform they would have no storage)
                schedule = torch.tensor(host, dtype=torch.float64).to(schedule_dtype)
                t0 = torch.tensor(value, dtype=torch.float64).to(dtype)
                index = cache[2][(value, dtype)] = int((schedule - t0).abs().argmin().numpy())
        return index

    def _previous_index(self, values: List[float], dtype: torch.dtype) -> int:
        """The schedule position of the step's previous timestep: after the one nearest to the first value."""
        host = self._host_timesteps
        index = self._nearest_index(values[0], dtype)
        if index >= len(host) - 1:
            raise ValueError(
                f"timestep {values[0]:g}: the schedule's timestep nearest to it is its last one ({host[-1]:g}), "
                "where the loop ends: no step starts there (loop over timesteps[:-1], as Stable Cascade's pipelines "
                "do; diffusers raises an IndexError)")
        return index + 1

    def previous_timestep(self, timestep) -> torch.Tensor:
        """diffusers' ``previous_timestep``: the schedule's timestep after the one nearest to
        ``timestep[0]``, expanded to ``timestep``'s length (a view of ``self.timesteps``)."""
        self._require_schedule()
        self._refresh_host_timesteps()
        values, dtype = self._timestep_values(timestep)
        self._check_range(values)
        prev = self._timesteps[self._previous_index(values, dtype)]
        if isinstance(timestep, torch.Tensor) and timestep.dim() >= 1:
            return prev[None].expand(timestep.shape[0])
        return prev

    def _require_schedule(self) -> None:
        if self._table is None or getattr(self, "_timesteps", None) is None:
            raise ValueError(f"{type(self).__name__} has no schedule: call set_timesteps(...) before step(...)")

    @staticmethod
    def _check_range(values: List[float]) -> None:
        bad = [i for i, v in enumerate(values) if not 0.0 <= v <= 1.0]
        if bad:
            raise ValueError(f"timestep must hold ratios in [0, 1], got {values[bad[0]]} at index {bad[0]}")

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: Optional[torch.Tensor] = None):
        """diffusers' ``step`` (same positional order): one fused kernel pass.

        Args:
            model_output: the model's (noise) prediction, shaped like ``sample``.
            timestep: a tensor of one timestep ratio per sample, or one for the batch (what Stable
                Cascade's pipelines pass: ``t.expand(batch).to(dtype)``); a 0-d tensor or a number
                works too.
            sample: the current latents ``[batch, ...]``.
            generator: a ``torch.Generator`` (or a list, one per sample) the noise is drawn from.
            return_dict: ``SchedulerOutput(prev_sample)``, or the tuple ``(prev_sample,)``.
            variance_noise: (not in diffusers) the step's standard normal noise, instead of a draw.
        """
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        self._require_schedule()
        self._check_step_inputs(model_output, sample)
        if sample.dim() == 0:
            raise ValueError("sample must have a batch dimension, got a 0-d tensor")
        batch = sample.shape[0]
        self._refresh_host_timesteps()
        values, dtype = self._timestep_values(timestep)  # (one value for an expanded one)
        count = timestep.numel() if isinstance(timestep, torch.Tensor) else 1
        if count not in (1, batch):
            raise ValueError(f"timestep: got {count} timesteps for a batch of {batch} samples; pass one per "
                             "sample (Stable Cascade's pipelines pass t.expand(batch)) or one for the batch")
        self._check_range(values)
        prev = self._host_timesteps[self._previous_index(values, dtype)]
        entries = {}
        for v in dict.fromkeys(values):
            entries[v] = entry = self._entry(v, dtype, prev)
            self._raise_if_undefined(entry)  # (before the noise draw: a refused step leaves the generator as it was)
        # drawn at every step, the last included (where it is multiplied by 0), as diffusers draws it
        noise = self._variance_noise(variance_noise, generator, model_output, model_output.dtype)
        if not any(self._table.plan(e).uses("noise") for e in entries.values()):
            noise = None
        # (one pass; a row of coefficients per sample when their timesteps differ)
        prev_sample = self._fused_per_sample([entries[v] for v in values], sample, model_output, cond=cond,
                                             guidance_scale=guidance_scale, noise=noise).sample
        if prev_sample.dtype != model_output.dtype:  # diffusers: pred.to(model_output.dtype)
            prev_sample = prev_sample.to(model_output.dtype)
        return SchedulerOutput(prev_sample)

    # ---------------------------------------------------------------- training-side helper

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(alpha_cumprod(t)) * x0 + sqrt(1 - alpha_cumprod(t)) * noise``, with diffusers'
        tensor operations (bit-identical); ``timesteps``: one per sample, or one for the batch."""
        if not isinstance(original_samples, torch.Tensor) or not isinstance(noise, torch.Tensor):
            raise TypeError("original_samples and noise must be torch.Tensor")
        if noise.shape != original_samples.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match original_samples shape "
                             f"{tuple(original_samples.shape)}")
        if original_samples.dim() == 0:
            raise ValueError("original_samples must have a batch dimension, got a 0-d tensor")
        if not isinstance(timesteps, torch.Tensor):
            if isinstance(timesteps, bool) or not isinstance(timesteps, NUMBERS):
                raise TypeError(f"timesteps must be a tensor of timestep ratios, got {type(timesteps).__name__}")
            timesteps = torch.tensor(timesteps)
        _check_timestep_dtype("timesteps", timesteps)
        batch = original_samples.shape[0]
        if timesteps.numel() not in (1, batch):
            raise ValueError(f"timesteps: got {timesteps.numel()} timesteps for a batch of {batch}; pass one per "
                             "sample or one for the batch")
        device, dtype = original_samples.device, original_samples.dtype
        timesteps = timesteps.to(device).reshape(-1)
        alpha_cumprod = self._alpha_cumprod(timesteps, device=device).view(
            timesteps.size(0), *[1 for _ in original_samples.shape[1:]])
        noisy_samples = alpha_cumprod.sqrt() * original_samples + (1 - alpha_cumprod).sqrt() * noise
        return noisy_samples.to(dtype=dtype)
