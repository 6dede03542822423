"""Triton launch grids stay inside CUDA's limits for any batch (axes 1 and 2 stop at 65535)."""
import pytest
import torch

from kdfast import ops
from triton.runtime.jit import KernelInterface

from conftest import usable_backends

pytestmark = pytest.mark.skipif("triton" not in usable_backends("solver_step"), reason="needs triton")


@pytest.fixture
def grids(monkeypatch):
    """Record every Triton launch's grid instead of running it (a 70000-sample batch would take
    the interpreter minutes)."""
    seen = []

    def record(kernel, grid):
        seen.append((getattr(kernel, "__name__", str(kernel)), tuple(grid)))
        return lambda *args, **kwargs: None

    monkeypatch.setattr(KernelInterface, "__getitem__", record)
    return seen


def test_a_batch_beyond_65535_samples_launches(grids):
    x = torch.randn(70000, 2)
    ops.solver_step(x, x, torch.zeros(29), backend="triton")
    y = x.clone().requires_grad_(True)
    ops.pseudo_huber(y, x, c=0.1, backend="triton").sum().backward()
    ops.pd_target(x, x, 0.6, 0.8, 0.9, 0.3, backend="triton")
    assert {name for name, _ in grids} >= {"_solver_step_kernel", "_reduce_kernel", "_grad_kernel", "_combination_kernel"}
    for name, grid in grids:
        assert all(n <= 65535 for n in grid[1:]), (name, grid)
        assert grid[0] < 2**31, (name, grid)
