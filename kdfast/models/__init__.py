"""Models kdfast trains itself: the small class-conditional UNet of the digits teacher."""
from .unet import PREDICTION_TYPES, UNet, UNetConfig

__all__ = ["PREDICTION_TYPES", "UNet", "UNetConfig"]
