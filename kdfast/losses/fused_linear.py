"""Fused LM head + KD loss: ``fused_linear_kd`` and :class:`FusedLinearKDLoss`.

Logit distillation of language models normally materialises student and teacher logits of
shape ``[tokens, vocab]`` (4 GB each in fp32 at 8k tokens and a 128k vocabulary) plus their
softmaxes and gradients. Here the tokens are processed in chunks: for each chunk the two
LM-head products are formed, the fused divergence kernel (:func:`kdfast.ops.kd_divergence`)
returns the per-token losses and the gradient of the student's logits, and that gradient is
immediately pushed through the student's head into the gradients of the hidden states,
weight and bias. Nothing of size ``[tokens, vocab]`` ever exists; the backward pass only
scales the gradients the forward pass already computed.
"""
# (No `from __future__ import annotations` here: torch 2.4's custom_op takes the annotations of
# an op's signature as types and refuses them as strings.)

import contextlib
import threading
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..ops._tensors import _F32_MAX, check_label_ids, number_tensor, read_numbers, reference_required
from ..ops.kd_divergence import KINDS, check_float32_numbers, kd_divergence, kd_divergence_with_grad
from ..ops.kd_topk import REMAINDERS, kd_topk, kd_topk_with_grad
from .._checks import check_flag, is_finite_number, real_number
from .kd import REDUCTIONS, _check_beta, _check_int, _check_temperature, _count_valid, _resolve_kind
from .topk import check_stored_topk

# Elements of one chunk's logits: big enough for compute-bound GEMMs, small enough that the
# chunk buffers stay a small fraction of the full logits.
_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 27}


