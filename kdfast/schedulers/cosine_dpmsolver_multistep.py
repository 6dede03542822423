"""SDE-DPM-Solver++ (1, 2M) for Stable Audio's cosine (arctan) noise conditioning, with
Brownian-tree noise, as a drop-in for diffusers' ``CosineDPMSolverMultistepScheduler``."""
from __future__ import annotations

import math
import operator
from typing import List, Optional, Sequence, Tuple

import torch

from .._checks import check_count
from ._config import register_to_config
from ._linear import H0, NOISE, X, X0
from ._schedule import check_choice
from .base import CoefficientTable, SchedulerOutput, StepPlan, push_history, reject_unknown_step_arguments
from .dpmsolver_sde import _BrownianNoise
from .edm_dpmsolver_multistep import EDMDPMSolverMultistepScheduler


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


# alpha_t of the scheduler (inputs are pre-scaled): diffusers' int64 torch.tensor(1)
_ONE = torch.tensor(1)


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """log(alpha) - log(sigma) as diffusers computes it (float32; +inf at sigma 0)."""
    return torch.log(_ONE) - torch.log(sigma)


class _TreeNoise:
    """diffusers' noise sampler for this scheduler: a Brownian tree over ``[sigma_min,
    sigma_max]`` of the config (:class:`kdfast.schedulers.dpmsolver_sde._BrownianNoise`, the
    torchsde tree diffusers builds, queried at the same float32 times), seeded when the first
    step runs and built at its first draw (a loop whose noise is all given never builds it)."""

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, sigma_min: float,
                 sigma_max: float, seed):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.sigma_min, self.sigma_max, self.seed = sigma_min, sigma_max, seed
        self._tree: Optional[_BrownianNoise] = None

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        if self._tree is None:
            like = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self._tree = _BrownianNoise(like, self.sigma_min, self.sigma_max, self.seed)
        return self._tree(sigma, sigma_next)


