"""Turning diffusers schedulers and pipelines into their kdfast equivalents."""
from __future__ import annotations

import functools
import sys
from typing import Dict, Type

from .base import FusedScheduler


def _registry() -> Dict[str, Type[FusedScheduler]]:
    """The diffusers class name -> kdfast class of every scheduler ``kdfast.schedulers`` exports."""
    from .. import schedulers

    classes = (getattr(schedulers, name) for name in schedulers.__all__)
    return {cls.diffusers_class_name(): cls for cls in classes
            if isinstance(cls, type) and issubclass(cls, FusedScheduler) and cls is not FusedScheduler}


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


# Schedulers whose pipelines choose their loop with isinstance(scheduler, <the diffusers class>),
# which a kdfast scheduler is not: a patched pipeline would run the wrong loop.
_UNPATCHABLE = {
    "CogVideoXDPMScheduler": (
        "CogVideoX pipelines choose how to call step() with isinstance(scheduler, diffusers.CogVideoXDPMScheduler), "
        "which kdfast's CogVideoXDPMScheduler is not: they would call it as a DDIM step. Patch a pipeline using "
        "CogVideoXDDIMScheduler, or run kdfast.schedulers.CogVideoXDPMScheduler in your own loop or kdfast.sample"),
    "DDPMWuerstchenScheduler": (
        "Stable Cascade and Wuerstchen pipelines choose their loop with isinstance(scheduler, "
        "diffusers.DDPMWuerstchenScheduler), which kdfast's DDPMWuerstchenScheduler is not: they would step from the "
        "schedule's final 0 and condition the model on t / timesteps[-1] (a division by 0). Run "
        "kdfast.schedulers.DDPMWuerstchenScheduler in your own loop or kdfast.sample"),
}


def patch_pipeline(pipe):
    """Swap ``pipe.scheduler`` for its kdfast equivalent, in place; returns ``pipe``.

    Every ``scheduler.step`` of the pipeline then runs as one fused kernel pass. diffusers
    pipelines still combine classifier-free guidance themselves before calling ``step``; to
    fuse guidance as well, write the loop with ``scheduler.step_cfg`` or use ``kdfast.sample``.
    For a diffusers pipeline, ``pipe.save_pretrained`` still writes a stock diffusers pipeline
    (the scheduler as the diffusers class of the same config). So do the pipelines made from it
    (``from_pipe``, ``copy.deepcopy``) and, from then on in this process, any diffusers pipeline
    given a kdfast scheduler: the first call wraps ``DiffusionPipeline.save_pretrained`` once
    for the whole process (pipelines without a kdfast scheduler save exactly as before).
    Objects that are not ``DiffusionPipeline`` s get their scheduler swapped, not their saving.
    """
    if not hasattr(pipe, "scheduler"):
        raise TypeError(f"{type(pipe).__name__} has no scheduler to patch")
    refusal = _UNPATCHABLE.get(type(pipe.scheduler).__name__)
    if refusal is not None:
        raise ValueError(refusal)
    pipe.scheduler = from_diffusers(pipe.scheduler)
    diffusers = sys.modules.get("diffusers")  # a diffusers pipeline means diffusers is imported
    if diffusers is not None and isinstance(pipe, diffusers.DiffusionPipeline):
        _save_kdfast_schedulers_as_stock(diffusers.DiffusionPipeline)
    return pipe


def _save_kdfast_schedulers_as_stock(pipeline_cls) -> None:
    """Make ``pipeline_cls.save_pretrained`` write each kdfast scheduler of a pipeline as the
    diffusers class it replaces.

    diffusers saves only components derived from its own base classes, so a pipeline holding a
    kdfast scheduler would be saved without one (``"scheduler": [null, null]``) and fail to
    load. The configs are the same, so the saved pipeline is the stock diffusers pipeline: load
    it as usual, patch it again. The change is to the class, not to one pipeline: pipelines made
    from a patched one by ``from_pipe`` (a new pipeline sharing the scheduler) or ``deepcopy``
    save the same way. Pipelines without a kdfast scheduler save exactly as before.
    """
    save = pipeline_cls.save_pretrained
    if getattr(save, "_kdfast_saves_stock", False):
        return

    @functools.wraps(save)
    def save_pretrained(self, *args, **kwargs):
        fused = {name: module for name, module in vars(self).items()
                 if isinstance(module, FusedScheduler) and name in self.config}
        if not fused:
            return save(self, *args, **kwargs)
        import diffusers

        entries = {name: self.config[name] for name in fused}
        try:
            for name, scheduler in fused.items():
                stock = getattr(diffusers, scheduler.diffusers_class_name())
                setattr(self, name, stock.from_config(scheduler.config))
                # (diffusers keeps an entry a failed save left at [null, null]; set it outright)
                self.register_to_config(**{name: ("diffusers", stock.__name__)})
            return save(self, *args, **kwargs)
        finally:
            for name, scheduler in fused.items():
                setattr(self, name, scheduler)
                self.register_to_config(**{name: entries[name]})

    # seen in tracebacks and help(): this is kdfast's wrapper, not diffusers' own method
    save_pretrained.__qualname__ = f"kdfast.schedulers.patch_pipeline.<save_pretrained of {save.__qualname__}>"
    save_pretrained._kdfast_saves_stock = True  # type: ignore[attr-defined]
    pipeline_cls.save_pretrained = save_pretrained
