"""The few-step PiFlow scheduler of distilled Kandinsky 6 checkpoints (pi-Flow, Chen et al. 2025), as a
drop-in for diffusers' ``PiflowScheduler``.

A PiFlow model predicts ``n_grid`` velocities per channel (its output is ``n_grid`` times wider than the
sample, in the last dimension). diffusers' step integrates a network-free policy between the model's
evaluations: up to ``num_policy_substeps`` Euler substeps per unit of raw time (~37 per step at 4
steps), each several full-latent tensor operations (x0 of the grid, a gather of two grid points, an
interpolation, the velocity, the update, three ``torch.where``). Every substep is linear in the
sample and in the grid predictions, with coefficients that depend on the schedule only, so a whole
step is exactly::

    prev_sample = a * sample + sum_g w[g] * model_output[..., g * C:(g + 1) * C]

``a`` and ``w`` are computed once per step in ``set_timesteps``: diffusers' float32 scalar arithmetic
is replayed on the host where it decides discrete things (the substep count ``round(delta * total)``,
the interpolation cell ``floor(t * (n_grid - 1))`` and its clamps, the ``eps`` clamps, the final
segment to ``eps``), the linear algebra is carried in float64. The step is then one pass of
:func:`kdfast.ops.grid_combination` with host-made weights: no host reads and no device tensors of its
own (CUDA-graph capturable).
(``x - x0`` does not depend on ``x``, so ``a`` is 1 up to float32's rounding of the interpolation
weights; it is kept as computed, so that the collapse stays exact.)
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..ops.grid_combination import grid_combination
from ._config import register_to_config
from .._checks import check_count
from ._schedule import NUMBERS, finite_number, is_integer_timestep
from .base import FusedScheduler, SchedulerOutput

_F32, _F64 = torch.float32, torch.float64
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# One step's coefficients [a, w_0, ..., w_{n_grid - 1}] (float64, read-only), as grid_combination takes them
StepCoefs = np.ndarray


class PiflowSchedulerOutput(SchedulerOutput):
    """Like diffusers' PiflowSchedulerOutput: ``.prev_sample``, ``out[0]``, ``out["prev_sample"]`` (and
    the rest of :class:`~kdfast.schedulers.base.OutputFields`), ``to_tuple()``."""

    __slots__ = ()
    _fields = ("prev_sample",)

    def __repr__(self) -> str:
        return f"PiflowSchedulerOutput(prev_sample={self.prev_sample!r})"


# ---------------------------------------------------------------- schedule and weights (host)


def _schedule(n: int, shift: float, final_step_size_scale: float, num_train_timesteps: int):
    """diffusers' schedule, with its torch float32 operations (on the CPU: the same numbers as on any
    device): ``(raw, sigmas, timesteps)``, ``sigmas`` without the final 0."""
    segment = 1.0 / (n - (1.0 - final_step_size_scale))
    raw = 1.0 - torch.arange(n, dtype=_F32) * segment
    sigmas = shift * raw / (1 + (shift - 1) * raw)
    return raw, sigmas, sigmas * num_train_timesteps


def _rollout_weights(raw_src: float, raw_dst: float, sigma_src: float, shift: float, eps: float, n_grid: int,
                     total_substeps: int) -> Tuple[float, np.ndarray]:
    """``(a, w)`` of one diffusers ``_policy_step`` from ``raw_src`` to ``raw_dst``.

    The scalars are float32 and go through diffusers' operations in its order (float32 numpy operations
    round as torch's do); only the linear map is float64. Substep ``k`` is
    ``x <- x + (x - x0_k) / max(sigma_k, eps) * (sigma_{k+1} - sigma_k)`` with
    ``x0_k = al_k * (x - s * m[t0_k]) + be_k * (x - s * m[t0_k + 1])`` (``s``: the step's sigma), so
    ``x <- q_k * x - r_k * x0_k``, ``r_k = d_k / c_k``, ``q_k = 1 + r_k``, and the whole rollout is
    ``prod(q) * x - sum_k r_k * prod(q_{j>k}) * x0_k``."""
    f = np.float32
    eps32, S, one_minus_s, s_minus_one = f(eps), f(shift), f(1.0 - shift), f(shift - 1.0)
    raw_src, raw_dst, sigma_src = f(raw_src), f(raw_dst), f(sigma_src)

    def unwarp(sigma):
        return sigma / (S + one_minus_s * sigma)

    # DXPolicy: the segment the grid spans, in the raw time of the unwarped sigma
    raw_t_src = unwarp(sigma_src)
    raw_t_dst = np.maximum(raw_t_src - (raw_src - raw_dst), f(0))
    segment_size = np.maximum(raw_t_src - raw_t_dst, eps32)
    # policy_rollout_fm: the substep count and size, then raw time by repeated float32 subtraction
    delta = raw_src - raw_dst
    count = max(int(np.rint(delta * f(total_substeps))), 1)
    substep = delta / f(count)
    chain = np.full(count + 1, substep, dtype=f)
    chain[0] = raw_src
    # (clamping every raw_t at 0, as diffusers does, is clamping the unclamped chain: once at 0 it stays)
    raw = np.maximum(np.subtract.accumulate(chain), f(0))
    sigma = np.empty(count + 1, dtype=f)
    sigma[0] = sigma_src
    sigma[1:] = (S * raw[1:]) / (f(1) + s_minus_one * raw[1:])
    sig = sigma[:-1]  # sigma at the start of each substep
    # DXPolicy.pi: the interpolation position of each substep in the grid
    t = (unwarp(sig) - raw_t_dst) / segment_size
    t = np.minimum(np.maximum(t, f(0)), f(1)) * f(n_grid - 1)
    t0 = np.clip(np.floor(t).astype(np.int64), 0, n_grid - 2)
    al = ((t0 + 1).astype(f) - t).astype(np.float64)
    be = (t - t0.astype(f)).astype(np.float64)
    d = (sigma[1:] - sig).astype(np.float64)
    c = np.maximum(sig, eps32).astype(np.float64)
    r = d / c
    q = 1.0 + r
    after = np.ones(count)  # prod(q_j for j > k)
    if count > 1:
        after[:-1] = np.cumprod(q[:0:-1])[::-1]
    k = r * after
    a = float(np.prod(q)) - float(np.sum(k * (al + be)))
    s = float(sigma_src)
    w = (np.bincount(t0, weights=k * s * al, minlength=n_grid)
         + np.bincount(t0 + 1, weights=k * s * be, minlength=n_grid))
    return a, w


@functools.lru_cache(maxsize=64)
def _schedule_weights(n: int, shift: float, n_grid: int, eps: float, final_step_size_scale: float,
                      num_policy_substeps: int, num_train_timesteps: int) -> Tuple[StepCoefs, ...]:
    """Every step's ``[a, w_0, ..., w_{n_grid - 1}]`` for a schedule; shared (read-only) by every
    scheduler with the same settings (pure function of them)."""
    raw, sigmas, _ = _schedule(n, shift, final_step_size_scale, num_train_timesteps)
    raw, sigmas = raw.tolist(), sigmas.tolist()
    steps = []
    for i in range(n):
        raw_dst = raw[i + 1] if i + 1 < n else eps  # the last segment ends at eps (float32), not 0
        a, w = _rollout_weights(raw[i], raw_dst, sigmas[i], shift, eps, n_grid, num_policy_substeps)
        values = [a, *w.tolist()]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"PiflowScheduler: step {i} of {n} has non-finite policy weights (shift={shift}, "
                             f"eps={eps}): {values}")
        row = np.array(values, dtype=np.float64)
        row.setflags(write=False)
        steps.append(row)
    return tuple(steps)


class PiflowScheduler(FusedScheduler):
    """Drop-in for ``diffusers.PiflowScheduler`` (distilled Kandinsky 6 checkpoints): same arguments,
    config, attributes (``timesteps``, ``sigmas``, ``n_grid``, ``eps``, ``final_step_size_scale``,
    ``num_policy_substeps``, ``num_inference_steps``, ``step_index``, ``begin_index``) and step.

    ``model_output`` is the model's widened output: shaped like the sample but for its last
    dimension, ``n_grid`` times the sample's channels (grid point ``g`` at ``[..., g*C:(g+1)*C]``).
    A step is diffusers' policy rollout collapsed into ``a * sample + sum_g w_g * grid_g`` (see the
    module docstring), applied by one :func:`kdfast.ops.grid_combination` kernel with the step's
    weights as kernel arguments: one launch, no host reads, no host-to-device copies, where diffusers'
    step makes ~335 full-latent passes (4 steps, 128 substeps per unit) and a host read.
    ``step_cfg`` fuses classifier-free guidance of two widened outputs (it is linear too: the
    scale is folded into the two outputs' weights, still one pass).

    Bytes: the sample is read once, each grid slice whose weight is not 0 once, the result written
    once: at most the ``(n_grid + 2)``-latent lower bound (``2 * n_grid + 2`` with guidance).
    (The kernels take up to 128 grid weights: ``n_grid`` above 128, or above 64 with guidance, is
    stepped by the op's pure-torch reference, one pass per grid slice.)

    Numerics as diffusers': float32 math (float32 weights, accumulated in float32) whatever the
    inputs' dtypes, the result cast to the sample's dtype. A float64 sample is stepped in float64
    with float64 weights (diffusers rounds it to float32 first). The collapse is exact: in float64,
    the step equals diffusers' rollout run on float64 tensors to ~1e-15.

    Deviations from diffusers, where its behaviour is undefined or an accident:

    * Arguments are checked with errors that name them: ``num_train_timesteps``, ``n_grid`` and
      ``num_policy_substeps`` must be integers, ``shift`` a finite number > 0 (diffusers' schedule
      is NaN for ``shift <= 0``), ``eps`` finite, ``num_inference_steps`` an integer >= 1.
    * ``timestep`` must be one value: a 0-d or one-element tensor, an expanded one
      (``t.expand(batch)``), or a number; diffusers compares a longer tensor elementwise with the
      schedule. Integer (and bool) timesteps of any kind are refused, as diffusers refuses Python
      ints and CPU int32/int64 tensors.
    * ``sample`` needs at least 2 dimensions (batch, ..., channels) and a floating dtype, the
      model output a floating dtype and the sample's device. A refused step changes nothing
      (diffusers sets ``step_index`` before checking the model output's shape).
    * ``num_inference_steps`` is ``None`` until ``set_timesteps`` (diffusers has no attribute).
    * Grid slices whose weight is exactly 0 are not read, so an inf or NaN there does not reach
      the result (diffusers multiplies it by 0 where its interpolation lands exactly on a cell edge).
    * The steps' weights are made by ``set_timesteps``: ``sigmas`` edited or assigned afterwards
      do not change them (diffusers' rollout reads ``sigmas`` at each step); call
      ``set_timesteps`` for another schedule.
    * ``prev_sample`` is contiguous whatever the sample's memory format (diffusers' elementwise
      operations keep a channels-last one); the values are the same.
    """

    _diffusers_name = "PiflowScheduler"
    _compatibles: Sequence[str] = ()
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 5.0,
        n_grid: int = 10,
        eps: float = 1e-6,
        final_step_size_scale: float = 0.5,
        num_policy_substeps: int = 128,
    ) -> None:
        check_count("num_train_timesteps", num_train_timesteps, 1)
        if finite_number("shift", shift) <= 0:
            raise ValueError(f"shift must be > 0 (the schedule divides by 1 + (shift - 1) * t), got {shift}")
        if isinstance(n_grid, bool) or not isinstance(n_grid, (int, np.integer)):
            raise ValueError(f"n_grid must be an integer >= 2, got {n_grid!r}")
        if n_grid < 2:
            raise ValueError(f"PiflowScheduler requires n_grid >= 2, got {n_grid}")
        if finite_number("eps", eps) <= 0:
            raise ValueError(f"PiflowScheduler requires eps > 0, got {eps}")
        if isinstance(final_step_size_scale, bool) or not isinstance(final_step_size_scale, NUMBERS) \
                or not 0 < final_step_size_scale <= 1:
            raise ValueError("PiflowScheduler requires 0 < final_step_size_scale <= 1, got "
                             f"final_step_size_scale={final_step_size_scale!r}")
        if isinstance(num_policy_substeps, bool) or not isinstance(num_policy_substeps, (int, np.integer)):
            raise ValueError(f"num_policy_substeps must be an integer >= 1, got {num_policy_substeps!r}")
        if num_policy_substeps < 1:
            raise ValueError("PiflowScheduler requires num_policy_substeps >= 1, got "
                             f"num_policy_substeps={num_policy_substeps}")
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        self.num_inference_steps: Optional[int] = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self.n_grid = int(n_grid)
        self.eps = float(eps)
        self.final_step_size_scale = float(final_step_size_scale)
        self.num_policy_substeps = int(num_policy_substeps)
        self._piflow_raw_timesteps = torch.empty(0)
        self._coefs: Tuple[StepCoefs, ...] = ()
        self._coefs32: Tuple[torch.Tensor, ...] = ()  # (the same, as the float32 tensors the kernels take)
        self._coefs64: Tuple[torch.Tensor, ...] = ()

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None,
                      sigmas: Optional[List[float]] = None, mu: Optional[float] = None,
                      timesteps: Optional[List[float]] = None) -> None:
        """diffusers' distilled schedule, value for value: ``num_inference_steps`` raw times from 1 down
        in segments of ``1 / (num_inference_steps - 1 + final_step_size_scale)``, shifted into
        ``sigmas`` (then a final 0) and ``timesteps = sigmas * num_train_timesteps`` (float32, on
        ``device``); and the weights of every step. Custom ``sigmas``, ``timesteps`` and ``mu`` are
        refused, as in diffusers. Starts a new loop (``step_index`` and ``begin_index`` reset)."""
        if sigmas is not None or mu is not None or timesteps is not None:
            raise ValueError("PiflowScheduler only supports its configured distilled timestep schedule")
        if num_inference_steps is None or (isinstance(num_inference_steps, NUMBERS)
                                           and not isinstance(num_inference_steps, bool)
                                           and num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}")
        n = check_count("num_inference_steps", num_inference_steps, 1)
        cfg = self.config
        coefs = _schedule_weights(n, float(cfg.shift), self.n_grid, self.eps, self.final_step_size_scale,
                                    self.num_policy_substeps, int(cfg.num_train_timesteps))
        raw, sigmas, timesteps = _schedule(n, float(cfg.shift), self.final_step_size_scale,
                                           int(cfg.num_train_timesteps))
        self.num_inference_steps = n
        self._piflow_raw_timesteps = raw.to(device)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)
        self._set_timesteps(timesteps.to(device), timesteps.tolist())
        self._coefs = coefs
        self._coefs64 = tuple(torch.tensor(row) for row in coefs)
        self._coefs32 = tuple(row.float() for row in self._coefs64)
        self._step_index = None
        self._begin_index = None

    # ---------------------------------------------------------------- step index

    def _index_for(self, timestep) -> int:
        """diffusers' lookup of a loop's first timestep: an element of ``timesteps`` (or such an
        element expanded) at its own position, found from its address (no host read); any other
        value compared with the schedule in its dtype, the second match of a repeated value."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() == 0:
                raise ValueError("timestep is an empty tensor; pass one of scheduler.timesteps")
            if timestep.numel() > 1 and any(timestep.stride()):
                raise ValueError(f"timestep must be one value (an element of scheduler.timesteps, also expanded to "
                                 f"the batch, or a number), got a tensor of shape {tuple(timestep.shape)}")
            one = timestep[(0,) * timestep.dim()] if timestep.dim() else timestep
            index = self.schedule_index(one)
            if index is not None:
                return index
            value = one.detach().to(self._timesteps.dtype).item()  # (the one host read: a copy's first step)
        elif isinstance(timestep, NUMBERS):
            value = torch.tensor(timestep, dtype=self._timesteps.dtype).item()  # (rounded as diffusers rounds it)
        else:
            raise TypeError(f"timestep must be a tensor or a number, got {type(timestep).__name__}")
        self._refresh_host_timesteps()
        matches = [i for i, t in enumerate(self._host_timesteps) if t == value]
        if not matches:
            raise ValueError(f"timestep {value} is not in the Piflow schedule")
        return matches[1] if len(matches) > 1 else matches[0]

    # ---------------------------------------------------------------- step

    def _check_inputs(self, model_output, sample, name: str = "model_output") -> None:
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(model_output).__name__}")
        if sample.dtype not in _FLOATS:
            raise TypeError(f"sample must be float16, bfloat16, float32 or float64, got {sample.dtype}")
        if model_output.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {model_output.dtype}")
        if sample.dim() < 2:
            raise ValueError(f"sample must have a batch and a channel dimension (channels last), got shape "
                             f"{tuple(sample.shape)}")
        if model_output.device != sample.device:
            raise ValueError(f"{name} must be on {sample.device} like sample, got {model_output.device}")
        # diffusers' messages (its _to_grid)
        if model_output.ndim != sample.ndim or model_output.shape[:-1] != sample.shape[:-1]:
            raise ValueError(
                f"Piflow {name} must match sample shape except for the output channels: "
                f"got {tuple(model_output.shape)} for sample {tuple(sample.shape)}")
        if model_output.shape[-1] % self.n_grid != 0:
            raise ValueError(
                f"Piflow {name} channels {model_output.shape[-1]} are not divisible by n_grid={self.n_grid}")
        if model_output.shape[-1] // self.n_grid != sample.shape[-1]:
            raise ValueError(
                f"Piflow {name} channels do not match the sample: "
                f"expected {sample.shape[-1] * self.n_grid}, got {model_output.shape[-1]}")

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """diffusers' ``step`` (same positional order): the sample at the next grid point.

        Args:
            model_output: the widened model output, ``n_grid`` predictions per sample channel in the
                last dimension.
            timestep: the current timestep, one of ``scheduler.timesteps`` (looked up on the first
                step of a loop unless ``set_begin_index`` was called; ignored afterwards).
            sample: the current sample ``[batch, ..., channels]``.
            return_dict: a :class:`PiflowSchedulerOutput`, or the tuple ``(prev_sample,)``.
        """
        out = self._step(model_output, timestep, sample, None, 1.0)
        return out if return_dict else out.to_tuple()

    def step_cfg(self, uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, timestep,
                 sample: torch.Tensor, return_dict: bool = True):
        """``step`` of the guided output ``uncond + guidance_scale * (cond - uncond)`` (two widened
        outputs, e.g. the halves of one batched forward), without forming it: the guidance is linear,
        so it is folded into the step's weights."""
        self._check_inputs(cond, sample, "cond")
        guidance_scale = finite_number("guidance_scale", guidance_scale)
        out = self._step(uncond, timestep, sample, cond, guidance_scale)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale) -> PiflowSchedulerOutput:
        if is_integer_timestep(timestep):
            raise ValueError("Passing integer indices as timesteps to PiflowScheduler.step() is not supported; "
                             "pass a value from scheduler.timesteps instead")
        if self.num_inference_steps is None:
            raise ValueError("PiflowScheduler has no schedule: call set_timesteps(...) before step(...)")
        index = self._step_index
        if index is None:
            index = self._begin_index if self._begin_index is not None else self._index_for(timestep)
        if index >= self.num_inference_steps:
            raise RuntimeError("PiflowScheduler.step called after the schedule was exhausted")
        self._check_inputs(model_output, sample)
        wide = sample.dtype is _F64
        if cond is None:
            outputs, coefs = model_output, (self._coefs64 if wide else self._coefs32)[index]
        else:  # guidance folded into the weights (uncond at guidance_scale 1 gets 0s: it is not read)
            row = self._coefs[index]
            outputs = (model_output, cond)
            coefs = torch.from_numpy(np.concatenate((row[:1], row[1:] * (1.0 - guidance_scale),
                                                     row[1:] * guidance_scale)))
            coefs = coefs if wide else coefs.to(_F32)
        prev = grid_combination(sample, outputs, coefs)
        self._step_index = index + 1
        return PiflowSchedulerOutput(prev)
