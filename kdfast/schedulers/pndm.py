"""PNDM (Liu et al. 2022): PLMS and the Runge-Kutta warm-up, as a diffusers drop-in."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from ._config import register_to_config
from ._linear import AUX, H0, H1, H2, MODEL, X, ZERO
from ._schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS, check_choice, noise_schedule
from .base import FusedScheduler, GrowingTable, SchedulerOutput, StepPlan, reject_unknown_step_arguments
from .ddim import _div, _sqrt
from .ddpm import integer_timestep, noise_scales
from .euler_discrete import KARRAS_SCHEDULERS

_SOURCES = {"model": MODEL, "h0": H0, "h1": H1, "h2": H2}
_STORED = ("h0", "h1", "h2")  # ets[-1], ets[-2], ets[-3] (or cur_model_output): the kernel's history, newest first
# PLMS weights of (ets[-1], ets[-2], ...) by how many outputs the formula combines (diffusers' step_plms)
_PLMS_WEIGHTS = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}

Terms = Tuple[Tuple[str, float], ...]


class _Move(NamedTuple):
    """One step of diffusers' state machine, decided on the host from the state alone."""

    key: tuple  # (timestep, prev timestep, model combination, from cur_sample, history out, aux out): the plan
    reads: int  # history entries the kernel reads: ets (PLMS) or cur_model_output (PRK), newest first
    append: bool  # the (guided) model output joins ets
    cur_sample: Optional[bool]  # True: cur_sample = sample; False: cur_sample = None; None: unchanged
    cur_output: Optional[bool]  # True: cur_model_output = the history output; False: = 0; None: unchanged


def _lin(terms: Optional[Terms]):
    if terms is None:
        return None
    out = ZERO
    for name, weight in terms:
        out = out + weight * _SOURCES[name]
    return out


