"""What every kdfast training loop needs around its step: output folders, seeding, progress
bars, a metrics log and checkpoints that resume a run exactly.

A loop that saves all of its state with :class:`Checkpointer` -- model, optimizer, EMA,
the generators its data and noise come from, the global RNG its dropout draws from, and
loose tensors such as a partly consumed epoch order -- continues after :meth:`Checkpointer.load`
exactly as if it had never stopped: N steps straight and N/2 + resume + N/2 give the same bits.

Checkpoint format: one safetensors file per step, ``step-00000100.safetensors``. Every tensor of
the saved state is a safetensors tensor, and so is every numpy array (its ``.npy`` bytes, as
uint8); the structure around them (optimizer hyperparameters, Python RNG tuples, step counts)
is JSON in the file's metadata, with tensors referenced by name, so that ``state_dict`` -> file
-> ``load_state_dict`` returns equal objects, tuples included.

Bit-for-bit resumption also needs the same torch thread count and device type (they change
the floating point order): a loop records them with :func:`run_environment` in the
checkpoint's metadata and passes them to :meth:`Checkpointer.load` as ``same_bits``, which
warns (:class:`ReproducibilityWarning`) when the resumed run differs.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Mapping, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .._checks import check_count, is_integer_at_least

PathLike = Union[str, Path]
FORMAT = "kdfast checkpoint"
FORMAT_VERSION = 2  # 2: the CRC-32 covers the header too (1: the tensors alone; still read)
_NAME = re.compile(r"^step-(\d{8,})\.safetensors$")
ORPHAN_AGE = 3600.0  # seconds unchanged before a dead process's checkpoint temporary is removed
METRICS_FILE = "metrics.jsonl"  # the metrics log's name in a run's checkpoint folder
# atomic_files' names for a checkpoint or the metrics log being written (group 1: the writer's pid)
_TEMP_NAME = re.compile(r"^\.(?:step-\d{8,}\.safetensors|metrics\.jsonl)\.(\d+)\.tmp$")
LOCK_FILE = ".lock"  # held (flock) by the run writing a checkpoint folder
# The largest seed kdfast's commands accept: torch takes 64-bit seeds, and some callers seed a
# second generator with seed + 1.
MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------- output folders


class OutputDirError(OSError):
    """An output folder cannot be created or written; the message names the path and the reason."""


def prepare_output_dir(path: PathLike, overwrite: bool = True, subdirs: tuple = ()) -> Path:
    """Create ``path`` (and ``subdirs`` inside it) and check that files can be written there.

    ``overwrite=False`` refuses a folder that already holds files. Raises
    :class:`OutputDirError` naming the folder and the reason, before any work is done.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output folder {str(path)!r} is not writable: it is an existing file")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise OutputDirError(f"output folder {str(path)!r} already exists and is not empty "
                             "(choose another folder or allow overwriting)")
    try:
        for sub in (path, *(path / s for s in subdirs)):
            sub.mkdir(parents=True, exist_ok=True)
        # mkdir succeeds on an existing read-only folder; only a real write proves we can write.
        probe = path / f".write-test-{os.getpid()}"
        try:
            probe.write_text("ok")
        finally:  # (a write that fails part-way, on a full disk, leaves the file)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputDirError(f"output folder {str(path)!r} is not writable: {exc}") from exc
    return path


def check_output_file(path: PathLike, what: str = "output file") -> Path:
    """Check, before any work, that the file ``path`` can be written: its folder is created and
    probed with a real write (:func:`prepare_output_dir`), and ``path`` is not a folder or a
    read-only file. Raises :class:`OutputDirError` naming the path and the reason."""
    path = Path(path)
    if path.is_dir():
        raise OutputDirError(f"{what} {str(path)!r} is not writable: it is an existing folder")
    try:
        prepare_output_dir(path.parent)
    except OutputDirError as exc:
        raise OutputDirError(f"{what} {str(path)!r} cannot be written: {exc}") from exc
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputDirError(f"{what} {str(path)!r} is not writable: it is a read-only file")
    return path


