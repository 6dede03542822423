"""Diffusion-distillation losses, each one fused kernel pass (plus one for the backward).

Every loss is batched over samples sitting at different timesteps: per-sample constants
(pseudo-Huber's ``c``, the weights, the schedule's alphas and sigmas) are numbers or ``[batch]``
tensors on the latents' device, read by the kernels without a host sync.

- :func:`pseudo_huber_loss`: ``sqrt(||x - y||^2 + c^2) - c`` per sample (improved consistency
  training, Song & Dhariwal 2023), or per element (latent consistency models).
- :func:`dmd_loss`: the distribution-matching gradient of DMD / DMD2 injected on the generator
  output, NaN-safe.
- :func:`progressive_distillation_target` / :func:`progressive_distillation_loss`: the
  student's one-step target from two teacher DDIM steps (Salimans & Ho 2022) and a fused
  weighted MSE against it; :func:`progressive_distillation_teacher` runs the teacher's two
  DDIM steps at per-sample timesteps (:func:`ddim_step`), :func:`truncated_snr_weights` gives
  the paper's weighting.

Example (progressive distillation, student at half the teacher's number of steps)::

    import torch
    from kdfast.losses import diffusion as dl

    alphas_cumprod = scheduler.alphas_cumprod.to(device)   # e.g. kdfast.schedulers.DDIMScheduler
    step = 1000 // student_steps
    t = (torch.randint(1, student_steps + 1, (batch,), device=device) * step) - 1
    noise = torch.randn_like(x0)
    alpha_t, sigma_t = dl.alpha_sigma(alphas_cumprod, t)
    x_t = (alpha_t.view(-1, 1, 1, 1) * x0 + sigma_t.view(-1, 1, 1, 1) * noise).to(x0.dtype)  # alpha_sigma is float64
    x_s = dl.progressive_distillation_teacher(teacher, x_t, t, t - step // 2, t - step, alphas_cumprod,
                                              prediction_type="v_prediction")
    alpha_s, sigma_s = dl.alpha_sigma(alphas_cumprod, t - step)
    loss = dl.progressive_distillation_loss(
        student(x_t, t), x_s, x_t, alpha_t, sigma_t, alpha_s, sigma_s, prediction_type="v_prediction",
        weights=dl.truncated_snr_weights(alpha_t, sigma_t, "v_prediction"))
    loss.backward()

    # consistency training (iCT): pseudo-Huber between adjacent-timestep predictions
    loss = dl.pseudo_huber_loss(student(x_t1, t1), student_ema(x_t0, t0).detach(), weights=lam)
    # DMD2 generator loss
    loss = dl.dmd_loss(x, x0_real, x0_fake)
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch

from .._checks import check_flag
from ..ops import diffusion_losses as _ops
from ..ops._tensors import vmapped
from ..reference import diffusion_losses as _ref

REDUCTIONS = ("mean", "sum", "none")
PREDICTION_TYPES = _ops.PREDICTION_TYPES

PerSample = Union[float, torch.Tensor]


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        # (an empty batch gives 0, as the KD losses do, not the NaN of a mean of nothing)
        return losses.mean() if losses.numel() else losses.sum()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")


def pseudo_huber_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    c: Optional[PerSample] = None,
    weights: Optional[PerSample] = None,
    elementwise: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Pseudo-Huber loss between ``x`` and ``y`` (``[batch, ...]``), per sample then reduced.

    ``elementwise=False`` (iCT): ``w_b (sqrt(||x_b - y_b||^2 + c_b^2) - c_b)`` with the norm over
    the whole sample; ``c`` defaults to iCT's ``0.00054 sqrt(d)`` (d elements per sample).
    ``elementwise=True`` (LCM): ``w_b mean_i (sqrt((x_bi - y_bi)^2 + c_b^2) - c_b)``; ``c``
    defaults to LCM's 0.001. With ``reduction="mean"`` and no weights, this is diffusers' LCM
    training loss ``mean(sqrt((x - y)^2 + c^2) - c)``.

    Args:
        c: ``>= 0``: a number or per-sample tensor (e.g. a schedule of c over timesteps; its
            values are checked in eager mode on the CPU, not on a device, which would sync).
        weights: per-sample weights ``lambda(t)`` (number or ``[batch]`` tensor).
        reduction: ``"mean"`` over samples, ``"sum"``, or ``"none"`` (float32 ``[batch]``).

    Gradients flow to x, to y unless it is detached (consistency training usually stops the
    target's gradient), and to tensor weights.
    """
    _check_reduction(reduction)
    if c is None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError("x must have a batch dimension [batch, ...], got a 0-d tensor")
        c = 0.001 if check_flag("elementwise", elementwise) else 0.00054 * math.sqrt(math.prod(x.shape[1:]))
    return _reduce(_ops.pseudo_huber(x, y, c=c, weights=weights, elementwise=elementwise), reduction)


