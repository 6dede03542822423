"""``kdfast.ops.group_norm_act``: fused group norm + activation for UNet inference.

``y = act(GroupNorm(x + shift))`` in one kernel where torch runs three (an add for the
embedding a ResBlock adds between its convolutions, the group norm, the SiLU), each reading
and writing the whole feature map. x is ``[N, C, *spatial]`` in torch's contiguous format or
channels-last; the output keeps x's layout and dtype. The math is in
csrc/group_norm/group_norm.h; :mod:`kdfast.reference.group_norm` is the spec.

The backward recomputes the forward with torch's own ops and differentiates that (exact,
and at most as fast as torch's group norm in training): the kernel is for inference, where
UNet teachers spend their time in distillation and sampling.
This module is the only place where these tensors become addresses.
"""
# (No `from __future__ import annotations` here: torch 2.4's custom_op takes the annotations of
# an op's signature as types and refuses them as strings.)

import functools
import math
import numbers
from typing import Optional

import numpy as np
import torch

from .. import _ext, backends
from .._checks import as_float, is_finite_number, not_a_number
from ..reference import group_norm as ref
from ._tensors import (DTYPE_CODES, F32_ROUNDS_TO_ZERO, cuda_stream, dense_format, dispatcher_required, eager_autograd,
                       has_subclass, on_device, reference_required)

ACTIVATIONS = ref.ACTIVATIONS  # same order as kdfast::group_norm::Activation
group_norm_op = backends.op("group_norm_act")

_CHANNELS_LAST_FORMATS = (torch.channels_last, torch.channels_last_3d)


# --------------------------------------------------------------------------- validation


