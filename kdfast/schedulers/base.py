"""What every kdfast scheduler shares: config, step indexing without host syncs, the
coefficient table, and the call into the fused solver_step op."""
from __future__ import annotations

import collections
import functools
import inspect
import json
import math
import numbers
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils._device import DeviceContext as _DeviceContext

from .. import ops
from .._checks import check_int
from ..ops._tensors import host_readable, outside_transforms, transform_tracks
from ..ops.solver_step import fused_step
from ._config import ConfigMixin
from ._helpers import LogSigmaTimesteps, SigmaSpacings, Thresholding, legacy_arguments, required
from ._linear import Lin
from ._schedule import (beta_sigmas, exponential_sigmas, karras_sigmas, lu_lambdas, noise_schedule,
                        randn_like_diffusers, sigma_range, sigma_to_t)


class OutputFields:
    """The dict side of diffusers' step outputs (``BaseOutput`` is an OrderedDict): ``out["prev_sample"]``,
    ``keys()``, ``values()``, ``items()``, ``in``, ``len()`` and iteration over the keys, whose
    entries are the fields that are not None; integers and slices index ``to_tuple()``."""

    __slots__ = ()
    _fields: Tuple[str, ...] = ()

    def _has(self, name: str) -> bool:
        return getattr(self, name) is not None

    def keys(self) -> List[str]:
        return [k for k in self._fields if self._has(k)]

    def values(self) -> list:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list:
        return [(k, getattr(self, k)) for k in self.keys()]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._fields or not self._has(key):
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple:
        """The fields that are not None, in order (diffusers' ``BaseOutput.to_tuple``)."""
        return tuple(v for v in (getattr(self, k) for k in self._fields) if v is not None)


class SchedulerOutput(OutputFields):
    """Like diffusers' SchedulerOutput: ``.prev_sample``, ``.pred_original_sample``, ``out[0]``,
    ``out["prev_sample"]`` (and the rest of :class:`OutputFields`) and ``to_tuple()``.

    Writing x0 costs the fused step one more pass over the latent, which pipelines rarely
    read; so schedulers whose diffusers twin returns it give it lazily (``make_x0``): computed
    when first read, from the step's own inputs. ``to_tuple()`` then has diffusers' two
    entries, the second computed only when indexed or unpacked. Reading it after one of those
    inputs was modified in place raises; writes that bypass autograd's version counter (through
    ``.data`` or a numpy view) cannot be seen, so read x0 before making such writes (or pass
    ``return_pred_original_sample=True`` to ``step``).
    """

    __slots__ = ("prev_sample", "_x0", "_make_x0")
    _fields = ("prev_sample", "pred_original_sample")

    def __init__(self, prev_sample: torch.Tensor, pred_original_sample: Optional[torch.Tensor] = None,
                 make_x0: Optional[Callable[[], torch.Tensor]] = None):
        self.prev_sample = prev_sample
        self._x0 = pred_original_sample
        self._make_x0 = make_x0 if pred_original_sample is None else None

    @property
    def pred_original_sample(self) -> Optional[torch.Tensor]:
        """The step's x0 estimate, for schedulers whose diffusers twin returns one (else None)."""
        if self._x0 is None and self._make_x0 is not None:
            self._x0, self._make_x0 = self._make_x0(), None
        return self._x0

    def _has(self, name: str) -> bool:
        if name == "pred_original_sample":  # without computing it
            return self._x0 is not None or self._make_x0 is not None
        return getattr(self, name) is not None

    def to_tuple(self) -> Tuple[torch.Tensor, ...]:
        if self._x0 is None and self._make_x0 is None:
            return (self.prev_sample,)
        return _StepTuple(self)

    def __repr__(self) -> str:
        return f"SchedulerOutput(prev_sample={self.prev_sample!r})"

    def __reduce__(self):
        # copied or pickled with x0 computed (the closure that computes it cannot be pickled), as
        # its own class (the SCM, flow-map and pi-Flow outputs are subclasses)
        return (type(self), (self.prev_sample, self.pred_original_sample))


class _StepTuple(tuple):
    """``(prev_sample, pred_original_sample)`` whose second entry is computed when indexed or
    unpacked, so that ``step(..., return_dict=False)[0]`` costs no x0 pass. Copied or pickled,
    it is a plain tuple with x0 computed. (Code that reads the tuple's storage directly, as
    ``torch.stack(out)`` does, sees None in the second place: use ``tuple(out)`` there.)"""

    def __new__(cls, output: SchedulerOutput):
        self = super().__new__(cls, (output.prev_sample, None))
        self._output = output
        return self

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self)[i]
        if i in (1, -1):
            return self._output.pred_original_sample
        return super().__getitem__(i)

    def __iter__(self):
        yield self._output.prev_sample
        yield self._output.pred_original_sample

    def __reduce__(self):
        return (tuple, (tuple(iter(self)),))

    def __repr__(self) -> str:
        return repr(tuple(iter(self)))


def check_variance_noise(variance_noise, like: torch.Tensor, shape_of: str = "model_output's shape") -> None:
    """A step's ``variance_noise``, when given, must be a tensor of ``like``'s shape (checked at
    every step, also those that draw none)."""
    if variance_noise is not None and (not isinstance(variance_noise, torch.Tensor)
                                       or variance_noise.shape != like.shape):
        got = tuple(variance_noise.shape) if isinstance(variance_noise, torch.Tensor) else type(variance_noise).__name__
        raise ValueError(f"variance_noise must be a tensor of {shape_of} {tuple(like.shape)}, got {got}")


def reject_unknown_step_arguments(kwargs: dict) -> None:
    """A keyword ``step`` does not take is an error, as in diffusers (a misspelt option must not
    pass silently)."""
    if kwargs:
        raise TypeError(f"unexpected step arguments: {', '.join(kwargs)}")


def reject_internal_step_arguments(kwargs: dict) -> None:
    """Refuse the keywords of ``_step``'s own arguments in a public ``step``'s ``**kwargs``
    (passed on, they collided: "_step() got multiple values for argument 'variance_noise'")."""
    reject_unknown_step_arguments({k: v for k, v in kwargs.items() if k in _STEP_INTERNALS})


_STEP_INTERNALS = ("cond", "guidance_scale", "variance_noise")


def convert_arguments(args: tuple, kwargs: dict, sample: Optional[torch.Tensor]) -> torch.Tensor:
    """The sample of diffusers' ``convert_model_output`` calling forms: ``sample=`` or the
    deprecated ``(model_output, timestep, sample)`` (the timestep warns, as in diffusers, and is
    not used: the step index decides). Unknown arguments are refused."""
    (sample,) = legacy_arguments("convert_model_output", args, kwargs, ("timestep",), sample=sample)
    return required("convert_model_output", "sample", sample)


