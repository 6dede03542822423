"""``kdfast.ops.solver_step``: one fused pass for one step of a diffusion solver.

The math (see csrc/solver_step/solver_step.h) is a guided, optionally thresholded data
prediction followed by fixed linear combinations. Schedulers compute the 29 coefficients
of each step on the host, in float64, when their schedule is set; :func:`coefficients`
packs them. A step takes one row for the whole batch or a row per sample (samples at
different timesteps; a flow model's tokens at their own sigmas, rows then made on the
device). This module is the only place where these tensors become addresses.

float64 steps (a float64 ``sample``) are computed in float64 by the reference backend, the
pure-torch specification (:mod:`kdfast.reference.solver_step`): the compiled kernels take
float32, float16 and bfloat16 only. A float64 coefficient row keeps the step's coefficients in
float64 too; a float32 one (what the schedulers' tables hold) limits a float64 step to float32
coefficients, a relative error of up to ~6e-8 per coefficient.
"""
# (No `from __future__ import annotations` here: torch 2.4's custom_op takes the annotations of
# an op's signature as types and refuses them as strings.)

import math
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as forward_ad

from .. import _ext, backends
from .._checks import check_flag, is_finite_number, real_number
from ..backends import BackendUnavailableError
from ..reference import solver_step as ref
from ._tensors import (DTYPE_CODES, F32_ROUNDS_TO_ZERO, addresses, cuda_stream, dense_format, describe,
                       dispatcher_required, empty_in_layout, in_layout, on_device, op_layout, reference_required,
                       sample_layout)

SOURCES = ("x", "model", "uncond", "x0", "h0", "h1", "h2", "aux", "noise")
OUTPUTS = ("sample", "history", "aux")
NUM_COEFS = ref.NUM_COEFS
THRESHOLD_NONE, THRESHOLD_CLIP, THRESHOLD_DYNAMIC = ref.THRESHOLD_NONE, ref.THRESHOLD_CLIP, ref.THRESHOLD_DYNAMIC
_OUT_SAMPLE, _OUT_HISTORY, _OUT_AUX = 1, 2, 4

step_op = backends.op("solver_step")
threshold_op = backends.op("threshold_scale")


class StepResult(NamedTuple):
    sample: torch.Tensor
    history: Optional[torch.Tensor]
    aux: Optional[torch.Tensor]


def coefficients(
    x0_from_x: float,
    x0_from_model: float,
    sample: Optional[Dict[str, float]] = None,
    history: Optional[Dict[str, float]] = None,
    aux: Optional[Dict[str, float]] = None,
) -> List[float]:
    """Pack one step's coefficients into the 29-number layout the kernels read.

    ``x0 = x0_from_x * x + x0_from_model * m``; each output is a mapping from source name
    (one of :data:`SOURCES`) to its coefficient. Values are kept in float64 until the table
    is made (``torch.tensor(rows, dtype=torch.float32)``).
    """
    row = [0.0] * NUM_COEFS
    row[0], row[1] = real_number("x0_from_x", x0_from_x), real_number("x0_from_model", x0_from_model)
    for k, terms in enumerate((sample, history, aux)):
        if terms is not None and not isinstance(terms, Mapping):
            raise TypeError(f"{OUTPUTS[k]} must be a mapping from source name to coefficient, got "
                            f"{type(terms).__name__}")
        for name, value in (terms or {}).items():
            if name not in SOURCES:
                raise ValueError(f"unknown source {name!r} in {OUTPUTS[k]} coefficients; expected one of {SOURCES}")
            row[2 + len(SOURCES) * k + SOURCES.index(name)] += real_number(f"{OUTPUTS[k]}[{name!r}]", value)
    return row


# --------------------------------------------------------------------------- validation

_Tensor = torch.Tensor
_isfinite = math.isfinite
_is_compiling = torch.compiler.is_compiling
_F32, _F64 = torch.float32, torch.float64
_CONTIGUOUS = torch.contiguous_format
_KERNEL_DTYPES = "float32, float16 or bfloat16"


