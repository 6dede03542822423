"""``kdfast.ops`` diffusion-distillation losses: fused per-sample losses with their backward.

- :func:`pseudo_huber`: ``sqrt(||x - y||^2 + c^2) - c`` per sample (iCT), or its element-wise
  mean (LCM) with ``elementwise=True``.
- :func:`dmd`: the distribution-matching loss of DMD / DMD2, NaN-safe.
- :func:`progressive_mse`: weighted MSE between a student's prediction and the
  progressive-distillation target, which is never materialised.
- :func:`pd_target` / :func:`per_sample_ddim_step`: the target itself, and a deterministic DDIM
  step with per-sample timesteps (both one fused pass of a per-sample linear combination).

Every loss returns float32 ``[batch]`` (per-sample weights applied) and is batched over
samples at different timesteps: ``c``, ``weights``, ``alpha_*`` and ``sigma_*`` are numbers or
per-sample tensors on the latents' device, read by the kernels (no host sync). The forward is a
per-sample reduction; the backward one fused element pass (why: see
csrc/diffusion_losses/diffusion_losses.h). :mod:`kdfast.reference.diffusion_losses` is the spec.
This module is the only place where these tensors become addresses.
"""
# (No `from __future__ import annotations` here: torch 2.4's custom_op takes the annotations of
# an op's signature as types and refuses them as strings.)

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import _ext, backends
from .._checks import as_float, check_flag, is_finite_number, not_a_number
from ..reference import diffusion_losses as ref
from ._tensors import (DTYPE_CODES, cuda_stream, describe, dispatcher_required, empty_in_layout, has_subclass,
                       in_layout, on_device, op_layout, reference_required, sample_layout, vmapped)

KINDS = ref.KINDS  # same order as kdfast::diffusion_losses::Kind
PREDICTION_TYPES = ref.PREDICTION_TYPES  # same order as kdfast::diffusion_losses::Prediction
COMBINATIONS = ref.COMBINATIONS  # same order as kdfast::diffusion_losses::Combination
SLOTS = ("weights", "c", "alpha_t", "sigma_t", "alpha_s", "sigma_s")  # kdfast::diffusion_losses::Slot
PSEUDO_HUBER, PSEUDO_HUBER_ELEMENTWISE, DMD, PROGRESSIVE_MSE = range(4)
_W, _C, _AT, _ST, _AS, _SS = range(6)

forward_op = backends.op("diffusion_loss")
backward_op = backends.op("diffusion_loss_backward")
combination_op = backends.op("sample_combination")

PerSample = Union[float, torch.Tensor]


# --------------------------------------------------------------------------- validation


def _check_latent(name: str, t, like: Optional[torch.Tensor] = None, like_name: str = "x") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if like is None:
        if t.dim() == 0:
            raise ValueError(f"{name} must have a batch dimension [batch, ...], got a 0-d tensor")
        if t.shape[0] > 0 and t.numel() == 0:
            raise ValueError(f"{name} must have at least one element per sample, got shape {tuple(t.shape)}")
    else:
        if t.shape != like.shape:
            raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} must be on {like.device} like {like_name}, got {t.device}")
    return sample_layout(t) if like is None else in_layout(t, like)


def _check_per_sample(name: str, value, batch: int, device: torch.device, *, default: Optional[float] = None,
                      minimum: Optional[float] = None) -> Tuple[Optional[torch.Tensor], float]:
    """(tensor of shape [batch] (maybe expanded) or None, host value) of a per-sample scalar.

    Numbers are checked here, and in eager mode a CPU tensor's values against ``minimum`` (free
    to read); a device tensor's values are not (that would need a host sync)."""
    if value is None:
        if default is None:
            raise TypeError(f"{name} is required: a number or a per-sample tensor of shape ({batch},)")
        return None, float(default)
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int64, torch.int32)):
            raise TypeError(f"{name} must be a floating-point (or int32 / int64) tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device} like the latents, got {value.device}")
        if value.numel() == 1:
            t = value.reshape(1).expand(batch)
        elif value.numel() == batch and value.dim() >= 1 and value.shape[0] == batch:
            t = value.reshape(batch)
        else:
            raise ValueError(f"{name} must be a number or hold one value per sample (shape ({batch},) or "
                             f"({batch}, 1, ...)), got shape {tuple(value.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float32)
        if minimum is not None and t.numel() and t.device.type == "cpu" and not _traced((t,)) and not vmapped(t):
            bad = ~(torch.isfinite(t) & (t >= minimum))  # (NaN too)
            if bool(bad.any()):
                raise ValueError(f"{name} must be finite and >= {minimum}, got {t[bad][0].item()}")
        return t, 0.0
    if torch.compiler.is_compiling() and isinstance(value, numbers.Real) and not not_a_number(value):
        return _traced_per_sample(name, value, batch, device, minimum), 0.0
    try:
        if not_a_number(value):  # (float() takes "0.1" and True)
            raise TypeError
        v = as_float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or a tensor, got {value!r}") from None
    if not is_finite_number(v, name):
        raise ValueError(f"{name} must be finite, got {v}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return None, v


def _traced_per_sample(name: str, value, batch: int, device: torch.device, minimum: Optional[float]) -> torch.Tensor:
    """A number under torch.compile, as a per-sample float64 tensor. The custom ops take a float
    as a graph constant: a number that changes between calls (one timestep's alpha, an annealed
    ``c``), which torch.compile makes symbolic from its second value on, would compile once per
    value; as a tensor one graph serves every value. (The product keeps it symbolic:
    ``torch.full`` would specialise it.) Checked as a number is, when the compiled code runs."""
    t = torch.ones(batch, dtype=torch.float64, device=device) * value
    held = torch.ones((), dtype=torch.float64, device=device) * value
    torch._assert_async(held.isfinite(), f"{name} must be finite")
    if minimum is not None:
        torch._assert_async(held >= minimum, f"{name} must be >= {minimum}")
    return t


def _check_prediction_type(prediction_type: str) -> int:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(map(repr, PREDICTION_TYPES))}, "
                         f"got {prediction_type!r}")
    return PREDICTION_TYPES.index(prediction_type)