def _host_values(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


@dataclass(frozen=True)
class StepPlan:
    """One step as the kernel runs it: x0 conversion, the three outputs, and what to read."""

    x0: Tuple[float, float]
    sample: Lin
    history: Optional[Lin] = None
    aux: Optional[Lin] = None

    def row(self) -> List[float]:
        return ops.coefficients(self.x0[0], self.x0[1], self.sample.terms,
                                None if self.history is None else self.history.terms,
                                None if self.aux is None else self.aux.terms)

    def uses(self, source: str) -> bool:
        return any(out is not None and out.terms.get(source, 0.0) != 0.0
                   for out in (self.sample, self.history, self.aux))


@dataclass(frozen=True)
class CheckedPlan(StepPlan):
    """A step plan that may be undefined: ``error`` says why (the step raises it), where
    diffusers' step would return inf or NaN."""

    error: Optional[str] = None

    @classmethod
    def of(cls, plan: StepPlan, error: Callable[[], str]) -> "CheckedPlan":
        """``plan``, with ``error()`` as its reason when one of its coefficients is inf or NaN."""
        finite = all(math.isfinite(c) for c in plan.row())
        return cls(x0=plan.x0, sample=plan.sample, history=plan.history, aux=plan.aux,
                   error=None if finite else error())


class CoefficientTable:
    """Step plans packed once into a float32 table; ``row(key)`` is a ready CPU view.
    ``row64(key)`` is the float64 row a float64 step uses (made on first use: the plans are
    computed in float64, and float32 rows alone would cost such a loop ~1e-7)."""

    def __init__(self, plans: Dict[object, StepPlan]):
        # (empty for an empty schedule, which diffusers allows: a strength that keeps no step)
        self.plans = plans
        keys = list(plans)
        table = torch.tensor([plans[k].row() for k in keys], dtype=torch.float32)
        self._rows = dict(zip(keys, table.unbind(0))) if keys else {}

    def row(self, key) -> torch.Tensor:
        return self._rows[key]

    def row64(self, key) -> torch.Tensor:
        rows64 = self.__dict__.get("_rows64", {})
        row = rows64.get(key)
        if row is None:  # self.plans[key] raises KeyError for a key the table lacks
            with outside_transforms():  # (a shared constant: never a transform's wrapper)
                row = torch.tensor(self.plans[key].row(), dtype=torch.float64)
            # a new dict, not an insertion: a copy or pickle of the table in another thread may
            # be iterating the published one (a racing insertion can only be made again)
            self._rows64 = {**rows64, key: row}
        return row

    def __contains__(self, key) -> bool:
        return key in self._rows

    def row_count(self) -> int:
        """How many coefficient rows the table holds (what the shared cache bounds)."""
        return len(self._rows)

    def plan(self, key) -> StepPlan:
        """The plan of ``key``: a key of this table or a :class:`TableRow` it handed out."""
        return key.plan if type(key) is TableRow else self.plans[key]


class TableRow:
    """The coefficients of a step that :meth:`GrowingTable.ensure` made after
    ``set_timesteps``, handed to the step itself: they stay valid for as long as the step (or
    its lazily read x0) needs them, whatever the shared table drops meanwhile."""

    __slots__ = ("plan", "row", "_row64")

    def __init__(self, plan: StepPlan):
        # (made by GrowingTable.ensure outside torch.func's transforms: a row made inside one
        # would be a storage-less wrapper, kept by the shared table for every later step)
        self.plan = plan
        self.row = torch.tensor(plan.row(), dtype=torch.float32)
        self._row64 = None

    def row64(self) -> torch.Tensor:
        if self._row64 is None:
            with outside_transforms():
                self._row64 = torch.tensor(self.plan.row(), dtype=torch.float64)
        return self._row64


class GrowingTable(CoefficientTable):
    """A coefficient table that also takes plans made after ``set_timesteps``.

    Per-call options (DDIM's ``eta``, Euler's ``s_churn``, a timestep that is not in the
    schedule) select coefficients that cannot all be known in advance: they are computed on
    the host in float64 the first time they are asked for and kept, the ``limit`` most
    recently used. The table is shared by every scheduler of the same settings, in any
    thread: a lock guards the extras, and a step holds the :class:`TableRow` it was given, so
    that no other step's insertion can drop its coefficients between lookup and use.
    """

    def __init__(self, plans, limit: int = 1024):
        super().__init__(plans)
        self._extra: "collections.OrderedDict[object, TableRow]" = collections.OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()
        _GROWING_TABLES.add(self)

    def row_count(self) -> int:
        return len(self._rows) + len(self._extra)

    def ensure(self, key, make: Callable[[], StepPlan]):
        """``key`` itself when it is one of the schedule's own steps (never dropped), else the
        :class:`TableRow` of ``make()``'s plan, made on first use."""
        if key in self._rows:
            return key
        with self._lock:
            entry = self._extra.get(key)
            if entry is not None:
                self._extra.move_to_end(key)
                return entry
        # Planned outside the lock: the lock is held for dictionary updates only, so other
        # threads' steps do not wait on a plan (nor does a process forked meanwhile inherit it held)
        with outside_transforms():  # (plans are host constants: inside a transform, storage-less)
            made = TableRow(make())
        with self._lock:
            entry = self._extra.setdefault(key, made)  # a plan that raced ours: one row for all
            self._extra.move_to_end(key)
            if len(self._extra) > self._limit:
                self._extra.popitem(last=False)
        return entry

    def __contains__(self, key) -> bool:
        return key in self._rows or key in self._extra

    def __getstate__(self):  # (deepcopy, pickle) a lock does not copy: the copy gets its own
        with self._lock:  # the extras as they are now, not as another thread's ensure changes them
            state = dict(self.__dict__, _extra=collections.OrderedDict(self._extra))
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        _GROWING_TABLES.add(self)


# Every growing table, so that a forked child gets fresh locks: one held by another thread at the
# fork would be held forever in the child (fork copies the lock, not the thread)
_GROWING_TABLES: "weakref.WeakSet[GrowingTable]" = weakref.WeakSet()


def _fresh_locks_after_fork() -> None:
    FusedScheduler._TABLE_CACHE_LOCK = threading.Lock()
    for table in list(_GROWING_TABLES):
        table._lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_fresh_locks_after_fork)


def schedule_span(schedule) -> Optional[tuple]:
    """(address of the first element, bytes between elements, length, dtype, device) of a 1-D
    tensor schedule, what :func:`schedule_position` compares against; None for anything else."""
    if isinstance(schedule, torch.Tensor) and schedule.dim() == 1 and schedule.shape[0] and schedule.stride(0) > 0:
        try:
            address = schedule.data_ptr()
        except RuntimeError:  # a tensor without storage (made inside torch.func transforms): no addresses
            return None
        return (address, schedule.stride(0) * schedule.element_size(), schedule.shape[0], schedule.dtype,
                schedule.device)
    return None


def schedule_position(timestep, schedule=None, span: Optional[tuple] = None) -> Optional[int]:
    """The index of ``timestep`` in ``schedule`` (or in the schedule of ``span``, see
    :func:`schedule_span`) when it is one of its elements, found from addresses without a host
    sync (iterating a tensor yields 0-d views of its elements); None for any other tensor or
    number, an element of another view of the same memory included."""
    if not isinstance(timestep, torch.Tensor) or timestep.dim() != 0:
        return None
    if span is None:
        span = schedule_span(schedule)
        if span is None:
            return None
    first, step, length, dtype, device = span
    if timestep.dtype != dtype or timestep.device != device:
        return None
    try:
        address = timestep.data_ptr()
    except RuntimeError:
        # Inside torch.func's grad and jvp, an element of the schedule is a wrapper without
        # storage: its address is beneath the wrapper (a vmap-batched tensor is no element).
        plain = host_readable(timestep)
        if plain is None or plain is timestep:
            return None
        return schedule_position(plain, span=span)
    index, misaligned = divmod(address - first, step)
    return index if not misaligned and 0 <= index < length else None


