"""``kdfast.ops.solver_step``: one fused pass for one step of a diffusion solver.

The math (see csrc/solver_step/solver_step.h) is a guided, optionally thresholded data
prediction followed by fixed linear combinations. Schedulers compute the 29 coefficients
of each step on the host, in float64, when their schedule is set; :func:`coefficients`
packs them. This module is the only place where these tensors become addresses.
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from .. import _ext, backends
from ..reference import solver_step as ref
from ._tensors import DTYPE_CODES, addresses, describe, sample_major

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
    row[0], row[1] = float(x0_from_x), float(x0_from_model)
    for k, terms in enumerate((sample, history, aux)):
        for name, value in (terms or {}).items():
            if name not in SOURCES:
                raise ValueError(f"unknown source {name!r} in {OUTPUTS[k]} coefficients; expected one of {SOURCES}")
            row[2 + len(SOURCES) * k + SOURCES.index(name)] += float(value)
    return row


# --------------------------------------------------------------------------- validation


def _check_like(name: str, t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of sample {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like sample, got {t.device}")
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return sample_major(t)


def _check_coefs(coefs: torch.Tensor) -> torch.Tensor:
    if not isinstance(coefs, torch.Tensor):
        raise TypeError(f"coefs must be a torch.Tensor of {NUM_COEFS} float32 values, got {type(coefs).__name__}")
    if not coefs.is_cpu or coefs.dtype != torch.float32 or coefs.numel() != NUM_COEFS:
        raise ValueError(
            f"coefs must be a CPU float32 tensor of {NUM_COEFS} values, got {describe('coefs', coefs)}"
        )
    return coefs.contiguous()


def _check_scalar(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def _needs_dispatcher(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """True when the call must go through torch's dispatcher (compile, autograd, modes).

    Plain eager calls skip it: the custom-op boxing costs ~10 us per call on the CPU, as much
    as the whole fused step at SD latent sizes.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
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
    history: Sequence[torch.Tensor] = (),
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
        sample: the current latent ``x``, shape ``[batch, ...]``, float32/16 or bfloat16.
        model_output: the model's output; the unconditional one when ``cond`` is given.
        coefs: CPU float32 tensor of 29 coefficients (see :func:`coefficients`).
        cond: conditional model output for classifier-free guidance
            ``m = model_output + guidance_scale * (cond - model_output)``.
        history: up to three earlier history entries (multistep solvers), newest first.
        aux: an extra latent the step combines (UniPC's last sample, Heun's first-stage sample).
        noise: noise for SDE / ancestral steps, drawn by the caller's generator.
        clip_value: clamp x0 to ``[-clip_value, clip_value]`` (diffusers ``clip_sample``).
        dynamic_scale: per-sample float32 ``[batch]`` scale from :func:`threshold_scale`;
            x0 is clamped to ``[-s, s]`` and divided by ``s`` (dynamic thresholding).
        write_history / write_aux: also return the history entry / auxiliary output.
        history_dtype: dtype of the returned history entry (default: the sample's dtype).
        backend: force a backend (else ``KDFAST_BACKEND``, else the fastest usable).

    Returns:
        ``StepResult(sample, history, aux)``; entries not asked for are None.
    """
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.dtype not in DTYPE_CODES:
        raise TypeError(f"sample must be float32, float16 or bfloat16, got {sample.dtype}")
    if sample.dim() == 0:
        raise ValueError("sample must have a batch dimension, got a 0-d tensor")
    if len(history) > 3:
        raise ValueError(f"history holds at most 3 entries, got {len(history)}")
    if clip_value is not None and dynamic_scale is not None:
        raise ValueError("pass clip_value or dynamic_scale, not both")
    sample = sample_major(sample)
    model_output = _check_like("model_output", model_output, sample)
    if model_output is None:
        raise TypeError("model_output must be a torch.Tensor, got None")
    cond = _check_like("cond", cond, sample)
    hist = [_check_like(f"history[{i}]", h, sample) for i, h in enumerate(history)]
    hist += [None] * (3 - len(hist))
    aux = _check_like("aux", aux, sample)
    noise = _check_like("noise", noise, sample)
    coefs = _check_coefs(coefs)
    guidance_scale = _check_scalar("guidance_scale", guidance_scale)
    threshold, clip = THRESHOLD_NONE, 1.0
    if clip_value is not None:
        threshold, clip = THRESHOLD_CLIP, _check_scalar("clip_value", clip_value)
    if dynamic_scale is not None:
        threshold = THRESHOLD_DYNAMIC
        if (
            not isinstance(dynamic_scale, torch.Tensor)
            or dynamic_scale.dtype != torch.float32
            or dynamic_scale.shape != (sample.shape[0],)
            or dynamic_scale.device != sample.device
        ):
            raise ValueError(
                f"dynamic_scale must be a float32 tensor of shape ({sample.shape[0]},) on {sample.device}"
            )
        dynamic_scale = dynamic_scale.contiguous()
    history_dtype = sample.dtype if history_dtype is None else history_dtype
    if history_dtype not in DTYPE_CODES:
        raise TypeError(f"history_dtype must be float32, float16 or bfloat16, got {history_dtype}")
    mask = _OUT_SAMPLE | (_OUT_HISTORY if write_history else 0) | (_OUT_AUX if write_aux else 0)

    args = (sample, model_output, coefs, cond, guidance_scale, *hist, aux, noise, threshold, clip,
            dynamic_scale, mask, history_dtype)
    if backend is None and _needs_dispatcher((sample, model_output, cond, *hist, aux, noise)):
        outs = torch.ops.kdfast.solver_step(*args)
    else:
        outs = _solver_step(*args, backend=backend)
    it = iter(outs)
    return StepResult(next(it), next(it) if write_history else None, next(it) if write_aux else None)


def _allocate(sample: torch.Tensor, mask: int, history_dtype: torch.dtype) -> List[Optional[torch.Tensor]]:
    def new(dtype):  # empty_like parses its arguments ~2x faster than empty(shape, dtype=, device=)
        return torch.empty_like(sample, dtype=dtype, memory_format=torch.contiguous_format)

    return [
        new(sample.dtype) if mask & _OUT_SAMPLE else None,
        new(history_dtype) if mask & _OUT_HISTORY else None,
        new(sample.dtype) if mask & _OUT_AUX else None,
    ]


def _solver_step(sample, model_output, coefs, cond, guidance_scale, h0, h1, h2, aux, noise, threshold,
                 clip_value, dynamic_scale, mask, history_dtype, backend=None) -> List[torch.Tensor]:
    inputs = [sample, model_output, cond, h0, h1, h2, aux, noise]
    outputs = _allocate(sample, mask, history_dtype)
    if sample.numel() > 0:
        impl = step_op.select(sample.device.type, backend)
        impl.run(inputs, outputs, coefs, guidance_scale, threshold, clip_value, dynamic_scale)
    return [o for o in outputs if o is not None]


# --------------------------------------------------------------------------- backends


@step_op.register("reference")
def _step_reference(inputs, outputs, coefs, guidance_scale, threshold, clip_value, dynamic_scale):
    outs = ref.solver_step(inputs, coefs, guidance_scale, threshold, clip_value, dynamic_scale)
    for out, value in zip(outputs, outs):
        if out is not None:
            out.copy_(value)


def _step_args(inputs, outputs, coefs, guidance_scale, threshold, clip_value, dynamic_scale) -> tuple:
    """The binding's arguments up to (not including) the CPU threads / CUDA stream."""
    x = inputs[0]
    batch = len(x)
    inner = x.numel() // batch
    return (batch, inner, *addresses(inputs, inner), *addresses(outputs, inner), coefs.data_ptr(), guidance_scale,
            threshold, clip_value, 0 if dynamic_scale is None else dynamic_scale.data_ptr())


@step_op.register("cpu")
def _step_cpu(inputs, outputs, *args):
    _ext.cpu()[0].solver_step(*_step_args(inputs, outputs, *args), torch.get_num_threads())


@step_op.register("cuda")
def _step_cuda(inputs, outputs, *args):
    _ext.cuda()[0].solver_step(*_step_args(inputs, outputs, *args),
                               torch.cuda.current_stream(inputs[0].device).cuda_stream)


@step_op.register("triton")
def _step_triton(inputs, outputs, coefs, guidance_scale, threshold, clip_value, dynamic_scale):
    # The Triton kernel reads its coefficients from memory on the tensors' device.
    coefs = coefs.to(inputs[0].device, non_blocking=True)
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
) -> List[torch.Tensor]:
    return _solver_step(sample, model_output, coefs, cond, guidance_scale, history0, history1, history2,
                        aux, noise, threshold, clip_value, dynamic_scale, out_mask, history_dtype)


