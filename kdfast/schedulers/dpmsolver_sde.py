"""Stochastic DPM-Solver++ (k-diffusion's ``sample_dpmpp_sde``) with Brownian-tree noise, as a
diffusers drop-in."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

# (the module, not its names: kdfast.sampling imports kdfast.schedulers, which imports this module)
from ._config import register_to_config
from ._helpers import KarrasForTheStepCount
from ._linear import AUX, NOISE, X, X0
from ._schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS, check_choice, noise_schedule, sigma_to_t
from .base import GrowingTable, SchedulerOutput, StepPlan, reject_unknown_step_arguments
from .euler_discrete import _SigmaScheduler, check_sigma_options, converted_sigmas, spaced_timesteps, train_sigmas
from .lms_discrete import SIGMA_PREDICTION_TYPES, sigma_derivative, sigma_x0


def _float32_time(sigma: torch.Tensor) -> torch.Tensor:
    """The Brownian tree's time of a noise level: the float32 number diffusers passes (its
    sigmas are float32 tensors), so that the tree is queried at the same times."""
    return sigma.to(torch.float32)


def _stage_sigmas(sigma: float, sigma_next: float) -> Tuple[float, float, float, float]:
    """(sigma_fn(t), sigma_fn(t_proposed), sigma_fn(t_next), sqrt(sigma_fn(t_proposed)**2 + 1)) of
    the step from ``sigma`` to ``sigma_next``, with diffusers' float32 0-d tensor operations in
    its order: the first three are the times its Brownian tree is queried at, which must be
    the same numbers bit for bit (a query moved by one ulp draws other noise), and the last
    is its input scaling at the midpoint."""
    s, s_next = torch.tensor(sigma, dtype=torch.float32), torch.tensor(sigma_next, dtype=torch.float32)
    t, t_next = s.log().neg(), s_next.log().neg()
    t_mid = t + (t_next - t) * 0.5
    mid = t_mid.neg().exp()
    return t.neg().exp().item(), mid.item(), t_next.neg().exp().item(), ((mid**2 + 1) ** 0.5).item()


class _BrownianNoise:
    """diffusers' noise sampler: :class:`kdfast.sampling.BrownianTreeNoiseSampler`, the same
    torchsde tree as diffusers' (a ``BrownianInterval`` with ``tol=1e-6``, ``pool_size=24``,
    ``halfway_tree=True``, one per seed of a seed list) queried at float32 times. A tree's noise
    is a function of its seed, shape, dtype, device and interval alone, not of the queries
    made, so a copy of the scheduler (``deepcopy``, ``pickle``) builds it again from those:
    torchsde's trees do not survive a deepcopy, nor diffusers' sampler pickling."""

    def __init__(self, like: torch.Tensor, sigma_min: float, sigma_max: float, seed):
        self._recipe = (tuple(like.shape), like.dtype, like.device, sigma_min, sigma_max, seed)
        from .. import sampling as _sampling  # (here: kdfast.sampling imports the schedulers)

        self.sampler = _sampling.BrownianTreeNoiseSampler(like, sigma_min, sigma_max, seed=seed,
                                                          transform=_float32_time)

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        return self.sampler(sigma, sigma_next)

    def __reduce__(self):
        return _rebuilt_noise, self._recipe


def _rebuilt_noise(shape, dtype, device, sigma_min, sigma_max, seed) -> _BrownianNoise:
    return _BrownianNoise(torch.zeros(shape, dtype=dtype, device=device), sigma_min, sigma_max, seed)


class _Table(GrowingTable):
    """The plans of a schedule, and per first-stage index the float32 noise levels its two
    stages need on the host (see :func:`_stage_sigmas`)."""

    def __init__(self, plans, stages: Dict[int, Tuple[float, float, float, float]]):
        super().__init__(plans)
        self.stages = stages


class DPMSolverSDEScheduler(KarrasForTheStepCount, _SigmaScheduler):
    """Drop-in for ``diffusers.DPMSolverSDEScheduler``: same arguments and config.

    The stochastic DPM-Solver++ of k-diffusion (``sample_dpmpp_sde``, midpoint ``r = 1/2``,
    ``eta = 1``). As in diffusers, the schedule repeats every timestep after the first with
    the midpoint (in log sigma) timesteps interleaved, and ``step`` alternates between two
    stages (``order = 2``): an ancestral DPM-Solver++ step from sigma to the midpoint, then
    one from the first stage's sample to the next sigma with the midpoint's x0. Each stage
    is one fused kernel pass: x0 conversion, update and noise; the second reads the first
    stage's input sample (diffusers' ``self.sample``, kept by reference, not copied) as its
    aux input. The update mixes the two stages' x0 with weights ``1 - 1/(2r) = 0`` and ``1``,
    so the first stage's x0 is not kept. The last step (into sigma 0) is an Euler step.

    The noise is diffusers': a torchsde Brownian tree over ``[smallest nonzero sigma, largest
    sigma]`` built at the first step in the sample's shape, dtype and device, seeded with
    ``noise_sampler_seed`` (or, when that is None, a seed drawn from torch's global generator,
    as diffusers draws it), and queried at the same float32 times. ``step`` takes no
    generator (diffusers' does not: pipelines then pass none); ``variance_noise`` replaces a
    stage's draw. torchsde draws on the host (it compares and bisects times in Python), so,
    as diffusers', this step cannot be captured in a CUDA graph; the rest of it reads nothing
    back from the device. ``prediction_type="sample"`` also works here (diffusers raises
    NotImplementedError).
    """

    _diffusers_name = "DPMSolverSDEScheduler"
    _noise_source = "its noise comes from a Brownian tree seeded with config.noise_sampler_seed"
    _graph_refusal = ("its noise comes from a torchsde Brownian tree, drawn on the host (torchsde bisects its "
                      "times in Python), which a CUDA graph cannot capture")
    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        noise_sampler_seed: Optional[int] = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        check_sigma_options(self.config)
        check_choice("prediction_type", prediction_type, SIGMA_PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        _check_seed(noise_sampler_seed)
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(num_train_timesteps, beta_start, beta_end,
                                                                      beta_schedule, trained_betas)
        self.use_karras_sigmas = use_karras_sigmas
        self.noise_sampler_seed = noise_sampler_seed
        # diffusers sets a full-length schedule at construction; its coefficients are made on
        # the first step that needs them.
        self._set_schedule(num_train_timesteps, None, num_train_timesteps, build=False)

    # ---------------------------------------------------------------- schedule

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps: Optional[int] = None) -> None:
        """Compute the timesteps (with the midpoints interleaved) and doubled sigmas, and both
        stages' kernel coefficients; the next step builds a new Brownian tree."""
        self._set_schedule(num_inference_steps, device, num_train_timesteps, build=True)

    def _set_schedule(self, num_inference_steps, device, num_train_timesteps, build: bool) -> None:
        cfg = self.config
        n = num_inference_steps
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {n!r}")
        n = int(n)
        T = num_train_timesteps or cfg.num_train_timesteps
        if cfg.timestep_spacing == "linspace":  # diffusers spaces these in float64 here (not float32 as Euler)
            timesteps = np.linspace(0, T - 1, n, dtype=float)[::-1].copy()
        else:  # integers: the same in either precision
            timesteps = spaced_timesteps(cfg.timestep_spacing, T, n, cfg.steps_offset).astype(float)
        train = train_sigmas(self.alphas_cumprod)
        with np.errstate(divide="ignore"):  # a zero training sigma (beta_start=0) has log -inf, as in diffusers
            log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        # (Karras sigmas between the schedule's own ends, as diffusers' DPM-SDE spaces them)
        converted = converted_sigmas(cfg, sigmas, log_sigmas, n, karras_reads_config=False)
        if converted is not None:
            sigmas, timesteps = converted
        with np.errstate(divide="ignore", invalid="ignore"):
            midpoints = _midpoint_timesteps(sigmas, log_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self._set_sigmas(torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]))
        timesteps = torch.from_numpy(np.asarray(timesteps, dtype=np.float64))
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        timesteps[1::2] = torch.from_numpy(midpoints)
        if str(device).startswith("mps"):  # (no float64 there, as in diffusers)
            timesteps = timesteps.to(torch.float32)
        self._set_timesteps(timesteps.to(device=device), timesteps.tolist())
        self.num_inference_steps = n
        positive = [s for s in self._host_sigmas if s > 0]
        self._tree_range = (min(positive), max(positive)) if positive else None
        self.noise_sampler = None
        self.sample = None
        self.mid_point_sigma = None
        self._mid_div = None
        self._step_index = None
        self._begin_index = None
        self._table = self._shared_table(self._build_table) if build else None

    def _build_table(self) -> _Table:
        S = self._host_sigmas
        # the noise levels of the step from S[k] to S[k + 1]: a first stage at k, a second at k + 1
        stages = {k: _stage_sigmas(S[k], S[k + 1]) for k in range(len(S) - 1) if S[k] != 0 and S[k + 1] != 0}
        plans = {}
        for k in range(len(S) - 1):
            plans[(k, 1)] = self._plan(k, 1, 1.0, stages)
            if k > 0 and S[k] != 0 and k - 1 in stages:
                plans[(k, 2)] = self._plan(k, 2, 1.0, stages)
        return _Table(plans, stages)

    def _plan(self, k: int, stage: int, s_noise: float, stages) -> StepPlan:
        S, pt = self._host_sigmas, self.config.prediction_type
        if stage == 1 and (k not in stages):
            # into sigma 0 (or from it): an Euler step, with diffusers' (x - x0) / sigma simplified
            sigma, sigma_next = S[k], S[k + 1]
            return StepPlan(x0=sigma_x0(pt, sigma), sample=X + (sigma_next - sigma) * sigma_derivative(pt, sigma),
                            aux=X0)  # aux output: pred_original_sample, written when asked for
        sigma_from, sigma_mid, sigma_next, _ = stages[k if stage == 1 else k - 1]
        if stage == 1:  # from x to the midpoint, x0 at sigma
            x0, start, sigma_to = sigma_x0(pt, S[k]), X, sigma_mid
        else:  # from the first stage's x (aux) to the next sigma, x0 at the midpoint
            x0, start, sigma_to = sigma_x0(pt, sigma_mid), AUX, sigma_next
        # DPM-Solver++(1) to sigma_down plus sigma_up of fresh noise, in float64 from diffusers'
        # float32 noise levels (its float32 sigma_down**2 = sigma_to**2 - sigma_up**2 cancels)
        from .. import sampling as _sampling  # (here: kdfast.sampling imports the schedulers)

        sigma_down, sigma_up = _sampling.get_ancestral_step(sigma_from, sigma_to)
        a, c = _sampling._exp_step(sigma_from, sigma_down)
        # (a zero noise coefficient means no draw: where sigma_up = 0 diffusers' 0 * (0 / 0) is NaN)
        update = a * start + c * X0 + (s_noise * sigma_up) * NOISE
        return StepPlan(x0=x0, sample=update, aux=X0)

    def _noise_times(self, k: int, stage: int) -> Tuple[float, float]:
        sigma_from, sigma_mid, sigma_next, _ = self._table.stages[k if stage == 1 else k - 1]
        return sigma_from, sigma_mid if stage == 1 else sigma_next

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next step is the first half of a two-stage step, as in diffusers."""
        return self.sample is None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``sample / sqrt(sigma**2 + 1)``, with the midpoint's sigma in the second stage."""
        if self._step_index is None:
            self._init_step_index(timestep)
        if self.sample is None:
            return sample / self._input_div[self._step_index]
        return sample / self._mid_div

    # ---------------------------------------------------------------- step

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             s_noise: float = 1.0, variance_noise: Optional[torch.Tensor] = None,
             return_pred_original_sample: bool = False):
        """diffusers' ``step`` (same positional order). ``variance_noise`` (unit variance)
        replaces the Brownian tree's draw of this stage. ``pred_original_sample`` is computed
        when first read, or written by the step with ``return_pred_original_sample=True``."""
        out = self._step(model_output, timestep, sample, None, 1.0, None, variance_noise, s_noise=s_noise,
                         return_pred_original_sample=return_pred_original_sample)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              s_noise: float = 1.0, return_pred_original_sample: bool = False, **kwargs) -> SchedulerOutput:
        reject_unknown_step_arguments(kwargs)
        if generator is not None:
            raise TypeError(f"generator: DPMSolverSDEScheduler takes none, as diffusers' does not "
                            f"({self._noise_source})")
        s_noise = float(s_noise)
        if not np.isfinite(s_noise):
            raise ValueError(f"s_noise must be a finite number, got {s_noise}")
        self._check_step_inputs(model_output, sample)
        self._require_table()
        k = self._index_for_step(timestep)
        if self.noise_sampler is None:  # at the first step, as diffusers (a None seed is drawn now)
            if self._tree_range is None:
                raise ValueError("the schedule has no nonzero sigma for the Brownian tree to span")
            seed = self.noise_sampler_seed
            if seed is None:  # drawn from torch's global generator, as diffusers draws it
                seed = int(torch.randint(0, 2**63 - 1, []).item())
            self.noise_sampler = _BrownianNoise(sample, *self._tree_range, seed)
        first = self.sample is None
        stage = 1 if first else 2
        if not first:
            if (k, 2) not in self._table:
                raise IndexError(f"no second DPMSolverSDE stage at step index {k}")
            if self.sample.shape != sample.shape:
                raise ValueError(f"sample shape {tuple(sample.shape)} does not match the first stage's sample shape "
                                 f"{tuple(self.sample.shape)}; call step in order")
        key = (k, stage)
        if s_noise != 1.0:
            key = self._table.ensure((k, stage, s_noise), lambda: self._plan(k, stage, s_noise, self._table.stages))
        noise = None
        if self._table.plan(key).uses("noise"):
            noise = variance_noise if variance_noise is not None else self.noise_sampler(*self._noise_times(k, stage))
        out = self._fused_output(key, sample, model_output, want_x0=return_pred_original_sample, cond=cond,
                                 guidance_scale=guidance_scale, aux=None if first else self.sample, noise=noise)
        if first and k in self._table.stages:  # keep what the second stage needs
            self.sample = sample
            _, mid, _, self._mid_div = self._table.stages[k]
            self.mid_point_sigma = torch.tensor(mid, dtype=torch.float32)
        elif not first:
            self.sample = self.mid_point_sigma = self._mid_div = None
        self._step_index += 1
        return out


def _midpoint_timesteps(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The training timestep of each midpoint (in log sigma) of the per-step ``sigmas``, as
    diffusers computes them (float64, one sigma at a time)."""
    t = -np.log(sigmas)
    midpoints = np.exp(-(t[:-1] + np.diff(t) * 0.5))
    return np.array([sigma_to_t(s, log_sigmas) for s in midpoints], dtype=np.float64)


def _check_seed(seed) -> None:
    """``noise_sampler_seed``: None, a non-negative int, or a list of them (one tree per batch item)."""
    seeds = seed if isinstance(seed, (list, tuple)) else [seed] if seed is not None else []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"noise_sampler_seed must be None, a non-negative int or a list of them, got {seed!r}")