class _AlphasCumprod:
    """``alphas_cumprod``, an attribute as in diffusers, but one that new values cannot silently
    miss: the schedulers that plan their steps from a host copy made at construction (DDPM,
    DDIM, PNDM, LCM, TCD, ...) refuse them, where diffusers reads the attribute at every step.
    The same values on another device or in another dtype are taken (``add_noise`` moves it).
    The sigma schedulers keep no copy: they read it at ``set_timesteps``, as diffusers does."""

    def __get__(self, scheduler, owner=None):
        if scheduler is None:
            return self
        state = scheduler.__dict__
        try:  # (a scheduler pickled before this descriptor holds "alphas_cumprod" itself)
            return state["_alphas_cumprod"] if "_alphas_cumprod" in state else state["alphas_cumprod"]
        except KeyError:
            raise AttributeError(f"{type(scheduler).__name__!r} object has no attribute 'alphas_cumprod'") from None

    def __set__(self, scheduler, value) -> None:
        state = scheduler.__dict__
        version = self._version(value)
        if value is not state.get("_alphas_cumprod") or version != state.get("_alphas_cumprod_version"):
            self._refuse_new_values(scheduler, value)  # (new values, or the attribute itself edited in place)
        state["_alphas_cumprod"] = value
        state["_alphas_cumprod_version"] = version
        state.pop("alphas_cumprod", None)

    @staticmethod
    def _refuse_new_values(scheduler, value) -> None:
        state = scheduler.__dict__
        host = state.get("_host_alphas_cumprod", state.get("_alphas_cumprod_cpu"))
        if host is None:
            return
        kept = host if isinstance(host, torch.Tensor) else torch.tensor(host, dtype=torch.float64)
        same = (isinstance(value, torch.Tensor) and value.shape == kept.shape
                and torch.equal(value.detach().cpu(), kept.to(value.dtype)))
        if not same:
            raise ValueError(
                f"{type(scheduler).__name__} plans its steps from the alphas_cumprod of its config (made at "
                "construction): new values, assigned or written in place, would be ignored. Pass the schedule "
                "through the config instead (trained_betas=..., beta_schedule=..., rescale_betas_zero_snr=True)")

    @staticmethod
    def _version(value) -> Optional[int]:
        """The tensor's version counter (None for what has none: an inference tensor)."""
        if not isinstance(value, torch.Tensor) or value.is_inference():
            return None
        return value._version

    @classmethod
    def check_unchanged(cls, scheduler) -> None:
        """Refuse values written in place since they were set (``alphas_cumprod.mul_(0.9)``), as
        ``__set__`` refuses new ones: read back only when the tensor's version counter moved."""
        state = scheduler.__dict__
        value = state.get("_alphas_cumprod")
        version = cls._version(value)
        if version is None or version == state.get("_alphas_cumprod_version"):
            return
        cls._refuse_new_values(scheduler, value)
        state["_alphas_cumprod_version"] = version

    def __delete__(self, scheduler) -> None:
        scheduler.__dict__.pop("_alphas_cumprod", None)
        scheduler.__dict__.pop("alphas_cumprod", None)

    @staticmethod
    def move(scheduler, device: torch.device) -> torch.Tensor:
        """The attribute moved to ``device`` and kept there, as diffusers' ``add_noise`` keeps it
        (the same values: not checked, which would read a device copy back to the host)."""
        state = scheduler.__dict__
        value = state["_alphas_cumprod"] = state["_alphas_cumprod"].to(device=device)
        state["_alphas_cumprod_version"] = _AlphasCumprod._version(value)
        return value


