"""diffusers drop-in schedulers whose ``step`` is one fused kernel pass.

``pipe.scheduler = kdfast.schedulers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``
"""
from .base import FusedScheduler, SchedulerOutput
from .deis_multistep import DEISMultistepScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .unipc_multistep import UniPCMultistepScheduler

__all__ = ["FusedScheduler", "SchedulerOutput", "DEISMultistepScheduler", "DPMSolverMultistepScheduler",
           "UniPCMultistepScheduler"]
