"""Pure-torch specifications of every kdfast op: the ground truth of the tests."""
from . import kd_divergence, kd_topk, solver_step

__all__ = ["kd_divergence", "kd_topk", "solver_step"]
from . import diffusion_losses  # noqa: E402

__all__ += ["diffusion_losses"]
from . import group_norm  # noqa: E402

__all__ += ["group_norm"]
from . import grid_combination  # noqa: E402

__all__ += ["grid_combination"]