def dmd_loss(
    x: torch.Tensor,
    x0_real: torch.Tensor,
    x0_fake: torch.Tensor,
    x_t: Optional[torch.Tensor] = None,
    weights: Optional[PerSample] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Distribution-matching loss of DMD (Yin et al. 2024) / DMD2, on the generator output x.

    Per sample, ``g = (x0_fake - x0_real) / mean|x_t - x0_real|`` where ``x0_real`` / ``x0_fake``
    are the real (teacher) and fake score networks' x0 predictions at the noised generator output;
    the loss is ``0.5 mean_i (x_i - sg(x_i - g_i))^2`` (value ``0.5 mean(g^2)``, gradient
    ``g / n`` on x), times the sample's weight. ``reduction="mean"`` reproduces DMD2's
    ``0.5 * F.mse_loss(x, (x - grad).detach())`` (a mean over every element).

    ``x_t`` defaults to x itself, which is what the DMD / DMD2 code normalises by; pass the noised
    generator output to normalise by ``mean|x_t - x0_real|`` instead.

    NaN-safe: a sample with a zero or non-finite normaliser gets loss 0 and no gradient; elements
    whose ``g`` is inf / NaN get 0 (DMD2's ``torch.nan_to_num`` maps inf to the largest float).
    Only x (and tensor weights) get gradients. So an inf or NaN in ``x_t`` (an fp16 overflow of
    the generator, say) gives its sample loss 0, not the NaN of DMD2's code: ``GradScaler``
    does not see it in this loss; check ``torch.isfinite(x)`` where that matters.
    """
    _check_reduction(reduction)
    return _reduce(_ops.dmd(x, x0_real, x0_fake, x_t=x_t, weights=weights), reduction)


def progressive_distillation_target(
    x_s: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: PerSample,
    sigma_t: PerSample,
    alpha_s: PerSample,
    sigma_s: PerSample,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The student's target in progressive distillation (Salimans & Ho 2022, Algorithm 2).

    ``x_t = alpha_t x0 + sigma_t eps`` is the start latent and ``x_s`` the teacher's result after
    two DDIM steps, at ``(alpha_s, sigma_s)``. The target is the x0 from which one DDIM step
    lands on x_s, ``(x_s - (sigma_s/sigma_t) x_t) / (alpha_s - (sigma_s/sigma_t) alpha_t)``,
    returned as the student's ``prediction_type`` at x_t (``"epsilon"``, ``"v_prediction"``
    with ``v = alpha eps - sigma x0``, or ``"sample"``). Needs ``sigma_t > 0`` and distinct
    SNRs at t and s.
    """
    return _ops.pd_target(x_s, x_t, alpha_t, sigma_t, alpha_s, sigma_s, prediction_type=prediction_type)


def progressive_distillation_loss(
    pred: torch.Tensor,
    x_s: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: PerSample,
    sigma_t: PerSample,
    alpha_s: PerSample,
    sigma_s: PerSample,
    prediction_type: str = "epsilon",
    weights: Optional[PerSample] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Weighted MSE ``w_b mean_i (pred_bi - target_bi)^2`` between the student's prediction and
    :func:`progressive_distillation_target`, fused: the target is never stored. ``weights``
    e.g. :func:`truncated_snr_weights`. Gradients flow to pred (and tensor weights)."""
    _check_reduction(reduction)
    losses = _ops.progressive_mse(pred, x_s, x_t, alpha_t, sigma_t, alpha_s, sigma_s,
                                  prediction_type=prediction_type, weights=weights)
    return _reduce(losses, reduction)


def ddim_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    alpha_t: PerSample,
    sigma_t: PerSample,
    alpha_s: PerSample,
    sigma_s: PerSample,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Deterministic DDIM step (eta = 0, no clipping) ``x_s = alpha_s x0 + sigma_s eps`` with
    per-sample ``(alpha, sigma)`` at both ends; one fused pass.

    :class:`kdfast.schedulers.DDIMScheduler` (``kdfast.ops.solver_step``) takes one timestep for
    the whole batch; this is its per-sample counterpart for training, where every sample sits at
    its own timestep. For a batch that shares timesteps both give the same result
    (``DDIMScheduler(clip_sample=False)``).
    """
    return _ops.per_sample_ddim_step(x_t, model_output, alpha_t, sigma_t, alpha_s, sigma_s,
                                     prediction_type=prediction_type)


def alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                name: str = "timesteps") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(alpha, sigma) = (sqrt(abar_t), sqrt(1 - abar_t))`` (float64, on the table's
    device) of integer ``timesteps``; negative timesteps mean the clean end (1, 0), like
    diffusers' ``set_alpha_to_one``. No host sync (timesteps past the table are refused on the
    CPU at once, on a device by ``torch._assert_async``). ``name`` is the timesteps' in errors."""
    table = _real_tensor("alphas_cumprod", alphas_cumprod)
    if table.dim() != 1 or table.numel() == 0:
        raise ValueError(f"alphas_cumprod must be a 1-D table of at least one value, got shape {tuple(table.shape)}")
    table = table.to(torch.float64)
    timesteps = _as_tensor(name, timesteps)
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"{name} must be integers (indices of alphas_cumprod), got {timesteps.dtype}")
    # (int64 indices: torch takes uint8 ones as a mask and refuses int8 / int16 ones)
    timesteps = timesteps.to(table.device, torch.int64).reshape(-1)
    _check_below(name, timesteps, table.numel())
    abar = torch.where(timesteps >= 0, table[timesteps.clamp(min=0, max=table.numel() - 1)],
                       torch.ones_like(table[:1]))
    return abar.sqrt(), (1 - abar).clamp(min=0).sqrt()


