"""DDIM for ParaDiGMS parallel sampling (Shih et al. 2023), as a diffusers drop-in: DDIM plus
``batch_step_no_noise``, one deterministic step for a batch whose samples sit at different timesteps.

A batch of mixed timesteps is one fused kernel pass with a coefficient row per sample. The
helpers here serve the DDPM twin (:mod:`kdfast.schedulers.ddpm_parallel`) too.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._checks import real_number
from .base import FusedScheduler, run_eagerly, widest_dtype
from .ddim import DDIMScheduler

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _tensor_values(scheduler: FusedScheduler, timesteps: torch.Tensor, integer_only: bool) -> np.ndarray:
    """The values of a timestep tensor on the host: from the schedule's host copy for a view of the
    schedule (no read), from the tensor itself on the CPU, else read back once (one host sync)."""
    dtype = timesteps.dtype
    if not (timesteps.is_floating_point() or dtype in _INTEGER_DTYPES):  # (not bool, not complex)
        raise TypeError(f"timesteps must hold integer training timesteps, got a {dtype} tensor")
    if integer_only and timesteps.is_floating_point():
        raise IndexError(f"timesteps must be integer training timesteps (they index alphas_cumprod, as in "
                         f"diffusers), got a {dtype} tensor")
    if timesteps.numel() == 0:
        return np.zeros(0, dtype=np.int64)
    return scheduler.timestep_values(timesteps)


def batch_timesteps(scheduler: FusedScheduler, timesteps, batch: int, num_train_timesteps: int,
                    integer_only: bool) -> List[int]:
    """One integer training timestep per sample of a batch of ``batch``, checked: ``timesteps`` is a
    tensor (any shape, flattened as diffusers' ``view(-1)``), a sequence or a single timestep; one
    value serves the whole batch, as diffusers' broadcasting does. ``integer_only``: a floating
    timestep is an IndexError (DDPM indexes ``alphas_cumprod`` with it, as diffusers does); else
    integral floats are taken (DDIM's ``step`` takes ``500.0``)."""
    if isinstance(timesteps, torch.Tensor):
        values = _tensor_values(scheduler, timesteps, integer_only)
    elif isinstance(timesteps, (list, tuple)):
        parts = [_tensor_values(scheduler, v, integer_only) if isinstance(v, torch.Tensor)
                 else np.asarray(v).reshape(-1) for v in timesteps]
        values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    elif isinstance(timesteps, (int, float, np.integer, np.floating, np.ndarray)) and not isinstance(timesteps, bool):
        values = np.asarray(timesteps).reshape(-1)
    else:
        raise TypeError(f"timesteps must be a tensor, a sequence or a number of training timesteps, got "
                        f"{type(timesteps).__name__}")
    if values.dtype.kind not in "iuf":
        raise TypeError(f"timesteps must hold integer training timesteps, got values of dtype {values.dtype}")
    if values.dtype.kind == "f":
        if integer_only:
            raise IndexError(f"timesteps must be integer training timesteps (they index alphas_cumprod, as in "
                             f"diffusers), got {values.dtype} values")
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"timesteps must be integer training timesteps, got {values[i]} at index {i}")
    if values.size not in (1, batch) or (values.size == 1 and batch == 0):
        raise ValueError(f"timesteps: got {values.size} timesteps for a batch of {batch} samples; pass one per "
                         "sample (or one for the whole batch)")
    outside = (values < 0) | (values >= num_train_timesteps)
    if outside.any():
        i = int(np.argmax(outside))
        raise IndexError(f"timesteps[{i}] = {values[i]:g} is outside the training schedule [0, {num_train_timesteps})")
    ints = [int(v) for v in values.tolist()]
    return ints * batch if len(ints) == 1 and batch != 1 else ints


def check_batch_inputs(model_output, sample) -> None:
    if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
        raise TypeError("model_output and sample must be torch.Tensor")
    if sample.dim() == 0:
        raise ValueError("sample must have a batch dimension, got a 0-d tensor")


def grouped_step(scheduler: FusedScheduler, values: Sequence[int], key_of: Callable[[int], object],
                 sample: torch.Tensor, model_output: torch.Tensor, clip: Optional[float],
                 dynamic: Optional[Tuple[float, float]]) -> torch.Tensor:
    """The noise-free step of every sample at its own timestep, in one fused kernel pass: each
    sample reads the coefficient row ``step`` uses at its timestep (``key_of(timestep)``). Dynamic
    thresholding adds a threshold-scale pass per run of consecutive equal timesteps (a ParaDiGMS
    window timestep repeated for its images): the quantile takes one x0 formula per call."""
    batch = sample.shape[0]
    if batch == 0:  # (in the dtype a step returns: the sample's promoted with the model output's)
        return torch.empty_like(sample, dtype=widest_dtype(sample.dtype, model_output))
    keys: Dict[int, object] = {}
    for v in dict.fromkeys(values):
        keys[v] = key = key_of(v)
        scheduler._raise_if_undefined(key)
    return scheduler._fused_per_sample([keys[v] for v in values], sample, model_output, clip_value=clip,
                                       dynamic=dynamic).sample


class DDIMParallelScheduler(DDIMScheduler):
    """Drop-in for ``diffusers.DDIMParallelScheduler`` (ParaDiGMS): same arguments, config,
    attributes and methods.

    Everything :class:`~kdfast.schedulers.ddim.DDIMScheduler` does (``step`` is one fused kernel
    pass, ``step_cfg`` fuses guidance), plus :meth:`batch_step_no_noise`, the deterministic step of
    a batch whose samples sit at different timesteps, which ParaDiGMS' pipeline calls once per
    Picard iteration over its window of timesteps. ``_is_ode_scheduler`` is True: the pipeline adds
    no noise to DDIM's drift.

    Where diffusers returns inf or NaN, ``step`` and ``batch_step_no_noise`` raise a ValueError
    saying why, as ``DDIMScheduler.step`` does.
    """

    _diffusers_name = "DDIMParallelScheduler"
    _is_ode_scheduler = True

    def _get_variance(self, timestep, prev_timestep=None) -> torch.Tensor:
        """diffusers' DDIM variance between ``timestep`` and ``prev_timestep`` (default: the step's
        previous timestep, ``timestep - T // num_inference_steps``), as a float32 tensor: ParaDiGMS'
        pipeline calls it with the timestep alone."""
        if prev_timestep is None:
            self._require_timesteps()
            prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        return super()._get_variance(timestep, prev_timestep)

    def _batch_get_variance(self, t: torch.Tensor, prev_t: torch.Tensor) -> torch.Tensor:
        """:meth:`_get_variance` elementwise over tensors of timesteps (diffusers' private helper), with
        ``final_alpha_cumprod`` below timestep 0 as ``step`` uses it."""
        ac = self.alphas_cumprod.to(t.device)
        alpha_prod_t = ac[t]
        alpha_prod_t_prev = torch.where(prev_t >= 0, ac[torch.clip(prev_t, min=0)],
                                        self.final_alpha_cumprod.to(t.device))
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    @run_eagerly
    def batch_step_no_noise(self, model_output: torch.Tensor, timesteps, sample: torch.Tensor, eta: float = 0.0,
                            use_clipped_model_output: bool = False) -> torch.Tensor:
        """diffusers' ``batch_step_no_noise``: the deterministic DDIM step of every sample of the batch
        from its own timestep, ``sample[i]`` at ``timesteps[i]`` to ``timesteps[i] - T // num_inference_steps``.

        Args:
            model_output: the model's output for the batch, shaped like ``sample``.
            timesteps: one training timestep per sample (a tensor of any shape with ``batch``
                elements, flattened; a sequence; or one timestep for the whole batch), each in
                ``[0, num_train_timesteps)``.
            sample: the batch ``[batch, ...]``, float32/16, bfloat16 or float64.
            eta: must be 0, as in diffusers (which asserts it): the step is deterministic, and
                ParaDiGMS adds no noise to an ODE scheduler's drift.
            use_clipped_model_output: re-derive epsilon from the clipped / thresholded x0, as ``step``.

        Returns:
            The batch at the previous timesteps, in ``sample``'s dtype.

        Each sample gets exactly what ``step(model_output[i], timesteps[i], sample[i])`` gives it
        (the same coefficient rows), so a ParaDiGMS loop converges to the sequential DDIM loop.
        The batch is one fused kernel pass, each sample reading its own row of coefficients (a read
        of ``sample`` and ``model_output``, a write of the result); diffusers' makes six to ten
        latent-sized elementwise passes. Dynamic thresholding adds a threshold-scale pass per run
        of consecutive equal timesteps (a ParaDiGMS window timestep repeated for its images).

        Host reads: none for timesteps on the host (a CPU tensor, a sequence, a number) or that
        are a view of ``self.timesteps`` (an element, a slice, ``timesteps[i:j, None].expand(-1, b)``),
        whose values come from the schedule's host copy; timesteps in another tensor on a device
        are read back once per call (one host sync), to check them and pick each sample's row.

        Deviations from diffusers: with ``set_alpha_to_one=False`` the last step ends at
        ``final_alpha_cumprod`` as ``step`` does (diffusers' ``batch_step_no_noise`` uses 1 there,
        so its ParaDiGMS loop does not converge to its own sequential one); half-precision inputs
        give a result of their dtype (diffusers' promotes to float32); timesteps outside
        ``[0, num_train_timesteps)`` are an IndexError (diffusers wraps negative ones).
        """
        self._require_timesteps()
        check_batch_inputs(model_output, sample)
        self._check_step_inputs(model_output, sample)
        eta = real_number("eta", eta)
        if eta != 0.0:
            raise ValueError(f"eta must be 0 for batch_step_no_noise (a deterministic step, as in diffusers), got "
                             f"{eta}: for DDIM with eta > 0, call step() with the step's noise")
        use_clipped = bool(use_clipped_model_output)
        values = batch_timesteps(self, timesteps, sample.shape[0], len(self._host_alphas_cumprod), integer_only=False)
        table = self._table
        cfg = self.config
        clip = cfg.clip_sample_range if cfg.clip_sample and not cfg.thresholding else None
        dynamic = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
        return grouped_step(
            self, values,
            lambda t: table.ensure(self._key(t, 0.0, use_clipped), lambda: self._plan(t, 0.0, use_clipped)),
            sample, model_output, clip, dynamic)
