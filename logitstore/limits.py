"""Numeric limits, checked alike by the libraries (their config objects) and the command lines (flag types).

NaN passes every comparison-based range check (each comparison with NaN is false), and inf passes
most; a NaN temperature or learning rate then trains a NaN student that exits 0. So finiteness is
part of every limit.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limit:
    """The values a numeric setting may take: of its kind, finite, inside [lo, hi] (an end open when asked)."""

    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def allows(self, x: Any) -> bool:
        if isinstance(x, bool) or not isinstance(x, numbers.Integral if self.kind is int else numbers.Real):
            return False
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def describe(self) -> str:
        def show(x: float) -> str:
            return str(int(x)) if self.kind is int else f"{x:g}"

        bounds = ([f"{'>' if self.lo_open else '>='} {show(self.lo)}"] if self.lo is not None else []) + \
                 ([f"{'<' if self.hi_open else '<='} {show(self.hi)}"] if self.hi is not None else [])
        return ("a whole number" if self.kind is int else "a finite number") + \
            (" " + " and ".join(bounds) if bounds else "")


def count(lo: int = 1, hi: int | None = None) -> Limit:
    """A whole number in [lo, hi]."""
    return Limit(int, lo, hi)


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Limit:
    """A finite number in the given range."""
    return Limit(float, lo, hi, lo_open, hi_open)
