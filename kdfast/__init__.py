"""kdfast: fused kernels for distilling diffusion models and sampling from them.

Pillars available now: fused solver steps (:mod:`kdfast.ops`, :mod:`kdfast.schedulers`,
:mod:`kdfast.sampling`, :func:`kdfast.sample`, and :class:`kdfast.CapturedSampler` for whole
loops replayed as CUDA graphs) and fused distillation losses (:mod:`kdfast.losses`), with
teacher inference (:mod:`kdfast.inference`: fused group norms, channels-last). See
``kdfast info`` for what is built and usable here.
"""
__version__ = "0.1.0"

from . import _ext, backends, inference, losses, ops, reference, sampling, schedulers  # noqa: E402  (ops registers the torch.library ops)
from .sampling import CapturedSampler, sample  # noqa: E402

if _ext.is_unbuilt_source_tree():
    import warnings as _warnings

    _warnings.warn(f"kdfast is imported from its source tree ({__path__[0]}), which holds no compiled kernels: "
                   "every op falls back to the torch reference. Install kdfast (pip install .) and run from "
                   "another directory, or install it in editable mode (pip install -e .).", RuntimeWarning)

__all__ = ["__version__", "CapturedSampler", "backends", "inference", "losses", "ops", "reference", "sample", "sampling", "schedulers"]
