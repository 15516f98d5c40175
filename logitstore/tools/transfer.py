"""Move a store between locations byte for byte: directory, zip, object storage (any fsspec URL).

Every chunk's CRC32C is checked as it arrives, before it is written; the root `zarr.json`
(which says `complete: true`) is the last key written, so an interrupted copy never looks
complete, and re-running the same copy skips what already arrived.

Many keys are in flight at once (`jobs`): on object storage a copy is bound by request latency,
not bandwidth, so one GET-then-PUT at a time leaves the link idle.
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import _get_loop, sync

from .. import schema
from ..destination import OURS, is_logitstore_root, root_attrs
from ..errors import DestinationError, FormatError, IntegrityError, StoreStateError
from ..locations import (ROOT_KEY, StoreLock, check_store_destination, crc32c_ok, delete_all, get_bytes, is_url, is_zip,
                        list_keys, open_raw_store, remove_stray_keys, retire_root, set_bytes)
from ..store import open_store
from ..writer import write_failure


@dataclass
class CopyReport:
    src: str
    dst: str
    keys: int = 0
    copied: int = 0
    skipped: int = 0
    bytes_copied: int = 0
    bytes_total: int = 0  # every key of the source, the root metadata included
    jobs: int = 1


DEFAULT_JOBS = 16  # keys in flight; enough to hide ~10 ms of request latency at object-store chunk sizes


def check_chunk(key: str, data: bytes, where: str) -> None:
    """A chunk's last 4 bytes are the little-endian CRC32C of the rest (zarr's crc32c codec)."""
    if key.rsplit("/", 1)[-1] == ROOT_KEY:
        return
    if not crc32c_ok(data):
        raise IntegrityError(f"{where}: chunk '{key}' fails its CRC32C checksum; the source is corrupted, "
                             "restore it and copy again")


def _incomplete_root(root: bytes, src: str, contents: str) -> bytes:
    """The source's root metadata with complete=false and a note of what is being copied."""
    doc = json.loads(root)
    attrs = doc.setdefault("attributes", {})
    attrs[schema.ATTR_ROOT] = {**attrs[schema.ATTR_ROOT], "complete": False}
    attrs[schema.ATTR_PROGRESS] = {"rows": 0, "next_source": 0, "failures": [], "copy_of": contents, "from": src}
    return json.dumps(doc, indent=2).encode("utf-8")


