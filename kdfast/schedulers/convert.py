"""Turning diffusers schedulers and pipelines into their kdfast equivalents."""
from __future__ import annotations

from typing import Dict, Type

from .base import FusedScheduler


def _registry() -> Dict[str, Type[FusedScheduler]]:
    from . import (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                   EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, LCMScheduler,
                   UniPCMultistepScheduler)

    classes = (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
               EulerDiscreteScheduler, HeunDiscreteScheduler, LCMScheduler, UniPCMultistepScheduler)
    return {cls._diffusers_name or cls.__name__: cls for cls in classes}


def supported() -> list:
    """Names of the diffusers scheduler classes kdfast replaces."""
    return sorted(_registry())


def from_diffusers(scheduler) -> FusedScheduler:
    """The kdfast scheduler equivalent to a diffusers scheduler instance (same config).

    Raises ValueError naming the class when kdfast has no equivalent.
    """
    if isinstance(scheduler, FusedScheduler):
        return scheduler
    name = type(scheduler).__name__
    cls = _registry().get(name)
    if cls is None:
        raise ValueError(f"kdfast has no fused equivalent of {name}; supported: {', '.join(supported())}")
    return cls.from_config(scheduler.config)


def patch_pipeline(pipe):
    """Swap ``pipe.scheduler`` for its kdfast equivalent, in place; returns ``pipe``.

    Every ``scheduler.step`` of the pipeline then runs as one fused kernel pass. diffusers
    pipelines still combine classifier-free guidance themselves before calling ``step``; to
    fuse guidance as well, write the loop with ``scheduler.step_cfg`` or use ``kdfast.sample``.
    ``pipe.save_pretrained`` still writes a stock diffusers pipeline (the scheduler as the
    diffusers class of the same config).
    """
    if not hasattr(pipe, "scheduler"):
        raise TypeError(f"{type(pipe).__name__} has no scheduler to patch")
    pipe.scheduler = from_diffusers(pipe.scheduler)
    if hasattr(pipe, "save_pretrained") and not getattr(pipe, "_kdfast_saves_stock", False):
        _save_with_stock_scheduler(pipe)
    return pipe


def _save_with_stock_scheduler(pipe) -> None:
    """Make ``pipe.save_pretrained`` write the scheduler as the diffusers class it replaces.

    diffusers saves only components derived from its own base classes, so a pipeline holding a
    kdfast scheduler would be saved without one and fail to load. The configs are the same, so
    the saved pipeline is the stock diffusers pipeline: load it as usual, patch it again.
    """
    save = pipe.save_pretrained

    def save_pretrained(*args, **kwargs):
        fused = pipe.scheduler
        if not isinstance(fused, FusedScheduler):
            return save(*args, **kwargs)
        import diffusers

        name = type(fused)._diffusers_name or type(fused).__name__
        pipe.scheduler = getattr(diffusers, name).from_config(fused.config)
        try:
            return save(*args, **kwargs)
        finally:
            pipe.scheduler = fused

    save_pretrained.__doc__ = save.__doc__
    pipe.save_pretrained = save_pretrained
    pipe._kdfast_saves_stock = True