class PNDMScheduler(FusedScheduler):
    """Drop-in for ``diffusers.PNDMScheduler``: same arguments, config, attributes and state.

    The state machine is diffusers' own: ``counter`` counts the steps, ``ets`` holds the past
    model outputs, ``cur_sample`` the sample a multi-stage step restarts from, and
    ``cur_model_output`` the Runge-Kutta sum. PLMS (``skip_prk_steps=True``, Stable Diffusion
    1.x) repeats the second timestep: its first two steps are a predictor and a corrector from
    the same sample; then 2nd, 3rd and 4th-order Adams-Bashforth steps follow as ``ets`` fills.
    With ``skip_prk_steps=False`` twelve Runge-Kutta steps (four per interval, three intervals)
    come first and need ``num_inference_steps >= 4``.

    Each step is one fused kernel pass. PLMS reads the past outputs ``ets`` (at most three,
    newest first) as the kernel's history and the current output as its model input: the
    4th-order formula needs no more. The Runge-Kutta steps read ``cur_model_output`` as history
    and write the new sum as the history output. ``cur_sample`` is the kernel's aux input, kept
    by reference, never copied. ``ets`` keeps the model outputs themselves, by reference, as
    diffusers does; with ``step_cfg`` the guided output, which the step then writes.

    As in diffusers, ``step`` reads the timestep's value (an integer: a float one is an
    IndexError, as there): the previous timestep is ``t - num_train_timesteps //
    num_inference_steps`` (half that between Runge-Kutta stages). Coefficients are computed in
    ``set_timesteps`` for the schedule's loop, and on first use for anything else.

    Unlike diffusers, a step past the end of ``timesteps`` (``counter == len(timesteps)``) is an
    IndexError rather than one more step below timestep 0; ``set_timesteps`` starts a new loop.
    ``num_inference_steps`` above ``num_train_timesteps`` is refused, as DDIM and DDPM refuse it
    (diffusers' PNDM makes every timestep 0 there, and its loop returns the sample unchanged).
    """

    _diffusers_name = "PNDMScheduler"
    _compatibles = KARRAS_SCHEDULERS
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._host_alphas_cumprod = self.alphas_cumprod.tolist()
        self._host_final = float(self.final_alpha_cumprod)
        self.init_noise_sigma = 1.0
        self.pndm_order = 4
        self.cur_model_output = 0
        self.counter = 0
        self.cur_sample = None
        self.ets: List[torch.Tensor] = []
        self.num_inference_steps = None
        self.prk_timesteps = None
        self.plms_timesteps = None
        # diffusers' timesteps are None until set_timesteps
        self._timesteps, self._host_timesteps, self._timestep_span, self._timesteps_version = None, [], None, None
        self._step_index = None
        self._begin_index = None
        self._table = None

    # ---------------------------------------------------------------- schedule

    def _has_stepped(self) -> bool:
        return self.counter > 0  # (PNDM keeps no step index: its counter is its position)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """diffusers' Runge-Kutta and PLMS timesteps, and the coefficients of the loop over them."""
        cfg = self.config
        T = cfg.num_train_timesteps
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = int(num_inference_steps)
        if n > T:
            raise ValueError(f"`num_inference_steps`: {n} cannot be larger than `self.config.train_timesteps`: {T}")
        if not cfg.skip_prk_steps and n < self.pndm_order:
            raise ValueError(f"num_inference_steps must be >= {self.pndm_order} with skip_prk_steps=False (the "
                             f"Runge-Kutta warm-up spans the last {self.pndm_order} timesteps), got {n}")
        if cfg.timestep_spacing == "linspace":
            ascending = np.linspace(0, T - 1, n).round().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ascending = (np.arange(0, n) * (T // n)).round() + cfg.steps_offset
        else:
            ascending = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
        self.num_inference_steps = n
        if cfg.skip_prk_steps:
            # PLMS repeats the second timestep: predictor and corrector of its first interval
            self.prk_timesteps = np.array([])
            self.plms_timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        else:
            prk = np.array(ascending[-self.pndm_order:]).repeat(2) + np.tile(np.array([0, T // n // 2]),
                                                                               self.pndm_order)
            self.prk_timesteps = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
            self.plms_timesteps = ascending[:-3][::-1].copy()
        timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._start_new_loop()
        self._set_timesteps(torch.from_numpy(timesteps).to(device), timesteps.tolist())
        self.ets = []
        self.counter = 0
        self.cur_model_output = 0  # (cur_sample is left as it is, as in diffusers: the first step sets it)
        self._table = self._shared_table(self._build_table)

    def _build_table(self) -> GrowingTable:
        """The plans of the loop over ``timesteps``: diffusers' state machine run on the host."""
        plans = {}
        n_ets, has_cur_sample, cur_is_tensor = 0, False, False
        for counter, t in enumerate(self._host_timesteps):
            try:
                move = self._move(self._runs_prk(counter), counter, int(t), n_ets, has_cur_sample, cur_is_tensor)
                if move.key not in plans:
                    plans[move.key] = self._plan(move.key)
            except (ValueError, IndexError):  # a loop diffusers cannot run either: the step says why
                break
            if move.append:
                n_ets = n_ets + 1 if self._runs_prk(counter) else min(n_ets, 3) + 1
            has_cur_sample = has_cur_sample if move.cur_sample is None else move.cur_sample
            cur_is_tensor = cur_is_tensor if move.cur_output is None else move.cur_output
        if not plans:
            raise ValueError("PNDM: no step of this schedule can be planned")
        return GrowingTable(plans)

    def _runs_prk(self, counter: int) -> bool:
        return counter < len(self.prk_timesteps) and not self.config.skip_prk_steps

    # ---------------------------------------------------------------- state machine

    def _move(self, prk: bool, counter: int, t: int, n_ets: int, has_cur_sample: bool, cur_is_tensor: bool) -> _Move:
        return (self._move_prk(counter, t, has_cur_sample, cur_is_tensor) if prk
                else self._move_plms(counter, t, n_ets, has_cur_sample))

    def _move_prk(self, counter: int, t: int, has_cur_sample: bool, cur_is_tensor: bool) -> _Move:
        """diffusers' step_prk: four stages per interval, all from the interval's first sample."""
        T, n = self.config.num_train_timesteps, self.num_inference_steps
        prev = t - (0 if counter % 2 else T // n // 2)
        group = counter // 4 * 4
        if group >= len(self.prk_timesteps):
            raise IndexError(f"step_prk: step {counter} is past the {len(self.prk_timesteps)} Runge-Kutta steps of "
                             "this schedule")
        t = int(self.prk_timesteps[group])
        stage = counter % 4
        carry: Terms = (("h0", 1.0),) if cur_is_tensor else ()  # the running sum cur_model_output
        if stage == 0:  # cur_sample = sample; the model output joins ets
            key = (t, prev, (("model", 1.0),), False, carry + (("model", 1 / 6),), (("model", 1.0),))
            return _Move(key, len(carry), True, True, True)
        if stage in (1, 2):
            key = (t, prev, (("model", 1.0),), has_cur_sample, carry + (("model", 1 / 3),), None)
            return _Move(key, len(carry), False, None, True)
        key = (t, prev, carry + (("model", 1 / 6),), has_cur_sample, None, None)
        return _Move(key, len(carry), False, None, False)

    def _move_plms(self, counter: int, t: int, n_ets: int, has_cur_sample: bool) -> _Move:
        """diffusers' step_plms: the first step a predictor, the second (same timestep) its
        corrector from the same sample, then Adams-Bashforth of growing order."""
        cfg = self.config
        if not cfg.skip_prk_steps and n_ets < 3:
            raise ValueError(f"{self.__class__} can only be run AFTER scheduler has been run in 'prk' mode for at "
                             "least 12 iterations See: https://github.com/huggingface/diffusers/blob/main/src/"
                             "diffusers/pipelines/pipeline_pndm.py for more information.")
        r = cfg.num_train_timesteps // self.num_inference_steps
        append = counter != 1
        prev = t - r
        if not append:  # the corrector: back to the interval the first step took
            prev, t = t, t + r
        stored = min(n_ets, 3) if append else n_ets
        entries = (("model",) if append else ()) + _STORED[:stored] + (("h3",) if stored > 3 else ())
        total = len(entries)
        from_aux, cur_sample = False, None
        if total == 1 and counter == 0:
            combo: Terms = (("model", 1.0),)
            cur_sample = True
        elif total == 1 and counter == 1:
            if not has_cur_sample:
                raise ValueError("PLMS's second step restarts from the first step's sample, but cur_sample is None; "
                                 "step from the start of the schedule (set_timesteps resets it)")
            combo, from_aux, cur_sample = (("model", 0.5), ("h0", 0.5)), True, False
        elif total >= 2:
            weights = _PLMS_WEIGHTS[min(total, 4)]
            combo = tuple(zip(entries, weights))
        else:
            raise ValueError(f"PLMS step {counter} with {n_ets} stored model outputs (ets): not a state diffusers' "
                             "PNDMScheduler steps from; call set_timesteps to start a new loop")
        reads = max((_STORED.index(name) + 1 for name, _ in combo if name != "model" and name in _STORED), default=0)
        if any(name == "h3" for name, _ in combo):
            raise ValueError("PLMS: this step would combine 4 stored model outputs (ets), the fused step reads at "
                             "most 3 besides the current one")
        key = (t, prev, combo, from_aux, (("model", 1.0),) if append else None, None)
        return _Move(key, reads, append, cur_sample, None)

    def _plan(self, key: tuple) -> StepPlan:
        """diffusers' ``_get_prev_sample`` (formula (9) of the PNDM paper) on the combined model output."""
        t, prev, combo, from_aux, history, aux = key
        T = self.config.num_train_timesteps
        if not -T <= t < T or prev >= T:
            raise IndexError(f"timestep {t} (previous timestep {prev}) is outside the training schedule [0, {T})")
        a_t = self._host_alphas_cumprod[t]  # a negative t wraps, as indexing the tensor does
        a_prev = self._host_alphas_cumprod[prev] if prev >= 0 else self._host_final
        b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
        s = AUX if from_aux else X
        eps = _lin(combo)
        if self.config.prediction_type == "v_prediction":
            eps = _sqrt(a_t) * eps + _sqrt(b_t) * s
        sample_coeff = _sqrt(_div(a_prev, a_t))
        denom = a_t * _sqrt(b_prev) + _sqrt(a_t * b_t * a_prev)
        sample = sample_coeff * s - _div(a_prev - a_t, denom) * eps
        return StepPlan(x0=(0.0, 0.0), sample=sample, history=_lin(history), aux=_lin(aux))

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             generator: Optional[torch.Generator] = None):
        """diffusers' ``step`` (same positional order): a Runge-Kutta step while ``counter`` is in
        the warm-up, else a PLMS step; one fused kernel pass. Returns ``SchedulerOutput(prev_sample)``.
        ``generator`` is accepted, as by kdfast's other schedulers, and unused (PNDM draws no noise)."""
        out = self._step(model_output, timestep, sample, None, 1.0, None, None)
        return out if return_dict else out.to_tuple()

    def step_prk(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """diffusers' ``step_prk``: one Runge-Kutta stage, whatever ``counter`` says."""
        out = self._step(model_output, timestep, sample, None, 1.0, None, None, _prk=True)
        return out if return_dict else out.to_tuple()

    def step_plms(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """diffusers' ``step_plms``: one linear multistep step, whatever ``counter`` says."""
        out = self._step(model_output, timestep, sample, None, 1.0, None, None, _prk=False)
        return out if return_dict else out.to_tuple()

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              _prk: Optional[bool] = None, **kwargs) -> SchedulerOutput:
        # (generator, variance_noise: step_cfg's common arguments; PNDM draws no noise)
        reject_unknown_step_arguments(kwargs)
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        self._check_step_inputs(model_output, sample)
        t = integer_timestep(self, timestep)
        counter = self.counter
        if counter >= len(self._host_timesteps):
            raise IndexError(f"step {counter + 1} of a schedule of {len(self._host_timesteps)} timesteps: the loop is "
                             "over; call set_timesteps to start a new one")
        prk = self._runs_prk(counter) if _prk is None else _prk
        cur = self.cur_model_output
        cur_is_tensor = isinstance(cur, torch.Tensor)
        if prk and not cur_is_tensor and cur != 0:
            raise ValueError(f"cur_model_output must be 0 or a tensor, got {cur!r}")
        move = self._move(prk, counter, t, len(self.ets), self.cur_sample is not None, cur_is_tensor)
        key = self._table.ensure(move.key, lambda: self._plan(move.key))
        if prk:
            history = [cur] if move.reads else []
        else:
            history = [self.ets[-1 - k] for k in range(move.reads)]
        guided = cond is not None
        plan = self._table.plan(key)
        write_history = plan.history is not None and (prk or guided)  # PLMS: the guided output, for ets
        write_aux = plan.aux is not None and guided  # PRK: the guided output, for ets
        result = self._fused(key, sample, model_output, cond=cond, guidance_scale=guidance_scale, history=history,
                             aux=self.cur_sample if move.key[3] else None, write_history=write_history,
                             write_aux=write_aux, history_dtype=model_output.dtype if write_history else None)
        # the state changes only once the step has succeeded
        if move.append:
            current = model_output if not guided else (result.aux if prk else result.history)
            if not prk:  # (PLMS keeps the last three and a new list, the Runge-Kutta steps the list itself)
                self.ets = self.ets[-3:]
            self.ets.append(current)
        if move.cur_sample is not None:
            self.cur_sample = sample if move.cur_sample else None
        if move.cur_output is not None:
            self.cur_model_output = result.history if move.cur_output else 0
        self.counter = counter + 1
        return SchedulerOutput(result.sample)

    # ---------------------------------------------------------------- training-side helper

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise``, bit-identical to diffusers'."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = noise_scales(self, timesteps, original_samples)
        return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise
