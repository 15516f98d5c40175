"""The order of an epoch, from (seed, epoch) alone: which blocks each rank reads, in what order, how the rows
of a shuffle group are mixed, and which stored view each row replays.

Nothing here reads a store or depends on the number of DataLoader workers, so every run with the same
seed sees the same samples in the same order, and a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

# Distinct SeedSequence tags so the chunk order, the in-group shuffle and the view choice never
# draw from the same stream even when their other words coincide.
_TAG_ORDER, _TAG_GROUP, _TAG_VIEW = 0x0D, 0x5B, 0x71


class Segment(NamedTuple):
    """Rows [start, stop) of one store, inside one block (so a read is whole chunks, consecutive)."""

    store: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def epoch_share(blocks: Sequence[Segment], seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[Segment]:
    """This rank's segments for an epoch: the blocks in a (seed, epoch) permutation, cut into `world`
    contiguous, equal shares of rows (the last total % world rows of the permutation sit out)."""
    order = np.random.default_rng([seed, epoch, _TAG_ORDER]).permutation(len(blocks))
    total = sum(b.rows for b in blocks)
    per_rank = total // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    share, pos = [], 0
    for i in order:
        b = blocks[i]
        a, z = max(lo, pos), min(hi, pos + b.rows)
        if a < z:
            share.append(Segment(b.store, b.start + a - pos, b.start + z - pos))
        pos += b.rows
        if pos >= hi:
            break
    return share


def group_order(rows: int, seed: int, epoch: int, rank: int, group: int) -> np.ndarray:
    """The order of the rows of one shuffle group: the blocks of this rank's share from its `group`-th on."""
    return np.random.default_rng([seed, epoch, rank, group, _TAG_GROUP]).permutation(rows)


def epoch_views(seg: Segment, block: Segment, k: int, views: int, seed: int, epoch: int) -> np.ndarray:
    """Which stored view each row of `seg` contributes this epoch (`seg` lies in `block`, the k-th block of
    its store): a per-image offset drawn from the seed, then one step per epoch, so every view is used once
    in `views` epochs, whatever the shares or workers."""
    if views == 1:
        return np.zeros(seg.rows, np.int64)
    offset = np.random.default_rng([seed, block.store, k, _TAG_VIEW]).integers(views, size=block.rows)
    return (offset[seg.start - block.start:seg.stop - block.start] + epoch) % views


def batches_per_epoch(rows: int, batch_size: int) -> int:
    """Full batches plus the last partial one, unless that would be a single row (BatchNorm refuses it)."""
    return rows // batch_size + (1 if rows % batch_size > 1 else 0)


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """At most k of `items`, evenly spaced, in order (all of them if there are no more than k)."""
    n = len(items)
    if n <= k:
        return list(items)
    return [items[(i * n) // k] for i in range(k)]
