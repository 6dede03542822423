"""UniPC (UniP predictor + UniC corrector, B(h) = h or e^h - 1), as a diffusers drop-in.

diffusers runs the corrector for the sample the previous step predicted, then the predictor
from the corrected sample. Both are linear in the step's sources, so kdfast fuses them: the
previous step's uncorrected sample comes in as ``aux``, the corrected sample goes out as the
aux output (it is the next step's ``last_sample``), the prediction as the sample output and
the converted model output as the history entry: one kernel pass per step.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._config import register_to_config
from ._helpers import (NEW_OUTPUT, OUTPUTS, FlowShifts, TerminalShift, output_list, step_position, uni_c_arguments,
                       uni_p_arguments, unfused)
from ._linear import AUX, H0, H1, H2, MODEL, X, X0, ZERO, Lin
from ._schedule import (BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, alpha_sigma, beta_sigmas,
                        check_choice, check_flow_sigma_spacing, custom_schedule, exponential_sigmas, karras_sigmas,
                        log_snr, sigma_range, sigma_to_t, spaced_timesteps, x0_coefficients)
from .base import (MultistepScheduler, SchedulerOutput, StepPlan, convert_arguments, converted_dtype, push_history,
                   reject_internal_step_arguments, reject_unknown_step_arguments)

SOLVER_TYPES = ("bh1", "bh2")
HISTORY = (H0, H1, H2)


class UniPCMultistepScheduler(FlowShifts, TerminalShift, MultistepScheduler):
    """Drop-in for ``diffusers.UniPCMultistepScheduler``: same arguments and config.

    Each ``step`` is one fused kernel pass: model-output conversion, clipping, the UniC
    correction of the incoming sample and the UniP prediction of the next one (dynamic
    thresholding adds one reduction pass before it, for the per-sample quantile).
    ``solver_order`` may be 1, 2 or 3 (the kernel holds three history entries; diffusers
    recommends 2 for guided and 3 for unconditional sampling).
    """

    _diffusers_name = "UniPCMultistepScheduler"
    _steps_in_the_wider_dtype = False  # (diffusers casts its result to the sample's dtype)
    _compatibles = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
                    "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                    "DPMSolverSDEScheduler", "EDMEulerScheduler")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: List[int] = [],  # noqa: B006 - diffusers' default, never mutated
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        shift_terminal: Optional[float] = None,
    ):
        if sum([use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas]) > 1:
            raise ValueError("Only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used.")
        if solver_type in ("midpoint", "heun", "logrho"):  # other solvers' names, mapped as diffusers does
            self.register_to_config(solver_type="bh2")
        else:
            check_choice("solver_type", solver_type, SOLVER_TYPES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}")
        if prediction_type == "flow_prediction" and not predict_x0:
            raise ValueError("prediction_type='flow_prediction' needs predict_x0=True")
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("shift_terminal is only supported when use_flow_sigmas=True")
        # (Karras sigmas map to flow sigmas as sigma / (1 + sigma), as in diffusers; these do not)
        check_flow_sigma_spacing(self.config, ("use_exponential_sigmas", "use_beta_sigmas"))
        if any(not isinstance(k, (int, np.integer)) for k in disable_corrector):
            raise ValueError(f"disable_corrector must be a list of step indices, got {disable_corrector!r}")

        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)
        self.solver_p = solver_p
        self._init_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                  rescale_betas_zero_snr)

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      sigmas: Optional[List[float]] = None, mu: Optional[float] = None) -> None:
        """Compute the timesteps and sigmas, and every step's kernel coefficients."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting=True")
        custom = None
        if sigmas is not None:
            if not cfg.use_flow_sigmas:
                raise ValueError("Passing sigmas is only supported when use_flow_sigmas=True")
            custom = custom_schedule("sigmas", sigmas, np.float64)
            num_inference_steps = len(custom)
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = int(num_inference_steps)
        N = cfg.num_train_timesteps
        timesteps = spaced_timesteps(cfg.timestep_spacing, n, cfg.steps_offset, N)
        zero_end = cfg.final_sigmas_type == "zero"

        train = self._train_sigmas()
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            base = train if custom is None else custom
            log_sigmas = np.log(base)
            flipped = np.flip(base).copy()
            if cfg.use_karras_sigmas:
                sig = karras_sigmas(*sigma_range(cfg, flipped), n)
            elif cfg.use_exponential_sigmas:
                sig = exponential_sigmas(*sigma_range(cfg, flipped), n)
            else:
                sig = beta_sigmas(*sigma_range(cfg, flipped), n)
            if cfg.use_karras_sigmas and cfg.use_flow_sigmas:
                sig = sig / (sig + 1)
                timesteps = (sig * N).copy()
            else:
                timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sig])
                if cfg.use_karras_sigmas:
                    timesteps = timesteps.round()
            last = 0.0 if zero_end else sig[-1]
        elif cfg.use_flow_sigmas:
            sig = np.linspace(1, 1 / N, n + 1)[:-1] if custom is None else custom
            if cfg.use_dynamic_shifting:
                sig = self.time_shift(mu, 1.0, sig)
            else:
                sig = cfg.flow_shift * sig / (1 + (cfg.flow_shift - 1) * sig)
            if cfg.shift_terminal:
                sig = self.stretch_shift_to_terminal(sig)
            sig = np.array(sig, dtype=np.float64)
            if abs(sig[0] - 1) < 1e-6:
                sig[0] -= 1e-6  # alpha = 0 at sigma = 1 would make the first log-SNR infinite
            timesteps = (sig * N).copy()
            last = 0.0 if zero_end else sig[-1]
        else:
            sig = np.interp(timesteps, np.arange(0, len(train)), train)
            last = 0.0 if zero_end else float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        if self.solver_p is not None:
            self.solver_p.set_timesteps(len(timesteps), device=device)
        self._install_schedule(np.concatenate([sig, [last]]), timesteps, device)

    def _reset_history(self) -> None:
        super()._reset_history()
        self.timestep_list: List = [None] * self.config.solver_order
        self.last_sample: Optional[torch.Tensor] = None
        self.this_order: Optional[int] = None

    # ---------------------------------------------------------------- coefficients

    def _plans(self, sigmas: List[float]) -> Dict[Tuple[int, int, int], StepPlan]:
        """Plans keyed (step index, predictor order, corrector order or 0 when it is skipped).

        Every combination is built, as the DPM tables are: history and ``last_sample`` set
        from outside can select any of them. Predictor order 0 means "no UniP": the sample
        output is the corrected sample, for ``solver_p`` to predict from.
        """
        order = self.config.solver_order
        p_orders = range(0, order + 1)
        plans = {}
        for i in range(len(sigmas) - 1):
            q, x0 = self._model_quantity(sigmas, i)
            correctors: Dict[int, Optional[Lin]] = {0: None}
            if i > 0:  # diffusers never corrects at the first step
                for c in range(1, order + 1):
                    upd = self._uni_bh(sigmas, i, i - 1, [i - 1 - k for k in range(1, c)], H0,
                                       list(HISTORY[1:c]), q)
                    if upd is not None:
                        correctors[c] = upd[0] * AUX + upd[1]
            for p in p_orders:
                if p == 0:
                    pred = (1.0, ZERO)
                else:
                    pred = self._uni_bh(sigmas, i + 1, i, [i - k for k in range(1, p)], q,
                                        list(HISTORY[:p - 1]), None)
                if pred is None:
                    continue
                for c, corrected in correctors.items():
                    start = X if corrected is None else corrected
                    plans[(i, p, c)] = StepPlan(x0=x0, sample=pred[0] * start + pred[1], history=q,
                                                aux=corrected)
        return plans

    def _model_quantity(self, sigmas: List[float], i: int) -> Tuple[Lin, Tuple[float, float]]:
        """(what the solver keeps at step i, x0 coefficients): x0 (predict_x0) or epsilon."""
        cfg = self.config
        a, s = alpha_sigma(sigmas[i], cfg.use_flow_sigmas)
        if cfg.prediction_type == "flow_prediction":
            x0 = (1.0, -sigmas[i])  # diffusers: x0 = x - sigma * v with the schedule's raw sigma
        else:
            x0 = x0_coefficients(cfg.prediction_type, a, s)
        if self.predict_x0:
            return X0, x0  # thresholded when thresholding is on
        if cfg.prediction_type == "epsilon":
            return MODEL, x0
        if cfg.prediction_type == "sample":
            return (X - a * MODEL) / s, x0
        return a * MODEL + s * X, x0  # v_prediction

    def _uni_bh(self, sigmas: List[float], t: int, s0: int, prev: Sequence[int], m0: Lin, ms: Sequence[Lin],
                model_t: Optional[Lin]) -> Optional[Tuple[float, Lin]]:
        """One UniP (``model_t`` None) or UniC update from ``sigmas[s0]`` to ``sigmas[t]``.

        Returns ``(c, rest)`` with update = c * start + rest, where start is the sample the
        update starts from; ``m0`` is the model quantity at s0, ``ms`` the older ones at
        ``sigmas[prev]`` (Python indexing, like diffusers' tensor indexing), ``model_t`` the
        corrector's new model quantity at t. None where the update is not finite.
        """
        cfg = self.config
        flow = cfg.use_flow_sigmas
        try:
            a_t, s_t = alpha_sigma(sigmas[t], flow)
            a_0, s_0 = alpha_sigma(sigmas[s0], flow)
            lam_t, lam_0 = log_snr(a_t, s_t), log_snr(a_0, s_0)
            h = lam_t - lam_0
            if h == 0.0:
                # Zero step (e.g. the repeated last sigma of final_sigmas_type="sigma_min" with Karras
                # sigmas): every term but the start vanishes as h -> 0; diffusers gets the same for
                # orders 1-2 and NaN (0 * inf) for order 3.
                return 1.0, ZERO
            if math.isinf(h):
                # Into sigma = 0 (final_sigmas_type="zero"). The first-order update has the finite limit
                # below (x_t = x0, the identities exp(-h) = s_t a_0 / (a_t s_0) made finite); diffusers
                # evaluates 0 * inf there (bh1: B(h) = -inf times a zero residual; predict_x0=False:
                # sigma_t * (e^h - 1)) and returns NaN. Higher orders diverge (their D1 terms grow like
                # h), so the step falls back to first order (see _step).
                if ms or model_t is not None or not math.isfinite(lam_0):
                    return None
                if self.predict_x0:
                    return s_t / s_0, -(s_t * a_0 / s_0 - a_t) * m0
                return a_t / a_0, -(a_t * s_0 / a_0 - s_t) * m0
            order = len(ms) + 1
            rks = [(log_snr(*alpha_sigma(sigmas[k], flow)) - lam_0) / h for k in prev] + [1.0]
            hh = -h if self.predict_x0 else h
            h_phi_1 = math.expm1(hh)  # h * phi_1(h) = e^h - 1
            B_h = hh if cfg.solver_type == "bh1" else math.expm1(hh)
            h_phi_k, fact, b = h_phi_1 / hh - 1.0, 1, []
            for k in range(1, order + 1):
                b.append(h_phi_k * fact / B_h)
                fact *= k + 1
                h_phi_k = h_phi_k / hh - 1.0 / fact
            R = np.array([[r ** (k - 1) for r in rks] for k in range(1, order + 1)], dtype=np.float64)
            b = np.array(b, dtype=np.float64)
            if model_t is None:  # UniP: the last column/row belongs to the corrector's own term
                rhos = [] if order == 1 else [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1]))
            else:
                rhos = [0.5] if order == 1 else list(np.linalg.solve(R, b))
            res = ZERO
            for k, m in enumerate(ms):
                res = res + (float(rhos[k]) / rks[k]) * (m - m0)
            if model_t is not None:
                res = res + float(rhos[-1]) * (model_t - m0)
            if self.predict_x0:
                c, rest = s_t / s_0, -(a_t * h_phi_1) * m0 - (a_t * B_h) * res
            else:
                c, rest = a_t / a_0, -(s_t * h_phi_1) * m0 - (s_t * B_h) * res
        except (ZeroDivisionError, OverflowError, ValueError, np.linalg.LinAlgError):
            return None
        if not (math.isfinite(c) and all(math.isfinite(v) for v in rest.terms.values())):
            return None
        return c, rest

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             generator: Optional[torch.Generator] = None, **kwargs):
        """diffusers' ``step`` (same positional order): one fused kernel pass. ``generator`` is
        accepted and unused (UniPC is deterministic)."""
        reject_internal_step_arguments(kwargs)
        out = self._step(model_output, timestep, sample, None, 1.0, generator, None, **kwargs)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> SchedulerOutput:
        # Runs once per model call: plain attribute reads and no helper calls where a line does
        # (each Python call or tensor property costs 0.1-0.5 us; the kernel takes ~10 us).
        if kwargs:
            reject_unknown_step_arguments(kwargs)
        if self.num_inference_steps is None:
            self._require_timesteps()
        cfg = self._config
        self._check_step_inputs(model_output, sample)
        i = self._step_index
        if i is None:
            self._init_step_index(timestep)
            i = self._step_index
        n = len(self._host_timesteps)
        if i >= n:
            raise IndexError(f"step {i} is past the end of the {n}-step schedule; call set_timesteps again")
        order = cfg.solver_order
        c = 0
        if i > 0 and self.last_sample is not None and (i - 1) not in self.disable_corrector:
            if self.this_order is None:
                raise ValueError("last_sample is set but this_order is not: set both to resume a UniPC loop")
            c = self.this_order
        this_order = order if not cfg.lower_order_final or n - i >= order else n - i
        if this_order > self.lower_order_nums + 1:  # warm-up of the multistep history
            this_order = self.lower_order_nums + 1
        rows = self._table._rows
        p = 0 if self.solver_p is not None else this_order
        while p > 1 and (i, p, c) not in rows:
            p -= 1  # a higher order that is not finite here (into sigma = 0): first order is the limit
        key = (i, p, c)
        if key not in rows:
            raise ValueError(f"no finite UniPC update at step {i} (predictor order {p}, corrector order {c})")
        depth = c if c > p - 1 else p - 1
        outputs = self.model_outputs
        history = outputs[:-1 - depth:-1]  # the newest `depth` entries, newest first
        if len(history) < depth:
            raise ValueError("model_outputs is missing entries this step needs")
        for h in history:  # not `None in history`: that compares tensors with None, ~50 us each
            if h is None:
                raise ValueError("model_outputs is missing entries this step needs")
        result = self._fused(key, sample, model_output, cond=cond, guidance_scale=guidance_scale,
                             history=history, aux=self.last_sample if c else None, write_history=True,
                             write_aux=c > 0 and p > 0,
                             dynamic=(cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
                             if cfg.thresholding and self.predict_x0 else None,
                             history_dtype=converted_dtype(sample, model_output, cfg.prediction_type == (
                                 "sample" if self.predict_x0 else "epsilon")))
        push_history(outputs, result.history, order)
        push_history(self.timestep_list, timestep, order)
        self.this_order = this_order
        if p == 0:  # solver_p predicts; the fused pass gave the corrected sample
            self.last_sample = result.sample if c else sample
            guided = model_output if cond is None else model_output + guidance_scale * (cond - model_output)
            prev_sample = self.solver_p.step(guided, timestep, self.last_sample).prev_sample
        else:
            self.last_sample = result.aux if c else sample
            prev_sample = result.sample
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index = i + 1
        return SchedulerOutput(prev_sample)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: Optional[torch.Tensor] = None,
                             **kwargs) -> torch.Tensor:
        """The solver's quantity (x0 when predict_x0, else epsilon) at the current step."""
        sample = convert_arguments(args, kwargs, sample)
        return self._converted_output(model_output, sample, (self._step_index, 0, 0),
                                      self.config.thresholding and self.predict_x0)

    # ---------------------------------------------------------------- diffusers' helpers

    def multistep_uni_p_bh_update(self, model_output: torch.Tensor, *args, sample: Optional[torch.Tensor] = None,
                                  order: Optional[int] = None, **kwargs) -> torch.Tensor:
        """diffusers' UniP predictor of ``order`` from ``sample`` at the current step, with the
        converted outputs in ``self.model_outputs`` (its newest is this step's; ``model_output``
        only goes to ``solver_p``, as in diffusers): unfused, for callers that use it (``step``
        does not). Returned in the sample's dtype."""
        method = "multistep_uni_p_bh_update"
        sample, order = uni_p_arguments(args, kwargs, sample, order)
        if self.solver_p is not None:
            return self.solver_p.step(model_output, self.timestep_list[-1], sample).prev_sample
        i, sigmas = step_position(self, method, back=order - 1)
        update = self._uni_bh(sigmas, i + 1, i, [i - k for k in range(1, order)], OUTPUTS[0], list(OUTPUTS[1:order]),
                              None)
        return unfused(method, None if update is None else update[0] * X + update[1], order, i,
                       {"x": sample, **output_list(method, self.model_outputs, order)}, sample.dtype)

    def multistep_uni_c_bh_update(self, this_model_output: torch.Tensor, *args,
                                  last_sample: Optional[torch.Tensor] = None,
                                  this_sample: Optional[torch.Tensor] = None, order: Optional[int] = None,
                                  **kwargs) -> torch.Tensor:
        """diffusers' UniC corrector of ``order`` at the current step: corrects the step from
        ``last_sample`` (at the previous step) to this one with ``this_model_output``, the
        converted output here, and ``self.model_outputs`` (not yet holding it). Unfused,
        returned in ``last_sample``'s dtype; ``this_sample`` is required, as in diffusers,
        and unused."""
        method = "multistep_uni_c_bh_update"
        last_sample, order = uni_c_arguments(args, kwargs, last_sample, this_sample, order)
        i, sigmas = step_position(self, method, ahead=0, back=order)
        update = self._uni_bh(sigmas, i, i - 1, [i - 1 - k for k in range(1, order)], OUTPUTS[0],
                              list(OUTPUTS[1:order]), NEW_OUTPUT)
        tensors = {"aux": last_sample, "new_output": this_model_output,
                   **output_list(method, self.model_outputs, order)}
        return unfused(method, None if update is None else update[0] * AUX + update[1], order, i, tensors,
                       last_sample.dtype)
