"""Datasets kdfast ships or reads from installed packages (no downloads)."""
from .digits import NUM_CLASSES, load_digits

__all__ = ["NUM_CLASSES", "load_digits"]