def _check_x(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be [batch, channels, ...], got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    # Each sample must be one dense block in channel-major or channels-last order.
    return x if dense_format(x) is not None else x.contiguous()


def _check_groups(num_groups, channels: int) -> int:
    if isinstance(num_groups, (bool, np.bool_)) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    num_groups = int(num_groups)  # (numpy's too, as F.group_norm takes them)
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of the {channels} channels, got {num_groups}")
    return num_groups


def _check_vector(name: str, t, x: torch.Tensor) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape ({x.shape[1]},), one value per channel, got {tuple(t.shape)}")
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on {x.device} like x, got {t.device}")
    return t.contiguous()


def _check_shift(shift, x: torch.Tensor) -> Optional[torch.Tensor]:
    if shift is None:
        return None
    if not isinstance(shift, torch.Tensor):
        raise TypeError(f"shift must be a torch.Tensor or None, got {type(shift).__name__}")
    n, c = x.shape[0], x.shape[1]
    shape = shift.shape
    dims = len(shape)
    if dims < 2 or shape[0] != n or shape[1] != c or dims > x.dim() or (dims > 2 and math.prod(shape[2:]) != 1):
        raise ValueError(f"shift must have shape ({n}, {c}) (or ({n}, {c}, 1, ...)), one value per sample and "
                         f"channel, got {tuple(shape)}")
    if shift.dtype not in DTYPE_CODES:
        raise TypeError(f"shift must be float32, float16 or bfloat16, got {shift.dtype}")
    if shift.device != x.device:
        raise ValueError(f"shift must be on {x.device} like x, got {shift.device}")
    return shift if dims == 2 else shift.reshape(n, c)  # (a view costs microseconds: only when needed)


def _check_eps(eps) -> float:
    try:
        if not_a_number(eps):  # (float() takes "1e-5" and True)
            raise TypeError
        value = as_float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a number, got {eps!r}") from None
    if not (is_finite_number(value, "eps") and value >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if 0 < value <= F32_ROUNDS_TO_ZERO:  # (0 in the float32 kernels: a constant group's 1 / sqrt(0) made NaN)
        raise ValueError(f"eps must be 0 or above {F32_ROUNDS_TO_ZERO:.8g} (the kernels compute in float32, which "
                         f"rounds it to 0), got {eps}")
    return value


def _check_activation(activation) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    return ACTIVATIONS.index(activation)


def _checked(x, num_groups, weight, bias, eps, shift):
    x = _check_x(x)
    num_groups = _check_groups(num_groups, x.shape[1])
    weight = _check_vector("weight", weight, x)
    bias = _check_vector("bias", bias, x)
    if weight is not None and bias is not None and bias.dtype != weight.dtype:
        # the kernel reads both in one dtype: the wider one (fp16 weight, fp32 bias: both fp32)
        common = torch.promote_types(weight.dtype, bias.dtype)
        weight, bias = weight.to(common), bias.to(common)
    return x, num_groups, weight, bias, _check_eps(eps), _check_shift(shift, x)


# --------------------------------------------------------------------------- public entry


def group_norm_act(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *, shift: Optional[torch.Tensor] = None,
                   activation: str = "silu", backend: Optional[str] = None) -> torch.Tensor:
    """``act(F.group_norm(x + shift[..., None, None], num_groups, weight, bias, eps))`` in one pass.

    Args:
        x: ``[N, C, *spatial]`` float32/float16/bfloat16, contiguous or channels-last (other
            layouts are copied to contiguous first). The result has x's shape and dtype, and
            x's layout when that is contiguous or channels-last (else contiguous).
        num_groups: a divisor of C, as for ``torch.nn.GroupNorm``.
        weight, bias: ``[C]`` affine parameters, or None (1 and 0).
        eps: added to the variance.
        shift: ``[N, C]`` (or ``[N, C, 1, 1]``) added to x before normalising (a UNet
            ResBlock's time embedding), never materialised; None for none.
        activation: ``"silu"`` or ``"identity"``.
        backend: force a backend (else ``KDFAST_BACKEND``, else the fastest usable).

    Statistics are taken in float32 or better for every dtype: two passes (the mean, then the
    squared deviations from it), or, for groups a GPU splits across blocks, moments about the
    group's first element. The CPU and CUDA kernels gather partial sums in double, the Triton
    kernel in float32 lanes. An element ~1e19 or more from its group's mean overflows the float32
    sums of squares (CPU, Triton): that group comes out NaN, as from torch's contiguous kernel.
    Differentiable (x, weight, bias, shift): the backward recomputes with torch's ops.
    """
    x, num_groups, weight, bias, eps, shift = _checked(x, num_groups, weight, bias, eps, shift)
    act = _check_activation(activation)
    tensors = (x, shift, weight, bias)
    if reference_required(tensors):
        # torch.func's transforms and forward-mode AD: computed with torch's ops, which carry
        # them, in float32 as the kernels compute (a forced backend is not used, but checked as
        # outside them); on a contiguous x (torch's group_norm has no forward-mode formula for
        # channels-last input), returned in x's dtype and layout
        group_norm_op.select(x.device.type, backend or None)
        out = ref.group_norm_act(x.contiguous(), num_groups, weight, bias, eps, shift, activation,
                                 dtype=torch.float32).to(x.dtype)
        fmt = dense_format(x)
        return out if fmt in (None, torch.contiguous_format) else out.contiguous(memory_format=fmt)
    args = (x, shift, weight, bias, num_groups, eps, act, backend or "")
    if dispatcher_required() or has_subclass(tensors):
        return torch.ops.kdfast.group_norm_act(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _EagerGroupNormAct.apply(*args)
    return _forward(*args)


# --------------------------------------------------------------------------- kernel calls


def _allocate(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)  # keeps a dense x's layout (contiguous or channels-last)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether x's samples are [spatial, channels] (else [channels, spatial]); a tensor dense in
    both (one channel, or one position) is read as contiguous."""
    return not x.is_contiguous() and dense_format(x) in _CHANNELS_LAST_FORMATS


def _forward(x, shift, weight, bias, num_groups, eps, act, backend=None) -> torch.Tensor:
    out = _allocate(x)
    impl = group_norm_op.select(x.device.type, backend or None)  # (for an empty map too: a bad backend is named)
    if out.numel() > 0:
        impl.run(x, shift, weight, bias, num_groups, eps, act, out)
    return out


@group_norm_op.register("reference")
def _reference(x, shift, weight, bias, num_groups, eps, act, out):
    out.copy_(ref.group_norm_act(x, num_groups, weight, bias, eps, shift, ACTIVATIONS[act]))


def _binding_args(x, shift, weight, bias, num_groups, eps, act, out) -> tuple:
    batch, channels = x.shape[:2]
    spatial = x.numel() // (batch * channels)
    affine = weight if weight is not None else bias
    return (batch, channels, spatial, num_groups, int(_channels_last(x)),
            x.data_ptr(), channels * spatial, DTYPE_CODES[x.dtype],
            out.data_ptr(), channels * spatial, DTYPE_CODES[out.dtype],
            0 if shift is None else shift.data_ptr(), 0 if shift is None else shift.stride(0),
            0 if shift is None else shift.stride(1), 0 if shift is None else DTYPE_CODES[shift.dtype],
            0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
            0 if affine is None else DTYPE_CODES[affine.dtype], eps, act)


@group_norm_op.register("cpu")
def _cpu(x, shift, weight, bias, num_groups, eps, act, out):
    module = _ext.cpu()[0]
    threads = torch.get_num_threads()
    args = _binding_args(x, shift, weight, bias, num_groups, eps, act, out)
    workspace = torch.empty(module.group_norm_workspace_floats(args[0], args[1], args[2], args[4], threads),
                            dtype=torch.float32)
    module.group_norm(*args, workspace.data_ptr(), threads)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    """Multiprocessors of a GPU: how the GPU launchers decide to split groups across blocks."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Triton's CPU interpreter and the host emulation of the CUDA kernels (the tests) cut groups as
# on an H100/H200, so that they run both of the GPU's paths.
_HOST_SM_COUNT = 132


def _gpu_sm_count(x: torch.Tensor) -> int:
    """The multiprocessors the GPU launchers plan ``x``'s groups for."""
    if not x.is_cuda:
        return _HOST_SM_COUNT
    return _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())


@group_norm_op.register("cuda")
def _cuda(x, shift, weight, bias, num_groups, eps, act, out):
    batch, channels = x.shape[:2]
    group = channels // num_groups * (x.numel() // max(batch * channels, 1))
    if group >= 2 ** 31:  # (its element index within a group is divided in 32 bits)
        raise ValueError(f"the cuda group norm takes groups of fewer than 2^31 elements, got {group} "
                         f"({channels // num_groups} channels x {x.numel() // max(batch * channels, 1)} positions); "
                         "use the reference backend")
    module = _ext.cuda()[0]
    args = _binding_args(x, shift, weight, bias, num_groups, eps, act, out)
    sm_count = _gpu_sm_count(x)
    # scratch for the moments of groups split across blocks (none when every group has its own)
    doubles = module.group_norm_workspace_doubles(args[0], args[1], args[2], args[3], sm_count)
    workspace = torch.empty(doubles, dtype=torch.float64, device=x.device) if doubles else None
    with on_device(x):
        module.group_norm(*args, sm_count, 0 if workspace is None else workspace.data_ptr(), cuda_stream(x))


def _cpu_extension_reason():
    reason = _ext.cpu()[1]
    return None if reason is None else f"the triton group norm plans its grid with kdfast._C: {reason}"


@group_norm_op.register("triton", needs=_cpu_extension_reason)
def _triton(x, shift, weight, bias, num_groups, eps, act, out):
    batch, channels = x.shape[:2]
    sm_count = _gpu_sm_count(x)
    splits = _ext.cpu()[0].group_norm_gpu_splits(batch, channels, x.numel() // (batch * channels), num_groups,
                                                 sm_count)
    with on_device(x):
        _ext.triton()[0].group_norm.launch(x, shift, weight, bias, num_groups, eps, act, _channels_last(x), out,
                                           splits)


# --------------------------------------------------------------------------- custom op + autograd


@torch.library.custom_op("kdfast::group_norm_act", mutates_args=())
def _group_norm_act_op(x: torch.Tensor, shift: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], num_groups: int, eps: float, activation: int,
                       backend: str) -> torch.Tensor:
    # A direct torch.ops call is checked as the public entry checks its arguments.
    x, num_groups, weight, bias, eps, shift = _checked(x, num_groups, weight, bias, eps, shift)
    if not 0 <= activation < len(ACTIVATIONS):
        raise ValueError(f"activation must be in [0, {len(ACTIVATIONS)}) ({', '.join(ACTIVATIONS)}), got {activation}")
    return _forward(x, shift, weight, bias, num_groups, eps, activation, backend)


@_group_norm_act_op.register_fake
def _(x, shift, weight, bias, num_groups, eps, activation, backend):
    return _allocate(_check_x(x))  # the layout the kernels write: x's, when dense


def _setup_context(ctx, inputs, output):
    x, shift, weight, bias, num_groups, eps, activation, backend = inputs
    ctx.args = (num_groups, eps, activation)
    ctx.save_for_backward(x, shift, weight, bias)


def _backward(ctx, grad_out):
    # Recompute with torch's ops and differentiate that: exact gradients for every input, and
    # a double backward too (create_graph keeps the recomputation's graph).
    num_groups, eps, activation = ctx.args
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    with torch.enable_grad():
        leaves = [None if t is None else (t if need and t.requires_grad else t.detach().requires_grad_(need))
                  for t, need in zip(saved, needs)]
        x, shift, weight, bias = leaves
        # an x that needs no gradient on a contiguous copy: torch 2.13's CPU group norm backward
        # crashes (a segfault) on a channels-last one when the weight needs a gradient
        y = ref.group_norm_act(x if x.requires_grad else x.contiguous(), num_groups, weight, bias, eps, shift,
                               ACTIVATIONS[activation], dtype=None)
    wanted = [t for t, need in zip(leaves, needs) if need]
    grads = iter(torch.autograd.grad(y, wanted, grad_out, create_graph=torch.is_grad_enabled()))
    return (*(next(grads) if need else None for need in needs), None, None, None, None)


_group_norm_act_op.register_autograd(_backward, setup_context=_setup_context)


_EagerGroupNormAct = eager_autograd("group_norm_act", _forward, _setup_context, _backward)