def int_at_least(minimum: int):
    """An argparse ``type`` for integers >= ``minimum``: a bad value is a usage error naming the
    argument (exit status 2), not a traceback from deep inside the run."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def seed_arg(text: str) -> int:
    """The argparse ``type`` of every ``--seed``: an integer in [0, :data:`MAX_SEED`]. A bad
    value is a usage error naming the argument (exit status 2), not a traceback from torch."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1], got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"the seed must be an integer in [0, 2**63 - 1], got {value}")
    return value


seed_arg.__name__ = "seed"


def check_run_dir(directory: PathLike, resume: bool) -> Path:
    """Check a training run's checkpoint folder before any work: it is created and probed
    (:func:`prepare_output_dir`), and unless ``resume``, it must not hold an earlier run's
    checkpoints (``step-*.safetensors``) or metrics log (:data:`METRICS_FILE`): a new run
    there would replace the log and delete those checkpoints as stale. Raises
    :class:`OutputDirError` naming the folder and what it holds."""
    path = prepare_output_dir(directory)
    if not resume:
        found = sorted(p.name for p in path.iterdir() if _NAME.match(p.name) or p.name == METRICS_FILE)
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise OutputDirError(f"checkpoint folder {str(path)!r} holds an earlier run ({shown}): a new run "
                                 "would overwrite it; use --resume (resume=True) to continue it, "
                                 "or another folder")
    return path


def lock_run_dir(directory: PathLike) -> Optional[IO]:
    """Take the checkpoint folder for this process: an exclusive ``flock`` on its
    :data:`LOCK_FILE`, held until the returned file is closed (or the process ends, however it
    ends). A second run there would mix its checkpoints and metrics log with this one's (and
    delete its newer checkpoints as stale): :class:`OutputDirError` names the process that holds
    it. None where ``fcntl`` is missing (Windows) or the file system takes no locks (NFS mounted
    ``nolock``, some FUSE and Lustre mounts): no lock, with a warning there."""
    try:
        import fcntl
    except ImportError:
        return None
    path = prepare_output_dir(directory) / LOCK_FILE
    try:
        lock = open(path, "a+")
    except OSError as exc:  # (another user's lock file in a shared folder, a folder of that name)
        raise OutputDirError(f"checkpoint folder {str(path.parent)!r} cannot be locked: {exc}") from exc
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise OutputDirError(f"checkpoint folder {str(path.parent)!r} is in use by another run (process {holder}): "
                             "two runs there would mix their checkpoints; wait for it, or use another folder") from None
    except OSError as exc:
        lock.close()
        warnings.warn(f"checkpoint folder {str(path.parent)!r} cannot be locked ({exc}): nothing stops a second run "
                      "from writing there too", RuntimeWarning, stacklevel=2)
        return None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


