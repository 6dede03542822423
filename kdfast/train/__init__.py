"""Training kdfast's own models, and the loop infrastructure distillation reuses.

- :mod:`kdfast.train.teacher`: the class-conditional digits teacher.
- :mod:`kdfast.train.run`: output folders, seeding, progress bars, a JSON-lines metrics log
  and safetensors checkpoints that resume a run bit for bit.
- :mod:`kdfast.train.images` / :mod:`kdfast.train.plot`: PNG image grids and line plots,
  without an imaging or plotting library.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "teacher": ["SCHEDULERS", "SHIPPED_PATH", "Teacher", "TeacherAssetError", "load_teacher", "sample_teacher",
                "save_teacher", "train_teacher"],
    "run": ["Checkpoint", "CheckpointError", "Checkpointer", "GlobalRNG", "MetricsLog", "OutputDirError",
            "check_output_file", "load_checkpoint", "lock_run_dir", "prepare_output_dir", "progress_bar",
            "seed_everything"],
    "images": ["image_grid", "save_grid", "write_png"],
    "plot": ["plot_curves", "render_curves"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    # Imported on first use, so that ``python -m kdfast.train.teacher`` does not import the
    # module twice (runpy warns when a package has already imported the module it runs).
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
