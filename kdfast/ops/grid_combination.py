"""``kdfast.ops.grid_combination``: a sample plus weighted grid points of wide model outputs, in one pass.

A model that predicts ``G`` values per channel (pi-Flow's policy models) returns an output ``G``
times wider than its sample in the last dimension, grid point ``g`` at ``[..., g*C:(g+1)*C]``.
A sampler step over such outputs is a fixed linear combination::

    out = a * sample + sum_k sum_g w[k][g] * outputs[k][..., g*C:(g+1)*C]

with weights the host computes when the schedule is set (guidance folded into the weights of an
unconditional and a conditional output). The kernels read the sample and each used grid point
once and write the result once: the bytes' lower bound. The math is in
csrc/grid_combination/grid_combination.h; :mod:`kdfast.reference.grid_combination` is the spec.
This module is the only place where these tensors become addresses.
"""
# (No `from __future__ import annotations` here: torch 2.4's custom_op takes the annotations of
# an op's signature as types and refuses them as strings.)

from typing import Optional, Sequence, Tuple, Union

import torch

from .. import _ext, backends
from ..backends import BackendUnavailableError
from ..reference import grid_combination as ref
from ._tensors import (DTYPE_CODES, cuda_stream, describe, dispatcher_required, eager_autograd, has_subclass, on_device,
                       reference_required)

combination_op = backends.op("grid_combination")

MAX_WEIGHTS = 128  # outputs x grid points the kernels take (kMaxWeights in the header); more: the reference
_F32, _F64 = torch.float32, torch.float64
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------- validation


def _check_sample(sample) -> None:
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.dtype not in _FLOATS:
        raise TypeError(f"sample must be float32, float16, bfloat16 or float64, got {sample.dtype}")
    if sample.dim() < 1:
        raise ValueError("sample must have a channel dimension (its last), got a 0-d tensor")


def _as_outputs(outputs) -> Tuple[torch.Tensor, ...]:
    if isinstance(outputs, torch.Tensor):
        return (outputs,)
    if not isinstance(outputs, (list, tuple)) or not 1 <= len(outputs) <= 2:
        raise TypeError("outputs must be a torch.Tensor or a sequence of one or two (e.g. unconditional and "
                        f"conditional), got {type(outputs).__name__}"
                        + (f" of {len(outputs)}" if isinstance(outputs, (list, tuple)) else ""))
    return tuple(outputs)


def _check_coefs(coefs, outputs: int) -> int:
    """The grid size ``coefs`` implies for ``outputs`` outputs."""
    if not isinstance(coefs, torch.Tensor):
        raise TypeError(f"coefs must be a CPU float32 (or float64) torch.Tensor, got {type(coefs).__name__}")
    if coefs.dtype not in (_F32, _F64) or not coefs.is_cpu or coefs.dim() != 1:
        raise ValueError(f"coefs must be a 1-d CPU float32 (or float64) tensor, got {describe('coefs', coefs)}")
    values = coefs.numel() - 1
    grid, rest = values // outputs, values % outputs  # (not divmod: dynamo cannot trace it on a symbolic size)
    if grid < 1 or rest:
        raise ValueError(f"coefs must hold 1 + {outputs} x grid values (the sample's weight, then each output's "
                         f"grid weights), got {coefs.numel()}")
    return grid


def _checked(sample, outputs, coefs):
    _check_sample(sample)
    outputs = _as_outputs(outputs)
    channels = sample.shape[-1]
    width = None
    for k, y in enumerate(outputs):
        name = f"outputs[{k}]"
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        if y.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {y.dtype}")
        if y.device != sample.device:
            raise ValueError(f"{name} must be on {sample.device} like sample, got {y.device}")
        same_dims = y.dim() == sample.dim()  # (a 0-d output has no last dimension to read)
        width = y.shape[-1] if width is None and same_dims else width
        # (a sample of 0 channels has empty outputs: 0 grid points x 0 channels or G x 0)
        bad_width = width is None or (width != 0 if channels == 0 else (width == 0 or width % channels != 0))
        if not same_dims or y.shape[:-1] != sample.shape[:-1] or y.shape[-1] != width or bad_width:
            raise ValueError(f"{name} must have the sample's shape {tuple(sample.shape)} but for its last dimension, a "
                             f"multiple of the sample's {channels} channels (grid points x channels"
                             + (", so empty" if channels == 0 else "") + ")"
                             + (" like outputs[0]'s" if k else "") + f", got {tuple(y.shape)}")
    grid = _check_coefs(coefs, len(outputs))
    if channels and grid * channels != width:
        raise ValueError(f"coefs must hold 1 + {len(outputs)} x {width // channels} values for outputs of "
                         f"{width // channels} grid points (the sample's weight, then each output's grid weights), "
                         f"got {coefs.numel()}")
    return sample, outputs, coefs, grid