def copy_store(src: str, dst: str, *, src_options: dict[str, Any] | None = None,
               dst_options: dict[str, Any] | None = None, overwrite: bool = False,
               on_key: Callable[[int], None] | None = None, on_start: Callable[[int], None] | None = None,
               jobs: int = DEFAULT_JOBS) -> CopyReport:
    """Copy a complete store from `src` to `dst` (a directory, a URL, or a .zip to write), `jobs` keys at once.

    `on_start(total_bytes)` is called once the source is listed; `on_key(nbytes)` after each key arrives
    or is found already there, in the calling thread (an exception it raises stops the copy).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    if is_url(dst) and dst.rstrip("/").endswith(".zip"):  # a zip is one local file, written front to back
        raise DestinationError(f"{dst}: a packed store is a local .zip file; pack it here and upload the file, or "
                               "copy the store itself to a URL without .zip")
    source = open_store(src, storage_options=src_options)  # validates: complete, known format
    contents = source.meta.fingerprints["contents"]
    sstore = open_raw_store(src, "r", src_options)
    keys = [k for k in list_keys(sstore) if k != ROOT_KEY]
    root = get_bytes(sstore, ROOT_KEY)
    sizes = sync(_sizes(sstore, keys))
    report = CopyReport(src, dst, keys=len(keys) + 1, bytes_total=sum(sizes.values()) + len(root), jobs=jobs)
    if on_start:
        on_start(report.bytes_total)
    try:
        if is_zip(dst):
            _write_zip(sstore, keys, root, dst, src, overwrite, report, on_key)
            return report
        state = check_store_destination(dst, dst_options, [src], flag="DST")
        lock = StoreLock(dst, exclusive=True)
        try:
            return _copy_into(sstore, keys, sizes, root, contents, src, dst, dst_options, state, overwrite, report,
                              on_key)
        finally:
            lock.release()
    except OSError as exc:  # the destination refused a write: one line, and the same command resumes
        raise write_failure(dst, exc) from None


def _copy_into(sstore: Any, keys: list[str], sizes: dict[str, int], root: bytes, contents: str, src: str, dst: str,
               dst_options: dict[str, Any] | None, state: str, overwrite: bool, report: CopyReport,
               on_key: Callable[[int], None] | None) -> CopyReport:
    dstore = open_raw_store(dst, "w", dst_options)
    if state == OURS:
        remove_stray_keys(dstore)  # an interrupted copy's temporary files
    existing = get_bytes(dstore, ROOT_KEY)
    if existing is not None and not overwrite:
        attrs = json.loads(existing).get("attributes", {})
        progress = attrs.get(schema.ATTR_PROGRESS) or {}
        there = attrs.get(schema.ATTR_ROOT, {})
        if there.get("complete") and there.get("fingerprints", {}).get("contents") == contents:
            report.skipped = report.keys  # the same cache is already there
            return report
        if progress.get("copy_of") != contents:
            state = "a complete store" if attrs.get(schema.ATTR_ROOT, {}).get("complete") else "another store"
            raise StoreStateError(f"{dst} already holds {state}; pass --overwrite to replace it")
    elif existing is not None:
        retire_root(dstore)
        delete_all(dstore)
        existing = None
    if existing is None:
        set_bytes(dstore, ROOT_KEY, _incomplete_root(root, src, contents))
        todo = keys
    else:
        # Each key is written whole (atomic rename / object PUT), so one there with the source's size
        # arrived; one listing answers for all of them instead of a request per key.
        there_sizes = sync(_sizes(dstore, keys, listed_only=True))
        arrived = {k for k in keys if k in there_sizes and there_sizes[k] == sizes.get(k)}
        todo = [k for k in keys if k not in arrived]
        for k in keys:
            if k in arrived:
                report.skipped += 1
                if on_key:
                    on_key(sizes[k])
    _copy_keys(sstore, dstore, todo, src, report, on_key)
    set_bytes(dstore, ROOT_KEY, root)  # the completion marker, last
    report.copied += 1
    report.bytes_copied += len(root)
    if on_key:
        on_key(len(root))
    return report


async def _sizes(store: Store, keys: list[str], listed_only: bool = False) -> dict[str, int]:
    """Stored bytes of each of `keys` (absent keys are left out): one listing on object storage."""
    fs, path = getattr(store, "fs", None), getattr(store, "path", None)
    if fs is not None and path is not None and hasattr(fs, "_find"):
        prefix = path.rstrip("/") + "/"
        found = await fs._find(path, detail=True)
        got = {p[len(prefix):]: int(i["size"]) for p, i in found.items()
               if p.startswith(prefix) and i.get("size") is not None}
        if listed_only or all(k in got for k in keys):
            return {k: got[k] for k in keys if k in got}

    async def size(k: str) -> int | None:
        try:
            return int(await store.getsize(k))
        except FileNotFoundError:
            return None

    got_sizes = await asyncio.gather(*(size(k) for k in keys))
    return {k: n for k, n in zip(keys, got_sizes) if n is not None}


def _copy_keys(sstore: Store, dstore: Store, keys: list[str], src: str, report: CopyReport,
               on_key: Callable[[int], None] | None) -> None:
    proto = default_buffer_prototype()

    async def copy_one(key: str) -> int:
        buf = await sstore.get(key, prototype=proto)
        if buf is None:
            raise IntegrityError(f"{src}: key '{key}' vanished while it was being copied; the source is changing: "
                                 "copy it again once it is not")
        data = buf.to_bytes()
        check_chunk(key, data, src)
        await dstore.set(key, proto.buffer.from_bytes(data))
        return len(data)

    def arrived(key: str, nbytes: int) -> None:
        report.copied += 1
        report.bytes_copied += nbytes
        if on_key:
            on_key(nbytes)

    run_bounded(keys, copy_one, arrived, report.jobs)


def run_bounded(items: Iterable[str], work: Callable[[str], Awaitable[Any]], done: Callable[[str, Any], None],
                jobs: int) -> None:
    """`work(item)` for every item on zarr's event loop, at most `jobs` started and not yet handed to
    `done(item, result)`, which runs in the calling thread as results arrive.

    Anything that goes wrong (a worker's exception, an exception from `done`, Ctrl-C) cancels the
    rest, waits for the cancelled work to settle, and is raised here. Nothing but I/O runs on the
    loop's thread: an exception there would otherwise be seen by no one while this thread waits.
    """
    items = list(items)
    if not items:
        return
    loop = _get_loop()  # the loop zarr's stores (and s3fs's session) are bound to
    results: queue.SimpleQueue = queue.SimpleQueue()
    started, settled = threading.Event(), threading.Event()
    # A slot is freed when the calling thread has handled a result, so work never runs more than
    # `jobs` ahead of what was reported (an interrupted copy re-done at most `jobs` keys).
    slots = asyncio.Semaphore(jobs)

    async def one(item: str) -> None:
        try:
            results.put((item, await work(item), None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            results.put((item, None, exc))

    async def feed() -> None:
        started.set()
        tasks: list[asyncio.Task] = []
        try:
            for item in items:
                await slots.acquire()
                tasks.append(asyncio.ensure_future(one(item)))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            settled.set()

    fut = asyncio.run_coroutine_threadsafe(feed(), loop)
    try:
        for _ in range(len(items)):
            while True:
                try:
                    item, result, exc = results.get(timeout=0.2)
                    break
                except queue.Empty:
                    if fut.done() and results.empty():  # done means every result was put: none is coming
                        fut.result()  # the feeder itself failed: raise that
                        raise RuntimeError("the copy's workers stopped without a result")
            if exc is not None:
                raise exc
            done(item, result)
            loop.call_soon_threadsafe(slots.release)
        fut.result()
    except BaseException:
        fut.cancel()
        if started.wait(1.0):
            settled.wait(30.0)
        raise


def _parents(path: str) -> list[str]:
    return [str(p) for p in Path(os.path.abspath(path)).parents]


def _zip_root(path: str) -> dict[str, Any] | None:
    """The root attributes of a packed store at `path`, None when it is not one."""
    try:
        return root_attrs(get_bytes(open_raw_store(path, "r"), ROOT_KEY))
    except (FormatError, StoreStateError, zipfile.BadZipFile, OSError, ValueError):
        return None


def _write_zip(sstore: Any, keys: list[str], root: bytes, dst: str, src: str, overwrite: bool,
               report: CopyReport, on_key: Callable[[int], None] | None) -> None:
    # A zip is written once, front to back, into a temporary name renamed at the end: zarr's
    # ZipStore appends duplicate entries on overwrite, and a half-written zip must never be
    # mistaken for a store. Entries are stored, not deflated (chunks are compressed already).
    from zarr.storage import ZipStore

    if not is_url(src) and os.path.abspath(src) in (os.path.abspath(dst), *_parents(dst)):
        raise DestinationError(f"OUT {dst} lies inside the store it packs ({src}); write it elsewhere")
    if os.path.lexists(dst):
        there = _zip_root(dst)
        if not is_logitstore_root(there):
            raise DestinationError(f"OUT {dst} exists and is not a packed logitstore store; nothing was changed; "
                                   "choose another path")
        meta = there.get(schema.ATTR_ROOT) or {}
        same = meta.get("complete") is True and (meta.get("fingerprints") or {}).get("contents") == \
            json.loads(root)["attributes"][schema.ATTR_ROOT]["fingerprints"]["contents"]
        if same and not overwrite:
            report.skipped = report.keys  # the same cache is already packed there
            return
        if not overwrite:
            raise StoreStateError(f"{dst} holds another packed store; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise DestinationError(f"OUT {dst}: no folder {parent}; create it first or choose another path")
    tmp = dst + ".partial"
    if os.path.exists(tmp):
        os.remove(tmp)
    zstore = sync(ZipStore.open(tmp, mode="w", compression=zipfile.ZIP_STORED))
    refused = False
    try:
        _copy_keys(sstore, zstore, keys, src, report, on_key)  # entries in arrival order; readers look them up
        set_bytes(zstore, ROOT_KEY, root)
    except (IntegrityError, FormatError):  # the source was refused (a chunk fails its checksum): nothing to keep
        refused = True
        raise
    finally:
        zstore.close()
        if refused:
            os.remove(tmp)
    report.copied += 1
    report.bytes_copied += len(root)
    if on_key:
        on_key(len(root))
    os.replace(tmp, dst)
