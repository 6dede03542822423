"""kdfast ops: validation, backend choice and torch.library registration of every kernel.

This package is the only place where tensors become addresses for the compiled kernels.
"""
from .kd_divergence import kd_divergence, kd_divergence_with_grad
from .kd_topk import kd_topk, kd_topk_with_grad
from .solver_step import StepResult, coefficients, solver_step, threshold_scale

__all__ = ["StepResult", "coefficients", "kd_divergence", "kd_divergence_with_grad", "kd_topk", "kd_topk_with_grad",
           "solver_step", "threshold_scale"]
from .diffusion_losses import dmd, pd_target, per_sample_ddim_step, progressive_mse, pseudo_huber  # noqa: E402

__all__ += ["dmd", "pd_target", "per_sample_ddim_step", "progressive_mse", "pseudo_huber"]
from .group_norm import group_norm_act  # noqa: E402

__all__ += ["group_norm_act"]
from .grid_combination import grid_combination  # noqa: E402

__all__ += ["grid_combination"]
