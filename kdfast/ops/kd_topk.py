"""``kdfast.ops.kd_topk``: fused KD from stored teacher top-k log-probabilities, forward and backward.

One kernel pass per row computes the student's log-sum-exp, its mass outside the teacher's
ids (where the teacher's remainder needs it), the row's loss and, when the student needs it,
the gradient with respect to the student's logits (saved for the backward, so nothing of
size ``[rows, vocab]`` is allocated besides the gradient itself). The math is in
csrc/kd_topk/kd_topk.h; :mod:`kdfast.reference.kd_topk` is the spec. This module is the only
place where these tensors become addresses.
"""
# (No `from __future__ import annotations` here: torch 2.4's custom_op takes the annotations of
# an op's signature as types and refuses them as strings.)

from typing import Optional, Tuple

import torch

from .. import _ext, backends
from .._checks import check_int, is_finite_number, real_number
from ..reference import kd_topk as ref
from ._tensors import (DTYPE_CODES, check_label_ids, cuda_stream, dispatcher_required, eager_autograd, has_subclass,
                       number_tensor, numbers_for_torch, on_device, read_numbers, reference_required,
                       with_number_tensor)
from .kd_divergence import _check_labels, _check_logits, _op_grad_dtype, _scale_rows_in_place, check_float32_numbers

REMAINDERS = ref.REMAINDERS
topk_op = backends.op("kd_topk")
_NUMBERS = ("1 / temperature", "loss_scale")  # the op's numbers, in order (see _tensors.number_tensor)


# --------------------------------------------------------------------------- validation


def _check_tensors(student, ids, logprobs, labels):
    """The tensors as the kernels take them on trust: a 2-D student with adjacent entries,
    int64 ids and float32 log-probabilities ``[rows, k]`` contiguous, int64 labels."""
    student = _check_logits("student_logits", student)
    rows, vocab = student.shape
    for name, t in (("ids", ids), ("logprobs", logprobs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] != rows:
            raise ValueError(f"{name} must have shape ({rows}, k), one row per row of the logits, got {tuple(t.shape)}")
        if t.device != student.device:
            raise ValueError(f"{name} must be on {student.device} like student_logits, got {t.device}")
    if ids.shape != logprobs.shape:
        raise ValueError(f"logprobs must have the shape of ids {tuple(ids.shape)}, got {tuple(logprobs.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be int64 or int32, got {ids.dtype}")
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be floating point, got {logprobs.dtype}")
    k = ids.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"ids must hold between 1 and {vocab} (the vocabulary) entries per row, got {k}")
    return (student, ids.to(torch.int64).contiguous(), logprobs.to(torch.float32).contiguous(),
            _check_labels(labels, rows, student.device))


