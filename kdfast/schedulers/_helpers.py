"""diffusers' helper methods, for code that calls them directly.

diffusers' schedulers expose their update rules (``dpm_solver_first_order_update``,
``multistep_uni_p_bh_update``, ...) and schedule conversions (``_convert_to_karras``,
``_sigma_to_alpha_sigma_t``, ...) as methods, and inversion and editing code (LEdits++,
ReNoise, custom samplers) calls them with converted model outputs it holds. kdfast's ``step``
never does: a step is one fused kernel pass. The update helpers here evaluate the same rule
the step's coefficient table is built from (each scheduler writes its rule once, over
symbolic sources; see ``_linear``), given the caller's tensors instead of the kernel's
inputs, so a helper and a step cannot disagree. They are unfused tensor arithmetic, as
diffusers' are, and read the step index and sigmas just as diffusers' do.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ._linear import Lin
from ._schedule import (beta_sigmas, exponential_sigmas, host_array, karras_sigmas, lu_lambdas, sigma_range,
                        sigma_to_t)

# The converted model outputs a helper is given, newest first (diffusers' ``model_output_list[-1]``
# to ``[-4]``: SA-Solver's order-4 predictor reads four), and a corrector's new output (UniC's
# ``this_model_output``).
OUTPUTS = tuple(Lin({f"output{k}": 1.0}) for k in range(4))
NEW_OUTPUT = Lin({"new_output": 1.0})
# What each source is called in diffusers' signatures, for errors.
_LABELS = {"x": "sample", "aux": "last_sample", "noise": "noise", "new_output": "this_model_output",
           **{f"output{k}": f"model_output_list[{-1 - k}]" for k in range(4)}}


def evaluate(rule: Lin, tensors: Dict[str, Optional[torch.Tensor]], what: str,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``sum(c * tensors[name])`` over the rule's terms, in float32 (float64 when an input is
    float64), returned in ``dtype``, by default the promoted dtype of all ``tensors`` (those
    diffusers' helper reads: its arithmetic promotes over a term whose coefficient is 0 as well).
    ``what`` names the update in errors."""
    terms = [(name, c) for name, c in rule.terms.items() if c != 0.0]
    if not terms:  # (a zero-length step of a rule written without the start: not reached)
        raise ValueError(f"{what}: the update has no terms")
    inputs = []
    for name, c in terms:
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{what}: the update needs `{_LABELS.get(name, name)}`, which is None")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{what}: `{_LABELS.get(name, name)}` must be a floating-point tensor, got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
        inputs.append((t, c))
    promoted = inputs[0][0].dtype
    for t in tensors.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            promoted = torch.promote_types(promoted, t.dtype)
    compute = torch.float64 if promoted == torch.float64 else torch.float32
    out = None
    for t, c in inputs:
        term = t.to(compute) * c
        out = term if out is None else out + term
    return out.to(promoted if dtype is None else dtype)


