"""The samplers of Helios (long-video generation with a pyramid of resolutions), as drop-ins for
diffusers' ``HeliosScheduler`` and ``HeliosDMDScheduler``.

Both share diffusers' multi-stage schedule: ``stages`` stages of the flow, each with its own
timesteps (``timesteps_per_stage``) and sigmas running from 0.999 towards 0 (``sigmas_per_stage``);
``set_timesteps(n, stage_index, ...)`` picks one stage (or, with ``stages=1``, one flow-matching
schedule, optionally from custom ``sigmas``), resolution-shifted by ``mu`` with
``use_dynamic_shifting``. The schedule is replayed with diffusers' own numpy / torch operations on
the host, so timesteps and sigmas are equal to diffusers' bit for bit.

* :class:`HeliosScheduler` steps with UniPC (UniP predictor + UniC corrector, B(h) = h or
  e^h - 1) on these sigmas, or with Euler (``scheduler_type="euler"``). A UniPC step (model-output
  conversion, the correction of the incoming sample, the prediction of the next) is one fused
  :func:`kdfast.ops.solver_step` pass, as in :mod:`kdfast.schedulers.unipc_multistep`.
* :class:`HeliosDMDScheduler` steps a DMD-distilled student: ``x0 = x_t - sigma_t * v``, then
  ``(1 - sigma_next) * x0 + sigma_next * noise`` with the stage's start latent as ``noise``; one
  fused pass.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._checks import check_count, check_flag
from ..ops.solver_step import NUM_COEFS, SOURCES, fused_step
from ._config import register_to_config
from ._helpers import (NEW_OUTPUT, OUTPUTS, FlowShifts, FlowTimesteps, output_list, step_position, uni_c_arguments,
                       uni_p_arguments, unfused)
from ._linear import AUX, H0, H1, H2, MODEL, NOISE, X, X0, Lin
from ._schedule import (NUMBERS, PREDICTION_TYPES, alpha_sigma, check_choice, finite_number, is_integer_timestep,
                        x0_coefficients)
from .base import (CheckedPlan, CoefficientTable, FusedScheduler, GrowingTable, OutputFields, StepPlan,
                   convert_arguments, guidance_pair, promoted_sample, push_history)

HISTORY = (H0, H1, H2)
_F32, _F64 = torch.float32, torch.float64
# Where the sample output's coefficients of x0 and noise sit in a packed coefficient row
_ROW_X0_FROM_X, _ROW_X0_FROM_MODEL = 0, 1
_ROW_SAMPLE_X0, _ROW_SAMPLE_NOISE = 2 + SOURCES.index("x0"), 2 + SOURCES.index("noise")


# ---------------------------------------------------------------- outputs


class HeliosSchedulerOutput(OutputFields):
    """Like diffusers' HeliosSchedulerOutput: ``.prev_sample``, ``.model_outputs`` (always None, as
    diffusers returns it from ``step``), ``.last_sample`` and ``.this_order`` (UniPC steps only),
    ``out[0]``, ``out["prev_sample"]`` (and the rest of :class:`~kdfast.schedulers.base.OutputFields`)."""

    __slots__ = ("prev_sample", "model_outputs", "last_sample", "this_order")
    _fields = ("prev_sample", "model_outputs", "last_sample", "this_order")

    def __init__(self, prev_sample: torch.Tensor, model_outputs=None, last_sample: Optional[torch.Tensor] = None,
                 this_order: Optional[int] = None):
        self.prev_sample = prev_sample
        self.model_outputs = model_outputs
        self.last_sample = last_sample
        self.this_order = this_order

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prev_sample={self.prev_sample!r})"


class HeliosDMDSchedulerOutput(HeliosSchedulerOutput):
    """Like diffusers' HeliosDMDSchedulerOutput (its step sets ``prev_sample`` only)."""

    __slots__ = ()


# ---------------------------------------------------------------- argument checks


