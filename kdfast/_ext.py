"""Loading of the compiled extensions, remembering why one could not be loaded."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
import json
import os
import sys
from types import ModuleType
from typing import Optional, Tuple


def _package_dir() -> str:
    import kdfast

    return kdfast.__path__[0]


def is_unbuilt_source_tree() -> bool:
    """True when kdfast is imported from a checkout whose extensions are not importable (the
    source tree shadows the installed package, e.g. ``python -m ...`` from the clone)."""
    root = os.path.dirname(_package_dir())
    return os.path.exists(os.path.join(root, "CMakeLists.txt")) and importlib.util.find_spec("kdfast._C") is None


def build_info() -> dict:
    """What the build recorded (``_build_info.json``, written by CMake), or {} when absent."""
    dirs = [_package_dir()]
    module, _ = _load("_C")
    if module is not None:  # editable installs keep built files next to the extension
        dirs.append(os.path.dirname(module.__file__))
    for d in dirs:
        try:
            with open(os.path.join(d, "_build_info.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return {}


def _why_not(name: str, exc: ImportError) -> str:
    reason = f"kdfast.{name} is not importable ({exc})"
    if is_unbuilt_source_tree():
        reason += (f"; kdfast was imported from its source tree {_package_dir()}, which holds no built "
                   "extensions: install the package (pip install .) and run from another directory")
    return reason


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Tuple[Optional[ModuleType], Optional[str]]:
    try:
        return importlib.import_module(f"kdfast.{name}"), None
    except ImportError as exc:  # not built, built for another Python, or a source checkout
        return None, _why_not(name, exc)


def cpu() -> Tuple[Optional[ModuleType], Optional[str]]:
    """The CPU extension kdfast._C and, when missing, the reason."""
    return _load("_C")


def cuda() -> Tuple[Optional[ModuleType], Optional[str]]:
    """The CUDA extension kdfast._C_cuda and, when missing, the reason."""
    module, reason = _load("_C_cuda")
    if module is None:
        note = build_info().get("cuda", "")
        if note.startswith("not built"):
            return None, f"kdfast._C_cuda {note}"
        return None, reason + "; it is built only when nvcc is found at install time (KDFAST_CUDA=AUTO|ON)"
    return module, None


# The oldest Triton that compiles kdfast's kernels: the solver step passes its coefficients as
# one tuple argument, which Triton takes from 3.3 on (3.0 to 3.2, shipped with torch 2.4 to
# 2.6, reject it at launch).
TRITON_MIN_VERSION = (3, 3)


def version_tuple(text: str) -> Tuple[int, ...]:
    """(major, minor) of a version string such as "3.3.1" or "3.4.0+git1234"."""
    out = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        out.append(int(digits) if digits else 0)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def triton() -> Tuple[Optional[ModuleType], Optional[str]]:
    """kdfast.kernels (the Triton kernels) and, when triton is missing or too old, the reason."""
    try:
        module = importlib.import_module("triton")
    except ImportError as exc:
        return None, f"triton is not installed ({exc}); pip install triton"
    except Exception as exc:  # a broken install (a driver library it cannot load, say): unusable, not fatal
        return None, f"triton failed to import ({type(exc).__name__}: {exc})"
    version = str(getattr(module, "__version__", "0"))
    if version_tuple(version) < TRITON_MIN_VERSION:
        need = ".".join(map(str, TRITON_MIN_VERSION))
        return None, (f"triton {version} is older than the {need} kdfast's Triton kernels need "
                      f"(pip install 'triton>={need}'); the cuda or reference backend serves meanwhile")
    global _interpreted_kernels
    try:
        _interpreted_kernels = triton_interpreting()
        return _load("kernels")
    except (RuntimeError, OSError) as exc:  # triton's own (a driver it cannot load) while the kernels are defined
        return None, f"kdfast.kernels failed to load under triton {version} ({type(exc).__name__}: {exc})"


# Whether the loaded Triton kernels were defined under the interpreter (None: not loaded).
_interpreted_kernels: Optional[bool] = None


def triton_kernels_interpreted() -> Optional[bool]:
    return _interpreted_kernels


def triton_interpreting() -> bool:
    """Whether Triton would define kernels for its interpreter now: ``TRITON_INTERPRET`` as
    Triton reads it (1, true, on, yes), or its knob set in code."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # (triton 3.3 has no knobs: the variable itself)
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


def triton_library_interpreted() -> Optional[bool]:
    """Whether Triton's own jit functions (``tl.cdiv``, ``tl.max`` ...) were defined for its
    interpreter: Triton decides once, when it is imported, and kernels of the other mode cannot
    call them (None: triton not imported)."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return None
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return None
    return isinstance(getattr(standard, "cdiv", None), InterpretedFunction)


def forget() -> None:
    """Forget what was loaded, so the next call loads again: after installing a backend, or
    after changing TRITON_INTERPRET (Triton picks compiled or interpreted kernels when they are
    defined, so the kernel modules are imported anew)."""
    global _interpreted_kernels
    importlib.invalidate_caches()
    _interpreted_kernels = None
    _load.cache_clear()
    triton.cache_clear()
    for name in [m for m in sys.modules if m == "kdfast.kernels" or m.startswith("kdfast.kernels.")]:
        del sys.modules[name]