def _op_args(student_logits, ids, logprobs, labels, remainder, temperature, ignore_index, loss_scale,
             stored_dtype) -> tuple:
    """The checked arguments of the custom op, up to (not including) ``want_grad``."""
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    student, ids, lp, labels = _check_tensors(student_logits, ids, logprobs, labels)
    if stored_dtype is None:
        stored_dtype = logprobs.dtype
    if not isinstance(stored_dtype, torch.dtype) or not stored_dtype.is_floating_point:
        raise TypeError(f"stored_dtype must be a floating-point torch.dtype, got {stored_dtype!r}")
    temperature = real_number("temperature", temperature)
    # (both may stay symbolic under torch.compile: the op takes them as a tensor, see number_tensor)
    if not (is_finite_number(temperature, "temperature", symbolic=True) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    loss_scale = real_number("loss_scale", loss_scale)
    if not is_finite_number(loss_scale, "loss_scale", symbolic=True):
        raise ValueError(f"loss_scale must be finite, got {loss_scale}")
    check_float32_numbers(temperature, loss_scale)
    ignore_index = check_int("ignore_index", ignore_index)
    check_label_ids(labels, student.shape[1], ignore_index)
    return (student, ids, lp, labels, remainder == "renormalize", ignore_index, torch.finfo(stored_dtype).eps,
            (1.0 / temperature, loss_scale))


# --------------------------------------------------------------------------- public entry


def kd_topk(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    *,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    remainder: str = "bucket",
    loss_scale: float = 1.0,
    stored_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-row forward KL, float32 ``[rows]``, of a student's softmax from a teacher known by
    its top-k log-probabilities.

    Args:
        student_logits: ``[rows, vocab]`` float32/float16/bfloat16 logits.
        ids: ``[rows, k]`` the teacher's token ids, distinct within a row and in ``[0, vocab)``
            (not checked here: :func:`kdfast.losses.topk_kd_loss` checks them, on the CPU and
            with device-side asserts elsewhere; the kernels make a row with an id outside the
            vocabulary NaN).
        logprobs: ``[rows, k]`` their log-probabilities at ``temperature`` (each <= 0; larger
            values are clamped to 0; not checked here: :func:`kdfast.losses.topk_kd_loss` checks them).
        labels: optional ``[rows]``; rows equal to ``ignore_index`` give 0 and no gradient.
        temperature: the student's logits are divided by it.
        remainder: ``"bucket"`` or ``"renormalize"`` (see :mod:`kdfast.losses.topk`).
        loss_scale: multiplies every row (e.g. ``temperature**2``).
        stored_dtype: the dtype the log-probabilities were stored in, whose rounding bounds
            the remainder test (default: ``logprobs.dtype``).
        backend: force a backend (else ``KDFAST_BACKEND``, else the fastest usable).

    Differentiable with respect to the student's logits (the gradient is computed in the
    forward kernel) and the log-probabilities (by the reference's autograd).
    """
    args = _op_args(student_logits, ids, logprobs, labels, remainder, temperature, ignore_index, loss_scale,
                    stored_dtype)
    student, lp = args[0], args[2]
    if reference_required((student, lp)):  # torch.func's transforms, forward-mode AD
        topk_op.select(student.device.type, backend or None)  # (the backend asked for is checked as outside)
        return _reference_rows(*args)
    if _needs_dispatcher(student, lp):
        want_grad = torch.is_grad_enabled() and student.requires_grad
        return torch.ops.kdfast.kd_topk(*with_number_tensor(args), want_grad, backend or "")[0]
    if torch.is_grad_enabled() and (student.requires_grad or lp.requires_grad):
        return _EagerKDTopk.apply(*args, student.requires_grad, backend or "")[0]
    return _kd_topk(*args, False, backend=backend)[0]


def kd_topk_with_grad(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    *,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    remainder: str = "bucket",
    loss_scale: float = 1.0,
    stored_dtype: Optional[torch.dtype] = None,
    grad_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row losses ``[rows]`` and their gradient ``d row_loss[r] / d student_logits[r, :]``.

    The arguments are those of :func:`kd_topk`. No autograd graph is recorded: this is for
    losses that apply the chain rule themselves, such as the chunked fused-linear top-k KD,
    which pushes each chunk's gradient through the LM head at once. The gradient has the
    student's shape and ``grad_dtype`` (default: the student's dtype; the kernel computes in
    fp32 and rounds once when it stores).
    """
    if grad_dtype is not None and grad_dtype not in DTYPE_CODES:
        raise TypeError(f"grad_dtype must be float32, float16 or bfloat16, got {grad_dtype}")
    args = _op_args(student_logits, ids, logprobs, labels, remainder, temperature, ignore_index, loss_scale,
                    stored_dtype)
    student, ids, lp, *rest = args
    if reference_required((student, lp)):  # (no graph, as below: detached)
        topk_op.select(student.device.type, backend or None)
        student, lp = student.detach(), lp.detach()
        kw = _reference_args(student, ids, lp, *rest)
        return ref.kd_topk(student, ids, lp, **kw), ref.kd_topk_grad(student, ids, lp, **kw).to(
            grad_dtype or student.dtype)
    student, lp = student.detach(), lp.detach()
    if _needs_dispatcher(student, lp):
        with torch.no_grad():
            row_loss, grad = torch.ops.kdfast.kd_topk(*with_number_tensor((student, ids, lp, *rest)), True,
                                                      backend or "")
        return row_loss, grad.to(grad_dtype or student.dtype)
    return _kd_topk(student, ids, lp, *rest, True, backend=backend, grad_dtype=grad_dtype or student.dtype)


def _reference_args(student, ids, lp, labels, renormalize, ignore_index, stored_eps, numbers) -> dict:
    inv_t, loss_scale = numbers_for_torch(numbers)
    return dict(labels=labels, ignore_index=ignore_index, temperature=1.0 / inv_t,
                remainder="renormalize" if renormalize else "bucket", stored_eps=stored_eps, loss_scale=loss_scale)


def _reference_rows(student, ids, lp, *rest):
    """The rows as the reference computes them, in float32 as the kernels do, from torch's ops,
    which torch.func's transforms and forward-mode AD carry through."""
    return ref.kd_topk(student, ids, lp, **_reference_args(student, ids, lp, *rest))


def _needs_dispatcher(*tensors: torch.Tensor) -> bool:
    return dispatcher_required() or has_subclass(tensors)


def _allocate(student: torch.Tensor, want_grad: bool, grad_dtype: Optional[torch.dtype] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    row_loss = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
    grad = (torch.empty_like(student, dtype=grad_dtype or _op_grad_dtype(student.dtype),
                             memory_format=torch.contiguous_format) if want_grad else student.new_empty(0))
    return row_loss, grad


def _kd_topk(student, ids, lp, labels, renormalize, ignore_index, stored_eps, numbers, want_grad, backend=None,
             grad_dtype=None) -> Tuple[torch.Tensor, torch.Tensor]:
    row_loss, grad = _allocate(student, want_grad, grad_dtype)
    impl = topk_op.select(student.device.type, backend or None)  # (no rows too: a bad backend is named)
    if student.shape[0] > 0:
        inv_t, loss_scale = numbers
        impl.run(student, ids, lp, labels, row_loss, grad if want_grad else None, renormalize, inv_t, ignore_index,
                 loss_scale, stored_eps)
    return row_loss, grad


# --------------------------------------------------------------------------- backends


@topk_op.register("reference")
def _reference(student, ids, lp, labels, row_loss, grad, renormalize, inv_t, ignore_index, loss_scale, stored_eps):
    kw = _reference_args(student, ids, lp, labels, renormalize, ignore_index, stored_eps, (inv_t, loss_scale))
    row_loss.copy_(ref.kd_topk(student.detach(), ids, lp.detach(), **kw))
    if grad is not None:
        # In closed form: inside the custom op autograd records nothing.
        grad.copy_(ref.kd_topk_grad(student.detach(), ids, lp.detach(), **kw))


def _binding_args(student, ids, lp, labels, row_loss, grad, renormalize, inv_t, ignore_index, loss_scale,
                  stored_eps):
    return (student.shape[0], student.shape[1], ids.shape[1], student.data_ptr(), student.stride(0),
            DTYPE_CODES[student.dtype], ids.data_ptr(), lp.data_ptr(), 0 if labels is None else labels.data_ptr(),
            ignore_index, row_loss.data_ptr(), 0 if grad is None else grad.data_ptr(),
            0 if grad is None else grad.stride(0), DTYPE_CODES[student.dtype if grad is None else grad.dtype],
            int(renormalize), inv_t, loss_scale, stored_eps)


@topk_op.register("cpu")
def _cpu(student, *args):
    module = _ext.cpu()[0]
    threads = max(1, min(torch.get_num_threads(), student.shape[0]))
    workspace = torch.empty(module.kd_topk_workspace_floats(student.shape[1], threads), dtype=torch.float32)
    module.kd_topk(*_binding_args(student, *args), workspace.data_ptr(), threads)


@topk_op.register("cuda")
def _cuda(student, *args):
    with on_device(student):
        _ext.cuda()[0].kd_topk(*_binding_args(student, *args), cuda_stream(student))


@topk_op.register("triton")
def _triton(student, *args):
    with on_device(student):
        _ext.triton()[0].kd_topk.launch(student, *args)


# --------------------------------------------------------------------------- custom op


@torch.library.custom_op("kdfast::kd_topk", mutates_args=())
def _kd_topk_op(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, labels: Optional[torch.Tensor],
                renormalize: bool, ignore_index: int, stored_eps: float, numbers: torch.Tensor, want_grad: bool,
                backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    # numbers: float64 CPU [1 / temperature, loss_scale] (see number_tensor).
    # backend: "" for the registry's choice, else the name of the backend to force.
    # Callable directly as torch.ops.kdfast.kd_topk: check what the kernels take on trust.
    student, ids, logprobs, labels = _check_tensors(student, ids, logprobs, labels)
    return _kd_topk(student, ids, logprobs, labels, renormalize, ignore_index, stored_eps,
                    read_numbers(numbers, _NUMBERS, positive=1), want_grad, backend)


@_kd_topk_op.register_fake
def _(student, ids, logprobs, labels, renormalize, ignore_index, stored_eps, numbers, want_grad, backend):
    return _allocate(student, want_grad)


def _setup_context(ctx, inputs, output):
    student, ids, lp, labels, renormalize, ignore_index, stored_eps, numbers, want_grad, backend = inputs
    ctx.args = (renormalize, ignore_index, stored_eps, backend)
    # (the custom op's numbers are a tensor, saved; the eager autograd's, floats)
    ctx.numbers = None if isinstance(numbers, torch.Tensor) else numbers
    ctx.student_dtype = student.dtype
    # As kd_divergence's: the forward's gradient buffer is handed over (eager) or saved (traced);
    # the inputs are kept only to recompute it or for the log-probabilities' gradient.
    ctx.set_materialize_grads(False)
    recompute = ctx.needs_input_grad[0] and not want_grad
    keep_inputs = recompute or ctx.needs_input_grad[2]
    ctx.recompute = recompute
    ctx.handover = want_grad and not _needs_dispatcher(output[1])
    ctx.student_grad_rows = output[1].detach() if ctx.handover else None
    ctx.save_for_backward(output[1] if want_grad and not ctx.handover else None, student if keep_inputs else None,
                          ids, lp if keep_inputs else None, labels, numbers if ctx.numbers is None else None)


def _backward(ctx, grad_rows, _grad_of_grad):
    saved_grad_rows, student, ids, lp, labels, numbers = ctx.saved_tensors
    renormalize, ignore_index, stored_eps, backend = ctx.args
    numbers = numbers if ctx.numbers is None else ctx.numbers
    grad_student = grad_lp = None
    if grad_rows is None:  # the row losses were not used
        return (None,) * 10
    if torch.is_grad_enabled() and not _needs_dispatcher(grad_rows):
        raise RuntimeError("kdfast.kd_topk: double backward (create_graph=True) is not supported; the first "
                           "gradients (the student's from the forward kernel, the log-probabilities' from a closed "
                           "backward) are not differentiable")
    if ctx.needs_input_grad[0]:
        scale = grad_rows.unsqueeze(1)
        if ctx.recompute:
            grad_student = torch.ops.kdfast.kd_topk(student.detach(), ids, lp.detach(), labels, renormalize,
                                                    ignore_index, stored_eps, number_tensor(numbers), True,
                                                    backend)[1] * scale
        elif ctx.handover:
            student_grad_rows, ctx.student_grad_rows = ctx.student_grad_rows, None
            if student_grad_rows is None:
                raise RuntimeError("kdfast.kd_topk: a second backward through the same graph (retain_graph=True) "
                                   "is not supported; the forward's gradient buffer was consumed by the first")
            grad_student = _scale_rows_in_place(student_grad_rows, scale)  # the buffer is ours alone
        else:
            grad_student = saved_grad_rows * scale
        grad_student = grad_student.to(ctx.student_dtype)  # float16's was kept in float32 until scaled
    if ctx.needs_input_grad[2]:
        with torch.enable_grad():
            leaf = lp.detach().requires_grad_(True)
            rows = ref.kd_topk(student.detach(), ids, leaf,
                               **_reference_args(student, ids, lp, labels, renormalize, ignore_index, stored_eps,
                                                 numbers))
            if rows.requires_grad:
                grad_lp = torch.autograd.grad(rows, leaf, grad_rows.float())[0]
            else:  # every row ignored: the reference's rows are constant zeros
                grad_lp = torch.zeros_like(lp)
    return grad_student, None, grad_lp, None, None, None, None, None, None, None


_kd_topk_op.register_autograd(_backward, setup_context=_setup_context)


def _eager_forward(*inputs):
    return _kd_topk(*inputs[:9], backend=inputs[9])


_EagerKDTopk = eager_autograd("kd_topk", _eager_forward, _setup_context, _backward)
