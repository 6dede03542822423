"""diffusers drop-in schedulers whose ``step`` is one fused kernel pass (two with dynamic thresholding).

``pipe.scheduler = kdfast.schedulers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``
"""
from .base import FusedScheduler, SchedulerOutput
from .convert import from_diffusers, patch_pipeline, supported
from .consistency_models import CMStochasticIterativeScheduler
from .cosine_dpmsolver_multistep import CosineDPMSolverMultistepScheduler
from .ddim import DDIMScheduler
from .ddim_cogvideox import CogVideoXDDIMScheduler
from .ddim_inverse import DDIMInverseScheduler
from .ddim_parallel import DDIMParallelScheduler
from .ddpm import DDPMScheduler
from .ddpm_parallel import DDPMParallelScheduler
from .ddpm_wuerstchen import DDPMWuerstchenScheduler
from .deis_multistep import DEISMultistepScheduler
from .dpm_cogvideox import CogVideoXDPMScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .dpmsolver_multistep_inverse import DPMSolverMultistepInverseScheduler
from .dpmsolver_sde import DPMSolverSDEScheduler
from .dpmsolver_singlestep import DPMSolverSinglestepScheduler
from .edm_dpmsolver_multistep import EDMDPMSolverMultistepScheduler
from .edm_euler import EDMEulerScheduler
from .euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from .euler_discrete import EulerDiscreteScheduler
from .flow_map_euler_discrete import FlowMapEulerDiscreteScheduler
from .flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from .flow_match_heun_discrete import FlowMatchHeunDiscreteScheduler
from .flow_match_lcm import FlowMatchLCMScheduler
from .helios import HeliosDMDScheduler, HeliosScheduler
from .heun_discrete import HeunDiscreteScheduler
from .ipndm import IPNDMScheduler
from .kdpm2_ancestral_discrete import KDPM2AncestralDiscreteScheduler
from .kdpm2_discrete import KDPM2DiscreteScheduler
from .lcm import LCMScheduler
from .lms_discrete import LMSDiscreteScheduler
from .ltx_euler_ancestral_rf import LTXEulerAncestralRFScheduler
from .piflow import PiflowScheduler
from .pndm import PNDMScheduler
from .sasolver import SASolverScheduler
from .scm import SCMScheduler
from .tcd import TCDScheduler
from .unipc_multistep import UniPCMultistepScheduler

__all__ = [
    "FusedScheduler", "SchedulerOutput", "from_diffusers", "patch_pipeline", "supported",
    "CMStochasticIterativeScheduler", "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler",
    "CosineDPMSolverMultistepScheduler", "DDIMInverseScheduler", "DDIMParallelScheduler", "DDIMScheduler",
    "DDPMParallelScheduler", "DDPMScheduler", "DDPMWuerstchenScheduler", "DEISMultistepScheduler",
    "DPMSolverMultistepInverseScheduler", "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler", "EDMDPMSolverMultistepScheduler", "EDMEulerScheduler",
    "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "FlowMapEulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler",
    "HeliosDMDScheduler", "HeliosScheduler", "HeunDiscreteScheduler", "IPNDMScheduler", "KDPM2AncestralDiscreteScheduler", "KDPM2DiscreteScheduler",
    "LCMScheduler", "LMSDiscreteScheduler", "LTXEulerAncestralRFScheduler", "PiflowScheduler",
    "PNDMScheduler", "SASolverScheduler", "SCMScheduler", "TCDScheduler", "UniPCMultistepScheduler",
]
