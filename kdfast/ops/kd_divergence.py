"""``kdfast.ops.kd_divergence``: fused per-row KD divergences of logits, forward and backward.

One kernel pass per row computes the log-sum-exp of the student's and the teacher's logits,
the row's divergence and, when the student needs it, the gradient of that divergence with
respect to the student's logits (saved for the backward, so nothing of size
``[rows, vocab]`` is allocated besides the gradient itself). The math is in
csrc/kd_divergence/kd_divergence.h; :mod:`kdfast.reference.kd_divergence` is the spec.
This module is the only place where these tensors become addresses.
"""
# (No `from __future__ import annotations` here: torch 2.4's custom_op takes the annotations of
# an op's signature as types and refuses them as strings.)

from typing import Optional, Tuple

import torch

from .. import _ext, backends
from .._checks import check_int, is_finite_number, real_number
from ..reference import kd_divergence as ref
from ._tensors import (_F32_MAX, DTYPE_CODES, check_label_ids, cuda_stream, dispatcher_required, has_subclass,
                       number_tensor, numbers_for_torch, on_device, read_numbers, reference_required,
                       with_number_tensor)

KINDS = ref.KINDS  # same order as kdfast::kd_divergence::Kind
divergence_op = backends.op("kd_divergence")
_NUMBERS = ("1 / temperature", "loss_scale")  # the op's numbers, in order (see _tensors.number_tensor)


# --------------------------------------------------------------------------- validation


def _check_logits(name: str, t: torch.Tensor, float64: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, vocab], got shape {tuple(t.shape)}")
    if t.shape[1] < 1:
        raise ValueError(f"{name} must have a vocabulary of at least one entry, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPE_CODES and not (float64 and t.dtype == torch.float64):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    # Rows may be strided (a slice of a wider buffer); entries within a row must be adjacent.
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _check_labels(labels: Optional[torch.Tensor], rows: int, device: torch.device) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of integer token ids, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must hold integers, got {labels.dtype}")
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), one per row of the logits, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on {device} like the logits, got {labels.device}")
    return labels.to(torch.int64).contiguous()


def _check_tensors(student, teacher, labels, vocab_size, vocab_name: str = "vocab_size", float64: bool = False):
    """The tensors and the shared vocabulary, as the kernels take them on trust (the public
    entry and the custom op, whose argument is ``vocab``, both check them). ``float64``: the
    logits may also be float64 (the losses' pure-torch path; the kernels stop at float32)."""
    student = _check_logits("student_logits", student, float64)
    teacher = _check_logits("teacher_logits", teacher, float64)
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"student_logits and teacher_logits must have the same number of rows, got "
                         f"{student.shape[0]} and {teacher.shape[0]}")
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits must be on {student.device} like student_logits, got {teacher.device}")
    if vocab_size is None:
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(
                f"student_logits and teacher_logits have different vocabularies ({student.shape[1]} and "
                f"{teacher.shape[1]} columns); pass vocab_size=<shared vocabulary> if the extra columns are padding")
        vocab_size = student.shape[1]
    vocab_size = check_int(vocab_name, vocab_size)
    if not 1 <= vocab_size <= min(student.shape[1], teacher.shape[1]):
        raise ValueError(f"{vocab_name} must be in [1, {min(student.shape[1], teacher.shape[1])}] (the narrower "
                         f"logits' width), got {vocab_size}")
    return student, teacher, _check_labels(labels, student.shape[0], student.device), vocab_size


def check_float32_numbers(temperature: float, loss_scale: float) -> None:
    """The kernels compute in float32: ``1 / temperature`` and ``loss_scale`` must be float32
    numbers (past them every row would be NaN or inf, where the loss itself is finite)."""
    if torch.compiler.is_compiling():
        return  # (a symbolic number: a comparison would guard on its value)
    if 1.0 / temperature > _F32_MAX:
        raise ValueError(f"temperature must be at least {1.0 / _F32_MAX:.8g} (the kernels compute 1 / temperature "
                         f"in float32), got {temperature}")
    if abs(loss_scale) > _F32_MAX:
        raise ValueError(f"loss_scale must be within float32's range (|loss_scale| <= {_F32_MAX:.8g}), "
                         f"got {loss_scale}")


