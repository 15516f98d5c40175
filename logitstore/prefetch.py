"""Iterate in a background thread, a bounded number of items ahead: the one read-ahead both tools use
(the dump's corpus stream, the trainer's chunk groups and held-out batches); and stopping a DataLoader's
read-ahead processes, its workers, from the thread that ran it."""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator, NamedTuple


class _Raised(NamedTuple):
    error: BaseException


_DONE = object()


def read_ahead(items: Iterable[Any], depth: int = 4) -> Iterator[Any]:
    """`items`, in order, produced by a background thread up to `depth` ahead, so reading (zarr decoding,
    fetching, file reads: the GIL released) overlaps the consumer's work. An error of the producer is
    raised in the consumer; a consumer that stops early (an error, a break) releases the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # re-raised in the consumer, where it has a meaning
            put(_Raised(exc))

    threading.Thread(target=run, name="logitstore-read-ahead", daemon=True).start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()


def runs_of(items: Iterable[Any], k: int) -> Iterator[list[Any]]:
    """`items` in lists of `k` (the last may be shorter). An error of `items` comes after the list of the
    items before it, so a consumer meets every item, then the error, in the same order as from `items`."""
    it = iter(items)
    while True:
        run: list[Any] = []
        try:
            while len(run) < k:
                run.append(next(it))
        except StopIteration:
            if run:
                yield run
            return
        except BaseException:
            if run:
                yield run
            raise
        yield run


def read_ahead_in_runs(items: Iterable[Any], k: int, depth: int = 4) -> Iterator[Any]:
    """`read_ahead`, the thread handing over `k` items at a time (`depth` runs ahead): one hand-off per k
    items, for a consumer whose per-item work is short enough that the hand-off itself shows. The same
    items in the same order; an error after the items before it; stopping early releases the thread."""
    runs = read_ahead(runs_of(items, k), depth)
    try:
        for run in runs:
            yield from run
    finally:
        runs.close()


def stop_workers(loader_iterator: Any) -> None:
    """Shut a DataLoader iterator's worker processes down now, from this thread (a no-op without workers or
    once done). Left to the garbage collector, the shutdown ran in whichever thread happened to collect
    the iterator (a store writer's, a corpus listing's), beside its queues' feeder threads, which then
    met closed descriptors."""
    shutdown = getattr(loader_iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
