"""Pure-torch specifications of every kdfast op: the ground truth of the tests."""
from . import solver_step

__all__ = ["solver_step"]