# --------------------------------------------------------------------------- public entry


def grid_combination(sample: torch.Tensor, outputs: Union[torch.Tensor, Sequence[torch.Tensor]],
                     coefs: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """``coefs[0] * sample + sum_k sum_g coefs[1 + k*G + g] * outputs[k][..., g*C:(g+1)*C]`` in one pass.

    Args:
        sample: ``[..., C]`` float32/float16/bfloat16 (or float64, computed by the reference in
            float64). The result has its shape and dtype, contiguous.
        outputs: one ``[..., G*C]`` tensor or a sequence of two (the two halves of a guided
            forward, say), ``G`` grid points per channel; any float dtype, on the sample's device.
        coefs: a 1-d CPU float32 (or float64) tensor ``[a, w[0][0..G), w[1][0..G)]``. The values
            travel as kernel arguments: no copy to the device, CUDA-graph capturable. A zero
            weight drops its term and its grid point is not read.
        backend: force a backend (else ``KDFAST_BACKEND``, else the fastest usable).

    Computed in float32 for every input dtype, terms added in order with each product rounded
    before its sum (no fused multiply-adds, Triton's included), so every backend gives the same
    bits (the Triton interpreter on a CPU rounds bf16 by truncation). More than
    ``MAX_WEIGHTS`` grid weights in all are combined by the reference backend. Differentiable in
    ``sample``, ``outputs`` and ``coefs``.
    """
    sample, outputs, coefs, grid = _checked(sample, outputs, coefs)
    second = outputs[1] if len(outputs) == 2 else None
    args = (sample, outputs[0], second, coefs, backend or "")
    tensors = (sample, outputs[0], second, coefs)
    if reference_required(tensors):  # torch.func's transforms, forward-mode AD: torch's ops carry them
        _select(sample, outputs, grid, backend)  # (the backend asked for is checked as outside)
        return ref.grid_combination(sample, outputs, coefs, differentiable_weights=True)
    if dispatcher_required() or has_subclass(tensors):
        return torch.ops.kdfast.grid_combination(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _EagerGridCombination.apply(*args)
    return _forward(*args)


# --------------------------------------------------------------------------- kernel calls


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as ``[rows, width]`` with a contiguous last dimension: a view when its rows are evenly
    strided (a contiguous tensor, a batch slice of one), else a copy."""
    rows = t.reshape(-1, width)
    return rows if rows.stride(1) == 1 or width == 1 else rows.contiguous()


def _select(sample, ys, grid: int, backend: str) -> backends.Implementation:
    why = None
    if any(t.dtype is _F64 for t in (sample, *ys)):
        why = "float64 tensors (the kernels compute in float32; the reference computes float64 in float64)"
    elif len(ys) * grid > MAX_WEIGHTS:
        why = f"{len(ys) * grid} grid weights (the kernels take at most {MAX_WEIGHTS})"
    if why is None:
        return combination_op.select(sample.device.type, backend or None)
    backends.check_known(backend)
    forced = backend or backends._FORCED
    if forced and forced != "reference":
        raise BackendUnavailableError(f"backend {forced!r} cannot run kdfast.grid_combination on {why}")
    return combination_op.select(sample.device.type, "reference")


def _forward(sample, output, second, coefs, backend=None) -> torch.Tensor:
    ys = (output,) if second is None else (output, second)
    grid = (coefs.numel() - 1) // len(ys)
    out = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    impl = _select(sample, ys, grid, backend)  # (for an empty sample too: a bad backend is named)
    if out.numel() == 0:
        return out
    if impl.backend == "reference":
        impl.run(sample, ys, coefs, out)
        return out
    channels = sample.shape[-1]
    weights = coefs if coefs.dtype is _F32 else coefs.to(_F32)
    impl.run(_rows(sample, channels), tuple(_rows(y, grid * channels) for y in ys), weights.contiguous(),
             out.view(-1, channels))
    return out


@combination_op.register("reference")
def _reference(sample, ys, coefs, out):
    out.copy_(ref.grid_combination(sample, ys, coefs))


def _binding_args(x, ys, coefs, out) -> tuple:
    rows, channels = x.shape
    two = len(ys) == 2
    return (rows, channels, (coefs.numel() - 1) // len(ys), x.data_ptr(), x.stride(0), DTYPE_CODES[x.dtype],
            [ys[0].data_ptr(), ys[1].data_ptr() if two else 0], [ys[0].stride(0), ys[1].stride(0) if two else 0],
            [DTYPE_CODES[ys[0].dtype], DTYPE_CODES[ys[1].dtype] if two else 0], out.data_ptr(),
            DTYPE_CODES[out.dtype], coefs.data_ptr(), coefs.numel())


@combination_op.register("cpu")
def _cpu(x, ys, coefs, out):
    _ext.cpu()[0].grid_combination(*_binding_args(x, ys, coefs, out), torch.get_num_threads())


@combination_op.register("cuda")
def _cuda(x, ys, coefs, out):
    with on_device(x):
        _ext.cuda()[0].grid_combination(*_binding_args(x, ys, coefs, out), cuda_stream(x))


@combination_op.register("triton")
def _triton(x, ys, coefs, out):
    with on_device(x):
        _ext.triton()[0].grid_combination.launch(x, ys, coefs, out)


# --------------------------------------------------------------------------- custom op + autograd


@torch.library.custom_op("kdfast::grid_combination", mutates_args=())
def _grid_combination_op(sample: torch.Tensor, output: torch.Tensor, second: Optional[torch.Tensor],
                         coefs: torch.Tensor, backend: str) -> torch.Tensor:
    # A direct torch.ops call is checked as the public entry checks its arguments.
    _checked(sample, (output,) if second is None else (output, second), coefs)
    return _forward(sample, output, second, coefs, backend)


@_grid_combination_op.register_fake
def _(sample, output, second, coefs, backend):
    return torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)


def _setup_context(ctx, inputs, output):
    sample, first, second, coefs, backend = inputs
    ctx.save_for_backward(sample, first, second, coefs)


def _backward(ctx, grad):
    sample, first, second, coefs = ctx.saved_tensors
    ys = (first,) if second is None else (first, second)
    channels = sample.shape[-1]
    grid = (coefs.numel() - 1) // len(ys)
    compute = _F64 if grad.dtype is _F64 else _F32
    g = grad.to(compute)
    weights = coefs.to(device=grad.device, dtype=compute)
    grads = [None, None, None, None, None]
    if ctx.needs_input_grad[0]:
        grads[0] = (g * weights[0]).to(sample.dtype)
    for k, y in enumerate(ys):
        if ctx.needs_input_grad[1 + k]:
            w = weights[1 + k * grid:1 + (k + 1) * grid, None]
            grads[1 + k] = (g.unsqueeze(-2) * w).flatten(-2).to(y.dtype)
    if ctx.needs_input_grad[3]:
        # A zero weight's term is skipped by the forward pass: where it holds inf or NaN it is
        # masked here, so the weight's gradient is sum(grad * masked term) as torch.func's (the
        # reference's differentiable path) is, not NaN.
        def masked(term, w):
            return torch.where((w != 0) | torch.isfinite(term), term, 0.0)

        parts = [(g * masked(sample.to(compute), weights[0])).sum().reshape(1)]
        for k, y in enumerate(ys):
            points = masked(y.to(compute).unflatten(-1, (grid, channels)),
                            weights[1 + k * grid:1 + (k + 1) * grid, None])
            parts.append((g.unsqueeze(-2) * points).reshape(-1, grid, channels).sum((0, 2)))
        grads[3] = torch.cat(parts).to(device=coefs.device, dtype=coefs.dtype)
    return tuple(grads)


_grid_combination_op.register_autograd(_backward, setup_context=_setup_context)


_EagerGridCombination = eager_autograd("grid_combination", _forward, _setup_context, _backward)