@contextmanager
def atomic_files(*paths: PathLike) -> Iterator[List[Path]]:
    """Write several files so that each appears whole or not at all.

    Yields one temporary path per entry of ``paths``, in the same folder (so that the rename
    is atomic). Every path is checked before the block runs and again before the first
    rename: one that is a folder, or whose folder cannot be written, raises
    :class:`OutputDirError` and no file is replaced. When the block ends without an error,
    each temporary file is flushed to disk and renamed onto its path, in the order given; on
    an error (an interruption included) the temporary files are removed and the existing
    files are untouched. Between two renames the set is mixed (the first files new, the later
    ones old): put last the file that vouches for the others (a JSON recording the weights'
    SHA-256, say), so that a reader checking it finds the mix rather than trusting it. A
    replaced file keeps its permissions; a new one gets the usual ``0o666 & ~umask``.
    """
    paths = [Path(os.path.realpath(p)) for p in paths]  # through symlinks: replace the target, not the link
    # Named, not made, here: the writer creates them; their mode is set before the rename.
    temps = [p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in paths]
    try:
        _check_replaceable(paths)  # before the caller's work, not after it
        yield list(temps)
        for tmp, path in zip(temps, paths):
            with open(tmp, "rb") as f:  # on disk before the rename makes it visible
                os.fsync(f.fileno())
            # safetensors creates its files 0600: a shipped asset or a checkpoint stays readable
            os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        _check_replaceable(paths)  # all of them, before the first rename: no half-replaced set
        for tmp, path in zip(temps, paths):
            try:
                os.replace(tmp, path)
            except OSError as exc:  # (an immutable file, a folder changed under the run)
                raise OutputDirError(f"cannot write {str(path)!r}: {exc}") from exc
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _check_replaceable(paths: List[Path]) -> None:
    """Raise :class:`OutputDirError` naming the first of ``paths`` that a file cannot be renamed
    onto: an existing folder, or a path whose folder is missing or not writable."""
    for path in paths:
        if path.is_dir():
            raise OutputDirError(f"cannot write {str(path)!r}: it is an existing folder")
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
            raise OutputDirError(f"cannot write {str(path)!r}: its folder is missing or not writable")


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask can only
    read it by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- seeding, progress


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's ``random``, numpy's global RNG and torch's (CPU and CUDA) global RNGs.

    Returns a fresh CPU ``torch.Generator`` seeded with ``seed``: draw data order and noise
    from it (and save it in checkpoints) rather than from the global RNG that library code
    may also consume.
    """
    seed = check_count("seed", seed, 0)
    if seed > MAX_SEED:  # (torch wraps larger ones, and a negative one, onto 64-bit seeds)
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed}")
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy accepts 32-bit seeds only
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``timeout``, docker, Kubernetes and SLURM send) inside
    :func:`sigterm_raises`: raised like Ctrl-C's KeyboardInterrupt, so that the same clean-up
    runs (:func:`atomic_files` removes its temporary files)."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`Terminated` (in the main thread, the only one
    where Python can set a signal handler; elsewhere the block changes nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def interruption_status(prog: str, exc: KeyboardInterrupt) -> int:
    """Print ``<prog>: interrupted`` (Ctrl-C) or ``<prog>: terminated`` (SIGTERM) and return the
    shell's status for it, 130 or 143 (128 + the signal): the user's choice, not a crash."""
    terminated = isinstance(exc, Terminated)
    newline = "\n" if sys.stderr.isatty() else ""  # past a progress bar (and the terminal's ^C)
    print(f"{newline}{prog}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    return 143 if terminated else 130


@contextmanager
def interrupt_exits(prog: str) -> Iterator[None]:
    """Inside the block, Ctrl-C and SIGTERM end the program with one line and the shell's status
    (:func:`interruption_status`), not a traceback. What the commands write is written whole or
    not at all (:func:`atomic_files`)."""
    try:
        with sigterm_raises():
            yield
    except KeyboardInterrupt as exc:
        raise SystemExit(interruption_status(prog, exc)) from None


@contextmanager
def one_line_warnings(prog: str, category: type) -> Iterator[None]:
    """Inside the block, warnings of ``category`` print as one line, ``<prog>: warning: <message>``
    on stderr, like the commands' errors, each time they are raised; other warnings print as usual."""
    def show(message, cat, *rest, **kwargs):
        if issubclass(cat, category):
            print(f"{prog}: warning: {message}", file=sys.stderr)
        else:
            default_show(message, cat, *rest, **kwargs)

    with warnings.catch_warnings():
        default_show = warnings.showwarning
        warnings.showwarning = show
        warnings.simplefilter("always", category)
        yield


def progress_bar(iterable=None, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar, shown only when ``enabled`` and its output (stderr by default) is a terminal,
    so that logs and CI output get no carriage-return noise. ``kwargs`` go to tqdm."""
    stream = kwargs.get("file") or sys.stderr
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    return tqdm(iterable, disable=not (enabled and is_tty), **kwargs)


# --------------------------------------------------------------------------- metrics log


_NON_FINITE = "non_finite"  # the key of a record that lists its NaN / infinite values


def _non_finite_as_text(value: Any) -> Any:
    """``value`` with its NaN / infinite floats as the strings "NaN", "Infinity", "-Infinity"
    (Python's JSON spelling); None when it holds none."""
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, Mapping):
        found = {k: _non_finite_as_text(v) for k, v in value.items()}
        return {k: v for k, v in found.items() if v is not None} or None
    if isinstance(value, (list, tuple)):
        found = [_non_finite_as_text(v) for v in value]
        return found if any(v is not None for v in found) else None
    return None


def _null_non_finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _null_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_null_non_finite(v) for v in value]
    return value


