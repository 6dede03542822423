"""KD from stored teacher top-k log-probabilities (offline distillation from cached outputs).

Caching a teacher's full ``[tokens, vocab]`` distributions is out of the question (a 128k
vocabulary is 256 KB per token in bf16); caching its top-k (ids and log-probabilities) is
cheap. The teacher's remaining mass ``r = 1 - sum(top-k probabilities)`` is then unknown in
its details but known in total, and this module treats it explicitly:

- ``remainder="bucket"`` (default): the teacher distribution is coarse-grained to the k
  stored entries plus one "everything else" outcome of mass ``r``; the student's distribution
  is coarse-grained the same way (its mass outside the k ids), and the loss is the exact
  forward KL between the two (k + 1)-outcome distributions. This never exceeds the full KL
  and equals it when the teacher's remainder is spread like the student's. A remainder
  within the rounding of the stored log-probabilities (each probability off by its own
  log-probability times their dtype's last place) counts as 0; with k equal to the
  vocabulary the stored mass must be 1. (Log-probabilities computed within that: from
  ``log_softmax`` or :func:`teacher_topk`. Written out as ``logits - logsumexp(logits)`` in
  float32 at logits of some hundreds, they are off by more, and that deficit, ~1e-4, counts
  as a remainder.)
- ``remainder="renormalize"``: the stored top-k probabilities are renormalised to sum to 1
  and the rest is taken as exactly 0 (the usual "top-k KD"); the student is not truncated.

The loss of every token and its gradient come from one fused kernel
(:func:`kdfast.ops.kd_topk`); this module checks the stored entries (on the CPU with errors
naming the problem, on a GPU and under torch.compile with asserts on the device), flattens and
reduces.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..ops._tensors import check_label_ids, vmapped
from ..ops.kd_topk import REMAINDERS, kd_topk
from ..reference.kd_divergence import tempered
from ..reference.kd_topk import mass_rounding
from .kd import REDUCTIONS, _check_int, _check_temperature, _reduce, _t2_loss_scale


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0,
                 chunk_size: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """What to cache from a teacher: ``(ids, log_probs)`` of its ``k`` most likely tokens at
    ``temperature``, each ``[..., k]`` (int64 and float32), computed ``chunk_size`` rows at a
    time so the full-vocabulary softmax never exists for all tokens at once."""
    if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dim() < 1:
        raise TypeError("teacher_logits must be a tensor [..., vocab]")
    if not teacher_logits.is_floating_point():  # (complex lost its imaginary part, bools read as 0 and 1)
        raise TypeError(f"teacher_logits must be floating point, got {teacher_logits.dtype}")
    vocab = teacher_logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"teacher_logits must have a vocabulary of at least one entry, got shape "
                         f"{tuple(teacher_logits.shape)}")
    chunk_size = _check_int("chunk_size", chunk_size, minimum=1)
    k = _check_int("k", k)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    temperature = _check_temperature(temperature)
    flat = teacher_logits.reshape(-1, vocab)
    ids, logps = [], []
    for start in range(0, flat.shape[0], chunk_size):
        logp = torch.log_softmax(tempered(flat[start:start + chunk_size].float(), temperature), dim=-1)
        top = logp.topk(k, dim=-1)
        ids.append(top.indices)
        logps.append(top.values)
    lead = teacher_logits.shape[:-1]
    return (torch.cat(ids).reshape(*lead, k) if ids else flat.new_empty((*lead, k), dtype=torch.long),
            torch.cat(logps).reshape(*lead, k) if logps else flat.new_empty((*lead, k), dtype=torch.float32))


def check_stored_topk(teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor, lead: torch.Size,
                      vocab: int, device: torch.device, keep: Optional[torch.Tensor], remainder: str,
                      like: str = "student_logits") -> int:
    """Check a teacher's stored top-k against the student's ``lead`` shape and ``vocab`` (on the
    CPU their values too; ``keep``: the flat mask of positions not ignored, or None); returns k."""
    for name, t in (("teacher_topk_ids", teacher_topk_ids), ("teacher_topk_logprobs", teacher_topk_logprobs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if teacher_topk_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"teacher_topk_ids must be int64 or int32, got {teacher_topk_ids.dtype}")
    if teacher_topk_ids.shape[:-1] != lead or teacher_topk_ids.dim() != len(lead) + 1:
        raise ValueError(f"teacher_topk_ids must have shape {tuple(lead)} + (k,), got {tuple(teacher_topk_ids.shape)}")
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        raise ValueError(f"teacher_topk_logprobs must have the shape of teacher_topk_ids "
                         f"{tuple(teacher_topk_ids.shape)}, got {tuple(teacher_topk_logprobs.shape)}")
    if not teacher_topk_logprobs.is_floating_point():
        raise TypeError("teacher_topk_logprobs must be floating point")
    for name, t in (("teacher_topk_ids", teacher_topk_ids), ("teacher_topk_logprobs", teacher_topk_logprobs)):
        if t.device != device:
            raise ValueError(f"{name} must be on {device} like {like}, got {t.device}")
    k = teacher_topk_ids.shape[-1]
    if vocab == 0:
        raise ValueError(f"{like} must have a vocabulary of at least one entry, got an empty last dimension")
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk_ids must hold between 1 and {vocab} (the vocabulary) ids per position, "
                         f"got k = {k}")
    # free to check on the CPU; on a GPU it would be a sync, under torch.compile a graph break,
    # and no value can be read from a tensor batched by torch.func.vmap
    if not (device.type == "cpu" and not torch.compiler.is_compiling() and not any(
            vmapped(t) for t in (teacher_topk_ids, teacher_topk_logprobs, keep) if t is not None)):
        # There the ids are asserted without a host read (device-side asserts, as an indexing
        # op's), an ignored position read as 0, 1, ..., k-1: the kernels would make a position
        # with an id outside the vocabulary NaN, and count one of a repeated id's entries,
        # silently. (A sort of the [tokens, k] ids: small beside the pass over the vocabulary.)
        ids = teacher_topk_ids.reshape(-1, k).to(torch.int64)
        if keep is not None:
            ids = torch.where(keep.unsqueeze(1), ids, torch.arange(k, device=ids.device))
        check_label_ids(ids, vocab, None, name="teacher_topk_ids")
        if k > 1 and ids.numel() and ids.device.type != "meta" and not vmapped(ids):
            torch._assert_async((ids.sort(dim=-1).values.diff(dim=-1) != 0).all(),
                                "teacher_topk_ids must not repeat an id within a position")
        _assert_stored_logprobs(teacher_topk_logprobs.reshape(-1, k), keep, vocab, remainder)
    else:
        ids_kept, lp_kept = teacher_topk_ids.reshape(-1, k), teacher_topk_logprobs.reshape(-1, k).float()
        if keep is not None:  # ignored positions may hold anything (padding)
            ids_kept, lp_kept = ids_kept[keep.cpu()], lp_kept[keep.cpu()]
        if ids_kept.numel() and (ids_kept.min() < 0 or ids_kept.max() >= vocab):
            raise ValueError(f"teacher_topk_ids must be in [0, {vocab})")
        if k > 1 and (ids_kept.sort(dim=-1).values.diff(dim=-1) == 0).any():
            raise ValueError("teacher_topk_ids must not repeat an id within a position")
        # log-probabilities: a total mass of at most 1 (so each at most 0), up to the rounding
        # of the stored dtype (a larger mass makes the "bucket" KL meaningless)
        if lp_kept.isnan().any():
            raise ValueError("teacher_topk_logprobs holds NaN at a position that is not ignored")
        if remainder == "renormalize" and lp_kept.numel() and (lp_kept == -math.inf).all(dim=-1).any():
            raise ValueError("teacher_topk_logprobs: a position's stored probabilities are all 0, so there is "
                             "nothing to renormalise (remainder='renormalize'); use remainder='bucket' or ignore it")
        mass, rounding = _stored_mass(lp_kept, teacher_topk_logprobs.dtype)
        if remainder == "bucket" and k == vocab and lp_kept.numel() and (mass < 1.0 - rounding).any():
            raise ValueError("teacher_topk_logprobs: with k equal to the vocabulary there is no remainder, so the "
                             f"stored probabilities must sum to 1 per position (smallest sum {float(mass.min()):.6g})")
        if lp_kept.numel() and (mass > 1.0 + rounding).any():
            raise ValueError("teacher_topk_logprobs must be log-probabilities: each <= 0 and their probabilities "
                             f"summing to at most 1 per position (largest entry {float(lp_kept.max()):.4g}, largest "
                             f"sum {float(mass.max()):.6g})")
    return k


def _stored_mass(lp: torch.Tensor, stored_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per position, the stored probabilities' total (float64) and its tolerance, the rounding
    of ``stored_dtype``: 16-bit values to bfloat16's, as a bf16 model's log-probabilities stored
    as float16 (exactly) keep it."""
    checked = torch.bfloat16 if stored_dtype == torch.float16 else stored_dtype
    lp64 = lp.double()
    p64 = lp64.exp()
    return p64.sum(-1), mass_rounding(p64, lp64, torch.finfo(checked).eps)


