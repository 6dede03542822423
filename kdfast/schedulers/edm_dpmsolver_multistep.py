"""DPM-Solver++ (1, 2M, 3M) and SDE-DPM-Solver++ for EDM-preconditioned models (Playground
v2.5 and other EDM networks), as a drop-in for diffusers' ``EDMDPMSolverMultistepScheduler``."""
from __future__ import annotations

from typing import List, Optional

import torch

from ._config import register_to_config
from ._schedule import check_choice
from .base import CoefficientTable
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .edm_euler import EDMPreconditioning
from .euler_discrete import _SigmaScheduler


class EDMDPMSolverMultistepScheduler(EDMPreconditioning, DPMSolverMultistepScheduler):
    """Drop-in for ``diffusers.EDMDPMSolverMultistepScheduler``: same arguments, config and
    schedule (Karras or exponential sigmas between ``sigma_min`` and ``sigma_max``, timesteps
    ``0.25 * log(sigma)``), with the multistep updates of :class:`DPMSolverMultistepScheduler`
    on the EDM process ``x = x0 + sigma * eps`` (alpha = 1).

    Each ``step`` is one fused kernel pass: the EDM output preconditioning
    ``x0 = c_skip * x + c_out * model_output`` (dynamic thresholding applied to it), the
    multistep update and, for ``sde-dpmsolver++``, the noise drawn as diffusers draws it.
    ``prediction_type="sample"`` (a model that predicts x0) works here too; diffusers lists it
    and then raises in the step.
    """

    _diffusers_name = "EDMDPMSolverMultistepScheduler"
    _no_third_order = ("sde-dpmsolver++",)  # (its third-order update takes no noise)
    _edm = True
    _noise_in_converted_dtype = True
    _compatibles = ()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             variance_noise: Optional[torch.Tensor] = None, **kwargs):
        """diffusers' ``step``, in its argument order (``generator``, then ``return_dict``: the
        EDM class takes no ``variance_noise``, which may be given here by name)."""
        return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                            return_dict=return_dict, **kwargs)

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        solver_order: int = 2,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
    ):
        if algorithm_type == "deis":
            self.register_to_config(algorithm_type="dpmsolver++")
        else:
            check_choice("algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        else:
            check_choice("solver_type", solver_type, ("midpoint", "heun"))
        check_choice("sigma_schedule", sigma_schedule, ("karras", "exponential"))
        check_choice("prediction_type", prediction_type, ("epsilon", "sample", "v_prediction"))
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}")
        if not (0 < sigma_min < sigma_max and sigma_data > 0 and rho > 0):
            raise ValueError(f"need 0 < sigma_min < sigma_max, sigma_data > 0 and rho > 0; got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}, sigma_data={sigma_data}, rho={rho}")
        # The training schedule, as diffusers sets it at construction; its coefficients are
        # planned only by set_timesteps.
        sigmas = self._sigmas_of_ramp(torch.linspace(0, 1, num_train_timesteps))
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._input_scale = self._input_scales(self.sigmas)
        self._set_timesteps(self.precondition_noise(sigmas))
        self.num_inference_steps = None
        self._table = None
        self._reset_history()

    # ---------------------------------------------------------------- schedule

    def _sigmas_of_ramp(self, ramp: torch.Tensor) -> torch.Tensor:
        if self.config.sigma_schedule == "karras":
            return self._compute_karras_sigmas(ramp)
        return self._compute_exponential_sigmas(ramp)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None) -> None:
        """Compute the EDM sigmas and timesteps (as diffusers, value for value) and every step's
        kernel coefficients."""
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = int(num_inference_steps)
        cfg = self.config
        sigmas = self._sigmas_of_ramp(torch.linspace(0, 1, n)).to(torch.float32)
        last = cfg.sigma_min if cfg.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.cat([sigmas, torch.tensor([last], dtype=torch.float32)])
        self._input_scale = self._input_scales(self.sigmas)
        timesteps = self.precondition_noise(sigmas)
        self._set_timesteps(timesteps.to(device=device), timesteps.tolist())
        self.num_inference_steps = n
        self._reset_history()
        host = self.sigmas.tolist()
        self._table = self._shared_table(lambda: CoefficientTable(self._plans(host)))

    # The EDM process: x = x0 + sigma * eps, so alpha_t = 1 and sigma_t = sigma; x0 is the
    # preconditioned model output.
    def _alpha_sigma(self, sigma: float):
        return 1.0, sigma

    def _x0_conversion(self, sigma: float, alpha_t: float, sigma_t: float):
        return self._output_scalings(sigma)

    # ---------------------------------------------------------------- model input / output

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``precondition_inputs`` at the current step's sigma."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return sample * self._input_scale[self._step_index]

    def convert_model_output(self, model_output: torch.Tensor, sample: Optional[torch.Tensor] = None
                             ) -> torch.Tensor:
        """The denoised sample (thresholded as the step thresholds it) at the current step."""
        if sample is None:
            raise ValueError("missing `sample`: convert_model_output(model_output, sample)")
        return self._converted_output(model_output, sample, (self._step_index, 1), self.config.thresholding)

    # ---------------------------------------------------------------- diffusers' helpers

    def _sigma_to_alpha_sigma_t(self, sigma):
        """(alpha_t, sigma_t) = (1, sigma): inputs are pre-scaled (diffusers' int64 ``tensor(1)``)."""
        return torch.tensor(1), sigma

    # diffusers' EDM helpers take the sample second (required) and no timesteps
    def dpm_solver_first_order_update(self, model_output: torch.Tensor, sample: torch.Tensor,
                                      noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """diffusers' first-order update from the converted ``model_output`` (the denoised
        sample) at the current step: unfused, for callers that use it (``step`` does not).
        ``noise`` is required by ``sde-dpmsolver++``."""
        return self._helper_update("dpm_solver_first_order_update", 1, [model_output], sample, noise)

    def multistep_dpm_solver_second_order_update(self, model_output_list: List[torch.Tensor], sample: torch.Tensor,
                                                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """diffusers' second-order multistep update from the last two converted outputs, unfused."""
        return self._helper_update("multistep_dpm_solver_second_order_update", 2, model_output_list, sample, noise)

    def multistep_dpm_solver_third_order_update(self, model_output_list: List[torch.Tensor],
                                                sample: torch.Tensor) -> torch.Tensor:
        """diffusers' third-order multistep update from the last three converted outputs, unfused
        (``dpmsolver++`` only: diffusers' has no noise argument)."""
        return self._helper_update("multistep_dpm_solver_third_order_update", 3, model_output_list, sample, None)

    # x + sigma * noise at each timestep: the EDM process is the sigma schedulers' one
    add_noise = _SigmaScheduler.add_noise
