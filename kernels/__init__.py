"""Triton kernels of kdfast (installed as ``kdfast.kernels``): one file per op, the
launcher beside its ``@triton.jit`` function. Called only from ``kdfast.ops``."""
from . import kd_divergence, solver_step

__all__ = ["kd_divergence", "solver_step"]
from . import diffusion_losses  # noqa: E402

__all__ += ["diffusion_losses"]
from . import group_norm  # noqa: E402

__all__ += ["group_norm"]
from . import grid_combination  # noqa: E402

__all__ += ["grid_combination"]
from . import kd_topk  # noqa: E402

__all__ += ["kd_topk"]
