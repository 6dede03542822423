"""diffusers drop-in schedulers whose ``step`` is one fused kernel pass.

``pipe.scheduler = kdfast.schedulers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``
"""
from .base import FusedScheduler, SchedulerOutput
from .dpmsolver_multistep import DPMSolverMultistepScheduler

__all__ = ["FusedScheduler", "SchedulerOutput", "DPMSolverMultistepScheduler"]
