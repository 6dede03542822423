import os

import pytest

# Triton kernels run on the CPU through the interpreter; it is chosen when the kernels are
# defined, so it must be set before kdfast.kernels is imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kdfast  # noqa: E402

if kdfast._ext.cpu()[0] is None:  # pragma: no cover
    raise pytest.UsageError(
        "kdfast._C is not importable: install the package (pip install .) and run pytest "
        "from the repository root (not python -m pytest, which puts the source tree first)."
    )


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def usable_backends(op_name, device_type="cpu"):
    """Every compiled/Triton backend that can run ``op_name`` here (not the reference)."""
    op = kdfast.backends.op(op_name)
    return [b for b in op.backends if b != "reference" and op.reason(b, device_type) is None]