def _restore_non_finite(value: Any, text: Any) -> Any:
    if isinstance(text, str):
        return float(json.loads(text))
    if isinstance(text, dict) and isinstance(value, dict):
        return {k: _restore_non_finite(v, text[k]) if k in text else v for k, v in value.items()}
    if isinstance(text, list) and isinstance(value, list):
        return [v if t is None else _restore_non_finite(v, t) for v, t in zip(value, text)]
    return value


def _encode_record(record: Mapping[str, Any]) -> str:
    """One strict-JSON line: NaN / infinite floats are written as null, and the record's
    ``non_finite`` entry keeps them as text (``{"loss": null, "non_finite": {"loss": "NaN"}}``)."""
    record = dict(record)
    flagged = {k: t for k, v in record.items() if (t := _non_finite_as_text(v)) is not None}
    if flagged:
        record = {**{k: _null_non_finite(v) for k, v in record.items()}, _NON_FINITE: flagged}
    return json.dumps(record, allow_nan=False)


def _decode_record(record: Dict[str, Any]) -> Dict[str, Any]:
    flagged = record.pop(_NON_FINITE, None)
    if isinstance(flagged, dict):
        for key, text in flagged.items():
            if key in record:
                record[key] = _restore_non_finite(record[key], text)
    return record


class MetricsLog:
    """A JSON-lines log, one ``{"step": ..., **values}`` object per line, written to the file
    as it is logged (no buffer: a write that fails, on a full disk, raises
    :class:`OutputDirError` and leaves nothing for :meth:`close` to write again).

    ``resume_step=None`` starts a new log (an old file is replaced). ``resume_step=k`` keeps the
    records of steps <= k and drops the rest: they were written after checkpoint ``k`` by a
    run that then stopped, and the resumed run writes them again. Lines torn by a crash are
    dropped too.

    Every line is strict JSON: a NaN or infinite value (a diverged run) is written as null,
    and the record's ``"non_finite"`` entry keeps it as text, e.g.
    ``{"step": 7, "loss": null, "non_finite": {"loss": "NaN"}}``; :meth:`records` gives the
    float back.
    """

    def __init__(self, path: PathLike, resume_step: Optional[int] = None):
        self.path = Path(path)
        kept = [] if resume_step is None else [r for r in self.records() if r["step"] <= resume_step]
        with atomic_files(self.path) as (tmp,):
            tmp.write_text("".join(_encode_record(r) + "\n" for r in kept))
        try:
            self._fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise OutputDirError(f"cannot write the metrics log {str(self.path)!r}: {exc}") from exc

    def log(self, step: int, **values: Any) -> None:
        """Append one record; values must be JSON-serialisable (floats round-trip exactly, NaN
        and infinities included)."""
        if _NON_FINITE in values:
            raise ValueError(f"{_NON_FINITE!r} is reserved: it lists a record's NaN / infinite values")
        data = (_encode_record({"step": int(step), **values}) + "\n").encode()
        try:
            while data:  # (os.write may write part of it)
                data = data[os.write(self._fd, data):]
        except OSError as exc:  # a torn last line is dropped when the log is read
            raise OutputDirError(f"cannot write the metrics log {str(self.path)!r}: {exc}") from exc

    def records(self) -> List[Dict[str, Any]]:
        """Every complete record in the file, in order (NaN / infinite values restored)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(_decode_record(record))
        return out

    def close(self) -> None:
        """Close the file (records already written are on disk)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # (an unclosed log: its descriptor is not left open)
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- state packing


