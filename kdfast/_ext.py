"""Loading of the compiled extensions, remembering why one could not be loaded."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional, Tuple


_SOURCE_TREE_HINT = ("; kdfast was imported from {path}: if that is the source tree, install the package "
                     "(pip install .) and run from another directory")


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Tuple[Optional[ModuleType], Optional[str]]:
    try:
        return importlib.import_module(f"kdfast.{name}"), None
    except ImportError as exc:  # not built, built for another Python, or a source checkout
        import kdfast

        return None, f"kdfast.{name} is not importable ({exc})" + _SOURCE_TREE_HINT.format(path=kdfast.__path__[0])


def cpu() -> Tuple[Optional[ModuleType], Optional[str]]:
    """The CPU extension kdfast._C and, when missing, the reason."""
    return _load("_C")


def cuda() -> Tuple[Optional[ModuleType], Optional[str]]:
    """The CUDA extension kdfast._C_cuda and, when missing, the reason."""
    module, reason = _load("_C_cuda")
    if module is None:
        return None, reason + "; it is built only when nvcc is found at install time (KDFAST_CUDA=AUTO|ON)"
    return module, None


@functools.lru_cache(maxsize=None)
def triton() -> Tuple[Optional[ModuleType], Optional[str]]:
    """kdfast.kernels (the Triton kernels) and, when triton is missing, the reason."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return None, f"triton is not installed ({exc}); pip install triton"
    return _load("kernels")