def check_arguments(student, teacher, labels, kind, beta, temperature, vocab_size, loss_scale, float64=False):
    """Validate and normalise the arguments of :func:`kd_divergence` (shared with the losses).
    Under torch.compile the temperature and loss scale may stay symbolic (the op takes them as a
    tensor, see :func:`number_tensor`); ``beta``, a float of the op, is made a constant, except
    with ``float64`` (for the float64 reference, torch's ops alone)."""
    student, teacher, labels, vocab_size = _check_tensors(student, teacher, labels, vocab_size, float64=float64)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    beta = real_number("beta", beta)
    if not (is_finite_number(beta, "beta", float64) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    temperature = real_number("temperature", temperature)
    if not (is_finite_number(temperature, "temperature", symbolic=True) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    loss_scale = real_number("loss_scale", loss_scale)
    if not is_finite_number(loss_scale, "loss_scale", symbolic=True):
        raise ValueError(f"loss_scale must be finite, got {loss_scale}")
    if not float64:
        check_float32_numbers(temperature, loss_scale)
    return student, teacher, labels, beta, temperature, vocab_size, loss_scale


# --------------------------------------------------------------------------- public entry


def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
    loss_scale: float = 1.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-row divergence between the softmaxes of two 2-D logit tensors, float32 ``[rows]``.

    Args:
        student_logits, teacher_logits: ``[rows, vocab]`` float32/float16/bfloat16 logits.
        kind: ``"forward_kl"`` (KL(teacher || student)), ``"reverse_kl"``, ``"jsd"``
            (``beta KL(P||M) + (1-beta) KL(Q||M)``, ``M = beta P + (1-beta) Q``, P the
            teacher), ``"tvd"`` or ``"skew_kl"`` (``KL(P || beta P + (1-beta) Q)``).
        beta: the JSD / skew-KL mixing weight of the teacher, in [0, 1].
        temperature: both logits are divided by it before the softmax.
        labels: optional ``[rows]`` token ids; rows equal to ``ignore_index`` give 0 and no
            gradient.
        vocab_size: the shared vocabulary when the widths differ: later columns are padding
            with probability 0 (and gradient 0).
        loss_scale: multiplies every row (e.g. ``temperature**2``).
        backend: force a backend (else ``KDFAST_BACKEND``, else the fastest usable).

    Differentiable with respect to both logits. The student's gradient is computed in the
    forward kernel; the teacher's, rarely needed, by the reference's autograd.
    """
    args = _op_args(student_logits, teacher_logits, labels, kind, beta, temperature, ignore_index, vocab_size,
                    loss_scale)
    student, teacher = args[0], args[1]
    if reference_required((student, teacher)):  # torch.func's transforms, forward-mode AD
        divergence_op.select(student.device.type, backend or None)  # (the backend asked for is checked as outside)
        return _reference_rows(*args)
    if _needs_dispatcher(student, teacher):
        want_grad = torch.is_grad_enabled() and student.requires_grad
        return torch.ops.kdfast.kd_divergence(*with_number_tensor(args), want_grad, backend or "")[0]
    if torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad):
        # Eager autograd: the custom op's forward and backward without the ~0.3 ms per call
        # that a Python custom op's dispatch costs (more than the kernel at classifier sizes).
        return _EagerKDDivergence.apply(*args, student.requires_grad, backend or "")[0]
    return _kd_divergence(*args, False, backend=backend)[0]


def kd_divergence_with_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
    loss_scale: float = 1.0,
    grad_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row losses ``[rows]`` and their gradient ``d row_loss[r] / d student_logits[r, :]``.

    The arguments are those of :func:`kd_divergence`. No autograd graph is recorded: this is
    for losses that apply the chain rule themselves, such as the chunked fused-linear KD,
    which pushes each chunk's gradient through the LM head at once. The gradient has the
    student's shape and ``grad_dtype`` (default: the student's dtype; the kernel computes in
    fp32 and rounds once when it stores, so fp32 logits can give a bf16 gradient without a
    separate cast); padding columns beyond ``vocab_size`` are 0.
    """
    if grad_dtype is not None and grad_dtype not in DTYPE_CODES:
        raise TypeError(f"grad_dtype must be float32, float16 or bfloat16, got {grad_dtype}")
    student, teacher, *rest = _op_args(student_logits, teacher_logits, labels, kind, beta, temperature,
                                       ignore_index, vocab_size, loss_scale)
    if reference_required((student, teacher)):  # (no graph, as below: detached)
        divergence_op.select(student.device.type, backend or None)
        student, teacher = student.detach(), teacher.detach()
        labels, kind, beta, ignore_index, vocab, (inv_temperature, loss_scale) = rest
        grad = ref.kd_divergence_grad(student, teacher, KINDS[kind], beta, 1.0 / inv_temperature, labels, ignore_index,
                                      vocab, loss_scale)
        return _reference_rows(student, teacher, *rest), grad.to(grad_dtype or student.dtype)
    args = (student.detach(), teacher.detach(), *rest, True)
    if _needs_dispatcher(student, teacher):
        with torch.no_grad():
            row_loss, grad = torch.ops.kdfast.kd_divergence(*with_number_tensor(args[:-1]), True, backend or "")
        return row_loss, grad.to(grad_dtype or student.dtype)
    return _kd_divergence(*args, backend=backend, grad_dtype=grad_dtype)


def _op_args(student_logits, teacher_logits, labels, kind, beta, temperature, ignore_index, vocab_size,
             loss_scale) -> tuple:
    """The checked arguments of the custom op, up to (not including) ``want_grad``."""
    student, teacher, labels, beta, temperature, vocab, loss_scale = check_arguments(
        student_logits, teacher_logits, labels, kind, beta, temperature, vocab_size, loss_scale)
    ignore_index = check_int("ignore_index", ignore_index)
    # (the labels only mask here: a student's own tokens past the shared vocabulary are tokens too)
    check_label_ids(labels, student.shape[1], ignore_index)
    return student, teacher, labels, KINDS.index(kind), beta, ignore_index, vocab, (1.0 / temperature, loss_scale)


def _reference_rows(student, teacher, labels, kind, beta, ignore_index, vocab, numbers):
    """The rows as the reference computes them, in float32 as the kernels do, from torch's ops,
    which torch.func's transforms and forward-mode AD carry through (vmap, per-sample gradients,
    tangents; the teacher's gradient too)."""
    inv_temperature, loss_scale = numbers
    return ref.kd_divergence(student, teacher, KINDS[kind], beta, 1.0 / inv_temperature, labels, ignore_index, vocab,
                             loss_scale)


def _needs_dispatcher(*tensors: torch.Tensor) -> bool:
    return dispatcher_required() or has_subclass(tensors)


def _kd_divergence(student, teacher, labels, kind, beta, ignore_index, vocab, numbers, want_grad, backend=None,
                   grad_dtype=None) -> Tuple[torch.Tensor, torch.Tensor]:
    row_loss, grad = _allocate(student, want_grad, grad_dtype)
    impl = divergence_op.select(student.device.type, backend or None)  # (no rows too: a bad backend is named)
    if student.shape[0] > 0:
        inv_temperature, loss_scale = numbers
        impl.run(student, teacher, labels, row_loss, grad if want_grad else None, kind, beta, inv_temperature,
                 ignore_index, vocab, loss_scale)
    return row_loss, grad


def _op_grad_dtype(student_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the custom op's gradient output. float16's is float32: the gradient is
    scaled by the backward's incoming gradient (a GradScaler's 2^16, 1/tokens) only after it
    is stored, and entries below float16's range (~6e-8) would be stored as 0 before that."""
    return torch.float32 if student_dtype == torch.float16 else student_dtype


def _allocate(student: torch.Tensor, want_grad: bool, grad_dtype: Optional[torch.dtype] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    row_loss = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
    grad = (torch.empty_like(student, dtype=grad_dtype, memory_format=torch.contiguous_format) if want_grad
            else student.new_empty(0))
    return row_loss, grad


# --------------------------------------------------------------------------- backends


@divergence_op.register("reference")
def _reference(student, teacher, labels, row_loss, grad, kind, beta, inv_t, ignore_index, vocab, loss_scale):
    args = (KINDS[kind], beta, 1.0 / inv_t, labels, ignore_index, vocab, loss_scale)
    row_loss.copy_(ref.kd_divergence(student.detach(), teacher.detach(), *args))
    if grad is not None:
        # In closed form: inside the custom op autograd records nothing, and torch.func fails
        # under the dispatch modes torch.compile runs custom ops in.
        grad.copy_(ref.kd_divergence_grad(student.detach(), teacher.detach(), *args))


def _binding_args(student, teacher, labels, row_loss, grad, kind, beta, inv_t, ignore_index, vocab, loss_scale):
    return (student.shape[0], vocab, student.data_ptr(), student.stride(0), DTYPE_CODES[student.dtype],
            teacher.data_ptr(), teacher.stride(0), DTYPE_CODES[teacher.dtype],
            0 if labels is None else labels.data_ptr(), ignore_index, row_loss.data_ptr(),
            0 if grad is None else grad.data_ptr(), 0 if grad is None else grad.stride(0),
            0 if grad is None else grad.shape[1], DTYPE_CODES[student.dtype if grad is None else grad.dtype], kind,
            beta, inv_t, loss_scale)


@divergence_op.register("cpu")
def _cpu(student, teacher, labels, row_loss, grad, kind, beta, inv_t, ignore_index, vocab, loss_scale):
    module = _ext.cpu()[0]
    threads = max(1, min(torch.get_num_threads(), student.shape[0]))
    workspace = torch.empty(module.kd_divergence_workspace_floats(vocab, threads), dtype=torch.float32)
    module.kd_divergence(*_binding_args(student, teacher, labels, row_loss, grad, kind, beta, inv_t, ignore_index,
                                        vocab, loss_scale), workspace.data_ptr(), threads)


@divergence_op.register("cuda")
def _cuda(student, *args):
    with on_device(student):
        _ext.cuda()[0].kd_divergence(*_binding_args(student, *args), 0, cuda_stream(student))


@divergence_op.register("triton")
def _triton(student, teacher, labels, row_loss, grad, kind, beta, inv_t, ignore_index, vocab, loss_scale):
    with on_device(student):
        _ext.triton()[0].kd_divergence.launch(student, teacher, labels, row_loss, grad, kind, beta, inv_t,
                                              ignore_index, vocab, loss_scale)


# --------------------------------------------------------------------------- custom op


@torch.library.custom_op("kdfast::kd_divergence", mutates_args=())
def _kd_divergence_op(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor], kind: int,
                      beta: float, ignore_index: int, vocab: int, numbers: torch.Tensor, want_grad: bool,
                      backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    # numbers: float64 CPU [1 / temperature, loss_scale] (see number_tensor).
    # backend: "" for the registry's choice, else the name of the backend to force.
    # Callable directly as torch.ops.kdfast.kd_divergence: check what the kernels take on trust
    # (kd_divergence checks it on its own path) and bring rows to unit column stride.
    student, teacher, labels, vocab = _check_tensors(student, teacher, labels, vocab, "vocab")
    if not 0 <= kind < len(KINDS):
        raise ValueError(f"kind must be in [0, {len(KINDS)}) ({', '.join(KINDS)}), got {kind}")
    if not 0.0 <= beta <= 1.0:  # (NaN fails too)
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    values = read_numbers(numbers, _NUMBERS, positive=1)
    return _kd_divergence(student, teacher, labels, kind, beta, ignore_index, vocab, values, want_grad, backend,
                          _op_grad_dtype(student.dtype))


@_kd_divergence_op.register_fake
def _(student, teacher, labels, kind, beta, ignore_index, vocab, numbers, want_grad, backend):
    return _allocate(student, want_grad, _op_grad_dtype(student.dtype))


def _setup_context(ctx, inputs, output):
    student, teacher, labels, kind, beta, ignore_index, vocab, numbers, want_grad, backend = inputs
    ctx.args = (kind, beta, ignore_index, vocab, backend)
    # (the custom op's numbers are a tensor, saved; the eager autograd's, floats)
    ctx.numbers = None if isinstance(numbers, torch.Tensor) else numbers
    ctx.student_dtype = student.dtype
    # The forward kernel computed the student's gradient when asked (want_grad); otherwise the
    # backward recomputes it, and the teacher's (rare: teachers are frozen) comes from the
    # reference. Only those cases keep the inputs alive.
    # The gradient output never receives a gradient: do not let autograd fill one with a
    # logits-sized tensor of zeros.
    ctx.set_materialize_grads(False)
    recompute = ctx.needs_input_grad[0] and not want_grad
    keep_inputs = recompute or ctx.needs_input_grad[1]
    ctx.recompute = recompute
    # Eager: the gradient buffer is handed to the backward as a plain attribute, which the
    # backward clears, so that autograd can move it into .grad instead of copying a
    # logits-sized buffer. Traced (compile, opcheck): saved the functional way.
    ctx.handover = want_grad and not _needs_dispatcher(output[1])
    # (detached: the output itself points back at this node, which would make a cycle)
    ctx.student_grad_rows = output[1].detach() if ctx.handover else None
    ctx.save_for_backward(output[1] if want_grad and not ctx.handover else None, student if keep_inputs else None,
                          teacher if keep_inputs else None, labels, numbers if ctx.numbers is None else None)


# float32 elements per block of rows when a 16-bit CPU gradient is scaled (16 MiB temporaries)
_SCALE_BLOCK = 1 << 22


def _scale_rows_in_place(g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``g *= scale`` (a float32 factor per row), in place. On the CPU a 16-bit ``g`` times a
    float32 column makes two ``g``-sized float32 temporaries (a widened copy and the product):
    blocks of rows bound them (a bf16 kd_loss peaked at 5x its logits)."""
    if g.dtype == scale.dtype or g.device.type != "cpu" or g.numel() <= _SCALE_BLOCK:
        return g.mul_(scale)
    rows = max(1, _SCALE_BLOCK // max(1, g.shape[1]))
    for start in range(0, g.shape[0], rows):
        g[start:start + rows].mul_(scale[start:start + rows])
    return g


def _backward(ctx, grad_rows, _grad_of_grad):
    saved_grad_rows, student, teacher, labels, numbers = ctx.saved_tensors
    kind, beta, ignore_index, vocab, backend = ctx.args
    numbers = numbers if ctx.numbers is None else ctx.numbers
    grad_student = grad_teacher = None
    if grad_rows is None:  # the row losses were not used
        return (None,) * 10
    if torch.is_grad_enabled() and not _needs_dispatcher(grad_rows):
        # create_graph=True: the student's gradient comes from the kernel and has no graph of
        # its own, so a second-order use (a gradient penalty) would silently see zeros.
        raise RuntimeError("kdfast.kd_divergence: double backward (create_graph=True) is not supported; "
                           "the student's gradient is computed by the forward kernel and is not differentiable")
    if ctx.needs_input_grad[0]:
        scale = grad_rows.unsqueeze(1)
        if ctx.recompute:
            grad_student = torch.ops.kdfast.kd_divergence(student.detach(), teacher.detach(), labels, kind, beta,
                                                          ignore_index, vocab, number_tensor(numbers), True,
                                                          backend)[1] * scale
        elif ctx.handover:
            student_grad_rows, ctx.student_grad_rows = ctx.student_grad_rows, None
            if student_grad_rows is None:
                raise RuntimeError("kdfast.kd_divergence: a second backward through the same graph "
                                   "(retain_graph=True) is not supported; the forward's gradient buffer "
                                   "was consumed by the first")
            grad_student = _scale_rows_in_place(student_grad_rows, scale)  # the buffer is ours alone
        else:
            grad_student = saved_grad_rows * scale
        grad_student = grad_student.to(ctx.student_dtype)  # float16's was kept in float32 until scaled
    if ctx.needs_input_grad[1]:
        with torch.enable_grad():
            leaf = teacher.detach().float().requires_grad_(True)
            inv_t, loss_scale = numbers_for_torch(numbers)
            rows = ref.kd_divergence(student.detach().float(), leaf, KINDS[kind], beta, 1.0 / inv_t, labels,
                                     ignore_index, vocab, loss_scale)
            if rows.requires_grad:
                grad_teacher = torch.autograd.grad(rows, leaf, grad_rows.float())[0].to(teacher.dtype)
            else:  # every row ignored: the reference's rows are constant zeros
                grad_teacher = torch.zeros_like(teacher)
    return grad_student, grad_teacher, None, None, None, None, None, None, None, None


_kd_divergence_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerKDDivergence(torch.autograd.Function):
    """kdfast::kd_divergence's autograd for plain eager tensors (same setup and backward)."""

    @staticmethod
    def forward(ctx, *inputs):  # (no separate setup_context: binding its arguments costs ~0.1 ms)
        output = _kd_divergence(*inputs[:9], backend=inputs[9], grad_dtype=_op_grad_dtype(inputs[0].dtype))
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_rows, grad_of_grad):  # (refuses a double backward itself)
        return _backward(ctx, grad_rows, grad_of_grad)
