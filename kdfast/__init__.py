"""kdfast: fused kernels for distilling diffusion models and sampling from them.

Pillars: fused solver steps (:mod:`kdfast.ops`, :mod:`kdfast.schedulers`,
:mod:`kdfast.sampling`). See ``kdfast info`` for what is built and usable here.
"""
__version__ = "0.1.0"

from . import backends, ops, reference, schedulers  # noqa: E402  (ops registers the torch.library ops)

__all__ = ["__version__", "backends", "ops", "reference", "schedulers"]
