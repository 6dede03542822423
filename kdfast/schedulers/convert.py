"""Turning diffusers schedulers and pipelines into their kdfast equivalents."""
from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
from typing import Dict, List, Optional, Type

from .base import FusedScheduler


def _registry() -> Dict[str, Type[FusedScheduler]]:
    """The diffusers class name -> kdfast class of every scheduler ``kdfast.schedulers`` exports."""
    from .. import schedulers

    classes = (getattr(schedulers, name) for name in schedulers.__all__)
    return {cls.diffusers_class_name(): cls for cls in classes
            if isinstance(cls, type) and issubclass(cls, FusedScheduler) and cls is not FusedScheduler}


def supported() -> list:
    """Names of the diffusers scheduler classes kdfast replaces."""
    return sorted(_registry())


def from_diffusers(scheduler) -> FusedScheduler:
    """The kdfast scheduler equivalent to a diffusers scheduler instance (same config).

    Every value of the config is taken as given. (``from_config`` leaves out the keys listed in
    ``_use_default_values``, for a class with other defaults; but diffusers' pipelines correct
    outdated settings, ``steps_offset`` and ``clip_sample``, by replacing the whole config and
    leave that list as it was, so it would drop their corrections.)

    Raises ValueError naming the class when kdfast has no equivalent.
    """
    if isinstance(scheduler, FusedScheduler):
        return scheduler
    name = type(scheduler).__name__
    cls = _registry().get(name)
    if cls is None:
        raise ValueError(f"kdfast has no fused equivalent of {name}; supported: {', '.join(supported())}")
    return cls.from_config({k: v for k, v in scheduler.config.items() if k != "_use_default_values"})


# Schedulers whose pipelines choose their loop with isinstance(scheduler, <the diffusers class>),
# which a kdfast scheduler is not: a patched pipeline would run the wrong loop.
_UNPATCHABLE = {
    "CogVideoXDPMScheduler": (
        "CogVideoX pipelines choose how to call step() with isinstance(scheduler, diffusers.CogVideoXDPMScheduler), "
        "which kdfast's CogVideoXDPMScheduler is not: they would call it as a DDIM step. Patch a pipeline using "
        "CogVideoXDDIMScheduler, or run kdfast.schedulers.CogVideoXDPMScheduler in your own loop or kdfast.sample"),
    "DDPMWuerstchenScheduler": (
        "Stable Cascade and Wuerstchen pipelines choose their loop with isinstance(scheduler, "
        "diffusers.DDPMWuerstchenScheduler), which kdfast's DDPMWuerstchenScheduler is not: they would step from the "
        "schedule's final 0 and condition the model on t / timesteps[-1] (a division by 0). Run "
        "kdfast.schedulers.DDPMWuerstchenScheduler in your own loop or kdfast.sample"),
}


def _static_shift(config) -> bool:
    return not config.get("use_dynamic_shifting")


# (pipeline, scheduler) pairs whose class test changes nothing for a kdfast scheduler of such a
# config. The test picks whether set_timesteps gets the shift's mu (HiDream: UniPC does not;
# EasyAnimate: flow matching gets mu=1; Bria: flow matching with dynamic shifting gets its own
# sigmas and mu), and these schedulers read mu only with use_dynamic_shifting (Bria's other
# tests, DDIM / Euler ancestral and skipping scale_model_input, give the same loop for
# flow matching).
_HARMLESS_CLASS_TESTS = {
    ("HiDreamImagePipeline", "UniPCMultistepScheduler"): _static_shift,
    ("EasyAnimatePipeline", "FlowMatchEulerDiscreteScheduler"): _static_shift,
    ("EasyAnimateControlPipeline", "FlowMatchEulerDiscreteScheduler"): _static_shift,
    ("BriaPipeline", "FlowMatchEulerDiscreteScheduler"): _static_shift,
}


def _is_scheduler(node) -> bool:
    """``self.scheduler``, ``scheduler`` (or ``pipe.scheduler``...): what a class test is made on."""
    return (isinstance(node, ast.Attribute) and node.attr == "scheduler"
            or isinstance(node, ast.Name) and node.id == "scheduler")


