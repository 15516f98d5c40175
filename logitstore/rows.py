"""The one row type: a store's rows as NumPy arrays, read by readers and handed to writers.

Every field but `failures` holds one entry per row along its first axis (a dict holds such arrays),
so `take` and `concat` work field by field. The trainer's batch type uses the same two helpers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def take_field(value: Any, index: np.ndarray | slice) -> Any:
    """Rows `index` of one field: an array, a dict of arrays, or None."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: v[index] for k, v in value.items()}
    return value[index]


def concat_field(values: Sequence[Any]) -> Any:
    """One field of several row sets, concatenated (None stays None)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if isinstance(present[0], dict):
        return {k: np.concatenate([v[k] for v in present]) for k in present[0]}
    return np.concatenate(present)


def take_rows(rows: T, index: np.ndarray | slice, whole: Sequence[str] = ()) -> T:
    """The same dataclass with rows `index` of every per-row field; `whole` fields are emptied."""
    return dataclasses.replace(rows, **{f.name: ([] if f.name in whole else take_field(getattr(rows, f.name), index))
                                        for f in dataclasses.fields(rows)})


def concat_rows(parts: Sequence[T], whole: Sequence[str] = ()) -> T:
    """Several instances of one row dataclass as one; `whole` fields (lists) are joined."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return dataclasses.replace(first, **{
        f.name: ([x for p in parts for x in getattr(p, f.name)] if f.name in whole
                 else concat_field([getattr(p, f.name) for p in parts]))
        for f in dataclasses.fields(first)})


@dataclass
class Rows:
    """Rows of a store, in row order.

    `source` (listing positions) and `failures` ((position, id, reason) of images that could not be
    read on the way) are the writer's: a dump hands them over, a reader leaves them empty.
    """

    ids: np.ndarray                   # [n] str (object)
    logits: np.ndarray | None         # [n, V, C]; None in a sparse store (see targets)
    digests: np.ndarray               # [n, 32] uint8
    image_hw: np.ndarray              # [n, 2] int32
    view_params: np.ndarray           # [n, V, 5] int32
    pixels: np.ndarray | None = None  # [n, V, ch, H, W] uint8, when the store embeds them
    targets: dict[str, np.ndarray] | None = None  # sparse stores: their target arrays
    source: np.ndarray | None = None  # [n] int64 listing positions, for a writer
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    view_extras: dict[str, np.ndarray] | None = None  # 1.5 augmented views: schema.view_extra_arrays by name

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray | slice) -> "Rows":
        return take_rows(self, index, whole=("failures",))

    def slice(self, a: int, b: int) -> "Rows":
        return self.take(slice(a, b))

    @staticmethod
    def concat(parts: Sequence["Rows"]) -> "Rows":
        return concat_rows(parts, whole=("failures",))

    def target_arrays(self) -> dict[str, np.ndarray]:
        """The teacher's side of each row, by array name: the sparse arrays, or `logits`."""
        from .schema import LOGITS

        return self.targets if self.targets is not None else {LOGITS: self.logits}