def _check_tensor(name: str, t, like: torch.Tensor) -> None:
    """``t`` is a floating tensor of ``like``'s shape and device (the step's sample), or an error naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of sample {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like sample, got {t.device}")


def _check_step_tensors(model_output, sample, cond=None) -> None:
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if not sample.is_floating_point():
        raise TypeError(f"sample must be a floating tensor, got {sample.dtype}")
    if sample.dim() == 0:
        raise ValueError("sample must have a batch dimension, got a 0-d tensor")
    _check_tensor("model_output", model_output, sample)
    if cond is not None:
        _check_tensor("cond", cond, sample)


def _promoted(*dtypes: torch.dtype) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


# ---------------------------------------------------------------- the schedule (diffusers' operations)


class _HeliosSchedule(FlowTimesteps, FlowShifts, FusedScheduler):
    """The multi-stage schedule both Helios schedulers share, computed with diffusers' numpy and
    torch operations, in its order, on the host."""

    order = 1
    _compatibles: Sequence[str] = ()
    _dmd_schedule = False  # HeliosDMDScheduler: one more step, whose last sigma is dropped

    def _check_schedule_config(self) -> None:
        cfg = self.config
        n_train = check_count("num_train_timesteps", cfg.num_train_timesteps, 2)
        if finite_number("shift", cfg.shift) <= 0:
            raise ValueError(f"shift must be > 0 (the sigmas are shift * s / (1 + (shift - 1) * s)), got {cfg.shift}")
        stages = check_count("stages", cfg.stages, 1)
        ranges = cfg.stage_range
        if not isinstance(ranges, (list, tuple)) or len(ranges) < stages + 1:
            raise ValueError(f"stage_range must be a list of (at least) stages + 1 = {stages + 1} boundaries in "
                             f"[0, 1], got {ranges!r}")
        bounds = [finite_number("stage_range entries", r) for r in ranges[:stages + 1]]  # (diffusers reads these)
        if any(not 0.0 <= r <= 1.0 for r in bounds) or any(b < a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"stage_range must ascend within [0, 1], got {ranges!r}")
        if any(int(r * n_train) >= n_train for r in bounds[:-1]):
            raise ValueError(f"stage_range: every stage must start below 1 (the last training sigma is at "
                             f"{(n_train - 1) / n_train:g}), got {ranges!r}")
        if finite_number("gamma", cfg.gamma) <= 0:
            raise ValueError(f"gamma must be > 0 (the start of each later stage is corrected by sqrt(1 + 1 / gamma)), "
                             f"got {cfg.gamma}")
        check_flag("use_flow_sigmas", cfg.use_flow_sigmas)
        check_flag("use_dynamic_shifting", cfg.use_dynamic_shifting)
        check_choice("time_shift_type", cfg.time_shift_type, ("exponential", "linear"))

    def init_sigmas(self) -> None:
        """The training sigmas and timesteps (diffusers': ``num_train_timesteps`` values from 1 - 1/N down)."""
        cfg = self.config
        n_train, shift = cfg.num_train_timesteps, cfg.shift
        alphas = np.linspace(1, 1 / n_train, n_train + 1)
        sigmas = 1.0 - alphas
        sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
        sigmas = torch.from_numpy(sigmas)
        self._step_index = None
        self._begin_index = None
        self.timesteps = (sigmas * n_train).clone()
        self.sigmas = sigmas

    def init_sigmas_for_each_stage(self) -> None:
        """Each stage's start and end sigmas, its share of the flow and its timesteps (diffusers')."""
        self.init_sigmas()
        cfg = self.config
        stages, n_train, stage_range = cfg.stages, cfg.num_train_timesteps, cfg.stage_range
        train_sigmas, train_timesteps = self._host_sigmas, self._host_timesteps
        distance = []
        for i in range(stages):
            start = max(int(stage_range[i] * n_train), 0)
            end = min(int(stage_range[i + 1] * n_train), n_train)
            start_sigma = train_sigmas[start]
            end_sigma = train_sigmas[end] if end < n_train else 0.0
            self.ori_start_sigmas[i] = start_sigma
            if i != 0:
                ori_sigma = 1 - start_sigma
                corrected = (1 / (math.sqrt(1 + (1 / cfg.gamma)) * (1 - ori_sigma) + ori_sigma)) * ori_sigma
                start_sigma = 1 - corrected
            distance.append(start_sigma - end_sigma)
            self.start_sigmas[i] = start_sigma
            self.end_sigmas[i] = end_sigma
        total = sum(distance)
        for i in range(stages):
            start_ratio = 0.0 if i == 0 else sum(distance[:i]) / total
            end_ratio = 0.9999999999999999 if i == stages - 1 else sum(distance[:i + 1]) / total
            self.timestep_ratios[i] = (start_ratio, end_ratio)
        for i in range(stages):
            ratio = self.timestep_ratios[i]
            t_max = min(train_timesteps[int(ratio[0] * n_train)], 999)
            t_min = train_timesteps[min(int(ratio[1] * n_train), n_train - 1)]
            self.timesteps_per_stage[i] = torch.from_numpy(np.linspace(t_max, t_min, n_train + 1)[:-1])
            self.sigmas_per_stage[i] = torch.from_numpy(np.linspace(0.999, 0, n_train + 1)[:-1])

    def _init_schedule(self) -> None:
        self._check_schedule_config()
        self.timestep_ratios: Dict[int, Tuple[float, float]] = {}
        self.timesteps_per_stage: Dict[int, torch.Tensor] = {}
        self.sigmas_per_stage: Dict[int, torch.Tensor] = {}
        self.start_sigmas: Dict[int, float] = {}
        self.end_sigmas: Dict[int, float] = {}
        self.ori_start_sigmas: Dict[int, float] = {}
        self.init_sigmas_for_each_stage()
        self.sigma_min = self._host_sigmas[-1]
        self.sigma_max = self._host_sigmas[0]
        self.gamma = self.config.gamma
        self.num_inference_steps: Optional[int] = None
        self._step_index = None
        self._begin_index = None

    # ---------------------------------------------------------------- sigmas

    @property
    def sigmas(self) -> torch.Tensor:
        """The schedule's sigmas (with the final 0). Assigning them (or editing them in place) makes
        the steps follow the new values, as in diffusers; they are read back once for that."""
        return self._sigmas

    @sigmas.setter
    def sigmas(self, sigmas) -> None:
        self._set_sigmas(sigmas)

    def _set_sigmas(self, sigmas, host: Optional[List[float]] = None) -> None:
        if not isinstance(sigmas, torch.Tensor):
            sigmas = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
        if sigmas.dim() != 1:
            raise ValueError(f"sigmas must be a 1-D tensor, got shape {tuple(sigmas.shape)}")
        self._sigmas = sigmas
        self._host_sigmas = (sigmas.detach().cpu().to(_F64).tolist() if host is None else host)
        self._sigmas_version = None if sigmas.is_inference() else sigmas._version
        self._schedule_changed()

    def _set_timesteps(self, timesteps, host=None) -> None:
        super()._set_timesteps(timesteps, host)
        self._schedule_changed()

    def _refresh_host_sigmas(self) -> None:
        """Read the sigmas back again if they were edited in place since their host copy was taken."""
        version = self._sigmas_version
        if version is not None and self._sigmas._version != version:
            self._set_sigmas(self._sigmas)

    def _schedule_changed(self) -> None:
        """The sigmas changed: forget what was planned from the old ones."""
        self._table = None

    # ---------------------------------------------------------------- set_timesteps

    def _is_dmd(self) -> bool:
        return self._dmd_schedule

    def set_timesteps(self, num_inference_steps: int, stage_index: Optional[int] = None,
                      device: Union[str, torch.device, None] = None, sigmas=None, mu: Optional[float] = None,
                      is_amplify_first_chunk: bool = False) -> None:
        """diffusers' schedule of ``num_inference_steps`` steps of stage ``stage_index`` (needed when
        ``stages > 1``), value for value, on ``device``; and every step's kernel coefficients.

        ``stages == 1``: ``num_inference_steps`` flow sigmas from 1 (shifted by ``shift``), or the
        custom ``sigmas`` (as given: a float64 array stays float64). ``stages > 1``: the stage's
        sigmas from 0.999 and its timesteps. ``mu``: the resolution shift, needed (and only used)
        with ``use_dynamic_shifting``. The DMD schedule (``HeliosDMDScheduler``, or
        ``scheduler_type="dmd"``) plans one more step (``2 n + 1`` with ``is_amplify_first_chunk``)
        and drops the last. Starts a new loop: history, ``step_index`` and ``begin_index`` reset.
        """
        cfg = self.config
        n = check_count("num_inference_steps", num_inference_steps, 1)
        check_flag("is_amplify_first_chunk", is_amplify_first_chunk)
        if cfg.stages > 1:
            if stage_index is None:
                raise ValueError(f"stage_index must be given (0 to {cfg.stages - 1}) when stages={cfg.stages}")
            stage = check_count("stage_index", stage_index, 0)
            if stage >= cfg.stages:
                raise ValueError(f"stage_index must be below stages={cfg.stages}, got {stage_index}")
            if sigmas is not None:
                raise ValueError(f"sigmas: custom sigmas are only used with stages=1 (diffusers ignores them with "
                                 f"stages={cfg.stages}); leave sigmas=None")
        if cfg.use_dynamic_shifting:
            if cfg.shift != 1.0:
                raise ValueError(f"use_dynamic_shifting=True needs shift=1.0 (diffusers asserts it), got "
                                 f"shift={cfg.shift}")
            if mu is None:
                raise ValueError("mu must be passed when use_dynamic_shifting=True")
            mu = finite_number("mu", mu)
        if self._is_dmd():
            n = n * 2 + 1 if is_amplify_first_chunk else n + 1
        n_train = cfg.num_train_timesteps

        if cfg.stages == 1:
            if sigmas is None:
                sig = np.linspace(1, 1 / n_train, n + 1)[:-1].astype(np.float32)
                if cfg.shift != 1.0:
                    sig = self.time_shift(cfg.shift, 1.0, sig)
            else:
                sig = sigmas.detach().cpu().numpy() if isinstance(sigmas, torch.Tensor) else np.array(sigmas)
                if not np.issubdtype(sig.dtype, np.floating):
                    sig = sig.astype(np.float64)
                if sig.ndim != 1 or sig.size < (2 if self._is_dmd() else 1) or not np.isfinite(sig).all():
                    raise ValueError(f"sigmas must be a 1-D sequence of finite values"
                                     f"{' (at least 2: the DMD schedule drops the last)' if self._is_dmd() else ''}, "
                                     f"got {sigmas!r}")
                sig = sig.copy()
            timesteps = (sig * n_train).copy()
            sig = torch.from_numpy(sig)
        else:
            stage_timesteps = self.timesteps_per_stage[stage]
            timesteps = np.linspace(stage_timesteps[0].item(), stage_timesteps[-1].item(), n)
            stage_sigmas = self.sigmas_per_stage[stage]
            sig = torch.from_numpy(np.linspace(stage_sigmas[0].item(), stage_sigmas[-1].item(), n))
        timesteps = torch.from_numpy(np.ascontiguousarray(timesteps))
        sig = torch.cat([sig, torch.zeros(1)])
        if self._is_dmd():
            timesteps = timesteps[:-1]
            sig = torch.cat([sig[:-2], sig[-1:]])
        if cfg.use_dynamic_shifting:
            sig = self.time_shift(mu, 1.0, sig)
            if cfg.stages == 1:
                timesteps = sig[:-1] * n_train
            else:
                per_stage = self.timesteps_per_stage[stage]
                timesteps = per_stage.min() + sig[:-1] * (per_stage.max() - per_stage.min())

        self.num_inference_steps = n
        host_sigmas = sig.to(_F64).tolist()
        self._set_timesteps(timesteps.to(device), timesteps.to(_F64).tolist())
        # (planned from the host copy, then moved: the table cache key reads the sigmas)
        self._set_sigmas(sig, host_sigmas)
        self._reset_history()
        self._plan_schedule()
        self._sigmas = sig.to(device)
        self._sigmas_version = None if self._sigmas.is_inference() else self._sigmas._version

    def _reset_history(self) -> None:
        self._step_index = None
        self._begin_index = None

    def reset_scheduler_history(self) -> None:
        """Start a new loop on the same schedule (diffusers' name)."""
        self._reset_history()

    def _plan_schedule(self) -> None:
        """Plan the steps of the schedule just set (subclasses)."""

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__} has no schedule: call set_timesteps(...) before step(...)")


