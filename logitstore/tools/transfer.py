"""Move a store between locations byte for byte: directory, zip, object storage (any fsspec URL).

Every chunk's CRC32C is checked as it arrives, before it is written; the root `zarr.json`
(which says `complete: true`) is the last key written, so an interrupted copy never looks
complete, and re-running the same copy skips what already arrived.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from zarr.core.sync import sync

from .. import schema
from ..destination import OURS, is_logitstore_root, root_attrs
from ..errors import DestinationError, FormatError, IntegrityError, StoreStateError
from ..locations import (ROOT_KEY, StoreLock, check_store_destination, crc32c_ok, delete_all, get_bytes, is_url, is_zip, key_exists,
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
               on_key: Callable[[int], None] | None = None) -> CopyReport:
    """Copy a complete store from `src` to `dst` (a directory, a URL, or a .zip to write)."""
    source = open_store(src, storage_options=src_options)  # validates: complete, known format
    contents = source.meta.fingerprints["contents"]
    sstore = open_raw_store(src, "r", src_options)
    keys = [k for k in list_keys(sstore) if k != ROOT_KEY]
    root = get_bytes(sstore, ROOT_KEY)
    report = CopyReport(src, dst, keys=len(keys) + 1)
    try:
        if is_zip(dst):
            _write_zip(sstore, keys, root, dst, src, overwrite, report, on_key)
            return report
        state = check_store_destination(dst, dst_options, [src], flag="DST")
        lock = StoreLock(dst, exclusive=True)
        try:
            return _copy_into(sstore, keys, root, contents, src, dst, dst_options, state, overwrite, report, on_key)
        finally:
            lock.release()
    except OSError as exc:  # the destination refused a write: one line, and the same command resumes
        raise write_failure(dst, exc) from None


def _copy_into(sstore: Any, keys: list[str], root: bytes, contents: str, src: str, dst: str,
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
    for key in keys:
        if existing is not None and key_exists(dstore, key):
            report.skipped += 1  # each key is written whole (atomic rename / object PUT): present = arrived
            if on_key:
                on_key(1)
        else:
            _copy_key(sstore, dstore, key, src, report, on_key)
    set_bytes(dstore, ROOT_KEY, root)  # the completion marker, last
    report.copied += 1
    return report


def _copy_key(sstore: Any, dstore: Any, key: str, src: str, report: CopyReport,
              on_key: Callable[[int], None] | None) -> None:
    data = get_bytes(sstore, key)
    if data is None:
        raise IntegrityError(f"{src}: key '{key}' vanished while it was being copied; the source is changing: "
                             "copy it again once it is not")
    check_chunk(key, data, src)
    set_bytes(dstore, key, data)
    report.copied += 1
    report.bytes_copied += len(data)
    if on_key:
        on_key(1)


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
    try:
        for key in keys:
            _copy_key(sstore, zstore, key, src, report, on_key)
        set_bytes(zstore, ROOT_KEY, root)
    finally:
        zstore.close()
    report.copied += 1
    os.replace(tmp, dst)
