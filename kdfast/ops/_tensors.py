"""Tensor -> (address, batch stride, dtype code) conversion shared by every op binding."""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad

_CURRENT = contextlib.nullcontext()
_F32_MAX = torch.finfo(torch.float32).max
# The largest number float32 rounds to 0 (half its smallest positive one, 2**-149; ties go to the even 0):
# a positive host number up to it is 0 in the kernels
F32_ROUNDS_TO_ZERO = 2.0 ** -150
# The innermost torch.func transform (vmap, grad, jvp) being run, None outside them.
_functorch_transform = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)


# Tensors whose memory kdfast's kernels may read by address: plain tensors and parameters (a
# Parameter overrides no dispatch). Any other subclass (fake, functional, DTensor, ...) goes
# through the custom op.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def has_subclass(tensors) -> bool:
    """Whether any of ``tensors`` (None entries skipped) is a tensor subclass other than Parameter."""
    return any(t is not None and type(t) not in _PLAIN_TYPES for t in tensors)


def dispatcher_required() -> bool:
    """Compiling, under a dispatch mode, or inside a torch.func transform: kdfast's ops must be
    called through torch's dispatcher (their custom ops), not by address, because fake,
    functional and batched tensors have no memory of their own. Compiling is asked first:
    dynamo cannot trace the other two queries."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or _functorch_transform() is not None)


def reference_required(tensors) -> bool:
    """Whether a kdfast op must compute with torch's own ops (its reference, in the kernels'
    precision) rather than as a custom op: inside a ``torch.func`` transform (vmap has no
    batching rule for a custom op, grad / vjp / jacrev fail on autograd.Function internals,
    jvp would carry no tangent), or under forward-mode AD (``torch.autograd.forward_ad``) with
    a tangent on one of ``tensors`` (None entries skipped): torch runs a custom op's reverse-mode
    formula only, so the tangent would come out as zero, silently. Not while compiling (dynamo
    traces transforms itself). Outside them (nearly every call) this is a few reads."""
    if torch.compiler.is_compiling():
        return False
    if _functorch_transform() is not None:
        # functionalize alone runs custom ops as they are, but beneath its wrappers a
        # forward-mode tangent cannot be seen: with a dual level open, the reference
        return _differentiating_or_batching() or _forward_ad._current_level >= 0
    if _forward_ad._current_level < 0:
        return False
    return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


_FUNCTIONALIZE = torch._C._functorch.TransformType.Functionalize


def _differentiating_or_batching() -> bool:
    """Whether the torch.func transforms being run include one other than ``functionalize``
    (which runs custom ops as they are): vmap, grad or jvp."""
    top = _functorch_transform()
    if top.key() != _FUNCTIONALIZE:
        return True
    return any(level.key() != _FUNCTIONALIZE for level in torch._C._functorch.get_interpreter_stack())


# The numbers a training run may change between calls of a KD op (1 / temperature, loss scale)
# travel as a tuple of floats in eager code and, through the dispatcher, as a float64 CPU tensor
# (the op's last argument before want_grad): a custom op's float argument is a constant under
# torch.compile (one graph per value, up to torch's recompile limit), a tensor lets a symbolic
# value through (one graph for every value). The op reads it on the host: no device sync.


def number_tensor(numbers) -> torch.Tensor:
    """The numbers (a tuple of floats, or already their tensor) as the custom op takes them."""
    if isinstance(numbers, torch.Tensor):
        return numbers
    if torch.compiler.is_compiling():
        one = torch.ones((), dtype=torch.float64, device="cpu")  # (torch.tensor(value) would specialise it)
        return torch.stack([one * value for value in numbers])
    return torch.tensor(numbers, dtype=torch.float64, device="cpu")  # (whatever the default device)


def with_number_tensor(args: tuple) -> tuple:
    """An op's checked arguments (numbers last) for its dispatcher call."""
    return (*args[:-1], number_tensor(args[-1]))