class CosineDPMSolverMultistepScheduler(EDMDPMSolverMultistepScheduler):
    """Drop-in for ``diffusers.CosineDPMSolverMultistepScheduler`` (Stable Audio Open): same
    arguments, config, schedule (exponential or Karras sigmas between ``sigma_min`` and
    ``sigma_max``, timesteps ``atan(sigma) * 2 / pi``), EDM preconditioning
    (``precondition_inputs`` / ``_noise`` / ``_outputs``, ``scale_model_input``), ``add_noise`` and
    step: SDE-DPM-Solver++ of order 1 or 2 (``solver_type`` midpoint or heun) on the process
    ``x = x0 + sigma * eps``.

    Each ``step`` (and ``step_cfg``, which fuses classifier-free guidance) is one fused kernel
    pass: the output preconditioning ``x0 = c_skip * x + c_out * model_output``, the multistep
    update, the noise term and the history entry, with coefficients planned in
    ``set_timesteps`` from diffusers' own float32 scalar arithmetic (its log-SNR step ``h`` is a
    difference of float32 logs), done once on the host.

    The noise is diffusers', draw for draw: a torchsde Brownian tree over ``[sigma_min,
    sigma_max]`` (the config's, not the schedule's), built at the first step after
    ``set_timesteps`` in the shape, dtype and device of x0, seeded with ``generator.initial_seed()``
    (a list of generators, one per batch item: one tree each, seeded with theirs) or, without a
    generator, with a seed drawn from torch's global generator (a first step that fails gives
    the draw back), and queried at the step's
    float32 sigmas. The tree's draw is its own passes over the latent, as in diffusers.
    Generators passed to later steps are not read (as in diffusers). **Not sync-free:** the tree
    is drawn on the host (torchsde bisects its times in Python, reading them back), so a step
    that draws it cannot be captured in a CUDA graph, as diffusers' cannot; the seed's
    global draw reads one CPU value at the first step. ``variance_noise`` (unit variance)
    replaces a step's draw: the step path then reads nothing back (the tree is built only when
    first drawn).

    Where diffusers fails, this one stays finite: a step to an equal or larger sigma (with
    ``final_sigmas_type="sigma_min"`` the last sigma float32-rounds just above the schedule's
    last, so the last step has ``h <= 0``) draws no noise, where diffusers' tree recurses without
    end (RecursionError) and its noise scale is the square root of a negative number;
    ``prediction_type="sample"`` (a model that predicts x0) works where diffusers raises in the
    step. ``solver_order=3``, which diffusers accepts and then fails on at its third step
    (UnboundLocalError), is refused at construction, as are unknown ``sigma_schedule`` and
    ``prediction_type`` values.

    ``dpm_solver_first_order_update`` and ``multistep_dpm_solver_second_order_update`` are
    diffusers' unfused helpers (for callers that use them; ``step`` does not).
    """

    _diffusers_name = "CosineDPMSolverMultistepScheduler"
    _graph_refusal = ("its noise comes from a torchsde Brownian tree, drawn on the host (torchsde bisects its "
                      "times in Python), which a CUDA graph cannot capture")
    _compatibles = ()

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.3,
        sigma_max: float = 500,
        sigma_data: float = 1.0,
        sigma_schedule: str = "exponential",
        num_train_timesteps: int = 1000,
        solver_order: int = 2,
        prediction_type: str = "v_prediction",
        rho: float = 7.0,
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
    ):
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        else:
            check_choice("solver_type", solver_type, ("midpoint", "heun"))
        check_choice("sigma_schedule", sigma_schedule, ("exponential", "karras"))
        check_choice("prediction_type", prediction_type, ("epsilon", "sample", "v_prediction"))
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if isinstance(solver_order, bool) or solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, got {solver_order!r} (diffusers' step has no third order)")
        if not (0 < sigma_min < sigma_max and sigma_data > 0 and rho > 0):
            raise ValueError(f"need 0 < sigma_min < sigma_max, sigma_data > 0 and rho > 0; got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}, sigma_data={sigma_data}, rho={rho}")
        check_count("num_train_timesteps", num_train_timesteps, 1)
        # The training schedule, as diffusers sets it at construction; its coefficients are
        # planned only by set_timesteps.
        sigmas = self._sigmas_of_ramp(torch.linspace(0, 1, num_train_timesteps))
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._host_sigmas = self.sigmas.tolist()
        self._input_scale = self._input_scales(self.sigmas)
        self._set_timesteps(self.precondition_noise(sigmas))
        self.num_inference_steps = None
        self.noise_sampler = None
        self._table = None
        self._reset_history()

    # ---------------------------------------------------------------- schedule

    def precondition_noise(self, sigma) -> torch.Tensor:
        """``atan(sigma) * 2 / pi``, the network's noise-level input (the schedule's timesteps)."""
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor([sigma])
        return sigma.atan() / math.pi * 2

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None) -> None:
        """Compute the sigmas and timesteps (as diffusers, value for value), plan every step's
        kernel coefficients and forget the noise sampler (the next step builds a new one)."""
        try:
            n = operator.index(num_inference_steps)
        except TypeError:
            n = None
        if n is None or isinstance(num_inference_steps, bool) or n < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        cfg = self.config
        sigmas = self._sigmas_of_ramp(torch.linspace(0, 1, n)).to(dtype=torch.float32, device=device)
        timesteps = self.precondition_noise(sigmas)
        last = cfg.sigma_min if cfg.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.cat([sigmas, torch.tensor([last], dtype=torch.float32, device=device)]).to("cpu")
        self._input_scale = self._input_scales(self.sigmas)
        self._set_timesteps(timesteps, timesteps.tolist())
        self.num_inference_steps = n
        self._reset_history()
        self.noise_sampler = None
        self._host_sigmas = host = self.sigmas.tolist()  # float32 values, exactly: the tree's query times
        self._table = self._shared_table(lambda: CoefficientTable(self._plans(host)))

    # ---------------------------------------------------------------- coefficients

    def _x0_conversion(self, sigma: float, alpha_t: float, sigma_t: float):
        """(c_skip, c_out) of ``precondition_outputs`` at ``sigma``, in diffusers' float32."""
        if self.config.prediction_type == "sample":
            return 0.0, 1.0
        sd = self.config.sigma_data
        s = _f32(sigma)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2) ** 0.5
        return c_skip.item(), (c_out if self.config.prediction_type == "epsilon" else -c_out).item()

    def _update_coefficients(self, sigmas: Sequence[float], i: int, order: int) -> Tuple[float, float, float, float]:
        """``(c_x, c_d0, c_d1, c_noise)`` of step ``i`` at ``order``:
        ``x_t = c_x * x + c_d0 * D0 + c_d1 * (D0 - D0_prev) + c_noise * noise``, D0 the step's x0 and
        D0_prev the previous step's. Each is diffusers' float32 scalar (``c_d1`` the float64
        product of its two, ``1 / r0`` and the D1 weight); the noise scale is 0 for a step that
        does not lower sigma (diffusers': the square root of a negative number, or 0 * NaN)."""
        s_t, s_s0 = _f32(sigmas[i + 1]), _f32(sigmas[i])
        lam_t, lam_s0 = _lambda(s_t), _lambda(s_s0)
        h = lam_t - lam_s0
        c_x = (s_t / s_s0 * torch.exp(-h)).item()
        e2 = 1 - torch.exp(-2.0 * h)
        c_d0 = (_ONE * e2).item()
        c_noise = (s_t * torch.sqrt(e2)).item() if e2.item() > 0 else 0.0
        c_d1 = 0.0
        if order == 2:
            lam_s1 = _lambda(_f32(sigmas[i - 1]))
            r0 = (lam_s0 - lam_s1) / h
            weight = 0.5 * (_ONE * e2) if self.config.solver_type == "midpoint" \
                else _ONE * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
            c_d1 = (1.0 / r0).item() * weight.item()
        return c_x, c_d0, c_d1, c_noise

    def _plan(self, sigmas: List[float], i: int, order: int) -> Optional[StepPlan]:
        c_x, c_d0, c_d1, c_noise = self._update_coefficients(sigmas, i, order)
        if not all(math.isfinite(v) for v in (c_x, c_d0, c_d1, c_noise)):
            return None  # a combination the step never selects (order 2 into sigma 0)
        x0 = self._x0_conversion(sigmas[i], 1.0, sigmas[i])
        return StepPlan(x0=x0, sample=c_x * X + c_d0 * X0 + c_d1 * (X0 - H0) + c_noise * NOISE, history=X0)

    # ---------------------------------------------------------------- diffusers' helpers

    def convert_model_output(self, model_output: torch.Tensor, sample: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The denoised sample ``precondition_outputs(sample, model_output, sigma)`` at the current step."""
        if sample is None:
            raise ValueError("missing `sample`: convert_model_output(model_output, sample)")
        return self._converted_output(model_output, sample, (self._step_index, 1), False)

    def _helper_coefficients(self, order: int, sample, noise):
        if sample is None:
            raise ValueError("missing `sample`: the update needs the current sample")
        if noise is None:
            raise ValueError("noise: the SDE-DPM-Solver++ update needs the step's noise (diffusers asserts it)")
        if self._step_index is None or self.num_inference_steps is None:
            raise ValueError("the update needs a step index: call set_timesteps(...) and step() (or set_begin_index)")
        return self._update_coefficients(self._host_sigmas, self._step_index, order)

    def dpm_solver_first_order_update(self, model_output: torch.Tensor, sample: Optional[torch.Tensor] = None,
                                      noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One first-order SDE-DPM-Solver++ update from the converted ``model_output`` (x0) at the
        current step, unfused, as diffusers' helper."""
        c_x, c_d0, _, c_noise = self._helper_coefficients(1, sample, noise)
        return c_x * sample + c_d0 * model_output + c_noise * noise

    def multistep_dpm_solver_second_order_update(self, model_output_list: List[torch.Tensor],
                                                 sample: Optional[torch.Tensor] = None,
                                                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One second-order multistep SDE-DPM-Solver++ update from the last two converted outputs
        (``model_output_list[-1]`` the current x0) at the current step, unfused, as diffusers' helper."""
        c_x, c_d0, c_d1, c_noise = self._helper_coefficients(2, sample, noise)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        return c_x * sample + c_d0 * m0 + c_d1 * (m0 - m1) + c_noise * noise

    @property
    def multistep_dpm_solver_third_order_update(self):
        # EDM's third-order helper is not this solver's (orders 1 and 2; diffusers' has no such
        # method): hidden, so that hasattr() says so
        raise AttributeError("CosineDPMSolverMultistepScheduler has no third-order update (solver_order 1 or 2)")

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None):
        """diffusers' ``step`` (same positional order): one fused kernel pass. ``generator`` (or a
        list, one per batch item) seeds the Brownian tree at the first step after
        ``set_timesteps``; ``variance_noise`` replaces this step's tree draw."""
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise)
        return out if return_dict else out.to_tuple()

    def _noise_sampler_for(self, generator, like_shape, dtype, device) -> _TreeNoise:
        """The step's noise sampler, made at the first step with diffusers' seed."""
        if generator is None:
            seed = int(torch.randint(0, 2**63 - 1, []).item())  # diffusers' draw from the global generator
        elif isinstance(generator, (list, tuple)):
            if len(generator) != like_shape[0]:
                raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of "
                                 f"{like_shape[0]}; pass one per batch entry (one Brownian tree each) or a single one")
            seed = [g.initial_seed() for g in generator]
        elif isinstance(generator, torch.Generator):
            seed = generator.initial_seed()
        else:
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        cfg = self.config
        return _TreeNoise(tuple(like_shape), dtype, device, float(cfg.sigma_min), float(cfg.sigma_max), seed)

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        i, n = self._step_index, len(self._host_timesteps)
        if i >= n:
            raise IndexError(f"step {i} is past the end of the {n}-step schedule; call set_timesteps again")
        order = self._step_order(i, n)
        while order > 1 and (i, order) not in self._table:
            order -= 1  # no finite second-order update here (order 2 into sigma 0, history injected)
        if (i, order) not in self._table:
            raise ValueError(f"no finite SDE-DPM-Solver++ update at step {i} (sigma {self._host_sigmas[i]:g} to "
                             f"{self._host_sigmas[i + 1]:g})")
        history = self.model_outputs[:-order:-1]  # the newest order - 1 entries, newest first
        if len(history) < order - 1 or any(h is None for h in history):
            raise ValueError("model_outputs is missing the entry this second-order step needs")
        x0_dtype = torch.promote_types(sample.dtype, model_output.dtype)  # diffusers' x0 (and tree) dtype
        new_tree = self.noise_sampler is None
        # a first step that fails leaves the global generator as it found it (its seed draw undone)
        global_rng = torch.get_rng_state() if new_tree and generator is None else None
        if new_tree:
            self.noise_sampler = self._noise_sampler_for(generator, sample.shape, x0_dtype, sample.device)
        key = (i, order)
        noise = None
        if self._table.plans[key].uses("noise"):
            noise = variance_noise if variance_noise is not None else \
                self.noise_sampler(self._host_sigmas[i], self._host_sigmas[i + 1])
        try:
            result = self._fused(key, sample, model_output, cond=cond, guidance_scale=guidance_scale,
                                 history=history, noise=noise, write_history=True, history_dtype=x0_dtype)
        except BaseException:
            if new_tree:  # refused inputs (a NaN guidance scale, say) leave no tree: a retry seeds its own
                self.noise_sampler = None
            if global_rng is not None:
                torch.set_rng_state(global_rng)
            raise
        push_history(self.model_outputs, result.history, self.config.solver_order)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index = i + 1
        return SchedulerOutput(result.sample)
