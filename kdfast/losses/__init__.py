"""Distillation losses: fused logit divergences (``kd_loss``, ``KDLoss``)."""
from .kd import KDLoss, kd_loss

__all__ = ["KDLoss", "kd_loss"]
