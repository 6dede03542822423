"""Euler steps between any two timesteps of a flow-map-distilled model (AnyFlow), as a drop-in
for diffusers' ``FlowMapEulerDiscreteScheduler``."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._config import register_to_config
from ._linear import MODEL, X
from ._schedule import check_shift
from .._checks import check_count
from .base import FusedScheduler, GrowingTable, SchedulerOutput, StepPlan, reject_unknown_step_arguments

# diffusers' index_for_timestep: a timestep within this distance (in float32) of one of the
# schedule's is that one
_TOLERANCE = 1e-3


class FlowMapEulerDiscreteSchedulerOutput(SchedulerOutput):
    """Like diffusers' FlowMapEulerDiscreteSchedulerOutput: ``.prev_sample`` (the sample at
    ``r_timestep``), ``out[0]``, ``out["prev_sample"]`` (and the rest of
    :class:`~kdfast.schedulers.base.OutputFields`), ``to_tuple()``."""

    __slots__ = ()
    _fields = ("prev_sample",)

    def __repr__(self) -> str:
        return f"FlowMapEulerDiscreteSchedulerOutput(prev_sample={self.prev_sample!r})"


class FlowMapEulerDiscreteScheduler(FusedScheduler):
    """Drop-in for ``diffusers.FlowMapEulerDiscreteScheduler``: same arguments, config,
    schedule (``shift``, custom ``sigmas`` or ``timesteps``), state and step.

    A flow-map model predicts the mean velocity ``v`` over an interval, so one step goes from
    ``timestep`` to any ``r_timestep``: ``z_r = z_t - (sigma_t - sigma_r) * v``. As in diffusers,
    each sigma is looked up in ``sigmas`` at the position of its timestep in ``timesteps`` (a
    match within 1e-3, compared in float32, the first such position), else it is the timestep
    divided by ``num_train_timesteps`` (any-step sampling off the schedule); ``r_timestep``
    defaults to the next timestep of the schedule (sigma 0 after the last). The step is a pure
    function of the two timesteps: ``step_index`` is only observable state, set on the first
    step (to ``begin_index`` when set, else to the timestep's position, or 0 off the schedule)
    and counted up by each step.

    Each ``step`` (and ``step_cfg``, which fuses classifier-free guidance) is one fused kernel
    pass, with the step's coefficient planned on the host: diffusers computes the update in
    float64 and casts it to the model output's dtype, three passes. A timestep that is an
    element of ``timesteps`` (what loops pass, also expanded to the batch) is found from its
    address, Python numbers are looked up on the host: neither reads a tensor back. A tensor
    that is not an element of the schedule is read back once, as diffusers reads every
    timestep. A batch of off-schedule timesteps (one sigma per sample, in diffusers) runs
    diffusers' unfused formula.

    Unlike diffusers, a timestep or ``r_timestep`` that is NaN or infinite is an error (diffusers
    takes a NaN one for the schedule's first timestep and steps to NaN from an infinite one),
    as is a schedule with a non-finite sigma.
    """

    _diffusers_name = "FlowMapEulerDiscreteScheduler"
    _compatibles: Sequence[str] = ()
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
    ):
        check_count("num_train_timesteps", num_train_timesteps, 1)
        check_shift(shift)
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        self._table = None
        # diffusers sets a num_train_timesteps schedule here; its coefficients are made on the
        # first step that needs them
        self._set_schedule(num_train_timesteps, "cpu", None, None, build=False)

    # ---------------------------------------------------------------- schedule

    def apply_shift(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The configured shift ``shift * s / (1 + (shift - 1) * s)`` of ``sigmas`` (the identity
        for ``shift=1``)."""
        shift = self.config.shift
        if shift == 1.0:
            return sigmas
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None,
                      sigmas: Optional[List[float]] = None, timesteps: Optional[List[float]] = None) -> None:
        """diffusers' schedule, value for value: ``num_inference_steps`` sigmas shifted from a
        linspace of 1 to 0 (or the shifted custom ``sigmas``, or ``timesteps`` divided by
        ``num_train_timesteps``), then a final 0; ``timesteps`` are the sigmas but the last
        times ``num_train_timesteps``, float64 (float32 on MPS / NPU). Plans the coefficients
        of the steps to the next timestep and to the end; starts a new loop (``step_index``
        and ``begin_index`` reset)."""
        self._set_schedule(num_inference_steps, device, sigmas, timesteps, build=True)

    def _set_schedule(self, num_inference_steps, device, sigmas, timesteps, build: bool) -> None:
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("`sigmas` and `timesteps` should have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                    timesteps is not None and len(timesteps) != num_inference_steps):
                raise ValueError("`sigmas` and `timesteps` should have the same length as `num_inference_steps` "
                                 "when both are provided")
        elif sigmas is not None:
            num_inference_steps = len(sigmas)
        elif timesteps is not None:
            num_inference_steps = len(timesteps)
        else:
            raise ValueError("`num_inference_steps` must be provided when both `sigmas` and `timesteps` are `None`")
        n = check_count("num_inference_steps", num_inference_steps, 1)
        T = self.config.num_train_timesteps

        device_obj = torch.device(device) if device is not None and not isinstance(device, torch.device) else device
        low_precision = device_obj is not None and device_obj.type in ("mps", "npu")  # no float64 there
        out_dtype = torch.float32 if low_precision else torch.float64

        # The same torch operations in float64 on the CPU as diffusers: the same numbers, bit for bit.
        if sigmas is not None:
            working, name = self._float64(sigmas, "sigmas"), "sigmas"
        elif timesteps is not None:
            working, name = self._float64(timesteps, "timesteps") / T, "timesteps"
        else:
            working, name = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1], "shift"
        working = self.apply_shift(working)
        if working.dim() != 1:
            raise ValueError(f"{name} must be a 1-D sequence, got shape {tuple(working.shape)}")
        full = torch.cat([working, working.new_zeros(1)]).to(out_dtype)
        host_sigmas = full.tolist()
        if not all(math.isfinite(v) for v in host_sigmas):
            # (diffusers' steps from such a schedule are NaN or infinite)
            bad = "sigmas" if name == "sigmas" else name
            raise ValueError(f"the schedule has non-finite sigmas (check {bad} and shift={self.config.shift}): "
                             f"{host_sigmas}")
        host_timesteps = full[:-1] * T

        self.num_inference_steps = n
        self._host_sigmas = host_sigmas
        self.sigmas = full.to(device=device)
        self._set_timesteps(host_timesteps.to(device=device), host_timesteps.tolist())
        self._step_index = None
        self._begin_index = None
        self._table = self._shared_table(self._build_table) if build else None

    @staticmethod
    def _float64(values, name: str) -> torch.Tensor:
        """``torch.tensor(values, dtype=torch.float64)`` on the CPU, as diffusers makes custom schedules."""
        if isinstance(values, torch.Tensor):
            return values.detach().to("cpu", torch.float64)
        try:
            return torch.tensor(values, dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from exc

    def _set_timesteps(self, timesteps, host: Optional[Sequence[float]] = None) -> None:
        super()._set_timesteps(timesteps, host)
        # diffusers compares in float32 (``self.timesteps.float() - t``): the schedule as it sees it,
        # and for each element the first position holding the same float32 value (its argmin)
        ts32 = np.asarray(self._host_timesteps, dtype=np.float64).astype(np.float32)
        first = {}
        self._timesteps32 = ts32
        self._first_equal = [first.setdefault(float(v), k) for k, v in enumerate(ts32)]

    def _build_table(self) -> GrowingTable:
        # the step to the next timestep (r_timestep=None) and to the end (r_timestep=0) from each one
        host = self._host_sigmas
        lengths = {host[i] - host[i + 1] for i in range(len(host) - 1)} | {host[i] - 0.0 for i in range(len(host) - 1)}
        return GrowingTable({d: self._plan(d) for d in sorted(lengths)})

    @staticmethod
    def _plan(length: float) -> StepPlan:
        """``z_r = z_t - (sigma_t - sigma_r) * v`` for ``length = sigma_t - sigma_r``."""
        # (x0 is not an output of this step: the kernel's x0 is the velocity, unused)
        return StepPlan(x0=(0.0, 1.0), sample=X - length * MODEL)

    # ---------------------------------------------------------------- timestep lookup

    def index_for_timestep(self, timestep) -> Optional[int]:
        """The position of ``timestep`` (its first element, for a tensor) in ``timesteps``, or
        None when it is not within 1e-3 of one of them (compared in float32, as diffusers
        compares; of equal ones, the first). An element of ``timesteps`` is found from its
        address, without reading it back."""
        if self._timesteps is None:
            return None
        return self._lookup(timestep, "timestep")[0]

    def _lookup(self, timestep, name: str) -> Tuple[Optional[int], Optional[float]]:
        """(position in ``timesteps`` or None, the timestep's value when it had to be read)."""
        self._refresh_host_timesteps()  # (timesteps edited in place since: read back once)
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() == 0:
                raise ValueError(f"{name} is an empty tensor; pass one of scheduler.timesteps or a number")
            first = timestep if timestep.dim() == 0 else timestep.reshape(-1)[0]
            k = self.schedule_index(first)
            if k is not None:
                return self._first_equal[k], None
            value = float(first.item())  # (not an element of the schedule: read back, as diffusers does)
        elif isinstance(timestep, (int, float, np.integer, np.floating)):
            value = float(timestep)
        else:
            raise TypeError(f"{name} must be a number or a tensor, got {type(timestep).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value} (diffusers takes a NaN timestep for the "
                             "schedule's first and steps to NaN from an infinite one)")
        ts32 = self._timesteps32
        if ts32.shape[0] == 0:
            return None, value
        with np.errstate(over="ignore", invalid="ignore"):
            diffs = np.abs(ts32 - np.float32(value))
        k = int(diffs.argmin())
        return (k if float(diffs[k]) <= _TOLERANCE else None), value

    def _off_schedule_sigma(self, timestep, value: float):
        """diffusers' fallback sigma ``timestep / num_train_timesteps``: in float32 for a Python
        number (``torch.tensor(number)``), in float64 for a tensor (per sample for a batch);
        ``sigmas``' own dtype on MPS / NPU."""
        T = self.config.num_train_timesteps
        sigma_dtype = self.sigmas.dtype
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() > 1:
                return None  # one sigma per sample: the unfused path computes them on the device
            sigma = value / T if sigma_dtype is torch.float64 else float(np.float32(np.float32(value) / np.float32(T)))
            return sigma
        if isinstance(timestep, np.generic) and not isinstance(timestep, np.integer):
            kind = np.float32 if timestep.dtype.itemsize < 4 else timestep.dtype.type  # (float16: in float32 math)
            sigma = float(timestep.dtype.type(kind(timestep) / kind(T)))
        else:  # a Python number becomes a float32 (or int64, divided in float32) tensor
            sigma = float(np.float32(np.float32(value) / np.float32(T)))
        return sigma if sigma_dtype is torch.float64 else float(np.float32(sigma))

    def _sigma(self, timestep, name: str) -> Tuple[Optional[int], Optional[float]]:
        """(position, sigma) of ``timestep``: ``sigmas[position]`` on the schedule, else the
        fallback (None: one per sample, made by the unfused path)."""
        k, value = self._lookup(timestep, name)
        if k is not None:
            if k >= len(self._host_sigmas):
                raise IndexError(f"{name} is timesteps[{k}], but sigmas has {len(self._host_sigmas)} entries; "
                                 "assigned timesteps must keep the schedule's length")
            return k, self._host_sigmas[k]
        with np.errstate(over="ignore"):
            sigma = self._off_schedule_sigma(timestep, value)
        if sigma is None:  # (a batch: its other entries must be finite too; it was read back anyway)
            finite = bool(torch.isfinite(timestep).all())
        else:
            finite = math.isfinite(sigma)
        if not finite:
            raise ValueError(f"{name} must be finite, and its sigma ({name} / num_train_timesteps, in float32 for a "
                             f"number) too: got {timestep!r} (diffusers' step is NaN or infinite)")
        return None, sigma

    def _init_step_index(self, timestep, index: Optional[int] = None) -> None:
        """The observable step counter's start: ``begin_index`` when set, else the position of
        the first timestep, or 0 when it is off the schedule (any-step sampling)."""
        if self._begin_index is not None:
            self._step_index = self._begin_index
        else:
            self._step_index = index if index is not None else 0

    # ---------------------------------------------------------------- forward process

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The sample as it is: flow-map models take it unscaled."""
        return sample

    def scale_noise(self, sample: torch.Tensor, timestep, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``t * noise + (1 - t) * sample`` with ``t = timestep / num_train_timesteps`` (per sample
        for a batch of timesteps), in the sample's dtype, as diffusers computes it."""
        if noise is None:
            raise ValueError("scale_noise needs `noise` (diffusers fails without it too)")
        timestep = torch.as_tensor(timestep).to(device=sample.device, dtype=sample.dtype)
        timestep = timestep / self.config.num_train_timesteps
        timestep = timestep.view(*timestep.shape, *([1] * (noise.ndim - timestep.ndim)))
        return timestep * noise + (1.0 - timestep) * sample

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, r_timestep=None,
             return_dict: bool = True, *, generator: Optional[torch.Generator] = None):
        """diffusers' ``step`` (same positional order): ``sample`` moved from ``timestep`` to
        ``r_timestep`` (default: the next timestep of the schedule) along the predicted
        velocity, in ``model_output``'s dtype. One fused kernel pass. Returns
        ``FlowMapEulerDiscreteSchedulerOutput(prev_sample)`` (or ``(prev_sample,)``).
        ``generator`` is accepted and unused (the step draws no noise)."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, None, r_timestep=r_timestep)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              r_timestep=None, **kwargs) -> FlowMapEulerDiscreteSchedulerOutput:
        # (generator, variance_noise: step_cfg's common arguments; this step draws no noise)
        reject_unknown_step_arguments(kwargs)
        if self.sigmas is None or self._timesteps is None:
            raise ValueError("`set_timesteps` has not been called.")
        self._check_step_inputs(model_output, sample)
        t_index, sigma_t = self._sigma(timestep, "timestep")
        if r_timestep is None:
            if t_index is None:
                raise ValueError("`r_timestep` is None but `timestep` is not on the current schedule, so `r` cannot "
                                 "be inferred. Please pass an explicit `r_timestep` for any-step sampling outside "
                                 "the schedule.")
            if t_index + 1 >= len(self._host_sigmas):
                raise IndexError(f"timestep is timesteps[{t_index}], the last of sigmas: there is no next sigma to "
                                 "step to; pass r_timestep")
            sigma_r = self._host_sigmas[t_index + 1]
        else:
            _, sigma_r = self._sigma(r_timestep, "r_timestep")
        if sigma_t is None or sigma_r is None:
            prev = self._per_sample_step(model_output, timestep, sample, r_timestep, cond, guidance_scale,
                                         sigma_t, sigma_r)
        else:
            if self._table is None:  # stepping on the schedule of __init__
                self._table = self._shared_table(self._build_table)
            length = sigma_t - sigma_r  # in float64 as diffusers subtracts the two (float32 on MPS / NPU)
            if self.sigmas.dtype is not torch.float64:
                length = float(np.float32(np.float32(sigma_t) - np.float32(sigma_r)))
            key = self._table.ensure(length, lambda: self._plan(length))
            # diffusers returns the (guided) model output's dtype
            dtype = model_output.dtype if cond is None else torch.promote_types(model_output.dtype, cond.dtype)
            if dtype.itemsize > sample.dtype.itemsize:
                # the step writes the sample's dtype: a wider model output's result must not pass through it
                sample = sample.to(dtype)
            prev = self._fused(key, sample, model_output, cond=cond, guidance_scale=guidance_scale).sample
            if prev.dtype != dtype:
                prev = prev.to(dtype)
        # the state changes only once the step has succeeded
        if self._step_index is None:
            self._init_step_index(timestep, t_index)
        self._step_index += 1
        return FlowMapEulerDiscreteSchedulerOutput(prev)

    def _per_sample_step(self, model_output, timestep, sample, r_timestep, cond, guidance_scale, sigma_t,
                         sigma_r) -> torch.Tensor:
        """diffusers' formula, unfused, for a batch of off-schedule timesteps (one sigma each)."""
        if cond is not None:
            model_output = model_output + guidance_scale * (cond - model_output)
        T, dtype, device = self.config.num_train_timesteps, self.sigmas.dtype, sample.device

        def as_tensor(sigma, t):
            if sigma is not None:
                return torch.tensor(sigma, dtype=dtype, device=device)
            return (t.to(dtype) / T).to(device=device, dtype=dtype)

        sigma_t, sigma_r = as_tensor(sigma_t, timestep), as_tensor(sigma_r, r_timestep)
        sigma_t = sigma_t.view(*sigma_t.shape, *([1] * (model_output.ndim - sigma_t.ndim)))
        sigma_r = sigma_r.view(*sigma_r.shape, *([1] * (model_output.ndim - sigma_r.ndim)))
        return (sample - (sigma_t - sigma_r) * model_output).to(model_output.dtype)