def read_numbers(numbers: torch.Tensor, names: Tuple[str, ...], positive: int = 0) -> tuple:
    """The finite floats of the op's numbers tensor, checked for a caller of the custom op itself
    (``torch.ops.kdfast.*``), who passes the tensor by hand; the first ``positive`` of them must
    be > 0 (1 / temperature)."""
    if not (isinstance(numbers, torch.Tensor) and numbers.dtype == torch.float64 and numbers.device.type == "cpu"
            and tuple(numbers.shape) == (len(names),)):
        got = (f"{tuple(numbers.shape)} {numbers.dtype} on {numbers.device}" if isinstance(numbers, torch.Tensor)
               else type(numbers).__name__)
        raise ValueError(f"numbers must be a float64 CPU tensor of shape ({len(names)},) holding "
                         f"({', '.join(names)}), got {got}")
    values = tuple(numbers.tolist())
    for name, value in zip(names, values):
        # (checked here, as the op runs: under torch.compile the entry's check cannot see a value)
        if not (math.isfinite(value) and abs(value) <= _F32_MAX):
            raise ValueError(f"{name} (in numbers) must be within float32's range (the kernels compute in float32), "
                             f"got {value}")
    for name, value in zip(names[:positive], values):
        if not value > 0:
            raise ValueError(f"{name} (in numbers) must be > 0, got {value}")
    return values


def numbers_for_torch(numbers) -> tuple:
    """The numbers for torch's ops (the references, in a backward): the floats, or the tensor's
    entries, read on the host, or as 0-d tensors while traced (under torch.compile)."""
    if not isinstance(numbers, torch.Tensor):
        return numbers
    return numbers.unbind() if dispatcher_required() or has_subclass((numbers,)) else tuple(numbers.tolist())


def check_label_ids(labels: Optional[torch.Tensor], vocab: int, ignore_index: Optional[int], name: str = "labels",
                    hint: str = "") -> None:
    """Refuse integer ``labels`` outside ``[0, vocab)`` other than ``ignore_index`` (padding with -1
    where ignore_index is -100 would count the padding as tokens): on the CPU with a ValueError
    naming the first, else without a host read (``torch._assert_async``: on a device, inside
    torch.compile's graph or torch.export, under a dispatch mode such as FakeTensorMode); under
    ``torch.func.vmap`` and on meta tensors no value is read. ``name`` and ``hint`` word the error."""
    if labels is None or labels.device.type == "meta" or vmapped(labels) or labels.numel() == 0:
        return
    allowed = f"{name} must be in [0, {vocab})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
    kept = labels if ignore_index is None else torch.where(labels == ignore_index, 0, labels)
    if (labels.device.type == "cpu" and not torch.compiler.is_compiling() and not dispatcher_required()
            and not has_subclass([labels])):
        # the range of the ids, ignore_index read as 0: two small ops and one read (this runs on
        # every call with labels)
        lo, hi = (int(v) for v in torch.aminmax(kept))
        if lo < 0 or hi >= vocab:
            first = int(labels[(kept < 0) | (kept >= vocab)][0])
            raise ValueError(f"{allowed}{hint}; found {first}")
    else:
        torch._assert_async(~((kept < 0) | (kept >= vocab)).any(), f"{allowed}{hint}")


def vmapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by a ``torch.func.vmap`` at some level of torch.func's wrappers
    (its values cannot be read on the host there)."""
    return host_readable(t) is None


def host_readable(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` beneath torch.func's grad and jvp wrappers, which have no storage of their own
    (inside a transform, even a slice of a constant is wrapped), so that a constant such as a
    timestep can be read on the host; None where a ``torch.func.vmap`` batches it (its values
    differ per batch entry). ``t`` itself outside transforms, and while compiling (dynamo cannot
    trace functorch's queries; it traces transforms itself)."""
    if torch.compiler.is_compiling():
        return t
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return None
        t = functorch.get_unwrapped(t)
    return t


def transform_tracks(value) -> Optional[str]:
    """For a tensor beneath torch.func's wrappers: ``"batched"`` where a vmap batches it,
    ``"differentiated"`` where a grad or jvp tracks it (a gradient or a tangent), else ``""``;
    None for anything else (a plain tensor, a number)."""
    if not isinstance(value, torch.Tensor) or torch.compiler.is_compiling():
        return None
    functorch = torch._C._functorch
    if not functorch.is_functorch_wrapped_tensor(value):
        return None
    t = value
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return "batched"
        if t.requires_grad or _has_tangent(t):
            return "differentiated"
        t = functorch.get_unwrapped(t)
    return ""