def _class_names(node) -> List[str]:
    if isinstance(node, ast.Tuple):
        return [name for element in node.elts for name in _class_names(element)]
    if isinstance(node, ast.Name):
        return [node.id]
    return [node.attr] if isinstance(node, ast.Attribute) else []


def _tests_in(node, module_name: str, offset: int, found: Dict[str, str]) -> None:
    """Add to ``found`` the class tests of a scheduler in ``node``'s code outside ``__init__``:
    ``isinstance(<scheduler>, Name)`` (or a tuple of names) and ``type(<scheduler>) ==/!=/is/is
    not Name``, each class name -> ``"module:line"`` of its first test."""
    def visit(node, in_init: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_init = node.name == "__init__"  # (a constructor's test runs before any patching)
        names: List[str] = []
        if not in_init and isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 2:
            if node.func.id == "isinstance" and _is_scheduler(node.args[0]):
                names = _class_names(node.args[1])
        elif not in_init and isinstance(node, ast.Compare):
            sides = [node.left] + node.comparators
            if any(isinstance(side, ast.Call) and isinstance(side.func, ast.Name) and side.func.id == "type"
                   and len(side.args) == 1 and _is_scheduler(side.args[0]) for side in sides):
                names = [name for side in sides for name in _class_names(side)]
        for name in names:
            found.setdefault(name, f"{module_name}:{node.lineno + offset}")
        for child in ast.iter_child_nodes(node):
            visit(child, in_init)

    visit(node, False)


@functools.lru_cache(maxsize=None)
def _module_functions(module_name: str) -> Dict[str, ast.AST]:
    """The module's top-level functions by name (LEDITS++ branches in one its pipeline calls)."""
    try:
        tree = ast.parse(inspect.getsource(sys.modules[module_name]))
    except (KeyError, OSError, TypeError, SyntaxError):
        return {}
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


@functools.lru_cache(maxsize=None)
def _class_tests(cls: type) -> Dict[str, str]:
    """Class name -> ``"module:line"`` of the first test of a scheduler's class in ``cls``'s own
    code (its methods but ``__init__``) or in a top-level function of its module that it names.
    Empty when the source cannot be read."""
    try:
        lines, first = inspect.getsourcelines(cls)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return {}
    found: Dict[str, str] = {}
    _tests_in(tree, cls.__module__, first - 1, found)
    functions = _module_functions(cls.__module__)
    called = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in functions}
    for name in sorted(called):
        _tests_in(functions[name], cls.__module__, 0, found)
    return found


def _class_test_refusal(pipe) -> Optional[str]:
    """Why ``pipe`` cannot run a kdfast scheduler, if its code (its class's, or a base class's
    defining ``__call__``) branches on ``isinstance(scheduler, <the diffusers class it has>)``: a kdfast
    scheduler is not an instance of diffusers' class, so the patched pipeline would take the
    other branch (another timestep schedule, another step call)."""
    name = type(pipe.scheduler).__name__
    pipeline = type(pipe).__name__
    harmless = _HARMLESS_CLASS_TESTS.get((pipeline, name))
    if harmless is not None and harmless(dict(getattr(pipe.scheduler, "config", {}))):
        return None
    # the pipeline's class and the base classes that define its __call__ (a mixin or
    # DiffusionPipeline holds no loop, and reading all of them would take seconds)
    for cls in [c for c in type(pipe).__mro__ if c is type(pipe) or "__call__" in vars(c)]:
        where = _class_tests(cls).get(name)
        if where is not None:
            return (f"{pipeline} tests its scheduler's class (isinstance(scheduler, {name}) at {where}), which "
                    f"kdfast's {name} is not an instance of: the patched pipeline would take another branch. "
                    f"Run kdfast.schedulers.{name} in your own loop or with kdfast.sample, or patch this "
                    "pipeline with another scheduler")
    return None