def _schedule_params(batch, device, alpha_t, sigma_t, alpha_s, sigma_s):
    names = ("alpha_t", "sigma_t", "alpha_s", "sigma_s")
    return [_check_per_sample(n, v, batch, device) for n, v in zip(names, (alpha_t, sigma_t, alpha_s, sigma_s))]


def _free_schedule_values(sched) -> Optional[list]:
    """The schedule's values where reading them is free: host numbers (kept as Python floats, no
    tensors made on every training step) and CPU tensors (in float64); None where a value is on
    a GPU (a sync), under torch.compile (a data-dependent branch would break the graph) or under
    vmap (none is read)."""
    if torch.compiler.is_compiling() or any(t is not None and (t.device.type != "cpu" or vmapped(t)) for t, _ in sched):
        return None
    return [v if t is None else t.double() for t, v in sched]


def _check_pd_schedule(sched) -> None:
    """The progressive-distillation target divides by sigma_t and by alpha_s - (sigma_s /
    sigma_t) alpha_t (zero when t and s share their SNR): refuse those where checking is free."""
    values = _free_schedule_values(sched)
    if values is None:
        return
    a_t, s_t, a_s, s_s = values
    if _any(s_t == 0):
        raise ValueError("sigma_t must be nonzero: the target is derived from the noise level at t")
    moved = (s_s / s_t) * a_t  # equal to alpha_s up to float32 rounding: the same SNR
    if _any(abs(a_s - moved) <= 1e-6 * (abs(a_s) + abs(moved))):
        raise ValueError("(alpha_t, sigma_t) and (alpha_s, sigma_s) must have different signal-to-noise "
                         "ratios: with equal ones the two-step target is undetermined")


def _check_ddim_schedule(sched, prediction_type: str) -> None:
    """The DDIM step forms x0 and eps from the prediction at t: by dividing by alpha_t (epsilon),
    sigma_t (sample) or alpha_t^2 + sigma_t^2 (v): refuse a zero one where checking is free."""
    values = _free_schedule_values(sched[:2])
    if values is None:
        return
    a_t, s_t = values
    if prediction_type == "epsilon" and _any(a_t == 0):
        raise ValueError("alpha_t must be nonzero: an epsilon prediction gives x0 = (x_t - sigma_t eps) / alpha_t")
    if prediction_type == "sample" and _any(s_t == 0):
        raise ValueError("sigma_t must be nonzero: a sample prediction gives eps = (x_t - alpha_t x0) / sigma_t")
    if prediction_type == "v_prediction" and _any(a_t * a_t + s_t * s_t == 0):
        raise ValueError("alpha_t and sigma_t must not both be zero: a v prediction is undetermined there")


def _any(condition) -> bool:
    return bool(condition.any()) if isinstance(condition, torch.Tensor) else bool(condition)


def _pack(entries: Sequence[Tuple[int, Tuple[Optional[torch.Tensor], float]]]):
    """The 6 per-sample slots as (tensors, values) lists; unused slots (None, 0), weight 1."""
    params: List[Optional[torch.Tensor]] = [None] * len(SLOTS)
    values = [0.0] * len(SLOTS)
    values[_W] = 1.0
    for slot, (t, v) in entries:
        params[slot], values[slot] = t, v
    return params, values


def _needs_dispatcher(tensors) -> bool:
    if dispatcher_required():
        return True
    return has_subclass(tensors) or (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                                     for t in tensors))


def _traced(tensors) -> bool:
    """Compiling, under a dispatch mode or transform, or given tensor subclasses: the custom op
    is needed."""
    return dispatcher_required() or has_subclass(tensors)


def _call_loss(kind, prediction, x, in1, in2, in3, params, values, backend) -> torch.Tensor:
    tensors = (x, in1, in2, in3, *params)
    # The weights travel as their own argument: autograd tracks tensors in a list only when
    # none of its entries is None.
    rest = [None if k == _W else t for k, t in enumerate(params)]
    args = (kind, prediction, x, in1, in2, in3, params[_W], rest, values, backend or "")
    if reference_required(tensors):  # torch.func's transforms, forward-mode AD
        forward_op.select(x.device.type, backend or None)  # (the backend asked for is checked as outside)
        return _transformed_loss(kind, prediction, x, in1, in2, in3, params, values)
    if _traced(tensors):
        return torch.ops.kdfast.diffusion_loss(*args)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        # Eager autograd: the same forward / backward as the custom op's, without the ~0.3 ms per
        # call that a Python custom op's dispatch costs on the CPU (as much as the kernels at
        # SD-latent sizes).
        return _EagerDiffusionLoss.apply(*args)[0]
    return _loss_forward(kind, prediction, x, in1, in2, in3, params, values, backend)[0]


