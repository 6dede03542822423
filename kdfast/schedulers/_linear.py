"""Linear combinations of a step's sources, for writing solver update rules readably.

A scheduler writes its update as diffusers or the paper does, e.g. for DPM-Solver++(2M)::

    D1 = (1 / r0) * (X0 - H0)
    x_t = (sigma_t / sigma_s0) * X - alpha_t * expm1(-h) * X0 - 0.5 * alpha_t * expm1(-h) * D1

with ``X``, ``X0``, ``H0`` ... the kernel's sources, and gets the coefficients the fused
kernel needs. All arithmetic is in Python floats (float64).
"""
from __future__ import annotations

from typing import Dict

from ..ops.solver_step import SOURCES


class Lin:
    __slots__ = ("terms",)

    def __init__(self, terms: Dict[str, float] = None):
        self.terms = dict(terms or {})

    def __add__(self, other: "Lin") -> "Lin":
        out = dict(self.terms)
        for k, v in other.terms.items():
            out[k] = out.get(k, 0.0) + v
        return Lin(out)

    def __neg__(self) -> "Lin":
        return Lin({k: -v for k, v in self.terms.items()})

    def __sub__(self, other: "Lin") -> "Lin":
        return self + (-other)

    def __mul__(self, c: float) -> "Lin":
        c = float(c)
        return Lin({k: v * c for k, v in self.terms.items()})

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> "Lin":
        return self * (1.0 / float(c))

    def __repr__(self) -> str:
        return " + ".join(f"{v:.6g}*{k}" for k, v in self.terms.items()) or "0"


ZERO = Lin()
X, MODEL, UNCOND, X0, H0, H1, H2, AUX, NOISE = (Lin({name: 1.0}) for name in SOURCES)
HISTORY = (H0, H1, H2)