def _per_sample_alpha_sigma(alphas_cumprod, timesteps, name: str, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`alpha_sigma` of one timestep or one per sample of a batch of ``batch``."""
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps, name)
    if alpha.numel() not in (1, batch):
        raise ValueError(f"{name} must hold one timestep or one per sample ({batch}), got {alpha.numel()}")
    return alpha, sigma


def _as_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a tensor (or a sequence of numbers), got {type(value).__name__}")
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a tensor (or a sequence of numbers), got {type(value).__name__}") from None


def _real_tensor(name: str, value) -> torch.Tensor:
    """``value`` as a floating-point tensor, or an error naming ``name`` (integers and bools
    would be a table of 0s and 1s)."""
    t = _as_tensor(name, value)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    return t


def _check_below(name: str, t: torch.Tensor, bound: int) -> None:
    """Refuse values of ``t`` >= ``bound``: on the CPU with a ValueError, on a device without a
    host sync (``torch._assert_async``); not under torch.func.vmap (no values to read)."""
    if t.device.type == "meta" or vmapped(t):
        return
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if t.numel() and bool((t >= bound).any()):
            raise ValueError(f"{name} must be below {bound} (the table's length), got {int(t.max())}")
    else:
        torch._assert_async(~(t >= bound).any(), f"{name} must be below {bound} (the table's length)")


def truncated_snr_weights(alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                          prediction_type: str = "epsilon") -> torch.Tensor:
    """Per-sample weights for :func:`progressive_distillation_loss` that make its MSE in the
    student's prediction space equal Salimans & Ho's truncated-SNR weighting
    ``max(alpha^2 / sigma^2, 1) ||x0 - x0_hat||^2``. ``sigma_t`` must be positive (the SNR of
    the clean end is infinite); checked on the CPU, on a device by ``torch._assert_async``."""
    alpha_t, sigma_t = _real_tensor("alpha_t", alpha_t).double(), _real_tensor("sigma_t", sigma_t).double()
    try:
        torch.broadcast_shapes(alpha_t.shape, sigma_t.shape)
    except RuntimeError:
        raise ValueError(f"alpha_t and sigma_t must have broadcastable shapes, got {tuple(alpha_t.shape)} and "
                         f"{tuple(sigma_t.shape)}") from None
    if sigma_t.device.type != "meta" and not vmapped(sigma_t):
        if sigma_t.device.type == "cpu" and not torch.compiler.is_compiling():
            if sigma_t.numel() and not bool((sigma_t > 0).all()):
                raise ValueError(f"sigma_t must be positive (the SNR at sigma 0 is infinite), got {sigma_t.tolist()}")
        else:
            torch._assert_async((sigma_t > 0).all(), "sigma_t must be positive (the SNR at sigma 0 is infinite)")
    # x0_hat = p0 x_t + q0 pred: an error e in the prediction is an error q0 e in x0.
    _, q0, _, _ = _ref.prediction_to_x0_eps(prediction_type, alpha_t, sigma_t)
    snr = alpha_t * alpha_t / (sigma_t * sigma_t)
    return torch.clamp(snr, min=1.0) * q0 * q0


def progressive_distillation_teacher(
    teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_mid: torch.Tensor,
    t_s: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The teacher's two deterministic DDIM steps ``t -> t_mid -> t_s`` at per-sample timesteps
    (``[batch]`` integer tensors; negative = the clean end), without gradients.
    ``teacher(x, timesteps)`` returns its prediction of type ``prediction_type``."""
    if not callable(teacher):
        raise TypeError(f"teacher must be callable as teacher(x, timesteps), got {type(teacher).__name__}")

    def predict(x, timesteps):
        out = teacher(x, timesteps)
        if not isinstance(out, torch.Tensor):  # (a diffusers model's output object, say)
            raise TypeError(f"teacher(x, timesteps) must return a torch.Tensor, got {type(out).__name__}")
        return out

    if not isinstance(x_t, torch.Tensor):
        raise TypeError(f"x_t must be a torch.Tensor, got {type(x_t).__name__}")
    if x_t.dim() == 0:
        raise ValueError("x_t must have a batch dimension [batch, ...], got a 0-d tensor")
    with torch.no_grad():
        # every schedule value before the teacher runs: a bad one is named, not found after a forward
        (a_t, s_t), (a_m, s_m), (a_s, s_s) = (
            _per_sample_alpha_sigma(alphas_cumprod, steps, name, x_t.shape[0])
            for name, steps in (("t", t), ("t_mid", t_mid), ("t_s", t_s)))
        x_mid = ddim_step(x_t, predict(x_t, t), a_t, s_t, a_m, s_m, prediction_type)
        return ddim_step(x_mid, predict(x_mid, t_mid), a_m, s_m, a_s, s_s, prediction_type)