def _assert_stored_logprobs(lp: torch.Tensor, keep: Optional[torch.Tensor], vocab: int, remainder: str) -> None:
    """The eager CPU checks of the stored ``[positions, k]`` log-probabilities, as one assert on
    the device (no host read: on a GPU and inside torch.compile's graph), kept positions only."""
    if not lp.numel() or lp.device.type == "meta" or vmapped(lp) or (keep is not None and vmapped(keep)):
        return
    mass, rounding = _stored_mass(lp, lp.dtype)
    bad = lp.isnan().any(-1) | (mass > 1.0 + rounding)
    if remainder == "renormalize":
        bad |= (lp == -math.inf).all(-1)
    elif lp.shape[-1] == vocab:
        bad |= mass < 1.0 - rounding
    if keep is not None:
        bad &= keep
    torch._assert_async(~bad.any(), "teacher_topk_logprobs must be log-probabilities at every position not "
                        "ignored: no NaN, probabilities summing to at most 1 (to 1 where k is the vocabulary and "
                        "remainder='bucket'; not all 0 with remainder='renormalize')")


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    remainder: str = "bucket",
    ignore_index: int = -100,
    reduction: str = "batchmean",
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """Forward KL from a teacher known only by its top-k log-probabilities.

    Args:
        student_logits: ``[..., vocab]`` logits (math in float32).
        teacher_topk_ids: ``[..., k]`` distinct token ids per position (e.g. from
            :func:`teacher_topk`; checked on the CPU, where it costs no device sync; on a GPU
            and under torch.compile their range and distinctness are asserted on the device,
            as an indexing op's range is).
        teacher_topk_logprobs: ``[..., k]`` the teacher's log-probabilities of those ids at
            ``temperature`` (``log_softmax(teacher_logits / temperature)`` at the ids): each
            <= 0, their probabilities summing to at most 1 per position, up to the stored dtype's
            rounding (checked: in eager mode on the CPU with an error naming the problem, on a
            GPU and under torch.compile by one assert on the device).
        labels: optional ``[...]``; positions equal to ``ignore_index`` are left out, whatever
            they hold (padding ids and NaN log-probabilities there give no NaN gradient).
        temperature: applied to the student's logits (the teacher's are stored at it).
        remainder: ``"bucket"`` or ``"renormalize"`` (see the module docstring).
        reduction: ``"batchmean"`` (over valid tokens), ``"sum"``, ``"mean"`` (also / vocab) or
            ``"none"`` (per token, float32).
        scale_by_t2: multiply by ``temperature**2``.

    Returns a float32 scalar (per token for ``reduction="none"``). The student's gradient is
    computed by the forward kernel (:func:`kdfast.ops.kd_topk`), as :func:`kd_loss`'s is: a
    graph whose student takes gradients supports one backward (a second one through
    ``retain_graph=True``, and ``create_graph=True``, raise an error; torch.func's transforms,
    ``torch.func.hessian`` included, take the differentiable reference instead). Under
    ``torch.compile`` a changing ``temperature`` compiles twice in all, as for :func:`kd_loss`.
    """
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    for name, t in (("student_logits", student_logits), ("teacher_topk_ids", teacher_topk_ids),
                    ("teacher_topk_logprobs", teacher_topk_logprobs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not student_logits.is_floating_point() or student_logits.dim() < 1:
        raise TypeError("student_logits must be a floating-point tensor [..., vocab]")
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != lead):
        raise ValueError(f"labels must be a tensor of shape {tuple(lead)}")
    if labels is not None and labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must hold integers, got {labels.dtype}")
    if labels is not None and labels.device != student_logits.device:
        raise ValueError(f"labels must be on {student_logits.device} like student_logits, got {labels.device}")
    ignore_index = _check_int("ignore_index", ignore_index)
    # compared in int64, as kd_loss does: uint8 labels compared with -100 directly wrap it to 156
    keep = None if labels is None else labels.reshape(-1).to(torch.int64) != ignore_index
    k = check_stored_topk(teacher_topk_ids, teacher_topk_logprobs, lead, vocab, student_logits.device, keep,
                          remainder)
    temperature = _check_temperature(temperature)

    n = math.prod(lead)  # (not -1, which vmap over an empty batch cannot resolve)
    student = student_logits.reshape(n, vocab)
    if student.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        student = student.float()  # (the math is float32 whatever the logits)
    rows = kd_topk(student, teacher_topk_ids.reshape(n, k), teacher_topk_logprobs.reshape(n, k),
                   labels=None if labels is None else labels.reshape(n), ignore_index=ignore_index,
                   temperature=temperature, remainder=remainder,
                   loss_scale=_t2_loss_scale(temperature, scale_by_t2),
                   stored_dtype=teacher_topk_logprobs.dtype)
    valid = n if keep is None else keep.sum()
    if reduction == "none":
        return rows.reshape(lead)
    return _reduce(rows, valid, vocab, reduction, None)
