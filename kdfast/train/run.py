"""What every kdfast training loop needs around its step: output folders, seeding, progress
bars, a metrics log and checkpoints that resume a run exactly.

A loop that saves all of its state with :class:`Checkpointer` -- model, optimizer, EMA,
the generators its data and noise come from, the global RNG its dropout draws from, and
loose tensors such as a partly consumed epoch order -- continues after :meth:`Checkpointer.load`
exactly as if it had never stopped: N steps straight and N/2 + resume + N/2 give the same bits.

Checkpoint format: one safetensors file per step, ``step-00000100.safetensors``. Every tensor of
the saved state is a safetensors tensor; the structure around them (optimizer hyperparameters,
Python RNG tuples, step counts) is JSON in the file's metadata, with tensors referenced by
name, so that ``state_dict`` -> file -> ``load_state_dict`` returns equal objects, tuples
included.
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

PathLike = Union[str, Path]
FORMAT = "kdfast checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})\.safetensors$")


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
        probe.write_text("ok")
        probe.unlink()
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


# --------------------------------------------------------------------------- seeding, progress


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's ``random``, numpy's global RNG and torch's (CPU and CUDA) global RNGs.

    Returns a fresh CPU ``torch.Generator`` seeded with ``seed``: draw data order and noise
    from it (and save it in checkpoints) rather than from the global RNG that library code
    may also consume.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy accepts 32-bit seeds only
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress_bar(iterable=None, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar, shown only when ``enabled`` and its output (stderr by default) is a terminal,
    so that logs and CI output get no carriage-return noise. ``kwargs`` go to tqdm."""
    stream = kwargs.get("file") or sys.stderr
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    return tqdm(iterable, disable=not (enabled and is_tty), **kwargs)


# --------------------------------------------------------------------------- metrics log