class FusedScheduler(ConfigMixin):
    """Base class of kdfast's diffusers drop-in schedulers.

    Subclasses compute, in ``set_timesteps``, a :class:`StepPlan` for every step they may
    take and keep them in a :class:`CoefficientTable`; ``step`` then only picks a row,
    rotates the history list and makes one fused kernel call.

    Under ``torch.compile`` the step (and ``scale_model_input``) runs eagerly, a graph break
    around it: it is already one kernel, and its bookkeeping (which table row, which history
    entries, which sigma) depends on the Python step index, so tracing it would recompile at
    every step. Compile the model; to run a whole loop as one graph on a GPU, use
    :class:`kdfast.CapturedSampler`.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _on_host_by_default(cls)
        _steps_run_eagerly(cls)

    order = 1
    init_noise_sigma = 1.0
    alphas_cumprod = _AlphasCumprod()
    _compatibles: Sequence[str] = ()
    # A timestep that is not in the schedule: diffusers' multistep schedulers take the last
    # step for it; its sigma schedulers (Euler, Heun, LCM) fail with an IndexError, and so do these.
    _unknown_timestep_is_last = False

    # Planning a schedule in float64 Python costs some 20-80 us a row (20 Euler steps: 0.5 ms;
    # 20 UniPC steps, 171 rows: 13 ms; 1000 UniPC steps: 0.4 s); pipelines call set_timesteps
    # with the same settings again and again, so tables are shared by every scheduler instance
    # with the same class, config and schedule (plans are pure functions of those). A row
    # holds about 1.2 KB of Python objects: the cache keeps at most 64 tables and, counted at
    # each insertion, 32768 rows, a GrowingTable's extras included (~40 MB; a server cycling
    # through many long schedules would otherwise keep ~0.7 GB).
    _TABLE_CACHE: "collections.OrderedDict[str, CoefficientTable]" = collections.OrderedDict()
    _TABLE_CACHE_LOCK = threading.Lock()
    _TABLE_CACHE_SIZE = 64
    _TABLE_CACHE_ROWS = 32768

    @staticmethod
    def clear_table_cache() -> None:
        """Forget every shared coefficient table (they are rebuilt on the next set_timesteps)."""
        with FusedScheduler._TABLE_CACHE_LOCK:  # (a lookup in another thread reads, then moves)
            FusedScheduler._TABLE_CACHE.clear()

    def _shared_table(self, build: Callable[[], CoefficientTable]) -> CoefficientTable:
        """The table of the schedule just set: ``build()`` the first time, shared afterwards."""
        sigmas = getattr(self, "sigmas", None)
        # Private entries (_use_default_values, _class_name, ...) describe where the config came
        # from, not the schedule.
        settings = {k: v for k, v in self.config.items() if not k.startswith("_")}
        key = json.dumps([type(self).__qualname__, settings, self._host_timesteps, self.num_inference_steps,
                          None if sigmas is None else sigmas.tolist()], sort_keys=True, default=repr)
        cache = FusedScheduler._TABLE_CACHE
        with FusedScheduler._TABLE_CACHE_LOCK:  # schedulers in several threads share the cache
            table = cache.get(key)
            if table is not None:
                cache.move_to_end(key)
                return table
        with outside_transforms():  # (a shared constant, made in a step inside a transform too)
            table = build()  # outside the lock: a slow first build does not hold up other settings
        with FusedScheduler._TABLE_CACHE_LOCK:
            table = cache.setdefault(key, table)  # a build that raced ours: one table for all
            cache.move_to_end(key)
            rows = sum(t.row_count() for t in cache.values())
            while len(cache) > 1 and (len(cache) > self._TABLE_CACHE_SIZE or rows > self._TABLE_CACHE_ROWS):
                rows -= cache.popitem(last=False)[1].row_count()  # the least recently used (never the newest)
        return table

    has_compatibles = True  # diffusers' schedulers all say so, LCM (whose list is empty) included

    @property
    def compatibles(self) -> list:
        """The scheduler classes that take this one's config (``[cls.from_config(s.config) for cls in
        s.compatibles]``), its own included, as diffusers lists them: diffusers' classes when
        diffusers is installed, else kdfast's."""
        names = list(dict.fromkeys([self.diffusers_class_name(), *self._compatibles]))
        try:
            import diffusers
        except ImportError:
            from .convert import _registry

            registry = _registry()
            return [registry[n] for n in names if n in registry]
        return [getattr(diffusers, n) for n in names if hasattr(diffusers, n)]

    # ---------------------------------------------------------------- step index

    @property
    def step_index(self) -> Optional[int]:
        """The index of the step about to run (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """The first step index, as set by :meth:`set_begin_index` (None until then), as in diffusers."""
        return self._begin_index

    # Why a whole loop of this scheduler cannot be captured in a CUDA graph (kdfast.sample's
    # cuda_graph=True, CapturedSampler), where it cannot: refused up front, not mid-capture.
    _graph_refusal: Optional[str] = None
    # A sample narrower than the model output is stepped in the model output's dtype, as
    # diffusers' arithmetic promotes it (see promoted_sample); False where diffusers casts the result
    # back to the sample's dtype (UniPC, SA-Solver, LTX-Video's Euler ancestral).
    _steps_in_the_wider_dtype = True

    def _has_stepped(self) -> bool:
        """Whether the loop has moved past its start since ``set_timesteps`` (a whole-loop run
        must start from there). A step index at the start is not a step: ``scale_model_input``
        sets it before the first one."""
        return self._step_index is not None and self._step_index != (self._begin_index or 0)

    def _start_new_loop(self) -> None:
        """What every ``set_timesteps`` does, as diffusers' do: the next loop starts from its
        beginning (a begin index set for the last one, img2img's, does not carry over)."""
        self._step_index = None
        self._begin_index = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where the loop starts in ``timesteps`` (pipelines call this for img2img)."""
        if int(begin_index) < 0:
            raise ValueError(f"begin_index must be >= 0, got {begin_index}")
        self._begin_index = int(begin_index)

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None': call set_timesteps(...) before step(...)")

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """Index of ``timestep`` in the schedule.

        An element of the schedule (what pipelines pass: iterating a tensor yields views,
        whose storage offset is the index) is found at its own position, without a host sync.
        Anything else (a number, a copy) is compared by value, reading a tensor back once; a
        value the schedule holds more than once gives its second match, as in diffusers.
        diffusers compares values only, so for an element whose value repeats it can answer
        another position: a schedule whose Karras or beta sigmas round to the same timestep
        twice made its loops skip a step and run off the end.
        """
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        index = self.schedule_index(timestep) if schedule is self.timesteps else schedule_position(timestep, schedule)
        if index is not None:
            return index
        if not isinstance(timestep, (torch.Tensor, np.ndarray, numbers.Real)) or isinstance(timestep, bool):
            # (None or a string matched no value: the multistep schedulers then took their last step)
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__} {timestep!r}")
        values = (timestep.numel() if isinstance(timestep, torch.Tensor)
                  else timestep.size if isinstance(timestep, np.ndarray) else 1)
        if values != 1:
            raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
        value = timestep.item() if isinstance(timestep, (torch.Tensor, np.ndarray)) else timestep
        if schedule is self.timesteps:
            self._refresh_host_timesteps()
        host = self._host_timesteps if schedule is self.timesteps else _host_values(schedule)
        if isinstance(schedule, torch.Tensor):
            # compared as diffusers compares them (schedule == timestep), in torch's promoted
            # dtype: a bf16 copy of timestep 999 reads 1000, which the schedule, promoted to bf16
            # as well, holds at 999's position (compared as numbers, nothing matched and the
            # multistep schedulers took their last step); a Python float 1.3 is float32 1.3 in a
            # float32 schedule (compared in float64, it matched nothing)
            dtype = torch.result_type(schedule, timestep if isinstance(timestep, torch.Tensor) else value)
            equal = torch.tensor(host, dtype=schedule.dtype).to(dtype) == torch.tensor(value, dtype=dtype)
            matches = equal.nonzero().flatten().tolist()
        else:
            matches = [i for i, t in enumerate(host) if t == value]
        if not matches:
            if self._unknown_timestep_is_last:
                return len(host) - 1
            raise IndexError(f"timestep {value} is not one of the schedule's {len(host)} timesteps"
                             + (f" ({host[0]:g} to {host[-1]:g})" if host else "") + "; pass one of them")
        # For img2img the first step may be a duplicate; diffusers takes the second match.
        return matches[1] if len(matches) > 1 else matches[0]

    def _staged_schedule(self) -> bool:
        """Whether the schedule's positions alternate first and second stages (two-stage
        schedulers, from construction: diffusers builds their training schedule by set_timesteps)."""
        return True

    def _init_step_index(self, timestep) -> None:
        """Where a loop starts: the begin index when set, else the position of its first timestep.

        A two-stage scheduler (``order == 2``: Heun's predictor and corrector, KDPM2's and
        DPM-Solver-SDE's two stages) evaluates the model twice per step. Where its schedule
        repeats a timestep, the pair is one step's second stage and the next step's first, at
        the same sigma; a loop can only start at a first stage, so a start at the first of such
        a pair moves to the second (the position diffusers' value lookup gives); a start at any
        other second stage is an error (diffusers' steps give NaN or a zero-length step there).
        A schedule without stages (flow-matching Heun's training schedule, before
        ``set_timesteps``: ``_staged_schedule`` is False) starts anywhere."""
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        index = self.index_for_timestep(timestep)
        if self.order == 2 and index % 2 == 1 and self._staged_schedule():
            host = self._host_timesteps
            if index + 1 < len(host) and host[index + 1] == host[index]:
                index += 1
            else:
                raise ValueError(
                    f"timestep {host[index]:g} is timesteps[{index}], the second stage of a {type(self).__name__} "
                    "step: a loop must start at a first stage, an even position of timesteps (pipelines slice "
                    "timesteps[t_start * scheduler.order:]), or call set_begin_index(...) first")
        self._step_index = index

    def _noising_indices(self, timesteps) -> List[int]:
        """The schedule positions ``add_noise`` (and ``scale_noise``) use for a batch of
        ``timesteps``, as diffusers picks them: each timestep's own position while no begin
        index is set (training), else the current step, or the begin index before the first
        step, for the whole batch (img2img, inpainting)."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps.cpu()]
        start = self._step_index if self._step_index is not None else self._begin_index
        return [start] * timesteps.shape[0]

    @property
    def timesteps(self) -> torch.Tensor:
        """The schedule's timesteps. Pipelines and users may assign them (a slice of the schedule
        for img2img or SDEdit, a custom schedule): the step then follows the new values."""
        return self._timesteps

    @timesteps.setter
    def timesteps(self, timesteps) -> None:
        # The step reads timestep values and the schedule's length from a host copy (no sync on
        # the step path); an assigned schedule is read back here, once.
        self._set_timesteps(timesteps)

    def _set_timesteps(self, timesteps, host: Optional[Sequence[float]] = None) -> None:
        """Adopt ``timesteps`` and its host copy (``host``: the same values, when already on the host)."""
        if host is None and getattr(timesteps, "ndim", 1) != 1:
            raise ValueError(f"timesteps must be a 1-D sequence, got shape {tuple(timesteps.shape)}")
        self._timesteps = timesteps
        self._host_timesteps = [float(t) for t in (_host_values(timesteps) if host is None else host)]
        self._timestep_span = schedule_span(timesteps)  # once here, not on every step
        # The tensor's version counter tells when the caller edits it in place (timesteps[0] = 950):
        # the host copy is then read back again (inference tensors keep no counter).
        self._timesteps_version = (timesteps._version if isinstance(timesteps, torch.Tensor)
                                   and not timesteps.is_inference() else None)

    def _refresh_host_timesteps(self) -> None:
        """Read the schedule back again if it was edited in place since its host copy was taken."""
        version = self._timesteps_version
        if version is not None and self._timesteps._version != version:
            self._set_timesteps(self._timesteps)

    def schedule_index(self, timestep) -> Optional[int]:
        """The index of ``timestep`` in ``self.timesteps`` when it is one of its elements (what
        pipelines pass), without a host sync; else None."""
        schedule, span = getattr(self, "_timesteps", None), getattr(self, "_timestep_span", None)
        if not isinstance(schedule, torch.Tensor):
            return None
        self._refresh_host_timesteps()
        if span is None or schedule.data_ptr() != span[0]:
            # a copy or an unpickled scheduler holds its own tensor at another address
            span = self._timestep_span = schedule_span(schedule)
        return schedule_position(timestep, span=span)

    def schedule_positions(self, timesteps: torch.Tensor) -> Optional[np.ndarray]:
        """The positions in ``self.timesteps`` of every element of ``timesteps`` (flattened,
        row-major) when ``timesteps`` is a view of the schedule (an element, a slice,
        ``t[:, None].expand(...)``), found from addresses and strides without reading a value;
        else None."""
        probe = timesteps[(0,) * timesteps.dim()] if timesteps.dim() else timesteps  # a 0-d view of the first
        first = self.schedule_index(probe)
        if first is None:
            return None
        _, step_bytes, length, _, _ = self._timestep_span
        offsets = np.zeros(1, dtype=np.int64)
        for size, stride in zip(timesteps.shape, timesteps.stride()):
            offsets = (offsets[:, None] + np.arange(size, dtype=np.int64)[None, :] * stride).reshape(-1)
        index, misaligned = np.divmod(offsets * timesteps.element_size(), step_bytes)
        positions = first + index
        if misaligned.any() or positions.max() >= length:  # (strides are >= 0: none lies before the first)
            return None
        return positions

    def timestep_values(self, timesteps: torch.Tensor) -> np.ndarray:
        """The values of a non-empty timestep tensor (flattened, row-major) on the host: from the
        schedule's host copy for a view of ``self.timesteps`` (no read), from the tensor's memory
        on the CPU, else read back once (one host sync). Float64 for a floating tensor (numpy has
        no bfloat16; every float of a narrower dtype is exact in it), int64 for an integer one."""
        floating = timesteps.is_floating_point()
        positions = self.schedule_positions(timesteps)
        if positions is not None:
            host = self._host_timesteps
            return np.array([host[i] for i in positions.tolist()], dtype=np.float64 if floating else np.int64)
        values = host_readable(timesteps)
        if values is None:
            raise ValueError("timesteps batched by torch.func.vmap cannot be read as one schedule position; "
                             "pass the timestep unbatched (in_dims=None): the whole batch steps from it")
        with outside_transforms():
            values = values.detach()
            if values.device.type != "cpu":
                values = values.cpu()  # the one read of timesteps on a device that are not a view of the schedule
            if floating:
                values = values.to(torch.float64)
            return values.reshape(-1).numpy()

    # ---------------------------------------------------------------- fused call

    @staticmethod
    def _noise(noise: Optional[torch.Tensor], generator, like: torch.Tensor, dtype=torch.float32):
        if noise is not None:
            return noise
        return randn_like_diffusers(like.shape, generator, like.device, dtype)

    @staticmethod
    def _variance_noise(variance_noise: Optional[torch.Tensor], generator, like: torch.Tensor, dtype):
        """A step's noise where diffusers' ``step`` takes ``variance_noise`` (DDIM, DDPM): that
        tensor, checked, else drawn from ``generator`` as diffusers draws it; both given is
        diffusers' error."""
        if variance_noise is None:
            return randn_like_diffusers(like.shape, generator, like.device, dtype)
        if generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                             "`generator` or `variance_noise` stays `None`.")
        check_variance_noise(variance_noise, like, "shape")
        return variance_noise

    def _fused_output(self, key, sample: torch.Tensor, model_output: torch.Tensor, *, want_x0: bool = False,
                      prev_dtype: Optional[torch.dtype] = None, **fused) -> SchedulerOutput:
        """One fused step for table entry ``key`` as a :class:`SchedulerOutput` (see :meth:`_output`)."""
        want_x0 = self._x0_with_step(want_x0, sample, model_output, **fused)
        result = self._fused(key, sample, model_output, write_aux=want_x0, **fused)
        return self._output(result, key, sample, model_output, prev_dtype, **fused)

    @staticmethod
    def _x0_with_step(want_x0: bool, sample: torch.Tensor, model_output: torch.Tensor, **fused) -> bool:
        """Whether the step kernel must write x0 itself: asked for, or an input is an inference
        tensor (made under ``torch.inference_mode``), which keeps no version counter, so an
        in-place edit before a lazily computed x0 is read could not be detected."""
        if want_x0:
            return True
        tensors = (sample, model_output, fused.get("cond"), fused.get("aux"), fused.get("noise"),
                   *fused.get("history", ()))
        return any(t is not None and t.is_inference() for t in tensors)

    def _output(self, result: ops.StepResult, key, sample: torch.Tensor, model_output: torch.Tensor,
                prev_dtype: Optional[torch.dtype] = None, **fused) -> SchedulerOutput:
        """The step's output, with x0 as the kernel wrote it or else computed when first read:
        the same kernel on the same inputs (``fused``: the step's other ``_fused`` arguments),
        writing x0. Reading it after an input was modified in place raises instead of giving
        a wrong x0."""
        prev = result.sample
        if prev_dtype is not None and prev.dtype != prev_dtype:
            prev = prev.to(prev_dtype)
        if result.aux is not None:
            return SchedulerOutput(prev, self._as_x0_dtype(result.aux, sample, model_output))
        table = self._table
        inputs = [t for t in (sample, model_output, fused.get("cond"), fused.get("aux"), fused.get("noise"),
                              *fused.get("history", ())) if t is not None]
        versions = [t._version for t in inputs]

        def make_x0() -> torch.Tensor:
            if [t._version for t in inputs] != versions:
                raise RuntimeError("pred_original_sample: an input of this step was modified in place since; "
                                   "pass return_pred_original_sample=True to step() to get it with the step")
            again = dict(fused, write_history=False, write_aux=True, table=table)
            return self._as_x0_dtype(self._fused(key, sample, model_output, **again).aux, sample, model_output)

        return SchedulerOutput(prev, make_x0=make_x0)

    # diffusers' Euler schedulers step a half-precision sample in float32 (their x0 is float32)
    _x0_from_float32_sample = False

    def _as_x0_dtype(self, x0: torch.Tensor, sample: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """``x0`` in the dtype of diffusers' ``pred_original_sample``: the model output's where the
        model predicts x0 itself, else the sample's (float32 for a half-precision one in the Euler
        schedulers) promoted with the model output's."""
        if getattr(self.config, "prediction_type", None) == "sample":
            dtype = model_output.dtype
        else:
            base = sample.dtype
            if self._x0_from_float32_sample and base in (torch.float16, torch.bfloat16):
                base = torch.float32
            dtype = promote(base, model_output.dtype)
        return x0 if x0.dtype is dtype else x0.to(dtype)

    def _row(self, key, dtype: torch.dtype, table: Optional["CoefficientTable"] = None) -> torch.Tensor:
        """The coefficient row of table entry ``key`` for a step of ``dtype``: float64 for a float64
        step, else the float32 row the kernels read."""
        if type(key) is TableRow:  # an extra step's own coefficients (GrowingTable.ensure)
            return key.row64() if dtype is torch.float64 else key.row
        table = self._table if table is None else table
        return table.row64(key) if dtype is torch.float64 else table._rows[key]

    def _fused(self, key, sample: torch.Tensor, model_output: torch.Tensor, *,
               cond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
               history: Sequence[torch.Tensor] = (), aux: Optional[torch.Tensor] = None,
               noise: Optional[torch.Tensor] = None, write_history: bool = False,
               write_aux: bool = False, clip_value: Optional[float] = None,
               dynamic: Optional[Tuple[float, float]] = None,
               history_dtype: Optional[torch.dtype] = None,
               table: Optional["CoefficientTable"] = None) -> ops.StepResult:
        """One kernel call for table entry ``key``; ``dynamic=(ratio, max_value)`` turns on
        dynamic thresholding.

        Calls the op's positional entry :func:`kdfast.ops.solver_step.fused_step`: the row is
        this scheduler's own (packed by :class:`CoefficientTable`), so only the tensors and
        scalars are checked, as ``ops.solver_step`` checks them."""
        if len(history) > 3 or (clip_value is not None and dynamic is not None):
            raise ValueError("a fused step reads at most 3 history entries and clips or thresholds, not both")
        narrow = None
        dtype = sample.dtype
        mixed = getattr(model_output, "dtype", dtype) is not dtype
        if not mixed:
            for h in history:  # (a history set from outside may be wider)
                if h is not None and h.dtype is not dtype:
                    mixed = True
                    break
        if mixed:
            _check_output_dtypes(("model_output", model_output), *(("history", h) for h in history))
            wide = widest_dtype(dtype, model_output, *history)
            if self._steps_in_the_wider_dtype:
                sample = sample.to(wide)
            elif wide is torch.float64:
                # (the kernels stop at float32: float64 inputs are stepped in float64, and the
                # result returned in the sample's dtype, as these schedulers return it)
                narrow, sample = dtype, sample.to(wide)
        table = self._table if table is None else table
        row = self._row(key, sample.dtype, table)
        dynamic_scale = None
        if dynamic is not None:
            cx, cm = table.plan(key).x0
            dynamic_scale = ops.threshold_scale(sample, model_output, cx, cm, cond=cond,
                                                guidance_scale=guidance_scale, ratio=dynamic[0],
                                                max_value=dynamic[1])
        result = fused_step(sample, model_output, row, cond, guidance_scale, history, aux, noise, clip_value,
                            dynamic_scale, write_history, write_aux, history_dtype)
        if narrow is None:
            return result
        aux = None if result.aux is None else result.aux.to(narrow)
        return result._replace(sample=result.sample.to(narrow), aux=aux)

    def _fused_per_sample(self, keys: Sequence, sample: torch.Tensor, model_output: torch.Tensor, *,
                          cond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
                          noise: Optional[torch.Tensor] = None, clip_value: Optional[float] = None,
                          dynamic: Optional[Tuple[float, float]] = None) -> ops.StepResult:
        """One kernel call for a batch whose sample ``i`` steps with table entry ``keys[i]`` (one
        key for the whole batch works too): :meth:`_fused` when they are all one entry, else one
        pass with a row of coefficients per sample. Dynamic thresholding then adds a
        threshold-scale pass per run of consecutive equal entries (the quantile takes one x0
        formula per call)."""
        first = keys[0]
        if all(k == first for k in keys):
            return self._fused(first, sample, model_output, cond=cond, guidance_scale=guidance_scale, noise=noise,
                               clip_value=clip_value, dynamic=dynamic)
        if self._steps_in_the_wider_dtype:
            sample = promoted_sample(sample, model_output)
        dtype = sample.dtype
        rows = torch.stack([self._row(k, dtype) for k in keys])
        dynamic_scale = None
        if dynamic is not None:
            scales = []
            start, n = 0, len(keys)
            for stop in range(1, n + 1):
                if stop < n and keys[stop] == keys[start]:
                    continue
                cx, cm = self._table.plan(keys[start]).x0
                scales.append(ops.threshold_scale(
                    sample[start:stop], model_output[start:stop], cx, cm,
                    cond=None if cond is None else cond[start:stop], guidance_scale=guidance_scale,
                    ratio=dynamic[0], max_value=dynamic[1]))
                start = stop
            dynamic_scale = torch.cat(scales)
        return fused_step(sample, model_output, rows, cond, guidance_scale, (), None, noise, clip_value, dynamic_scale,
                          False, False, None)

    # ---------------------------------------------------------------- common API

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True, **kwargs):
        """diffusers' ``step``: one fused kernel call, returns ``SchedulerOutput(prev_sample)``."""
        reject_internal_step_arguments(kwargs)
        out = self._step(model_output, timestep, sample, None, 1.0, generator, variance_noise, **kwargs)
        return out if return_dict else out.to_tuple()

    def step_cfg(self, uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, timestep,
                 sample: torch.Tensor, generator: Optional[torch.Generator] = None,
                 variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True, **kwargs):
        """``step`` with classifier-free guidance fused into the same kernel:
        ``model_output = uncond + guidance_scale * (cond - uncond)``. ``uncond`` and ``cond`` may
        be the two halves of one batched forward (``out.chunk(2)``) without copies."""
        self._check_step_inputs(uncond, sample, "uncond")
        self._check_step_inputs(cond, sample, "cond")
        uncond, cond = guidance_pair(uncond, cond)
        out = self._step(uncond, timestep, sample, cond, guidance_scale, generator, variance_noise, **kwargs)
        return out if return_dict else out.to_tuple()

    def _step(self, model_output, timestep, sample, cond, guidance_scale, generator, variance_noise,
              **kwargs) -> SchedulerOutput:
        raise NotImplementedError

    # Whether the schedule's last timestep is only where the loop ends (sCM's 0), not a step from it
    _last_timestep_is_the_end = False

    def _raise_if_undefined(self, key) -> None:
        """Raise the reason a :class:`CheckedPlan` gives for being undefined (inf or NaN in diffusers)."""
        error = getattr(self._table.plan(key), "error", None)
        if error is not None:
            raise ValueError(error)

    def _loop_step(self, model_output: torch.Tensor, cond: Optional[torch.Tensor], guidance_scale, timestep,
                   previous_timestep, sample: torch.Tensor, carry, generator: Optional[torch.Generator],
                   options: Dict[str, Any]):
        """One step of a whole loop (``kdfast.sample``): ``step``, or ``step_cfg`` when ``cond`` is
        given, with the per-step ``options`` (e.g. DDIM's ``eta``). Returns ``(next sample,
        carry)``; ``carry`` is what the next step needs from this one beyond the sample (None
        here: a scheduler keeps its own history), and ``previous_timestep`` the timestep before
        ``timestep`` (None on the first step)."""
        kwargs = dict(options) if generator is None else dict(options, generator=generator)
        if cond is None:
            return self.step(model_output, timestep, sample, **kwargs).prev_sample, None
        return self.step_cfg(model_output, cond, guidance_scale, timestep, sample, **kwargs).prev_sample, None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model input at this step, as diffusers scales it (here: unchanged)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _check_step_inputs(self, model_output: torch.Tensor, sample: torch.Tensor, name: str = "model_output") -> None:
        """``model_output`` (the argument called ``name``: ``uncond`` or ``cond`` in step_cfg)
        against ``sample``."""
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError(f"{name} and sample must be torch.Tensor")
        if model_output.shape != sample.shape:
            raise ValueError(f"{name} shape {tuple(model_output.shape)} does not match sample "
                             f"shape {tuple(sample.shape)}")


def push_history(entries: list, newest, depth: int) -> None:
    """diffusers' rotation of a multistep history, in place: ``entries[k] = entries[k + 1]`` for
    ``k < depth - 1``, then ``entries[-1] = newest`` (the list object stays the caller's)."""
    for k in range(depth - 1):
        entries[k] = entries[k + 1]
    entries[-1] = newest


def converted_dtype(sample: torch.Tensor, model_output: torch.Tensor, model_only: bool) -> torch.dtype:
    """The dtype of a multistep scheduler's converted model output (its history entry) in
    diffusers: the model output's where the conversion returns it as it is (``model_only``:
    x0 predicted by the model for a data-prediction solver, epsilon for a noise-prediction one),
    else the model output's promoted with the sample's (``x0 = (x - sigma * eps) / alpha``)."""
    return model_output.dtype if model_only else promote(sample.dtype, model_output.dtype)


def promoted_sample(sample: torch.Tensor, *others) -> torch.Tensor:
    """``sample`` in the widest of its dtype and the other tensors' (None skipped). diffusers'
    step arithmetic promotes: a half-precision sample stepped with a float32 model output gives
    a float32 step (and the loop goes on in float32); the kernel writes its outputs in the
    sample's dtype."""
    wide = widest_dtype(sample.dtype, *others)
    return sample if wide is sample.dtype else sample.to(wide)


def widest_dtype(dtype: torch.dtype, *tensors) -> torch.dtype:
    """``dtype`` promoted with the dtype of each of ``tensors`` (None, or anything without a
    dtype, skipped)."""
    for t in tensors:
        other = getattr(t, "dtype", None)
        if other is not None:
            dtype = promote(dtype, other)
    return dtype


def promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types(a, b)``, looked up once per pair (a dict lookup costs a quarter of
    the call, and steps make it every time)."""
    if a is b:
        return a
    promoted = _PROMOTED.get((a, b))
    if promoted is None:
        promoted = _PROMOTED[(a, b)] = torch.promote_types(a, b)
    return promoted


_PROMOTED: Dict[Tuple[torch.dtype, torch.dtype], torch.dtype] = {}


def _check_output_dtypes(*named) -> None:
    """Model outputs (and history entries) of another dtype than the sample are promoted with it:
    a complex or integer one is named here (promoted, it was blamed on the sample)."""
    for name, t in named:
        if isinstance(t, torch.Tensor) and (t.is_complex() or not t.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                            f"got {t.dtype}")


def guidance_pair(uncond, cond):
    """``uncond`` and ``cond`` in one dtype, the wider of theirs: diffusers' guided output
    ``uncond + s * (cond - uncond)`` has it, and the step reads its output's dtype from
    ``uncond`` (the narrower one is copied; the halves of one forward share a dtype anyway)."""
    if isinstance(uncond, torch.Tensor) and isinstance(cond, torch.Tensor) and uncond.dtype != cond.dtype:
        _check_output_dtypes(("uncond", uncond), ("cond", cond))
        dtype = promote(uncond.dtype, cond.dtype)
        return uncond.to(dtype), cond.to(dtype)
    return uncond, cond


# The wrappers kdfast puts on scheduler methods (not a marker attribute: functools.wraps would
# copy one onto a user's override, which would then go unwrapped).
_KDFAST_WRAPPERS: "weakref.WeakSet[Callable]" = weakref.WeakSet()


def _default_device_is_off_host() -> bool:
    """Whether torch's default device is set to something other than the CPU: the innermost
    device context on the function-mode stack (``torch.get_default_device()`` would make a
    tensor to find out, ~16 us)."""
    if not torch._C._len_torch_function_stack():
        return False  # the usual case: ~0.1 us
    for mode in reversed(torch.overrides._get_current_function_mode_stack()):
        if isinstance(mode, _DeviceContext):
            return torch.device(mode.device).type != "cpu"
    return False


def _host_default_device(fn: Callable, builds_tables: bool = False, counts_steps: bool = False,
                         steps: bool = False) -> Callable:
    """``fn`` with torch's default device set to the CPU while it runs, when the caller set
    another (``torch.set_default_device("cuda")``, a ``with torch.device(...)`` block): a
    scheduler's tables, schedules and coefficient rows are host tensors made without a device
    (a coefficient table on the GPU would be refused by the step, and reading it would sync).
    Tensors on the sample's device are made from the sample, so nothing else changes.

    ``builds_tables`` (``__init__``, ``set_timesteps``): also run outside torch.func's
    transforms when called inside one. The tables are constants, and inside a transform torch
    makes every tensor a storage-less wrapper that numpy cannot read (diffusers' schedulers
    fail there for that reason): a scheduler made inside ``torch.func.grad`` works.

    ``counts_steps`` (``set_timesteps``): its ``num_inference_steps``, when given, must be an
    integer (an integral float passes as its int): a fraction was truncated by some schedulers
    (2.9 steps ran 2), a string taken or failed deep inside others.

    ``steps`` (``step`` and its variants): first refuse an ``alphas_cumprod`` written in place
    that the step's host copy would miss (:meth:`_AlphasCumprod.check_unchanged`)."""
    def run(*args, **kwargs):
        if _default_device_is_off_host():
            with torch.device("cpu"):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    parameters = list(inspect.signature(fn).parameters) if counts_steps else []
    steps_at = parameters.index("num_inference_steps") if "num_inference_steps" in parameters else None

    @functools.wraps(fn)
    def on_host(*args, **kwargs):
        if steps:
            _AlphasCumprod.check_unchanged(args[0])
        if counts_steps:
            args, kwargs = _integer_step_count(steps_at, args, kwargs)
        if builds_tables:
            args, kwargs = _constant_arguments(fn, args, kwargs)
            with outside_transforms():
                return run(*args, **kwargs)
        return run(*args, **kwargs)

    _KDFAST_WRAPPERS.add(on_host)
    return on_host


def _integer_step_count(position: Optional[int], args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """``set_timesteps``' arguments (``self`` first) with ``num_inference_steps`` (argument
    ``position``, or None where the method has no such parameter) as an int."""
    if position is None:
        return args, kwargs
    if len(args) > position:
        return (*args[:position], _step_count(args[position]), *args[position + 1:]), kwargs
    if "num_inference_steps" in kwargs:
        kwargs = dict(kwargs, num_inference_steps=_step_count(kwargs["num_inference_steps"]))
    return args, kwargs


def _step_count(value):
    if value is None:
        return None
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:  # (a 0-d tensor or array: its number)
        value = value.item()
    try:
        return check_int("num_inference_steps", value)
    except ValueError:  # (the value's lower bound is the scheduler's own check)
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {value!r}") from None


def _constant_arguments(method: Callable, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """The tensor arguments of a table-building method (``sigmas=``, ``timesteps=``,
    ``trained_betas=``, ...) beneath torch.func's wrappers, where the method runs: a schedule is
    a constant of the scheduler. One that a transform differentiates or batches is refused:
    its dependence on the transformed input would be dropped, silently."""
    def wrapped(value) -> bool:
        if isinstance(value, (list, tuple)):  # (sigmas=[t0, t1, ...])
            return any(wrapped(v) for v in value)
        return transform_tracks(value) is not None

    if not any(wrapped(v) for v in (*args, *kwargs.values())):
        return args, kwargs  # (outside transforms: a few reads per argument)
    names = list(inspect.signature(method).parameters)

    def plain(name, value):
        if isinstance(value, (list, tuple)):
            return type(value)(plain(name, v) for v in value)
        tracked = transform_tracks(value)
        what = f"{method.__qualname__}: `{name}`"
        if tracked == "differentiated":
            raise ValueError(f"{what} is differentiated by a torch.func transform, but a schedule is a constant of "
                             f"the scheduler; pass `{name}.detach()`")
        if tracked == "batched":
            raise ValueError(f"{what} is batched by torch.func.vmap, but a scheduler holds one schedule; make a "
                             "scheduler per schedule")
        return value if tracked is None else host_readable(value)

    return (tuple(plain(names[k] if k < len(names) else f"argument {k}", v) for k, v in enumerate(args)),
            {k: plain(k, v) for k, v in kwargs.items()})


def _on_host_by_default(cls) -> None:
    """Wrap the public methods ``cls`` defines (and ``__init__``) in :func:`_host_default_device`
    (functions only: a callable object stored on the class is not a method)."""
    for name, method in list(cls.__dict__.items()):
        if (name.startswith("_") and name != "__init__") or not inspect.isfunction(method) \
                or method in _KDFAST_WRAPPERS:
            continue
        setattr(cls, name, _host_default_device(method, builds_tables=name in ("__init__", "set_timesteps"),
                                                counts_steps=name == "set_timesteps",
                                                steps=name.startswith("step") or name == "batch_step_no_noise"))


# ... and those of _steps_run_eagerly, kept apart: a step gets both, the eager one outermost.
_EAGER_WRAPPERS: "weakref.WeakSet[Callable]" = weakref.WeakSet()


def run_eagerly(method: Callable) -> Callable:
    """``method`` run eagerly under torch.compile (a graph break around it): a step's work is
    host bookkeeping around one kernel call, and tracing it recompiled at every step.

    Only a traced call goes through the disabling wrapper: it costs ~3 us per call, most of an
    eager step's host time. That wrapper is ``torch._disable_dynamo`` (torch 2.0 and newer),
    which imports torch._dynamo at its first call: ``torch.compiler.disable`` imports it, with
    triton and sympy (about 2 s), when applied, which here is at ``import kdfast``."""
    disabled = torch._disable_dynamo(method)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return disabled(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    return wrapper


def _steps_run_eagerly(cls) -> None:
    """Make the ``step``, ``step_cfg`` and ``scale_model_input`` that ``cls`` defines run
    eagerly under torch.compile (:func:`run_eagerly`; see :class:`FusedScheduler`);
    ``inspect.signature`` still sees their parameters."""
    for name in ("step", "step_cfg", "scale_model_input"):
        method = cls.__dict__.get(name)
        if method is None or method in _EAGER_WRAPPERS:
            continue
        step = run_eagerly(method)
        _EAGER_WRAPPERS.add(step)
        setattr(cls, name, step)


_on_host_by_default(FusedScheduler)
_steps_run_eagerly(FusedScheduler)


class MultistepScheduler(SigmaSpacings, LogSigmaTimesteps, Thresholding, FusedScheduler):
    """Shared by the VP multistep schedulers (DPM-Solver, UniPC, DEIS): diffusers' training
    noise schedule, the history of converted model outputs, the per-(step, order) table, and
    ``add_noise``."""

    _unknown_timestep_is_last = True

    @property
    def order(self) -> int:  # diffusers' multistep schedulers report order 1 to pipelines
        return 1

    def _init_noise_schedule(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             rescale_betas_zero_snr: bool = False) -> None:
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr,
            floor_terminal=True)
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._set_timesteps(torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                         dtype=np.float32)[::-1].copy()))
        self._table = None
        self._reset_history()

    def _sigma_to_alpha_sigma_t(self, sigma):
        """(alpha_t, sigma_t) of noise level ``sigma`` (a tensor or a number): the VP process's
        ``(1 / sqrt(sigma^2 + 1), sigma / sqrt(sigma^2 + 1))``, or ``(1 - sigma, sigma)`` with
        flow sigmas. diffusers' helper; the tables use :func:`_schedule.alpha_sigma`."""
        if self.config.get("use_flow_sigmas", False):
            return 1 - sigma, sigma
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def _converted_output(self, model_output: torch.Tensor, sample: torch.Tensor, key,
                          threshold: bool) -> torch.Tensor:
        """The body of ``convert_model_output``: the history output of the fused step ``key`` at
        the current step index."""
        if self._step_index is None:
            raise ValueError("convert_model_output needs a step index: call step() first or set_begin_index()")
        cfg = self.config
        return self._fused(key, sample, model_output, write_history=True,
                           dynamic=(cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if threshold else None
                           ).history

    def _train_sigmas(self) -> np.ndarray:
        return (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()

    def _reset_history(self) -> None:
        self.model_outputs: List[Optional[torch.Tensor]] = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _spaced_sigmas(self, timesteps: np.ndarray, n: int, round_karras: bool = True, lu: bool = False):
        """``(sigmas, timesteps)`` of ``n`` steps (no final sigma) under the config's sigma
        spacing, as diffusers' VP multistep schedulers make them: Karras (or, with ``lu``, Lu
        lambda), exponential or beta sigmas between the training ends, or flow-shifted sigmas,
        each with the timesteps mapped back from them (Karras / Lu ones rounded with
        ``round_karras``); else the training sigmas interpolated at ``timesteps``."""
        cfg = self.config
        train = self._train_sigmas()
        log_sigmas = np.log(train)
        flipped = np.flip(train).copy()
        if cfg.use_karras_sigmas or lu:
            if cfg.use_karras_sigmas:
                sigmas = karras_sigmas(*sigma_range(cfg, flipped), n)
            else:
                lambdas = np.flip(log_sigmas.copy())
                sigmas = np.exp(lu_lambdas(float(lambdas[-1]), float(lambdas[0]), n))
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            return sigmas, (timesteps.round() if round_karras else timesteps)
        if cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            spacing = exponential_sigmas if cfg.use_exponential_sigmas else beta_sigmas
            sigmas = spacing(*sigma_range(cfg, flipped), n)
            return sigmas, np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        if cfg.use_flow_sigmas:
            s = 1.0 - np.linspace(1, 1 / cfg.num_train_timesteps, n + 1)
            sigmas = np.flip(cfg.flow_shift * s / (1 + (cfg.flow_shift - 1) * s))[:-1].copy()
            return sigmas, (sigmas * cfg.num_train_timesteps).copy()
        return np.interp(timesteps, np.arange(0, len(train)), train), timesteps

    def _install_schedule(self, sigmas: np.ndarray, timesteps, device) -> None:
        """Adopt a new schedule (sigmas ending with the final sigma) and plan every step."""
        sigmas = np.asarray(sigmas).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        timesteps = torch.from_numpy(np.asarray(timesteps)).to(dtype=torch.int64)
        self._set_timesteps(timesteps.to(device=device), timesteps.tolist())
        self.num_inference_steps = len(self._host_timesteps)
        self._reset_history()
        self._table = self._shared_table(lambda: CoefficientTable(self._plans([float(v) for v in sigmas])))

    def _plans(self, sigmas: List[float]) -> Dict[object, StepPlan]:
        plans = {}
        for i in range(len(sigmas) - 1):
            # Every order at every index: history injected from outside (diffusers' tests do
            # this) can ask for a higher order early, reading sigmas[i - k] with wrap-around.
            for order in range(1, self.config.solver_order + 1):
                plan = self._plan(sigmas, i, order)
                if plan is not None:
                    plans[(i, order)] = plan
        return plans

    def _plan(self, sigmas: List[float], i: int, order: int) -> Optional[StepPlan]:
        """The plan of step ``i`` at ``order``, or None where it is undefined."""
        raise NotImplementedError

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha_t * x0 + sigma_t * noise`` at each timestep, as diffusers computes it."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigmas[self._noising_indices(timesteps)].flatten()
        while sigma.dim() < original_samples.dim():
            sigma = sigma.unsqueeze(-1)
        if self.config.get("use_flow_sigmas", False):
            alpha_t, sigma_t = 1 - sigma, sigma
        else:
            alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
            sigma_t = sigma * alpha_t
        return alpha_t * original_samples + sigma_t * noise