# ---------------------------------------------------------------- HeliosScheduler


class HeliosScheduler(_HeliosSchedule):
    """Drop-in for ``diffusers.HeliosScheduler``: same arguments, config, attributes
    (``timesteps``, ``sigmas``, ``timesteps_per_stage``, ``sigmas_per_stage``, ``start_sigmas``,
    ``end_sigmas``, ``ori_start_sigmas``, ``timestep_ratios``, ``gamma``, ``sigma_min``,
    ``sigma_max``, ``model_outputs``, ``timestep_list``, ``lower_order_nums``, ``last_sample``,
    ``this_order``, ``step_index``) and step.

    ``scheduler_type="unipc"``: a step is diffusers' UniPC step on the stage's sigmas
    (``alpha = 1 - sigma``, ``sigma_t = max(sigma, 1e-8)`` with ``use_flow_sigmas``, else VP):
    the model output converted (x0 ``= x - sigma * v`` for ``flow_prediction``), the UniC
    correction of the incoming sample with the previous step's order (skipped at the first
    step and at the indices in ``disable_corrector``), and the UniP prediction of the next at
    ``min(solver_order, steps left (lower_order_final), steps taken + 1)``. All three are linear
    in the step's sources, so kdfast fuses them into one :func:`kdfast.ops.solver_step` pass:
    the previous uncorrected sample comes in as ``aux``; the prediction, the converted output
    (the history entry) and the corrected sample (``last_sample``) go out. The coefficients
    of every (step, predictor order, corrector order) are computed in float64 in
    ``set_timesteps``. ``scheduler_type="euler"``: ``x + (sigma_next - sigma) * v``, one pass.
    ``step_cfg`` fuses classifier-free guidance into the same pass.

    Numerics: float32 accumulation for every input dtype. diffusers' UniPC step multiplies a
    bfloat16 / float16 model output by a 0-d sigma in the output's own dtype before the float32
    sample is added (a 0-d tensor does not widen it), so with float32 latents and a 16-bit model,
    the Helios pipelines' setting, its steps carry one 16-bit rounding each (4e-4 per step in
    bfloat16, 1.5e-3 over a loop) that kdfast's do not. The converted output is kept in the
    wider of the sample's and the model output's dtypes, as diffusers' ``sample - sigma *
    model_output`` is, except that a float64 model output with a narrower sample is kept in
    float32 (the value agrees to ~1e-7). Outputs have diffusers' dtypes: the sample's for UniPC,
    the model output's for Euler (computed in float32 at least, rounded once).

    Deviations from diffusers, where it fails, gives NaN or is inconsistent:

    * The step starts at index 0 whatever ``begin_index`` says, exactly as diffusers' Helios
      step does (``set_begin_index`` is recorded, not used); ``timestep`` is only kept in
      ``timestep_list`` (UniPC) or checked for being an index (Euler, diffusers' error).
    * Unsupported settings are refused at construction with an error naming them. With
      ``scheduler_type="unipc"``: ``thresholding=True`` with ``predict_x0=True`` (diffusers' step
      fails: the class has no ``_threshold_sample``; with ``predict_x0=False`` it is ignored, as
      there), ``solver_p`` (not used by Helios' pipelines), ``solver_order``
      above 3 (the fused kernel holds three history entries), ``prediction_type="flow_prediction"``
      with ``predict_x0=False`` (diffusers' step raises). Always: unknown ``scheduler_type``,
      ``solver_type`` (other than diffusers' aliases of bh2), ``prediction_type`` and
      ``time_shift_type``, and a schedule diffusers cannot build (``stages``, ``stage_range``,
      ``gamma``, ``shift``). ``set_timesteps`` refuses a missing or out-of-range ``stage_index``
      (diffusers: KeyError), custom ``sigmas`` with ``stages > 1`` (diffusers ignores them), a
      missing ``mu`` with ``use_dynamic_shifting`` and that option with ``shift != 1`` (diffusers:
      TypeError, AssertionError). Custom ``sigmas`` may be a list or a tensor as well as the
      numpy array diffusers needs (a float64 array, as the pipeline passes, keeps its dtype).
    * A step whose coefficients are not finite (diffusers returns NaN or inf there: UniPC of
      order 3 from a schedule starting at sigma = 1, ``prediction_type="epsilon"`` at sigma = 1,
      higher orders into a VP sigma of 0 without ``lower_order_final``) raises a ValueError.
      A first-order step whose ``B(h)`` is infinite (``solver_type="bh1"`` from sigma = 1 or into
      a VP sigma of 0) gives the update's finite limit (diffusers multiplies ``inf * 0``: NaN).
    * A step past the end of the schedule raises an IndexError (diffusers: an IndexError or an
      AssertionError); stepping before ``set_timesteps`` a ValueError (diffusers: AttributeError).
    * ``step_unipc``/``step_euler`` take diffusers' default arguments only (the custom sigmas,
      histories and orders are refused); ``multistep_uni_p_bh_update`` / ``..._c_...`` are not
      provided (the fused step replaces them).
    """

    _diffusers_name = "HeliosScheduler"
    _steps_in_the_wider_dtype = False  # (diffusers' steps return the sample's dtype)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        stages: int = 3,
        stage_range: list = [0, 1 / 3, 2 / 3, 1],  # noqa: B006 - diffusers' default, never mutated
        gamma: float = 1 / 3,
        thresholding: bool = False,
        prediction_type: str = "flow_prediction",
        solver_order: int = 2,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list = [],  # noqa: B006 - diffusers' default, never mutated
        solver_p=None,
        use_flow_sigmas: bool = True,
        scheduler_type: str = "unipc",
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        if solver_type in ("midpoint", "heun", "logrho"):  # other solvers' names, mapped as diffusers does
            self.register_to_config(solver_type="bh2")
        else:
            check_choice("solver_type", solver_type, ("bh1", "bh2"))
        check_choice("scheduler_type", scheduler_type, ("unipc", "euler", "dmd"))
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_flag("thresholding", thresholding)
        check_flag("predict_x0", predict_x0)
        check_flag("lower_order_final", lower_order_final)
        check_count("solver_order", solver_order, 1)
        if scheduler_type == "unipc":  # (the UniPC options: diffusers' Euler and DMD paths ignore them)
            if solver_order > 3:
                raise ValueError(f"solver_order must be 1, 2 or 3 (the fused step holds 3 history entries), got "
                                 f"{solver_order!r}")
            if thresholding and predict_x0:  # (with predict_x0=False diffusers' UniPC step ignores it, as here)
                raise ValueError("thresholding=True is not supported with predict_x0=True: diffusers' HeliosScheduler "
                                 "has no dynamic thresholding (its UniPC step fails with an AttributeError)")
            if solver_p is not None:
                raise ValueError("solver_p is not supported by kdfast's HeliosScheduler (Helios' pipelines do not "
                                 "use it); leave solver_p=None")
            if not predict_x0 and prediction_type == "flow_prediction":
                raise ValueError("prediction_type='flow_prediction' needs predict_x0=True (diffusers' step raises)")
        if not isinstance(disable_corrector, (list, tuple)) or any(
                isinstance(k, bool) or not isinstance(k, (int, np.integer)) for k in disable_corrector):
            raise ValueError(f"disable_corrector must be a list of step indices, got {disable_corrector!r}")
        self._init_schedule()
        self.predict_x0 = predict_x0
        self._reset_history()  # (model_outputs, timestep_list, disable_corrector, solver_p, last_sample, ...)

    def _reset_history(self) -> None:
        super()._reset_history()
        order = self.config.solver_order
        self.model_outputs: List[Optional[torch.Tensor]] = [None] * order
        self.timestep_list: List = [None] * order
        self.lower_order_nums = 0
        self.disable_corrector = list(self.config.disable_corrector)
        self.solver_p = self.config.solver_p
        self.last_sample: Optional[torch.Tensor] = None
        self.this_order: Optional[int] = None

    def _is_dmd(self) -> bool:
        return self.config.scheduler_type == "dmd"

    # ---------------------------------------------------------------- coefficients

    def _plan_schedule(self) -> None:
        self._table = self._shared_table(self._build_table)

    def _schedule_changed(self) -> None:
        self._table = None  # (rebuilt from the new host sigmas on the next step)

    def _ensure_table(self) -> CoefficientTable:
        if self._table is None:  # (sigmas assigned since set_timesteps: planned from their host copy)
            self._table = self._build_table()
        return self._table

    def _build_table(self) -> CoefficientTable:
        sigmas = self._host_sigmas
        if len(sigmas) < 2:
            raise ValueError("the schedule has no step (sigmas needs at least 2 values)")
        plans = {("euler", i): self._euler_plan(i) for i in range(len(sigmas) - 1)}  # (step_euler takes any type)
        if self.config.scheduler_type == "unipc":
            plans.update(self._unipc_plans())
        return CoefficientTable(plans)

    def _euler_plan(self, i: int) -> StepPlan:
        s, s_next = self._host_sigmas[i], self._host_sigmas[i + 1]
        if self._sigmas.dtype == _F32:  # (sigma_next - sigma on diffusers' float32 tensors)
            dt = float(np.float32(s_next) - np.float32(s))
        else:
            dt = s_next - s
        return StepPlan(x0=(0.0, 1.0), sample=X + dt * MODEL)

    def _alpha_sigma(self, sigma: float) -> Tuple[np.float64, np.float64]:
        """diffusers' ``_sigma_to_alpha_sigma_t``: flow ``(1 - sigma, max(sigma, 1e-8))``, else VP."""
        if self.config.use_flow_sigmas:
            floor = float(np.float32(1e-8)) if self._sigmas.dtype == _F32 else 1e-8  # (clamp(min=1e-8) in dtype)
            return np.float64(1.0 - sigma), np.float64(max(sigma, floor))
        a, s = alpha_sigma(sigma, False)
        return np.float64(a), np.float64(s)

    def _log_snr(self, sigma: float) -> np.float64:
        a, s = self._alpha_sigma(sigma)
        return np.log(a) - np.log(s)  # (-inf at sigma = 1 with flow sigmas, +inf into a VP sigma of 0)

    def _model_quantity(self, i: int) -> Tuple[Lin, Tuple[float, float]]:
        """(what the solver keeps at step i, x0 coefficients): diffusers' ``convert_model_output``."""
        cfg = self.config
        sigma = self._host_sigmas[i]
        a, s = (float(v) for v in self._alpha_sigma(sigma))
        kind = cfg.prediction_type
        if not self.predict_x0:
            if kind == "epsilon":
                return MODEL, (0.0, 0.0)
            if kind == "sample":
                return (X - a * MODEL) * (1.0 / s if s else math.inf), (0.0, 0.0)
            return a * MODEL + s * X, (0.0, 0.0)  # v_prediction
        if kind == "flow_prediction":
            return X0, (1.0, -sigma)  # (diffusers: x - sigma * v with the schedule's raw sigma)
        if kind == "epsilon" and a == 0.0:
            return X0, (math.inf, -math.inf)  # (x - sigma * eps) / 0: inf in diffusers too
        return X0, x0_coefficients(kind, a, s)

    def _uni_update(self, t: int, s0: int, prev: Sequence[int], m0: Lin, ms: Sequence[Lin],
                    model_t: Optional[Lin], ends: Optional[Tuple[float, float]] = None) -> Tuple[float, Lin]:
        """diffusers' ``multistep_uni_p_bh_update`` (``model_t`` None) or ``multistep_uni_c_bh_update``
        from ``sigmas[s0]`` to ``sigmas[t]`` as ``(c, rest)``: update = c * start + rest, where start
        is the sample the update starts from, ``m0`` the model quantity at s0, ``ms`` the older ones
        at ``sigmas[prev]`` (Python indexing, as diffusers' tensor indexing), ``model_t`` the
        corrector's new model quantity.

        The formulas of :meth:`UniPCMultistepScheduler._uni_bh
        <kdfast.schedulers.unipc_multistep.UniPCMultistepScheduler._uni_bh>` (which cannot serve:
        it takes unclamped flow sigmas and refuses every infinite log-SNR), in IEEE float64 as
        diffusers evaluates them: a schedule starting at sigma = 1 has log-SNR -inf there, and
        diffusers' updates through it are finite (``D1 = (m - m0) / -inf = 0``; the solve of the
        R system pivots the infinite row away). Coefficients come out inf or NaN exactly where
        diffusers' tensors do; the plan is then refused (see :meth:`_unipc_plans`). ``ends``
        replaces ``(sigmas[t], sigmas[s0])`` (diffusers' helpers take them as arguments).
        """
        cfg = self.config
        sigmas = self._host_sigmas
        sigma_t, sigma_0 = (sigmas[t], sigmas[s0]) if ends is None else ends
        with np.errstate(all="ignore"):
            a_t, s_t = self._alpha_sigma(sigma_t)
            a_0, s_0 = self._alpha_sigma(sigma_0)
            lam_0 = np.log(a_0) - np.log(s_0)
            h = np.log(a_t) - np.log(s_t) - lam_0
            order = len(ms) + 1
            rks = [(self._log_snr(sigmas[k]) - lam_0) / h for k in prev] + [np.float64(1.0)]
            hh = -h if self.predict_x0 else h
            h_phi_1 = np.expm1(hh)  # h * phi_1(h) = e^h - 1
            h_phi_k = h_phi_1 / hh - 1
            B_h = hh if cfg.solver_type == "bh1" else np.expm1(hh)
            b, fact = [], 1
            for k in range(1, order + 1):
                b.append(h_phi_k * fact / B_h)
                fact *= k + 1
                h_phi_k = h_phi_k / hh - 1 / fact
            if model_t is None:  # UniP: the last row and column belong to the corrector's own term
                rhos = [] if order == 1 else [np.float64(0.5)] if order == 2 else self._solve(rks[:-1], b[:-1])
            else:
                rhos = [np.float64(0.5)] if order == 1 else self._solve(rks, b)
            scale = a_t if self.predict_x0 else s_t
            c = s_t / s_0 if self.predict_x0 else a_t / a_0
            rest = -float(scale * h_phi_1) * m0
            # D1_k = (m_k - m0) / r_k, summed with rhos, times -scale * B(h). (diffusers' order-1
            # predictor adds -scale * B(h) * 0, NaN where B(h) is infinite; the limit is left out.)
            for k, m in enumerate(ms):
                rest = rest - float(scale * B_h * rhos[k] * (1 / rks[k])) * (m - m0)
            if model_t is not None:
                rest = rest - float(scale * B_h * rhos[-1]) * (model_t - m0)
        return float(c), rest

    @staticmethod
    def _solve(rks: Sequence[np.float64], b: Sequence[np.float64]) -> List[np.float64]:
        """diffusers' ``torch.linalg.solve(R, b)`` with ``R[k] = rks ** k`` (LAPACK's pivoted LU, as
        torch's); NaN where it is singular."""
        R = np.array([[r ** k for r in rks] for k in range(len(rks))], dtype=np.float64)
        try:
            with np.errstate(all="ignore"):
                return list(np.linalg.solve(R, np.array(b, dtype=np.float64)))
        except np.linalg.LinAlgError:
            return [np.float64(math.nan)] * len(rks)

    def _unipc_plans(self) -> Dict[Tuple[int, int, int], StepPlan]:
        """Plans keyed (step index, predictor order, corrector order or 0 when it is skipped), for
        every combination a loop (or history set from outside) can select. Each corrector and
        predictor is planned once; their combinations are the corrected sample fed to the
        prediction. Plans whose coefficients are not finite carry the reason they are refused."""
        order = self.config.solver_order
        sigmas = self._host_sigmas
        plans = {}
        for i in range(len(sigmas) - 1):
            q, x0 = self._model_quantity(i)
            correctors: Dict[int, Optional[Lin]] = {0: None}
            if i > 0:  # diffusers never corrects at the first step
                for c in range(1, order + 1):
                    cc, rest = self._uni_update(i, i - 1, [i - 1 - k for k in range(1, c)], H0, list(HISTORY[1:c]), q)
                    correctors[c] = cc * AUX + rest
            for p in range(1, order + 1):
                pc, prest = self._uni_update(i + 1, i, [i - k for k in range(1, p)], q, list(HISTORY[:p - 1]), None)
                for c, corrected in correctors.items():
                    start = X if corrected is None else corrected
                    plan = StepPlan(x0=x0, sample=pc * start + prest, history=q, aux=corrected)
                    plans[(i, p, c)] = CheckedPlan.of(plan, self._undefined(i, p, c))
        return plans

    def _undefined(self, i: int, p: int, c: int):
        def error() -> str:
            cfg = self.config
            return (f"step {i}: the UniPC update (predictor order {p}, corrector order {c}, {cfg.solver_type}, "
                    f"prediction_type={cfg.prediction_type!r}) from sigma {self._host_sigmas[i]:g} to "
                    f"{self._host_sigmas[i + 1]:g} is not finite (diffusers' step returns NaN or inf here); use "
                    "solver_order <= 2, solver_type='bh2', lower_order_final=True, or sigmas below 1")
        return error

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep=None, sample: torch.Tensor = None,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """diffusers' ``step`` (same positional order): one fused kernel pass.

        Returns a :class:`HeliosSchedulerOutput`; with ``return_dict=False`` diffusers' tuples:
        ``(prev_sample, None, last_sample, this_order)`` for UniPC, ``(prev_sample,)`` for Euler.
        ``generator`` is accepted and unused (both solvers are deterministic)."""
        return self._step(model_output, timestep, sample, None, 1.0, return_dict)

    def step_cfg(self, uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, timestep=None,
                 sample: torch.Tensor = None, generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """``step`` with classifier-free guidance fused into the same kernel pass:
        ``model_output = uncond + guidance_scale * (cond - uncond)``."""
        guidance_scale = finite_number("guidance_scale", guidance_scale)
        uncond, cond = guidance_pair(uncond, cond)  # (one dtype, the wider: diffusers' guided output's)
        return self._step(uncond, timestep, sample, cond, guidance_scale, return_dict)

    _UNIPC_CUSTOM = ("model_outputs", "timestep_list", "sigma_before", "sigma", "sigma_next", "cus_step_index",
                     "cus_lower_order_num", "cus_this_order", "cus_last_sample")

    def step_unipc(self, model_output: torch.Tensor, timestep=None, sample: torch.Tensor = None,
                   return_dict: bool = True, **custom):
        """diffusers' UniPC step (``scheduler_type="unipc"``) with its default arguments: the custom
        histories, sigmas, orders and last sample it also takes are not supported."""
        self._refuse_custom("step_unipc", custom, self._UNIPC_CUSTOM)
        if self.config.scheduler_type != "unipc":
            raise ValueError(f"step_unipc needs scheduler_type='unipc', got {self.config.scheduler_type!r}")
        return self._unipc_step(model_output, timestep, sample, None, 1.0, return_dict)

    def step_euler(self, model_output: torch.Tensor, timestep=None, sample: torch.Tensor = None,
                   generator: Optional[torch.Generator] = None, return_dict: bool = True, **custom):
        """diffusers' Euler step with its default arguments (custom ``sigma``/``sigma_next`` are not
        supported); like diffusers', it runs whatever ``scheduler_type`` says."""
        self._refuse_custom("step_euler", custom, ("sigma", "sigma_next"))
        return self._euler_step(model_output, timestep, sample, None, 1.0, return_dict)

    @staticmethod
    def _refuse_custom(name: str, custom: dict, known: Sequence[str]) -> None:
        unknown = [k for k in custom if k not in known]
        if unknown:
            raise TypeError(f"{name}() got an unexpected keyword argument {unknown[0]!r}")
        given = [k for k, v in custom.items() if v is not None]
        if given:
            raise NotImplementedError(f"{name}: {', '.join(given)} not supported by kdfast's HeliosScheduler (its "
                                      "pipelines do not pass them); call step(model_output, timestep, sample)")

    def _step(self, model_output, timestep, sample, cond, guidance_scale, return_dict=True):
        kind = self.config.scheduler_type
        if kind == "unipc":
            return self._unipc_step(model_output, timestep, sample, cond, guidance_scale, return_dict)
        if kind == "euler":
            return self._euler_step(model_output, timestep, sample, cond, guidance_scale, return_dict)
        raise NotImplementedError("HeliosScheduler with scheduler_type='dmd' sets the DMD schedule but has no step "
                                  "(as in diffusers); use HeliosDMDScheduler")

    def _index(self, what: str) -> int:
        """The step about to run: diffusers' Helios steps start at 0 whatever begin_index says."""
        self._require_timesteps()
        i = 0 if self._step_index is None else self._step_index
        if i >= len(self._host_sigmas) - 1:
            raise IndexError(f"{what}: step {i} is past the end of the {len(self._host_sigmas) - 1}-step schedule; "
                             "call set_timesteps again")
        return i

    def _euler_step(self, model_output, timestep, sample, cond, guidance_scale, return_dict):
        if is_integer_timestep(timestep):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "HeliosScheduler.step() is not supported. Make sure to pass one of the "
                             "`scheduler.timesteps` as a timestep.")
        _check_step_tensors(model_output, sample, cond)
        self._refresh_host_sigmas()
        i = self._index("step")
        out_dtype = model_output.dtype if cond is None else _promoted(model_output.dtype, cond.dtype)
        if sample.dtype != out_dtype:
            # diffusers computes in float32 at least and rounds once, to the output's dtype: the
            # kernel writes the wider of the two (float32 for a bfloat16 / float16 pair), cast below
            sample = sample.to(_promoted(sample.dtype, out_dtype))
        table = self._ensure_table()
        prev = self._fused(("euler", i), sample, model_output, cond=cond, guidance_scale=guidance_scale,
                           table=table).sample
        if prev.dtype != out_dtype:
            prev = prev.to(out_dtype)
        self._step_index = i + 1
        out = HeliosSchedulerOutput(prev)
        return out if return_dict else (prev,)

    def _unipc_step(self, model_output, timestep, sample, cond, guidance_scale, return_dict):
        # Runs once per model call: few helper calls (each costs 0.1-0.5 us; the kernel ~10 us).
        _check_step_tensors(model_output, sample, cond)
        self._refresh_host_sigmas()
        self._refresh_host_timesteps()
        i = self._index("step")
        cfg = self.config
        order = cfg.solver_order
        c = 0
        if i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None:
            if self.this_order is None:
                raise ValueError("last_sample is set but this_order is not: set both to resume a UniPC loop")
            c = self.this_order
            if self.last_sample.shape != sample.shape:
                raise ValueError(f"last_sample {tuple(self.last_sample.shape)} (the previous step's sample) does not "
                                 f"match sample {tuple(sample.shape)}: call set_timesteps before a new loop")
        n = len(self._host_timesteps)
        this_order = min(order, n - i) if cfg.lower_order_final else order
        this_order = min(this_order, self.lower_order_nums + 1)  # warm-up of the multistep history
        if this_order < 1:
            raise IndexError(f"step {i}: the schedule has {n} timesteps; call set_timesteps again")
        table = self._ensure_table()
        key = (i, this_order, c)
        self._raise_if_undefined(key)
        depth = c if c > this_order - 1 else this_order - 1
        outputs = self.model_outputs
        history = outputs[:-1 - depth:-1]  # the newest `depth` entries, newest first
        if len(history) < depth or any(h is None for h in history):
            raise ValueError(f"step {i}: model_outputs is missing entries this step needs ({depth})")
        dtypes = [sample.dtype, model_output.dtype] + ([] if cond is None else [cond.dtype])
        history_dtype = _promoted(*dtypes)  # (diffusers' x - sigma * v: the wider dtype)
        if history_dtype == _F64 and sample.dtype != _F64:
            history_dtype = _F32
        result = self._fused(key, sample, model_output, cond=cond, guidance_scale=guidance_scale, history=history,
                             aux=self.last_sample if c else None, write_history=True, write_aux=c > 0,
                             history_dtype=history_dtype, table=table)
        push_history(outputs, result.history, order)
        push_history(self.timestep_list, timestep, order)
        self.this_order = this_order
        self.last_sample = result.aux if c else sample
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index = i + 1
        prev = result.sample
        if not return_dict:
            return (prev, None, self.last_sample, this_order)
        return HeliosSchedulerOutput(prev, None, self.last_sample, this_order)

    def _raise_if_undefined(self, key) -> None:
        error = getattr(self._table.plan(key), "error", None)
        if error is not None:
            raise ValueError(error)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None,
                             sigma=None, **kwargs) -> torch.Tensor:
        """diffusers' ``convert_model_output`` at the current step: x0 (``predict_x0``) or epsilon,
        one fused pass. A custom ``sigma`` is not supported."""
        if sigma is not None:
            raise NotImplementedError("convert_model_output: a custom sigma is not supported; it converts at the "
                                      "current step_index")
        sample = convert_arguments(args, kwargs, sample)
        if self.config.scheduler_type != "unipc":
            raise ValueError("convert_model_output belongs to the UniPC solver (scheduler_type='unipc')")
        if self._step_index is None:
            raise ValueError("convert_model_output needs a step index: call step() first")
        _check_step_tensors(model_output, sample)
        i = self._index("convert_model_output")
        table = self._ensure_table()
        history_dtype = _promoted(sample.dtype, model_output.dtype)
        if history_dtype == _F64 and sample.dtype != _F64:
            history_dtype = _F32
        return self._fused((i, 1, 0), sample, model_output, write_history=True, history_dtype=history_dtype,
                           table=table).history

    # ---------------------------------------------------------------- diffusers' helpers

    def multistep_uni_p_bh_update(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None,
                                  order: int = None, sigma: torch.Tensor = None, sigma_next: torch.Tensor = None,
                                  **kwargs) -> torch.Tensor:
        """diffusers' UniP predictor of ``order`` from ``sample`` at the current step (from
        ``sigma`` to ``sigma_next`` when given), with the converted outputs in
        ``self.model_outputs`` (its newest is this step's; ``model_output`` is unused): unfused,
        for callers that use it (``step`` does not). Returned in the sample's dtype."""
        method = "multistep_uni_p_bh_update"
        sample, order = uni_p_arguments(args, kwargs, sample, order)
        i, ends = self._helper_position(method, 1, order - 1, sigma, sigma_next)
        update = self._uni_update(i + 1, i, [i - k for k in range(1, order)], OUTPUTS[0], list(OUTPUTS[1:order]),
                                  None, ends)
        return unfused(method, update[0] * X + update[1], order, i,
                       {"x": sample, **output_list(method, self.model_outputs, order)}, sample.dtype)

    def multistep_uni_c_bh_update(self, this_model_output: torch.Tensor, *args, last_sample: torch.Tensor = None,
                                  this_sample: torch.Tensor = None, order: int = None,
                                  sigma_before: torch.Tensor = None, sigma: torch.Tensor = None,
                                  **kwargs) -> torch.Tensor:
        """diffusers' UniC corrector of ``order`` at the current step (from ``sigma_before`` to
        ``sigma`` when given): corrects the step from ``last_sample`` with
        ``this_model_output``, the converted output here, and ``self.model_outputs`` (not yet
        holding it). Unfused, returned in ``last_sample``'s dtype; ``this_sample`` is required,
        as in diffusers, and unused."""
        method = "multistep_uni_c_bh_update"
        last_sample, order = uni_c_arguments(args, kwargs, last_sample, this_sample, order)
        i, ends = self._helper_position(method, 0, order, sigma_before, sigma)
        update = self._uni_update(i, i - 1, [i - 1 - k for k in range(1, order)], OUTPUTS[0], list(OUTPUTS[1:order]),
                                  NEW_OUTPUT, ends)
        tensors = {"aux": last_sample, "new_output": this_model_output,
                   **output_list(method, self.model_outputs, order)}
        return unfused(method, update[0] * AUX + update[1], order, i, tensors, last_sample.dtype)

    def _helper_position(self, method: str, ahead: int, back: int, start, end
                         ) -> Tuple[int, Optional[Tuple[float, float]]]:
        """(step index, the update's (end, start) sigmas or None for the schedule's) of a helper call."""
        if self.solver_p is not None:  # (refused at construction; assigned since)
            raise ValueError(f"{method}: solver_p is not supported by kdfast's HeliosScheduler; set it to None")
        if (start is None) != (end is None):
            raise ValueError(f"{method}: pass both sigmas of the update or neither")
        i, _ = step_position(self, method, ahead=0 if start is not None else ahead, sigmas=self._host_sigmas,
                             back=back)
        return i, None if start is None else (float(end), float(start))

    def _sigma_to_alpha_sigma_t(self, sigma):
        """diffusers' ``(alpha_t, sigma_t)`` of a sigma tensor."""
        if self.config.use_flow_sigmas:
            return 1 - sigma, torch.clamp(sigma, min=1e-8)
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t