class MetricsLog:
    """A JSON-lines log, one ``{"step": ..., **values}`` object per line, flushed as written.

    ``resume_step=None`` starts a new log (an old file is replaced). ``resume_step=k`` keeps the
    records of steps <= k and drops the rest: they were written after checkpoint ``k`` by a
    run that then stopped, and the resumed run writes them again. Lines torn by a crash are
    dropped too.
    """

    def __init__(self, path: PathLike, resume_step: Optional[int] = None):
        self.path = Path(path)
        kept = [] if resume_step is None else [r for r in self.records() if r["step"] <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def log(self, step: int, **values: Any) -> None:
        """Append one record; values must be JSON-serialisable (floats round-trip exactly)."""
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()

    def records(self) -> List[Dict[str, Any]]:
        """Every complete record in the file, in order."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
        return out

    def close(self) -> None:
        """Close the file (records already written are on disk)."""
        self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- state packing


class GlobalRNG:
    """The global RNG states as a checkpointable object (``state_dict`` / ``load_state_dict``).

    ``torch``: torch's CPU RNG (dropout, ``torch.rand`` without a generator); ``cuda``: every
    CUDA device's RNG (default: when CUDA is initialised); ``python`` / ``numpy``: the
    ``random`` module's and numpy's global RNGs.
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
        """Set the chosen RNGs to the states of :meth:`state_dict`."""
        wanted = [k for k, on in (("torch", self.torch), ("cuda", self._use_cuda()), ("python", self.python),
                                  ("numpy", self.numpy)) if on]
        missing = [k for k in wanted if k not in state]
        if missing:
            raise KeyError(f"no saved RNG state for {missing}")
        if self.torch:
            torch.set_rng_state(state["torch"])
        if self._use_cuda():
            torch.cuda.set_rng_state_all(state["cuda"])
        if self.python:
            random.setstate(state["python"])
        if self.numpy:
            np.random.set_state(state["numpy"])


def _pack(obj: Any, name: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON, its tensors moved to ``tensors`` (CPU copies) and referenced by name."""
    if isinstance(obj, torch.Tensor):
        while name in tensors:  # a key holding "/" could collide with a nested path
            name += "'"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors rejects shared memory
        return {"tensor": name}
    if isinstance(obj, np.ndarray):
        return {"ndarray": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Mapping):  # keys keep their type (optimizer state is keyed by int)
        return {"dict": [[k, _pack(v, f"{name}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_pack(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]
        return {"tuple" if isinstance(obj, tuple) else "list": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {name!r}: {type(obj).__name__} is not a tensor, array, "
                    "container or JSON scalar")


def _unpack(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if not isinstance(obj, dict):
        return obj
    if "tensor" in obj:
        return tensors[obj["tensor"]]
    if "ndarray" in obj:
        return np.asarray(obj["ndarray"], dtype=obj["dtype"])
    if "dict" in obj:
        return {k: _unpack(v, tensors) for k, v in obj["dict"]}
    if "tuple" in obj:
        return tuple(_unpack(v, tensors) for v in obj["tuple"])
    return [_unpack(v, tensors) for v in obj["list"]]


def _checksum(tensors: Mapping[str, torch.Tensor]) -> int:
    """CRC-32 of every tensor's bytes: safetensors itself does not notice a flipped bit."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(tensors[name].reshape(-1).view(torch.uint8).numpy(), crc)
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


class Checkpointer:
    """Saves and restores training state as ``<directory>/step-XXXXXXXX.safetensors``.

    ``state`` maps a name to what to save: an object with ``state_dict`` / ``load_state_dict``
    (modules, optimizers, LR schedulers, :class:`GlobalRNG`, an EMA), a ``torch.Generator``,
    or a plain value (tensor, number, string, or list / tuple / dict of them). Loading
    restores objects in place and returns plain values in :attr:`Checkpoint.values`.

    Writes are atomic (a temporary file, then ``os.replace``): a run killed while saving
    leaves the previous checkpoints intact. Only the last ``keep`` checkpoints are kept
    (``None``: all).
    """

    def __init__(self, directory: PathLike, keep: Optional[int] = 3):
        if keep is not None and (isinstance(keep, bool) or int(keep) < 1):
            raise ValueError(f"keep must be an integer >= 1 or None, got {keep!r}")
        self.directory = prepare_output_dir(directory)
        self.keep = None if keep is None else int(keep)

    def path_for(self, step: int) -> Path:
        """The file of step ``step``'s checkpoint."""
        return self.directory / f"step-{int(step):08d}.safetensors"

    def checkpoints(self) -> List[Path]:
        """The saved checkpoints, oldest step first."""
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
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
        step = int(step)
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
                  "metadata": json.loads(json.dumps(dict(metadata or {}))), "state": layout,
                  "crc32": _checksum(tensors)}
        path = self.path_for(step)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_file(tensors, str(tmp), metadata={"kdfast": json.dumps(header)})
            with open(tmp, "rb") as f:  # on disk before the rename makes it visible
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        saved = self.checkpoints()
        stale = [p for p in saved if _step_of(p) > step]
        kept = [p for p in saved if _step_of(p) <= step]
        for old in stale + (kept[:-self.keep] if self.keep else []):
            old.unlink(missing_ok=True)
        return path

    def load(self, state: Optional[Mapping[str, Any]] = None, path: Optional[PathLike] = None,
             expect: Optional[Mapping[str, Any]] = None) -> Checkpoint:
        """Restore the objects of ``state`` from a checkpoint (default: the latest).

        ``expect``: metadata entries the checkpoint must hold with these values (the settings
        that define a run: resuming with other ones would not continue the same run).
        Raises :class:`CheckpointError` naming the file and the reason.
        """
        if path is None:
            path = self.latest()
            if path is None:
                raise CheckpointError(f"no checkpoint in {str(self.directory)!r}")
        return load_checkpoint(path, state, expect)


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def load_checkpoint(path: PathLike, state: Optional[Mapping[str, Any]] = None,
                    expect: Optional[Mapping[str, Any]] = None) -> Checkpoint:
    """Read a checkpoint written by :meth:`Checkpointer.save`; see :meth:`Checkpointer.load`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["kdfast"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if header.get("format") != FORMAT or not isinstance(header.get("state"), dict):
            raise ValueError("it is not a kdfast checkpoint")
        if header.get("crc32") != _checksum(tensors):
            raise ValueError("the tensor data does not match its CRC-32")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt, truncated or not a kdfast checkpoint: "
                              f"{type(exc).__name__}: {exc}") from exc
    if header.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {header.get('version')!r}; "
                              f"this kdfast reads version {FORMAT_VERSION}")
    metadata = header["metadata"]
    if expect:
        wanted = json.loads(json.dumps(dict(expect)))  # compare as JSON: tuples were saved as lists
        diff = [f"{k}={metadata.get(k)!r} (this run: {v!r})" for k, v in wanted.items() if metadata.get(k) != v]
        if diff:
            raise CheckpointError(f"checkpoint {str(path)!r} was written by a different run: " + ", ".join(diff))
    try:
        entries = {k: (e["kind"], _unpack(e["data"], tensors)) for k, e in header["state"].items()}
    except (KeyError, TypeError, ValueError) as exc:
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
