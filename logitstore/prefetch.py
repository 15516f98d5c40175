"""Iterate in a background thread, a bounded number of items ahead: the one read-ahead both tools use
(the dump's corpus stream, the trainer's chunk groups and held-out batches)."""
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
