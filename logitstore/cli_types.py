"""Flag types shared by both command lines: numbers that must be finite and in range, storage options."""
from __future__ import annotations

import math
from typing import Any, Callable

import click


class Number(click.ParamType):
    """An int or a float that is finite and inside [lo, hi] (either end open when asked).

    click's FloatRange lets NaN through (every comparison with NaN is false) and accepts inf; a
    NaN temperature or learning rate then trains a NaN student that exits 0.
    """

    def __init__(self, kind: type = float, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.name = "integer" if kind is int else "number"

    def _range(self) -> str:
        show = (lambda x: str(int(x))) if self.kind is int else (lambda x: f"{x:g}")
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {show(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {show(self.hi)}")
        return " and ".join(parts)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.kind) and not isinstance(value, bool):
            x = value
        else:
            try:
                x = self.kind(str(value).strip()) if self.kind is int else float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not {'an integer' if self.kind is int else 'a number'}", param, ctx)
        if self.kind is float and not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        bad_lo = self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo)
        bad_hi = self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi)
        if bad_lo or bad_hi:
            self.fail(f"{value!r} is out of range: it must be {self._range()}", param, ctx)
        return x


def count(lo: int = 1, hi: int | None = None) -> Number:
    """A whole number in [lo, hi]."""
    return Number(int, lo, hi)


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Number:
    """A finite float in the given range."""
    return Number(float, lo, hi, lo_open, hi_open)


def storage_option_flag(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--storage-option KEY=VALUE (repeatable), the same on every command that opens a store."""
    return click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
                        help="fsspec option for URL stores (e.g. endpoint_url=http://127.0.0.1:9000); "
                             "repeatable.")(fn)