class GlobalRNG:
    """The global RNG states as a checkpointable object (``state_dict`` / ``load_state_dict``).

    ``torch``: torch's CPU RNG (dropout, ``torch.rand`` without a generator); ``cuda``: every
    CUDA device's RNG (default: saved when CUDA is initialised, and restored whenever the saved
    state holds it, initialising CUDA if needed; ``cuda=False`` neither saves nor restores
    it); ``python`` / ``numpy``: the ``random`` module's and numpy's global RNGs.
    """

    def __init__(self, torch: bool = True, cuda: Optional[bool] = None, python: bool = True, numpy: bool = True):
        self.torch, self.cuda, self.python, self.numpy = torch, cuda, python, numpy

    def _use_cuda(self) -> bool:
        return torch.cuda.is_initialized() if self.cuda is None else bool(self.cuda)

    def state_dict(self) -> Dict[str, Any]:
        """The current states of the chosen RNGs."""
        state: Dict[str, Any] = {}
        if self.torch:
            state["torch"] = torch.get_rng_state()
        if self._use_cuda():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if self.python:
            state["python"] = random.getstate()
        if self.numpy:
            state["numpy"] = np.random.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Set the chosen RNGs to the states of :meth:`state_dict`.

        A saved CUDA state is restored whenever it is there (unless ``cuda=False``), CUDA
        being initialised for it if it is not yet: it is not dropped because this process
        has not used CUDA so far. Raises RuntimeError when no GPU can take it (none is
        available, or fewer devices than were saved). With the default ``cuda=None`` a state
        saved without one (a CPU run resumed on a GPU) leaves the CUDA RNG as it is;
        ``cuda=True`` requires it.
        """
        restore_cuda = ("cuda" in state) if self.cuda is None else bool(self.cuda)
        wanted = [k for k, on in (("torch", self.torch), ("cuda", restore_cuda), ("python", self.python),
                                  ("numpy", self.numpy)) if on]
        missing = [k for k in wanted if k not in state]
        if missing:
            raise KeyError(f"no saved RNG state for {missing}")
        saved = list(state["cuda"]) if restore_cuda else []
        restore_cuda = bool(saved)  # a state saved where no GPU was holds no device to restore
        if restore_cuda:
            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if len(saved) > available:
                raise RuntimeError(f"the saved state holds the CUDA RNG of {len(saved)} device(s), but "
                                   f"{available} CUDA device(s) are available here; resume where the run's GPUs "
                                   "are, or skip the CUDA RNG with GlobalRNG(cuda=False) (the resumed run is "
                                   "then not bit for bit)")
            torch.cuda.init()
        if self.torch:
            torch.set_rng_state(state["torch"])
        if restore_cuda:
            torch.cuda.set_rng_state_all(saved)
        if self.python:
            random.setstate(state["python"])
        if self.numpy:
            np.random.set_state(state["numpy"])


def _pack(obj: Any, name: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON, its tensors moved to ``tensors`` (CPU copies) and referenced by name."""
    if isinstance(obj, torch.Tensor):
        # (a copy: safetensors rejects shared memory)
        return {"tensor": _add_tensor(name, obj.detach().to("cpu", copy=True).contiguous(), tensors)}
    if isinstance(obj, np.ndarray):
        # As .npy bytes: shape (empty ones included), dtype and every value come back exactly,
        # which a JSON list does not give ((0, 3) reads back as (0,), long doubles lose digits).
        # Stored as a uint8 tensor: safetensors caps its header at 100 MB.
        buf = io.BytesIO()
        try:
            np.save(buf, obj, allow_pickle=False)
        except ValueError as exc:  # object arrays would need pickle
            raise TypeError(f"cannot checkpoint {name!r}: {exc}") from exc
        return {"npy_tensor": _add_tensor(name, torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8),
                                          tensors)}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, Mapping):  # keys keep their type (optimizer state is keyed by int)
        return {"dict": [[_pack_key(k, name), _pack(v, f"{name}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_pack(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]
        return {"tuple" if isinstance(obj, tuple) else "list": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {name!r}: {_type_name(obj)} is not a tensor, array, "
                    "container or JSON scalar")


def _add_tensor(name: str, tensor: torch.Tensor, tensors: Dict[str, torch.Tensor]) -> str:
    """``tensor`` stored in ``tensors`` under ``name`` (made unique); returns the name."""
    while name in tensors:  # a key holding "/" could collide with a nested path
        name += "'"
    tensors[name] = tensor
    return name


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _pack_key(key: Any, name: str) -> Any:
    """A dict key as JSON: scalars as they are, tuples (of keys) as ``{"tuple": [...]}``, which
    no scalar key can be mistaken for. Anything else is refused now: a key JSON turns into
    something else would give a checkpoint that cannot be loaded."""
    if isinstance(key, (np.integer, np.floating, np.bool_)):
        key = key.item()
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    if isinstance(key, tuple):
        return {"tuple": [_pack_key(k, name) for k in key]}
    raise TypeError(f"cannot checkpoint {name!r}: its key {key!r} is a {_type_name(key)}, not a JSON scalar "
                    "(None, bool, int, float, str) or a tuple of them")


def _unpack_key(key: Any) -> Any:
    return tuple(_unpack_key(k) for k in key["tuple"]) if isinstance(key, dict) else key


def _unpack(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if not isinstance(obj, dict):
        return obj
    if "tensor" in obj:
        return tensors[obj["tensor"]]
    if "npy_tensor" in obj:
        return np.load(io.BytesIO(tensors[obj["npy_tensor"]].numpy().tobytes()), allow_pickle=False)
    if "npy" in obj:  # (format version 1: base64 in the header)
        return np.load(io.BytesIO(base64.b64decode(obj["npy"], validate=True)), allow_pickle=False)
    if "ndarray" in obj:  # written by earlier kdfast versions
        return np.asarray(obj["ndarray"], dtype=obj["dtype"])
    if "dict" in obj:
        return {_unpack_key(k): _unpack(v, tensors) for k, v in obj["dict"]}
    if "tuple" in obj:
        return tuple(_unpack(v, tensors) for v in obj["tuple"])
    return [_unpack(v, tensors) for v in obj["list"]]


def _checksum(tensors: Mapping[str, torch.Tensor], header: Optional[Mapping[str, Any]] = None) -> int:
    """CRC-32 of every tensor's bytes and of the header (its JSON without the CRC; None: the
    tensors alone, format version 1): safetensors itself does not notice a flipped bit, and the
    header holds optimiser settings, RNG states and step counts."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(tensors[name].reshape(-1).view(torch.uint8).numpy(), crc)
    if header is not None:
        fields = {k: v for k, v in header.items() if k != "crc32"}
        crc = zlib.crc32(json.dumps(fields, sort_keys=True).encode(), crc)
    return crc


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


# --------------------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated, or does not fit the objects it is loaded into."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: where it came from, its step, metadata, and the saved entries that
    were not restored into an object (tensors and plain values), by key."""

    path: Path
    step: int
    metadata: Dict[str, Any]
    values: Dict[str, Any] = field(default_factory=dict)


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):  # (PermissionError: alive, another user's; an id out of range: unknown)
        return True
    return True


class Checkpointer:
    """Saves and restores training state as ``<directory>/step-XXXXXXXX.safetensors``.

    ``state`` maps a name to what to save: an object with ``state_dict`` / ``load_state_dict``
    (modules, optimizers, LR schedulers, :class:`GlobalRNG`, an EMA), a ``torch.Generator``,
    or a plain value (tensor, numpy array, number, string, or list / tuple / dict of them; dict keys
    must be None, bool, int, float, str or tuples of them). Loading
    restores objects in place and returns plain values in :attr:`Checkpoint.values`.

    Writes are atomic (a temporary file, then ``os.replace``): a run killed while saving
    leaves the previous checkpoints intact. Only the last ``keep`` checkpoints are kept
    (``None``: all).
    """

    def __init__(self, directory: PathLike, keep: Optional[int] = 3):
        if keep is not None and not is_integer_at_least(keep, 1):
            raise ValueError(f"keep must be an integer >= 1 or None, got {keep!r}")
        self.directory = prepare_output_dir(directory)
        self.keep = None if keep is None else int(keep)
        self._remove_orphaned_temps()

    def _remove_orphaned_temps(self) -> None:
        """Remove the temporary files of saves killed mid-write (a SIGKILL skips atomic_files'
        clean-up; each is as large as a checkpoint): those whose process is gone here and that
        have not changed for :data:`ORPHAN_AGE` seconds. (A process id means nothing on another
        machine or container sharing the folder, where a save may be under way.)"""
        now = time.time()
        for path in self.directory.iterdir():
            m = _TEMP_NAME.match(path.name)
            try:
                stale = m is not None and path.is_file() and now - path.stat().st_mtime > ORPHAN_AGE
            except OSError:  # (gone meanwhile: its save finished)
                continue
            if stale and not _process_alive(int(m.group(1))):
                path.unlink(missing_ok=True)

    def path_for(self, step: int) -> Path:
        """The file of step ``step``'s checkpoint (an integer >= 0, else ValueError)."""
        return self.directory / f"step-{check_count('step', step, 0):08d}.safetensors"

    def checkpoints(self) -> List[Path]:
        """The saved checkpoints (regular files only), oldest step first."""
        # A folder of that name (an unpacked copy, say) is not a checkpoint: latest() must skip it.
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[Path]:
        """The checkpoint of the highest step, or None when there is none."""
        saved = self.checkpoints()
        return saved[-1] if saved else None

    def save(self, step: int, state: Mapping[str, Any], metadata: Optional[Mapping[str, Any]] = None) -> Path:
        """Save ``state`` (see the class) as the checkpoint of ``step``; returns its path.

        Checkpoints of later steps are deleted: they belong to a run that was resumed from an
        earlier checkpoint, and ``latest()`` must not return them.
        """
        # Checked before anything is written or deleted: a negative step would be saved under a
        # name checkpoints() does not list, and every real checkpoint deleted as "later".
        step = check_count("step", step, 0)
        tensors: Dict[str, torch.Tensor] = {}
        layout: Dict[str, Dict[str, Any]] = {}
        for key, obj in state.items():
            if isinstance(obj, torch.Generator):
                layout[key] = {"kind": "generator", "data": _pack(obj.get_state(), key, tensors)}
            elif _is_stateful(obj):
                layout[key] = {"kind": "stateful", "data": _pack(obj.state_dict(), key, tensors)}
            else:
                layout[key] = {"kind": "value", "data": _pack(obj, key, tensors)}
        header = {"format": FORMAT, "version": FORMAT_VERSION, "step": step,
                  "metadata": json.loads(json.dumps(dict(metadata or {}))), "state": layout}
        header["crc32"] = _checksum(tensors, header)
        path = self.path_for(step)
        with atomic_files(path) as (tmp,):
            try:
                save_file(tensors, str(tmp), metadata={"kdfast": json.dumps(header)})
            except (OSError, SafetensorError) as exc:  # a full disk, say: safetensors raises its own error
                raise OutputDirError(f"cannot save checkpoint {str(path)!r}: {exc}") from exc
        saved = self.checkpoints()
        stale = [p for p in saved if _step_of(p) > step]
        kept = [p for p in saved if _step_of(p) <= step]
        for old in stale + (kept[:-self.keep] if self.keep else []):
            old.unlink(missing_ok=True)
        return path

    def load(self, state: Optional[Mapping[str, Any]] = None, path: Optional[PathLike] = None,
             expect: Optional[Mapping[str, Any]] = None, same_bits: Optional[Mapping[str, Any]] = None
             ) -> Checkpoint:
        """Restore the objects of ``state`` from a checkpoint (default: the latest).

        ``expect``: metadata entries the checkpoint must hold with these values (the settings
        that define a run: resuming with other ones would not continue the same run).
        Raises :class:`CheckpointError` naming the file and the reason. ``same_bits``:
        metadata entries that, when they differ (e.g. :func:`run_environment`), let the run
        continue but not bit for bit: a :class:`ReproducibilityWarning` names them.
        """
        if path is None:
            path = self.latest()
            if path is None:
                raise CheckpointError(f"no checkpoint in {str(self.directory)!r}")
        return load_checkpoint(path, state, expect, same_bits)


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


class ReproducibilityWarning(UserWarning):
    """A resumed run continues, but no longer bit for bit like one that never stopped (another
    torch thread count or device type changes the floating point order)."""


def run_environment(device: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """What, besides a run's settings, decides its bits: torch's CPU thread count now and the
    device type it trains on. Save it in checkpoint metadata and pass it as ``same_bits``
    to :meth:`Checkpointer.load`."""
    return {"torch_threads": torch.get_num_threads(), "device_type": torch.device(device).type}


_MISSING = object()


def _setting_diffs(saved: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> List[str]:
    """``"run.steps: 7 (checkpoint) vs 9 (now)"`` for each leaf setting of ``wanted`` that differs
    from ``saved``: nested settings are compared key by key, so a message names what changed
    rather than printing both whole dicts."""
    diffs = []
    for key in list(wanted) + [k for k in saved if k not in wanted and prefix]:
        old, new = saved.get(key, _MISSING), wanted.get(key, _MISSING)
        name = f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            diffs += _setting_diffs(old, new, name + ".")
        elif old != new:
            shown = ["absent" if v is _MISSING else repr(v) for v in (old, new)]
            diffs.append(f"{name}: {shown[0]} (checkpoint) vs {shown[1]} (now)")
    return diffs


def load_checkpoint(path: PathLike, state: Optional[Mapping[str, Any]] = None,
                    expect: Optional[Mapping[str, Any]] = None,
                    same_bits: Optional[Mapping[str, Any]] = None) -> Checkpoint:
    """Read a checkpoint written by :meth:`Checkpointer.save`; see :meth:`Checkpointer.load`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["kdfast"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError("it is not a kdfast checkpoint")
        version = header.get("version")
        if version in (1, FORMAT_VERSION):
            if header.get("crc32") != _checksum(tensors, header if version >= 2 else None):
                raise ValueError("its data does not match its CRC-32")
            if not (isinstance(header.get("state"), dict) and isinstance(header.get("metadata"), dict)
                    and is_integer_at_least(header.get("step"), 0)):
                raise ValueError("its header lacks the state, metadata or step")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt, truncated or not a kdfast checkpoint: "
                              f"{type(exc).__name__}: {exc}") from exc
    if version not in (1, FORMAT_VERSION):
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {version!r}; "
                              f"this kdfast reads versions 1 to {FORMAT_VERSION}")
    metadata = header["metadata"]
    if expect:
        wanted = json.loads(json.dumps(dict(expect)))  # compare as JSON: tuples were saved as lists
        diff = _setting_diffs(metadata, wanted)
        if diff:
            raise CheckpointError(f"checkpoint {str(path)!r} was written by a different run: " + ", ".join(diff))
    if same_bits:
        wanted = json.loads(json.dumps(dict(same_bits)))
        diff = [f"{k}={metadata[k]!r} (now {v!r})" if k in metadata else f"{k} not recorded (now {v!r})"
                for k, v in wanted.items() if metadata.get(k) != v or k not in metadata]
        if diff:
            warnings.warn(f"checkpoint {str(path)!r} was written with {', '.join(diff)}: the run continues, but "
                          "not bit for bit like a run that never stopped", ReproducibilityWarning, stacklevel=3)
    try:
        entries = {k: (e["kind"], _unpack(e["data"], tensors)) for k, e in header["state"].items()}
    except (KeyError, TypeError, ValueError, EOFError) as exc:  # EOFError: a truncated numpy array
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: bad state layout ({exc})") from exc
    values = {k: v for k, (kind, v) in entries.items() if kind == "value"}
    for key, obj in (state or {}).items():
        if not (isinstance(obj, torch.Generator) or _is_stateful(obj)):
            continue
        if key not in entries:
            raise CheckpointError(f"checkpoint {str(path)!r} holds no {key!r} (it has {', '.join(entries)})")
        kind, saved = entries[key]
        try:
            if isinstance(obj, torch.Generator):
                obj.set_state(saved)
            else:
                obj.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r}: {key!r} does not fit the saved {kind} state: "
                                  f"{exc}") from exc
    return Checkpoint(path=path, step=int(header["step"]), metadata=metadata, values=values)