def _has_tangent(t: torch.Tensor) -> bool:
    """Whether the jvp whose wrapper ``t`` is carries a tangent on it: read with the transforms
    above that jvp's level set aside (beneath a grad transform, the tangent cannot be seen)."""
    functorch = torch._C._functorch
    level = functorch.maybe_get_level(t)
    above = []
    try:
        while (functorch.peek_interpreter_stack() is not None
               and functorch.peek_interpreter_stack().level() > level):
            above.append(functorch.pop_dynamic_layer_stack())
        return _forward_ad.unpack_dual(t).tangent is not None
    finally:
        while above:
            functorch.push_dynamic_layer_stack(above.pop())


def outside_transforms():
    """A context in which torch.func's transforms are suspended, when one is running (else a
    no-op): tensors made or computed there are plain, with storage (inside a transform every
    op's result is wrapped again), for host constants such as a scheduler's tables."""
    if torch.compiler.is_compiling() or _functorch_transform() is None:
        return _CURRENT
    return torch._C._DisableFuncTorch()


def on_device(t: torch.Tensor):
    """A context making ``t``'s CUDA device the current one for a launch: kernels (CUDA and
    Triton) run on the current device and stream, and a tensor on cuda:1 while cuda:0 is
    current would otherwise be read from the wrong GPU. Free when it already is current."""
    index = t.device.index
    if index is None or index == torch.cuda.current_device():
        return _CURRENT
    return torch.cuda.device(index)


def cuda_stream(t: torch.Tensor) -> int:
    """The handle of the current CUDA stream of ``t``'s device, on which the CUDA launchers
    run; 0 (the default stream) for a CPU tensor, which reaches a CUDA launcher only in the
    tests' host emulation of the CUDA kernels (tests/cuda_emulator)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


# Same table as kdfast::DType in csrc/common/kd_common.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def dense_format(t: torch.Tensor) -> Optional[torch.memory_format]:
    """The memory format ``t`` is dense in: ``torch.contiguous_format``, ``channels_last`` (4-d)
    or ``channels_last_3d`` (5-d); None for any other layout. A few C++ property reads: the
    common layouts are told apart without Python stride arithmetic."""
    if t.is_contiguous():
        return torch.contiguous_format
    fmt = _CHANNELS_LAST.get(t.dim())
    if fmt is None:
        return None
    try:
        return fmt if t.is_contiguous(memory_format=fmt) else None
    except RuntimeError:  # torch.func.vmap cannot tell (its tensors then go by their strides)
        return None


def _dense_samples(t: torch.Tensor) -> bool:
    """Whether each sample of ``t`` (index of dim 0) is one dense block of memory, its dims in
    any order (e.g. a batch-strided view of a channels_last tensor)."""
    if torch.compiler.is_compiling():
        return False  # sorting symbolic strides breaks the graph: under compile such a tensor is copied
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride()[1:], t.shape[1:]) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_inner_strides(t: torch.Tensor, like: torch.Tensor) -> bool:
    # a dim of size 1 is never stepped over, so its stride does not matter
    return all(a == b or n == 1 for a, b, n in zip(t.stride()[1:], like.stride()[1:], like.shape[1:]))


def sample_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when each sample (index of dim 0) is one dense block, else a contiguous copy.

    The per-sample kernels read each sample as a flat block at a batch stride: element-wise
    math and per-sample reductions do not depend on the order of the elements inside a block,
    so every tensor of one call only has to share the sample's order (see :func:`in_layout`).
    Channels_last latents and views like ``out[:B]`` / ``out[B:]`` of a doubled CFG batch stay
    copy-free.
    """
    if dense_format(t) is not None:
        return t
    if t.dim() >= 1 and t.shape[0] > 0 and _dense_samples(t):
        return t
    return t.contiguous()