def _check_like(name: str, t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of sample {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like sample, got {t.device}")
    if t.dtype not in DTYPE_CODES and not (t.dtype is _F64 and like.dtype is _F64):
        raise TypeError(f"{name} must be {_KERNEL_DTYPES} (or float64 with a float64 sample), got {t.dtype}")
    return in_layout(t, like)


def _check_coefs(coefs: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """``coefs`` checked against ``sample``: one CPU row of 29 values for the batch, or a
    ``[batch, 29]`` table (a row per sample) on the CPU or on the sample's device."""
    if not isinstance(coefs, torch.Tensor):
        raise TypeError(f"coefs must be a torch.Tensor of {NUM_COEFS} float32 values, got {type(coefs).__name__}")
    if coefs.dtype not in (_F32, _F64):
        raise ValueError(f"coefs must be float32 (or float64), got {describe('coefs', coefs)}")
    if coefs.dim() == 2:
        batch = sample.shape[0]
        if coefs.shape != (batch, NUM_COEFS) or not (coefs.is_cpu or coefs.device == sample.device):
            raise ValueError(f"coefs with a row per sample must be a ({batch}, {NUM_COEFS}) table on the CPU or on "
                             f"{sample.device} like sample, got {describe('coefs', coefs)}")
        return coefs.contiguous()
    if not coefs.is_cpu or coefs.numel() != NUM_COEFS:
        raise ValueError(
            f"coefs must be a CPU float32 (or float64) tensor of {NUM_COEFS} values, or a ({sample.shape[0]}, "
            f"{NUM_COEFS}) table of a row per sample, got {describe('coefs', coefs)}")
    return coefs.reshape(NUM_COEFS).contiguous()


def _kernel_coefs(coefs: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """``coefs`` as the kernels read them: float32 (float64 values are rounded); one row stays on
    the host (it travels as kernel arguments), a row per sample goes to the sample's device."""
    if coefs.dim() == 1:
        return coefs if coefs.dtype is _F32 else coefs.to(_F32)
    if coefs.is_cpu and not sample.is_cpu:
        if sample.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A captured copy would read this host buffer again at every replay, after it is freed
            raise RuntimeError("coefs: a row per sample cannot be copied from the CPU inside a CUDA graph capture; "
                               f"pass the ({sample.shape[0]}, {NUM_COEFS}) table on {sample.device}")
        # From pinned memory the copy does not wait for the device (no host sync)
        pinned = coefs.to(_F32).pin_memory() if torch.cuda.is_available() else coefs.to(_F32)
        return pinned.to(sample.device, non_blocking=True)
    return coefs.to(_F32).contiguous()


def _coef_addresses(coefs: torch.Tensor) -> Tuple[int, int]:
    """(one row's address, rows' address) of kernel coefficients; the other is 0."""
    return (coefs.data_ptr(), 0) if coefs.dim() == 1 else (0, coefs.data_ptr())


_F32_MAX = float(torch.finfo(torch.float32).max)


def _check_scalar(name: str, value: float) -> float:
    """``value`` as a float, if it is a finite number within float32's range (the kernels' scalars
    are float32; the reference would fail to apply a larger one to a float32 tensor)."""
    value = real_number(name, value)
    if not is_finite_number(value, name):  # (a symbolic float under torch.compile: checked when it runs)
        raise ValueError(f"{name} must be a finite number, got {value}")
    if not torch.compiler.is_compiling() and abs(value) > _F32_MAX:
        raise ValueError(f"{name} must be within float32's range (|{name}| <= {_F32_MAX:.8g}), got {value}")
    return value


def _check_clip_value(clip_value: float) -> float:
    clip = _check_scalar("clip_value", clip_value)
    if clip < 0:
        raise ValueError(f"clip_value must be >= 0 (x0 is clamped to [-clip_value, clip_value]), got {clip}")
    return clip


def _check_dynamic_scale(dynamic_scale, sample: torch.Tensor) -> torch.Tensor:
    batch = sample.shape[0]
    if (not isinstance(dynamic_scale, torch.Tensor)
            or not (dynamic_scale.dtype is _F32 or (dynamic_scale.dtype is _F64 and sample.dtype is _F64))
            or dynamic_scale.shape != (batch,) or dynamic_scale.device != sample.device):
        raise ValueError(f"dynamic_scale must be a float32 tensor of shape ({batch},) on {sample.device} "
                         "(float64 too with a float64 sample)")
    return dynamic_scale.contiguous()


def _clipping_args(clip_value, dynamic_scale, sample: torch.Tensor):
    """(threshold mode, clip value, checked dynamic scale) of a step's clipping arguments."""
    threshold, clip = THRESHOLD_NONE, 1.0
    if clip_value is not None:
        threshold, clip = THRESHOLD_CLIP, _check_clip_value(clip_value)
    if dynamic_scale is not None:
        threshold, dynamic_scale = THRESHOLD_DYNAMIC, _check_dynamic_scale(dynamic_scale, sample)
    return threshold, clip, dynamic_scale


def _select(op: backends.Op, sample: torch.Tensor, backend: Optional[str]) -> backends.Implementation:
    """The implementation of ``op`` for ``sample``'s device and dtype (a bad ``backend`` raises)."""
    # .is_cpu costs a fifth of .device.type, and nearly every call is on the CPU or CUDA
    device_type = "cpu" if sample.is_cpu else sample.device.type
    if sample.dtype is _F64:
        return _float64_backend(op, device_type, backend)
    return op.select(device_type, backend)


def _float64_backend(op: backends.Op, device_type: str, backend: Optional[str]) -> backends.Implementation:
    """The implementation that computes a float64 step: the reference, in float64. A compiled
    backend forced by ``backend`` or ``KDFAST_BACKEND`` cannot, and says so."""
    backends.check_known(backend)
    forced = backend or backends._FORCED
    if forced and forced != "reference":
        raise BackendUnavailableError(
            f"backend {forced!r} cannot run kdfast.{op.name} on float64 tensors: the compiled kernels compute in "
            f"{_KERNEL_DTYPES}; float64 is computed by the reference backend (in float64)")
    return op.select(device_type, "reference")


def _needs_dispatcher(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """True when the call must go through torch's dispatcher (compile, autograd, modes).

    Plain eager calls skip it: the custom-op boxing costs ~10 us per call on the CPU, as much
    as the whole fused step at SD latent sizes.
    """
    if dispatcher_required():
        return True
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and (type(t) is not _Tensor or t.requires_grad):
                return True
    else:
        for t in tensors:
            if t is not None and type(t) is not _Tensor:
                return True
    return False


# --------------------------------------------------------------------------- public entry


def solver_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefs: torch.Tensor,
    *,
    cond: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    history: Optional[Sequence[torch.Tensor]] = (),
    aux: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    clip_value: Optional[float] = None,
    dynamic_scale: Optional[torch.Tensor] = None,
    write_history: bool = False,
    write_aux: bool = False,
    history_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> StepResult:
    """Run one fused solver step.

    Args:
        sample: the current latent ``x``, shape ``[batch, ...]``, float32/16, bfloat16 or float64.
            A float64 step is computed in float64 by the reference backend (the compiled
            kernels take float32/16 and bfloat16); its other tensors may be float64 too.
        model_output: the model's output; the unconditional one when ``cond`` is given.
        coefs: CPU float32 tensor of 29 coefficients (see :func:`coefficients`), or float64:
            a float64 step then uses them in float64 (the kernels read them as float32). Or a
            ``[batch, 29]`` table, a row per sample (samples at different timesteps), on the CPU
            or on the sample's device; CPU rows for a CUDA sample are copied there without a
            host sync (not inside a CUDA graph capture: pass them on the device there).
            Differentiable, like every tensor input (learned solver coefficients); a
            ``dynamic_scale`` made from x0 coefficients given as numbers carries no gradient
            to them.
        cond: conditional model output for classifier-free guidance
            ``m = model_output + guidance_scale * (cond - model_output)``.
        guidance_scale: the scale of that combination (a finite float; read only with ``cond``).
        history: up to three earlier history entries (multistep solvers), newest first.
        aux: an extra latent the step combines (UniPC's last sample, Heun's first-stage sample).
        noise: noise for SDE / ancestral steps, drawn by the caller's generator.
        clip_value: clamp x0 to ``[-clip_value, clip_value]`` (diffusers ``clip_sample``).
        dynamic_scale: per-sample float32 ``[batch]`` scale from :func:`threshold_scale`
            (float64 for a float64 sample); x0 is clamped to ``[-s, s]`` and divided by ``s``
            (dynamic thresholding).
        write_history / write_aux: also return the history entry / auxiliary output.
        history_dtype: dtype of the returned history entry (default: the sample's dtype;
            float64 only for a float64 sample).
        backend: force a backend (else ``KDFAST_BACKEND``, else the fastest usable).

    Returns:
        ``StepResult(sample, history, aux)``; entries not asked for are None.
    """
    _check_sample(sample)
    if history is None:
        history = ()
    if len(history) > 3:
        raise ValueError(f"history holds at most 3 entries, got {len(history)}")
    for k, h in enumerate(history):
        if h is None:  # the kernel would read a missing entry as zeros
            raise TypeError(f"history[{k}] is None; pass only the entries the step reads")
    if clip_value is not None and dynamic_scale is not None:
        raise ValueError("pass clip_value or dynamic_scale, not both")
    return fused_step(sample, model_output, _check_coefs(coefs, sample), cond, guidance_scale, history, aux, noise,
                      clip_value, dynamic_scale, check_flag("write_history", write_history),
                      check_flag("write_aux", write_aux), history_dtype, backend)


def _check_sample(sample) -> None:
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.dtype not in DTYPE_CODES and sample.dtype is not _F64:
        raise TypeError(f"sample must be {_KERNEL_DTYPES} or float64, got {sample.dtype}")
    if sample.dim() == 0:
        raise ValueError("sample must have a batch dimension, got a 0-d tensor")


_INPUT_NAMES = ("sample", "model_output", "cond", "history[0]", "history[1]", "history[2]", "aux", "noise")


def fused_step(sample: torch.Tensor, model_output: torch.Tensor, coefs: torch.Tensor, cond: Optional[torch.Tensor],
               guidance_scale: float, history: Sequence[torch.Tensor], aux: Optional[torch.Tensor],
               noise: Optional[torch.Tensor], clip_value: Optional[float], dynamic_scale: Optional[torch.Tensor],
               write_history: bool, write_aux: bool, history_dtype: Optional[torch.dtype],
               backend: Optional[str] = None) -> StepResult:
    """:func:`solver_step` with its arguments by position, for kdfast's own schedulers.

    The caller guarantees what it owns: ``coefs`` is a row of a table it packed with
    :func:`coefficients` (a contiguous CPU tensor of 29 values, float32, or float64 for full
    precision in float64 steps) or a contiguous ``[batch, 29]`` stack of such rows, ``history``
    holds at most 3 entries and ``clip_value`` / ``dynamic_scale`` are not both given. Every
    tensor and scalar is checked here, with :func:`solver_step`'s errors: they come from the
    scheduler's user (sample, model output, noise, history injected from outside).

    Eager calls on the C++ backends (nearly all calls) check each tensor and take its address,
    batch stride and dtype code in one pass, then call the binding: a tensor property read
    costs 0.1-0.3 us and a step reads up to 8 tensors, so each property is read once. Other
    calls (a forced or non-C++ backend, autograd, torch.compile, dispatch modes, empty
    tensors, float64 samples) go through :func:`_solver_step` or the custom op, which pack
    again themselves.
    """
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    # Forward-mode AD carrying a tangent: computed with torch's ops (:func:`_general_step`), as
    # under torch.func's transforms, which dispatch. (Inline: the common call pays one read.)
    dual = forward_ad._current_level >= 0 and reference_required(
        (sample, model_output, coefs, cond, *history, aux, noise, dynamic_scale))
    dtype = sample.dtype
    code = DTYPE_CODES.get(dtype)
    if code is None:
        if dtype is _F64:
            return _float64_step(sample, model_output, coefs, cond, guidance_scale, history, aux, noise, clip_value,
                                 dynamic_scale, write_history, write_aux, history_dtype, backend)
        raise TypeError(f"sample must be {_KERNEL_DTYPES} or float64, got {dtype}")
    shape = sample.shape
    if not shape:
        raise ValueError("sample must have a batch dimension, got a 0-d tensor")
    if model_output is None:
        raise TypeError("model_output must be a torch.Tensor, got None")
    n_hist = len(history)
    inputs = [sample, model_output, cond, history[0] if n_hist else None, history[1] if n_hist > 1 else None,
              history[2] if n_hist > 2 else None, aux, noise]
    batch = shape[0]
    numel = sample.numel()
    inner = numel // batch if batch else 0
    # The sample's memory format when it is dense (contiguous or channels_last: every other
    # tensor of that format is read in place at batch stride ``inner``), else None.
    fmt = _CONTIGUOUS if sample.is_contiguous() else dense_format(sample)
    if fmt is None:
        sample = inputs[0] = sample_layout(sample)
        fmt = dense_format(sample)
    on_cpu = sample.is_cpu
    device = None if on_cpu else sample.device
    grad = torch.is_grad_enabled()
    # The dispatcher is needed under compile, dispatch modes and torch.func transforms, for
    # tensor subclasses and for autograd; no address is taken then.
    dispatch = (dual or dispatcher_required() or type(sample) is not _Tensor
                or (grad and (sample.requires_grad or coefs.requires_grad)))
    ptrs, strides, codes = [0] * 8, [0] * 8, [0] * 8
    if not dispatch:
        ptrs[0], strides[0], codes[0] = sample.data_ptr(), inner if fmt is not None else sample.stride(0), code
    for k in range(1, 8):
        t = inputs[k]
        if t is None:
            continue
        # The common case (a plain tensor of the sample's shape and device, a kernel dtype) in
        # few property reads; anything else through _check_like: the argument's error, or a copy.
        if type(t) is _Tensor and t.shape == shape and (t.is_cpu if on_cpu else t.device == device):
            t_code = DTYPE_CODES.get(t.dtype)
            if t_code is None:
                _check_like(_INPUT_NAMES[k], t, sample)  # raises the dtype error
            if fmt is _CONTIGUOUS:
                plain = t.is_contiguous()
            else:
                plain = fmt is not None and t.is_contiguous(memory_format=fmt)
            if not plain:
                t = inputs[k] = in_layout(t, sample)
            if grad and t.requires_grad:
                dispatch = True
        else:
            t = inputs[k] = _check_like(_INPUT_NAMES[k], t, sample)
            t_code = DTYPE_CODES[t.dtype]
            plain = fmt is not None and t.is_contiguous(memory_format=fmt)
            if type(t) is not _Tensor or (grad and t.requires_grad):
                dispatch = True
        if not dispatch:
            ptrs[k], strides[k], codes[k] = t.data_ptr(), inner if plain else t.stride(0), t_code
    # (a symbolic float under torch.compile passes the type test: math.isfinite would break the graph)
    if (type(guidance_scale) is not float or _is_compiling() or not _isfinite(guidance_scale)
            or abs(guidance_scale) > _F32_MAX):
        guidance_scale = _check_scalar("guidance_scale", guidance_scale)
    threshold, clip, dynamic_scale = _clipping_args(clip_value, dynamic_scale, sample)
    if dynamic_scale is not None and (type(dynamic_scale) is not _Tensor or (grad and dynamic_scale.requires_grad)):
        dispatch = True  # the scale's gradient (dynamic thresholding under autograd)
    if history_dtype is None:
        history_dtype = dtype
    elif history_dtype not in DTYPE_CODES:
        raise TypeError(f"history_dtype must be {_KERNEL_DTYPES} (float64 with a float64 sample), "
                        f"got {history_dtype}")

    launch = None
    if not dispatch and numel:
        launch = _LAUNCHERS.get(step_op.select("cpu" if on_cpu else sample.device.type, backend).backend)
    if launch is None:
        _, model_output, cond, h0, h1, h2, aux, noise = inputs
        return _general_step(sample, model_output, coefs, cond, guidance_scale, h0, h1, h2, aux, noise, threshold,
                             clip, dynamic_scale, write_history, write_aux, history_dtype, backend, dispatch)

    if coefs.dtype is not _F32 or coefs.dim() != 1:
        coefs = _kernel_coefs(coefs, sample)
    # The outputs as _allocate makes them (the plainest empty_like parses its arguments fastest
    # and keeps a dense layout), the addresses as _step_args packs them.
    if fmt is not None:
        out = torch.empty_like(sample)
        hist_out = aux_out = None
        if write_history:
            hist_out = (torch.empty_like(sample) if history_dtype == dtype
                        else torch.empty_like(sample, dtype=history_dtype))
        if write_aux:
            aux_out = torch.empty_like(sample)
    else:
        out, hist_out, aux_out = _allocate(sample, _OUT_SAMPLE | (_OUT_HISTORY if write_history else 0)
                                           | (_OUT_AUX if write_aux else 0), history_dtype)
    launch(sample, (batch, inner, ptrs, strides, codes,
                    [out.data_ptr(), 0 if hist_out is None else hist_out.data_ptr(),
                     0 if aux_out is None else aux_out.data_ptr()],
                    [inner, inner if write_history else 0, inner if write_aux else 0],
                    [code, DTYPE_CODES[history_dtype] if write_history else 0, code if write_aux else 0],
                    *_coef_addresses(coefs), guidance_scale, threshold, clip,
                    0 if dynamic_scale is None else dynamic_scale.data_ptr()))
    return StepResult(out, hist_out, aux_out)


def _general_step(sample, model_output, coefs, cond, guidance_scale, h0, h1, h2, aux, noise, threshold, clip,
                  dynamic_scale, write_history, write_aux, history_dtype, backend, dispatch) -> StepResult:
    """A checked step through the custom op (``dispatch``) or :func:`_solver_step`; under
    torch.func's transforms and forward-mode AD, with torch's ops (see :func:`reference_required`)."""
    if dispatch and reference_required((sample, model_output, coefs, cond, h0, h1, h2, aux, noise, dynamic_scale)):
        _select(step_op, sample, backend)  # (the backend asked for is checked as outside)
        return _reference_step(sample, model_output, coefs, cond, guidance_scale, h0, h1, h2, aux, noise, threshold,
                               clip, dynamic_scale, write_history, write_aux, history_dtype)
    mask = _OUT_SAMPLE | (_OUT_HISTORY if write_history else 0) | (_OUT_AUX if write_aux else 0)
    args = (sample, model_output, coefs, cond, guidance_scale, h0, h1, h2, aux, noise, threshold, clip,
            dynamic_scale, mask, history_dtype)
    outs = torch.ops.kdfast.solver_step(*args, backend or "") if dispatch else _solver_step(*args, backend=backend)
    it = iter(outs)
    return StepResult(next(it), next(it) if write_history else None, next(it) if write_aux else None)


def _reference_step(sample, model_output, coefs, cond, guidance_scale, h0, h1, h2, aux, noise, threshold, clip,
                    dynamic_scale, write_history, write_aux, history_dtype) -> StepResult:
    """The step as the reference computes it (float32 math, float64 for a float64 sample, as the
    kernels and the float64 path compute), from torch's ops, which torch.func's transforms and
    forward-mode AD carry through: tangents, per-sample gradients and vmap come out right."""
    compute = _F64 if sample.dtype is _F64 else _F32  # (a float64 table is rounded as the kernels round it)
    outs = ref.solver_step([sample, model_output, cond, h0, h1, h2, aux, noise], coefs, guidance_scale, threshold,
                           clip, dynamic_scale, compute)
    return StepResult(outs[0].to(sample.dtype), outs[1].to(history_dtype) if write_history else None,
                      outs[2].to(sample.dtype) if write_aux else None)


def _float64_step(sample, model_output, coefs, cond, guidance_scale, history, aux, noise, clip_value, dynamic_scale,
                  write_history, write_aux, history_dtype, backend) -> StepResult:
    """:func:`fused_step` for a float64 ``sample``: the same checks, then the reference backend in
    float64 (through the custom op when autograd, compile or a dispatch mode needs it)."""
    if not sample.shape:
        raise ValueError("sample must have a batch dimension, got a 0-d tensor")
    if model_output is None:
        raise TypeError("model_output must be a torch.Tensor, got None")
    sample = sample_layout(sample)
    n_hist = len(history)
    others = [model_output, cond, history[0] if n_hist else None, history[1] if n_hist > 1 else None,
              history[2] if n_hist > 2 else None, aux, noise]
    others = [_check_like(name, t, sample) for name, t in zip(_INPUT_NAMES[1:], others)]
    guidance_scale = _check_scalar("guidance_scale", guidance_scale)
    threshold, clip, dynamic_scale = _clipping_args(clip_value, dynamic_scale, sample)
    if history_dtype is None:
        history_dtype = _F64
    elif history_dtype not in DTYPE_CODES and history_dtype is not _F64:
        raise TypeError(f"history_dtype must be {_KERNEL_DTYPES} (float64 with a float64 sample), "
                        f"got {history_dtype}")
    tensors = (sample, *others, dynamic_scale, coefs)
    dispatch = _needs_dispatcher(tensors) or reference_required(tensors)  # (forward-mode AD does not dispatch)
    model_output, cond, h0, h1, h2, aux, noise = others
    return _general_step(sample, model_output, coefs, cond, guidance_scale, h0, h1, h2, aux, noise, threshold, clip,
                         dynamic_scale, write_history, write_aux, history_dtype, backend, dispatch)


def _allocate(sample: torch.Tensor, mask: int, history_dtype: torch.dtype) -> List[Optional[torch.Tensor]]:
    """The outputs asked for in ``mask``, shaped and laid out like ``sample`` (see
    :func:`~kdfast.ops._tensors.sample_layout`): channels_last in, channels_last out."""
    return [
        empty_in_layout(sample) if mask & _OUT_SAMPLE else None,
        empty_in_layout(sample, history_dtype) if mask & _OUT_HISTORY else None,
        empty_in_layout(sample) if mask & _OUT_AUX else None,
    ]


def _solver_step(sample, model_output, coefs, cond, guidance_scale, h0, h1, h2, aux, noise, threshold,
                 clip_value, dynamic_scale, mask, history_dtype, backend=None) -> List[torch.Tensor]:
    outputs = _allocate(sample, mask, history_dtype)
    impl = _select(step_op, sample, backend)  # (for an empty sample too: a bad backend is named)
    if sample.numel() > 0:
        if impl.backend != "reference":
            coefs = _kernel_coefs(coefs, sample)
        impl.run([sample, model_output, cond, h0, h1, h2, aux, noise], outputs, coefs, guidance_scale, threshold,
                 clip_value, dynamic_scale)
    return [o for o in outputs if o is not None]


# --------------------------------------------------------------------------- backends


@step_op.register("reference")
def _step_reference(inputs, outputs, coefs, guidance_scale, threshold, clip_value, dynamic_scale):
    # float32 math for the kernel dtypes (as the kernels compute), float64 for a float64 step
    compute = _F64 if inputs[0].dtype is _F64 else _F32
    outs = ref.solver_step(inputs, coefs, guidance_scale, threshold, clip_value, dynamic_scale, compute)
    for out, value in zip(outputs, outs):
        if out is not None:
            out.copy_(value)


def _step_args(inputs, outputs, coefs, guidance_scale, threshold, clip_value, dynamic_scale) -> tuple:
    """The binding's arguments up to (not including) the CPU threads / CUDA stream."""
    x = inputs[0]
    batch = x.shape[0]  # len(tensor) costs ~1 us
    inner = x.numel() // batch
    return (batch, inner, *addresses(inputs, inner), *addresses(outputs, inner, packed=True), *_coef_addresses(coefs),
            guidance_scale, threshold, clip_value, 0 if dynamic_scale is None else dynamic_scale.data_ptr())


def _launch_cpu(x, args):
    """The CPU binding on packed arguments (:func:`_step_args`); ``x`` is the sample."""
    _ext.cpu()[0].solver_step(*args, torch.get_num_threads())


def _launch_cuda(x, args):
    """The CUDA binding on packed arguments, on the current stream of the sample's device."""
    with on_device(x):
        _ext.cuda()[0].solver_step(*args, cuda_stream(x))


_LAUNCHERS = {"cpu": _launch_cpu, "cuda": _launch_cuda}


@step_op.register("cpu")
def _step_cpu(inputs, outputs, *args):
    _launch_cpu(inputs[0], _step_args(inputs, outputs, *args))


@step_op.register("cuda")
def _step_cuda(inputs, outputs, *args):
    _launch_cuda(inputs[0], _step_args(inputs, outputs, *args))


@step_op.register("triton")
def _step_triton(inputs, outputs, coefs, guidance_scale, threshold, clip_value, dynamic_scale):
    # The host coefficients become kernel arguments: no copy, and CUDA-graph capturable.
    with on_device(inputs[0]):
        _ext.triton()[0].solver_step.launch(inputs, outputs, coefs, guidance_scale, threshold, clip_value,
                                            dynamic_scale)


# --------------------------------------------------------------------------- custom op


@torch.library.custom_op("kdfast::solver_step", mutates_args=())
def _solver_step_op(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefs: torch.Tensor,
    cond: Optional[torch.Tensor],
    guidance_scale: float,
    history0: Optional[torch.Tensor],
    history1: Optional[torch.Tensor],
    history2: Optional[torch.Tensor],
    aux: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    threshold: int,
    clip_value: float,
    dynamic_scale: Optional[torch.Tensor],
    out_mask: int,
    history_dtype: torch.dtype,
    backend: str,
) -> List[torch.Tensor]:
    # Callable directly as torch.ops.kdfast.solver_step: check what the kernels take on trust
    # (solver_step checks it on its own path) and bring every input to the sample's layout.
    sample, model_output, cond, history0, history1, history2, aux, noise = _checked_op_tensors(
        sample, model_output, cond, history0, history1, history2, aux, noise)
    coefs = _check_coefs(coefs, sample)
    guidance_scale = _check_scalar("guidance_scale", guidance_scale)
    clip_value = _check_scalar("clip_value", clip_value)
    if threshold not in (THRESHOLD_NONE, THRESHOLD_CLIP, THRESHOLD_DYNAMIC):
        raise ValueError(f"threshold must be {THRESHOLD_NONE}, {THRESHOLD_CLIP} or {THRESHOLD_DYNAMIC}, "
                         f"got {threshold}")
    if threshold == THRESHOLD_CLIP:
        _check_clip_value(clip_value)
    if threshold == THRESHOLD_DYNAMIC:
        dynamic_scale = _check_dynamic_scale(dynamic_scale, sample)
    if not out_mask & _OUT_SAMPLE or out_mask & ~(_OUT_SAMPLE | _OUT_HISTORY | _OUT_AUX):
        raise ValueError(f"out_mask must include the sample output (1) and only bits 1, 2, 4, got {out_mask}")
    if history_dtype not in DTYPE_CODES and not (history_dtype is _F64 and sample.dtype is _F64):
        raise TypeError(f"history_dtype must be {_KERNEL_DTYPES} (float64 with a float64 sample), "
                        f"got {history_dtype}")
    return _solver_step(sample, model_output, coefs, cond, guidance_scale, history0, history1, history2,
                        aux, noise, threshold, clip_value, dynamic_scale, out_mask, history_dtype,
                        backend=backend or None)


def _checked_op_tensors(sample, *others) -> list:
    if (not isinstance(sample, torch.Tensor) or (sample.dtype not in DTYPE_CODES and sample.dtype is not _F64)
            or sample.dim() == 0):
        raise TypeError(f"sample must be a float32, float16, bfloat16 or float64 tensor with a batch dimension, got "
                        f"{describe('sample', sample) if isinstance(sample, torch.Tensor) else type(sample).__name__}")
    sample = op_layout(sample)
    return [sample] + [_check_like(name, t, sample) for name, t in zip(_INPUT_NAMES[1:], others)]


@_solver_step_op.register_fake
def _(sample, model_output, coefs, cond, guidance_scale, history0, history1, history2, aux, noise,
      threshold, clip_value, dynamic_scale, out_mask, history_dtype, backend):
    return [o for o in _allocate(op_layout(sample), out_mask, history_dtype) if o is not None]


def _setup_context(ctx, inputs, output):
    # sample, model_output, cond, history0-2, aux, noise, dynamic_scale, coefs (saved, not kept as
    # an attribute: changed in place before the backward, it must raise, not give other gradients)
    ctx.save_for_backward(*(inputs[i] for i in (0, 1, 3, 5, 6, 7, 8, 9, 12, 2)))
    ctx.scalars = (inputs[4], inputs[10], inputs[11], inputs[13])


def _backward(ctx, grads):
    # The step is linear apart from guidance and thresholding, so the vector-Jacobian product
    # of the reference is exact and cheap. A dynamic threshold scale gets its gradient too
    # (it comes from threshold_scale, whose own backward carries it on to x and the model), and
    # so do the coefficients (learned solver coefficients), one row or a row per sample.
    *saved, dynamic_scale, coefs = ctx.saved_tensors
    guidance_scale, threshold, clip_value, mask = ctx.scalars
    compute = _F64 if saved[0].dtype is _F64 else _F32  # what the forward computed in
    if threshold != THRESHOLD_DYNAMIC:
        dynamic_scale = None
    # create_graph=True (a gradient penalty, second-order terms of learned coefficients): the
    # reference's vector-Jacobian product is built on the inputs themselves, so that it is
    # differentiable in turn; otherwise on detached copies.
    create_graph = torch.is_grad_enabled()

    def as_leaf(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
        if t is None:
            return None
        if create_graph and t.requires_grad:
            # a node of its own per input slot (a view when no cast makes one): one tensor passed
            # as two inputs must get each slot's gradient once, not the sum of both twice
            return t.to(dtype) if t.dtype != dtype else t.view_as(t)
        return t.detach().to(dtype).requires_grad_(True)

    with torch.enable_grad():
        leaves = [as_leaf(t, compute) for t in saved]
        scale = as_leaf(dynamic_scale, compute)
        coef_leaf = as_leaf(coefs, coefs.dtype) if ctx.needs_input_grad[2] else None
        outs = ref.solver_step(leaves, coefs if coef_leaf is None else coef_leaf, guidance_scale, threshold,
                               clip_value, scale, compute)
        kept = [outs[k] for k in range(3) if mask & (1 << k)]
        pairs = [(o, g) for o, g in zip(kept, grads) if g is not None]
        wrt = [t for t in leaves + [scale, coef_leaf] if t is not None]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g.to(compute) for _, g in pairs], allow_unused=True,
                                  create_graph=create_graph)
    it = iter(got)
    result = []
    for orig, leaf in zip(saved + [dynamic_scale, coefs], leaves + [scale, coef_leaf]):
        g = None if leaf is None else next(it)
        result.append(None if g is None or orig is None else g.to(orig.dtype))
    sample_g, model_g, cond_g, h0_g, h1_g, h2_g, aux_g, noise_g, scale_g, coefs_g = result
    return (sample_g, model_g, coefs_g, cond_g, None, h0_g, h1_g, h2_g, aux_g, noise_g, None, None, scale_g, None,
            None, None)


_solver_step_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- threshold scale


def threshold_scale(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    x0_from_x: float,
    x0_from_model: float,
    *,
    cond: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    ratio: float = 0.995,
    max_value: float = 1.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-sample dynamic-thresholding scale ``clamp(quantile(|x0|, ratio), 1, max_value)``.

    ``x0 = x0_from_x * sample + x0_from_model * m`` with ``m`` the guided model output, as
    in :func:`solver_step`. Returns float32 ``[batch]`` on the sample's device, no host sync
    (float64, computed in float64 by the reference backend, for a float64 sample).
    Differentiable: the gradient is torch.quantile's (linear interpolation between the two
    order statistics around the quantile, sent back through ``|x0|``), zero where the clamp
    to ``[1, max_value]`` is active.
    """
    args = _threshold_checked(sample, model_output, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value)
    sample, model_output, cond = args[:3]
    if reference_required((sample, model_output, cond)):  # torch.func's transforms, forward-mode AD
        _select(threshold_op, sample, backend)  # (the backend asked for is checked as outside)
        compute = _F64 if sample.dtype is _F64 else _F32
        return ref.threshold_scale(*args, compute_dtype=compute)
    if _needs_dispatcher((sample, model_output, cond)):  # (autograd and torch.compile, a forced backend too)
        return torch.ops.kdfast.threshold_scale(*args, backend or "")
    return _threshold_scale(*args, backend=backend)


def _threshold_checked(sample, model_output, cond, guidance_scale, x0_from_x, x0_from_model, ratio,
                       max_value) -> tuple:
    """:func:`threshold_scale`'s arguments checked, the tensors in a layout the kernels read (also
    for a direct ``torch.ops.kdfast.threshold_scale`` call: the kernels take them on trust)."""
    if (not isinstance(sample, torch.Tensor) or (sample.dtype not in DTYPE_CODES and sample.dtype is not _F64)
            or sample.dim() == 0):
        raise TypeError("sample must be a float32/float16/bfloat16/float64 tensor with a batch dimension")
    if math.prod(sample.shape[1:]) == 0:  # (an empty batch is fine: its scales are an empty tensor)
        raise ValueError(f"sample must have at least one element per sample, got shape {tuple(sample.shape)}")
    sample = sample_layout(sample)
    if model_output is None:  # (_check_like passes the optional inputs' None through)
        raise TypeError("model_output must be a torch.Tensor, got NoneType")
    model_output = _check_like("model_output", model_output, sample)
    cond = _check_like("cond", cond, sample)
    ratio = real_number("ratio", ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    max_value = _check_scalar("max_value", max_value)
    if max_value <= F32_ROUNDS_TO_ZERO:  # (the scale divides x0: 0, in float32 too, gives NaN; a negative one flips it)
        raise ValueError(f"max_value must be positive, above {F32_ROUNDS_TO_ZERO:.8g} (the kernels compute in "
                         f"float32, which rounds it to 0), got {max_value}")
    return (sample, model_output, cond, _check_scalar("guidance_scale", guidance_scale),
            _check_scalar("x0_from_x", x0_from_x), _check_scalar("x0_from_model", x0_from_model), ratio, max_value)


def _threshold_scale(sample, model_output, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value,
                     backend=None):
    out = torch.empty(sample.shape[0], dtype=_F64 if sample.dtype is _F64 else _F32, device=sample.device)
    impl = _select(threshold_op, sample, backend)
    if sample.shape[0] > 0:  # (no sample, nothing to run: the kernels divide by the batch)
        impl.run(out, sample, model_output, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value)
    return out


@threshold_op.register("reference")
def _threshold_reference(out, x, model, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value):
    out.copy_(ref.threshold_scale(x, model, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value,
                                  compute_dtype=out.dtype))


def _threshold_args(out, x, model, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value):
    inner = x.numel() // len(x)
    return (len(x), inner, *addresses((x, model, cond), inner), x0_from_x, x0_from_model,
            guidance_scale, ratio, max_value, out.data_ptr())


@threshold_op.register("cpu")
def _threshold_cpu(out, *args):
    _ext.cpu()[0].threshold_scale(*_threshold_args(out, *args), torch.get_num_threads())


@threshold_op.register("cuda")
def _threshold_cuda(out, *args):
    with on_device(out):
        _ext.cuda()[0].threshold_scale(*_threshold_args(out, *args), cuda_stream(out))


@torch.library.custom_op("kdfast::threshold_scale", mutates_args=())
def _threshold_scale_op(sample: torch.Tensor, model_output: torch.Tensor, cond: Optional[torch.Tensor],
                        guidance_scale: float, x0_from_x: float, x0_from_model: float, ratio: float,
                        max_value: float, backend: str) -> torch.Tensor:
    # A direct torch.ops call is checked as the public entry checks its arguments.
    return _threshold_scale(*_threshold_checked(sample, model_output, cond, guidance_scale, x0_from_x, x0_from_model,
                                                ratio, max_value), backend=backend or None)


@_threshold_scale_op.register_fake
def _(sample, model_output, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value, backend):
    return sample.new_empty((sample.shape[0],), dtype=_F64 if sample.dtype is _F64 else _F32)


def _threshold_setup_context(ctx, inputs, output):
    sample, model_output, cond = inputs[:3]
    ctx.save_for_backward(sample, model_output, cond, output)
    ctx.scalars = inputs[3:8]


def _threshold_backward(ctx, grad):
    """The vector-Jacobian product of ``clamp(quantile(|x0|, ratio), 1, max_value)``, analytic:
    the quantile's linear interpolation sends ``1 - frac`` of the gradient to the ``lo``-th
    smallest ``|x0|`` and ``frac`` to the ``hi``-th (found by the same sort torch.quantile
    uses, so ties go where its gradient sends them), ``|.|`` multiplies by ``sign(x0)``, and the
    clamp passes it only where ``1 <= quantile <= max_value`` (none where the scale is NaN).
    Equal to autograd through the pure-torch reference, without torch.quantile's limit of
    2^24 values."""
    sample, model_output, cond, scale = ctx.saved_tensors
    guidance_scale, x0_from_x, x0_from_model, ratio, max_value = ctx.scalars
    compute = _F64 if sample.dtype is _F64 else _F32
    m = ref.guided(model_output.to(compute), None if cond is None else cond.to(compute), guidance_scale)
    x0 = (x0_from_x * sample.to(compute) + x0_from_model * m).reshape(sample.shape[0], math.prod(sample.shape[1:]))
    values, order = x0.abs().sort(dim=1)
    lo, hi, frac = ref.quantile_position(ratio, x0.shape[1], compute)
    below, above = values[:, lo], values[:, hi]
    quantile = torch.lerp(below, above, frac)  # a Python weight: no host-to-device copy (a sync on CUDA)
    g = grad.to(compute) * ((quantile >= 1.0) & (quantile <= max_value) & ~scale.isnan())
    g_abs = torch.zeros_like(x0)
    g_abs.scatter_add_(1, order[:, lo:lo + 1], (g * (1.0 - frac)).unsqueeze(1))
    g_abs.scatter_add_(1, order[:, hi:hi + 1], (g * frac).unsqueeze(1))
    g_x0 = (g_abs * x0.sign()).reshape(sample.shape)
    need = ctx.needs_input_grad
    grad_sample = (x0_from_x * g_x0).to(sample.dtype) if need[0] else None
    grad_model = grad_cond = None
    if cond is None:
        if need[1]:
            grad_model = (x0_from_model * g_x0).to(model_output.dtype)
    else:  # m = model + s * (cond - model)
        if need[1]:
            grad_model = (x0_from_model * (1.0 - guidance_scale) * g_x0).to(model_output.dtype)
        if need[2]:
            grad_cond = (x0_from_model * guidance_scale * g_x0).to(cond.dtype)
    return grad_sample, grad_model, grad_cond, None, None, None, None, None, None


_threshold_scale_op.register_autograd(_threshold_backward, setup_context=_threshold_setup_context)