@_solver_step_op.register_fake
def _(sample, model_output, coefs, cond, guidance_scale, history0, history1, history2, aux, noise,
      threshold, clip_value, dynamic_scale, out_mask, history_dtype):
    return [o for o in _allocate(sample, out_mask, history_dtype) if o is not None]


_DIFFERENTIABLE = ("sample", "model_output", "cond", "history0", "history1", "history2", "aux", "noise")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(inputs[i] for i in (0, 1, 3, 5, 6, 7, 8, 9)))
    ctx.coefs = inputs[2]
    ctx.scalars = (inputs[4], inputs[10], inputs[11], inputs[12], inputs[13])


def _backward(ctx, grads):
    # The step is linear apart from guidance and thresholding, so the vector-Jacobian product
    # of the reference (with the dynamic threshold scale held constant) is exact and cheap.
    saved = list(ctx.saved_tensors)
    guidance_scale, threshold, clip_value, dynamic_scale, mask = ctx.scalars
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().float().requires_grad_(True) for t in saved]
        outs = ref.solver_step(leaves, ctx.coefs, guidance_scale, threshold, clip_value,
                               None if dynamic_scale is None else dynamic_scale.detach())
        kept = [outs[k] for k in range(3) if mask & (1 << k)]
        pairs = [(o, g) for o, g in zip(kept, grads) if g is not None]
        wrt = [t for t in leaves if t is not None]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g.float() for _, g in pairs], allow_unused=True)
    it = iter(got)
    result = []
    for orig, leaf in zip(saved, leaves):
        g = None if leaf is None else next(it)
        result.append(None if g is None or orig is None else g.to(orig.dtype))
    sample_g, model_g, cond_g, h0_g, h1_g, h2_g, aux_g, noise_g = result
    return (sample_g, model_g, None, cond_g, None, h0_g, h1_g, h2_g, aux_g, noise_g, None, None, None, None, None)


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
    in :func:`solver_step`. Returns float32 ``[batch]`` on the sample's device, no host sync.
    """
    if not isinstance(sample, torch.Tensor) or sample.dtype not in DTYPE_CODES or sample.dim() == 0:
        raise TypeError("sample must be a float32/float16/bfloat16 tensor with a batch dimension")
    if sample.numel() == 0 or sample.numel() // sample.shape[0] == 0:
        raise ValueError(f"sample must have at least one element per sample, got shape {tuple(sample.shape)}")
    sample = sample_major(sample)
    model_output = _check_like("model_output", model_output, sample)
    cond = _check_like("cond", cond, sample)
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    args = (sample, model_output, cond, _check_scalar("guidance_scale", guidance_scale),
            _check_scalar("x0_from_x", x0_from_x), _check_scalar("x0_from_model", x0_from_model),
            float(ratio), _check_scalar("max_value", max_value))
    if backend is None and _needs_dispatcher((sample, model_output, cond)):
        return torch.ops.kdfast.threshold_scale(*args)
    return _threshold_scale(*args, backend=backend)


def _threshold_scale(sample, model_output, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value,
                     backend=None):
    out = torch.empty(sample.shape[0], dtype=torch.float32, device=sample.device)
    impl = threshold_op.select(sample.device.type, backend)
    impl.run(out, sample, model_output, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value)
    return out


@threshold_op.register("reference")
def _threshold_reference(out, x, model, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value):
    out.copy_(ref.threshold_scale(x, model, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value))


def _threshold_args(out, x, model, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value):
    inner = x.numel() // len(x)
    return (len(x), inner, *addresses((x, model, cond), inner), x0_from_x, x0_from_model,
            guidance_scale, ratio, max_value, out.data_ptr())


@threshold_op.register("cpu")
def _threshold_cpu(out, *args):
    _ext.cpu()[0].threshold_scale(*_threshold_args(out, *args), torch.get_num_threads())


@threshold_op.register("cuda")
def _threshold_cuda(out, *args):
    _ext.cuda()[0].threshold_scale(*_threshold_args(out, *args), torch.cuda.current_stream(out.device).cuda_stream)


@torch.library.custom_op("kdfast::threshold_scale", mutates_args=())
def _threshold_scale_op(sample: torch.Tensor, model_output: torch.Tensor, cond: Optional[torch.Tensor],
                        guidance_scale: float, x0_from_x: float, x0_from_model: float, ratio: float,
                        max_value: float) -> torch.Tensor:
    return _threshold_scale(sample, model_output, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value)


@_threshold_scale_op.register_fake
def _(sample, model_output, cond, guidance_scale, x0_from_x, x0_from_model, ratio, max_value):
    return sample.new_empty((sample.shape[0],), dtype=torch.float32)