def op_layout(t: torch.Tensor) -> torch.Tensor:
    """:func:`sample_layout` for the registered ops (``torch.ops.kdfast.*``: autograd, torch.compile,
    dispatch modes) and their fake kernels: ``t`` itself only when it is dense (contiguous or
    channels-last), else a packed copy, channels-last when its samples are.

    Under torch.compile the fake kernel runs while tracing, where :func:`sample_layout` cannot
    sort symbolic strides and copies what is not dense, and the op itself later, untraced:
    decided by contiguity checks alone, which trace, the two agree on the outputs' strides
    (inductor trusts the fake kernel's: a mismatch fails its size asserts, or without them reads
    an output in the wrong order). The public functions' eager calls keep every per-sample dense
    layout (batch-strided views, other orders)."""
    if dense_format(t) is not None:
        return t
    fmt = _CHANNELS_LAST.get(t.dim())
    if fmt is not None and t.shape[0] > 0 and not t[:1].is_contiguous() and t[:1].is_contiguous(memory_format=fmt):
        return t.contiguous(memory_format=fmt)  # (a batch-strided view of a channels-last batch)
    return t.contiguous()


def in_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (of ``like``'s shape) itself when its samples are laid out as those of ``like`` (a
    :func:`sample_layout` tensor) are, else a copy in that layout."""
    fmt = dense_format(like)
    if fmt is not None and t.is_contiguous(memory_format=fmt):
        return t
    if t.dim() >= 1 and t.shape[0] > 0 and _same_inner_strides(t, like):
        return t
    return empty_in_layout(like, t.dtype).copy_(t)


def empty_in_layout(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A new tensor of ``like``'s shape whose samples are laid out as :func:`sample_layout`
    lays out those of ``like``, one after another (batch stride = elements per sample)."""
    dtype = like.dtype if dtype is None else dtype
    if dense_format(like) is not None:
        # empty_like keeps a dense tensor's strides; its plainest form parses its arguments
        # ~2x faster than empty(shape, dtype=, device=)
        return torch.empty_like(like) if dtype == like.dtype else torch.empty_like(like, dtype=dtype)
    if like.dim() >= 1 and like.numel() > 0 and _dense_samples(like):
        inner = like.numel() // like.shape[0]
        return torch.empty_strided(like.shape, (inner, *like.stride()[1:]), dtype=dtype, device=like.device)
    return torch.empty_like(like, dtype=dtype, memory_format=torch.contiguous_format)


def describe(name: Optional[str], t: torch.Tensor) -> str:
    return f"{name}: {tuple(t.shape)} {t.dtype} on {t.device}"


def addresses(tensors, inner: int, packed: bool = False) -> Tuple[list, list, list]:
    """(addresses, batch strides, dtype codes) of tensors of ``inner`` elements per sample, laid
    out alike (:func:`in_layout`; validated to share one shape); None gives zeros. ``packed=True``
    when the caller knows each batch stride is ``inner`` (outputs it allocated with
    :func:`empty_in_layout`): saves a property call per tensor."""
    ptrs, strides, codes = [], [], []
    for t in tensors:
        if t is None:
            ptrs.append(0)
            strides.append(0)
            codes.append(0)
        else:
            ptrs.append(t.data_ptr())
            strides.append(inner if packed or t.is_contiguous() else t.stride(0))
            codes.append(DTYPE_CODES[t.dtype])
    return ptrs, strides, codes


def eager_autograd(op_name: str, forward, setup_context, backward) -> type:
    """A ``torch.autograd.Function`` computing ``forward(*inputs)`` with a custom op's
    ``setup_context`` and ``backward``: the op's autograd for plain eager tensors, without the
    custom op's per-call dispatch cost (it can exceed a small kernel's time)."""

    def apply_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def apply_backward(ctx, *grads):
        return backward(ctx, *grads)

    return type(f"Eager_{op_name}", (torch.autograd.Function,),
                {"__doc__": f"kdfast::{op_name}'s autograd for plain eager tensors (same forward and backward).",
                 "forward": staticmethod(apply_forward), "backward": staticmethod(apply_backward)})
