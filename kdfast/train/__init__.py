"""Training kdfast's own models: the class-conditional digits teacher (:mod:`kdfast.train.teacher`)."""
from __future__ import annotations

import importlib

__all__ = ["SCHEDULERS", "SHIPPED_PATH", "Teacher", "TeacherAssetError", "load_teacher", "sample_teacher",
           "save_teacher", "train_teacher"]


def __getattr__(name: str):
    # Imported on first use, so that ``python -m kdfast.train.teacher`` does not import the
    # module twice (runpy warns when a package has already imported the module it runs).
    if name in __all__:
        return getattr(importlib.import_module(".teacher", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