def patch_pipeline(pipe):
    """Swap ``pipe.scheduler`` for its kdfast equivalent, in place; returns ``pipe``.

    Every ``scheduler.step`` of the pipeline then runs as one fused kernel pass. diffusers
    pipelines still combine classifier-free guidance themselves before calling ``step``; to
    fuse guidance as well, write the loop with ``scheduler.step_cfg`` or use ``kdfast.sample``.
    For a diffusers pipeline, ``pipe.save_pretrained`` still writes a stock diffusers pipeline
    (the scheduler as the diffusers class of the same config). So do the pipelines made from it
    (``from_pipe``, ``copy.deepcopy``) and, from then on in this process, any diffusers pipeline
    given a kdfast scheduler: the first call wraps ``DiffusionPipeline.save_pretrained`` once
    for the whole process (pipelines without a kdfast scheduler save exactly as before).
    Objects that are not ``DiffusionPipeline`` s get their scheduler swapped, not their saving.

    A pipeline whose code branches on its scheduler's class (``isinstance(self.scheduler,
    diffusers.X)``, e.g. Bria, EasyAnimate, LTX-2 DFR, LEDITS++, CogVideoX with its DPM
    scheduler) would take another branch with a kdfast scheduler, which is not an instance of
    diffusers' class: such a pipeline is refused with a ValueError saying where it tests, and
    left as it was.
    """
    if not hasattr(pipe, "scheduler"):
        raise TypeError(f"{type(pipe).__name__} has no scheduler to patch")
    refusal = _UNPATCHABLE.get(type(pipe.scheduler).__name__) or _class_test_refusal(pipe)
    if refusal is not None:
        raise ValueError(refusal)
    pipe.scheduler = from_diffusers(pipe.scheduler)
    diffusers = sys.modules.get("diffusers")  # a diffusers pipeline means diffusers is imported
    if diffusers is not None and isinstance(pipe, diffusers.DiffusionPipeline):
        _save_kdfast_schedulers_as_stock(diffusers.DiffusionPipeline)
    return pipe


def _save_kdfast_schedulers_as_stock(pipeline_cls) -> None:
    """Make ``pipeline_cls.save_pretrained`` write each kdfast scheduler of a pipeline as the
    diffusers class it replaces.

    diffusers saves only components derived from its own base classes, so a pipeline holding a
    kdfast scheduler would be saved without one (``"scheduler": [null, null]``) and fail to
    load. The configs are the same, so the saved pipeline is the stock diffusers pipeline: load
    it as usual, patch it again. The change is to the class, not to one pipeline: pipelines made
    from a patched one by ``from_pipe`` (a new pipeline sharing the scheduler) or ``deepcopy``
    save the same way. Pipelines without a kdfast scheduler save exactly as before.
    """
    save = pipeline_cls.save_pretrained
    if getattr(save, "_kdfast_saves_stock", False):
        return

    @functools.wraps(save)
    def save_pretrained(self, *args, **kwargs):
        fused = {name: module for name, module in vars(self).items()
                 if isinstance(module, FusedScheduler) and name in self.config}
        if not fused:
            return save(self, *args, **kwargs)
        import diffusers

        entries = {name: self.config[name] for name in fused}
        try:
            for name, scheduler in fused.items():
                stock = getattr(diffusers, scheduler.diffusers_class_name())
                setattr(self, name, stock.from_config(scheduler.config))
                # (diffusers keeps an entry a failed save left at [null, null]; set it outright)
                self.register_to_config(**{name: ("diffusers", stock.__name__)})
            return save(self, *args, **kwargs)
        finally:
            for name, scheduler in fused.items():
                setattr(self, name, scheduler)
                self.register_to_config(**{name: entries[name]})

    # seen in tracebacks and help(): this is kdfast's wrapper, not diffusers' own method
    save_pretrained.__qualname__ = f"kdfast.schedulers.patch_pipeline.<save_pretrained of {save.__qualname__}>"
    save_pretrained._kdfast_saves_stock = True  # type: ignore[attr-defined]
    pipeline_cls.save_pretrained = save_pretrained
