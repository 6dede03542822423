"""Argument checks shared across kdfast (ops, losses, training and evaluation)."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import numpy as np
import torch

_INT64 = (-(1 << 63), (1 << 63) - 1)


def is_integer_at_least(value, minimum: int) -> bool:
    """Whether ``value`` is an integer (Python or numpy, not a bool) >= ``minimum``: ``int()``
    would turn 1.5 into 1 and "2" into 2, which a count must not silently accept."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


def is_finite_number(value, name: str = "the value", symbolic: bool = False) -> bool:
    """``math.isfinite(value)``, for a float that may be a ``torch.SymFloat``: under
    ``torch.compile`` a number that changes between calls (an annealed temperature, a default
    derived from a dynamic shape) becomes symbolic, where ``math.isfinite`` breaks the graph and
    a comparison is folded away (torch takes symbolic floats to be finite). Under compilation the
    value is checked when the compiled code runs instead (a RuntimeError naming ``name``) and
    passes here.

    ``symbolic``: the value may stay symbolic (one graph for every value): it meets torch's ops
    alone, or reaches a kernel in a tensor (:func:`kdfast.ops._tensors.number_tensor`).
    Otherwise it goes to a kernel as a custom op's float argument, a constant (one graph per
    value), and the check makes it one first. Left symbolic, made a tensor here and a constant
    only when the op was lowered, it met a torch bug: inductor's graph cache served the graph
    compiled for an earlier value (the loss of a stale temperature from its third value on)."""
    if torch.compiler.is_compiling():
        # torch.tensor(value) makes dynamo specialise the value (torch.scalar_tensor does not: it
        # makes a tensor of it, as the product does)
        held = (torch.ones((), dtype=torch.float64) * value if symbolic
                else torch.tensor(value, dtype=torch.float64))
        torch._assert_async(held.isfinite(), f"{name} must be finite")
        return True
    return math.isfinite(value)


def as_float(value) -> float:
    """``float(value)``, with an integer beyond float's range as +-inf (``float(10**400)`` raises
    OverflowError, which no caller's error names the argument of): the callers' finiteness or
    range checks then refuse it by name."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def not_a_number(value) -> bool:
    """Whether ``value`` is None, a string, a boolean or a complex number (Python's, numpy's, or
    such a tensor or array), which ``float()`` would take as a real number (``float("2")``,
    ``float(True)``; numpy's complex scalars give their real part, with a warning)."""
    if value is None or isinstance(value, (bool, np.bool_, str, bytes, complex, np.complexfloating)):
        return True
    # (isinstance tests only: a symbolic float under torch.compile cannot be asked for a dtype)
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool or value.is_complex()
    return isinstance(value, np.ndarray) and (value.dtype == np.bool_ or np.iscomplexobj(value))


def real_number(name: str, value) -> float:
    """``float(value)``, or a ValueError naming ``name`` when ``value`` is not a real number
    (:func:`not_a_number`, or no ``float()``). Range checks are the caller's."""
    if not_a_number(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, torch.Tensor) and value.requires_grad:  # (a learned scale or temperature)
        raise ValueError(f"{name} is taken as a number, which would drop the gradient of the tensor given; "
                         "pass a float (or a detached tensor), or apply a learned value outside this call")
    try:
        return as_float(value)
    except (TypeError, ValueError, RuntimeError):  # (RuntimeError: a tensor of several elements)
        raise ValueError(f"{name} must be a real number, got {value!r}") from None


def check_count(name: str, value, minimum: int) -> int:
    """``value`` as an int, or a ValueError naming ``name`` when it is not an integer (Python or
    numpy, not a bool or a float) >= ``minimum``: the settings of schedulers and training runs."""
    if not is_integer_at_least(value, minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_flag(name: str, value) -> bool:
    """``value`` as a bool, or a ValueError naming ``name`` when it is not True or False
    (``bool("False")`` is True: a switch takes no other truth value)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_int(name: str, value, minimum: Optional[int] = None) -> int:
    """``value`` as an int, for an integer setting (every op's and loss's check): Python and numpy
    integers, and floats with no fractional part, pass; bools, strings and fractional floats
    are refused (``int()`` would read True as 1 and truncate 4.7 to 4). Labels are compared in
    int64, so the value must fit in it."""
    out = None
    if not (isinstance(value, bool) or isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        try:
            out = operator.index(value)  # int, numpy integer, integer 0-d tensor
        except TypeError:
            if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
                out = int(value)
    if out is None or isinstance(out, bool) or (minimum is not None and out < minimum):
        what = ("a positive integer" if minimum == 1 else "an integer" if minimum is None
                else f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if not _INT64[0] <= out <= _INT64[1]:
        raise ValueError(f"{name} must fit in int64, got {out}")
    return out


def check_float(name: str, value, low: float, high: float, high_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (or [low, high)); NaN and inf are refused, and
    so are bools, strings and complex numbers (``float("3")`` and ``float(True)`` would pass)."""
    try:
        number = math.nan if not_a_number(value) else as_float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or not (
            low <= number < high if high_open else low <= number <= high):
        where = (f" in [{low}, {high}{')' if high_open else ']'}" if math.isfinite(high)
                 else f" >= {low}" if math.isfinite(low) else "")
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")
    return number