# --------------------------------------------------------------------------- public entries


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, *, c: PerSample, weights: Optional[PerSample] = None,
                 elementwise: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Per-sample pseudo-Huber loss, float32 ``[batch]``.

    ``elementwise=False`` (iCT): ``w_b (sqrt(||x_b - y_b||^2 + c_b^2) - c_b)`` over the whole
    sample. ``elementwise=True`` (LCM): ``w_b mean_i (sqrt((x_bi - y_bi)^2 + c_b^2) - c_b)``.

    Args:
        x, y: ``[batch, ...]`` latents (float32/float16/bfloat16, dtypes may differ).
        c: ``>= 0``, a number or per-sample tensor (its values checked in eager mode on the CPU; on a
            device not, which would sync).
        weights: per-sample weights (number or ``[batch]`` tensor; differentiable).
        backend: force a backend (else ``KDFAST_BACKEND``, else the fastest usable).

    Differentiable with respect to x and y (``d/dy = -d/dx``; pass ``y.detach()`` for a
    stop-gradient target) and tensor weights; not ``c``.
    """
    x = _check_latent("x", x)
    y = _check_latent("y", y, x)
    batch = x.shape[0]
    params, values = _pack([(_W, _check_per_sample("weights", weights, batch, x.device, default=1.0)),
                            (_C, _check_per_sample("c", c, batch, x.device, minimum=0.0))])
    kind = PSEUDO_HUBER_ELEMENTWISE if check_flag("elementwise", elementwise) else PSEUDO_HUBER
    return _call_loss(kind, 0, x, y, None, None, params, values, backend)


def dmd(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, *, x_t: Optional[torch.Tensor] = None,
        weights: Optional[PerSample] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Per-sample DMD distribution-matching loss, float32 ``[batch]``.

    ``g_b = (x0_fake_b - x0_real_b) / mean_i |x_t,bi - x0_real,bi|``, injected on the generator
    output x as ``w_b 0.5 mean_i (x_bi - sg(x_bi - g_bi))^2``: the value is ``0.5 w_b mean(g^2)``
    and ``d/dx = w_b g / n`` (n elements per sample). ``x_t`` defaults to x itself, as in the
    DMD / DMD2 code; pass the noised generator output to normalise by it instead.

    NaN-safe: a sample whose normaliser is 0 or non-finite gets loss 0 and no gradient; an
    element whose ``g`` is non-finite (inf / NaN in the score predictions) gets gradient 0 and
    adds nothing to the loss (torch.nan_to_num in DMD2 would map inf to the largest float).

    Only x is differentiable (x0_real, x0_fake and x_t are stop-gradient by definition), and
    tensor weights. A second-order use (``create_graph=True``) sees the formula's Hessian on x,
    ``w_b I / n``.
    """
    x = _check_latent("x", x)
    x0_real = _check_latent("x0_real", x0_real, x)
    x0_fake = _check_latent("x0_fake", x0_fake, x)
    if x_t is not None:
        x_t = _check_latent("x_t", x_t, x)
    params, values = _pack([(_W, _check_per_sample("weights", weights, x.shape[0], x.device, default=1.0))])
    return _call_loss(DMD, 0, x, x0_real, x0_fake, x_t, params, values, backend)