# ---------------------------------------------------------------- HeliosDMDScheduler


class HeliosDMDScheduler(_HeliosSchedule):
    """Drop-in for ``diffusers.HeliosDMDScheduler``, the sampler of Helios' DMD-distilled student:
    same arguments, config, attributes, ``set_timesteps`` and ``step``, with the keyword arguments
    the pyramid pipeline passes (``cur_sampling_step``, ``dmd_noisy_tensor``, ``dmd_sigmas``,
    ``dmd_timesteps``, ``all_timesteps``).

    A step is, as in diffusers::

        sigma_t    = dmd_sigmas[argmin |dmd_timesteps - int(timestep)|]
        x0         = sample - sigma_t * model_output                  # (diffusers: in float64)
        sigma_next = dmd_sigmas[argmin |dmd_timesteps - int(all_timesteps[cur_sampling_step + 1])|]
        prev       = (1 - sigma_next) * x0 + sigma_next * dmd_noisy_tensor

    or ``prev = x0`` at the last step (``cur_sampling_step == len(all_timesteps) - 1``): one fused
    :func:`kdfast.ops.solver_step` pass in float32 (diffusers makes ~10 passes, in float64, but
    rounds x0 to a 16-bit model output's dtype before re-noising it: 2e-3 per bfloat16 step that
    kdfast does not lose). The result has ``dmd_noisy_tensor``'s dtype, at the last step
    ``model_output``'s, as in diffusers.

    No host reads: when ``dmd_sigmas``/``dmd_timesteps`` are this scheduler's own ``sigmas`` and
    ``timesteps`` (what the pipeline passes) and ``timestep`` and ``all_timesteps[...]`` are
    elements of its ``timesteps`` or numbers, the lookups are made on the host copies taken in
    ``set_timesteps`` (no tensor is read). With other tensors (copies, another schedule) the
    lookups run as diffusers' tensor operations on the sample's device and the coefficients
    become a row on the device: a few tiny kernels, still no host read.

    ``step_index`` stays None, as in diffusers (the pipeline passes ``cur_sampling_step``).

    Deviations from diffusers:

    * Any sample rank works (diffusers broadcasts its ``[batch, 1, 1, 1, 1]`` sigma against the
      sample, so only 5-D video latents keep their shape; kdfast gives those the same values).
    * Missing ``dmd_sigmas``, ``dmd_timesteps``, ``all_timesteps`` or (before the last step)
      ``dmd_noisy_tensor`` raise a ValueError naming the argument (diffusers: TypeError or
      AttributeError); so do a ``timestep`` of more than one value, a ``prediction_type``
      other than ``flow_prediction`` (diffusers' step ignores it and treats the output as a
      velocity) and the schedule errors of :class:`HeliosScheduler`.
    """

    _diffusers_name = "HeliosDMDScheduler"
    _dmd_schedule = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        stages: int = 3,
        stage_range: list = [0, 1 / 3, 2 / 3, 1],  # noqa: B006 - diffusers' default, never mutated
        gamma: float = 1 / 3,
        prediction_type: str = "flow_prediction",
        use_flow_sigmas: bool = True,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "linear",
    ):
        check_choice("prediction_type", prediction_type, ("flow_prediction",))
        self._init_schedule()
        self.last_sample = None

    # ---------------------------------------------------------------- host lookups

    def _schedule_changed(self) -> None:
        self._table = None
        self._nearest_cache: Dict[Tuple[int, bool], int] = {}

    def _plan_schedule(self, shared: bool = True) -> None:
        """Plan the step from each timestep of the schedule to the next, as the pipeline runs it
        (``shared``: in the table cache, whose key reads the sigmas: only while they are on the host)."""
        host = self._host_timesteps
        plans = {}
        for i, t in enumerate(host):
            nxt = host[i + 1] if i + 1 < len(host) else None
            key = self._host_key(t, nxt)
            if key is not None:
                plans[key] = self._plan(*key)
        if not plans:
            raise ValueError("the DMD schedule has no step: pass num_inference_steps >= 1 (or at least 2 sigmas)")
        self._table = self._shared_table(lambda: GrowingTable(plans)) if shared else GrowingTable(plans)

    def _nearest(self, k: int, double: bool) -> Optional[int]:
        """diffusers' ``argmin |timesteps - k|`` over this schedule's timesteps, in float64
        (``convert_flow_pred_to_x0``) or in the timesteps' own dtype (``add_noise``); None for a
        dtype numpy cannot replay (float16, bfloat16)."""
        cache = self._nearest_cache
        index = cache.get((k, double))
        if index is None:
            dtype = _F64 if double else self._timesteps.dtype
            np_dtype = {_F64: np.float64, _F32: np.float32}.get(dtype)
            if np_dtype is None:
                return None
            values = np.array(self._host_timesteps, dtype=np.float64).astype(np_dtype)
            index = cache[(k, double)] = int(np.argmin(np.abs(values - np_dtype(k))))
        return index

    def _host_key(self, t: float, nxt: Optional[float]) -> Optional[Tuple[float, Optional[float], bool]]:
        """(sigma_t, sigma_next or None, whether the sigmas are float32) of a step from timestep value
        ``t`` renoising to ``nxt``: the table key of its plan."""
        i = self._nearest(int(t), True)
        if i is None:
            return None
        single = self._sigmas.dtype == _F32
        if nxt is None:
            return self._host_sigmas[i], None, single
        j = self._nearest(int(nxt), False)
        return None if j is None else (self._host_sigmas[i], self._host_sigmas[j], single)

    def _plan(self, sigma_t: float, sigma_next: Optional[float], single: bool) -> CheckedPlan:
        x0 = (1.0, -sigma_t)
        if sigma_next is None:
            plan = StepPlan(x0=x0, sample=X0)
        else:
            if single:  # (1 - sigma on diffusers' float32 tensor)
                keep = float(np.float32(1.0) - np.float32(sigma_next))
            else:
                keep = 1.0 - sigma_next
            plan = StepPlan(x0=x0, sample=keep * X0 + sigma_next * NOISE)
        return CheckedPlan.of(plan, lambda: f"the DMD step from sigma {sigma_t:g} to {sigma_next} is not finite")

    def _host_value(self, value) -> Optional[float]:
        """The value of a timestep known on the host: a number, or an element of this schedule's
        timesteps (found from its address); None for any other tensor."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return None
            one = value.reshape(()) if value.dim() else value
            index = self.schedule_index(one)
            return None if index is None else self._host_timesteps[index]
        if isinstance(value, bool) or not isinstance(value, NUMBERS):
            raise TypeError(f"timesteps must be tensors or numbers, got {type(value).__name__}")
        return float(value)

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep=None, sample: torch.Tensor = None,
             generator: Optional[torch.Generator] = None, return_dict: bool = True, cur_sampling_step: int = 0,
             dmd_noisy_tensor: Optional[torch.Tensor] = None, dmd_sigmas: Optional[torch.Tensor] = None,
             dmd_timesteps: Optional[torch.Tensor] = None, all_timesteps=None):
        """diffusers' DMD step (same arguments): x0 from the velocity at ``timestep``, re-noised with
        ``dmd_noisy_tensor`` to ``all_timesteps[cur_sampling_step + 1]`` (x0 itself at the last
        step). ``generator`` is accepted and unused. Returns a :class:`HeliosDMDSchedulerOutput`, or
        ``(prev_sample,)``."""
        prev = self._dmd_step(model_output, None, 1.0, timestep, sample, cur_sampling_step, dmd_noisy_tensor,
                              dmd_sigmas, dmd_timesteps, all_timesteps)
        return HeliosDMDSchedulerOutput(prev) if return_dict else (prev,)

    def step_cfg(self, uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, timestep=None,
                 sample: torch.Tensor = None, generator: Optional[torch.Generator] = None, return_dict: bool = True,
                 cur_sampling_step: int = 0, dmd_noisy_tensor: Optional[torch.Tensor] = None,
                 dmd_sigmas: Optional[torch.Tensor] = None, dmd_timesteps: Optional[torch.Tensor] = None,
                 all_timesteps=None):
        """``step`` with classifier-free guidance fused into the same pass:
        ``model_output = uncond + guidance_scale * (cond - uncond)``."""
        guidance_scale = finite_number("guidance_scale", guidance_scale)
        uncond, cond = guidance_pair(uncond, cond)  # (one dtype, the wider: diffusers' guided output's)
        prev = self._dmd_step(uncond, cond, guidance_scale, timestep, sample, cur_sampling_step, dmd_noisy_tensor,
                              dmd_sigmas, dmd_timesteps, all_timesteps)
        return HeliosDMDSchedulerOutput(prev) if return_dict else (prev,)

    def _loop_step(self, model_output, cond, guidance_scale, timestep, previous_timestep, sample, carry, generator,
                   options):
        # kdfast.sample: the pipeline's arguments; the noise is the loop's first sample (the stage's start point)
        noise = sample if carry is None else carry
        position = self.schedule_index(timestep)
        if position is None:
            raise ValueError("HeliosDMDScheduler in kdfast.sample: the timestep is not an element of "
                             "scheduler.timesteps")
        kwargs = dict(options, cur_sampling_step=position, dmd_noisy_tensor=noise, dmd_sigmas=self.sigmas,
                      dmd_timesteps=self.timesteps, all_timesteps=self.timesteps)
        if cond is None:
            return self.step(model_output, timestep, sample, **kwargs).prev_sample, noise
        return self.step_cfg(model_output, cond, guidance_scale, timestep, sample, **kwargs).prev_sample, noise

    def _dmd_step(self, model_output, cond, guidance_scale, timestep, sample, cur_sampling_step, noise,
                  dmd_sigmas, dmd_timesteps, all_timesteps) -> torch.Tensor:
        _check_step_tensors(model_output, sample, cond)
        for name, value in (("dmd_sigmas", dmd_sigmas), ("dmd_timesteps", dmd_timesteps)):
            if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() == 0:
                raise ValueError(f"{name} must be a 1-D tensor (the pipeline passes scheduler.{name[4:]}), got "
                                 f"{getattr(value, 'shape', type(value).__name__)}")
        if all_timesteps is None or not hasattr(all_timesteps, "__len__"):
            raise ValueError(f"all_timesteps must be the loop's timesteps (the pipeline passes scheduler.timesteps), "
                             f"got {type(all_timesteps).__name__}")
        if isinstance(cur_sampling_step, bool) or not isinstance(cur_sampling_step, (int, np.integer)):
            raise ValueError(f"cur_sampling_step must be the loop's step index (an int), got {cur_sampling_step!r}")
        if timestep is None:
            raise ValueError("timestep must be given (the pipeline passes the loop's t)")
        if isinstance(timestep, torch.Tensor) and timestep.numel() != 1 and any(timestep.stride()):
            raise ValueError(f"timestep must be one value, got a tensor of shape {tuple(timestep.shape)}")
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 1:
            timestep = timestep[(0,) * timestep.dim()]  # (an element expanded to the batch: one value)
        last = not cur_sampling_step < len(all_timesteps) - 1
        nxt = None if last else all_timesteps[cur_sampling_step + 1]
        if not last:
            _check_tensor("dmd_noisy_tensor", noise, sample)
        out_dtype = model_output.dtype if last else noise.dtype
        if cond is not None and last:
            out_dtype = _promoted(model_output.dtype, cond.dtype)

        # diffusers' arithmetic runs in the widest of the inputs' dtypes (the result is then cast to
        # out_dtype): a half-precision sample with float32 (or float64) model output and start
        # latents is stepped in that wider dtype, not rounded to the sample's first
        sample = promoted_sample(sample, model_output, None if last else noise)
        key = None
        if self.num_inference_steps is not None and dmd_sigmas is self._sigmas and dmd_timesteps is self._timesteps:
            self._refresh_host_sigmas()
            self._refresh_host_timesteps()
            t = self._host_value(timestep)
            n = None if last else self._host_value(nxt)
            if t is not None and (last or n is not None):
                if self._table is None:  # (timesteps or sigmas assigned since set_timesteps)
                    self._plan_schedule(shared=False)
                host_key = self._host_key(t, n)
                if host_key is not None:
                    key = self._table.ensure(host_key, lambda: self._plan(*host_key))
        if key is not None:
            self._raise_if_undefined(key)
            prev = self._fused(key, sample, model_output, cond=cond, guidance_scale=guidance_scale,
                               noise=None if last else noise).sample
        else:
            rows = self._device_rows(timestep, nxt, dmd_sigmas, dmd_timesteps, sample)
            prev = fused_step(sample, model_output, rows, cond, guidance_scale, (), None, None if last else noise,
                              None, None, False, False, None).sample
        return prev if prev.dtype == out_dtype else prev.to(out_dtype)

    def _raise_if_undefined(self, key) -> None:
        error = getattr(self._table.plan(key), "error", None)
        if error is not None:
            raise ValueError(error)

    @staticmethod
    def _device_rows(timestep, nxt, dmd_sigmas: torch.Tensor, dmd_timesteps: torch.Tensor,
                     sample: torch.Tensor) -> torch.Tensor:
        """The step's coefficient rows ``[batch, 29]`` computed on the sample's device with diffusers'
        tensor operations (no host read): for schedules that are not this scheduler's own."""
        device, batch = sample.device, sample.shape[0]

        def as_long(value) -> torch.Tensor:  # torch.full((batch,), value, dtype=torch.long): truncation
            if isinstance(value, torch.Tensor):
                return value.reshape(1).to(device).to(torch.long)
            if isinstance(value, bool) or not isinstance(value, NUMBERS):
                raise TypeError(f"timesteps must be tensors or numbers, got {type(value).__name__}")
            return torch.full((1,), int(value), dtype=torch.long, device=device)

        sigmas, timesteps = dmd_sigmas.to(device), dmd_timesteps.to(device)
        index = torch.argmin((timesteps.double().unsqueeze(0) - as_long(timestep).unsqueeze(1)).abs(), dim=1)
        sigma_t = sigmas.double()[index]
        dtype = _F64 if sample.dtype == _F64 else _F32
        rows = torch.zeros(1, NUM_COEFS, dtype=_F64, device=device)
        rows[:, _ROW_X0_FROM_X] = 1.0
        rows[:, _ROW_X0_FROM_MODEL] = -sigma_t
        if nxt is None:
            rows[:, _ROW_SAMPLE_X0] = 1.0
        else:
            index = torch.argmin((timesteps.unsqueeze(0) - as_long(nxt).unsqueeze(1)).abs(), dim=1)
            sigma_next = sigmas[index]
            rows[:, _ROW_SAMPLE_X0] = (1 - sigma_next).double()
            rows[:, _ROW_SAMPLE_NOISE] = sigma_next.double()
        return rows.to(dtype).expand(batch, NUM_COEFS).contiguous()

    # ---------------------------------------------------------------- diffusers' helpers

    @staticmethod
    def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape((-1,) + (1,) * (like.dim() - 1))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor,
                  sigmas: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """diffusers' ``add_noise``: ``(1 - sigma) * x0 + sigma * noise`` at the ``sigmas`` entry of the
        ``timesteps`` nearest to each ``timestep``, in ``noise``'s dtype."""
        sigmas = sigmas.to(noise.device)
        timesteps = timesteps.to(noise.device)
        timestep_id = torch.argmin((timesteps.unsqueeze(0) - timestep.unsqueeze(1)).abs(), dim=1)
        sigma = self._per_sample(sigmas[timestep_id], original_samples)
        return ((1 - sigma) * original_samples + sigma * noise).type_as(noise)

    def convert_flow_pred_to_x0(self, flow_pred: torch.Tensor, xt: torch.Tensor, timestep: torch.Tensor,
                                sigmas: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """diffusers' ``convert_flow_pred_to_x0``: ``xt - sigma_t * flow_pred`` in float64, in
        ``flow_pred``'s dtype."""
        original_dtype, device = flow_pred.dtype, flow_pred.device
        flow_pred, xt, sigmas, timesteps = (x.double().to(device) for x in (flow_pred, xt, sigmas, timesteps))
        timestep_id = torch.argmin((timesteps.unsqueeze(0) - timestep.unsqueeze(1)).abs(), dim=1)
        sigma_t = self._per_sample(sigmas[timestep_id], xt)
        return (xt - sigma_t * flow_pred).to(original_dtype)