def legacy_arguments(method: str, args: tuple, kwargs: dict, legacy: Sequence[str], **named) -> list:
    """diffusers' calling forms of its update helpers: ``named`` keyword arguments (in
    order), each also accepted positionally after the ``legacy`` positional arguments
    (timesteps, deprecated in diffusers and without effect: the step index decides), which
    warn as diffusers warns. Returns the named values; unknown arguments are refused."""
    for k, name in enumerate(legacy):
        value = args[k] if len(args) > k else kwargs.pop(name, None)
        if value is not None:
            warnings.warn(f"{method}: passing `{name}` is deprecated and has no effect (as in diffusers): "
                          "the scheduler's step index decides the update", FutureWarning, stacklevel=3)
    values = []
    for k, (name, value) in enumerate(named.items()):
        if value is None and len(args) > len(legacy) + k:
            value = args[len(legacy) + k]
        values.append(value)
    if len(args) > len(legacy) + len(named):
        raise TypeError(f"{method}() takes at most {len(legacy) + len(named)} positional arguments after the "
                        f"model output(s) ({', '.join([*legacy, *named])}), got {len(args)}")
    if kwargs:
        raise TypeError(f"{method}() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
    return values


def required(method: str, name: str, value):
    if value is None:
        raise ValueError(f"{method}: missing `{name}` as a required keyword argument")
    return value


def output_list(method: str, outputs, count: int) -> Dict[str, torch.Tensor]:
    """The newest ``count`` entries of a helper's ``model_output_list`` (oldest first, as
    diffusers keeps it), keyed by the names of :data:`OUTPUTS`."""
    if not isinstance(outputs, (list, tuple)):
        raise TypeError(f"{method}: model_output_list must be a list of tensors, got {type(outputs).__name__}")
    if len(outputs) < count:
        raise ValueError(f"{method}: the update needs the last {count} converted model outputs, "
                         f"got a list of {len(outputs)}")
    return {f"output{k}": outputs[-1 - k] for k in range(count)}


def uni_p_arguments(args: tuple, kwargs: dict, sample, order) -> Tuple[torch.Tensor, int]:
    """``(sample, order)`` of a ``multistep_uni_p_bh_update`` call (UniPC's and Helios')."""
    method = "multistep_uni_p_bh_update"
    sample, order = legacy_arguments(method, args, kwargs, ("prev_timestep",), sample=sample, order=order)
    return required(method, "sample", sample), check_order(method, order, (1, 2, 3))


def uni_c_arguments(args: tuple, kwargs: dict, last_sample, this_sample, order) -> Tuple[torch.Tensor, int]:
    """``(last_sample, order)`` of a ``multistep_uni_c_bh_update`` call (``this_sample`` is
    required, as in diffusers, and unused)."""
    method = "multistep_uni_c_bh_update"
    last_sample, this_sample, order = legacy_arguments(method, args, kwargs, ("this_timestep",),
                                                       last_sample=last_sample, this_sample=this_sample, order=order)
    required(method, "this_sample", this_sample)
    return required(method, "last_sample", last_sample), check_order(method, order, (1, 2, 3))


def step_position(scheduler, method: str, ahead: int = 1, sigmas: Optional[list] = None, back: int = 0):
    """``(step index, sigmas)`` of an update helper's call: diffusers' helpers read
    ``self.step_index``, ``sigmas[step_index + ahead]`` and, for older nodes, down to
    ``sigmas[step_index - back]`` (negative indices wrap around, as diffusers' tensor indexing
    does). ``sigmas`` defaults to the scheduler's, as Python floats (what its tables were
    planned from)."""
    if scheduler.step_index is None or scheduler.num_inference_steps is None:
        raise ValueError(f"{method} needs a step index: call set_timesteps(...), then step() or "
                         "_init_step_index(timestep) (diffusers' helpers read self.step_index)")
    i = scheduler.step_index
    sigmas = [float(v) for v in scheduler.sigmas.tolist()] if sigmas is None else sigmas
    if i + ahead >= len(sigmas):
        raise IndexError(f"{method}: step {i} is past the end of the {len(sigmas) - 1}-step schedule")
    if i - back < -len(sigmas):
        raise IndexError(f"{method}: this order at step {i} reads sigmas[{i - back}], before the start of the "
                         f"{len(sigmas) - 1}-step schedule")
    return i, sigmas


def unfused(method: str, rule: Optional[Lin], order: int, step: int, tensors: Dict[str, Optional[torch.Tensor]],
            dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An update helper's result: ``rule`` (None where the update is not finite) evaluated on
    ``tensors`` (see :func:`evaluate`)."""
    if rule is None or not all(math.isfinite(v) for v in rule.terms.values()):
        raise ValueError(f"{method}: no finite update of order {order} at step {step} (diffusers' is NaN or inf "
                         "there, or divides by zero)")
    return evaluate(rule, tensors, method, dtype)


def check_order(method: str, order, orders: Sequence[int]) -> int:
    order = required(method, "order", order)
    if isinstance(order, bool) or int(order) != order or int(order) not in orders:
        raise ValueError(f"{method}: order must be one of {tuple(orders)}, got {order!r}")
    return int(order)


def _host_array(values) -> np.ndarray:
    return host_array(values, np.float64)


class SigmaSpacings:
    """diffusers' private sigma-spacing helpers (``use_karras_sigmas`` and friends), which
    custom pipelines call on a scheduler; numpy arrays, as diffusers returns them."""

    def _convert_to_karras(self, in_sigmas, num_inference_steps: int) -> np.ndarray:
        """Karras et al. (2022) sigmas between the config's ``sigma_min``/``sigma_max`` (or
        ``in_sigmas``' ends, where the config has none)."""
        return karras_sigmas(*sigma_range(self.config, _host_array(in_sigmas)), int(num_inference_steps))

    def _convert_to_exponential(self, in_sigmas, num_inference_steps: int) -> np.ndarray:
        """Sigmas spaced evenly in log-sigma between the same ends as ``_convert_to_karras``."""
        return exponential_sigmas(*sigma_range(self.config, _host_array(in_sigmas)), int(num_inference_steps))

    def _convert_to_beta(self, in_sigmas, num_inference_steps: int, alpha: float = 0.6,
                         beta: float = 0.6) -> np.ndarray:
        """Beta-distribution spaced sigmas (Lee et al. 2024) between the same ends; needs scipy."""
        return beta_sigmas(*sigma_range(self.config, _host_array(in_sigmas)), int(num_inference_steps),
                           alpha, beta)


class KarrasForTheStepCount:
    """The ``_convert_to_karras(in_sigmas)`` of diffusers' LMS and DPM-SDE schedulers: Karras
    sigmas between ``in_sigmas``' ends for ``num_inference_steps`` steps."""

    def _convert_to_karras(self, in_sigmas) -> np.ndarray:
        ends = _host_array(in_sigmas)
        return karras_sigmas(float(ends[-1]), float(ends[0]), int(self.num_inference_steps))


class LogSigmaTimesteps:
    """The training timestep of a sigma of a discrete (VP-trained) schedule."""

    def _sigma_to_t(self, sigma, log_sigmas):
        """Fractional training timestep of each sigma, interpolating in log-sigma: a tensor for
        tensor input (of the inputs' promoted dtype, computed in float64), else a numpy array."""
        t = sigma_to_t(_host_array(sigma), _host_array(log_sigmas))
        if not isinstance(sigma, torch.Tensor):
            return t
        dtype = torch.promote_types(sigma.dtype, log_sigmas.dtype) if isinstance(log_sigmas, torch.Tensor) \
            else sigma.dtype
        return torch.as_tensor(t).to(device=sigma.device, dtype=dtype)


class Thresholding:
    """diffusers' ``_threshold_sample`` (dynamic thresholding) as a method."""

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Imagen): each sample clamped to ``[-s, s]`` and divided by
        ``s``, ``s`` the config's ``dynamic_thresholding_ratio`` quantile of its ``|x|``
        clamped to ``[1, sample_max_value]``. Computed in float32 (float64 for float64 input)
        and returned in the sample's dtype, as diffusers does."""
        from .. import ops

        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point() or sample.dim() < 1:
            raise TypeError("sample must be a floating-point tensor with a batch dimension")
        cfg = self.config
        compute = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x = sample.to(compute)
        s = ops.threshold_scale(x, x, 0.0, 1.0, ratio=cfg.get("dynamic_thresholding_ratio", 0.995),
                                max_value=cfg.get("sample_max_value", 1.0)).to(compute)
        s = s.reshape(-1, *([1] * (sample.dim() - 1)))
        return (torch.clamp(x, -s, s) / s).to(sample.dtype)


class LuLambdas:
    """``_convert_to_lu`` (DPM-Solver's ``use_lu_lambdas``)."""

    def _convert_to_lu(self, in_lambdas, num_inference_steps: int) -> np.ndarray:
        """Log-SNRs spaced evenly between ``in_lambdas``' ends (Lu et al., DPM-Solver)."""
        lambdas = _host_array(in_lambdas)
        return lu_lambdas(float(lambdas[-1]), float(lambdas[0]), int(num_inference_steps))


class FlowTimesteps:
    """Flow matching's timestep of a sigma (diffusers' ``_sigma_to_t`` of its flow schedulers)."""

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps


class FlowShifts:
    """The resolution-dependent shift of flow-matching schedules (diffusers' ``time_shift``)."""

    def time_shift(self, mu: float, sigma: float, t):
        """The resolution-dependent shift of ``t`` by ``mu`` (``time_shift_type``)."""
        if self.config.time_shift_type == "exponential":
            return self._time_shift_exponential(mu, sigma, t)
        return self._time_shift_linear(mu, sigma, t)

    def _time_shift_exponential(self, mu, sigma, t):
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)

    def _time_shift_linear(self, mu, sigma, t):
        return mu / (mu + (1 / t - 1) ** sigma)


class TerminalShift:
    """``shift_terminal``'s stretch of a flow-matching schedule."""

    def stretch_shift_to_terminal(self, t):
        """Stretch the schedule ``t`` so that it ends at ``shift_terminal``."""
        one_minus_z = 1 - t
        scale_factor = one_minus_z[-1] / (1 - self.config.shift_terminal)
        return 1 - (one_minus_z / scale_factor)