def default_chunk_size(tokens: int, vocab: int, device_type: str) -> int:
    """Rows per chunk: about 8M logits on the CPU, 128M on a GPU, in multiples of 64 rows."""
    rows = _CHUNK_ELEMENTS.get(device_type, 1 << 23) // max(vocab, 1)
    return max(1, min(tokens, max(64, rows // 64 * 64)))


def _check_head(name: str, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    for what, t in ((f"{name}_hidden", hidden), (f"{name}_weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{what} must be float32, float16 or bfloat16, got {t.dtype}")
    if hidden.dim() != 2:
        raise ValueError(f"{name}_hidden must be 2-D [tokens, hidden] (flatten batch and sequence), got "
                         f"shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{name}_weight must be [vocab, {hidden.shape[1]}] to match {name}_hidden, got "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{name}_weight must have at least one row (one per vocabulary entry), got shape "
                         f"{tuple(weight.shape)}")
    if weight.device != hidden.device or weight.dtype != hidden.dtype:
        raise ValueError(f"{name}_weight ({weight.dtype} on {weight.device}) must match {name}_hidden "
                         f"({hidden.dtype} on {hidden.device})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"{name}_bias must be a tensor of shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.device != hidden.device or bias.dtype != hidden.dtype:
            raise ValueError(f"{name}_bias must be {hidden.dtype} on {hidden.device} like {name}_hidden")


def _check_options(kind: str, beta: float, temperature: float, weight_hard: float, weight_soft: float,
                   chunk_size: Optional[int], reduction: str, ignore_index: int, vocab_size: Optional[int],
                   scale_by_t2: bool) -> Tuple[Optional[int], int, Optional[int]]:
    """The options of :func:`fused_linear_kd` (and :class:`FusedLinearKDLoss`'s constructor);
    returns ``chunk_size``, ``ignore_index`` and ``vocab_size`` as ints (or None). The upper
    bound of ``vocab_size`` (the smaller head) is checked with the weights."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    _check_beta(beta)
    _check_reduction(reduction)
    weight_hard, weight_soft = real_number("weight_hard", weight_hard), real_number("weight_soft", weight_soft)
    # (both may stay symbolic under torch.compile: the soft weight reaches the kernels in a tensor)
    finite = (is_finite_number(weight_hard, "weight_hard", symbolic=True)
              and is_finite_number(weight_soft, "weight_soft", symbolic=True))
    if not finite or weight_hard < 0 or weight_soft < 0:
        raise ValueError(f"weight_hard and weight_soft must be finite and >= 0, got {weight_hard}, {weight_soft}")
    _check_temperature(temperature)
    check_float32_numbers(temperature, 1.0)
    if not torch.compiler.is_compiling():  # (symbolic numbers: a comparison would guard on their value)
        # The terms' weights too must be float32 numbers (past them every token's loss is inf or
        # NaN, where the loss itself is finite).
        soft_scale = weight_soft * (temperature ** 2 if scale_by_t2 else 1.0)
        if weight_hard > _F32_MAX or soft_scale > _F32_MAX:
            raise ValueError(f"weight_hard and weight_soft{' * temperature**2' if scale_by_t2 else ''} must be at "
                             f"most float32's largest number {_F32_MAX:.8g} (the kernels compute in float32), got "
                             f"{weight_hard:g} and {soft_scale:g}")
    return (None if chunk_size is None else _check_int("chunk_size", chunk_size, minimum=1),
            _check_int("ignore_index", ignore_index),
            None if vocab_size is None else _check_int("vocab_size", vocab_size, minimum=1))


def _check_reduction(reduction: str) -> None:
    """The fused losses' reductions: ``"none"`` is not one (no per-token graph is kept)."""
    if reduction not in REDUCTIONS or reduction == "none":
        raise ValueError(f"reduction must be 'batchmean', 'sum' or 'mean', got {reduction!r}")


def _check_labels(labels: Optional[torch.Tensor], tokens: int, vocab: int, student_vocab: int, ignore_index: int,
                  device: torch.device, need_values: bool) -> Optional[torch.Tensor]:
    if labels is None:
        if need_values:
            raise ValueError("weight_hard > 0 needs labels for the cross-entropy term")
        return None
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError("labels must be an int64 or int32 tensor of token ids")
    if labels.shape != (tokens,):
        raise ValueError(f"labels must have shape ({tokens},), one per token, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on {device} like the hidden states, got {labels.device}")
    labels = labels.to(torch.int64)
    # The hard term's targets are ids of the shared vocabulary; for the divergence alone labels
    # only mask, and the student's own tokens past it are tokens too. (Under vmap no value is
    # read: the cross-entropy's gather refuses an id out of range.)
    check_label_ids(labels, vocab if need_values else student_vocab, ignore_index)
    return labels


_FP32_OUT: Optional[Tuple[bool, bool]] = None
_FP32_OUT_LOCK = threading.Lock()


def _fp32_out_support(device: torch.device) -> Tuple[bool, bool]:
    """Whether this torch's CUDA ``mm`` and in-place ``addmm`` take 16-bit inputs with
    ``out_dtype=torch.float32`` (fp32 products without rounding to 16 bits; fp32 accumulation
    of the weight's gradient without a ``[vocab, hidden]`` temporary). Checked once, on values,
    on the GPU of the tensors at hand (not the current one); the check's one host read is not
    reported by ``torch.cuda.set_sync_debug_mode``, since it happens once per process."""
    global _FP32_OUT
    if _FP32_OUT is not None:
        return _FP32_OUT
    # One check at a time: the sync debug mode is process-wide, and a second thread's check would
    # save the 0 the first set and restore it last, switching the user's mode off for good
    with _FP32_OUT_LOCK:
        if _FP32_OUT is not None:
            return _FP32_OUT
        debug_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            with torch.cuda.device(device):
                a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16, device=device)
                try:
                    mm_ok = bool(torch.equal(torch.mm(a, a, out_dtype=torch.float32),
                                             torch.tensor([[7.0, 10.0], [15.0, 22.0]], device=device)))
                except (TypeError, RuntimeError):
                    mm_ok = False
                try:
                    acc = torch.ones(2, 2, device=device)
                    torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
                    addmm_ok = bool(torch.equal(acc, torch.tensor([[8.0, 11.0], [16.0, 23.0]], device=device)))
                except (TypeError, RuntimeError):
                    addmm_ok = False
        finally:
            torch.cuda.set_sync_debug_mode(debug_mode)
        _FP32_OUT = (mm_ok, addmm_ok)
        return _FP32_OUT


def _head_operand(weight: torch.Tensor) -> torch.Tensor:
    """The LM-head weight as the chunk products use it: a 16-bit CPU weight is widened once per
    call (CPU matmuls would round 16-bit products to 16 bits); any other weight as it is."""
    return weight.float() if weight.dtype != torch.float32 and not weight.is_cuda else weight


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 logits of one chunk (``weight`` from :func:`_head_operand`): 16-bit products are
    not rounded to 16 bits before the softmax."""
    if weight.dtype == torch.float32:
        out = hidden.float() @ weight.t()
    elif _fp32_out_support(hidden.device)[0]:
        out = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    else:
        # torch without mm(out_dtype=): products rounded to 16 bits, then widened.
        out = (hidden @ weight.t()).float()
    if bias is not None:
        out = out + bias.float()
    return out


def _accumulate_weight_grad(grad_weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """``grad_weight += g.T @ h`` in fp32, ``=`` for the ``first`` chunk (the buffer starts
    uninitialised: zeroing a weight-sized buffer cost as much as a few-token call's products);
    ``g`` and ``h`` share a dtype."""
    if g.dtype == torch.float32:
        if first:
            torch.mm(g.t(), h, out=grad_weight)
        else:
            grad_weight.addmm_(g.t(), h)
        return
    if first:
        grad_weight.zero_()
    if g.is_cuda and _fp32_out_support(g.device)[1]:
        torch.addmm(grad_weight, g.t(), h, out_dtype=torch.float32, out=grad_weight)
    else:  # 16-bit product rounded to 16 bits, then accumulated in fp32
        grad_weight.add_((g.t() @ h).float())


def _hidden_grad(out: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> None:
    """``out = g @ weight`` into fp32 rows ``out``; ``g`` and ``weight`` share a dtype."""
    if g.dtype == torch.float32:
        torch.mm(g, weight, out=out)
    elif g.is_cuda and _fp32_out_support(g.device)[0]:
        out.copy_(torch.mm(g, weight, out_dtype=torch.float32))
    else:  # 16-bit product rounded to 16 bits, then widened
        out.copy_(g @ weight)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab: int, ignore_index: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy over the shared vocabulary (0 for ignored tokens), with the kept
    tokens and their targets ``[tokens, 1]`` (ignored ones point at 0)."""
    shared = logits[:, :vocab]
    keep = labels != ignore_index
    target = torch.where(keep, labels, torch.zeros_like(labels)).unsqueeze(1)
    # Relative to the row's maximum (as the divergence kernels and F.cross_entropy): a log-sum-exp
    # rounded at the logits' size, less the target's logit, kept that rounding (at a common
    # offset of 1e4, errors of 5e-4 a token against torch's 3e-7). Detached: the gradient stays
    # softmax - one-hot exactly; non-finite maxima are left out (inf and NaN rows as before).
    top = shared.detach().amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    lse = torch.logsumexp(shared - top, dim=1)
    picked = (shared.gather(1, target) - top).squeeze(1)
    return torch.where(keep, lse - picked, torch.zeros_like(lse)), keep, target


def _cross_entropy_chunk(logits: torch.Tensor, labels: torch.Tensor, vocab: int, ignore_index: int
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy over the shared vocabulary and its gradient w.r.t. the logits."""
    ce, keep, target = _cross_entropy(logits, labels, vocab, ignore_index)
    shared = logits[:, :vocab]
    grad = torch.zeros_like(logits)
    grad[:, :vocab] = torch.softmax(shared, dim=1)
    grad.scatter_add_(1, target, -torch.ones_like(target, dtype=grad.dtype))
    grad.mul_(keep.unsqueeze(1))
    return ce, grad


class _TeacherHead:
    """The soft term against a teacher's LM head: its chunk logits are formed next to the
    student's and the divergence kernel gives the rows and the student logits' gradient."""

    def __init__(self, hidden, weight, bias, kind, beta, temperature, ignore_index, vocab, loss_scale):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.kind, self.beta, self.temperature, self.loss_scale = kind, beta, temperature, loss_scale
        self.width = weight.shape[0]  # (chunks are sized by the wider head)
        self.args = dict(kind=kind, beta=beta, temperature=temperature, ignore_index=ignore_index, vocab_size=vocab,
                         loss_scale=loss_scale)
        self._operand = None

    @property
    def operand(self) -> torch.Tensor:
        # (a 16-bit CPU head widened once per call, for either path; not while traced into the op)
        if self._operand is None:
            self._operand = _head_operand(self.weight)
        return self._operand

    def rows(self, s_logits, start, stop, labels, grad_dtype=None):
        """The chunk's rows, and their gradient (``grad_dtype``) when asked."""
        with torch.no_grad():
            t_logits = _head_logits(self.hidden[start:stop], self.operand, self.bias)
        if grad_dtype is None:
            return kd_divergence(s_logits, t_logits, labels=labels, **self.args), None
        return kd_divergence_with_grad(s_logits, t_logits, labels=labels, grad_dtype=grad_dtype, **self.args)

    def unfused_rows(self, s_logits, labels):
        """All rows from materialised logits, differentiable by torch (see :func:`_unfused_loss`)."""
        t_logits = _head_logits(self.hidden, self.operand, self.bias)
        return kd_divergence(s_logits, t_logits, labels=labels, **self.args)

    def op(self, head, labels, ignore_index, weight_hard, chunk_size, vocab, reduction, want):
        """The chunked loss as one ``kdfast::fused_linear_kd`` call (see :func:`_apply`)."""
        return torch.ops.kdfast.fused_linear_kd(
            *head, self.hidden, self.weight, self.bias, labels, KINDS.index(self.kind), self.beta, ignore_index, vocab,
            chunk_size or 0, reduction, number_tensor((self.temperature, self.loss_scale, weight_hard)), want)


class _StoredTopK:
    """The soft term against a teacher's stored top-k ids and log-probabilities (the top-k
    kernel gives the rows and the student logits' gradient)."""

    width = 0  # (chunks are sized by the student's head)

    def __init__(self, ids, logprobs, temperature, remainder, ignore_index, loss_scale):
        self.ids, self.logprobs = ids, logprobs
        self.temperature, self.remainder, self.loss_scale = temperature, remainder, loss_scale
        self.args = dict(temperature=temperature, remainder=remainder, ignore_index=ignore_index,
                         loss_scale=loss_scale, stored_dtype=logprobs.dtype)

    def rows(self, s_logits, start, stop, labels, grad_dtype=None):
        ids, lp = self.ids[start:stop], self.logprobs[start:stop]
        if grad_dtype is None:
            return kd_topk(s_logits, ids, lp, labels=labels, **self.args), None
        return kd_topk_with_grad(s_logits, ids, lp, labels=labels, grad_dtype=grad_dtype, **self.args)

    def unfused_rows(self, s_logits, labels):
        return kd_topk(s_logits, self.ids, self.logprobs, labels=labels, **self.args)

    def op(self, head, labels, ignore_index, weight_hard, chunk_size, vocab, reduction, want):
        """The chunked loss as one ``kdfast::fused_linear_topk_kd`` call (see :func:`_apply`)."""
        return torch.ops.kdfast.fused_linear_topk_kd(
            *head, self.ids, self.logprobs, labels, self.remainder, ignore_index, vocab, chunk_size or 0, reduction,
            number_tensor((self.temperature, self.loss_scale, weight_hard)), want)


def _chunked_loss(student_hidden, student_weight, student_bias, soft, labels, ignore_index, weight_hard, chunk_size,
                  vocab, reduction, want):
    """The loss and the gradients of the student's hidden states, weight and bias (those
    ``want`` asks for, else None), unscaled, in fp32, with the loss's denominator (None for
    ``"sum"``): the backward multiplies the gradients by ``grad_loss / denominator``."""
    tokens = student_hidden.shape[0]
    device = student_hidden.device
    if chunk_size is None:
        # (sized by the wider head: a teacher's chunk logits are as many rows of its vocabulary)
        chunk_size = default_chunk_size(tokens, max(student_weight.shape[0], soft.width), device.type)
    # Every row of grad_hidden is written by exactly one chunk. It is kept in fp32 until the
    # backward scales it (by 1 / valid tokens and the upstream gradient): stored unscaled in
    # 16 bits, a sum over a chunk's vocabulary overflows fp16 where the scaled gradient fits,
    # and small sums lose their digits in fp16's subnormal range.
    grad_hidden = torch.empty(student_hidden.shape, dtype=torch.float32, device=device) if want[0] else None
    grad_weight = ((torch.empty if tokens else torch.zeros)(student_weight.shape, dtype=torch.float32,
                                                              device=device) if want[1] else None)
    grad_bias = torch.zeros(student_weight.shape[0], dtype=torch.float32, device=device) \
        if want[2] and student_bias is not None else None
    rows_out = torch.zeros(tokens, dtype=torch.float32, device=device)
    need_grad = any(g is not None for g in (grad_hidden, grad_weight, grad_bias))
    student_operand = _head_operand(student_weight)
    # The head products run in the operand's dtype (fp32 on the CPU, the model's on a GPU);
    # the divergence kernel stores the chunk's gradient in it directly, unless the
    # hard-label gradient is to be added first.
    compute_dtype = student_operand.dtype
    grad_dtype = torch.float32 if weight_hard else compute_dtype
    for start in range(0, tokens, chunk_size):
        stop = min(tokens, start + chunk_size)
        h = student_hidden[start:stop]
        chunk_labels = None if labels is None else labels[start:stop]
        s_logits = _head_logits(h, student_operand, student_bias)
        rows, g = soft.rows(s_logits, start, stop, chunk_labels, grad_dtype if need_grad else None)
        if weight_hard and need_grad:
            ce, ce_grad = _cross_entropy_chunk(s_logits, chunk_labels, vocab, ignore_index)
            rows = rows + weight_hard * ce
            g = g.add_(ce_grad.mul_(weight_hard))  # (alpha= would make a symbolic weight a constant)
            del ce_grad
        elif weight_hard:
            rows = rows + weight_hard * _cross_entropy(s_logits, chunk_labels, vocab, ignore_index)[0]
        del s_logits
        rows_out[start:stop] = rows
        if not need_grad:
            continue
        g = g.to(compute_dtype)
        if grad_hidden is not None:
            _hidden_grad(grad_hidden[start:stop], g, student_operand)
        if grad_weight is not None:
            _accumulate_weight_grad(grad_weight, g, h.to(compute_dtype), first=start == 0)
        if grad_bias is not None:
            grad_bias.add_(g.sum(0, dtype=torch.float32))
    denominator = _denominator(labels, tokens, ignore_index, vocab, reduction, device)
    loss = rows_out.sum()
    if denominator is not None:
        loss = loss / denominator
    return loss, grad_hidden, grad_weight, grad_bias, denominator


class _FusedLinearKD(torch.autograd.Function):
    """The chunked loss in eager code; its backward only scales the forward's gradients."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, soft, labels, ignore_index, weight_hard,
                chunk_size, vocab, reduction):
        loss, *saved = _chunked_loss(student_hidden, student_weight, student_bias, soft, labels, ignore_index,
                                     weight_hard, chunk_size, vocab, reduction, ctx.needs_input_grad[:3])
        ctx.save_for_backward(*(t for t in saved if t is not None))
        ctx.present = tuple(t is not None for t in saved)
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype,
                      None if student_bias is None else student_bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _refuse_double_backward()
        if getattr(ctx, "consumed", False):
            raise RuntimeError("kdfast.fused_linear_kd: a second backward through the same graph (retain_graph=True) "
                               "is not supported; the forward's gradient buffers were scaled by the first")
        ctx.consumed = True
        saved = iter(ctx.saved_tensors)
        grad_hidden, grad_weight, grad_bias, denominator = (next(saved) if p else None for p in ctx.present)
        scale = grad_loss if denominator is None else grad_loss / denominator
        outs = []
        for g, dtype in zip((grad_hidden, grad_weight, grad_bias), ctx.dtypes):
            # in place: the buffers are this node's alone (a weight-sized copy cost as much as the products)
            outs.append(None if g is None else g.mul_(scale).to(dtype))
        return (outs[0], outs[1], outs[2]) + (None,) * 7


def _refuse_double_backward() -> None:
    if torch.is_grad_enabled():
        # create_graph=True: the gradients were computed in the forward pass and have no
        # graph of their own, so a second-order use (a gradient penalty) would see zeros.
        raise RuntimeError("kdfast.fused_linear_kd: double backward (create_graph=True) is not supported; "
                           "the gradients are computed in the forward pass and are not differentiable")


# --------------------------------------------------------------------------- custom ops
# Under torch.compile the chunked loss is one opaque op (its chunk loop runs eagerly inside):
# traced, the loop would be unrolled for the token count at hand, one graph per count.

_OP_NUMBERS = ("temperature", "soft loss scale", "weight_hard")  # the ops' numbers tensor, in order


def _op_options(student_hidden, student_weight, student_bias, labels, ignore_index, vocab, chunk_size, reduction,
                numbers, want_grads, vocab_limit):
    """Check what a direct caller of the ops passes (the public functions check it on their
    own path); returns the labels (int64), the chunk size (None: the default) and the numbers."""
    _check_head("student", student_hidden, student_weight, student_bias)
    _check_reduction(reduction)
    if not 1 <= vocab <= vocab_limit:
        raise ValueError(f"vocab must be in [1, {vocab_limit}], got {vocab}")
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 1, or 0 for the default, got {chunk_size}")
    if len(want_grads) != 3:
        raise ValueError(f"want_grads must hold 3 flags (hidden, weight, bias), got {len(want_grads)}")
    temperature, soft_scale, weight_hard = read_numbers(numbers, _OP_NUMBERS)
    if weight_hard < 0 or soft_scale < 0:
        raise ValueError(f"the loss weights must be >= 0, got weight_hard={weight_hard}, soft loss scale={soft_scale}")
    labels = _check_labels(labels, student_hidden.shape[0], vocab, student_weight.shape[0], ignore_index,
                           student_hidden.device, weight_hard > 0)
    return labels, chunk_size or None, temperature, soft_scale, weight_hard


def _op_outputs(student_hidden, student_weight, loss, grad_hidden, grad_weight, grad_bias, denominator):
    """The ops' outputs: missing gradients as empty tensors, the denominator of "sum" as 1."""
    return (loss, *(student_hidden.new_empty(0, dtype=torch.float32) if g is None else g  # (no aliases between outputs)
                    for g in (grad_hidden, grad_weight, grad_bias)),
            torch.ones((), dtype=torch.float32, device=loss.device) if denominator is None else denominator)


@torch.library.custom_op("kdfast::fused_linear_kd", mutates_args=())
def _fused_linear_kd_op(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                        student_bias: Optional[torch.Tensor], teacher_hidden: torch.Tensor,
                        teacher_weight: torch.Tensor, teacher_bias: Optional[torch.Tensor],
                        labels: Optional[torch.Tensor], kind: int, beta: float, ignore_index: int, vocab: int,
                        chunk_size: int, reduction: str, numbers: torch.Tensor, want_grads: List[bool]
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # numbers: float64 CPU [temperature, soft loss scale, weight_hard]; chunk_size 0: the default.
    # Returns the loss, the unscaled fp32 gradients of the student's hidden states, weight and
    # bias (empty where want_grads is False) and the loss's denominator.
    _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_hidden.shape[0] != student_hidden.shape[0] or teacher_hidden.device != student_hidden.device:
        raise ValueError("teacher_hidden must have student_hidden's tokens and device")
    if not 0 <= kind < len(KINDS):
        raise ValueError(f"kind must be in [0, {len(KINDS)}) ({', '.join(KINDS)}), got {kind}")
    labels, chunk_size, temperature, soft_scale, weight_hard = _op_options(
        student_hidden, student_weight, student_bias, labels, ignore_index, vocab, chunk_size, reduction, numbers,
        want_grads, min(student_weight.shape[0], teacher_weight.shape[0]))
    soft = _TeacherHead(teacher_hidden.detach(), teacher_weight.detach(),
                        None if teacher_bias is None else teacher_bias.detach(), KINDS[kind], beta, temperature,
                        ignore_index, vocab, soft_scale)
    outs = _chunked_loss(student_hidden.detach(), student_weight.detach(),
                         None if student_bias is None else student_bias.detach(), soft, labels, ignore_index,
                         weight_hard, chunk_size, vocab, reduction, want_grads)
    return _op_outputs(student_hidden, student_weight, *outs)


@torch.library.custom_op("kdfast::fused_linear_topk_kd", mutates_args=())
def _fused_linear_topk_kd_op(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                             student_bias: Optional[torch.Tensor], teacher_topk_ids: torch.Tensor,
                             teacher_topk_logprobs: torch.Tensor, labels: Optional[torch.Tensor], remainder: str,
                             ignore_index: int, vocab: int, chunk_size: int, reduction: str, numbers: torch.Tensor,
                             want_grads: List[bool]
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # As kdfast::fused_linear_kd, against a teacher's stored top-k (checked by the top-k kernel's op).
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    labels, chunk_size, temperature, soft_scale, weight_hard = _op_options(
        student_hidden, student_weight, student_bias, labels, ignore_index, vocab, chunk_size, reduction, numbers,
        want_grads, student_weight.shape[0])
    soft = _StoredTopK(teacher_topk_ids.detach(), teacher_topk_logprobs.detach(), temperature, remainder,
                       ignore_index, soft_scale)
    outs = _chunked_loss(student_hidden.detach(), student_weight.detach(),
                         None if student_bias is None else student_bias.detach(), soft, labels, ignore_index,
                         weight_hard, chunk_size, vocab, reduction, want_grads)
    return _op_outputs(student_hidden, student_weight, *outs)


def _fake_outputs(student_hidden, student_weight, student_bias, *rest):
    want = rest[-1]
    f32 = dict(dtype=torch.float32, device=student_hidden.device)
    return (student_hidden.new_empty((), **f32),
            student_hidden.new_empty(student_hidden.shape if want[0] else (0,), **f32),
            student_hidden.new_empty(student_weight.shape if want[1] else (0,), **f32),
            student_hidden.new_empty((student_weight.shape[0],) if want[2] and student_bias is not None else (0,),
                                     **f32),
            student_hidden.new_empty((), **f32))


def _op_setup_context(ctx, inputs, output):
    student_hidden, student_weight, student_bias = inputs[:3]
    ctx.dtypes = (student_hidden.dtype, student_weight.dtype, None if student_bias is None else student_bias.dtype)
    ctx.want = tuple(inputs[-1])
    ctx.set_materialize_grads(False)  # (the gradient outputs never receive a gradient)
    ctx.save_for_backward(*output[1:])


def _op_backward(ctx, grad_loss, *_unused):
    n_inputs = len(ctx.needs_input_grad)
    if grad_loss is None:
        return (None,) * n_inputs
    _refuse_double_backward()
    *grads, denominator = ctx.saved_tensors
    scale = grad_loss / denominator
    outs = []
    for i, (g, dtype) in enumerate(zip(grads, ctx.dtypes)):
        if ctx.needs_input_grad[i] and not ctx.want[i]:
            raise RuntimeError(f"kdfast.fused_linear_kd: input {i} needs a gradient its call did not compute "
                               f"(want_grads={list(ctx.want)})")
        outs.append((g * scale.to(g.dtype)).to(dtype) if ctx.needs_input_grad[i] else None)
    return (*outs, *(None,) * (n_inputs - 3))


for _op in (_fused_linear_kd_op, _fused_linear_topk_kd_op):
    _op.register_fake(_fake_outputs)
    _op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _denominator(labels: Optional[torch.Tensor], tokens: int, ignore_index: int, vocab: int, reduction: str,
                 device: torch.device) -> Optional[torch.Tensor]:
    """What the summed token losses are divided by: the valid tokens (at least 1) for
    ``"batchmean"``, times the vocabulary for ``"mean"``; None for ``"sum"``."""
    if reduction == "sum":
        return None
    if labels is None:
        count = torch.full((), float(max(tokens, 1)), dtype=torch.float32, device=device)  # a fill, not a copy
    else:
        count = _count_valid(labels, ignore_index).clamp(min=1).float()
    return count * vocab if reduction == "mean" else count


def _unfused_loss(student_hidden, student_weight, student_bias, soft, labels, ignore_index, weight_hard, vocab,
                  reduction) -> torch.Tensor:
    """The loss from torch's ops, with the logits materialised: what runs under torch.func's
    transforms and forward-mode AD, which cannot go through :class:`_FusedLinearKD` (its
    gradients are made in its forward pass). The same math: fp32 logits, the soft term as its
    op computes it there, the same cross-entropy and reduction."""
    s_logits = _head_logits(student_hidden, _head_operand(student_weight), student_bias)
    rows = soft.unfused_rows(s_logits, labels)
    if weight_hard:
        rows = rows + weight_hard * _cross_entropy(s_logits, labels, vocab, ignore_index)[0]
    denominator = _denominator(labels, student_hidden.shape[0], ignore_index, vocab, reduction, student_hidden.device)
    return rows.sum() if denominator is None else rows.sum() / denominator


def _autocast(*tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """The heads' tensors as ``F.linear`` takes them under ``torch.autocast``: floating ones
    other than float64 in the autocast dtype (so an fp32 ``lm_head.weight`` meets the bf16
    hidden states of an autocast model; gradients flow back to the fp32 parameters through the
    cast)."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not _autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for a device type autocast does not
    know (meta tensors, for shape propagation, where torch raises)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _autocast_off(tensor: torch.Tensor):
    """A context with autocast disabled on ``tensor``'s device type, where it is enabled."""
    if _autocast_enabled(tensor.device.type):
        return torch.autocast(tensor.device.type, enabled=False)
    return contextlib.nullcontext()


def fused_linear_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    weight_hard: float = 0.0,
    weight_soft: float = 1.0,
    chunk_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    scale_by_t2: bool = False,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """KD loss of a student's LM head against a teacher's, without materialising the logits.

    ``loss = weight_soft * D(teacher || student) + weight_hard * CE(student, labels)`` per token,
    reduced over the tokens whose label is not ``ignore_index`` (``"batchmean"``: their mean;
    ``"sum"``; ``"mean"``: divided also by the shared vocabulary size, as TRL). ``D`` is one
    of ``kind`` (see :func:`kdfast.losses.kd_loss`) at ``temperature``; the cross-entropy uses
    temperature 1. Both terms live on the shared vocabulary (``vocab_size``): the student's
    columns beyond it are padding, with probability 0 in the cross-entropy's softmax too.

    Args:
        student_hidden: ``[tokens, hidden_s]`` final hidden states of the student.
        student_weight: ``[vocab_s, hidden_s]`` the student's LM head (``lm_head.weight``).
        teacher_hidden, teacher_weight: the teacher's, ``[tokens, hidden_t]`` and
            ``[vocab_t, hidden_t]``; they receive no gradient.
        labels: ``[tokens]`` next-token ids (masking, and the targets of the hard term);
            needed when ``weight_hard > 0``.
        student_bias, teacher_bias: optional head biases.
        kind, beta: the divergence ``D`` and its mixing weight, as in :func:`kdfast.losses.kd_loss`.
        temperature: softmax temperature of ``D`` (both heads' logits are divided by it).
        ignore_index: the label value of tokens to leave out.
        weight_hard, weight_soft: the weights of the cross-entropy and of ``D``.
        reduction: ``"batchmean"``, ``"sum"`` or ``"mean"`` as above (there is no ``"none"``:
            the per-token losses are never materialised as a graph).
        chunk_size: tokens per chunk (default: about 8M logits of the wider head per chunk on the
            CPU, 128M on a GPU).
        vocab_size: the shared vocabulary; by default the smaller of the two heads, the
            larger head's extra columns being padding with probability 0.
        scale_by_t2: multiply the soft term by ``temperature**2``.

    Gradients for the student's hidden states, weight and bias are computed during the
    forward pass, chunk by chunk; peak extra memory is a few chunk-sized buffers plus fp32
    buffers for the gradients of the weight and the hidden states (on the CPU, 16-bit heads
    are also widened to fp32 once per call, an fp32 copy of each: the CPU's 16-bit matmuls
    would round every product to 16 bits). Under ``torch.autocast``
    the heads are taken in the autocast dtype, as ``F.linear`` takes them (an fp32 weight
    with bf16 hidden states works there).
    """
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = _autocast(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    _check_head("student", student_hidden, student_weight, student_bias)
    _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    tokens = student_hidden.shape[0]
    if teacher_hidden.shape[0] != tokens:
        raise ValueError(f"student_hidden and teacher_hidden must have the same number of tokens, got {tokens} "
                         f"and {teacher_hidden.shape[0]}")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher tensors must be on {student_hidden.device} like the student's, got "
                         f"{teacher_hidden.device}")
    scale_by_t2 = check_flag("scale_by_t2", scale_by_t2)
    chunk_size, ignore_index, vocab_size = _check_options(kind, beta, temperature, weight_hard, weight_soft,
                                                          chunk_size, reduction, ignore_index, vocab_size, scale_by_t2)
    shared = min(student_weight.shape[0], teacher_weight.shape[0])
    vocab = shared if vocab_size is None else vocab_size
    if not 1 <= vocab <= shared:
        raise ValueError(f"vocab_size must be in [1, {shared}] (the smaller head), got {vocab_size}")
    weight_hard, weight_soft, temperature = float(weight_hard), float(weight_soft), float(temperature)
    labels = _check_labels(labels, tokens, vocab, student_weight.shape[0], ignore_index, student_hidden.device,
                           weight_hard > 0)
    loss_scale = temperature ** 2 if scale_by_t2 else 1.0
    # the heads are cast: with autocast left on, the CPU's would round the fp32 products to 16 bits
    with _autocast_off(student_hidden):
        soft = _TeacherHead(teacher_hidden.detach(), teacher_weight.detach(),
                            None if teacher_bias is None else teacher_bias.detach(), _resolve_kind(kind, float(beta)),
                            float(beta), temperature, ignore_index, vocab, loss_scale * weight_soft)
        return _apply(student_hidden, student_weight, student_bias, soft, labels, ignore_index, weight_hard,
                      chunk_size, vocab, reduction)


def _apply(student_hidden, student_weight, student_bias, soft, labels, ignore_index, weight_hard, chunk_size, vocab,
           reduction) -> torch.Tensor:
    """The chunked loss (or, under torch.func's transforms and forward-mode AD, the unfused one)."""
    if reference_required((student_hidden, student_weight, student_bias)):
        return _unfused_loss(student_hidden, student_weight, student_bias, soft, labels, ignore_index, weight_hard,
                             vocab, reduction)
    if not torch.is_grad_enabled():  # evaluation: the loss alone, no gradient buffers or products
        student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
        student_bias = None if student_bias is None else student_bias.detach()
    if torch.compiler.is_compiling():  # one op in the graph, whatever the token count (see the ops)
        want = [t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)]
        return soft.op((student_hidden, student_weight, student_bias), labels, ignore_index, weight_hard, chunk_size,
                       vocab, reduction, want)[0]
    return _FusedLinearKD.apply(student_hidden, student_weight, student_bias, soft, labels, ignore_index,
                                weight_hard, chunk_size, vocab, reduction)


def fused_linear_topk_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    remainder: str = "bucket",
    ignore_index: int = -100,
    weight_hard: float = 0.0,
    weight_soft: float = 1.0,
    chunk_size: Optional[int] = None,
    scale_by_t2: bool = False,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Top-k KD of a student's LM head against a teacher's stored top-k, without materialising
    the student's logits: offline distillation from cached teacher outputs at LM scale.

    ``loss = weight_soft * KL_topk(teacher || student) + weight_hard * CE(student, labels)`` per
    token, reduced as in :func:`fused_linear_kd`. ``KL_topk`` is :func:`kdfast.losses.topk_kd_loss`'s
    forward KL (``remainder="bucket"`` or ``"renormalize"``) at ``temperature``; the tokens are
    processed in chunks, each chunk's logits formed, its losses and gradient given by the top-k
    kernel (:func:`kdfast.ops.kd_topk`) and the gradient pushed through the head at once.

    Args:
        student_hidden: ``[tokens, hidden]`` final hidden states of the student.
        student_weight: ``[vocab, hidden]`` the student's LM head (``lm_head.weight``).
        teacher_topk_ids, teacher_topk_logprobs: ``[tokens, k]`` the teacher's stored top-k
            (e.g. from :func:`kdfast.losses.teacher_topk`), ids of the student's vocabulary;
            checked on the CPU as :func:`kdfast.losses.topk_kd_loss` checks them.
        labels: ``[tokens]`` next-token ids (masking, and the targets of the hard term); needed
            when ``weight_hard > 0``.
        student_bias: optional head bias.
        The other options are :func:`fused_linear_kd`'s (``"mean"`` divides also by the
        student's vocabulary).
    """
    student_hidden, student_weight, student_bias = _autocast(student_hidden, student_weight, student_bias)
    _check_head("student", student_hidden, student_weight, student_bias)
    tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    scale_by_t2 = check_flag("scale_by_t2", scale_by_t2)
    chunk_size, ignore_index, _ = _check_options("forward_kl", 0.0, temperature, weight_hard, weight_soft,
                                                 chunk_size, reduction, ignore_index, None, scale_by_t2)
    weight_hard, weight_soft, temperature = float(weight_hard), float(weight_soft), float(temperature)
    labels = _check_labels(labels, tokens, vocab, vocab, ignore_index, student_hidden.device, weight_hard > 0)
    keep = None if labels is None else labels != ignore_index
    check_stored_topk(teacher_topk_ids, teacher_topk_logprobs, student_hidden.shape[:1], vocab, student_hidden.device,
                      keep, remainder, like="student_hidden")
    loss_scale = temperature ** 2 if scale_by_t2 else 1.0
    with _autocast_off(student_hidden):
        soft = _StoredTopK(teacher_topk_ids.detach(), teacher_topk_logprobs.detach(), temperature, remainder,
                           ignore_index, loss_scale * weight_soft)
        return _apply(student_hidden, student_weight, student_bias, soft, labels, ignore_index, weight_hard,
                      chunk_size, vocab, reduction)


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`fused_linear_kd`: the constructor takes its options (``kind``,
    ``beta``, ``temperature``, ``ignore_index``, ``weight_hard``, ``weight_soft``,
    ``chunk_size``, ``vocab_size``, ``scale_by_t2``, ``reduction``, same defaults) and checks
    them; ``forward`` takes its tensors.

    Example::

        criterion = FusedLinearKDLoss(kind="jsd", beta=0.5, temperature=1.0, weight_hard=0.5, weight_soft=0.5)
        loss = criterion(student_out.hidden_states[-1].flatten(0, 1), student.lm_head.weight,
                         teacher_out.hidden_states[-1].flatten(0, 1), teacher.lm_head.weight,
                         labels.flatten())
        loss.backward()
    """

    def __init__(self, kind: str = "jsd", beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                 weight_hard: float = 0.0, weight_soft: float = 1.0, chunk_size: Optional[int] = None,
                 vocab_size: Optional[int] = None, scale_by_t2: bool = False, reduction: str = "batchmean"):
        super().__init__()
        scale_by_t2 = check_flag("scale_by_t2", scale_by_t2)
        chunk_size, ignore_index, vocab_size = _check_options(  # fail at construction
            kind, beta, temperature, weight_hard, weight_soft, chunk_size, reduction, ignore_index, vocab_size,
            scale_by_t2)
        self.kind, self.beta, self.temperature = kind, float(beta), float(temperature)
        self.ignore_index, self.weight_hard, self.weight_soft = ignore_index, float(weight_hard), float(weight_soft)
        self.chunk_size, self.vocab_size = chunk_size, vocab_size
        self.scale_by_t2, self.reduction = scale_by_t2, reduction

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None):
        """The loss of the two heads' logits, never materialised (see :func:`fused_linear_kd`)."""
        return fused_linear_kd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                               student_bias, teacher_bias, kind=self.kind, beta=self.beta,
                               temperature=self.temperature, ignore_index=self.ignore_index,
                               weight_hard=self.weight_hard, weight_soft=self.weight_soft,
                               chunk_size=self.chunk_size, vocab_size=self.vocab_size,
                               scale_by_t2=self.scale_by_t2, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, beta={self.beta}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, weight_hard={self.weight_hard}, weight_soft={self.weight_soft}, "
                f"chunk_size={self.chunk_size}, vocab_size={self.vocab_size}, scale_by_t2={self.scale_by_t2}, "
                f"reduction={self.reduction!r}")


class FusedLinearTopKKDLoss(nn.Module):
    """Module form of :func:`fused_linear_topk_kd`: the constructor takes its options
    (``temperature``, ``remainder``, ``ignore_index``, ``weight_hard``, ``weight_soft``,
    ``chunk_size``, ``scale_by_t2``, ``reduction``, same defaults) and checks them; ``forward``
    takes its tensors.

    Example::

        ids, logprobs = cached_teacher_topk[batch_index]          # [tokens, k] each
        criterion = FusedLinearTopKKDLoss(temperature=1.0, weight_hard=0.5, weight_soft=0.5)
        loss = criterion(student_out.hidden_states[-1].flatten(0, 1), student.lm_head.weight, ids, logprobs,
                         labels.flatten())
        loss.backward()
    """

    def __init__(self, temperature: float = 1.0, remainder: str = "bucket", ignore_index: int = -100,
                 weight_hard: float = 0.0, weight_soft: float = 1.0, chunk_size: Optional[int] = None,
                 scale_by_t2: bool = False, reduction: str = "batchmean"):
        super().__init__()
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
        scale_by_t2 = check_flag("scale_by_t2", scale_by_t2)
        chunk_size, ignore_index, _ = _check_options(  # fail at construction
            "forward_kl", 0.0, temperature, weight_hard, weight_soft, chunk_size, reduction, ignore_index, None,
            scale_by_t2)
        self.temperature, self.remainder, self.ignore_index = float(temperature), remainder, ignore_index
        self.weight_hard, self.weight_soft, self.chunk_size = float(weight_hard), float(weight_soft), chunk_size
        self.scale_by_t2, self.reduction = scale_by_t2, reduction

    def forward(self, student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs, labels=None,
                student_bias=None):
        """The loss against the stored top-k, the student's logits never materialised."""
        return fused_linear_topk_kd(student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs, labels,
                                    student_bias, temperature=self.temperature, remainder=self.remainder,
                                    ignore_index=self.ignore_index, weight_hard=self.weight_hard,
                                    weight_soft=self.weight_soft, chunk_size=self.chunk_size,
                                    scale_by_t2=self.scale_by_t2, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, remainder={self.remainder!r}, ignore_index={self.ignore_index}, "
                f"weight_hard={self.weight_hard}, weight_soft={self.weight_soft}, chunk_size={self.chunk_size}, "
                f"scale_by_t2={self.scale_by_t2}, reduction={self.reduction!r}")