def progressive_mse(pred: torch.Tensor, x_s: torch.Tensor, x_t: torch.Tensor, alpha_t: PerSample, sigma_t: PerSample,
                    alpha_s: PerSample, sigma_s: PerSample, *, prediction_type: str = "epsilon",
                    weights: Optional[PerSample] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Per-sample ``w_b mean_i (pred_bi - target_bi)^2``, float32 ``[batch]``, where ``target`` is
    :func:`pd_target` (computed on the fly, never stored). Differentiable with respect to pred
    (and tensor weights); the target is constant (teacher side)."""
    pred = _check_latent("pred", pred)
    x_s = _check_latent("x_s", x_s, pred, "pred")
    x_t = _check_latent("x_t", x_t, pred, "pred")
    prediction = _check_prediction_type(prediction_type)
    batch = pred.shape[0]
    sched = _schedule_params(batch, pred.device, alpha_t, sigma_t, alpha_s, sigma_s)
    _check_pd_schedule(sched)
    params, values = _pack([(_W, _check_per_sample("weights", weights, batch, pred.device, default=1.0)),
                            *zip((_AT, _ST, _AS, _SS), sched)])
    return _call_loss(PROGRESSIVE_MSE, prediction, pred, x_s, x_t, None, params, values, backend)


def sample_combination(combination: str, a: torch.Tensor, b: torch.Tensor, alpha_t: PerSample, sigma_t: PerSample,
                       alpha_s: PerSample, sigma_s: PerSample, *, prediction_type: str = "epsilon",
                       backend: Optional[str] = None) -> torch.Tensor:
    """``ca_b a + cb_b b`` with the per-sample coefficients of ``combination`` (see
    :func:`kdfast.reference.diffusion_losses.combination_coefficients`), in the promoted dtype of
    a and b. Differentiable with respect to a and b (not the schedule values)."""
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {', '.join(map(repr, COMBINATIONS))}, got {combination!r}")
    names = ("x_s", "x_t") if combination == "pd_target" else ("x_t", "model_output")
    a = _check_latent(names[0], a)
    b = _check_latent(names[1], b, a, names[0])
    prediction = _check_prediction_type(prediction_type)
    sched = _schedule_params(a.shape[0], a.device, alpha_t, sigma_t, alpha_s, sigma_s)
    if combination == "pd_target":
        _check_pd_schedule(sched)
    else:
        _check_ddim_schedule(sched, prediction_type)
    params, values = _pack(list(zip((_AT, _ST, _AS, _SS), sched)))
    args = (COMBINATIONS.index(combination), prediction, a, b, params, values)
    if reference_required((a, b, *params)):  # torch.func's transforms, forward-mode AD
        combination_op.select(a.device.type, backend or None)  # (the backend asked for is checked as outside)
        dtype = torch.promote_types(a.dtype, b.dtype)
        sched = (_param(params, values, k, a.shape[0], a.device).detach() for k in (_AT, _ST, _AS, _SS))
        compute = torch.float64 if dtype == torch.float64 else torch.float32  # as the kernels
        reference = ref.pd_target if combination == "pd_target" else ref.ddim_step
        return reference(a, b, *sched, prediction_type, compute).to(dtype)
    if _needs_dispatcher((a, b, *params)):
        return torch.ops.kdfast.sample_combination(*args, backend or "")
    return _sample_combination(*args, backend)


def pd_target(x_s: torch.Tensor, x_t: torch.Tensor, alpha_t: PerSample, sigma_t: PerSample, alpha_s: PerSample,
              sigma_s: PerSample, *, prediction_type: str = "epsilon", backend: Optional[str] = None) -> torch.Tensor:
    """Progressive-distillation target (Salimans & Ho 2022) of a student that jumps from
    ``x_t = alpha_t x0 + sigma_t eps`` to ``(alpha_s, sigma_s)`` in one DDIM step, where ``x_s`` is
    the teacher's result after two DDIM steps:
    ``x0 = (x_s - (sigma_s/sigma_t) x_t) / (alpha_s - (sigma_s/sigma_t) alpha_t)``, returned as the
    student's ``prediction_type`` (``"epsilon"``, ``"v_prediction"`` or ``"sample"``) at x_t."""
    return sample_combination("pd_target", x_s, x_t, alpha_t, sigma_t, alpha_s, sigma_s,
                              prediction_type=prediction_type, backend=backend)


def per_sample_ddim_step(x_t: torch.Tensor, model_output: torch.Tensor, alpha_t: PerSample, sigma_t: PerSample,
                         alpha_s: PerSample, sigma_s: PerSample, *, prediction_type: str = "epsilon",
                         backend: Optional[str] = None) -> torch.Tensor:
    """Deterministic DDIM step (eta = 0, no clipping) from ``(alpha_t, sigma_t)`` to
    ``(alpha_s, sigma_s)``, each a number or per-sample tensor: ``x_s = alpha_s x0 + sigma_s eps``
    with x0 and eps derived from the model output. For a batch sharing one timestep,
    :class:`kdfast.schedulers.DDIMScheduler` / :func:`kdfast.ops.solver_step` do the same."""
    return sample_combination("ddim_step", x_t, model_output, alpha_t, sigma_t, alpha_s, sigma_s,
                              prediction_type=prediction_type, backend=backend)


# --------------------------------------------------------------------------- kernel calls


def _kernel_inputs(kind, x, in1, in2, in3) -> List[Optional[torch.Tensor]]:
    """The kernel's in[0..2] (see diffusion_losses.h): DMD normalises by x_t (default x)."""
    if kind == DMD:
        return [x if in3 is None else in3, in1, in2]
    return [x, in1, in2]


def _inner(t: torch.Tensor) -> int:
    return t.numel() // t.shape[0] if t.shape[0] else max(1, math.prod(t.shape[1:]))


def _allocate_loss(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    batch = x.shape[0]
    return (torch.empty(batch, dtype=torch.float32, device=x.device),
            torch.empty((batch, 2), dtype=torch.float64, device=x.device))


def _loss_forward(kind, prediction, x, in1, in2, in3, params, values, backend=None):
    loss, aux = _allocate_loss(x)
    impl = forward_op.select(x.device.type, backend or None)  # (for an empty batch too: a bad backend is named)
    if x.shape[0] > 0:
        impl.run(kind, prediction, _kernel_inputs(kind, x, in1, in2, in3), params, values, loss, aux)
    return loss, aux


def _allocate_grads(x, in1, want_x: bool, want_in1: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    # both laid out as x (every input is: _check_latent), as the kernels write them
    def new(t, want):
        return empty_in_layout(x, t.dtype) if want else t.new_empty(0)

    return new(x, want_x), new(in1, want_in1)


def _loss_backward(kind, prediction, x, in1, in2, in3, params, values, aux, grad_loss, want_x, want_in1,
                   backend=None):
    gx, g1 = _allocate_grads(x, in1, want_x, want_in1)
    impl = backward_op.select(x.device.type, backend or None)
    if x.shape[0] > 0 and (want_x or want_in1):
        impl.run(kind, prediction, _kernel_inputs(kind, x, in1, in2, in3), params, values, aux,
                 grad_loss.to(torch.float32), gx if want_x else None, g1 if want_in1 else None)
    return gx, g1


def _allocate_combination(a, b) -> torch.Tensor:
    return empty_in_layout(a, torch.promote_types(a.dtype, b.dtype))


def _sample_combination(combination, prediction, a, b, params, values, backend=None) -> torch.Tensor:
    out = _allocate_combination(a, b)
    impl = combination_op.select(a.device.type, backend or None)
    if a.shape[0] > 0:
        impl.run(combination, prediction, [a, b, None], params, values, out)
    return out


# --------------------------------------------------------------------------- backends: reference


def _param(params, values, slot, batch, device):
    return params[slot] if params[slot] is not None else torch.full((batch,), values[slot], dtype=torch.float64,
                                                                       device=device)


def _ref_loss(kind, prediction, ins, params, values, weights=None, dtype=torch.float64):
    """The reference per-sample loss of kernel inputs ``ins`` (the kernel's slot layout)."""
    batch, device = ins[0].shape[0], ins[0].device
    p = [_param(params, values, k, batch, device) for k in range(len(SLOTS))]
    w = p[_W] if weights is None else weights
    if kind in (PSEUDO_HUBER, PSEUDO_HUBER_ELEMENTWISE):
        return ref.pseudo_huber(ins[0], ins[1], p[_C], w, kind == PSEUDO_HUBER_ELEMENTWISE, dtype)
    if kind == DMD:
        # ins[0] is x_t; the gradient with respect to x does not depend on x itself.
        return ref.dmd(ins[0], ins[1], ins[2], ins[0].detach(), w, dtype)
    return ref.progressive_mse(ins[0], ins[1], ins[2], p[_AT], p[_ST], p[_AS], p[_SS], PREDICTION_TYPES[prediction],
                               w, dtype)


def _transformed_loss(kind, prediction, x, in1, in2, in3, params, values) -> torch.Tensor:
    """The per-sample loss (float32) from torch's ops on the caller's inputs (x itself, not DMD's
    kernel slots): torch.func's transforms and forward-mode AD carry through it (vmap,
    per-sample gradients, tangents). Computed in float64: the kernels sum each sample in
    float64 and square without overflow, where float32 sums would reach inf sooner. As in the
    kernels, a zero weight gives 0 even for a sample whose loss is not finite; its gradient is
    the loss where finite, else 0, and the sample's inputs get gradient 0 (not 0 * NaN); ``c``
    and the schedule values are constants (no gradient, no tangent)."""
    batch, device, f64 = x.shape[0], x.device, torch.float64
    p = [_param(params, values, k, batch, device) for k in range(len(SLOTS))]
    p = [t if k == _W else t.detach() for k, t in enumerate(p)]
    # a zero-weight sample's inputs enter detached: where's backward selects, so no 0 * NaN (from
    # a NaN or inf in the sample) reaches their gradient
    zero = p[_W] == 0
    x, in1, in2, in3 = (t if t is None else torch.where(ref._column(zero, t), t.detach(), t)
                        for t in (x, in1, in2, in3))
    if kind in (PSEUDO_HUBER, PSEUDO_HUBER_ELEMENTWISE):
        raw = ref.pseudo_huber(x, in1, p[_C], None, kind == PSEUDO_HUBER_ELEMENTWISE, f64)
    elif kind == DMD:
        raw = ref.dmd(x, in1, in2, in3, None, f64)
    else:
        raw = ref.progressive_mse(x, in1, in2, p[_AT], p[_ST], p[_AS], p[_SS], PREDICTION_TYPES[prediction], None, f64)
    w = p[_W].to(f64)
    return (w * torch.where((w == 0) & ~torch.isfinite(raw), torch.zeros_like(raw), raw)).to(torch.float32)


@forward_op.register("reference")
def _forward_reference(kind, prediction, ins, params, values, loss, aux):
    batch, device = ins[0].shape[0], ins[0].device
    raw = _ref_loss(kind, prediction, ins, params, values, weights=torch.ones(batch, dtype=torch.float64,
                                                                              device=device))
    w = _param(params, values, _W, batch, device).double()
    loss.copy_(torch.where(w == 0, torch.zeros_like(raw), w * raw))
    aux[:, 0] = raw
    # The statistic the fused backward reads (the reference backward recomputes instead).
    if kind == PSEUDO_HUBER:
        c = _param(params, values, _C, batch, device).double()
        aux[:, 1] = torch.sqrt(ref._sample_sum((ins[0].double() - ins[1].double()) ** 2) + c * c)
    elif kind == DMD:
        norm = ref._sample_mean((ins[0].double() - ins[1].double()).abs())
        ok = torch.isfinite(norm) & (norm > 0)
        aux[:, 1] = torch.where(ok, 1 / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    else:
        aux[:, 1] = 0


@backward_op.register("reference")
def _backward_reference(kind, prediction, ins, params, values, aux, grad_loss, gx, g1):
    # Closed-form gradients of the reference losses (this runs inside a custom op, below
    # autograd, so torch.autograd cannot be used here); the tests check them against autograd.
    batch, device = ins[0].shape[0], ins[0].device
    n = _inner(ins[0])
    w = _param(params, values, _W, batch, device).double()
    k = torch.where(w == 0, torch.zeros_like(w), w * grad_loss.double())
    v0, v1 = ins[0].double(), ins[1].double()
    col = ref._column
    if kind == PSEUDO_HUBER:
        c = _param(params, values, _C, batch, device).double()
        d = v0 - v1
        r = torch.sqrt(ref._sample_sum(d * d) + c * c)
        factor = torch.where(r > 0, k / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(r))
        g = d * col(torch.where(torch.isnan(r), r, factor), d)  # a NaN in the sample: all NaN, as autograd
    elif kind == PSEUDO_HUBER_ELEMENTWISE:
        c = col(_param(params, values, _C, batch, device).double(), v0)
        d = v0 - v1
        h = torch.sqrt(d * d + c * c)
        slope = torch.where(h > 0, d / torch.where(h > 0, h, torch.ones_like(h)), torch.zeros_like(h))
        slope = torch.where(torch.isfinite(d), slope, d - d)  # NaN at an inf or NaN d, as the kernels
        g = slope * col(k / n, d)
    elif kind == DMD:
        # g from the forward's saved 1 / normaliser (x_t is not kept for the backward).
        d = ins[2].double() - v1
        g = torch.where(torch.isfinite(d), d, torch.zeros_like(d)) * col(aux[:, 1] * k / n, d)
    else:
        sched = [_param(params, values, j, batch, device) for j in (_AT, _ST, _AS, _SS)]
        target = ref.pd_target(ins[1], ins[2], *sched, PREDICTION_TYPES[prediction])
        g = (v0 - target) * col(2 * k / n, v0)
    g = torch.where(col(k, g) == 0, torch.zeros_like(g), g)  # zero weight: 0, even where the sample holds NaN
    if gx is not None:
        gx.copy_(g)
    if g1 is not None:
        g1.copy_(-g)


@combination_op.register("reference")
def _combination_reference(combination, prediction, ins, params, values, out):
    batch, device = ins[0].shape[0], ins[0].device
    sched = [_param(params, values, k, batch, device) for k in (_AT, _ST, _AS, _SS)]
    value = ref._combine(COMBINATIONS[combination], PREDICTION_TYPES[prediction], ins[0], ins[1], *sched,
                         torch.float64)
    out.copy_(value)


# --------------------------------------------------------------------------- backends: compiled


def _binding_args(kind, prediction, combination, ins, params, values) -> tuple:
    x = ins[0]
    batch, inner = x.shape[0], _inner(x)
    in_ptr, in_stride, in_dtype = [0, 0, 0], [0, 0, 0], [0, 0, 0]
    for i, t in enumerate(ins):
        if t is not None:
            in_ptr[i], in_stride[i], in_dtype[i] = t.data_ptr(), inner if t.is_contiguous() else t.stride(0), \
                DTYPE_CODES[t.dtype]
    p_ptr, p_stride, p_f64 = [0] * len(SLOTS), [0] * len(SLOTS), [0] * len(SLOTS)
    for k, t in enumerate(params):
        if t is not None:
            p_ptr[k], p_stride[k], p_f64[k] = t.data_ptr(), t.stride(0), int(t.dtype == torch.float64)
    return (kind, prediction, combination, batch, inner, in_ptr, in_stride, in_dtype, p_ptr, p_stride, p_f64,
            [float(v) for v in values])


def _grad_args(gx, g1):
    return ([0 if g is None else g.data_ptr() for g in (gx, g1)],
            [0 if g is None else DTYPE_CODES[g.dtype] for g in (gx, g1)])


@forward_op.register("cpu")
def _forward_cpu(kind, prediction, ins, params, values, loss, aux):
    module = _ext.cpu()[0]
    x = ins[0]
    workspace = torch.empty(module.diffusion_loss_workspace_doubles(x.shape[0], _inner(x)), dtype=torch.float64)
    module.diffusion_loss_forward(*_binding_args(kind, prediction, 0, ins, params, values), loss.data_ptr(),
                                  aux.data_ptr(), workspace.data_ptr(), torch.get_num_threads())


@forward_op.register("cuda")
def _forward_cuda(kind, prediction, ins, params, values, loss, aux):
    module = _ext.cuda()[0]
    x = ins[0]
    workspace = torch.empty(module.diffusion_loss_workspace_doubles(x.shape[0], _inner(x)), dtype=torch.float64,
                            device=x.device)
    with on_device(x):
        module.diffusion_loss_forward(*_binding_args(kind, prediction, 0, ins, params, values), loss.data_ptr(),
                                      aux.data_ptr(), workspace.data_ptr(), cuda_stream(x))


@backward_op.register("cpu")
def _backward_cpu(kind, prediction, ins, params, values, aux, grad_loss, gx, g1):
    _ext.cpu()[0].diffusion_loss_backward(*_binding_args(kind, prediction, 0, ins, params, values), aux.data_ptr(),
                                          grad_loss.data_ptr(), grad_loss.stride(0), *_grad_args(gx, g1),
                                          torch.get_num_threads())


@backward_op.register("cuda")
def _backward_cuda(kind, prediction, ins, params, values, aux, grad_loss, gx, g1):
    with on_device(ins[0]):
        _ext.cuda()[0].diffusion_loss_backward(*_binding_args(kind, prediction, 0, ins, params, values),
                                               aux.data_ptr(), grad_loss.data_ptr(), grad_loss.stride(0),
                                               *_grad_args(gx, g1), cuda_stream(ins[0]))


@combination_op.register("cpu")
def _combination_cpu(combination, prediction, ins, params, values, out):
    _ext.cpu()[0].sample_combination(*_binding_args(0, prediction, combination, ins, params, values), out.data_ptr(),
                                     DTYPE_CODES[out.dtype], torch.get_num_threads())


@combination_op.register("cuda")
def _combination_cuda(combination, prediction, ins, params, values, out):
    with on_device(ins[0]):
        _ext.cuda()[0].sample_combination(*_binding_args(0, prediction, combination, ins, params, values),
                                          out.data_ptr(), DTYPE_CODES[out.dtype], cuda_stream(ins[0]))


@forward_op.register("triton")
def _forward_triton(kind, prediction, ins, params, values, loss, aux):
    with on_device(ins[0]):
        _ext.triton()[0].diffusion_losses.forward(kind, prediction, ins, params, values, loss, aux)


@backward_op.register("triton")
def _backward_triton(kind, prediction, ins, params, values, aux, grad_loss, gx, g1):
    with on_device(ins[0]):
        _ext.triton()[0].diffusion_losses.backward(kind, prediction, ins, params, values, aux, grad_loss, gx, g1)


@combination_op.register("triton")
def _combination_triton(combination, prediction, ins, params, values, out):
    with on_device(ins[0]):
        _ext.triton()[0].diffusion_losses.combination(combination, prediction, ins, params, values, out)


# --------------------------------------------------------------------------- custom ops


def _checked_op_inputs(code_name: str, code: int, codes: Sequence[str], prediction: int, x, others, params, values):
    """What a direct ``torch.ops.kdfast`` call hands the kernels on trust, checked (the public
    functions check it on their own path): codes in range, latents of x's shape, dtype and
    device in x's layout, per-sample parameters ``[batch]`` float32/float64 on that
    device, one value per slot. Returns (x, others, params)."""
    if not 0 <= code < len(codes):
        raise ValueError(f"{code_name} must be in [0, {len(codes)}) ({', '.join(codes)}), got {code}")
    if not 0 <= prediction < len(PREDICTION_TYPES):
        raise ValueError(f"prediction must be in [0, {len(PREDICTION_TYPES)}), got {prediction}")
    x = op_layout(_check_latent("x", x))
    others = [None if t is None else _check_latent(f"input {i + 1}", t, x) for i, t in enumerate(others)]
    if len(params) != len(SLOTS) or len(values) != len(SLOTS):
        raise ValueError(f"params and values must hold {len(SLOTS)} entries ({', '.join(SLOTS)}), got "
                         f"{len(params)} and {len(values)}")
    for name, t in zip(SLOTS, params):
        if t is not None and (t.shape != (x.shape[0],) or t.dtype not in (torch.float32, torch.float64)
                              or t.device != x.device):
            raise ValueError(f"params[{name}] must be float32 or float64 of shape ({x.shape[0]},) on {x.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    return x, others, list(params)


def _check_loss_op_inputs(kind: int, in1, in2, params, values) -> None:
    """What a loss op's kind needs, for a direct call: its inputs (y / x0_real as in1; x0_fake
    or x_t as in2 for DMD and the progressive MSE) and host values the public functions accept
    (finite; c >= 0; a progressive schedule with a target)."""
    if in1 is None:
        raise ValueError(f"kind {KINDS[kind]} needs in1 ({'x0_real' if kind == DMD else 'y' if kind < DMD else 'x_s'})")
    if kind in (DMD, PROGRESSIVE_MSE) and in2 is None:
        raise ValueError(f"kind {KINDS[kind]} needs in2 ({'x0_fake' if kind == DMD else 'x_t'})")
    for name, t, v in zip(SLOTS, params, values):
        if t is None and not math.isfinite(v):
            raise ValueError(f"values[{name}] must be finite, got {v}")
    if kind in (PSEUDO_HUBER, PSEUDO_HUBER_ELEMENTWISE) and params[_C] is None and values[_C] < 0:
        raise ValueError(f"values[c] must be >= 0, got {values[_C]}")
    if kind == PROGRESSIVE_MSE:
        _check_pd_schedule(list(zip(params[_AT:], values[_AT:])))


@torch.library.custom_op("kdfast::diffusion_loss", mutates_args=())
def _diffusion_loss_op(kind: int, prediction: int, x: torch.Tensor, in1: Optional[torch.Tensor],
                       in2: Optional[torch.Tensor], in3: Optional[torch.Tensor], weights: Optional[torch.Tensor],
                       params: List[Optional[torch.Tensor]], values: List[float],
                       backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    params = _with_weights(params, weights)
    x, (in1, in2, in3), params = _checked_op_inputs("kind", kind, KINDS, prediction, x, (in1, in2, in3), params,
                                                    values)
    _check_loss_op_inputs(kind, in1, in2, params, values)
    return _loss_forward(kind, prediction, x, in1, in2, in3, params, values, backend)


@_diffusion_loss_op.register_fake
def _(kind, prediction, x, in1, in2, in3, weights, params, values, backend):
    return _allocate_loss(x)


def _with_weights(params, weights):
    params = list(params)
    params[_W] = weights
    return params


@torch.library.custom_op("kdfast::diffusion_loss_backward", mutates_args=())
def _diffusion_loss_backward_op(kind: int, prediction: int, x: torch.Tensor, in1: Optional[torch.Tensor],
                                in2: Optional[torch.Tensor], in3: Optional[torch.Tensor],
                                params: List[Optional[torch.Tensor]], values: List[float], aux: torch.Tensor,
                                grad_loss: torch.Tensor, want_x: bool, want_in1: bool,
                                backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    x, (in1, in2, in3), params = _checked_op_inputs("kind", kind, KINDS, prediction, x, (in1, in2, in3), params,
                                                    values)
    _check_loss_op_inputs(kind, in1, in2, params, values)
    if aux.shape != (x.shape[0], 2) or aux.dtype != torch.float64 or grad_loss.shape != (x.shape[0],):
        raise ValueError(f"aux must be float64 ({x.shape[0]}, 2) (the forward's second output) and grad_loss "
                         f"({x.shape[0]},), got {describe('aux', aux)} and {describe('grad_loss', grad_loss)}")
    if want_in1 and in1 is None:
        raise ValueError("want_in1 needs in1")
    return _loss_backward(kind, prediction, x, in1, in2, in3, params, values, aux.contiguous(), grad_loss, want_x,
                          want_in1, backend)


@_diffusion_loss_backward_op.register_fake
def _(kind, prediction, x, in1, in2, in3, params, values, aux, grad_loss, want_x, want_in1, backend):
    return _allocate_grads(op_layout(x), in1, want_x, want_in1)


def _loss_setup_context(ctx, inputs, output):
    kind, prediction, x, in1, in2, in3, weights, params, values, backend = inputs
    params = _with_weights(params, weights)
    ctx.args = (kind, prediction, list(values), backend)
    # Pseudo-Huber's y may need a gradient (consistency training without a stop-gradient);
    # DMD's and progressive distillation's other inputs are constants by definition.
    ctx.want_x = ctx.needs_input_grad[2]
    ctx.want_in1 = kind in (PSEUDO_HUBER, PSEUDO_HUBER_ELEMENTWISE) and ctx.needs_input_grad[3]
    ctx.want_weights = ctx.needs_input_grad[6]
    ctx.mark_non_differentiable(output[1])
    keep = ctx.want_x or ctx.want_in1
    # DMD's backward reads x0_real and x0_fake (x only for its shape; x_t not at all).
    ctx.save_for_backward(x if keep else None, in1 if keep else None, in2 if keep else None,
                          output[1], *params)


def _loss_backward_autograd(ctx, grad_loss, _grad_aux):
    kind, prediction, values, backend = ctx.args
    second_order = torch.is_grad_enabled() and not _traced((grad_loss,))
    if second_order and (kind != DMD or ctx.want_weights or grad_loss.requires_grad):
        # create_graph=True: the backward kernel's gradient has no graph of its own, so a
        # second-order use (a gradient penalty) would silently lose its own gradient. (DMD's
        # gradient is the constant g times the weights and the incoming gradient, plus the
        # Hessian term added below: nothing is lost unless those carry a graph.)
        raise RuntimeError(f"kdfast.{KINDS[kind]}: double backward (create_graph=True) is not supported; the "
                           f"gradient is computed by a kernel and is not differentiable")
    x, in1, in2, aux, *params = ctx.saved_tensors
    grad_x = grad_in1 = None
    if ctx.want_x or ctx.want_in1:
        backward = _loss_backward if getattr(ctx, "eager", False) else torch.ops.kdfast.diffusion_loss_backward
        gx, g1 = backward(kind, prediction, x.detach(), in1.detach(), None if in2 is None else in2.detach(), None,
                          [None if p is None else p.detach() for p in params], values, aux, grad_loss, ctx.want_x,
                          ctx.want_in1, backend)
        grad_x = gx if ctx.want_x else None
        grad_in1 = g1 if ctx.want_in1 else None
        if second_order and grad_x is not None:  # (DMD)
            grad_x = grad_x + _dmd_hessian_term(x, params[_W], values[_W], grad_loss)
    grad_weights = None
    if ctx.want_weights:
        # d(w L)/dw = L, but a zero weight masks its sample: 0 there, not a non-finite loss
        raw = aux[:, 0]
        masked = (params[_W] == 0) & ~torch.isfinite(raw)
        grad_weights = torch.where(masked, 0.0, grad_loss.double() * raw).to(params[_W].dtype)
    return None, None, grad_x, grad_in1, None, None, grad_weights, None, None, None


def _dmd_hessian_term(x: torch.Tensor, weights: Optional[torch.Tensor], weight: float,
                      grad_loss: torch.Tensor) -> torch.Tensor:
    """What DMD's gradient adds for a second-order use: ``0.5 w mean((x - sg(x - g))^2)`` has
    Hessian ``w I / n`` on x, so its gradient carries ``w (x - sg(x)) / n`` (0 in value, also
    where x is not finite, as the reference forms it)."""
    w = grad_loss.double() * (weight if weights is None else weights.double()) / math.prod(x.shape[1:])
    z = ref.zero_with_unit_derivative(x)
    return (z * w.view(-1, *([1] * (x.dim() - 1)))).to(x.dtype)


_diffusion_loss_op.register_autograd(_loss_backward_autograd, setup_context=_loss_setup_context)


class _EagerDiffusionLoss(torch.autograd.Function):
    """kdfast::diffusion_loss's autograd for plain eager tensors (same setup and backward)."""

    @staticmethod
    def forward(ctx, *inputs):  # (no separate setup_context: binding its arguments costs ~0.1 ms)
        output = _loss_forward(*inputs[:6], _with_weights(inputs[7], inputs[6]), *inputs[8:])
        ctx.eager = True
        _loss_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_loss, grad_aux):  # (refuses a double backward itself)
        return _loss_backward_autograd(ctx, grad_loss, grad_aux)


@torch.library.custom_op("kdfast::sample_combination", mutates_args=())
def _sample_combination_op(combination: int, prediction: int, a: torch.Tensor, b: torch.Tensor,
                           params: List[Optional[torch.Tensor]], values: List[float], backend: str) -> torch.Tensor:
    a, (b,), params = _checked_op_inputs("combination", combination, COMBINATIONS, prediction, a, (b,), params,
                                         values)
    if b is None:
        raise TypeError("b must be a tensor")
    return _sample_combination(combination, prediction, a, b, params, values, backend)


@_sample_combination_op.register_fake
def _(combination, prediction, a, b, params, values, backend):
    return _allocate_combination(op_layout(a), b)


def _combination_setup_context(ctx, inputs, output):
    combination, prediction, a, b, params, values, backend = inputs
    ctx.args = (combination, prediction, list(values))
    ctx.dtypes = (a.dtype, b.dtype)
    ctx.save_for_backward(*params)


def _combination_backward(ctx, grad_out):
    # Linear in a and b: the gradients are the coefficients times the incoming gradient.
    combination, prediction, values = ctx.args
    params = ctx.saved_tensors
    batch, device = grad_out.shape[0], grad_out.device
    sched = [_param(params, values, k, batch, device) for k in (_AT, _ST, _AS, _SS)]
    ca, cb = (ref.per_sample(v, batch, device) for v in ref.combination_coefficients(
        COMBINATIONS[combination], PREDICTION_TYPES[prediction], *(s.double() for s in sched)))
    shape = (-1,) + (1,) * (grad_out.dim() - 1)
    g = grad_out.double()
    grad_a = (g * ca.reshape(shape)).to(ctx.dtypes[0]) if ctx.needs_input_grad[2] else None
    grad_b = (g * cb.reshape(shape)).to(ctx.dtypes[1]) if ctx.needs_input_grad[3] else None
    return None, None, grad_a, grad_b, None, None, None


_sample_combination_op.register_autograd(_combination_backward, setup_context=_combination_setup_context)
